"""Recipes: read (YAML, extends, overrides), validate (schema + checks), fill defaults."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from surgeon.errors import RecipeError

from .checks import static_problems
from .loader import RawRecipe, apply_overrides, read_recipe, resolve_recipe_path
from .schema import fill_defaults, schema_problems

__all__ = ["Recipe", "load_recipe", "resolve_recipe_path"]


@dataclass
class Recipe:
    """A validated recipe: ``data`` is complete (defaults filled) and trusted from here on.

    Attributes:
        data: the resolved recipe.
        origin: field path -> ``file:line:col`` (or ``--set ...``) where it was written.
        source: the recipe file (or ``<dict>``).
    """

    data: dict
    origin: dict = field(default_factory=dict)
    source: str = "<dict>"

    def __getitem__(self, key: str) -> Any:
        return self.data[key]

    @property
    def name(self) -> str:
        return self.data["name"]

    def where(self, path) -> str:
        return RawRecipe(self.data, self.origin, self.source).where(tuple(path))

    def to_yaml(self) -> str:
        """The resolved recipe as YAML (what RUN/recipe.yaml holds)."""
        return yaml.safe_dump(self.data, sort_keys=False, default_flow_style=None)


def load_recipe(
    source: str | Path | dict,
    overrides: dict[str, Any] | list[str] | None = None,
    *,
    model: str | None = None,
    data: str | None = None,
    check_model: bool = True,
) -> Recipe:
    """Read, override and validate a recipe.

    Args:
        source: a recipe file, the name of a built-in recipe, or a dict.
        overrides: ``{"train.epochs": 3, "~regularizers": None}`` or ``["train.epochs=3"]``.
        model: shortcut for ``model.name`` (the CLI's ``--model``).
        data: shortcut for ``data.source`` (the CLI's ``--data``).
        check_model: check that ``model.name`` is a timm model; False skips the one check that
            imports timm/torch (``surgeon show``; the checks against the built model are
            :func:`surgeon.build_model`'s anyway).

    Raises:
        UserError: the file cannot be read or parsed.
        RecipeError: every problem found, each located.
    """
    if isinstance(source, dict):
        raw = RawRecipe(dict(source), {}, "<dict>")
    else:
        raw = read_recipe(resolve_recipe_path(str(source)))
    shortcuts = []
    if model:
        shortcuts.append(f"model.name={model}")
    if data:
        shortcuts.append(f"data.source={data}")
    if shortcuts:
        raw = apply_overrides(raw, shortcuts)
    raw = apply_overrides(raw, overrides)
    problems = schema_problems(raw)
    if problems:
        raise RecipeError(problems)
    resolved = fill_defaults(raw.data)
    problems = static_problems(raw, resolved, check_model=check_model)
    if problems:
        raise RecipeError(problems)
    return Recipe(resolved, raw.origin, raw.source)
