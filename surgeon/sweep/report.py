"""The sweep's report: ``OUT/report.md``, ``OUT/report.html`` (self-contained), ``OUT/result.json``
and ``OUT/plots/sweep.png`` (val top-1 against each searched value), built with the blocks of
:mod:`surgeon.report.document` so markdown and HTML say the same thing.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from matplotlib.figure import Figure as MplFigure

from surgeon.io import write_json, write_text
from surgeon.report.document import Bullets, Figure, Heading, Paragraph, to_markdown
from surgeon.report.html import to_html
from surgeon.report.plots import save_figure
from surgeon.report.tables import Table, duration, render_markdown
from surgeon.sweep import space
from surgeon.sweep.results import SweepResult

EDGE_MARK = "◂edge"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def _link(result: SweepResult, rel: str | None) -> str:
    if not rel:
        return "—"
    if (result.out / rel / "report.md").is_file():
        return f"[`{rel}`]({Path(rel).as_posix()}/report.md)"
    return f"`{rel}`"


def _state_text(r) -> str:
    """Short: ``complete``, ``pruned at step 20``, ``failed (diverged)``; the reasons are listed below the table."""
    if r.state == "pruned" and getattr(r, "steps", None):
        return f"pruned at step {r.steps}"
    if r.state in ("failed", "interrupted") and getattr(r, "failure", None):
        return f"{r.state} ({r.failure})"
    return r.state


def reasons(result: SweepResult) -> list[str]:
    """One line per trial or final run that ended without a result: why."""
    out = []
    for r in result.trials:
        if r.reason and r.state in ("failed", "pruned", "interrupted"):
            out.append(f"trial {r.index + 1} ({space.config_text(r.config)}): {_state_text(r)}: "
                       f"{r.reason.splitlines()[0]}")
    for f in result.finals:
        if f.reason and f.state != "complete":
            out.append(f"final seed {f.seed}: {f.state}: {f.reason.splitlines()[0]}")
    return out


def trials_table(result: SweepResult, *, links: bool = True, title: str = "") -> Table:
    """One row per configuration: its values, state, val top-1 at the end and at the best epoch,
    train time, attempts, run directory (a link to its report when ``links``)."""
    keys = list(result.grid)
    best_key = space.config_key(result.best.config) if result.best else None
    rows = []
    for r in result.trials:
        mark = " **best**" if best_key and space.config_key(r.config) == best_key else ""
        rows.append([f"{r.index + 1}{mark}", *(space.value_text(r.config.get(k)) for k in keys), _state_text(r),
                     _pct(r.val_last), _pct(r.val_best), duration(r.seconds),
                     str(r.attempts), _link(result, r.run_dir) if links else (r.run_dir or "—")])
    notes = ["val top-1 (%) under protocol tune (trained on the training split, train800 for VTAB-1k; scored on "
             "the val split, val200; test untouched). **end** = the last evaluation (the objective); "
             "**best epoch** = the best evaluation."]
    if any(r.attempts > 1 for r in result.trials):
        notes.append("runs > 1: the trial was interrupted and resumed from its checkpoint.")
    return Table(["trial", *keys, "state", "val top-1 end", "val top-1 best epoch", "train time", "runs", "run"], rows,
                 ["r", *(["r"] * len(keys)), "l", "r", "r", "r", "r", "l"], title=title, notes=notes)


def best_table(result: SweepResult) -> Table:
    edges = {e.key: e for e in result.edges}
    rows = []
    for k, v in result.best.config.items():
        e = edges.get(k)
        searched = ", ".join(space.value_text(x) for x in sorted(result.grid[k], key=_sort_key))
        rows.append([k, space.value_text(v) + (f" {EDGE_MARK}" if e else ""), searched])
    return Table(["key", "best value", "values searched"], rows, ["l", "r", "l"],
                 notes=[f"{EDGE_MARK}: the smallest or largest value searched (the best may lie beyond)."]
                 if result.edges else [])


def finals_table(result: SweepResult, *, links: bool = True) -> Table:
    rows = []
    for f in result.finals:
        split = f" ({f.split})" if f.split and f.split != "test" else ""
        rows.append([str(f.seed), f.state if f.state == "complete" else _state_text(f), _pct(f.test_top1) + split,
                     _pct(f.val_top1), duration(f.seconds),
                     _link(result, f.run_dir) if links else (f.run_dir or "—")])
    vals = result.test_values
    if vals:
        mean = f"{result.test_mean:.2f}" + (f" ± {result.test_std:.2f}" if result.test_std is not None else "")
        rows.append(["**mean**", f"{len(vals)} of {len(result.finals)}", mean, "", "", ""])
    return Table(["seed", "state", "test top-1", "val top-1 (monitor)", "train time", "run"], rows,
                 ["r", "l", "r", "r", "r", "l"],
                 notes=["protocol final: trained on train+val (train800val200) where the source has that pair "
                        "(vtab1k, fgvc, builtin; then val is inside the training data and only monitors), tested "
                        "on test; mean ± sample std over seeds."])


def _sort_key(v):
    return (0, v) if isinstance(v, (int, float)) and not isinstance(v, bool) else (1, json.dumps(v, sort_keys=True))


def score_plot(result: SweepResult, path: Path) -> Path | None:
    """One panel per searched key: val top-1 at the end of each complete trial against the
    key's value (dots), the best over the other keys per value (line), the chosen one (star);
    pruned trials hollow, failed ones as red crosses at the bottom."""
    keys = list(result.grid)
    scored = [r for r in result.trials if r.config]
    if not keys or not scored:
        return None
    fig = MplFigure(figsize=(min(4.2 * len(keys), 14), 3.6), layout="constrained")
    axes = fig.subplots(1, len(keys), squeeze=False)[0]
    complete = [r for r in scored if r.state == "complete" and r.val_last is not None]
    floor = min([r.val_last for r in complete], default=0.0)
    for ax, key in zip(axes, keys):
        values = sorted(result.grid[key], key=_sort_key)
        numeric = space.numeric_values(values)
        positive = numeric and min(values) > 0
        log = positive and max(values) / min(values) >= 10
        pos = {json.dumps(v, sort_keys=True): (v if numeric else i) for i, v in enumerate(values)}

        def x_of(r):
            return pos.get(json.dumps(r.config.get(key), sort_keys=True))

        xs = [x_of(r) for r in complete]
        ax.scatter(xs, [r.val_last for r in complete], s=18, alpha=0.6, color="C0", label="trial (end of schedule)")
        line = []
        for v in values:
            here = [r.val_last for r in complete if r.config.get(key) == v]
            if here:
                line.append((pos[json.dumps(v, sort_keys=True)], max(here)))
        if line:
            ax.plot(*zip(*line), color="C0", linewidth=1)
        pruned = [r for r in scored if r.state == "pruned"]
        if pruned:
            ax.scatter([x_of(r) for r in pruned], [r.val_best if r.val_best is not None else floor for r in pruned],
                       s=18, facecolors="none", edgecolors="C1", label="pruned (best so far)")
        failed = [r for r in scored if r.state == "failed"]
        if failed:
            ax.scatter([x_of(r) for r in failed], [floor] * len(failed), marker="x", color="C3", label="failed")
        if result.best is not None:
            ax.scatter([x_of(result.best)], [result.best.val_last], marker="*", s=140, color="C2", zorder=3,
                       label="chosen")
        if log:
            ax.set_xscale("log")
        if numeric:
            ax.set_xticks(values, [space.value_text(v) for v in values])
            ax.minorticks_off()
        else:
            ax.set_xticks(range(len(values)), [space.value_text(v) for v in values])
        ax.tick_params(axis="x", labelrotation=45 if len(values) > 4 else 0, labelsize=8)
        ax.set_xlabel(key, fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("val top-1 (%)")
    axes[0].legend(fontsize=7, loc="best")
    fig.suptitle("val top-1 at the end of the schedule against each searched value", fontsize=10)
    return save_figure(fig, path)


def report_blocks(result: SweepResult, base_dir: Path) -> list:
    n_done = sum(1 for r in result.trials if r.state == "complete")
    counts = {}
    for r in result.trials:
        counts[r.state] = counts.get(r.state, 0) + 1
    state_text = ", ".join(f"{v} {k}" for k, v in counts.items())
    what = [f"recipe `{result.recipe}`"]
    if result.model:
        what.append(f"model `{result.model}`")
    if result.data:
        what.append(f"data `{result.data}`")
    blocks = [Heading(f"Sweep {result.study}", 1),
              Paragraph(f"{', '.join(what)}; {len(result.trials)} configuration(s) ({state_text}), "
                        f"{result.sampler} sampler; Optuna study `{result.study}` in `{result.storage}`; "
                        f"written {datetime.now().strftime('%Y-%m-%d %H:%M')}."),
              Paragraph("Protocol (VTAB-1k): each trial trains with `data.protocol: tune` on the training split "
                        "(train800) and is scored on the validation split (val200) at the **end of its schedule**; "
                        "no test image is seen. The best configuration is then retrained with `data.protocol: final` "
                        "(train+val, train800val200, for sources with that pair) for each seed and scored on test.")]
    if result.overrides:
        blocks.append(Paragraph("Fixed overrides: " + ", ".join(f"`{o}`" for o in result.overrides) + "."))
    for e in result.edges:
        side = "smallest" if e.side == "low" else "largest"
        blocks.append(Paragraph(f"**Warning:** the best `{e.key}` ({space.value_text(e.value)}) is the {side} value "
                                f"searched: the best value may lie beyond it ({e.note})."))
    if result.best is None:
        blocks.append(Paragraph(f"**Warning:** no trial finished with a val score ({n_done} complete)."))
    else:
        b = result.best
        blocks += [Heading("Best configuration"),
                   Paragraph(f"Trial {b.index + 1}: val top-1 **{b.val_last:.2f}%** at the end of the schedule "
                             f"(best epoch {_pct(b.val_best)}%).{tie_text(result)}"),
                   best_table(result)]
    plot = score_plot(result, base_dir / "plots" / "sweep.png")
    blocks += [Heading(f"Trials ({result.sampler} sampler)"), trials_table(result)]
    if reasons(result):
        blocks.append(Bullets(reasons(result)))
    if plot is not None:
        blocks.append(Figure(plot, "val top-1 at the end of the schedule against each searched value "
                                   "(line: the best over the other keys; star: the chosen configuration)."))
    if result.seeds:
        blocks += [Heading("Final runs (protocol final)")]
        if result.best is None:
            blocks.append(Paragraph("None: no configuration to retrain."))
        else:
            if result.test_mean is not None:
                mean = f"{result.test_mean:.2f}%" + (f" ± {result.test_std:.2f}" if result.test_std is not None else "")
                blocks.append(Paragraph(f"Test top-1 of the best configuration: **{mean}** over "
                                        f"{len(result.test_values)} seed(s) "
                                        f"({', '.join(f'{v:.2f}' for v in result.test_values)})."))
            blocks.append(finals_table(result))
    return blocks


def write_sweep_report(result: SweepResult) -> Path:
    """Write ``report.md``, ``report.html``, ``result.json`` and the plot into ``result.out``.

    Returns:
        the path of ``report.md``.
    """
    out = Path(result.out)
    out.mkdir(parents=True, exist_ok=True)
    blocks = report_blocks(result, out)
    md = out / "report.md"
    write_text(md, to_markdown(blocks, out))
    write_text(out / "report.html", to_html(blocks, f"Sweep {result.study}"))
    write_json(out / "result.json", result.to_json())
    return md


def tie_text(result: SweepResult) -> str:
    """`` Tied with trial 13 ...`` when other configurations reach the best score."""
    b = result.best
    ties = [r for r in result.trials if r is not b and r.state == "complete" and r.val_last == b.val_last]
    if not ties:
        return ""
    return (f" Tied with trial{'s' if len(ties) > 1 else ''} {', '.join(str(r.index + 1) for r in ties)}: ties go to "
            "the higher best-epoch val top-1, then the earlier trial.")


def summary_text(result: SweepResult) -> str:
    """The console summary: the trials table, the best configuration, the final result."""
    parts = [render_markdown(trials_table(result, links=False, title=f"Trials ({result.sampler} sampler), "
                                                                     f"in {result.out}"))]
    parts += ["\n".join(f"- {line}" for line in reasons(result))] if reasons(result) else []
    if result.best is not None:
        parts.append(f"best: {space.config_text(result.best.config)} — val top-1 {result.best.val_last:.2f}% "
                     f"(trial {result.best.index + 1}).{tie_text(result)}")
    for e in result.edges:
        side = "smallest" if e.side == "low" else "largest"
        parts.append(f"warning: the best {e.key}={space.value_text(e.value)} is the {side} value searched; "
                     f"the best may lie beyond it ({e.note})")
    if result.finals:
        parts.append(render_markdown(finals_table(result, links=False)))
    if result.report is not None:
        parts.append(f"report: {result.report}")
    return "\n\n".join(parts)

