"""Suites: the papers' comparison tables as one command.

A suite is a grid of recipes × datasets × seeds on one backbone. Every cell is a normal run
directory (``OUT/<recipe>/<dataset>/seed<k>``) made by :func:`surgeon.train.apply.apply_recipe`;
finished cells are skipped and interrupted ones resumed, so re-running a suite continues it.
At the end one comparison report is written (rows = methods, columns = tasks, mean ± std over
seeds, Params (M), train time), plus, for the recipes listed in ``inference_ablation``, MoSA's
inference mechanisms (paper Table 6) evaluated on the finished runs.
"""
from __future__ import annotations

import json
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import jsonschema
from rich.console import Console

from surgeon.errors import UserError
from surgeon.recipe.loader import apply_overrides, read_recipe

SUITE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "recipes", "datasets"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "description": {"type": "string"},
        "model": {"type": "object", "additionalProperties": False, "required": ["name"],
                  "properties": {"name": {"type": "string"}, "pretrained": {"type": ["boolean", "string"]},
                                 "kwargs": {"type": "object"}}},
        "data_root": {"type": "string"},
        "recipes": {"type": "array", "minItems": 1, "items": {"type": "string"}},
        "datasets": {"type": "array", "minItems": 1, "items": {"type": "string"}},
        "seeds": {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
        "set": {"type": "object"},
        "recipe_set": {"type": "object", "additionalProperties": {"type": "object"}},
        "inference_ablation": {"type": "array", "items": {"type": "string"}},
        "out": {"type": "string"},
    },
}
ABLATION_MODES = ("merge", "stochastic", "fixed", "ensemble")


@dataclass
class Cell:
    """One run of the grid."""

    recipe: str
    dataset: str
    seed: int
    run_dir: Path
    overrides: list[str]

    @property
    def label(self) -> str:
        return f"{self.recipe} × {self.dataset} × seed {self.seed}"


def load_suite(path: str | Path, overrides: list[str] | None = None) -> dict:
    """Read and check a suite file (``--set`` overrides apply to the suite's own fields)."""
    raw = apply_overrides(read_recipe(Path(path)), overrides or [])
    errors = sorted(jsonschema.Draft202012Validator(SUITE_SCHEMA).iter_errors(raw.data), key=lambda e: list(e.path))
    if errors:
        raise UserError("; ".join(f"{'.'.join(map(str, e.path)) or '(suite)'}: {e.message}" for e in errors),
                        where=str(path), hint="see suites/cpu_repro.yaml for the format")
    suite = dict(raw.data)
    suite.setdefault("seeds", [0])
    suite["source"] = str(path)
    return suite


def _dataset_spec(suite: dict, dataset: str) -> str:
    # A bare task name is a VTAB-1k task under data_root.
    if ":" in dataset:
        return dataset
    if "data_root" not in suite:
        raise UserError(f"dataset '{dataset}' has no scheme and the suite has no data_root",
                        where=suite["source"], hint="write builtin:NAME / imagefolder:PATH, or set data_root")
    return f"vtab1k:{Path(suite['data_root']) / dataset}"


def _short(dataset: str) -> str:
    return dataset.split(":", 1)[-1].rstrip("/").split("/")[-1]


def suite_cells(suite: dict, out: Path) -> list[Cell]:
    """The grid in run order: seed by seed, so a partial suite already has complete tables."""
    base = []
    for key, value in (suite.get("model") or {}).items():
        base.append(f"model.{key}={json.dumps(value)}")
    for key, value in (suite.get("set") or {}).items():
        base.append(f"{key}={json.dumps(value)}")
    cells = []
    for seed in suite["seeds"]:
        for dataset in suite["datasets"]:
            for recipe in suite["recipes"]:
                extra = [f"{k}={json.dumps(v)}" for k, v in (suite.get("recipe_set") or {}).get(recipe, {}).items()]
                overrides = base + extra + [f"train.seed={seed}", f"data.source={json.dumps(_dataset_spec(suite, dataset))}"]
                cells.append(Cell(recipe, dataset, seed, out / recipe / _short(dataset) / f"seed{seed}", overrides))
    return cells


def cell_finished(run_dir: Path) -> bool:
    """A cell is done when its run wrote summary.json (the end of training, merge included)."""
    return (run_dir / "summary.json").is_file()


def run_suite(path: str | Path, *, overrides: list[str] | None = None, out: str | Path | None = None,
              console: Console | None = None, only_report: bool = False) -> Path:
    """Run (or continue) a suite and write its comparison report.

    Args:
        path: the suite YAML.
        overrides: ``--set`` on the suite file's fields (e.g. ``seeds=[0]``, ``set.train.epochs=1``).
        out: output root; default the suite's ``out`` or ``runs/suites/<name>``.
        only_report: do not train, only (re)write the report from the finished cells.

    Returns:
        the path of the comparison markdown.
    """
    from surgeon.recipe import load_recipe
    from surgeon.train.apply import apply_recipe

    console = console or Console(stderr=True, highlight=False, soft_wrap=True)
    suite = load_suite(path, overrides)
    root = Path(out or suite.get("out") or Path("runs") / "suites" / suite["name"])
    cells = suite_cells(suite, root)
    # Validate every cell's recipe before training anything: a typo must not surface an hour in.
    for cell in cells:
        load_recipe(cell.recipe, cell.overrides)
    todo = [c for c in cells if not cell_finished(c.run_dir)]
    console.print(f"suite {suite['name']}: {len(cells)} cells, {len(cells) - len(todo)} finished, "
                  f"{len(todo)} to run -> {root}", markup=False)
    if not only_report:
        started = time.perf_counter()
        for k, cell in enumerate(todo, 1):
            resume = cell.run_dir if (cell.run_dir / "recipe.yaml").is_file() else None
            console.print(f"[{k}/{len(todo)}] {cell.label}{' (resuming)' if resume else ''}", markup=False)
            apply_recipe(cell.recipe, overrides=cell.overrides, out=str(cell.run_dir),
                         resume=str(resume) if resume else None, console=console)
            elapsed = time.perf_counter() - started
            console.print(f"  {elapsed / 60:.1f} min so far, ~{elapsed / k * (len(todo) - k) / 60:.1f} min left",
                          markup=False)
    return write_suite_report(suite, cells, root, console)


def _ablation(cells: list[Cell], recipes: list[str], console: Console) -> dict:
    """Top-1 of each inference mechanism on every finished cell of ``recipes`` (cached per run)."""
    from surgeon.evaluate import eval_run

    results: dict[tuple[str, str, str], list[float]] = {}
    for cell in cells:
        if cell.recipe not in recipes or not cell_finished(cell.run_dir):
            continue
        cache = cell.run_dir / "inference_ablation.json"
        scores = json.loads(cache.read_text()) if cache.is_file() else {}
        for mode in ABLATION_MODES:
            if mode not in scores:
                res, split, _ = eval_run(cell.run_dir, mode=mode)
                scores[mode] = res.top1
                console.print(f"  inference {mode:<10} {cell.label}: {res.top1:.1f}% ({split})", markup=False)
        cache.write_text(json.dumps(scores, indent=2))
        for mode in ABLATION_MODES:
            results.setdefault((cell.recipe, mode, _short(cell.dataset)), []).append(scores[mode])
    return results


def _mean_std(values: list[float]) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def ablation_table(suite: dict, ablation: dict):
    """MoSA Table 6 layout: rows = (recipe, inference mechanism), columns = tasks, mean ± std."""
    from surgeon.report.tables import Table

    datasets = [_short(d) for d in suite["datasets"]]
    table = Table(columns=["recipe", "inference", *datasets, "mean"], align=["l", "l"] + ["r"] * (len(datasets) + 1),
                  title="Inference mechanisms (MoSA Table 6): test top-1 (%), mean ± std over seeds")
    for recipe in suite.get("inference_ablation") or []:
        for mode in ABLATION_MODES:
            cols = [ablation.get((recipe, mode, d), []) for d in datasets]
            means = [statistics.mean(c) for c in cols if c]
            table.rows.append([recipe, mode, *(_mean_std(c) for c in cols),
                               f"{statistics.mean(means):.1f}" if len(means) == len(cols) else "—"])
    return table


def write_suite_report(suite: dict, cells: list[Cell], root: Path, console: Console) -> Path:
    """The comparison report of the finished cells (+ the inference ablation table)."""
    from surgeon.report import compare_runs

    finished = [c.run_dir for c in cells if cell_finished(c.run_dir)]
    if not finished:
        raise UserError(f"no finished runs under {root}", hint="run the suite first")
    ablation = _ablation(cells, suite.get("inference_ablation") or [], console)
    extra = [ablation_table(suite, ablation)] if ablation else []
    md = compare_runs(finished, root / "report", title=f"Suite {suite['name']}", extra_blocks=extra)
    console.print(f"report: {md}", markup=False)
    return md
