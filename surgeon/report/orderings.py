"""Does method A beat method B? Paired differences over tasks × seeds, with a bootstrap interval.

The papers' claims are orderings ("MoSA > AdaptFormer"). A comparison table shows means; this
module answers the claim the way a reader should: for every (task, seed) where both A and B have
a result, the difference ``A - B`` (the two runs share the data, the seed and the schedule: the
pairing removes the task-to-task and seed-to-seed variation both methods share), then

- the mean paired difference, in accuracy points;
- a 95% percentile-bootstrap interval of that mean (pairs resampled with replacement, 10,000
  resamples, a fixed seed so the report is reproducible);
- the sign of the mean difference on each task;
- a verdict: **holds** (the interval lies above 0), **fails** (below 0), **unresolved** (it
  contains 0).
"""
from __future__ import annotations

import random
import statistics
from dataclasses import dataclass

from .tables import Table

BOOTSTRAP_RESAMPLES = 10_000
BOOTSTRAP_SEED = 0


@dataclass(frozen=True)
class Ordering:
    """The evidence for "``better`` > ``worse``".

    Attributes:
        better, worse: the two row labels compared (the claim is ``better`` > ``worse``).
        pairs: number of (task, seed) pairs where both have a result.
        mean: mean of ``better - worse`` over the pairs, in accuracy points (None without pairs).
        low, high: the 95% bootstrap interval of ``mean``.
        per_task: task -> mean difference on that task (over its seeds).
    """

    better: str
    worse: str
    pairs: int
    mean: float | None
    low: float | None
    high: float | None
    per_task: dict[str, float]

    @property
    def verdict(self) -> str:
        """``holds`` / ``fails`` / ``unresolved`` (or ``no data``)."""
        if self.mean is None:
            return "no data"
        if self.low > 0:
            return "holds"
        if self.high < 0:
            return "fails"
        return "unresolved"

    @property
    def signs(self) -> str:
        """Per-task signs in task order, e.g. ``+ + − + 0``."""
        return " ".join("+" if d > 0 else "−" if d < 0 else "0" for d in self.per_task.values())


def bootstrap_interval(values: list[float], *, level: float = 0.95, resamples: int = BOOTSTRAP_RESAMPLES,
                       seed: int = BOOTSTRAP_SEED) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of ``values`` (resampled with replacement)."""
    rng = random.Random(seed)
    n = len(values)
    means = sorted(sum(rng.choices(values, k=n)) / n for _ in range(resamples))
    tail = (1 - level) / 2
    return means[int(tail * resamples)], means[min(resamples - 1, int((1 - tail) * resamples))]


def ordering(scores: dict[tuple[str, str, object], float], better: str, worse: str) -> Ordering:
    """The paired evidence for ``better`` > ``worse``.

    Args:
        scores: ``(row label, task, seed) -> top-1 (%)``.
    """
    tasks = list(dict.fromkeys(task for _, task, _ in scores))
    diffs: list[float] = []
    per_task: dict[str, float] = {}
    for task in tasks:
        seeds = [s for (m, t, s) in scores if m == better and t == task and (worse, t, s) in scores]
        task_diffs = [scores[(better, task, s)] - scores[(worse, task, s)] for s in seeds]
        if task_diffs:
            per_task[task] = statistics.fmean(task_diffs)
            diffs.extend(task_diffs)
    if not diffs:
        return Ordering(better, worse, 0, None, None, None, {})
    low, high = bootstrap_interval(diffs)
    return Ordering(better, worse, len(diffs), statistics.fmean(diffs), low, high, per_task)


def orderings_table(results: list[Ordering]) -> Table:
    """A report table: claim | pairs | mean difference [95% CI] | per-task sign | verdict."""
    rows = []
    for o in results:
        interval = "—" if o.mean is None else f"{o.mean:+.2f} [{o.low:+.2f}, {o.high:+.2f}]"
        rows.append([f"{o.better} > {o.worse}", str(o.pairs), interval, o.signs or "—", o.verdict])
    tasks = list(dict.fromkeys(t for o in results for t in o.per_task))
    return Table(["claim", "pairs", "mean A − B (points) [95% CI]", "sign per task", "verdict"], rows,
                 ["l", "r", "r", "l", "l"],
                 notes=["Pairs: the (task, seed) cells where both methods have a test result; A − B in "
                        "top-1 points; interval: 95% percentile bootstrap of the mean over the pairs "
                        f"({BOOTSTRAP_RESAMPLES:,} resamples). Signs in task order: {', '.join(tasks)}. "
                        "holds: interval above 0; fails: below 0; unresolved: contains 0."])
