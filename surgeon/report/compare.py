"""Several runs → one table in the papers' layout (rows = methods, columns = data sets, cells =
top-1 as mean ± std over seeds, then Mean, Params (M) and train time), with CSV and a bar plot.

The pieces are separate so a suite runner can reuse them:
:func:`collect_runs` (directories → :class:`RunResult`), :func:`comparison` (results →
:class:`Comparison`, the numbers), :func:`comparison_table` (→ a renderable
:class:`~surgeon.report.tables.Table`), :func:`write_comparison` (→ files).
"""
from __future__ import annotations

import os
import statistics
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure as MplFigure

from surgeon.errors import UserError
from surgeon.io import write_text

from .document import Bullets, Figure, Heading, Paragraph, to_markdown
from .html import to_html
from .plots import save_figure
from .runs import RunData, is_run_dir, load_run_data
from .tables import Table, duration, render_csv

#: Marks on cells whose number is not a finished run's test top-1.
VAL_MARK = "†"
UNFINISHED_MARK = "‡"


@dataclass
class RunResult:
    """One run's row in a comparison: identity and the headline numbers (accuracies in percent)."""

    run_dir: Path
    method: str
    dataset: str
    data_source: str
    model: str
    seed: object
    inference: str
    top1: float | None
    metric: str  # "test" or "val": which split top1 comes from
    best_val: float | None
    test_top1: float | None
    params_m: float | None
    train_seconds: float | None
    img_per_s: float | None
    steps: int | None
    finished: bool
    problems: list[str] = field(default_factory=list)
    settings: dict[str, str] = field(default_factory=dict)  # lr, batch, epochs, backbone, precision

    @classmethod
    def from_run(cls, run: RunData) -> "RunResult":
        top1, metric = run.headline
        return cls(run_dir=run.path, method=run.name, dataset=run.dataset, data_source=run.data_source,
                   model=run.model, seed=run.seed, inference=run.inference, top1=top1, metric=metric,
                   best_val=run.best_val[0], test_top1=run.test_top1, params_m=run.params_m,
                   train_seconds=run.train_seconds, img_per_s=run.img_per_s, steps=run.steps,
                   finished=run.finished, problems=list(run.problems), settings=run.settings)


def is_comparison_dir(path: Path) -> bool:
    """A folder :func:`write_comparison` wrote (and not a run)."""
    return path.is_dir() and (path / "comparison.md").is_file() and not is_run_dir(path)


def _nested_run_dirs(root: Path, max_depth: int) -> list[Path]:
    """Run directories under ``root`` (depth 1 = its children), sorted by path."""
    found: list[Path] = []
    for child in sorted(c for c in root.iterdir() if c.is_dir() and not c.name.startswith(".")):
        if is_run_dir(child):
            found.append(child)
        elif max_depth > 1 and not is_comparison_dir(child):
            found += _nested_run_dirs(child, max_depth - 1)
    return found


def expand_run_dirs(paths: list[str | Path], max_depth: int = 4) -> list[Path]:
    """The run directories named by ``paths``.

    A single path that is not a run directory itself but holds run directories stands for them:
    its children (``runs/``) or deeper (a suite's ``<recipe>/<dataset>/seed<k>/``, up to
    ``max_depth`` levels; nothing inside a run directory or a comparison output is searched).
    Among several paths, earlier comparison outputs are dropped, so ``surgeon report runs/*``
    works again after it wrote ``runs/comparison/``. Anything else is passed through for
    :func:`load_run_data` to accept or reject by name.
    """
    paths = [Path(p) for p in paths]
    if len(paths) == 1 and paths[0].is_dir() and not is_run_dir(paths[0]):
        found = _nested_run_dirs(paths[0], max_depth)
        if found:
            return found
    if len(paths) > 1:
        paths = [p for p in paths if not is_comparison_dir(p)]
    return paths


def collect_runs(run_dirs: list[str | Path]) -> list[RunResult]:
    """Load each run directory (duplicates once, order kept).

    Raises:
        UserError: a path is missing or not a run directory (naming it).
    """
    seen, results = set(), []
    for d in run_dirs:
        key = Path(d).resolve()
        if key in seen:
            continue
        seen.add(key)
        results.append(RunResult.from_run(load_run_data(d)))
    return results


@dataclass
class Cell:
    """The runs of one (method, data set): their headline top-1 values and how they were obtained."""

    values: list[float] = field(default_factory=list)
    seeds: list = field(default_factory=list)
    metrics: set[str] = field(default_factory=set)
    unfinished: int = 0
    missing: int = 0  # runs that logged no accuracy at all

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float | None:
        return statistics.fmean(self.values) if self.values else None

    @property
    def std(self) -> float | None:
        """Sample standard deviation (n-1): the spread an independent re-run would show."""
        return statistics.stdev(self.values) if len(self.values) > 1 else None


@dataclass
class Comparison:
    """The numbers of a comparison table; rows and columns in first-appearance order."""

    methods: list[str]
    datasets: list[str]
    cells: dict[tuple[str, str], Cell]
    row_mean: dict[str, float | None]
    params_m: dict[str, tuple[float, float] | None]
    train_seconds: dict[str, float | None]
    models: list[str]
    results: list[RunResult]
    labels: dict[Path, str]  # run_dir → its row label
    settings: dict[str, dict[str, str]] = field(default_factory=dict)  # row → setting → value(s)

    @property
    def differing(self) -> list[str]:
        """The settings (lr, batch, epochs, backbone, precision) whose values differ between rows."""
        keys = list(dict.fromkeys(k for row in self.settings.values() for k in row))
        return [k for k in keys if len({row.get(k) for row in self.settings.values()}) > 1]

    @property
    def typical_n(self) -> int:
        counts = Counter(c.n for c in self.cells.values() if c.n)
        return counts.most_common(1)[0][0] if counts else 0


def _row_labels(results: list[RunResult]) -> dict[Path, str]:
    """Row label per run: the recipe name, plus the backbone and/or inference mode when runs of
    the same recipe differ in them (e.g. the Table 6 inference ablation reuses one recipe)."""
    by_name: dict[str, list[RunResult]] = {}
    for r in results:
        by_name.setdefault(r.method, []).append(r)
    labels = {}
    for name, runs in by_name.items():
        vary_model = len({r.model for r in runs}) > 1
        vary_inference = len({r.inference for r in runs}) > 1
        for r in runs:
            extra = ([r.model] if vary_model else []) + ([f"{r.inference} inference"] if vary_inference else [])
            labels[r.run_dir] = f"{name} ({', '.join(extra)})" if extra else name
    return labels


def comparison(results: list[RunResult]) -> Comparison:
    """Group runs by (method, data set) and compute the table's numbers."""
    labels = _row_labels(results)
    methods, datasets = [], []
    cells: dict[tuple[str, str], Cell] = {}
    for r in results:
        m = labels[r.run_dir]
        if m not in methods:
            methods.append(m)
        if r.dataset not in datasets:
            datasets.append(r.dataset)
        cell = cells.setdefault((m, r.dataset), Cell())
        if r.top1 is None:
            cell.missing += 1
            continue
        cell.values.append(r.top1)
        cell.seeds.append(r.seed)
        cell.metrics.add(r.metric)
        cell.unfinished += int(not r.finished)
    row_mean, params, times = {}, {}, {}
    for m in methods:
        means = [cells[(m, d)].mean if (m, d) in cells else None for d in datasets]
        # The papers' Mean averages every task; a row missing one would not be comparable.
        row_mean[m] = statistics.fmean(means) if means and all(v is not None for v in means) else None
        runs = [r for r in results if labels[r.run_dir] == m]
        p = [r.params_m for r in runs if r.params_m is not None]
        params[m] = (min(p), max(p)) if p else None
        t = [r.train_seconds for r in runs if r.train_seconds is not None]
        times[m] = statistics.fmean(t) if t else None
    models = list(dict.fromkeys(r.model for r in results))
    settings = {}
    for m in methods:
        runs = [r for r in results if labels[r.run_dir] == m]
        keys = list(dict.fromkeys(k for r in runs for k in r.settings))
        # Distinct values in first-appearance order (a tuned method may use one lr per data set).
        settings[m] = {k: " / ".join(dict.fromkeys(r.settings.get(k, "?") for r in runs)) for k in keys}
    return Comparison(methods, datasets, cells, row_mean, params, times, models, list(results), labels, settings)


def format_cell(cell: Cell | None, typical_n: int, digits: int = 1) -> str:
    """``97.3 ± 0.4`` (one run: ``97.3``), with marks for val-only and unfinished runs."""
    if cell is None or cell.mean is None:
        return "—"
    text = f"{cell.mean:.{digits}f}" + (f" ± {cell.std:.{digits}f}" if cell.std is not None else "")
    if cell.n != typical_n:
        text += f" (n={cell.n})"
    if "val" in cell.metrics:
        text += VAL_MARK
    if cell.unfinished:
        text += UNFINISHED_MARK
    return text


def _params_text(p: tuple[float, float] | None) -> str:
    if p is None:
        return "—"
    lo, hi = p
    return f"{lo:.2f}" if f"{lo:.2f}" == f"{hi:.2f}" else f"{lo:.2f}–{hi:.2f}"


def comparison_table(results: list[RunResult] | Comparison, *, digits: int = 1) -> Table:
    """The papers' table: Method | data sets... | Mean | Params (M) | Train time / run.

    Cells are top-1 (%) as mean ± sample std over the runs (seeds) sharing a method and data set;
    test top-1 where the run has a test split, else best val top-1 (marked †).
    """
    comp = results if isinstance(results, Comparison) else comparison(results)
    n = comp.typical_n
    differing = comp.differing
    rows = []
    for m in comp.methods:
        mean = comp.row_mean[m]
        rows.append([m] + [format_cell(comp.cells.get((m, d)), n, digits) for d in comp.datasets]
                    + ["—" if mean is None else f"{mean:.{digits}f}", _params_text(comp.params_m[m]),
                       duration(comp.train_seconds[m])] + [comp.settings[m].get(k, "?") for k in differing])
    columns = ["Method"] + comp.datasets + ["Mean", "Params (M)", "Train time / run"] + differing
    spread = f"mean ± sample std over {n} seeds per cell" if n > 1 else "one run per cell"
    backbones = ", ".join(f"`{x}`" for x in comp.models)
    notes = [f"Top-1 accuracy (%), {spread}; backbone {backbones}; "
             "Params (M) = extra trainable parameters, head excluded."]
    cells = list(comp.cells.values())
    if any("val" in c.metrics for c in cells):
        notes.append(f"{VAL_MARK} best validation top-1: no test result (no test split, or the run did not finish).")
    if any(c.unfinished for c in cells):
        notes.append(f"{UNFINISHED_MARK} includes a run that did not finish (its last logged accuracy).")
    if any(m is None for m in comp.row_mean.values()):
        notes.append("Mean “—”: the method lacks a result on some data set.")
    if any(c.missing for c in cells):
        notes.append("Some runs logged no accuracy at all and are left out of their cells.")
    if any(len(set(map(repr, c.seeds))) < c.n for c in cells):
        notes.append("Some cells average runs with the same seed.")
    if differing:
        notes.append(f"**Warning:** the rows differ in {', '.join(differing)} as well as in the method (columns "
                     "on the right), so a difference between rows is not the method's alone.")
    return Table(columns, rows, ["l"] + ["r"] * (len(columns) - 1), notes=notes)


def settings_table(comp: Comparison) -> Table:
    """Per row, the resolved training settings (peak lr after scaling, batch, epochs, backbone,
    precision): values that differ between the runs of one row are joined with ``/``."""
    keys = list(dict.fromkeys(k for row in comp.settings.values() for k in row))
    rows = [[m] + [comp.settings[m].get(k, "?") for k in keys] for m in comp.methods]
    return Table(["Method"] + keys, rows, ["l"] * (len(keys) + 1),
                 notes=["lr: the peak learning rate the optimizer reached (after any batch scaling)."])


def runs_table(comp: Comparison, base_dir: Path) -> Table:
    """One row per run: where it is, what it measured, with links to its own report."""
    rows = []
    for r in comp.results:
        rel = Path(os.path.relpath(r.run_dir, base_dir)).as_posix()
        links = " · ".join(f"[{kind}]({rel}/report.{kind})" for kind in ("md", "html")
                           if (r.run_dir / f"report.{kind}").is_file())
        rows.append([f"`{rel}`" + (f" {links}" if links else ""), comp.labels[r.run_dir], r.dataset, str(r.seed),
                     "—" if r.top1 is None else f"{r.top1:.2f} ({r.metric})",
                     "—" if r.params_m is None else f"{r.params_m:.2f}", duration(r.train_seconds),
                     "—" if r.img_per_s is None else f"{r.img_per_s:.0f}", "yes" if r.finished else "**no**"])
    return Table(["run", "method", "data", "seed", "top-1 (%)", "Params (M)", "train time", "img/s", "finished"],
                 rows, ["l", "l", "l", "r", "r", "r", "r", "r", "l"])


def comparison_csv(comp: Comparison) -> str:
    """Machine-readable: one line per (method, data set) with mean, std, n, and per-method columns."""
    header = ["method", "dataset", "top1_mean", "top1_std", "n", "metric", "unfinished", "row_mean",
              "params_m", "train_seconds_per_run"]
    rows = []
    for m in comp.methods:
        for d in comp.datasets:
            c = comp.cells.get((m, d))
            if c is None:
                continue
            p = comp.params_m[m]
            rows.append([m, d, _num(c.mean), _num(c.std), str(c.n), "+".join(sorted(c.metrics)), str(c.unfinished),
                         _num(comp.row_mean[m]), "" if p is None else f"{p[0]:.6f}",
                         _num(comp.train_seconds[m])])
    return render_csv(Table(header, rows))


def runs_csv(comp: Comparison) -> str:
    header = ["run_dir", "method", "dataset", "data_source", "model", "seed", "inference", "top1", "metric",
              "best_val_top1", "test_top1", "params_m", "train_seconds", "img_per_s", "steps", "finished"]
    rows = [[str(r.run_dir), comp.labels[r.run_dir], r.dataset, r.data_source, r.model, str(r.seed), r.inference,
             _num(r.top1), r.metric, _num(r.best_val), _num(r.test_top1), _num(r.params_m, 6), _num(r.train_seconds),
             _num(r.img_per_s), "" if r.steps is None else str(r.steps), str(r.finished).lower()]
            for r in comp.results]
    return render_csv(Table(header, rows))


def _num(x: float | None, digits: int = 4) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def default_out_dir(run_dirs: list[str | Path]) -> Path:
    """``comparison/`` in the runs' common parent directory."""
    paths = [Path(d).resolve() for d in run_dirs]
    common = Path(os.path.commonpath(paths))
    if common in paths:  # all runs are one directory, or one run contains the others
        common = common.parent
    return common / "comparison"


def write_comparison(results: list[RunResult], out_dir: str | Path, *, title: str | None = None,
                     extra_blocks: list | None = None) -> Path:
    """Write ``comparison.md``, ``comparison.html`` (self-contained), ``comparison.csv``,
    ``runs.csv`` and ``plots/comparison.png`` into ``out_dir``.

    Args:
        extra_blocks: more sections (``Heading``, ``Paragraph``, ``Table``, ``Figure`` from
            :mod:`surgeon.report.document` / :mod:`surgeon.report.tables`) placed after the main
            table, so a suite runner's own tables (e.g. an inference ablation) reach both the
            markdown and the HTML.

    Returns:
        the path of ``comparison.md``.
    """
    if not results:
        raise UserError("no runs to compare")
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise UserError(f"{str(out)!r} exists and is not a directory", where="--out")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot create the output directory {str(out)!r}: {exc.strerror}", where="--out",
                        hint="pass --out DIR with a directory you can write to") from None
    comp = comparison(results)
    table = comparison_table(comp)
    bars = comparison_bars(comp, out / "plots" / "comparison.png")
    title = title or f"Comparison of {len(results)} runs"
    unfinished = [r for r in results if not r.finished]
    blocks = [Heading(title, 1),
              Paragraph(f"{len(comp.methods)} method(s) × {len(comp.datasets)} data set(s) from {len(results)} "
                        f"run(s); written {datetime.now().strftime('%Y-%m-%d %H:%M')}."),
              table]
    if unfinished:
        blocks.append(Paragraph(f"**Warning:** {len(unfinished)} run(s) did not finish: "
                                + ", ".join(f"`{r.run_dir.name}`" for r in unfinished) + "."))
    if bars:
        blocks.append(Figure(bars, "Top-1 (%) per data set; whiskers: sample std over seeds."))
    blocks += [Heading("Training settings per row"), settings_table(comp)]
    blocks += list(extra_blocks or [])
    blocks += [Heading("Runs"), runs_table(comp, out)]
    problems = [f"`{r.run_dir.name}`: {p}" for r in results for p in r.problems]
    if problems:
        blocks += [Heading("Problems found while reading the runs"), Bullets(problems)]
    md = out / "comparison.md"
    write_text(md, to_markdown(blocks, out))
    write_text(out / "comparison.html", to_html(blocks, title))
    write_text(out / "comparison.csv", comparison_csv(comp))
    write_text(out / "runs.csv", runs_csv(comp))
    return md


def compare_runs(run_dirs: list[str | Path], out_dir: str | Path | None = None, *, title: str | None = None,
                 extra_blocks: list | None = None) -> Path:
    """Load ``run_dirs`` and write their comparison into ``out_dir`` (default: :func:`default_out_dir`).

    Returns:
        the path of ``comparison.md``.
    """
    if not run_dirs:
        raise UserError("no run directories given")
    results = collect_runs(run_dirs)
    return write_comparison(results, out_dir if out_dir is not None else default_out_dir(run_dirs), title=title,
                            extra_blocks=extra_blocks)


def comparison_bars(comparison: Comparison, path: Path) -> Path | None:
    """Grouped bars: one group per data set (and the Mean), one bar per method, ± std whiskers."""
    groups = list(comparison.datasets)
    has_mean = any(v is not None for v in comparison.row_mean.values())
    if has_mean and len(groups) > 1:
        groups.append("Mean")
    methods = comparison.methods
    if not groups or not methods:
        return None
    width = 0.8 / len(methods)
    fig = MplFigure(figsize=(max(6.0, 1.2 + len(groups) * (0.35 + 0.22 * len(methods))), 4.4), layout="constrained")
    ax = fig.subplots()
    x = np.arange(len(groups))
    for i, method in enumerate(methods):
        means, stds = [], []
        for g in groups:
            if g == "Mean":
                mean = comparison.row_mean.get(method)
                means.append(np.nan if mean is None else mean)
                stds.append(np.nan)
                continue
            cell = comparison.cells.get((method, g))
            means.append(np.nan if cell is None or cell.mean is None else cell.mean)
            stds.append(np.nan if cell is None or cell.std is None else cell.std)
        pos = x - 0.4 + width * (i + 0.5)
        bars = ax.bar(pos, means, width, label=method, color=f"C{i % 10}")
        has_std = ~np.isnan(stds)
        # Whiskers only where there are several seeds: a zero-length whisker would claim no spread.
        if has_std.any():
            ax.errorbar(pos[has_std], np.asarray(means)[has_std], yerr=np.asarray(stds)[has_std], fmt="none",
                        ecolor="black", elinewidth=0.8, capsize=2)
        if len(groups) * len(methods) <= 30:
            # Inside the bar, so the label never collides with a whisker above it.
            ax.bar_label(bars, labels=["" if np.isnan(m) else f"{m:.1f}" for m in means], label_type="center",
                         fontsize=7, color="white", rotation=90)
    ax.set_xticks(x, groups)
    ax.set_ylabel("top-1 (%)")
    ax.set_ylim(0, 100)
    ax.grid(alpha=0.3, axis="y")
    ax.legend(fontsize=8, ncols=1 if len(methods) <= 6 else 2, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    ax.set_title("top-1 by method and data set (mean ± sample std over seeds)", fontsize=10)
    return save_figure(fig, path)
