"""Suites: the papers' comparison tables as one command.

A suite is a grid of recipes × datasets × seeds on one backbone. Every cell is a normal run
directory (``OUT/<recipe>/<dataset>/seed<k>``) made by :func:`surgeon.apply.apply_recipe`;
finished cells are skipped and interrupted ones resumed, so re-running a suite continues it.
At the end one comparison report is written (rows = methods, columns = tasks, mean ± std over
seeds, Params (M), train time), plus, for the recipes listed in ``inference_ablation``, MoSA's
inference mechanisms (paper Table 6) evaluated on the finished runs, and for every pair
``[A, B]`` in ``orderings`` the paired evidence that A beats B over tasks × seeds (mean
difference, 95% bootstrap interval, per-task sign: :mod:`surgeon.report.orderings`); ``A`` may
name an inference mechanism as ``recipe:mode``, e.g. ``[mosa_hier:merge, mosa_hier:stochastic]``.

With a ``sweep:`` section, each recipe × dataset is first tuned by :mod:`surgeon.sweep`
(``OUT/<recipe>/<dataset>/sweep``, protocol tune, on the suite's ``set``/``recipe_set`` plus the
grid) and its seed cells then train the chosen configuration under ``data.protocol: final``;
the report adds a table of the chosen values.

``set``, ``dataset_set.<dataset>``, ``recipe_set.<recipe>``, ``recipe_dataset_set.<recipe>.<dataset>``,
``sweep.grid`` and ``sweep.recipe_grid.<recipe>`` map dotted recipe keys to values; a cell applies
them in that order (later wins), so a benchmark's per-dataset settings (``dataset_set``: e.g. the
published lr of each FGVC dataset) can be overridden per recipe. A suite override into them sets
one such key (``--set set.train.epochs=2`` changes ``train.epochs`` only, like a recipe override).

A dataset without a scheme is a task folder under ``data_root``, read as ``data_scheme``
(``vtab1k`` by default; ``fgvc`` for VPT-style json folders, ``imagefolder``).

This module reads suites and lists their cells (import-light: ``surgeon show SUITE`` uses it);
running them is :mod:`surgeon.suite_runner`.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass
from pathlib import Path

import jsonschema

from surgeon.errors import UserError
from surgeon.methods.modes import INFERENCE_MODES
from surgeon.recipe.loader import RawRecipe, apply_overrides, parse_override, read_recipe

SUITE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "recipes", "datasets"],
    "properties": {
        "name": {"type": "string", "minLength": 1},
        "description": {"type": "string"},
        "model": {"type": "object", "additionalProperties": False, "required": ["name"],
                  "properties": {"name": {"type": "string"}, "pretrained": {"type": ["boolean", "string"]},
                                 "tag": {"type": ["string", "array", "null"]}, "kwargs": {"type": "object"}}},
        "data_root": {"type": "string"},
        "data_scheme": {"enum": ["vtab1k", "fgvc", "imagefolder"]},
        "recipes": {"type": "array", "minItems": 1, "items": {"type": "string"}},
        "datasets": {"type": "array", "minItems": 1, "items": {"type": "string"}},
        "seeds": {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}},
        "set": {"type": "object"},
        "recipe_set": {"type": "object", "additionalProperties": {"type": "object"}},
        "dataset_set": {"type": "object", "additionalProperties": {"type": "object"}},
        "recipe_dataset_set": {"type": "object", "additionalProperties": {
            "type": "object", "additionalProperties": {"type": "object"}}},
        "inference_ablation": {"type": "array", "items": {"type": "string"}},
        "orderings": {"type": "array", "items": {"type": "array", "minItems": 2, "maxItems": 2,
                                                 "items": {"type": "string", "minLength": 1}}},
        "out": {"type": "string"},
        "sweep": {
            "type": "object", "additionalProperties": False,
            "properties": {
                "grid": {"type": "object", "additionalProperties": {"type": "array", "minItems": 1}},
                "recipe_grid": {"type": "object", "additionalProperties": {
                    "type": "object", "additionalProperties": {"type": "array", "minItems": 1}}},
                "extend_edges": {"type": "boolean"},
                "prune": {"type": "boolean"},
            },
        },
    },
}
# Suite mappings whose keys are dotted recipe keys (None: any name, e.g. a recipe).
FLAT_MAPPINGS = (("set",), ("recipe_set", None), ("dataset_set", None), ("recipe_dataset_set", None, None),
                 ("sweep", "grid"), ("sweep", "recipe_grid", None))
ABLATION_MODES = INFERENCE_MODES


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


def _flat_target(path: tuple) -> tuple[tuple, str] | None:
    """``("set", "train", "epochs")`` -> ``(("set",), "train.epochs")``; None outside the flat mappings."""
    for pattern in FLAT_MAPPINGS:
        n = len(pattern)
        if len(path) > n and all(p is None or p == q for p, q in zip(pattern, path)):
            return tuple(path[:n]), ".".join(map(str, path[n:]))
    return None


def apply_suite_overrides(raw: RawRecipe, overrides: list[str]) -> RawRecipe:
    """Suite overrides, in order: into ``set``/``recipe_set``/sweep grids they set one dotted
    recipe key (merging into the mapping); anything else is an ordinary override."""
    for text in overrides:
        op, path, value = parse_override(text)
        target = _flat_target(path)
        if target is None:
            raw = apply_overrides(raw, [text])
            continue
        prefix, key = target
        data = copy.deepcopy(raw.data)
        node = data
        for part in prefix:
            if not isinstance(node.get(part), dict):
                if part in node:
                    raise UserError(f"bad --set '{text}': {'.'.join(prefix)} is not a mapping", where=raw.source)
                node[part] = {}
            node = node[part]
        if op == "del":
            node.pop(key, None)
        else:
            node[key] = value
        origin = dict(raw.origin)
        origin[prefix + (key,)] = f"--set {text}"
        raw = RawRecipe(data, origin, raw.source)
    return raw


def load_suite(path: str | Path, overrides: list[str] | None = None) -> dict:
    """Read and check a suite file (``--set`` overrides apply to the suite's own fields)."""
    raw = apply_suite_overrides(read_recipe(Path(path)), overrides or [])
    errors = sorted(jsonschema.Draft202012Validator(SUITE_SCHEMA).iter_errors(raw.data), key=lambda e: list(e.path))
    if errors:
        raise UserError("; ".join(f"{'.'.join(map(str, e.path)) or '(suite)'}: {e.message}" for e in errors),
                        where=str(path), hint="see suites/cpu_repro.yaml for the format")
    suite = dict(raw.data)
    suite.setdefault("seeds", [0])
    suite["source"] = str(path)
    return suite


def _dataset_spec(suite: dict, dataset: str) -> str:
    # A bare task name is a folder under data_root, read as data_scheme (VTAB-1k by default).
    if ":" in dataset:
        return dataset
    if "data_root" not in suite:
        raise UserError(f"dataset '{dataset}' has no scheme and the suite has no data_root",
                        where=suite["source"], hint="write builtin:NAME / imagefolder:PATH, or set data_root")
    return f"{suite.get('data_scheme', 'vtab1k')}:{Path(suite['data_root']) / dataset}"


def _short(dataset: str) -> str:
    return dataset.split(":", 1)[-1].rstrip("/").split("/")[-1]


def suite_cells(suite: dict, out: Path) -> list[Cell]:
    """The grid in run order: seed by seed, so a partial suite already has complete tables."""
    base = []
    for key, value in (suite.get("model") or {}).items():
        base.append(f"model.{key}={json.dumps(value)}")
    for key, value in (suite.get("set") or {}).items():
        base.append(f"{key}={json.dumps(value)}")
    def pairs(mapping: dict | None) -> list[str]:
        return [f"{k}={json.dumps(v)}" for k, v in (mapping or {}).items()]

    cells = []
    for seed in suite["seeds"]:
        for dataset in suite["datasets"]:
            for recipe in suite["recipes"]:
                extra = (pairs((suite.get("dataset_set") or {}).get(dataset))
                         + pairs((suite.get("recipe_set") or {}).get(recipe))
                         + pairs(((suite.get("recipe_dataset_set") or {}).get(recipe) or {}).get(dataset)))
                overrides = base + extra + [f"train.seed={seed}", f"data.source={json.dumps(_dataset_spec(suite, dataset))}"]
                cells.append(Cell(recipe, dataset, seed, out / recipe / _short(dataset) / f"seed{seed}", overrides))
    return cells


def cell_finished(run_dir: Path) -> bool:
    """A cell is done when its run wrote summary.json (the end of training, merge included)."""
    return (run_dir / "summary.json").is_file()


@dataclass
class SweepJob:
    """The sweep of one recipe × dataset (a suite's ``sweep:`` section)."""

    recipe: str
    dataset: str
    grid: dict
    out: Path
    overrides: list[str]

    @property
    def label(self) -> str:
        return f"{self.recipe} × {self.dataset}"


def suite_sweeps(suite: dict, out: Path) -> dict[tuple[str, str], SweepJob]:
    """One sweep per recipe × dataset with a non-empty grid, on the overrides of the cells
    (``model``, ``set``, ``recipe_set``, the dataset) with ``train.seed`` = the first seed."""
    section = suite.get("sweep")
    if not section:
        return {}
    jobs = {}
    seed = suite["seeds"][0]
    for dataset in suite["datasets"]:
        for recipe in suite["recipes"]:
            grid = {**(section.get("grid") or {}), **(section.get("recipe_grid") or {}).get(recipe, {})}
            if not grid:
                continue
            cell = next(c for c in suite_cells({**suite, "seeds": [seed]}, out)
                        if c.recipe == recipe and c.dataset == dataset)
            jobs[(recipe, dataset)] = SweepJob(recipe, dataset, grid, out / recipe / _short(dataset) / "sweep",
                                               cell.overrides)
    return jobs
