"""What a run saves: the surgery's tensors (small) and resumable training state, atomically.

- :func:`surgery_state` — the tensors that, together with the recipe and the backbone weights,
  rebuild the trained model: every trainable parameter, plus the buffers the surgery layers
  added (expert masks, frozen initial weights ``W0``, pruning masks). The frozen backbone is
  not included (it comes back from ``model.pretrained``).
- :func:`save_checkpoint` / :func:`load_checkpoint` — the full training state for ``--resume``:
  surgery tensors, optimizer, scheduler, grad scaler, every RNG (Python, numpy, torch, CUDA,
  the expert sampler), the data position and counters. Written with ``torch.save`` to a
  temporary file in the same folder, fsynced, then ``os.replace``d over the old one, so a
  SIGKILL at any moment leaves either the old or the new checkpoint, never a torn one.
  Everything in it is a tensor or plain Python data, so it loads with ``weights_only=True``.
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from surgeon.errors import UserError

CHECKPOINT_VERSION = 1


def _surgery_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    from surgeon.methods.base import SurgeryLayer

    return [(n, m) for n, m in model.named_modules() if isinstance(m, SurgeryLayer)]


def surgery_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters + surgery-layer buffers, keyed by ``model.state_dict()`` names.

    Buffers of a surgery layer's ``base_layer`` (the original timm module) are left out: they
    are part of the backbone.
    """
    state = model.state_dict(keep_vars=True)
    out = {k: v for k, v in state.items() if isinstance(v, nn.Parameter) and v.requires_grad}
    for prefix, layer in _surgery_modules(model):
        prefix = f"{prefix}." if prefix else ""
        for name, buf in layer.named_buffers():
            if name.startswith("base_layer.") or ".base_layer." in name:
                continue
            key = prefix + name
            if key in state:  # persistent buffers only
                out[key] = buf
    return {k: v.detach() for k, v in out.items()}


def load_surgery_state(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy saved surgery tensors into ``model``; every trainable parameter must be covered.

    Raises:
        UserError: the file does not match the model the recipe builds (names or shapes).
    """
    expected = surgery_state(model)
    unknown = sorted(set(tensors) - set(expected))
    missing = sorted(k for k in expected if k not in tensors)
    bad_shape = sorted(k for k in tensors if k in expected and tensors[k].shape != expected[k].shape)
    if unknown or missing or bad_shape:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) such as {missing[0]}")
        if unknown:
            parts.append(f"{len(unknown)} unknown tensor(s) such as {unknown[0]}")
        if bad_shape:
            k = bad_shape[0]
            parts.append(f"shape mismatch for {k}: saved {tuple(tensors[k].shape)}, model {tuple(expected[k].shape)}")
        raise UserError("saved tensors do not match the model rebuilt from the run's recipe: " + "; ".join(parts),
                        where=where, hint="the run directory was edited or written by another surgeon version")
    with torch.no_grad():
        for key, value in tensors.items():
            expected[key].copy_(value.to(expected[key].device, expected[key].dtype))


def backbone_fingerprint(model: nn.Module) -> str:
    """A short hash of the frozen weights (everything :func:`surgery_state` leaves out).

    ``adapter.safetensors`` stores it, so a run rebuilt later from ``model.pretrained`` can tell
    when those weights are not the ones it was trained on (a file replaced on disk, a random
    init that no longer reproduces). About 4096 evenly spaced values per tensor are hashed:
    cheap for ViT-L, and any re-download, re-init or fine-tune changes them.
    """
    import hashlib

    trained = set(surgery_state(model))
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        if key in trained or not value.is_floating_point():
            continue
        flat = value.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].to("cpu", torch.float32).contiguous()
        h.update(key.encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]


# ------------------------------------------------------------------------------ atomic io

def atomic_write(path: Path, write) -> None:
    """``write(tmp_path)`` then fsync and rename over ``path`` (same folder, so rename is atomic)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    try:  # make the rename itself durable
        dir_fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
    except OSError:
        pass


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Atomically write ``tensors`` (contiguous CPU copies) as safetensors."""
    from safetensors.torch import save_file

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata))


def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file; a missing or corrupt file raises :class:`UserError` naming it."""
    from safetensors.torch import load_file

    path = Path(path)
    if not path.is_file():
        raise UserError("file not found", where=str(path))
    try:
        return load_file(str(path))
    except Exception as exc:  # noqa: BLE001 - any parse error means a corrupt file
        raise UserError(f"cannot read tensors: {exc}", where=str(path),
                        hint="the file is corrupt or truncated") from None


# ---------------------------------------------------------------------------------- RNG

def rng_state(sampler=None) -> dict:
    """Every random stream a training step consumes, as tensors and plain Python data."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": _to_lists(random.getstate()),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if sampler is not None:
        state["sampler"] = sampler.state_dict()
    return state


def set_rng_state(state: dict, sampler=None) -> None:
    random.setstate(_to_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if sampler is not None and "sampler" in state:
        sampler.load_state_dict(state["sampler"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, tuple) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA). The expert sampler and the data order have
    their own seeded generators (built from the same recipe seed)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The torch seed of optimizer step ``step`` (dropout masks and any other torch randomness of
    the step): a function of the run seed, the step and the process rank only, so a resumed run,
    an official-code replay or another world size draws the same masks for the same step."""
    return int(np.random.SeedSequence([int(seed), int(step), int(rank), 2]).generate_state(1)[0])


# --------------------------------------------------------------------------- checkpoints

def save_checkpoint(path: Path, state: dict) -> None:
    """Atomically ``torch.save`` a training state (see module docstring for its contents)."""
    state = {"version": CHECKPOINT_VERSION, **state}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict:
    """Load a training state written by :func:`save_checkpoint`.

    Raises:
        UserError: missing, truncated or foreign file (named).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError("checkpoint not found", where=str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling error means a corrupt file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot read the checkpoint: {first}", where=str(path),
                        hint="the file is corrupt; delete it to restart the run from its beginning") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise UserError("not a surgeon checkpoint (or one of another version)", where=str(path))
    return state
