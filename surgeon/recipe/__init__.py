"""Recipes: read (YAML, extends, overrides), validate (schema + checks), fill defaults, type.

``load_recipe`` returns a frozen :class:`Recipe`; :func:`section` and :func:`rule` build one
typed part from a partial mapping (schema defaults filled).
"""
from __future__ import annotations

from .loader import resolve_recipe_path
from .recipe import Recipe, load_recipe, rule, section

__all__ = ["Recipe", "load_recipe", "resolve_recipe_path", "rule", "section"]
