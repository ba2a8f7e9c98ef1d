"""``mlae``: a :class:`~surgeon.methods.lowrank.LowRankLayer` whose rank-k blocks are experts with
learnable coefficients λ (and, with stochastic/mixed masking, expert dropout).

Initialisation: ``B = 0``, ``λ = coefficient_init``, ``A ~ N(0, σ²)`` i.i.d. with
``σ = 1/√(3·fan_in)``. The paper only says "random Gaussian" (its official code is not
public here); we take the Gaussian with the variance of LoRA's kaiming-uniform(a=√5) init.
Reason: with ``B = 0`` the scale of A is the effective learning rate of the delta (an Adam
step on B moves ``ΔW`` by ≈ lr·|A|), so matching LoRA keeps the paper's lr (5e-4, tuned
against LoRA-style implementations) meaningful and makes MLAE-vs-LoRA comparisons differ
only in the decomposition and masking. Each row is an independent draw, so every expert
starts from its own state as the paper requires.

``ΔW = Σ_j m_j λ_j B_j A_j`` with expert ``j`` = rows ``jk..(j+1)k-1`` of ``A`` and the same
columns of ``B``: the low-rank product ``B diag(c) A`` with ``c = repeat(m ⊙ λ / (1-p), k)``,
one elementwise scaling of B's columns per forward, no per-expert loop.
"""
from __future__ import annotations

import torch.nn as nn

from surgeon.methods.base import Method, PatchContext, RuleContext
from surgeon.methods.lowrank import (LearnedCoefficients, LowRankLayer, MaskedCoefficients, gaussian_lora_like_down,
                                     module_problem)
from surgeon.methods.registry import Rule

from .allocation import layer_drop_probability, layer_expert_counts


class Mlae(Method):
    key = "mlae"
    takes_rows = True

    def cannot_patch(self, name: str, module: nn.Module, rule: Rule) -> str | None:
        return module_problem(module, rule.config.slices, name)

    def prepare(self, ctx: RuleContext) -> list[int] | None:
        """The per-layer expert counts of fixed/mixed masking (one allocation for the whole rule),
        None for stochastic/none (every layer has rank/expert_rank experts)."""
        cfg = ctx.rule.config
        problem = module_problem(ctx.matches[0][1], cfg.slices, ctx.matches[0][0])
        if problem:  # e.g. an earlier rule already wrapped this module
            raise ValueError(problem)
        if cfg.rank % cfg.expert_rank:
            raise ValueError(f"mlae.expert_rank {cfg.expert_rank} does not divide rank {cfg.rank}")
        masking = cfg.masking
        if masking.strategy in ("fixed", "mixed"):
            return layer_expert_counts(masking, len(ctx.matches), cfg.rank // cfg.expert_rank, ctx.sampler.seed,
                                       ctx.rule_index)
        return None

    def patch(self, name: str, module: nn.Module, ctx: PatchContext) -> nn.Module:
        cfg = ctx.rule.config
        problem = module_problem(module, cfg.slices, name)
        if problem:  # e.g. an earlier rule already wrapped this module
            raise ValueError(problem)
        masking = cfg.masking
        experts = cfg.rank // cfg.expert_rank if ctx.state is None else ctx.state[ctx.layer_index]
        p = layer_drop_probability(masking.p, ctx.num_layers, ctx.layer_index) \
            if masking.strategy in ("stochastic", "mixed") else 0.0
        if experts == 0:
            return module  # masked away entirely: nothing to add (see allocation.py)
        if not 0 <= p < 1:
            raise ValueError(f"mlae.masking.p must be in [0, 1), got {p}")
        weighting = (MaskedCoefficients(experts, cfg.expert_rank, cfg.coefficient_init, p, ctx.sampler) if p > 0
                     else LearnedCoefficients(experts, cfg.expert_rank, cfg.coefficient_init))
        layer = LowRankLayer(module, ctx, method_name="mlae", slices=cfg.slices, rows=ctx.rows,
                             rank=experts * cfg.expert_rank, init_down=gaussian_lora_like_down, weighting=weighting)
        layer.target_name = name
        return layer


METHOD = Mlae()
