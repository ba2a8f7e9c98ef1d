"""Side logs of a run, derived from its event log: ``summary.csv`` (always) and TensorBoard
(``train.log: [tensorboard]``).

Both are :class:`~surgeon.rundir.MetricsLog` listeners: they see each event after it is written
to ``metrics.jsonl``, which stays the source of truth. A resumed run cuts ``metrics.jsonl``
back to its checkpoint; :func:`attach` is called after that cut, so ``summary.csv`` is rebuilt
from the events that remain (no duplicated rows) and TensorBoard hides the events of the lost
steps (``purge_step``).

``summary.csv`` has one row per epoch (timm's ``train.py`` habit), written when the epoch ends:

============== ============================================================================
epoch          1-based; the last row may be a partial epoch (``train.max_steps``)
step           optimizer steps done at the end of the epoch
lr             learning rate of the epoch's last logged step
loss, ce,      the epoch's training loss and its terms (cross-entropy, consistency and
consistency,   feature-alignment regularisers): the mean of its logged train windows,
alignment      weighted by their steps (a window is counted in the epoch of its last step)
img_per_s      training throughput over those windows
val_top1,      the epoch's last validation (percent, loss); empty without one
val_loss
time           seconds since the run started (across resumed sessions)
============== ============================================================================
"""
from __future__ import annotations

import csv
import io
from pathlib import Path

from surgeon.errors import UserError
from surgeon.io import write_text
from surgeon.rundir import MetricsLog, RunPaths, read_events

LOSS_TERMS = ("loss", "ce", "consistency", "alignment")
CSV_COLUMNS = ("epoch", "step", "lr", *LOSS_TERMS, "img_per_s", "val_top1", "val_loss", "time")
#: ``train.log`` values.
LOGGERS = ("tensorboard",)


def _number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool)


class EpochSummary:
    """Folds events into one row per epoch; ``summary.csv`` is its rows (see the module docstring).

    Call it with each event dict; :attr:`rows` holds the finished epochs.
    """

    def __init__(self):
        self.rows: list[dict] = []
        self._reset()
        self._last_step = 0

    def _reset(self) -> None:
        self._epoch = None
        self._steps = 0                              # steps of the epoch's train windows
        self._sums = {k: [0.0, 0] for k in LOSS_TERMS}  # term -> [steps-weighted sum, steps]
        self._time_per_image = [0.0, 0]             # [Σ steps / img_per_s, steps]
        self._lr = None
        self._val = None
        self._step = None
        self._time = None

    def __call__(self, event: dict) -> dict | None:
        """Take one event; returns the row it finished, if any."""
        kind = event.get("event")
        if _number(event.get("time")):
            self._time = event["time"]
        if kind == "train" and _number(event.get("step")):
            steps = max(1, int(event["step"]) - self._last_step)
            self._last_step = int(event["step"])
            self._epoch = event.get("epoch", self._epoch)
            self._step = int(event["step"])
            self._steps += steps
            for k in LOSS_TERMS:
                if _number(event.get(k)):
                    self._sums[k][0] += event[k] * steps
                    self._sums[k][1] += steps
            if _number(event.get("img_per_s")) and event["img_per_s"] > 0:
                self._time_per_image[0] += steps / event["img_per_s"]
                self._time_per_image[1] += steps
            if _number(event.get("lr")):
                self._lr = event["lr"]
        elif kind == "eval" and event.get("split") == "val":
            self._val = event
        elif kind == "checkpoint" and event.get("batch") == 0 and _number(event.get("epoch")):
            # Written at every epoch end (and only there with batch 0): its epoch is the next one.
            return self._finish(int(event["epoch"]) - 1, event.get("step"))
        elif kind in ("end", "stopped"):
            return self._finish(self._epoch, self._step)
        return None

    def _finish(self, epoch, step) -> dict | None:
        if not self._steps or epoch is None:
            return None
        val = self._val or {}
        sums, per_image = self._sums, self._time_per_image
        row = {"epoch": epoch, "step": step if step is not None else self._step, "lr": self._lr,
               **{k: (s / n if n else None) for k, (s, n) in sums.items()},
               "img_per_s": per_image[1] / per_image[0] if per_image[0] > 0 else None,
               "val_top1": val.get("top1"), "val_loss": val.get("loss"), "time": self._time}
        self.rows.append(row)
        self._reset()
        return row


def _csv_text(rows: list[dict], header: bool = True) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=CSV_COLUMNS, lineterminator="\n")
    if header:
        writer.writeheader()
    for row in rows:
        writer.writerow({k: ("" if row.get(k) is None else row[k]) for k in CSV_COLUMNS})
    return buf.getvalue()


class SummaryCsv:
    """``RUN/summary.csv``: rebuilt from ``metrics.jsonl`` when attached, then one appended,
    flushed row per finished epoch."""

    name = "summary.csv"

    def __init__(self, path: Path, metrics: Path):
        self.path = Path(path)
        self.summary = EpochSummary()
        for event in read_events(metrics):
            self.summary(event)
        write_text(self.path, _csv_text(self.summary.rows))
        self._file = open(self.path, "a", encoding="utf-8", newline="")

    def __call__(self, event: dict) -> None:
        row = self.summary(event)
        if row is not None:
            self._file.write(_csv_text([row], header=False))
            self._file.flush()

    def close(self) -> None:
        self._file.close()


def summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``; a :class:`UserError` naming the extra when the
    ``tensorboard`` package is missing."""
    try:
        # Optional dependency (the `tensorboard` extra): imported only by runs that ask for it.
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        raise UserError(f"train.log asks for tensorboard, but TensorBoard is not installed ({exc})",
                        where="train.log",
                        hint="pip install 'surgeon[tensorboard]' (or remove tensorboard from train.log)") from None
    return SummaryWriter


class TensorBoardLog:
    """TensorBoard scalars under ``RUN/tensorboard/``, global step = optimizer steps:
    ``train/loss``, ``train/ce``, ``train/<regulariser>`` (the recipe's active ones),
    ``train/lr``, ``train/img_per_s``, ``val/top1``, ``val/loss``, ``test/top1``, ``test/loss``
    and ``train/nonfinite_steps``.

    Args:
        log_dir: ``RUN/tensorboard``.
        terms: loss terms to plot besides ``loss`` and ``ce`` (``consistency``, ``alignment``).
        purge_step: on resume, the first step to be redone: TensorBoard hides what an earlier
            session logged from there on.
    """

    name = "tensorboard"

    def __init__(self, log_dir: Path, terms: tuple[str, ...] = (), purge_step: int | None = None):
        self.terms = ("loss", "ce", *terms)
        self.writer = summary_writer_class()(log_dir=str(log_dir), purge_step=purge_step)

    def __call__(self, event: dict) -> None:
        kind, step = event.get("event"), event.get("step")
        if not _number(step):
            return
        add = self.writer.add_scalar
        if kind == "train":
            for k in (*self.terms, "lr", "img_per_s"):
                if _number(event.get(k)):
                    add(f"train/{k}", event[k], step)
        elif kind == "eval" and event.get("split") in ("val", "test"):
            for k in ("top1", "loss"):
                if _number(event.get(k)):
                    add(f"{event['split']}/{k}", event[k], step)
            self.writer.flush()
        elif kind == "nonfinite" and _number(event.get("count")):
            add("train/nonfinite_steps", event["count"], step)

    def close(self) -> None:
        self.writer.close()


def check_loggers(recipe) -> None:
    """Fail before a run starts when a ``train.log`` logger cannot work (its package is missing)."""
    if "tensorboard" in recipe.train.log:
        try:
            summary_writer_class()
        except UserError as exc:
            raise UserError(exc.message, where=recipe.where(("train", "log")), hint=exc.hint) from None


def attach(log: MetricsLog, recipe, paths: RunPaths, *, resumed_step: int | None = None) -> None:
    """Attach the run's side logs to its (already cut back, on resume) metrics log.

    Args:
        resumed_step: optimizer steps of the checkpoint a resumed run continues from (0 when it
            restarts from the beginning); None for a new run.
    """
    log.add_listener(SummaryCsv(paths.summary_csv, paths.metrics))
    if "tensorboard" in recipe.train.log:
        reg = recipe.regularizers
        terms = tuple(k for k, on in (("consistency", reg.consistency.weight > 0),
                                      ("alignment", reg.feature_alignment.weight > 0)) if on)
        log.add_listener(TensorBoardLog(paths.tensorboard, terms,
                                        purge_step=None if resumed_step is None else resumed_step + 1))
