"""``lora``: LoRA (Hu et al. 2021) and, composed onto it, MoSL (``experts``) and SparseLoRA
(``prune``): config, schema, checks, description."""
from __future__ import annotations

from dataclasses import dataclass

from surgeon.methods.registry import MethodSpec, Rule, fmt_number


@dataclass(frozen=True)
class LoraConfig:
    """A rule's ``lora`` section (see :data:`SCHEMA`)."""

    rank: int
    alpha: float | None
    dropout: float
    slices: tuple[str, ...] | None


SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "description": "LoRA: W + (alpha/rank) * B A on a Linear (or Conv2d) layer; A kaiming-uniform, B zero.",
    "properties": {
        "rank": {"type": "integer", "minimum": 1, "default": 16, "description": "r."},
        "alpha": {
            "type": ["number", "null"],
            "exclusiveMinimum": 0,
            "default": None,
            "description": "Scale numerator; null = rank (scale 1).",
        },
        "dropout": {
            "type": "number",
            "minimum": 0,
            "exclusiveMaximum": 1,
            "default": 0.0,
            "description": (
                "Dropout on the LoRA input (training only; not applied where a parent reads the weight directly, "
                "e.g. BEiT/EVA-02/SwinV2 qkv)."
            ),
        },
        "slices": {
            "type": ["array", "null"],
            "items": {"type": "string", "enum": ["q", "k", "v"]},
            "uniqueItems": True,
            "minItems": 1,
            "default": None,
            "description": (
                "On a fused qkv Linear, adapt only these thirds of the output (e.g. [q, v]); null = the whole "
                "layer."
            ),
        },
    },
}


class LoraSpec(MethodSpec):
    key = "lora"
    schema = SCHEMA
    config_type = LoraConfig
    modifiers = frozenset({"experts", "prune"})
    matrix_names = ("A", "B")
    matrix_biases = False

    def display_name(self, rule: Rule) -> str:
        if rule.experts is not None:
            return "mosl"
        if rule.prune is not None:
            return "sparse_lora"
        return "lora"

    def is_stochastic(self, rule: Rule) -> bool:
        return rule.config.dropout > 0

    def describe(self, rule: Rule) -> str:
        lo = rule.config
        alpha = lo.alpha or lo.rank
        text = f"LoRA rank {lo.rank}, α {fmt_number(alpha)} (scale {alpha / lo.rank:g})"
        if lo.dropout:
            text += f", input dropout {fmt_number(lo.dropout)}"
        if lo.slices:
            text += f", on the {', '.join(lo.slices)} slices of the fused layer"
        return text


SPEC = LoraSpec()
