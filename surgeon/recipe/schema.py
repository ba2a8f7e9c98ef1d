"""The recipe JSON Schema: assembled from the sections and the method registry, then used to
validate a recipe (every problem at once, each at its YAML line, with hints) and to fill in its
defaults so that code past this point reads complete data.

``schemas/recipe.schema.json`` is the published copy of :func:`recipe_schema`, written by
``python -m surgeon.recipe.schema_gen`` (a test fails when it is out of date).
"""
from __future__ import annotations

import copy
import difflib
from functools import lru_cache
from typing import Any

import jsonschema

from surgeon.methods.modifiers import MODIFIERS
from surgeon.methods.registry import method_specs

from . import sections as s
from .loader import RawRecipe


def _one_of(keys: list[str]) -> str:
    quoted = [f"`{k}`" for k in keys]
    return ", ".join(quoted[:-1]) + f" or {quoted[-1]}" if len(quoted) > 1 else quoted[0]


@lru_cache(maxsize=1)
def recipe_schema() -> dict:
    """The recipe JSON Schema (draft 2020-12): the sections of :mod:`surgeon.recipe.sections`,
    ``surgery`` rules made of every registered method's fragment and the modifiers'."""
    specs = method_specs()
    keys = list(specs)
    surgery = {
        "type": "array",
        "default": [],
        "description": (f"Target rules, applied in order. Each rule selects modules by name and gives them exactly "
                        f"one method: {_one_of(keys)}. An empty list is linear probing (only the head trains)."),
        "items": {"$ref": "#/$defs/rule"},
    }
    defs: dict[str, Any] = {"selector": s.SELECTOR_SCHEMA}
    defs.update({name: fragment for name, (_, fragment) in MODIFIERS.items()})
    rule_methods = {}
    for key, spec in specs.items():
        if spec.schema.get("type") == "object":
            defs[key] = spec.schema
            rule_methods[key] = {"$ref": f"#/$defs/{key}"}
        else:
            rule_methods[key] = spec.schema
    defs["rule"] = {
        "type": "object",
        "additionalProperties": False,
        "required": ["target"],
        "description": f"One target rule; exactly one of {', '.join(keys)}.",
        "properties": {"target": {"$ref": "#/$defs/selector"}, **rule_methods,
                       **{name: {"$ref": f"#/$defs/{name}"} for name in MODIFIERS}},
        "oneOf": [{"required": [key]} for key in keys],
    }
    properties = {"name": s.NAME_SCHEMA, "description": s.DESCRIPTION_SCHEMA, "extends": s.EXTENDS_SCHEMA,
                  "model": s.MODEL_SCHEMA, "data": s.DATA_SCHEMA, "surgery": surgery,
                  "regularizers": s.REGULARIZERS_SCHEMA, "train": s.TRAIN_SCHEMA, "eval": s.EVAL_SCHEMA}
    return copy.deepcopy({**s.FRAME, "properties": properties, "$defs": defs})


@lru_cache(maxsize=1)
def _validator() -> jsonschema.Draft202012Validator:
    return jsonschema.Draft202012Validator(recipe_schema())


def _dotted(path) -> str:
    return ".".join(str(p) for p in path) or "(recipe)"


def _subschema_at(path) -> dict | None:
    """The schema node describing ``path`` (used for did-you-mean hints)."""
    schema = recipe_schema()
    node = schema
    for part in path:
        node = _deref(node, schema)
        if isinstance(part, int):
            node = node.get("items", {})
        else:
            node = node.get("properties", {}).get(part, {})
    return _deref(node, schema)


def _deref(node: dict, schema: dict) -> dict:
    while isinstance(node, dict) and "$ref" in node:
        ref = node["$ref"].removeprefix("#/").split("/")
        node = schema
        for part in ref:
            node = node[part]
    return node


def _best(errors):
    """For oneOf/anyOf failures keep the most specific sub-error (jsonschema's heuristic)."""
    return jsonschema.exceptions.best_match(errors)


def _describe(error: jsonschema.ValidationError, raw: RawRecipe) -> list[tuple[str, str, str, str | None]]:
    path = tuple(error.absolute_path)
    where = raw.where(path)
    if error.validator == "additionalProperties":
        allowed = sorted((_subschema_at(path) or {}).get("properties", {}))
        extra = [k for k in error.instance if k not in allowed] if isinstance(error.instance, dict) else []
        out = []
        for key in extra:
            close = difflib.get_close_matches(key, allowed, n=1, cutoff=0.6)
            hint = f"did you mean '{close[0]}'?" if close else f"allowed here: {', '.join(allowed)}"
            out.append((raw.where(path + (key,)), _dotted(path + (key,)), f"unknown field '{key}'", hint))
        return out
    if error.validator == "required":
        return [(where, _dotted(path), error.message.replace("'", "", 0), None)]
    if error.validator == "oneOf" and path and path[-2:-1] == ("surgery",):
        methods = list(method_specs())
        given = [m for m in methods if isinstance(error.instance, dict) and m in error.instance]
        if len(given) != 1:
            msg = ("a surgery rule needs exactly one method" if not given
                   else f"a surgery rule takes exactly one method, got {' and '.join(given)}")
            return [(where, _dotted(path), msg, f"one of: {', '.join(methods)}")]
    if error.validator in ("oneOf", "anyOf") and error.context:
        sub = _best(error.context)
        return [(raw.where(tuple(sub.absolute_path)) if sub.absolute_path else where,
                 _dotted(sub.absolute_path or path), sub.message, None)]
    hint = None
    if error.validator == "enum":
        hint = "choose one of: " + ", ".join(map(str, error.validator_value))
    elif error.validator == "type":
        hint = f"expected {error.validator_value}"
    message = error.message
    if len(message) > 200:
        message = message[:200] + "..."
    return [(where, _dotted(path), message, hint)]


def schema_problems(raw: RawRecipe) -> list[tuple[str, str, str, str | None]]:
    """All schema violations of ``raw``, sorted by location: ``(where, field, message, hint)``."""
    problems = []
    for error in _validator().iter_errors(raw.data):
        problems.extend(_describe(error, raw))
    seen, unique = set(), []
    for p in problems:
        if p not in seen:
            seen.add(p)
            unique.append(p)
    return sorted(unique, key=lambda p: _sort_key(p[0]))


def _sort_key(where: str):
    parts = where.rsplit(":", 2)
    if len(parts) == 3 and parts[1].isdigit():
        return (parts[0], int(parts[1]), int(parts[2]) if parts[2].isdigit() else 0)
    return (where, 0, 0)


def fill_defaults(data: dict, path: tuple = ()) -> dict:
    """A copy of schema-valid ``data`` (the whole recipe, or the node at ``path``, e.g.
    ``("train",)`` or ``("surgery", 0)``) with every defaulted field present."""
    schema = recipe_schema()
    return _fill(copy.deepcopy(data), _subschema_at(path), schema)


def _fill(instance: Any, node: dict, schema: dict) -> Any:
    node = _deref(node, schema)
    if isinstance(instance, dict):
        for key, sub in node.get("properties", {}).items():
            sub = _deref(sub, schema)
            if key not in instance and "default" in sub:
                instance[key] = copy.deepcopy(sub["default"])
            if key in instance:
                instance[key] = _fill(instance[key], sub, schema)
    elif isinstance(instance, list) and "items" in node:
        instance = [_fill(item, node["items"], schema) for item in instance]
    return instance


def valid_at(path: tuple, value: Any) -> bool:
    """Whether ``value`` is valid for the schema node at ``path`` (e.g. ``("surgery", 0)``)."""
    schema = recipe_schema()
    node = {**_subschema_at(path), "$defs": schema["$defs"]}
    return jsonschema.Draft202012Validator(node).is_valid(value)
