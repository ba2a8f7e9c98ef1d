"""Reports: one run's ``report.md``/``report.html`` with plots, and comparisons of many runs.

    from surgeon.report import write_report, compare_runs
    write_report("runs/mosa-digits-3407")                   # -> runs/.../report.md
    compare_runs(["runs/a", "runs/b"], "runs/comparison")    # -> runs/comparison/comparison.md

A suite runner builds its own table from the same pieces::

    results = collect_runs(dirs)
    print(render_markdown(comparison_table(results)))
    write_comparison(results, out_dir, title="CPU reproduction",
                     extra_blocks=[Heading("Inference mechanisms"), my_table])   # a Table
"""
from __future__ import annotations

from .compare import (Cell, Comparison, RunResult, collect_runs, compare_runs, comparison, comparison_csv,
                      comparison_table, default_out_dir, expand_run_dirs, runs_csv, write_comparison)
from .document import Bullets, Figure, Heading, Paragraph
from .run_report import write_report
from .runs import RunData, dataset_short_name, is_run_dir, load_run_data, read_metrics
from .tables import Table, collapse_targets, parameter_tables, render_csv, render_html, render_markdown

__all__ = ["Bullets", "Cell", "Comparison", "Figure", "Heading", "Paragraph", "RunData", "RunResult", "Table",
           "collapse_targets", "collect_runs", "compare_runs", "comparison", "comparison_csv", "comparison_table",
           "dataset_short_name", "default_out_dir", "expand_run_dirs", "is_run_dir", "load_run_data",
           "parameter_tables", "read_metrics", "render_csv", "render_html", "render_markdown", "runs_csv",
           "write_comparison", "write_report"]
