"""The run directory: its layout, its event log, and rebuilding a trained model from it.

```
RUN/recipe.yaml               the resolved recipe (written before training starts)
RUN/metrics.jsonl             one JSON event per line (start, train, eval, nonfinite, end, merge)
RUN/summary.json              final metrics, parameters, timings
RUN/predictions_<split>.json  {"labels", "preds", "class_names"} of the final evaluation split
RUN/adapter.safetensors       the surgery's tensors of the selected (best-val) state
RUN/checkpoints/last.pt       resumable training state (atomic)
RUN/checkpoints/best.safetensors  surgery tensors of the best validation state so far
RUN/merged/                   after merge: a timm local-dir folder, or a dense-adapter checkpoint
```

A run is rebuilt from ``recipe.yaml`` (architecture, surgery, seeds) + the backbone weights the
recipe names + ``adapter.safetensors``; a merged run needs neither the recipe's backbone
weights nor surgeon when it is a timm folder.
"""
from __future__ import annotations

import datetime as _dt
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn as nn
import yaml

from surgeon.errors import UserError

FILE_SCHEMES = ("imagefolder", "vtab1k", "filelist", "fgvc")


@dataclass(frozen=True)
class RunPaths:
    """Where each artefact of a run lives."""

    root: Path

    @property
    def recipe(self) -> Path:
        return self.root / "recipe.yaml"

    @property
    def metrics(self) -> Path:
        return self.root / "metrics.jsonl"

    @property
    def summary(self) -> Path:
        return self.root / "summary.json"

    @property
    def adapter(self) -> Path:
        return self.root / "adapter.safetensors"

    @property
    def checkpoints(self) -> Path:
        return self.root / "checkpoints"

    @property
    def last(self) -> Path:
        return self.checkpoints / "last.pt"

    @property
    def best(self) -> Path:
        return self.checkpoints / "best.safetensors"

    @property
    def merged(self) -> Path:
        return self.root / "merged"

    def predictions(self, split: str) -> Path:
        return self.root / f"predictions_{split}.json"


# --------------------------------------------------------------------------- the recipe

def normalize_recipe(recipe) -> None:
    """Make local paths of a resolved recipe absolute (in place), so the run can be rebuilt
    and resumed from any working directory: ``model.pretrained`` files / ``local-dir:`` and
    file-based ``data.source`` specs."""
    data = recipe.data
    pre = data["model"].get("pretrained")
    if isinstance(pre, str) and not pre.startswith("builtin:"):
        prefix = "local-dir:" if pre.startswith("local-dir:") else ""
        path = pre.removeprefix(prefix)
        data["model"]["pretrained"] = prefix + str(Path(os.path.expanduser(path)).absolute())
    source = data.get("data", {}).get("source")
    if isinstance(source, str):
        scheme, sep, arg = source.partition(":")
        if sep and scheme.strip().lower() in FILE_SCHEMES and arg.strip():
            arg = os.path.expandvars(os.path.expanduser(arg.strip()))
            data["data"]["source"] = f"{scheme.strip().lower()}:{Path(arg).absolute()}"


def recipe_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted paths where two resolved recipes differ (``a.b: old -> new``)."""
    out = []
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            path = f"{prefix}.{key}" if prefix else str(key)
            if key not in old:
                out.append(f"{path}: (absent) -> {new[key]!r}")
            elif key not in new:
                out.append(f"{path}: {old[key]!r} -> (absent)")
            else:
                out.extend(recipe_differences(old[key], new[key], path))
    elif isinstance(old, list) and isinstance(new, list) and len(old) == len(new):
        for i, (a, b) in enumerate(zip(old, new)):
            out.extend(recipe_differences(a, b, f"{prefix}.{i}"))
    elif old != new:
        out.append(f"{prefix}: {old!r} -> {new!r}")
    return out


def read_run_recipe(run_dir: Path) -> dict:
    """``RUN/recipe.yaml`` as a dict. Raises :class:`UserError` for a missing/unreadable run."""
    run_dir = Path(run_dir)
    if not run_dir.exists():
        raise UserError(f"run directory {str(run_dir)!r} does not exist",
                        hint="pass the directory `surgeon apply` printed as its last line")
    if not run_dir.is_dir():
        raise UserError(f"{str(run_dir)!r} is not a directory", hint="pass a run directory")
    path = RunPaths(run_dir).recipe
    if not path.is_file():
        raise UserError(f"{str(run_dir)!r} is not a surgeon run directory: it has no recipe.yaml",
                        hint="pass the directory `surgeon apply` printed as its last line")
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except (yaml.YAMLError, UnicodeDecodeError, OSError) as exc:
        raise UserError(f"cannot read the run's recipe: {exc}", where=str(path)) from None
    if not isinstance(data, dict):
        raise UserError("the run's recipe is not a mapping", where=str(path))
    return data


def load_run_recipe(run_dir: Path):
    """The run's recipe validated again (a :class:`surgeon.recipe.Recipe`)."""
    from surgeon.recipe import load_recipe

    read_run_recipe(run_dir)  # the clear errors for a missing run come from here
    return load_recipe(str(RunPaths(Path(run_dir)).recipe))


def default_run_dir(recipe, runs_root: Path = Path("runs")) -> Path:
    """``runs/<recipe>-<model>-<data>-<YYYYmmdd-HHMMSS>`` (a numeric suffix if it exists)."""
    from surgeon.report.runs import dataset_short_name  # the column name reports use too

    def slug(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9._+-]+", "_", str(text)).strip("_") or "x"

    try:
        data = dataset_short_name(recipe["data"]["source"])
    except ImportError:  # report package absent: a cruder short name
        data = recipe["data"]["source"].rstrip("/").rsplit("/", 1)[-1].rsplit(":", 1)[-1]
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = runs_root / f"{slug(recipe.name)}-{slug(recipe['model']['name'])}-{slug(data)}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


# ---------------------------------------------------------------------------- event log

class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object per line, flushed per event.

    ``offset()`` is the file size after the last complete event; a checkpoint records it and a
    resumed run truncates the log there, so events logged after the checkpoint (and redone
    after resuming) are not duplicated.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "a", encoding="utf-8")

    def log(self, event: str, **fields) -> dict:
        record = {"event": event, **fields}
        self._file.write(json.dumps(record, allow_nan=False, default=_json_default) + "\n")
        self._file.flush()
        return record

    def offset(self) -> int:
        self._file.flush()
        return self._file.tell()

    def truncate(self, offset: int) -> None:
        """Drop everything after byte ``offset`` (and a torn last line)."""
        self._file.flush()
        self._file.truncate(min(offset, self.path.stat().st_size))
        self._file.seek(0, os.SEEK_END)

    def close(self) -> None:
        self._file.close()


def _json_default(obj):
    if isinstance(obj, torch.Tensor):
        return obj.item() if obj.numel() == 1 else obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item"):
        return obj.item()
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def finite_or_none(x):
    """JSON has no NaN: non-finite numbers are written as null."""
    if x is None:
        return None
    x = float(x)
    return x if x == x and abs(x) != float("inf") else None


def write_json(path: Path, data) -> None:
    """Atomically write pretty JSON."""
    from surgeon.train.checkpoint import atomic_write

    text = json.dumps(data, indent=2, allow_nan=False, default=_json_default) + "\n"
    atomic_write(Path(path), lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


def read_json(path: Path) -> dict:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"cannot read {Path(path).name}: {exc}", where=str(path)) from None


# ------------------------------------------------------------------------ the model

def build_run_model(recipe, *, num_classes: int | None = None, weights: bool = True, device="cpu",
                    probe: bool = True) -> nn.Module:
    """``surgeon.build_model`` with the weight-loading problems a user can fix turned into
    :class:`UserError` (no network, a file of another architecture, a corrupt file) and timm's
    load report checked (a file that leaves backbone tensors random is refused)."""
    import surgeon
    from surgeon.weights import check_load_report, load_report

    pretrained = recipe["model"].get("pretrained", False) if weights else False
    where = recipe.where(("model", "pretrained"))
    try:
        with load_report() as report:
            model = surgeon.build_model(recipe, num_classes=num_classes, weights=weights, probe=probe)
    except UserError:
        raise
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        if pretrained is False:
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:400]
        hint = ("the file must hold weights of the same architecture as model.name/model.kwargs"
                if pretrained is not True else
                "download the weights on a machine with network and pass them as a file or local-dir:FOLDER")
        raise UserError(f"cannot load the pretrained weights {pretrained!r} into {recipe['model']['name']}: {first}",
                        where=where, hint=hint) from None
    if pretrained is not False:
        head = model.get_classifier() if hasattr(model, "get_classifier") else None
        head_names = [n for n, m in model.named_modules() if m is head and n] or ["head", "fc", "classifier"]
        check_load_report(report, head_names, str(pretrained))
    return model.to(device)


def rebuild_backbone(recipe, device="cpu") -> nn.Module:
    """The run's patched model with its backbone weights, before the trained tensors are loaded.

    Seeded exactly as ``surgeon apply`` seeds it, so a ``pretrained: false`` backbone comes back
    with the same random weights (verified against the adapter's fingerprint by the caller).
    """
    from surgeon.train.checkpoint import seed_everything

    seed_everything(recipe["train"]["seed"])
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="model.pretrained is false")
        return build_run_model(recipe, probe=False, device=device)


def check_backbone(model: nn.Module, adapter: Path) -> None:
    """Refuse to pair trained tensors with backbone weights other than those they were trained on."""
    from safetensors import safe_open

    from surgeon.train.checkpoint import backbone_fingerprint

    try:
        with safe_open(str(adapter), framework="pt") as f:
            expected = (f.metadata() or {}).get("backbone_fingerprint")
    except Exception:  # noqa: BLE001 - load_tensors reports a corrupt file
        return
    if expected and expected != backbone_fingerprint(model):
        raise UserError("the backbone weights differ from the ones this run was trained on",
                        where=str(adapter),
                        hint="model.pretrained in RUN/recipe.yaml must name the same weights as during training "
                             "(the file was replaced, or a random init no longer reproduces with this torch/timm)")


def merged_kind(run_dir: Path) -> str | None:
    """``"timm"`` (a timm local-dir folder), ``"dense-adapter"``, or None if not merged."""
    info = RunPaths(Path(run_dir)).merged / "surgeon.json"
    if not info.is_file():
        return None
    return read_json(info).get("format")


def load_run(run_dir, *, merged: bool = True, device: str = "cpu") -> nn.Module:
    """The trained model of a run directory, in eval mode.

    Args:
        run_dir: a directory written by ``surgeon apply``.
        merged: the merged model (``RUN/merged`` if it exists, else merged in memory with the
            recipe's ``eval.merge_mode``); False gives the model with its surgery layers
            (experts, masks) as trained, e.g. for stochastic/fixed/ensemble inference.
        device: where to put it.

    Returns:
        the model; ``model.surgeon_recipe`` holds the run's recipe (a timm folder loaded with
        ``merged=True`` is otherwise a plain timm model).

    Raises:
        UserError: not a run, no trained tensors yet, files that do not match the recipe.
    """
    import surgeon
    from surgeon.train.checkpoint import load_checkpoint, load_surgery_state, load_tensors

    run_dir = Path(run_dir)
    paths = RunPaths(run_dir)
    recipe = load_run_recipe(run_dir)
    kind = merged_kind(run_dir) if merged else None
    if kind == "timm":
        import timm

        try:
            model = timm.create_model(f"local-dir:{paths.merged}", pretrained=True)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"cannot load the merged model: {exc}", where=str(paths.merged),
                            hint="re-create it with `surgeon merge RUN`") from None
    elif kind == "dense-adapter":
        info = read_json(paths.merged / "surgeon.json")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build_run_model(recipe, weights=False, probe=False)
        surgeon.merge(model, mode=info.get("merge_mode", "average"))
        tensors = load_tensors(paths.merged / "model.safetensors")
        result = model.load_state_dict(tensors, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise UserError(f"the merged checkpoint does not match the recipe's model (missing {result.missing_keys[:3]}, "
                            f"unexpected {result.unexpected_keys[:3]})", where=str(paths.merged / "model.safetensors"),
                            hint="re-create it with `surgeon merge RUN`")
    else:
        model = rebuild_backbone(recipe)
        if paths.adapter.is_file():
            tensors, where = load_tensors(paths.adapter), str(paths.adapter)
            check_backbone(model, paths.adapter)
        elif paths.best.is_file():
            tensors, where = load_tensors(paths.best), str(paths.best)
            warnings.warn(f"{run_dir}: the run did not finish; using its best checkpoint so far", stacklevel=2)
        elif paths.last.is_file():
            tensors, where = load_checkpoint(paths.last)["model"], str(paths.last)
            warnings.warn(f"{run_dir}: the run did not finish; using its last checkpoint", stacklevel=2)
        else:
            raise UserError(f"run {str(run_dir)!r} has no trained tensors (no adapter.safetensors or checkpoint)",
                            hint="the run was stopped before its first checkpoint; resume it with "
                                 f"`surgeon apply --resume {run_dir}`")
        load_surgery_state(model, tensors, where)
        ev = recipe["eval"]
        if hasattr(model, "surgeon_sampler"):
            model.surgeon_sampler.mode = "merge"
            model.surgeon_sampler.merge_mode = ev["merge_mode"]
        if merged:
            surgeon.merge(model, mode=ev["merge_mode"])
    model.surgeon_recipe = recipe
    model.eval()
    return model.to(device)
