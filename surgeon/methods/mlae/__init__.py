"""``mlae``: Masked LoRA Experts (Wang et al. 2024; METHODS.md §3).

``ΔW = Σ_j m_j λ_j b_j a_jᵀ`` on a Linear/Conv2d (every block's ``attn.qkv`` in the paper),
``rank`` = E·k with E experts of rank ``expert_rank`` = k, coefficients λ trainable.

Masking (``mlae.masking.strategy``, paper Table 4):

- ``stochastic``: per training forward and layer each expert is kept with probability 1-p
  (draws from the model's seeded sampler), kept ones scaled 1/(1-p); eval uses all experts
  unscaled. ``p`` is one number or one per matched layer.
- ``fixed``: per-layer expert counts (``pattern`` or ``counts``, see :mod:`.allocation`); the
  masked experts do not exist (no parameters). A layer with 0 experts is left unpatched.
- ``mixed``: the fixed allocation plus stochastic masking with one p.
- ``none``: plain cellular decomposition (all experts, λ trainable).

Merging folds ``ΔW`` (all experts, λ, no mask scaling) into the base weight.
"""
from __future__ import annotations

import torch.nn as nn

from surgeon.methods.base import Method, PatchContext, register
from surgeon.methods.lora.layer import module_problem

from .allocation import PATTERNS, layer_drop_probability, layer_expert_counts, pattern_counts
from .layer import MlaeLayer
from .similarity import cosine_matrix, expert_similarity

__all__ = ["PATTERNS", "Mlae", "MlaeLayer", "cosine_matrix", "expert_similarity", "pattern_counts"]


@register
class Mlae(Method):
    key = "mlae"

    def cannot_patch(self, name: str, module: nn.Module, rule: dict) -> str | None:
        return module_problem(module, rule["mlae"]["slices"], name)

    def patch(self, name: str, module: nn.Module, ctx: PatchContext) -> nn.Module:
        cfg = ctx.rule["mlae"]
        problem = module_problem(module, cfg["slices"], name)
        if problem:  # e.g. an earlier rule already wrapped this module
            raise ValueError(problem)
        if cfg["rank"] % cfg["expert_rank"]:
            raise ValueError(f"mlae.expert_rank {cfg['expert_rank']} does not divide rank {cfg['rank']}")
        masking = cfg["masking"]
        strategy = masking["strategy"]
        mean_experts = cfg["rank"] // cfg["expert_rank"]
        if strategy in ("fixed", "mixed"):
            counts = layer_expert_counts(masking, ctx.num_layers, mean_experts, ctx.sampler.seed, ctx.rule_index)
            experts = counts[ctx.layer_index]
        else:
            experts = mean_experts
        p = layer_drop_probability(masking["p"], ctx.num_layers, ctx.layer_index) \
            if strategy in ("stochastic", "mixed") else 0.0
        if experts == 0:
            return module  # masked away entirely: nothing to add (see allocation.py)
        layer = MlaeLayer(module, num_experts=experts, expert_rank=cfg["expert_rank"],
                          coefficient_init=cfg["coefficient_init"], p=p, slices=cfg["slices"],
                          sampler=ctx.sampler, generator=ctx.init_generator)
        layer.target_name = name
        return layer
