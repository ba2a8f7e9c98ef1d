"""Read a run directory into one :class:`RunData`, tolerating runs that were killed mid-way.

The trainer writes (docs: ``DESIGN.md`` "Run directory"): ``recipe.yaml``, ``metrics.jsonl``
(one JSON event per line), ``summary.json``, ``predictions_<split>.json`` and, for expert
methods, ``analysis.json``. Any of them may be missing or cut short (SIGKILL while writing):
the loader keeps what is readable and records each problem in ``RunData.problems`` so the
report can say what it could not show instead of failing.
"""
from __future__ import annotations

import json
import math
import statistics
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml

from surgeon.errors import UserError
from surgeon.rundir import dataset_short_name

#: Files whose presence makes a directory a run directory (either is enough).
RUN_MARKERS = ("metrics.jsonl", "recipe.yaml")


@dataclass
class RunData:
    """Everything a report needs from one run directory; fields are empty when a file was missing.

    Accuracies from the files are stored as written; use :meth:`pct` to get percent (the
    trainer's unit is detected once, see :func:`_top1_scale`).
    """

    path: Path
    recipe: dict = field(default_factory=dict)
    starts: list[dict] = field(default_factory=list)
    end: dict | None = None
    train: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    later_evals: list[dict] = field(default_factory=list)  # logged after the end event (`surgeon eval`)
    nonfinite: list[dict] = field(default_factory=list)
    merges: list[dict] = field(default_factory=list)
    checkpoints: list[dict] = field(default_factory=list)
    stopped: dict | None = None  # the trainer gave up (e.g. too many non-finite losses in a row)
    summary: dict = field(default_factory=dict)
    predictions: dict[str, dict] = field(default_factory=dict)
    analysis: dict | None = None
    problems: list[str] = field(default_factory=list)
    top1_scale: float = 1.0

    # ---- identity -------------------------------------------------------------------
    @property
    def start(self) -> dict:
        """The last start event (a resumed run logs one per start); ``{}`` if none."""
        return self.starts[-1] if self.starts else {}

    @property
    def finished(self) -> bool:
        return self.end is not None

    @property
    def name(self) -> str:
        return str(self.recipe.get("name") or self.start.get("recipe") or self.path.name)

    @property
    def model(self) -> str:
        return str((self.recipe.get("model") or {}).get("name") or self.start.get("model") or "?")

    @property
    def data_source(self) -> str:
        return str((self.recipe.get("data") or {}).get("source") or self.start.get("data") or "?")

    @property
    def dataset(self) -> str:
        return dataset_short_name(self.data_source)

    @property
    def seed(self) -> Any:
        seed = (self.recipe.get("train") or {}).get("seed")
        return seed if seed is not None else self.start.get("seed")

    @property
    def inference(self) -> str:
        """The inference mode of the training-time evaluations (later `surgeon eval` runs may differ)."""
        for ev in reversed(self.evals):
            if ev.get("inference"):
                return str(ev["inference"])
        return str((self.recipe.get("eval") or {}).get("inference") or self.start.get("inference") or "merge")

    @property
    def plan(self) -> dict:
        return self.start.get("plan") or {}

    @property
    def params_m(self) -> float | None:
        """The papers' "Params (M)": extra parameters in millions, head excluded."""
        extra = self.plan.get("extra_params")
        return None if extra is None else extra / 1e6

    # ---- results (percent) -----------------------------------------------------------
    def pct(self, value) -> float | None:
        """A top-1 value as written by the trainer, in percent; None for missing/non-numbers."""
        return None if not _is_number(value) else float(value) * self.top1_scale

    def _final(self, key: str):
        """A final figure: the end event first, then summary.json (which the trainer writes last)."""
        if self.end and self.end.get(key) is not None:
            return self.end[key]
        return self.summary.get(key)

    @property
    def best_val(self) -> tuple[float | None, int | None]:
        """(best val top-1 in percent, its step); from the end event, else the best logged eval."""
        value, step = self._final("best_val_top1"), self._final("best_step")
        if _is_number(value):
            return self.pct(value), step
        vals = [e for e in self.evals if e.get("split") == "val" and _is_number(e.get("top1"))]
        if not vals:
            return None, None
        best = max(vals, key=lambda e: e["top1"])  # first maximum, like a trainer keeping the first best
        return self.pct(best["top1"]), best.get("step")

    @property
    def test_top1(self) -> float | None:
        value = self._final("test_top1")
        if _is_number(value):
            return self.pct(value)
        tests = [e for e in self.evals if e.get("split") == "test" and _is_number(e.get("top1"))]
        return self.pct(tests[-1]["top1"]) if tests else None

    @property
    def headline(self) -> tuple[float | None, str]:
        """The number a comparison shows: test top-1, or best val top-1 when there is no test."""
        test = self.test_top1
        if test is not None:
            return test, "test"
        return self.best_val[0], "val"

    @property
    def steps(self) -> int | None:
        value = self._final("steps")
        if _is_number(value):
            return int(value)
        steps = [e["step"] for e in self.train + self.evals if _is_number(e.get("step"))]
        return int(max(steps)) if steps else None

    @property
    def train_seconds(self) -> float | None:
        """Wall-clock training time; for an unfinished run, the time of the last logged step."""
        value = self._final("train_seconds")
        if _is_number(value):
            return float(value)
        return self.elapsed_at_last_event

    @property
    def elapsed_at_last_event(self) -> float | None:
        start = self.starts[0].get("time") if self.starts else None
        first = self.train[0].get("time") if self.train else None
        times = [t for t in (_elapsed(e.get("time"), start, first) for e in self.train) if t is not None]
        return max(times) if times else None

    @property
    def total_steps(self) -> int | None:
        """The planned number of optimizer steps, when the start event recorded it."""
        value = self.start.get("total_steps")
        return int(value) if _is_number(value) else None

    def summary_number(self, *keys: str) -> float | None:
        """A number from summary.json by a key path, e.g. ``("timings", "merge_seconds")``."""
        obj = self.summary
        for key in keys:
            obj = obj.get(key) if isinstance(obj, dict) else None
        return float(obj) if _is_number(obj) else None

    @property
    def settings(self) -> dict[str, str]:
        """The training settings a comparison must show side by side, as short strings: the peak
        ``lr`` AdamW reached (after any scaling), ``batch``, ``epochs``, ``backbone`` (the timm
        name with its tag), ``precision``."""
        train = self.recipe.get("train") or {}
        lr = self.start.get("lr")
        epochs = self._final("epochs") if _is_number(self._final("epochs")) else train.get("epochs")
        values = {"lr": f"{lr:.3g}" if _is_number(lr) else None,
                  "batch": self.start.get("batch_size", train.get("batch_size")),
                  "epochs": epochs, "backbone": self.model,
                  "precision": self.start.get("precision", train.get("precision"))}
        return {k: "?" if v is None else str(v) for k, v in values.items()}

    @property
    def img_per_s(self) -> float | None:
        value = self._final("img_per_s")
        if _is_number(value):
            return float(value)
        rates = [e["img_per_s"] for e in self.train if _is_number(e.get("img_per_s"))]
        return statistics.median(rates) if rates else None


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


#: A train event's numeric ``time`` above this is a Unix timestamp, not elapsed seconds (no run lasts 3 years).
_EPOCH_THRESHOLD = 1e8


def _elapsed(t, start_iso, first=None) -> float | None:
    """Seconds since the start for a train event's ``time``.

    The contract leaves the form open, so all three are read: elapsed seconds (a small number),
    a Unix timestamp (a large number; measured from the start event's ISO time when it has a
    timezone, else from ``first``, the first train event's timestamp) or an ISO string (minus the start's ISO time).
    """
    start = _parse_iso(start_iso)
    if _is_number(t):
        if t < _EPOCH_THRESHOLD:
            return float(t)
        # A naive ISO start time has no reliable offset to a Unix timestamp (local time or UTC?),
        # so only a timezone-aware one is used; else the first train event is the origin.
        if start is not None and start.tzinfo is not None and 0 <= t - start.timestamp() < _EPOCH_THRESHOLD:
            return t - start.timestamp()
        return t - first if _is_number(first) and t >= first else None
    moment = _parse_iso(t)
    if moment is not None and start is not None:
        try:
            return (moment - start).total_seconds()
        except TypeError:  # one has a timezone and the other not
            return None
    return None


def _parse_iso(value) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value)
    except ValueError:
        return None


def is_run_dir(path: Path) -> bool:
    return path.is_dir() and any((path / m).is_file() for m in RUN_MARKERS)


def read_metrics(path: Path) -> tuple[list[dict], list[str]]:
    """Events of a ``metrics.jsonl``, skipping unreadable lines.

    Returns:
        (events in file order, problems): a broken last line is the normal trace of a run killed
        while writing and is reported as such; a broken line elsewhere is reported by number.
    """
    problems: list[str] = []
    # errors="replace": a write cut inside a multi-byte character must not hide the whole file.
    lines = path.read_bytes().decode("utf-8", errors="replace").splitlines()
    last = max((i for i, line in enumerate(lines) if line.strip()), default=-1)
    events = []
    for i, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError:
            if i == last:
                problems.append(f"the last line of metrics.jsonl (line {i + 1}) is incomplete — the run was "
                                "killed while writing it, or is still running; it was ignored")
            else:
                problems.append(f"metrics.jsonl line {i + 1} is not valid JSON; it was ignored")
            continue
        if not isinstance(obj, dict) or "event" not in obj:
            problems.append(f"metrics.jsonl line {i + 1} is not an event object; it was ignored")
            continue
        events.append(obj)
    return events, problems


def _by_step(events: list[dict]) -> list[dict]:
    """Sort by step, keeping the last record of a step: after a resume the trainer may log steps
    again that it had logged before the kill, and the later record is the one that counts."""
    keyed: dict = {}
    loose = []
    for ev in events:
        if _is_number(ev.get("step")):
            keyed[(ev.get("split"), ev["step"])] = ev
        else:
            loose.append(ev)
    return sorted(keyed.values(), key=lambda e: e["step"]) + loose


def _read_json(path: Path, problems: list[str]) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        problems.append(f"{path.name} could not be read ({type(exc).__name__}); it was ignored")
        return None


def _top1_scale(run: RunData) -> float:
    """100 if the trainer logs top-1 as a fraction, 1 if in percent.

    The contract does not fix the unit, so the loader decides from the data: predictions
    files give the accuracy exactly, and the logged test/val value must be near it in one unit
    or the other. Without predictions any value above 1 means percent; all values ≤ 1 are read
    as fractions (a percent-logging run that never passed 1% and saved no predictions would be
    misread; a predictions file settles it).
    """
    logged = {"test": run._final("test_top1")}
    tests = [e for e in run.evals if e.get("split") == "test" and _is_number(e.get("top1"))]
    vals = [e for e in run.evals if e.get("split") == "val" and _is_number(e.get("top1"))]
    if not _is_number(logged["test"]) and tests:
        logged["test"] = tests[-1]["top1"]
    logged["val"] = vals[-1]["top1"] if vals else None
    for split, value in logged.items():
        pred = run.predictions.get(split)
        acc = _accuracy(pred) if pred else None
        if acc is not None and _is_number(value):
            if value > 0 and acc > 0:
                # Compare in log space: the two readings differ by a factor of 100, and a model's
                # logged accuracy and its saved predictions may differ a little (another step).
                return 100.0 if abs(math.log(value / acc)) <= abs(math.log(value / (100 * acc))) else 1.0
    values = [e["top1"] for e in run.evals if _is_number(e.get("top1"))]
    values += [v for v in (run._final("best_val_top1"), run._final("test_top1")) if _is_number(v)]
    return 1.0 if any(v > 1.0 for v in values) else 100.0


def _accuracy(pred: dict) -> float | None:
    labels, preds = pred.get("labels") or [], pred.get("preds") or []
    if not labels or len(labels) != len(preds):
        return None
    return sum(int(a == b) for a, b in zip(labels, preds)) / len(labels)


def _valid_predictions(data: Any) -> bool:
    return (isinstance(data, dict) and isinstance(data.get("labels"), list) and isinstance(data.get("preds"), list)
            and len(data["labels"]) == len(data["preds"])
            and all(isinstance(x, int) and x >= 0 for x in data["labels"] + data["preds"]))


def load_run_data(run_dir: str | Path) -> RunData:
    """Read a run directory.

    Raises:
        UserError: the path does not exist or holds neither ``metrics.jsonl`` nor ``recipe.yaml``,
            or ``recipe.yaml`` is not readable YAML (both name the path).
    """
    path = Path(run_dir)
    if not path.exists():
        raise UserError(f"run directory {str(path)!r} does not exist",
                        hint="pass the directory `surgeon apply` printed as its last line")
    if not is_run_dir(path):
        what = "is not a directory" if not path.is_dir() else f"holds neither {' nor '.join(RUN_MARKERS)}"
        raise UserError(f"{str(path)!r} is not a surgeon run directory: it {what}",
                        hint="pass the directory `surgeon apply` printed as its last line")
    run = RunData(path=path)

    recipe_file = path / "recipe.yaml"
    if recipe_file.is_file():
        try:
            recipe = yaml.safe_load(recipe_file.read_text(encoding="utf-8"))
        except (yaml.YAMLError, UnicodeDecodeError) as exc:
            raise UserError(f"cannot read the run's recipe: {exc}", where=str(recipe_file)) from None
        if isinstance(recipe, dict):
            run.recipe = recipe
        else:
            run.problems.append("recipe.yaml is not a mapping; the recipe summary is incomplete")
    else:
        run.problems.append("recipe.yaml is missing; the recipe summary uses what metrics.jsonl recorded")

    metrics_file = path / "metrics.jsonl"
    events: list[dict] = []
    if metrics_file.is_file():
        events, problems = read_metrics(metrics_file)
        run.problems += problems
    else:
        run.problems.append("metrics.jsonl is missing: the run has not started training")
    # Evaluations after the (last) end event come from `surgeon eval` on the finished run, e.g. the
    # inference-mode ablation; they must not replace the training-time numbers of the same step.
    last_end = max((i for i, ev in enumerate(events) if ev["event"] == "end"), default=len(events))
    run.later_evals = [ev for ev in events[last_end + 1:] if ev["event"] == "eval"]
    kinds: dict[str, list[dict]] = {}
    for i, ev in enumerate(events):
        if not (ev["event"] == "eval" and i > last_end):
            kinds.setdefault(str(ev["event"]), []).append(ev)
    run.starts = kinds.get("start", [])
    run.end = (kinds.get("end") or [None])[-1]
    run.train = _by_step(kinds.get("train", []))
    run.evals = _by_step(kinds.get("eval", []))
    run.nonfinite = _by_step(kinds.get("nonfinite", []))
    run.merges = kinds.get("merge", [])
    run.checkpoints = kinds.get("checkpoint", [])
    run.stopped = (kinds.get("stopped") or [None])[-1]

    summary_file = path / "summary.json"
    if summary_file.is_file():
        summary = _read_json(summary_file, run.problems)
        run.summary = summary if isinstance(summary, dict) else {}
    for file in sorted(path.glob("predictions_*.json")):
        data = _read_json(file, run.problems)
        if data is None:
            continue
        if _valid_predictions(data):
            run.predictions[file.stem.removeprefix("predictions_")] = data
        else:
            run.problems.append(f"{file.name} does not hold equally long lists of integer labels and preds; "
                                "it was ignored")
    analysis_file = path / "analysis.json"
    if analysis_file.is_file():
        analysis = _read_json(analysis_file, run.problems)
        run.analysis = analysis if isinstance(analysis, dict) else None
    run.top1_scale = _top1_scale(run)
    return run
