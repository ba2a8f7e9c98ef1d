"""The main job (``make demo`` / ``surgeon demo``): MoSA vs AdaptFormer, offline, in minutes.

It is the built-in suite ``suites/demo.yaml`` — MoSA (hierarchical) and its AdaptFormer baseline
on the built-in formula-pretrained ViT and a built-in task — followed by a short summary:
accuracy, Params (M), train time and where each report is.
"""
from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from surgeon.resources import builtin_suite
from surgeon.suite import load_suite, suite_cells
from surgeon.suite_runner import run_suite


def run_demo(*, out: str | Path = "runs/demo", quick: bool = False, console: Console | None = None,
             summary_console: Console | None = None) -> list[dict]:
    """Run the demo suite and print the comparison.

    Args:
        out: where the run directories go (resumable: finished runs are reused).
        quick: a few steps only (for tests); the accuracy is then meaningless.

    Returns:
        one dict per run: recipe, data, test_top1 (percent), best_val_top1, extra_params_m,
        train_seconds, report (path).
    """
    console = console or Console(stderr=True, highlight=False, soft_wrap=True)
    summary_console = summary_console or Console(highlight=False, soft_wrap=True)
    path = builtin_suite("demo")
    overrides = ["set.train.epochs=1", "set.train.max_steps=3"] if quick else []
    run_suite(path, overrides=overrides, out=out, console=console)
    rows = []
    for cell in suite_cells(load_suite(path, overrides), Path(out)):
        summary = json.loads((cell.run_dir / "summary.json").read_text())
        rows.append({"recipe": cell.recipe, "data": cell.dataset,
                     "test_top1": summary.get("test_top1"), "best_val_top1": summary.get("best_val_top1"),
                     "extra_params_m": summary.get("params", {}).get("extra_params", 0) / 1e6,
                     "train_seconds": summary.get("train_seconds"),
                     "report": str(cell.run_dir / "report.md")})
    table = Table(title="surgeon demo — built-in backbone, built-in task" + (" (quick: not meaningful)" if quick else ""),
                  title_justify="left")
    for col in ("recipe", "data", "test top-1", "val top-1", "Params (M)", "train"):
        table.add_column(col, justify="left" if col in ("recipe", "data") else "right", no_wrap=True)
    for r in rows:
        table.add_row(r["recipe"], r["data"].removeprefix("builtin:"), _pct(r["test_top1"]), _pct(r["best_val_top1"]),
                      f"{r['extra_params_m']:.3f}", f"{r['train_seconds'] or 0:.0f} s")
    summary_console.print(table)
    for r in rows:
        summary_console.print(f"report ({r['recipe']}): {r['report']}", markup=False)
    summary_console.print(f"comparison: {Path(out) / 'report' / 'comparison.md'}", markup=False)
    return rows


def _pct(x) -> str:
    return "—" if x is None else f"{x:.1f}%"
