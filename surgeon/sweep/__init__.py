"""Hyper-parameter sweeps on Optuna under the VTAB-1k protocol (``surgeon sweep``).

    from surgeon.sweep import run_sweep
    result = run_sweep("mlae", data="builtin:digits",
                       grid={"train.base_lr": [1e-2, 1e-3], "surgery.0.mlae.masking.p": [0.1, 0.5]},
                       seeds=[0, 1, 2])
    result.best_config, result.test_mean, result.report

Modules: :mod:`~surgeon.sweep.space` (grids, validation, edge extension; pure),
:mod:`~surgeon.sweep.study` (Optuna storage and trial ownership), :mod:`~surgeon.sweep.runner`
(the procedure, workers, resume), :mod:`~surgeon.sweep.report` (report.md/.html, plot).
Optuna is an optional extra (``pip install 'surgeon[sweep]'``), imported when a sweep starts.
"""
from __future__ import annotations

from .results import EdgeNote, FinalResult, SweepResult, SweepSpec, TrialResult
from .runner import prepare_spec, run_sweep
from .space import configurations, next_edge_value, parse_grid, validate_grid

__all__ = ["EdgeNote", "FinalResult", "SweepResult", "SweepSpec", "TrialResult", "configurations",
           "next_edge_value", "parse_grid", "prepare_spec", "run_sweep", "validate_grid"]
