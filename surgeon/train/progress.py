"""Training progress for humans: a rich bar on a terminal, plain periodic lines otherwise.

Plain lines are used when stderr is not a TTY or the ``CI`` environment variable is set, so
logs of batch jobs stay readable. Everything goes to stderr: stdout carries only the run
directory, which ``surgeon apply`` prints last (``RUN=$(surgeon apply ...)`` works).
"""
from __future__ import annotations

import os
import sys
import time

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn


def use_live_bar(stream=None) -> bool:
    stream = stream or sys.stderr
    return bool(getattr(stream, "isatty", lambda: False)()) and not os.environ.get("CI")


class TrainProgress:
    """Shows epoch, step, loss, lr, img/s and ETA.

    Args:
        total_steps: steps of the whole run.
        start_step: steps already done (resume).
        console: where to print (stderr by default).
        every_s: minimum seconds between plain lines (plus one per epoch end and eval).
    """

    def __init__(self, total_steps: int, start_step: int = 0, *, console: Console | None = None,
                 every_s: float = 10.0):
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        self.total = total_steps
        self.live = use_live_bar(self.console.file)
        self.every_s = every_s
        self._last_line = 0.0
        self._t0 = time.perf_counter()
        self._s0 = start_step
        self.bar = None
        if self.live:
            self.bar = Progress(TextColumn("[bold]epoch {task.fields[epoch]}"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("loss {task.fields[loss]}  lr {task.fields[lr]}  {task.fields[ips]} img/s"),
                                TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                                console=self.console, transient=False)
            self.task = self.bar.add_task("train", total=total_steps, completed=start_step, epoch="-",
                                          loss="-", lr="-", ips="-")
            self.bar.start()

    def update(self, *, step: int, epoch: int, epochs: int, loss: float | None, lr: float, img_per_s: float) -> None:
        loss_text = f"{loss:.4f}" if loss is not None else "nan"
        if self.bar is not None:
            self.bar.update(self.task, completed=step, epoch=f"{epoch + 1}/{epochs}", loss=loss_text,
                            lr=f"{lr:.2e}", ips=f"{img_per_s:.0f}")
            return
        now = time.perf_counter()
        if now - self._last_line < self.every_s and step not in (self._s0 + 1, self.total):
            return
        self._last_line = now
        done = step - self._s0
        eta = (now - self._t0) / done * (self.total - step) if done > 0 else float("nan")
        self.console.print(f"epoch {epoch + 1}/{epochs}  step {step}/{self.total}  loss {loss_text}  lr {lr:.2e}  "
                           f"{img_per_s:.0f} img/s  ETA {_fmt_seconds(eta)}", markup=False)

    def print(self, text: str) -> None:
        """A line that stays (eval results, checkpoints, warnings)."""
        self.console.print(text, markup=False)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            self.bar = None


def _fmt_seconds(s: float) -> str:
    if s != s:
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"
