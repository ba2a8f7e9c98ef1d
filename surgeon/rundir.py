"""The run directory: its layout, its event log, reading its recipe, naming new runs.

```
RUN/recipe.yaml               the resolved recipe (written before training starts)
RUN/metrics.jsonl             one JSON event per line (start, train, eval, nonfinite, end, merge):
                              the source of truth; everything below that logs a metric derives from it
RUN/summary.csv               one row per epoch (epoch, step, lr, loss terms, val top-1/loss, time),
                              written as the run goes
RUN/summary.json              final metrics, parameters, timings, the environment (versions, command)
RUN/predictions_<split>.json  {"labels", "preds", "class_names"} of the final evaluation split
RUN/analysis.json             expert similarity (LoRA-family runs)
RUN/adapter.safetensors       the surgery's tensors of the selected (best-val) state
RUN/checkpoints/last.pt       resumable training state (atomic)
RUN/checkpoints/best.safetensors  surgery tensors of the best validation state so far
RUN/merged/                   after merge: a timm local-dir folder, or a dense-adapter checkpoint,
                              merged by the recipe's eval.merge_mode (what the run's figures measure)
RUN/merged-<mode>/            `surgeon merge RUN --mode <mode>` with another merge mode
RUN/tensorboard/              TensorBoard event files (train.log: [tensorboard])
RUN/.lock                     the run's lock (:class:`RunLock`): who is writing to it
```

This module only knows where things are, how the event log is written and who may write; it
builds no model. Rebuilding a trained model from a run is :mod:`surgeon.runload`.
"""
from __future__ import annotations

import datetime as _dt
import fcntl
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path, PurePath

import yaml

from surgeon.errors import UserError
from surgeon.io import json_default, read_json

#: Path components that name a split, not a data set (``imagefolder:data/cub/train`` is "cub").
_GENERIC_PARTS = {"train", "val", "valid", "validation", "test", "images", "data", "train800val200", ""}


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

    def merged_for(self, mode: str, recipe_mode: str) -> Path:
        """The merged folder of merge mode ``mode``: ``merged/`` for the recipe's own
        ``eval.merge_mode`` (``recipe_mode``), ``merged-<mode>/`` for another one, so a run never
        holds a merge its summary and report do not describe."""
        return self.merged if mode == recipe_mode else self.root / f"merged-{mode}"

    @property
    def analysis(self) -> Path:
        return self.root / "analysis.json"

    @property
    def summary_csv(self) -> Path:
        return self.root / "summary.csv"

    @property
    def tensorboard(self) -> Path:
        return self.root / "tensorboard"

    @property
    def lock(self) -> Path:
        return self.root / ".lock"

    def never_started(self) -> bool:
        """True if the run holds nothing trained: no checkpoint, no adapter, no summary, no merge
        (it stopped, or was killed, before its first checkpoint): starting it over loses nothing."""
        return not any(p.exists() for p in (self.last, self.best, self.adapter, self.summary, self.merged))

    def predictions(self, split: str) -> Path:
        return self.root / f"predictions_{split}.json"


# --------------------------------------------------------------------------- the recipe

def recipe_differences(old: dict, new: dict, prefix: str = "") -> list[str]:
    """Dotted paths where two resolved recipes (as mappings) differ (``a.b: old -> new``)."""
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


#: Resolved-recipe keys added by a later surgeon that change no number, with the value a run
#: written before them had in effect (its RUN/recipe.yaml lacks the key).
ADDED_KEYS = {("train", "log"): []}


def with_added_keys(recipe: dict) -> dict:
    """A run's resolved recipe (a mapping) with :data:`ADDED_KEYS` it lacks filled in: what
    today's surgeon resolves the same recipe to, so a run written before them still resumes."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in recipe.items()}
    for (section, key), value in ADDED_KEYS.items():
        if isinstance(out.get(section), dict) and key not in out[section]:
            out[section][key] = value
    return out


def without_added_defaults(recipe: dict) -> dict:
    """A resolved recipe without the :data:`ADDED_KEYS` that hold their old value: what an
    identity computed from the recipe (a sweep's name) was computed from before they existed."""
    out = {k: dict(v) if isinstance(v, dict) else v for k, v in recipe.items()}
    for (section, key), value in ADDED_KEYS.items():
        if isinstance(out.get(section), dict) and out[section].get(key, value) == value:
            out[section].pop(key, None)
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


def dataset_short_name(source: str) -> str:
    """The column name of a data set in comparisons and run names: ``builtin:digits`` → ``digits``,
    ``vtab1k:/data/vtab/cifar`` → ``cifar``, ``imagefolder:data/cub/train`` → ``cub``."""
    scheme, sep, arg = str(source).partition(":")
    if not sep:
        return str(source)
    if scheme == "builtin":
        return arg
    path = PurePath(arg.rstrip("/\\"))
    if scheme == "filelist":
        path = path.with_suffix("")
    for part in reversed(path.parts):
        if part.lower() not in _GENERIC_PARTS:
            return part
    return arg or scheme


def default_run_dir(recipe, runs_root: Path = Path("runs")) -> Path:
    """``runs/<recipe>-<model>-<data>-<YYYYmmdd-HHMMSS>`` (a numeric suffix if it exists) for a
    :class:`~surgeon.recipe.Recipe`."""

    def slug(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9._+-]+", "_", str(text)).strip("_") or "x"

    data = dataset_short_name(recipe.data.source)
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    base = runs_root / f"{slug(recipe.name)}-{slug(recipe.model.name)}-{slug(data)}-{stamp}"
    path, n = base, 1
    while path.exists():
        n += 1
        path = base.with_name(f"{base.name}-{n}")
    return path


def merged_kind(run_dir: Path, folder: Path | None = None) -> str | None:
    """``"timm"`` (a timm local-dir folder), ``"dense-adapter"``, or None if not merged.

    ``folder``: a merged folder of the run (default ``RUN/merged``)."""
    info = (Path(folder) if folder is not None else RunPaths(Path(run_dir)).merged) / "surgeon.json"
    if not info.is_file():
        return None
    return read_json(info).get("format")


# ------------------------------------------------------------------------------- lock

#: Run directories this process holds the lock of: real path -> [file descriptor, depth].
_HELD: dict[str, list[int]] = {}


class RunLock:
    """An exclusive lock on a run directory while this process writes to it (``apply``,
    ``--resume``, ``merge``): a second process is refused, naming the holder's pid.

    ``fcntl.flock`` on ``RUN/.lock``: the kernel releases it when the holder exits, however it
    exits (``kill -9`` included), so a stale lock never blocks a resume. Re-entrant within a
    process (``apply`` holds it and merges; a sweep worker trains one trial at a time).

    Args:
        root: the run directory (must exist).
        what: what the holder does, e.g. ``surgeon apply``: shown to a refused process.

    Raises:
        UserError: another process holds the lock, or the directory cannot be written.
    """

    def __init__(self, root: Path, what: str):
        self.root, self.what = Path(root), what
        self.key = os.path.realpath(self.root)

    def __enter__(self) -> "RunLock":
        held = _HELD.get(self.key)
        if held is not None:
            held[1] += 1
            return self
        path = RunPaths(self.root).lock
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise UserError(f"cannot write to the run directory: {exc.strerror}", where=str(self.root),
                            hint="the run directory must be writable (it is read-only, or not yours)") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            holder = _read_holder(fd)
            os.close(fd)
            raise UserError(f"the run is in use: {holder} is writing to it", where=str(self.root),
                            hint="wait for it to finish (or stop it); two processes must not write one run") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()} {self.what}\n".encode())
        _HELD[self.key] = [fd, 1]
        return self

    def __exit__(self, *exc) -> None:
        held = _HELD.get(self.key)
        if held is None:
            return
        held[1] -= 1
        if held[1] == 0:
            del _HELD[self.key]
            os.close(held[0])  # closing releases the flock


def _read_holder(fd: int) -> str:
    """``process 1234 (surgeon apply)`` from a lock file's content."""
    try:
        text = os.pread(fd, 200, 0).decode("utf-8", "replace").strip()
    except OSError:
        text = ""
    pid, _, what = text.partition(" ")
    return f"process {pid} ({what})" if pid.isdigit() else "another process"


# ---------------------------------------------------------------------------- event log

class MetricsLog:
    """Append-only ``metrics.jsonl``: one JSON object per line, flushed per event.

    ``offset()`` is the file size after the last complete event; a checkpoint records it and a
    resumed run truncates the log there, so events logged after the checkpoint (and redone
    after resuming) are not duplicated.

    Listeners (:meth:`add_listener`: ``summary.csv``, TensorBoard) see every event after it is
    written; the JSONL stays the source of truth. A listener that raises is dropped with a
    warning: a side log must not cost the run.
    """

    def __init__(self, path: Path):
        self.path = Path(path)
        self._file = open(self.path, "a", encoding="utf-8")
        self._listeners: list = []

    def add_listener(self, listener) -> None:
        """``listener(record)`` is called with each event's dict after it is written; its
        ``close()``, if it has one, when the log closes."""
        self._listeners.append(listener)

    def log(self, event: str, **fields) -> dict:
        record = {"event": event, **fields}
        self._file.write(json.dumps(record, allow_nan=False, default=json_default) + "\n")
        self._file.flush()
        for listener in list(self._listeners):
            try:
                listener(record)
            except Exception as exc:  # noqa: BLE001 - see the class docstring
                self._listeners.remove(listener)
                warnings.warn(f"{getattr(listener, 'name', type(listener).__name__)} stopped logging: "
                              f"{type(exc).__name__}: {exc}", stacklevel=2)
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
        listeners, self._listeners = self._listeners, []
        for listener in listeners:
            close = getattr(listener, "close", None)
            if close is not None:
                try:
                    close()
                except Exception as exc:  # noqa: BLE001 - see the class docstring
                    warnings.warn(f"{getattr(listener, 'name', type(listener).__name__)} did not close: "
                                  f"{type(exc).__name__}: {exc}", stacklevel=2)
        self._file.close()


def read_events(path: Path) -> list[dict]:
    """The complete events of a ``metrics.jsonl`` (a torn or unreadable line is skipped)."""
    events = []
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        return events
    for line in text.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if isinstance(record, dict) and "event" in record:
            events.append(record)
    return events
