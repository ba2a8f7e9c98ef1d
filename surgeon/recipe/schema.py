"""The recipe JSON Schema: assembled from the sections and the method registry, then used to
validate a recipe (every problem at once, each at its YAML line, with hints) and to fill in its
defaults so that code past this point reads complete data.

``schemas/recipe.schema.json`` is the published copy of :func:`recipe_schema`, written by
``python -m surgeon.recipe.schema_gen`` (a test fails when it is out of date).
"""
from __future__ import annotations

import copy
import difflib
import math
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


_TYPE_WORDS = {"null": "null", "boolean": "true or false", "integer": "an integer", "number": "a number",
               "string": "a string", "object": "a mapping", "array": "a list"}
_PLURAL = {"integer": "integers", "number": "numbers", "string": "strings", "object": "mappings",
           "boolean": "booleans", "array": "lists"}


def _accepts(branch: dict) -> str:
    """What one alternative of a oneOf/anyOf accepts, in words: "a number", "a list of strings"."""
    branch = _deref(branch, recipe_schema())
    types = branch.get("type")
    if types is None:
        return "a value of another form" if "enum" not in branch else "one of " + ", ".join(map(str, branch["enum"]))
    types = [types] if isinstance(types, str) else list(types)
    words = []
    for t in types:
        if t == "array":
            item = _deref(branch.get("items", {}), recipe_schema()).get("type")
            words.append(f"a list of {_PLURAL.get(item, 'values')}" if isinstance(item, str) else "a list")
        else:
            words.append(_TYPE_WORDS.get(t, t))
    return " or ".join(words)


def _alternatives(error: jsonschema.ValidationError):
    """The sub-error to report for a failed oneOf/anyOf, or None when no alternative has the
    instance's type (then the caller says what is accepted).

    An alternative whose type fits the instance failed for a reason worth naming (``1.5`` is
    above a maximum); the type errors of the other alternatives ("is not of type 'array'") are
    noise.
    """
    by_branch: dict[int, list] = {}
    for sub in error.context:
        by_branch.setdefault(sub.relative_schema_path[0], []).append(sub)
    fitting = [e for errs in by_branch.values()
               if not any(e.validator == "type" and not e.relative_path for e in errs) for e in errs]
    return _best(fitting) if fitting else None


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
        sub = _alternatives(error)
        if sub is None:
            accepted = [_accepts(b) for b in error.validator_value]
            text = ", ".join(accepted[:-1]) + f" or {accepted[-1]}" if len(accepted) > 1 else accepted[0]
            return [(where, _dotted(path), f"{_short(error.instance)} is not accepted here: expected {text}", None)]
        if sub.validator in ("oneOf", "anyOf") and sub.context:
            return _describe(sub, raw)
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


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def nonfinite_problems(raw: RawRecipe) -> list[tuple[str, str, str, str | None]]:
    """Every NaN or infinite number anywhere in the recipe (``.nan``, ``.inf``, ``1e400``), located.

    JSON Schema bounds cannot refuse them (NaN compares false with every bound, so ``minimum: 0``
    lets it through), and no field of a recipe means anything with one.
    """
    problems = []
    stack = [((), raw.data)]
    while stack:
        path, node = stack.pop()
        if isinstance(node, float) and not math.isfinite(node):
            written = "NaN" if node != node else ("-" if node < 0 else "") + "infinity"
            problems.append((raw.where(path), _dotted(path), f"{written} is not a finite number",
                             "write a finite number (YAML reads .nan/.inf, and numbers too large for a float such as "
                             "1e400, as non-finite)"))
        elif isinstance(node, dict):
            stack.extend((path + (k,), v) for k, v in node.items())
        elif isinstance(node, list):
            stack.extend((path + (i,), v) for i, v in enumerate(node))
    return problems


def schema_problems(raw: RawRecipe) -> list[tuple[str, str, str, str | None]]:
    """All schema violations of ``raw``, sorted by location: ``(where, field, message, hint)``."""
    problems = nonfinite_problems(raw)
    nonfinite = {p[1] for p in problems}
    for error in _validator().iter_errors(raw.data):
        if _dotted(error.absolute_path) not in nonfinite:  # "-inf is less than the minimum of 0": said already
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
    types = node.get("type", ())
    types = [types] if isinstance(types, str) else types
    if isinstance(instance, float) and "integer" in types and "number" not in types and instance.is_integer():
        # `bottleneck: 4e9`, `max_steps: 1e4`: JSON Schema counts an integral float as an integer;
        # the code past this point gets a real int (a float size is a TypeError deep in torch).
        return int(instance)
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
