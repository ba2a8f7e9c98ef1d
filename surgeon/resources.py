"""Where the built-in recipes and the schema live, and the package's version.

Both live at the repository root (``recipes/``, ``schemas/``) and are reached through the
symlinks ``surgeon/_recipes`` and ``surgeon/_schemas``, which wheels turn into copies: they
are found the same way from a clone, an editable install or a wheel.
"""
from __future__ import annotations

from pathlib import Path

_PACKAGE = Path(__file__).resolve().parent

#: surgeon's version (``surgeon.__version__``; tests/test_cli_usage.py checks it is pyproject.toml's).
#: Here, in the base layer, so that run records below the package face can name it.
VERSION = "0.1.0"


def recipes_dir() -> Path:
    """Folder holding the built-in ``*.yaml`` recipes."""
    return _PACKAGE / "_recipes"


def builtin_recipes() -> dict[str, Path]:
    """Built-in recipe name (file stem) -> path, sorted by name."""
    return {p.stem: p for p in sorted(recipes_dir().glob("*.yaml"))}


def schema_path() -> Path:
    """The published recipe JSON Schema (written by ``python -m surgeon.recipe.schema_gen``)."""
    return _PACKAGE / "_schemas" / "recipe.schema.json"


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
