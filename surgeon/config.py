"""Typed, frozen configuration objects built from validated mappings.

A recipe is validated against its JSON Schema and its defaults are filled in once; then
:func:`build` turns each section into a frozen dataclass, so the rest of surgeon reads
attributes (``recipe.train.seed``) of objects nobody can change. Lists become tuples and
mappings read-only; :func:`plain` turns any of them back into builtin dicts and lists (for JSON
and YAML, and for third-party calls that expect lists).

Conventions of the dataclasses built here:

- every field is a key of the validated mapping; the schema filled its default, so the
  dataclass restates none;
- a field with a Python default (always ``None``) is a key the schema leaves absent when it
  is not given (``model.num_classes``, a rule's ``experts``);
- a field whose type is a dataclass (or ``X | None`` of one) is built recursively.
"""
from __future__ import annotations

import copy
import dataclasses
import typing
from collections.abc import Mapping
from functools import lru_cache
from typing import Any


class FrozenDict(dict):
    """A dict that refuses changes; it still pickles, deep-copies and serialises to JSON like a
    dict (a recipe travels with a loaded model, ``model.surgeon_recipe``)."""

    def _refuse(self, *args, **kwargs):
        raise TypeError("a recipe's mappings are read-only: build a new recipe (Recipe.with_values)")

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = __ior__ = _refuse

    def __reduce__(self):
        return (FrozenDict, (dict(self),))

    def __deepcopy__(self, memo):
        return FrozenDict(copy.deepcopy(dict(self), memo))

    def __repr__(self) -> str:
        return f"FrozenDict({dict.__repr__(self)})"


def freeze(value: Any) -> Any:
    """Lists → tuples, dicts → read-only :class:`FrozenDict`, recursively; other values as they are."""
    if isinstance(value, (list, tuple)):
        return tuple(freeze(v) for v in value)
    if isinstance(value, Mapping):
        return FrozenDict({k: freeze(v) for k, v in value.items()})
    return value


def plain(value: Any) -> Any:
    """The inverse of :func:`freeze` (dataclasses become dicts of their fields): builtin dicts and
    lists that JSON, YAML and third-party code accept."""
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, Mapping):
        return {k: plain(v) for k, v in value.items()}
    return value


@lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _dataclass_in(tp: Any) -> type | None:
    """The dataclass ``tp`` names, directly or as a member of a union (``X | None``)."""
    if dataclasses.is_dataclass(tp):
        return tp
    for member in typing.get_args(tp):
        if dataclasses.is_dataclass(member):
            return member
    return None


def build(cls: type, data: Mapping) -> Any:
    """A frozen ``cls`` from a validated mapping (see the module docstring).

    Raises:
        AssertionError: a key is missing or unknown — the schema lets neither through, so this
            is a bug in surgeon, not a user's mistake.
    """
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(data) - names
    assert not unknown, f"{cls.__name__}: fields {sorted(unknown)} are not in the dataclass"
    hints = _hints(cls)
    kwargs = {}
    for f in dataclasses.fields(cls):
        if f.name not in data:
            assert f.default is not dataclasses.MISSING, f"{cls.__name__}.{f.name} missing after validation"
            continue
        value = data[f.name]
        sub = _dataclass_in(hints[f.name])
        kwargs[f.name] = build(sub, value) if sub is not None and isinstance(value, Mapping) else freeze(value)
    return cls(**kwargs)
