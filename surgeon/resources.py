"""Where the built-in recipes and the schema live.

Both live at the repository root (``recipes/``, ``schemas/``) and are reached through the
symlinks ``surgeon/_recipes`` and ``surgeon/_schemas``, which wheels turn into copies: they
are found the same way from a clone, an editable install or a wheel.
"""
from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent


def recipes_dir() -> Path:
    """Folder holding the built-in ``*.yaml`` recipes."""
    return _PACKAGE / "_recipes"


def builtin_recipes() -> dict[str, Path]:
    """Built-in recipe name (file stem) -> path, sorted by name."""
    return {p.stem: p for p in sorted(recipes_dir().glob("*.yaml"))}


def schema_path() -> Path:
    return _PACKAGE / "_schemas" / "recipe.schema.json"


@lru_cache(maxsize=1)
def recipe_schema() -> dict:
    """The recipe JSON Schema (draft 2020-12) as a dict."""
    return json.loads(schema_path().read_text())


def suites_dir() -> Path:
    """Folder holding the built-in suite files (``suites/*.yaml``)."""
    return _PACKAGE / "_suites"


def builtin_suite(ref: str) -> Path:
    """A suite file path, or a built-in suite name (``demo``, ``cpu_repro``, ``vtab1k``)."""
    path = Path(ref)
    if path.exists():
        return path
    candidate = suites_dir() / f"{ref.removesuffix('.yaml')}.yaml"
    return candidate if candidate.exists() else path
