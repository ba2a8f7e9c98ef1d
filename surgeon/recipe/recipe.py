"""The validated recipe: a frozen tree of typed sections, and the one door to it, :func:`load_recipe`."""
from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from surgeon.config import FrozenDict, build, freeze, plain
from surgeon.errors import RecipeError
from surgeon.methods.registry import Rule, parse_rule

from .checks import static_problems
from .loader import RawRecipe, apply_overrides, read_recipe, resolve_recipe_path
from .schema import fill_defaults, schema_problems
from .sections import SECTIONS, DataConfig, EvalConfig, ModelConfig, RegularizersConfig, TrainConfig

#: ``data.source`` schemes whose argument is a local path (made absolute by :meth:`Recipe.with_absolute_paths`).
FILE_SCHEMES = ("imagefolder", "vtab1k", "filelist", "fgvc")


@dataclass(frozen=True)
class Recipe:
    """A validated recipe with every default filled in: trusted, typed and frozen from here on.

    Read it by attribute (``recipe.train.seed``, ``recipe.surgery[0].config.rank``). Resolution
    that depends on the data or the model returns a new recipe (:meth:`with_values`,
    :meth:`with_absolute_paths`) instead of changing this one.

    Attributes:
        name, description: the recipe's identity (``description`` None when not given).
        model, data, regularizers, train, eval: the typed sections (:mod:`surgeon.recipe.sections`).
        surgery: the rules (:class:`~surgeon.methods.registry.Rule`), in order.
        source: the recipe file (or ``<dict>``).
        origin: field path -> ``file:line:col`` (or ``--set ...``) where it was written.
    """

    name: str
    description: str | None
    model: ModelConfig
    data: DataConfig
    surgery: tuple[Rule, ...]
    regularizers: RegularizersConfig
    train: TrainConfig
    eval: EvalConfig
    source: str = "<dict>"
    origin: Mapping = field(default_factory=dict, repr=False, compare=False)
    _mapping: Mapping = field(default_factory=dict, repr=False)

    @classmethod
    def from_mapping(cls, data: dict, origin: dict | None = None, source: str = "<dict>") -> "Recipe":
        """The typed recipe of a schema-valid mapping whose defaults are filled (no checks run)."""
        return cls(name=data["name"], description=data.get("description"),
                   model=build(ModelConfig, data["model"]), data=build(DataConfig, data["data"]),
                   surgery=tuple(parse_rule(rule) for rule in data["surgery"]),
                   regularizers=build(RegularizersConfig, data["regularizers"]),
                   train=build(TrainConfig, data["train"]), eval=build(EvalConfig, data["eval"]),
                   source=source, origin=FrozenDict(origin or {}), _mapping=freeze(data))

    def where(self, path) -> str:
        """Location of ``path`` (or of its closest ancestor that has one), e.g. ``x.yaml:12:5``."""
        return RawRecipe({}, dict(self.origin), self.source).where(tuple(path))

    def to_dict(self) -> dict:
        """The resolved recipe as plain data (a fresh copy), keys in the order they were written."""
        return plain(self._mapping)

    def to_yaml(self) -> str:
        """The resolved recipe as YAML (what RUN/recipe.yaml holds)."""
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    def with_values(self, changes: dict[tuple, Any]) -> "Recipe":
        """A new recipe with the values at the given field paths replaced (or added), e.g.
        ``{("model", "num_classes"): 10}``. For values surgeon resolves itself; not re-validated."""
        data = self.to_dict()
        for path, value in changes.items():
            node = data
            for part in path[:-1]:
                node = node[part]
            node[path[-1]] = value
        return Recipe.from_mapping(data, dict(self.origin), self.source)

    def with_absolute_paths(self) -> "Recipe":
        """A new recipe whose local paths are absolute (``model.pretrained`` files and
        ``local-dir:``, file-based ``data.source``), so a run can be rebuilt and resumed from any
        working directory."""
        changes: dict[tuple, Any] = {}
        pre = self.model.pretrained
        if isinstance(pre, str) and not pre.startswith("builtin:"):
            prefix = "local-dir:" if pre.startswith("local-dir:") else ""
            path = pre.removeprefix(prefix)
            changes[("model", "pretrained")] = prefix + str(Path(os.path.expanduser(path)).absolute())
        scheme, sep, arg = self.data.source.partition(":")
        if sep and scheme.strip().lower() in FILE_SCHEMES and arg.strip():
            arg = os.path.expandvars(os.path.expanduser(arg.strip()))
            changes[("data", "source")] = f"{scheme.strip().lower()}:{Path(arg).absolute()}"
        return self.with_values(changes) if changes else self


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
    recipe = Recipe.from_mapping(fill_defaults(raw.data), raw.origin, raw.source)
    problems = static_problems(recipe, check_model=check_model)
    if problems:
        raise RecipeError(problems)
    return recipe


def section(name: str, partial: dict | None = None):
    """One typed section (``model``, ``data``, ``regularizers``, ``train`` or ``eval``) from a
    partial mapping, the schema's defaults filled in; not validated. For code and tests that need
    one section without a whole recipe."""
    return build(SECTIONS[name], fill_defaults(dict(partial or {}), (name,)))


def rule(partial: dict) -> Rule:
    """A typed surgery rule from a partial rule mapping, the schema's defaults filled in; not
    validated (see :func:`surgeon.recipe.schema.valid_at`)."""
    return parse_rule(fill_defaults(dict(partial), ("surgery", 0)))
