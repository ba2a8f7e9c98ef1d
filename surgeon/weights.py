"""Backbone weights: what ``model.pretrained`` means and how timm is asked to load it.

``model.pretrained`` takes four forms (see the recipe schema):

- ``true`` — timm's pretrained weights. Taken from the local Hugging Face / torch-hub cache
  when they are there (no network touched); otherwise downloaded, after a 3-second probe of the
  hub, so that a machine without network fails in seconds with a message saying how to pass
  local weights (timm's own download would retry for about a minute).
- a path to a ``.safetensors`` / ``.pth`` / ``.pt`` / ``.bin`` / ``.npz`` file, or
  ``local-dir:FOLDER`` (a folder holding ``model.safetensors`` or ``pytorch_model.bin``, e.g.
  a Hugging Face snapshot or a merged surgeon run);
- ``builtin:NAME`` — a weight file shipped with surgeon (:mod:`surgeon.builtin`). The same
  backbones are registered timm models (:mod:`surgeon.builtin.models`): ``model.name:
  fractal_vit_tiny`` with ``pretrained: true`` loads the shipped file the same way.

Local weights are handed to timm as ``pretrained_cfg_overlay=dict(file=PATH)`` (or
``source="local-dir"``), so timm's own checkpoint filter runs: position embeddings and patch
embeddings are resampled to the model's ``img_size`` / ``patch_size``. For every form, hub
included, the classifier head is re-initialised for the run's ``num_classes`` (a checkpoint's
head belongs to its pretraining task, even when the class count happens to match). A missing, unreadable or corrupt file raises :class:`UserError` naming it.

:func:`load_report` records what timm loaded, so :func:`check_load_report` can refuse a file
that does not fit the architecture (timm loads non-strictly once the head is dropped, and
would otherwise silently keep random weights).
"""
from __future__ import annotations

import logging
import os
import re
import socket
import warnings
import zipfile
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import urlparse

import timm.models
import torch.hub
from huggingface_hub import try_to_load_from_cache  # timm depends on huggingface_hub
from safetensors import safe_open

from surgeon.builtin import BUILTIN_BACKBONES, builtin_weights
from surgeon.errors import UserError

WEIGHT_SUFFIXES = (".safetensors", ".pth", ".pt", ".bin", ".npz", ".ckpt")
LOCAL_DIR_FILES = ("model.safetensors", "pytorch_model.bin", "open_clip_model.safetensors",
                   "open_clip_pytorch_model.bin")
HUB_PROBE_TIMEOUT_S = 3.0

_OFFLINE_HINT = ("pass local weights instead: `--set model.pretrained=/path/to/weights.safetensors` "
                 "(.safetensors, .pth, .bin or .npz of this architecture), "
                 "`--set model.pretrained=local-dir:/path/to/folder` (a folder with model.safetensors, "
                 "e.g. `huggingface-cli download timm/<model>` run on a machine with network), "
                 "`builtin:NAME` for weights shipped with surgeon, or `false` for random init")


def pretrained_kwargs(name: str, pretrained) -> dict:
    """Keyword arguments for ``timm.create_model(name, ...)`` that load ``pretrained``.

    Args:
        name: timm model name.
        pretrained: the recipe's ``model.pretrained`` (``True``, a path, ``local-dir:FOLDER``,
            ``builtin:NAME``); ``False`` is handled by the caller.

    Returns:
        ``{"pretrained": True, "pretrained_cfg_overlay": {...}}`` (overlay omitted for a hub
        download).

    Raises:
        UserError: offline with no cached weights, missing/unreadable/corrupt file, unknown
            built-in name.
    """
    if pretrained is True:
        return _hub_kwargs(name)
    if not isinstance(pretrained, str) or not pretrained.strip():
        raise UserError(f"model.pretrained must be true, false, a path, local-dir:FOLDER or builtin:NAME, "
                        f"not {pretrained!r}", where="model.pretrained")
    spec = pretrained.strip()
    if spec.startswith("builtin:"):
        return file_kwargs(_builtin_file(spec.removeprefix("builtin:"), name), spec)
    if spec.startswith("local-dir:"):
        folder = Path(os.path.expanduser(spec.removeprefix("local-dir:")))
        return local_dir_kwargs(folder)
    return file_kwargs(Path(os.path.expanduser(spec)), spec)


# ----------------------------------------------------------------------------------- hub

def _hub_kwargs(name: str) -> dict:
    cfg = timm.models.get_pretrained_cfg(name)
    if cfg is None:
        raise UserError(f"timm has no pretrained weights for '{name}'", where="model.pretrained",
                        hint="use a tagged name such as vit_base_patch16_224.augreg_in21k, local weights, or false")
    if cfg.file and not (cfg.hf_hub_id or cfg.url):
        # A registered model whose weights are a local file (surgeon's built-in backbones):
        # nothing to download, and the file gets the same checks as model.pretrained: PATH.
        return file_kwargs(Path(cfg.file), name)
    cached = _cached_hub_file(cfg)
    if cached is not None:
        # Load the cached file directly: the hub client would otherwise re-check the remote
        # (and retry for a minute when there is no network).
        kwargs = file_kwargs(cached, str(cached))
        # source "" (timm's default): a hub-sourced config would otherwise ignore file=.
        kwargs["pretrained_cfg_overlay"]["source"] = ""
        return kwargs
    offline = os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")
    host, port = _hub_address(cfg)
    if offline or not _reachable(host, port):
        why = "HF_HUB_OFFLINE is set" if offline else f"{host}:{port} cannot be reached"
        raise UserError(f"cannot download the pretrained weights of '{name}': {why} and they are not in the "
                        f"local cache", where="model.pretrained", hint=_OFFLINE_HINT)
    # Download. num_classes=-1: a fresh head, as for local files (see file_kwargs).
    return {"pretrained": True, "pretrained_cfg_overlay": {"num_classes": -1}}


def _cached_hub_file(cfg) -> Path | None:
    """The weight file of ``cfg`` in the Hugging Face or torch-hub cache, if present."""
    if cfg.hf_hub_id:
        repo = cfg.hf_hub_id.split("@")[0]
        names = [cfg.hf_hub_filename] if cfg.hf_hub_filename else ["model.safetensors", "pytorch_model.bin"]
        for filename in names:
            found = try_to_load_from_cache(repo, filename)
            if isinstance(found, str) and os.path.isfile(found):
                return Path(found)
    if cfg.url:
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(urlparse(cfg.url).path)
        if path.is_file():
            return path
    return None


def _hub_address(cfg) -> tuple[str, int]:
    """The host to probe: the proxy if one is configured, else the hub (or the weights' URL)."""
    proxy = os.environ.get("HTTPS_PROXY") or os.environ.get("https_proxy")
    if proxy:
        parsed = urlparse(proxy if "://" in proxy else f"http://{proxy}")
        return parsed.hostname or "localhost", parsed.port or 80
    if cfg.hf_hub_id:
        parsed = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    else:
        parsed = urlparse(cfg.url or "https://huggingface.co")
    return parsed.hostname or "huggingface.co", parsed.port or (443 if parsed.scheme == "https" else 80)


def _reachable(host: str, port: int, timeout: float = HUB_PROBE_TIMEOUT_S) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


# ---------------------------------------------------------------------------- local files

def _builtin_file(name: str, model_name: str) -> Path:
    if name not in BUILTIN_BACKBONES:
        raise UserError(f"unknown built-in backbone weights '{name}'", where="model.pretrained",
                        hint="known: " + (", ".join(BUILTIN_BACKBONES) or "none"))
    spec = BUILTIN_BACKBONES[name]
    arch = spec.get("model_name")
    if arch and model_name not in (arch, name):  # the timm name, or the registered built-in name
        kwargs = ", ".join(f"{k}: {v}" for k, v in (spec.get("kwargs") or {}).items())
        raise UserError(f"builtin:{name} holds weights of {arch}, not {model_name}", where="model.pretrained",
                        hint=f"use model: {{name: {name}, pretrained: true}} (or {{name: {arch}, "
                             f"kwargs: {{{kwargs}}}}})")
    return Path(builtin_weights(name))  # raises UserError if the file is missing


def file_kwargs(path: Path, shown: str) -> dict:
    """timm kwargs loading the weight file ``path`` (checked readable; head re-initialised)."""
    if not path.exists():
        raise UserError("pretrained weights file not found", where=str(path),
                        hint="model.pretrained takes a file path, local-dir:FOLDER, builtin:NAME, true or false")
    if path.is_dir():
        raise UserError("pretrained weights path is a folder", where=str(path),
                        hint=f"for a timm/Hugging Face folder write local-dir:{path}")
    suffix = path.suffix.lower()
    if suffix not in WEIGHT_SUFFIXES:
        raise UserError(f"unsupported weights file type '{suffix or path.name}'", where=str(path),
                        hint="use .safetensors, .pth, .pt, .bin or .npz")
    check_readable(path)
    # num_classes=-1 in the overlay: it never equals the model's, so timm drops the checkpoint's
    # classifier and keeps the freshly initialised head; a negative value is also never used as
    # the model's default num_classes (timm's _update_default_model_kwargs skips it).
    overlay = {"file": str(path), "num_classes": -1}
    if suffix == ".npz":
        # Big-vision / JAX checkpoints: timm converts them in the model's own load_pretrained.
        overlay["custom_load"] = True
    return {"pretrained": True, "pretrained_cfg_overlay": overlay}


def local_dir_kwargs(folder: Path) -> dict:
    """timm kwargs loading the weights of a ``local-dir:`` folder into the recipe's model."""
    if not folder.is_dir():
        raise UserError("local-dir weights folder not found" if not folder.exists() else "local-dir: is not a folder",
                        where=str(folder), hint="local-dir:FOLDER names a folder holding model.safetensors")
    files = [folder / f for f in LOCAL_DIR_FILES if (folder / f).is_file()]
    if not files:
        raise UserError("the folder holds no model.safetensors or pytorch_model.bin", where=str(folder),
                        hint="local-dir: folders are written by timm.models.save_for_hf or huggingface-cli download")
    check_readable(files[0])
    return {"pretrained": True,
            "pretrained_cfg_overlay": {"source": "local-dir", "file": str(folder), "num_classes": -1}}


def check_readable(path: Path) -> None:
    """Open a weight file cheaply (header / zip directory / mmap) to catch corrupt files early.

    Raises:
        UserError: naming the file, when it cannot be parsed.
    """
    suffix = path.suffix.lower()
    try:
        if suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                if not list(f.keys()):
                    raise UserError("the safetensors file holds no tensors", where=str(path))
        elif suffix == ".npz":
            with zipfile.ZipFile(path) as z:
                if not z.namelist():
                    raise UserError("the .npz file holds no arrays", where=str(path))
        elif zipfile.is_zipfile(path):
            # torch.save's zip format: reading the central directory (at the end of the file)
            # catches truncation without loading the tensors; timm loads it for real.
            with zipfile.ZipFile(path) as z:
                if not any(n.endswith("data.pkl") for n in z.namelist()):
                    raise UserError("a zip file but not a PyTorch checkpoint (no data.pkl)", where=str(path))
        else:
            with open(path, "rb") as f:
                magic = f.read(2)
            # Legacy (pre-1.6) torch.save files are plain pickles: protocol 2+ starts with 0x80.
            if len(magic) < 2 or magic[0] != 0x80:
                raise UserError("not a PyTorch checkpoint, or a truncated one (neither a complete zip archive "
                                "as torch.save writes nor a pickle)", where=str(path),
                                hint="re-download or re-export the file")
    except UserError:
        raise
    except Exception as exc:  # noqa: BLE001 - every parser error means the same thing here
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"cannot read the weights file: {first}", where=str(path),
                        hint="the file is corrupt, truncated, or not a weights file (re-download or re-export it)") from None


# ------------------------------------------------------------------------- load checking

class _KeyRecorder(logging.Handler):
    """Collects timm's "Missing keys (...)" / "Unexpected keys (...)" log records."""

    pattern = re.compile(r"(Missing|Unexpected) keys \((.*?)\) discovered")

    def __init__(self):
        super().__init__(level=logging.DEBUG)
        self.missing: list[str] = []
        self.unexpected: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        m = self.pattern.search(record.getMessage())
        if m:
            keys = [k.strip() for k in m.group(2).split(",") if k.strip()]
            (self.missing if m.group(1) == "Missing" else self.unexpected).extend(keys)


@contextmanager
def load_report():
    """Record the keys timm's ``load_pretrained`` reports as missing/unexpected.

    Yields:
        an object with ``missing`` and ``unexpected`` lists of state-dict keys.
    """
    logger = logging.getLogger("timm.models._builder")
    recorder = _KeyRecorder()
    old_level = logger.level
    logger.addHandler(recorder)
    logger.setLevel(logging.INFO)  # the missing-keys message is logged at INFO
    try:
        yield recorder
    finally:
        logger.removeHandler(recorder)
        logger.setLevel(old_level)


def check_load_report(report, head_names: list[str], source: str) -> None:
    """Refuse weights that left backbone tensors at random init; warn about ignored tensors.

    Args:
        report: from :func:`load_report`.
        head_names: state-dict key prefixes of the classifier (expected to be missing).
        source: the ``model.pretrained`` value, for the message.
    """
    missing = [k for k in report.missing if not any(k == h or k.startswith(h + ".") for h in head_names)]
    if missing:
        shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
        raise UserError(f"the weights do not fit the model: {len(missing)} backbone tensor(s) are not in the file "
                        f"({shown})", where=source,
                        hint="check that the file was saved from the same architecture as model.name "
                             "(and model.kwargs such as depth)")
    if report.unexpected:
        shown = ", ".join(report.unexpected[:4])
        warnings.warn(f"{source}: {len(report.unexpected)} tensor(s) in the weights file are not used by the model "
                      f"({shown})", stacklevel=2)
