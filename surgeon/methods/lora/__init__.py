"""``lora``: LoRA (Hu et al. 2021) and its MoSA variants on Linear / Conv2d layers.

One recipe key, three methods (METHODS.md §1-2, MoSA paper Table 13):

- **LoRA** — ``ΔW = (α/r) · B A``, ``A`` kaiming-uniform(a=√5), ``B`` zero, dropout on the
  LoRA input; ``slices: [q, v]`` adapts only those thirds of a fused qkv Linear (one (A, B)
  pair per slice, as the papers' "LoRA on q and v" = 0.59M at rank 16 on ViT-B/16);
- **MoSL** — the rule has ``experts``: A (down) and/or B (up) are split into N sparse experts
  (:class:`~surgeon.methods.matrices.ExpertSplitMatrix`), one drawn per training forward;
- **SparseLoRA** — the rule has ``prune``: A/B keep a fixed random fraction of their entries.

All three fold into the base weight at merge; the layer is :class:`LoraLayer`.
"""
from __future__ import annotations

import torch.nn as nn

from surgeon.methods.base import Method, PatchContext, register

from .layer import LoraLayer, LowRankLayer, module_problem

__all__ = ["Lora", "LoraLayer", "LowRankLayer"]


@register
class Lora(Method):
    key = "lora"

    def display_name(self, rule: dict) -> str:
        if rule.get("experts") is not None:
            return "mosl"
        if rule.get("prune") is not None:
            return "sparse_lora"
        return "lora"

    def cannot_patch(self, name: str, module: nn.Module, rule: dict) -> str | None:
        return module_problem(module, rule["lora"]["slices"], name)

    def patch(self, name: str, module: nn.Module, ctx: PatchContext) -> nn.Module:
        problem = module_problem(module, ctx.rule["lora"]["slices"], name)
        if problem:  # e.g. an earlier rule already wrapped this module
            raise ValueError(problem)
        layer = LoraLayer(module, ctx)
        layer.target_name = name
        return layer
