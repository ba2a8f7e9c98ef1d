"""A rule's ``target``: module-name selectors, or a *semantic target* that names what it means.

Selectors (globs and ``re:`` patterns over dotted module names) say where a module is in one
architecture. A semantic target says what it is, and :mod:`surgeon.surgery.targets` finds it
in whichever backbone the recipe is applied to::

    target: {attention: [q, v]}          # the query and value projections of every attention
    target: {attention: qkv}             # every q/k/v projection layer, each as a whole
    target: {attention: block}           # every attention module (for adapters)
    target: {mlp: block}                 # every block's MLP (its feed-forward sub-layer)
    target: {mlp: [fc1, fc2]}            # the MLP's input and output layers
    target: {mlp: norm}                  # the norm in front of every MLP
    target: {blocks: "0:6"}              # the first six blocks, whole
    target: {attention: [q, v], mlp: block, blocks: "-4:"}   # combined: union, last four blocks

Keys:

- ``attention``: ``block`` (the module), ``qkv`` (its query/key/value projection layers, each
  adapted as a whole: one fused ``qkv`` layer, or ``q``/``k``/``v``, or ``q`` + a fused ``kv``),
  ``norm`` (the norm in front of it), or a list of parts from ``q``, ``k``, ``v``, ``proj``
  (the output projection): on a fused layer a part is a slice of its output rows (the rows the
  attention uses as queries, ...), so LoRA gets one (A, B) pair per part, as ``slices`` gives.
- ``mlp``: ``block`` (the module), ``norm`` (the norm in front of it), or parts from ``fc1``
  (the input layer, both halves of a gated MLP) and ``fc2`` (the output layer). In a
  convolutional block that has no MLP and keeps its input's shape (a residual unit of a CNN
  stage) the block itself is its feed-forward sub-layer: ``{mlp: block}`` is that block.
- ``blocks``: which blocks, in depth order over the whole network: ``"a:b"`` as a Python
  slice (``"0:6"``, ``"-4:"``), one index, or ``all``. Alone it targets the blocks themselves;
  with ``attention``/``mlp`` it keeps the ones inside those blocks.

This module is import-light (the recipe layer): the dataclass a target becomes, its schema,
its text. Resolving one against a model is :func:`surgeon.surgery.targets.resolve_target`.
"""
from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

ATTENTION_WORDS = ("block", "qkv", "norm")
ATTENTION_PARTS = ("q", "k", "v", "proj")
MLP_WORDS = ("block", "norm")
MLP_PARTS = ("fc1", "fc2")
BLOCK_RANGE = re.compile(r"^(all|-?\d+|-?\d*:-?\d*)$")


@dataclass(frozen=True)
class SemanticTarget:
    """A validated semantic target (see the module docstring).

    Attributes:
        attention: ``block``, ``qkv``, ``norm``, a tuple of parts (``q``, ``k``, ``v``, ``proj``) or None.
        mlp: ``block``, ``norm``, a tuple of parts (``fc1``, ``fc2``) or None.
        blocks: ``a:b`` / ``all`` / an index as written (a string or an int), or None (every block).
    """

    attention: str | tuple[str, ...] | None = None
    mlp: str | tuple[str, ...] | None = None
    blocks: str | int | None = None

    @property
    def block_slice(self) -> slice | int | None:
        """``blocks`` as a Python ``slice`` (or one index); None for every block."""
        return parse_blocks(self.blocks)

    def text(self) -> str:
        """The target as a flow mapping, e.g. ``{attention: [q, v], blocks: 0:6}``."""
        items = []
        for key in ("attention", "mlp", "blocks"):
            value = getattr(self, key)
            if value is None:
                continue
            items.append(f"{key}: " + (f"[{', '.join(value)}]" if isinstance(value, tuple) else str(value)))
        return "{" + ", ".join(items) + "}"

    def sliced_parts(self) -> tuple[str, ...]:
        """The q/k/v parts asked for (they may be slices of a fused layer)."""
        return tuple(p for p in self.attention if p in ("q", "k", "v")) if isinstance(self.attention, tuple) else ()


def parse_blocks(value) -> slice | int | None:
    """``"0:6"`` → ``slice(0, 6)``, ``"3"``/``3`` → ``3``, ``all``/None → None."""
    if value is None or value == "all":
        return None
    if isinstance(value, int):
        return value
    if ":" not in value:
        return int(value)
    start, _, stop = value.partition(":")
    return slice(int(start) if start else None, int(stop) if stop else None)


def _parts(value, words: tuple[str, ...]) -> str | tuple[str, ...]:
    if isinstance(value, str):
        return value if value in words else (value,)
    return tuple(value)


def build_target(target):
    """The typed form of a validated ``target``: a string, a tuple of strings, or a :class:`SemanticTarget`."""
    if isinstance(target, str | SemanticTarget):
        return target
    if isinstance(target, Mapping):
        return SemanticTarget(
            attention=None if target.get("attention") is None else _parts(target["attention"], ATTENTION_WORDS),
            mlp=None if target.get("mlp") is None else _parts(target["mlp"], MLP_WORDS),
            blocks=target.get("blocks"))
    return tuple(target)


def target_text(target) -> str:
    """A target as plans and messages show it: the selector, selectors joined by ``, ``, or the mapping."""
    if isinstance(target, SemanticTarget):
        return target.text()
    if isinstance(target, Mapping):
        return build_target(target).text()
    return target if isinstance(target, str) else ", ".join(target)


def target_markdown(target) -> str:
    """A target in reports: each selector in backticks, or the mapping in backticks."""
    if isinstance(target, SemanticTarget | Mapping):
        return f"`{target_text(target)}`"
    return ", ".join(f"`{t}`" for t in target) if isinstance(target, tuple | list) else f"`{target}`"


def _one_or_list(words: tuple[str, ...], parts: tuple[str, ...], what: str) -> dict:
    return {"oneOf": [
        {"type": "string", "enum": list(words + parts)},
        {"type": "array", "items": {"type": "string", "enum": list(parts)}, "uniqueItems": True, "minItems": 1},
    ], "description": what}


SEMANTIC_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "minProperties": 1,
    "description": (
        "A semantic target: what to patch by meaning, found in any timm backbone (`surgeon plan` shows what it "
        "resolved to). Keys combine: attention and mlp select the union, blocks keeps those in the chosen blocks."
    ),
    "properties": {
        "attention": _one_or_list(ATTENTION_WORDS, ATTENTION_PARTS, (
            "`block`: every attention module; `qkv`: its query/key/value projection layers, each whole (a fused "
            "qkv, separate q/k/v, or q + a fused kv); `norm`: the norm in front of it; parts from q, k, v, proj: "
            "those projections, as slices of the output rows where q/k/v are fused (one low-rank pair per part).")),
        "mlp": _one_or_list(MLP_WORDS, MLP_PARTS, (
            "`block`: every block's MLP (in a CNN block without one that keeps its input's shape, the block "
            "itself); `norm`: the norm in front of it; parts fc1 (the input layer, both halves of a gated MLP) "
            "and fc2 (the output layer).")),
        "blocks": {
            "oneOf": [{"type": "string", "pattern": BLOCK_RANGE.pattern}, {"type": "integer"}],
            "description": (
                "Blocks in depth order over the whole network: `a:b` as a Python slice (`0:6`, `-4:`), one index, or "
                "`all`. Alone: the blocks themselves; with attention/mlp: only those inside these blocks."),
        },
    },
}

TARGET_SCHEMA = {
    "description": (
        "What to patch. A glob over dotted module names (`model.named_modules()`): `*` = one name segment, `**` = any "
        "number of segments (also none), `{a,b}` alternatives, `{0..5}` an integer range; or a regular expression "
        "prefixed with `re:` (full match). A list selects the union. Or a semantic target, e.g. `{attention: [q, v]}`,"
        " `{mlp: block}`, `{blocks: \"0:6\"}`, resolved for whichever backbone the recipe runs on."
    ),
    "oneOf": [
        {"type": "string", "minLength": 1},
        {"type": "array", "minItems": 1, "items": {"type": "string", "minLength": 1}},
        SEMANTIC_SCHEMA,
    ],
}

__all__ = ["ATTENTION_PARTS", "ATTENTION_WORDS", "MLP_PARTS", "MLP_WORDS", "SEMANTIC_SCHEMA", "SemanticTarget",
           "TARGET_SCHEMA", "build_target", "parse_blocks", "target_markdown", "target_text"]
