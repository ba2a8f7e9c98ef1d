"""Running a suite (``surgeon suite``): its sweeps, its cells, and its comparison report.

The suite itself (file, overrides, cells, sweeps) is :mod:`surgeon.suite`.
"""
from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

from rich.console import Console

from surgeon.apply import apply_recipe
from surgeon.errors import UserError
from surgeon.evaluate import eval_run
from surgeon.gpus import parse_gpus, run_on_gpus
from surgeon.io import write_json
from surgeon.recipe import load_recipe
from surgeon.recipe.loader import parse_override
from surgeon.report import collect_runs, compare_runs
from surgeon.report.document import Heading
from surgeon.report.orderings import ordering, orderings_table
from surgeon.report.tables import Table
from surgeon.rundir import read_run_recipe
from surgeon.suite import ABLATION_MODES, Cell, SweepJob, _short, cell_finished, load_suite, suite_cells, suite_sweeps
from surgeon.sweep import prepare_spec, run_sweep
from surgeon.sweep.space import config_overrides, value_text


def _sweep_kwargs(suite: dict, job: SweepJob, workers: int, gpus: str | None = None) -> dict:
    section = suite["sweep"]
    return dict(grid=job.grid, overrides=job.overrides, seeds=[], out=job.out,
                extend_edges=bool(section.get("extend_edges")), prune=bool(section.get("prune")), workers=workers,
                gpus=gpus)


def _check_sweeps(suite: dict, jobs: dict) -> None:
    """Every sweep's grid against its recipe, all problems at once, before anything trains."""
    problems = []
    for job in jobs.values():
        try:
            prepare_spec(job.recipe, **_sweep_kwargs(suite, job, 1))
        except UserError as exc:
            problems.append(f"sweep {job.label}: {exc.message}")
    if problems:
        raise UserError("\n".join(problems), where=suite["source"],
                        hint="sweep.grid / sweep.recipe_grid keys are --set paths of each recipe; a sweep directory "
                             "that holds another search (the suite's settings changed) must be deleted first")


def _cell_config_mismatch(cell: Cell, config: dict) -> list[str]:
    """Grid keys where a finished cell's recipe differs from the chosen configuration."""
    recipe = read_run_recipe(cell.run_dir)
    out = []
    for key, value in config.items():
        node = recipe
        for part in parse_override(f"{key}=0")[1]:
            try:
                node = node[part]
            except (KeyError, IndexError, TypeError):
                node = None
                break
        if node != value:
            out.append(f"{key}: trained with {node!r}, chosen {value!r}")
    return out


def train_cell(cell: Cell, log) -> None:
    """Train (or resume) one cell, its console output going to ``log`` (a ``--gpus`` worker's task)."""
    resume = cell.run_dir if (cell.run_dir / "recipe.yaml").is_file() else None
    apply_recipe(cell.recipe, overrides=cell.overrides, out=str(cell.run_dir), resume=str(resume) if resume else None,
                 console=Console(file=log, highlight=False, soft_wrap=True, width=160))


def _train_on_gpus(cells: list[Cell], gpus: list[str], root: Path, console: Console) -> None:
    """Train ``cells`` on one worker per GPU (each cell once, a free worker takes the next).

    Raises:
        UserError: after every cell has had its turn, when some failed (their messages and logs).
    """
    logs = root / "logs"
    console.print(f"{len(cells)} cells on GPU {','.join(gpus)} (one worker each); training logs: "
                  f"{logs}/gpu<id>.log", markup=False)
    started, finished, cell_seconds = time.perf_counter(), 0, 0.0

    def on_event(kind: str, i: int, gpu: str, info) -> None:
        nonlocal finished, cell_seconds
        cell = cells[i]
        if kind == "start":
            resuming = (cell.run_dir / "recipe.yaml").is_file()
            console.print(f"[gpu {gpu}] {cell.label}{' (resuming)' if resuming else ''}", markup=False)
            return
        finished += 1
        if kind == "done":
            cell_seconds += info
            left = cell_seconds / finished * (len(cells) - finished) / len(gpus)
            console.print(f"[{finished}/{len(cells)}] [gpu {gpu}] {cell.label}: done in {info / 60:.1f} min; "
                          f"{(time.perf_counter() - started) / 60:.1f} min so far, ~{left / 60:.1f} min of cells "
                          "left", markup=False)
        else:
            console.print(f"[{finished}/{len(cells)}] [gpu {gpu}] {cell.label}: FAILED ({info[1]})", markup=False)

    result = run_on_gpus(train_cell, cells, gpus, logs=logs, on_event=on_event)
    if result.failed:
        lines = [f"{cells[i].label} (GPU {gpu}, log {logs / f'gpu{gpu}.log'}): {message}"
                 for i, (gpu, _kind, message) in sorted(result.failed.items())]
        bug = any(kind == "bug" for _, kind, _ in result.failed.values())
        raise UserError(f"{len(result.failed)} of {len(cells)} cells failed:\n" + "\n".join(lines),
                        hint=("an internal error is a bug in surgeon (traceback in the log); " if bug else "")
                        + "the other cells are kept: run the same command again to retry the failed ones")


def run_suite(path: str | Path, *, overrides: list[str] | None = None, out: str | Path | None = None,
              console: Console | None = None, only_report: bool = False, workers: int = 1,
              gpus: str | None = None) -> Path:
    """Run (or continue) a suite and write its comparison report.

    Args:
        path: the suite YAML.
        overrides: ``--set`` on the suite file's fields (e.g. ``seeds=[0]``, ``set.train.epochs=1``).
        out: output root; default the suite's ``out`` or ``runs/suites/<name>``.
        only_report: do not train, only (re)write the report from the finished cells.
        workers: worker processes for each sweep of a ``sweep:`` section (cells run one at a time).
        gpus: ``"0,1,2,3"``: one worker per GPU (each sees only its GPU through
            ``CUDA_VISIBLE_DEVICES``) trains the cells, a free worker taking the next; each sweep
            runs on the same GPUs first. Not with ``workers`` > 1 (a GPU is a worker).

    Returns:
        the path of the comparison markdown.
    """
    console = console or Console(stderr=True, highlight=False, soft_wrap=True)
    suite = load_suite(path, overrides)
    root = Path(out or suite.get("out") or Path("runs") / "suites" / suite["name"])
    cells = suite_cells(suite, root)
    jobs = suite_sweeps(suite, root)
    # Validate every cell's recipe (and every sweep's grid) before training anything: a typo
    # must not surface an hour in.
    for cell in cells:
        load_recipe(cell.recipe, cell.overrides)
    gpu_values = parse_gpus(gpus, workers=workers) if gpus is not None and not only_report else None
    if jobs and not only_report:
        _check_sweeps(suite, jobs)
    todo = [c for c in cells if not cell_finished(c.run_dir)]
    sweeps_left = sum(1 for j in jobs.values() if not _sweep_result(j))
    console.print(f"suite {suite['name']}: {len(cells)} cells, {len(cells) - len(todo)} finished, "
                  f"{len(todo)} to run" + (f"; {len(jobs)} sweeps, {sweeps_left} to finish" if jobs else "")
                  + f" -> {root}", markup=False)
    chosen: dict[tuple[str, str], dict | None] = {}
    if not only_report:
        started = time.perf_counter()
        trained, cell_seconds = 0, 0.0
        on_gpus: list[Cell] = []  # with --gpus: the cells to train, once every sweep has chosen
        for cell in cells:
            job = jobs.get((cell.recipe, cell.dataset))
            if job is not None and (cell.recipe, cell.dataset) not in chosen:
                console.print(f"sweep {job.label} -> {job.out}", markup=False)
                result = run_sweep(job.recipe, console=console, **_sweep_kwargs(suite, job, workers, gpus))
                chosen[(cell.recipe, cell.dataset)] = result.best_config
                if result.best is None:
                    console.print(f"warning: no trial of the sweep of {job.label} has a val score (see "
                                  f"{result.report}): its cells are skipped", markup=False)
            if job is not None and chosen[(cell.recipe, cell.dataset)] is None:
                continue
            config = chosen.get((cell.recipe, cell.dataset))
            if config is not None:
                cell.overrides = cell.overrides + config_overrides(config) + ["data.protocol=final"]
            if cell_finished(cell.run_dir):
                mismatch = _cell_config_mismatch(cell, config) if config else []
                if mismatch:
                    console.print(f"warning: {cell.label} was trained with another configuration than its sweep "
                                  f"now chooses ({'; '.join(mismatch)}); delete {cell.run_dir} to retrain it",
                                  markup=False)
                continue
            if gpu_values:
                on_gpus.append(cell)
                continue
            trained += 1
            resume = cell.run_dir if (cell.run_dir / "recipe.yaml").is_file() else None
            console.print(f"[{trained}/{len(todo)}] {cell.label}{' (resuming)' if resume else ''}", markup=False)
            t0 = time.perf_counter()
            apply_recipe(cell.recipe, overrides=cell.overrides, out=str(cell.run_dir),
                         resume=str(resume) if resume else None, console=console)
            cell_seconds += time.perf_counter() - t0
            elapsed = time.perf_counter() - started
            left = cell_seconds / trained * (len(todo) - trained)
            console.print(f"  {elapsed / 60:.1f} min so far, ~{left / 60:.1f} min of cells left"
                          + (" (plus their sweeps)" if jobs else ""), markup=False)
        if on_gpus:
            _train_on_gpus(on_gpus, gpu_values, root, console)
    return write_suite_report(suite, cells, root, console, jobs=jobs)


def _sweep_result(job: SweepJob) -> dict | None:
    """The sweep's ``result.json`` when it has a chosen configuration."""
    path = job.out / "result.json"
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError:
        return None
    return data if data.get("best_config") else None


def chosen_table(suite: dict, jobs: dict):
    """Per recipe × dataset: the values the sweep chose (◂edge: the smallest or largest value
    searched), its val top-1 and how many configurations it trained."""
    rows = []
    any_edge = False
    for (recipe, dataset), job in jobs.items():
        res = _sweep_result(job)
        if res is None:
            rows.append([recipe, _short(dataset), "— (sweep not finished)", "—", "—"])
            continue
        edges = {e["key"] for e in res.get("edges", [])}
        any_edge |= bool(edges)
        chosen = ", ".join(f"{k}={value_text(v)}" + (" ◂edge" if k in edges else "")
                           for k, v in res["best_config"].items())
        done = sum(1 for t in res["trials"] if t["state"] == "complete")
        # The comparison is written to OUT/report/: its links go up one level.
        link = f"../{recipe}/{_short(dataset)}/{job.out.name}/report.md"
        rows.append([recipe, _short(dataset), chosen, f"{res['best']['val_last']:.1f}",
                     f"{done}/{len(res['trials'])} ([report]({link}))"])
    notes = ["Chosen by val top-1 at the end of the schedule under the tune protocol (train800 → val200); "
             "the cells above retrain it under the final protocol."]
    if any_edge:
        notes.append("◂edge: the best value is the smallest or largest value searched; the best may lie beyond it.")
    return Table(["recipe", "data set", "chosen values", "val top-1 (tune)", "trials complete"], rows,
                 ["l", "l", "l", "r", "l"], title="Hyper-parameters chosen by the sweeps", notes=notes)


def _read_cache(path: Path) -> dict:
    """A cell's cached inference scores; a missing or unreadable cache is recomputed, not fatal."""
    try:
        scores = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return scores if isinstance(scores, dict) else {}


def _ablation(cells: list[Cell], recipes: list[str], console: Console) -> dict:
    """Top-1 of each inference mechanism on every finished cell of ``recipes`` (cached per run):
    ``(recipe, mode, dataset, seed) -> top-1 (%)``."""
    results: dict[tuple[str, str, str, int], float] = {}
    for cell in cells:
        if cell.recipe not in recipes or not cell_finished(cell.run_dir):
            continue
        cache = cell.run_dir / "inference_ablation.json"
        scores = _read_cache(cache)
        for mode in ABLATION_MODES:
            if mode not in scores:
                res, split, _ = eval_run(cell.run_dir, mode=mode)
                scores[mode] = res.top1
                console.print(f"  inference {mode:<10} {cell.label}: {res.top1:.1f}% ({split})", markup=False)
        write_json(cache, scores)
        for mode in ABLATION_MODES:
            results[(cell.recipe, mode, _short(cell.dataset), cell.seed)] = scores[mode]
    return results


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def ablation_table(suite: dict, ablation: dict):
    """MoSA Table 6 layout: rows = (recipe, inference mechanism), columns = tasks, mean ± std."""
    datasets = [_short(d) for d in suite["datasets"]]
    table = Table(columns=["recipe", "inference", *datasets, "mean"], align=["l", "l"] + ["r"] * (len(datasets) + 1),
                  title="Inference mechanisms (MoSA Table 6): test top-1 (%), mean ± std over seeds")
    for recipe in suite.get("inference_ablation") or []:
        for mode in ABLATION_MODES:
            cols = [[v for (r, m, dd, _), v in ablation.items() if (r, m, dd) == (recipe, mode, d)] for d in datasets]
            means = [statistics.mean(c) for c in cols if c]
            table.rows.append([recipe, mode, *(_mean_std(c) for c in cols),
                               f"{statistics.mean(means):.1f}" if len(means) == len(cols) else "—"])
    return table


def _ordering_scores(cells: list[Cell], ablation: dict) -> dict[tuple[str, str, int], float]:
    """``(label, dataset, seed) -> test top-1 (%)`` of the finished cells; a label is a recipe
    name, or ``recipe:mode`` for an inference mechanism of the ablation (``mosa_hier:stochastic``)."""
    scores = {}
    for cell in cells:
        if cell_finished(cell.run_dir):
            result = collect_runs([cell.run_dir])[0]
            if result.top1 is not None and result.metric == "test":
                scores[(cell.recipe, _short(cell.dataset), cell.seed)] = result.top1
    for (recipe, mode, dataset, seed), value in ablation.items():
        scores[(f"{recipe}:{mode}", dataset, seed)] = value
    return scores


def write_suite_report(suite: dict, cells: list[Cell], root: Path, console: Console,
                       jobs: dict | None = None) -> Path:
    """The comparison report of the finished cells (+ the inference ablation table, + the
    sweeps' chosen values)."""
    finished = [c.run_dir for c in cells if cell_finished(c.run_dir)]
    if not finished:
        raise UserError(f"no finished runs under {root}", hint="run the suite first")
    ablation = _ablation(cells, suite.get("inference_ablation") or [], console)
    extra = [ablation_table(suite, ablation)] if ablation else []
    if suite.get("orderings"):
        extra += [Heading("The papers' orderings, paired over tasks × seeds"),
                  orderings_table([ordering(_ordering_scores(cells, ablation), better, worse)
                                   for better, worse in suite["orderings"]])]
    if jobs:
        extra.append(chosen_table(suite, jobs))
    md = compare_runs(finished, root / "report", title=f"Suite {suite['name']}", extra_blocks=extra)
    console.print(f"report: {md}", markup=False)
    return md
