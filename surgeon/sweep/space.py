"""The search space of a sweep: ``--grid KEY=[a,b,c]`` parsing, validation against the recipe
schema, the configurations of a grid, and the edge extension of numeric keys.

A *grid* is an ordered mapping ``{recipe key: [values]}`` (keys are ``--set`` paths such as
``train.base_lr`` or ``surgery.0.mlae.masking.p``); a *configuration* is one value per key.
Everything here is pure (no Optuna, no training) so it is cheap to test.
"""
from __future__ import annotations

import itertools
import json
import math
import re
from typing import Any

import yaml

from surgeon.errors import RecipeError, UserError
from surgeon.recipe import load_recipe
from surgeon.recipe.loader import RecipeLoader

#: Keys a grid may not search, and why (the sweep itself sets them).
RESERVED_KEYS = {
    "data.protocol": "the sweep sets it (tune for the trials, final for the retraining)",
    "train.seed": "the final runs' seeds come from --seeds; trials use the recipe's train.seed",
}
#: Extensions of one key beyond one edge of its grid (``--extend-edges``).
MAX_EXTENSIONS = 3
#: Combinations validated one by one before the first trial (beyond this, each value alone).
MAX_VALIDATED_COMBINATIONS = 2000

Grid = dict  # {key: [values]}, insertion-ordered


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def value_text(v: Any) -> str:
    """A value as a user wrote it: ``0.001`` / ``1e-05`` / ``true`` / ``adamw`` / ``[1, 2]``."""
    if isinstance(v, float):
        return f"{v:g}"
    if isinstance(v, str):
        return v
    return json.dumps(v)


def override_text(key: str, value: Any) -> str:
    """``KEY=VALUE`` for :func:`surgeon.recipe.load_recipe` (JSON is YAML, so types survive)."""
    return f"{key}={json.dumps(value)}"


def config_overrides(config: dict) -> list[str]:
    return [override_text(k, v) for k, v in config.items()]


def config_key(config: dict) -> str:
    """The identity of a configuration (the same values give the same string)."""
    return json.dumps(sorted(config.items()), separators=(",", ":"))


def config_text(config: dict) -> str:
    """``train.base_lr=0.001 surgery.0.mlae.masking.p=0.5``."""
    return " ".join(f"{k}={value_text(v)}" for k, v in config.items())


def short_name(config: dict, limit: int = 60) -> str:
    """A file-name-safe digest of a configuration: ``base_lr0.001_p0.5`` (last key segment + value)."""
    parts = []
    for key, value in config.items():
        segs = [s for s in key.split(".") if not s.isdigit()]
        parts.append(f"{segs[-1] if segs else key}{value_text(value)}")
    text = re.sub(r"[^A-Za-z0-9._+-]+", "-", "_".join(parts)).strip("-")
    return (text[:limit].rstrip("-_.") or "config") if text else "config"


# ------------------------------------------------------------------------------- parsing

GRID_HINT = ("--grid KEY=[v1,v2,...], one per searched key (a --set path of the recipe, see `surgeon schema`; "
             "list items by index, e.g. surgery.0.lora.rank)")


def parse_grid(items: list[str] | dict | None) -> Grid:
    """``["train.base_lr=[1e-2,1e-3]", ...]`` (or a ``{key: [values]}`` mapping) -> an ordered grid.

    Values are YAML, typed like ``--set`` (``1e-3`` is a float). Every problem is collected and
    raised as one :class:`UserError` (exit 2).
    """
    grid, problems = parse_grid_problems(items)
    if problems:
        raise UserError("bad --grid (nothing was run):\n  " + "\n  ".join(problems), hint=GRID_HINT)
    return grid


def parse_grid_problems(items: list[str] | dict | None) -> tuple[Grid, list[str]]:
    """:func:`parse_grid` without raising: the entries that parse, and one line per problem."""
    problems: list[str] = []
    grid: Grid = {}
    if isinstance(items, dict):
        pairs = [(str(k), v, f"{k}: {v!r}") for k, v in items.items()]
    else:
        pairs = []
        for text in items or []:
            if "=" not in text:
                problems.append(f"--grid {text!r}: expected KEY=[v1,v2,...], e.g. train.base_lr=[1e-3,1e-4]")
                continue
            key, raw = text.split("=", 1)
            try:
                value = yaml.load(raw, Loader=RecipeLoader)
            except yaml.YAMLError as exc:
                problems.append(f"--grid {text!r}: the values are not valid YAML ({getattr(exc, 'problem', exc)})")
                continue
            pairs.append((key.strip(), value, text))
    for key, value, shown in pairs:
        if not key or any(not p for p in key.split(".")):
            problems.append(f"--grid {shown!r}: empty key segment (keys look like train.base_lr)")
            continue
        if key in RESERVED_KEYS:
            problems.append(f"--grid {key}: cannot be searched: {RESERVED_KEYS[key]}")
            continue
        if key in grid:
            problems.append(f"--grid {key}: given twice (put every value in one list)")
            continue
        if not isinstance(value, list) or not value:
            example = f"[{value_text(value)}, ...]" if value is not None and not isinstance(value, (list, dict)) \
                else "[a, b, ...]"
            problems.append(f"--grid {shown!r}: expected a non-empty list of values, e.g. {key}={example}")
            continue
        seen, bad = set(), False
        for v in value:
            try:
                canon = json.dumps(v, sort_keys=True, allow_nan=False)
            except (TypeError, ValueError):
                problems.append(f"--grid {key}: value {v!r} is not a plain number, string, boolean, list or mapping")
                bad = True
                break
            if canon in seen:
                problems.append(f"--grid {key}: value {value_text(v)} is listed twice")
                bad = True
                break
            seen.add(canon)
        if not bad:
            grid[key] = list(value)
    if not grid and not problems:
        problems.append("no --grid given: nothing to search (e.g. --grid train.base_lr=[1e-2,5e-3,1e-3])")
    return grid, problems


def configurations(grid: Grid) -> list[dict]:
    """Every combination, in grid order (the last key varies fastest)."""
    keys = list(grid)
    return [dict(zip(keys, combo)) for combo in itertools.product(*(grid[k] for k in keys))]


# ---------------------------------------------------------------------------- validation

def _problems_of(exc: UserError) -> list[str]:
    if isinstance(exc, RecipeError):
        return [f"{path}: {message}" if path else message for _, path, message, _ in exc.problems]
    return [exc.message]


def validate_grid(recipe: str, grid: Grid, *, model: str | None = None, data: str | None = None,
                  overrides: list[str] | None = None, problems: list[str] | None = None) -> None:
    """Build the recipe with every grid value (then every combination) before anything trains.

    Args:
        problems: problems found earlier (e.g. by :func:`parse_grid_problems`), reported together.

    Raises:
        UserError: listing every problem (bad key path, wrong type, out of range, a combination
            the recipe checks refuse), each naming its ``--grid KEY=VALUE``.
    """
    found = list(problems or []) + grid_problems(recipe, grid, model=model, data=data, overrides=overrides)
    if found:
        shown = found[:40]
        more = f"\n  ... and {len(found) - len(shown)} more" if len(found) > len(shown) else ""
        raise UserError(f"bad --grid for recipe {recipe!r} ({len(found)} problem(s); nothing was run):\n  "
                        + "\n  ".join(shown) + more, hint=GRID_HINT)


def grid_problems(recipe: str, grid: Grid, *, model: str | None = None, data: str | None = None,
                  overrides: list[str] | None = None) -> list[str]:
    """One line per value (or combination) :func:`surgeon.recipe.load_recipe` refuses."""
    base = list(overrides or [])
    problems = []
    for key, values in grid.items():
        for value in values:
            try:
                load_recipe(recipe, base + [override_text(key, value)], model=model, data=data)
            except UserError as exc:
                problems += [f"--grid {key}={value_text(value)}: {p}" for p in _problems_of(exc)]
    n = math.prod(len(v) for v in grid.values())
    if not problems and len(grid) > 1 and n <= MAX_VALIDATED_COMBINATIONS:
        for config in configurations(grid):
            try:
                load_recipe(recipe, base + config_overrides(config), model=model, data=data)
            except UserError as exc:
                problems += [f"--grid combination {config_text(config)}: {p}" for p in _problems_of(exc)]
                if len(problems) >= 20:
                    break
    return problems


def value_problems(recipe: str, key: str, value: Any, *, model: str | None = None, data: str | None = None,
                   overrides: list[str] | None = None) -> list[str]:
    """What :func:`surgeon.recipe.load_recipe` says about one ``key=value`` (empty: valid)."""
    try:
        load_recipe(recipe, list(overrides or []) + [override_text(key, value)], model=model, data=data)
    except UserError as exc:
        return _problems_of(exc)
    return []


# ------------------------------------------------------------------------ edge extension

def numeric_values(values: list) -> bool:
    """A key whose grid can be extended: at least two distinct finite numbers (booleans are not)."""
    return (all(_is_number(v) and math.isfinite(v) for v in values)
            and len(set(values)) >= 2)


def edge_side(values: list, value: Any) -> str | None:
    """``"low"`` / ``"high"`` when ``value`` is the smallest / largest of numeric ``values``."""
    if not numeric_values(values) or not _is_number(value):
        return None
    if value == min(values):
        return "low"
    if value == max(values):
        return "high"
    return None


def next_edge_value(values: list, side: str) -> int | float | None:
    """The value beyond one edge of a numeric grid, at the ratio of the two outermost values.

    ``[1e-2, 5e-3, 1e-3, 5e-4]``: low -> ``2.5e-4``, high -> ``2e-2``; ``[5e-4, 1e-4]`` low ->
    ``2e-5``. When the two outermost values do not share a sign (or one is 0) the step is their
    difference instead (``[0, 1]`` low -> ``-1``). Integer grids stay integers (rounded:
    ``[8, 16]`` high -> ``32``). None when the new value would repeat a grid value or is not finite.
    """
    assert side in ("low", "high"), side
    s = sorted(set(values))
    if len(s) < 2:
        return None
    outer, inner = (s[0], s[1]) if side == "low" else (s[-1], s[-2])
    if outer != 0 and inner != 0 and (outer > 0) == (inner > 0):
        new = outer * (outer / inner)
    else:
        new = outer + (outer - inner)
    if all(isinstance(v, int) for v in s):
        new = int(round(new))
    else:
        new = float(f"{new:.12g}")  # 1e-4 * 0.2 is 2.0000000000000003e-05; users wrote 2e-05
    if not math.isfinite(new) or new in s or new == outer:
        return None
    return new


def extension_count(values: list, base_values: list, side: str) -> int:
    """How many values lie beyond the original grid's edge on ``side``."""
    if side == "low":
        return sum(1 for v in values if v < min(base_values))
    return sum(1 for v in values if v > max(base_values))
