"""``adapter``: bottleneck adapters — AdaptFormer, Pfeiffer, Houlsby — and, composed onto them,
MoSA (``experts``) and SparseAdapter (``prune``): config, schema, checks, description."""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from surgeon.methods.modifiers import is_expert_split
from surgeon.methods.registry import MethodSpec, Rule, fmt_number


@dataclass(frozen=True)
class AdapterConfig:
    """A rule's ``adapter`` section (see :data:`SCHEMA`)."""

    placement: str
    bottleneck: int
    activation: str
    layernorm: bool
    scale: float
    learnable_scale: bool
    dropout: float
    input_from: str | tuple[str, ...] | Mapping | None


SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "description": "Bottleneck adapter x -> s * W_up(act(W_down(LN?(x)))); W_down kaiming-uniform, W_up zero-init.",
    "properties": {
        "placement": {
            "type": "string",
            "enum": ["parallel", "sequential"],
            "default": "parallel",
            "description": (
                "`parallel` M(u) + s*A(u) (AdaptFormer); `sequential` v = M(u); v + s*A(v) (Pfeiffer, Houlsby)."
            ),
        },
        "bottleneck": {
            "type": "integer",
            "minimum": 1,
            "default": 64,
            "description": "Hidden size of the adapter.",
        },
        "activation": {
            "type": "string",
            "enum": ["gelu", "relu", "silu"],
            "default": "gelu",
            "description": "Non-linearity between down and up projection.",
        },
        "layernorm": {
            "type": "boolean",
            "default": False,
            "description": (
                "LayerNorm (trainable affine, eps 1e-6) on the adapter's input (Pfeiffer; the published MoSA "
                "AdaptFormer). Default false."
            ),
        },
        "scale": {"type": "number", "default": 0.1, "description": "s, the output scale (AdaptFormer 0.1)."},
        "learnable_scale": {
            "type": "boolean",
            "default": False,
            "description": "Make s a trainable scalar initialised to `scale`.",
        },
        "dropout": {
            "type": "number",
            "minimum": 0,
            "exclusiveMaximum": 1,
            "default": 0.0,
            "description": (
                "Dropout on the bottleneck activation (after the non-linearity, before the up-projection; training"
                " only). The published MoSA/AdaptFormer adapters use 0.1. Default 0."
            ),
        },
        "input_from": {
            "default": None,
            "oneOf": [
                {"type": "null"},
                {"type": "string", "minLength": 1},
                {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
                {"type": "object", "additionalProperties": False, "minProperties": 1, "maxProperties": 1,
                 "properties": {"mlp": {"const": "norm"}, "attention": {"const": "norm"}}},
            ],
            "description": (
                "Parallel adapters only: read the input of a sibling module (same parent) instead of the target's "
                "own input: a name, or a list of names of which the first the parent has is used. E.g. [norm2, "
                "norm] on target `**.blocks.*.mlp` = the residual stream in front of the MLP's norm (norm2 in "
                "ViT/Swin/EVA/BEiT blocks, norm in ConvNeXt blocks), as the published MoSA AdaptFormer (with "
                "`layernorm: true`, its own LayerNorm). Or semantically, `{mlp: norm}` (or `{attention: norm}`): "
                "the input of the norm the block calls right before the targeted MLP (attention), whatever its "
                "name; where there is none (post-norm SwinV2, LeViT, a CNN block) the target's own input, which is "
                "then the residual stream itself. Default null: the target's input."
            ),
        },
    },
}


ACTIVATION_NAMES = {"gelu": "GELU", "relu": "ReLU", "silu": "SiLU"}


class AdapterSpec(MethodSpec):
    key = "adapter"
    schema = SCHEMA
    config_type = AdapterConfig
    modifiers = frozenset({"experts", "prune"})

    def display_name(self, rule: Rule) -> str:
        if is_expert_split(rule.experts):
            return "mosa"
        if rule.prune is not None:
            return "sparse_adapter"
        return "adapter"

    def problems(self, rule: Rule, at: tuple, where) -> list:
        cfg = rule.config
        if cfg.input_from and cfg.placement != "parallel":
            return [(where(at + ("adapter", "input_from")), f"surgery.{at[1]}.adapter.input_from",
                     "input_from applies to parallel adapters (a sequential adapter reads its module's output)",
                     "remove input_from, or use placement: parallel")]
        return []

    def describe(self, rule: Rule) -> str:
        a = rule.config
        inner = [f"hidden {a.bottleneck}", ACTIVATION_NAMES.get(a.activation, a.activation)]
        if a.layernorm:
            inner.append("LayerNorm on its input")
        inner.append(f"scale {fmt_number(a.scale)}" + (" (learnable)" if a.learnable_scale else ""))
        return f"{a.placement} bottleneck adapter ({', '.join(inner)})"


SPEC = AdapterSpec()
