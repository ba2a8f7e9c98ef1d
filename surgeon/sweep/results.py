"""What a sweep is given and what it finds: plain data shared by the runner, its workers and the report."""
from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class SweepSpec:
    """Everything a worker needs (plain data: it is sent to worker processes).

    Attributes:
        recipe: recipe file or built-in name.
        grid: ``{key: [values]}`` (see :mod:`surgeon.sweep.space`).
        overrides: the ``--set`` overrides applied to every trial and final run.
        sampler: ``grid`` (every combination) or ``tpe`` (``trials`` configurations chosen by
            Optuna's TPE among the grid's values).
        seeds: ``train.seed`` of each final run (empty: no final runs).
        workers: worker processes on this machine.
        gpus: with ``--gpus``, worker ``k``'s ``CUDA_VISIBLE_DEVICES`` (then ``workers`` is
            their number and every worker is a spawned process).
        poll_s: seconds between looks at the storage while other workers hold the last trials.
        heartbeat_s / stale_after_s: a worker on another host is presumed dead after
            ``stale_after_s`` seconds without a heartbeat.
    """

    recipe: str
    grid: dict
    out: str
    study: str
    model: str | None = None
    data: str | None = None
    overrides: list = field(default_factory=list)
    sampler: str = "grid"
    trials: int | None = None
    seeds: list = field(default_factory=list)
    prune: bool = False
    extend_edges: bool = False
    storage: str | None = None
    workers: int = 1
    gpus: list | None = None
    poll_s: float = 5.0
    heartbeat_s: float = 30.0
    stale_after_s: float = 600.0
    sampler_seed: int = 0
    digest: str = ""


@dataclass
class TrialResult:
    """One configuration of the grid and its result (accuracies in percent, times in seconds)."""

    number: int
    index: int
    config: dict
    state: str  # complete, pruned, failed, interrupted, running, waiting
    val_last: float | None = None
    val_best: float | None = None
    seconds: float | None = None
    steps: int | None = None
    run_dir: str | None = None  # relative to the sweep directory
    reason: str | None = None
    attempts: int = 1
    failure: str | None = None  # diverged / error / interrupted / crashed (failed trials)


@dataclass
class FinalResult:
    """One final run (protocol final) of the best configuration."""

    seed: int
    state: str
    test_top1: float | None = None
    val_top1: float | None = None  # best val top-1 (val is inside train under the final protocol)
    split: str | None = None       # where ``test_top1`` comes from: test, or val when there is no test split
    seconds: float | None = None
    run_dir: str | None = None
    reason: str | None = None


@dataclass
class EdgeNote:
    """A best value on the edge of its key's grid."""

    key: str
    value: Any
    side: str        # low / high
    note: str        # what was done about it


@dataclass
class SweepResult:
    """What :func:`run_sweep` found. Accuracies in percent, times in seconds."""

    out: Path
    study: str
    storage: str
    recipe: str
    data: str | None
    model: str | None
    sampler: str
    base_grid: dict
    grid: dict                      # with the values --extend-edges added
    trials: list[TrialResult]
    best: TrialResult | None
    edges: list[EdgeNote]
    finals: list[FinalResult]
    seeds: list[int]
    overrides: list = field(default_factory=list)
    extend_edges: bool = False
    report: Path | None = None

    @property
    def best_config(self) -> dict | None:
        return dict(self.best.config) if self.best else None

    @property
    def test_values(self) -> list[float]:
        return [f.test_top1 for f in self.finals if f.state == "complete" and f.test_top1 is not None]

    @property
    def test_mean(self) -> float | None:
        v = self.test_values
        return statistics.fmean(v) if v else None

    @property
    def test_std(self) -> float | None:
        """Sample standard deviation over seeds (None with fewer than two)."""
        v = self.test_values
        return statistics.stdev(v) if len(v) > 1 else None

    def to_json(self) -> dict:
        return {"out": str(self.out), "study": self.study, "storage": self.storage, "recipe": self.recipe,
                "data": self.data, "model": self.model, "sampler": self.sampler, "base_grid": self.base_grid,
                "grid": self.grid, "trials": [asdict(t) for t in self.trials],
                "best": asdict(self.best) if self.best else None, "edges": [asdict(e) for e in self.edges],
                "finals": [asdict(f) for f in self.finals], "seeds": self.seeds, "overrides": self.overrides,
                "extend_edges": self.extend_edges, "best_config": self.best_config,
                "test_mean": self.test_mean, "test_std": self.test_std}
