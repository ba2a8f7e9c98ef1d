"""The MLAE layer: a rank-R LoRA whose rank-k blocks are experts with coefficients and masks.

``ΔW = Σ_j m_j λ_j B_j A_j`` with expert ``j`` = rows ``jk..(j+1)k-1`` of ``A`` and the same
columns of ``B`` (k = ``expert_rank``; k = 1 gives the paper's rank-1 experts ``b_j a_jᵀ``).
It is the :class:`~surgeon.methods.lora.layer.LowRankLayer` product ``B diag(c) A`` with
``c = repeat(m ⊙ λ / (1-p), k)``: one elementwise scaling of B's columns per forward, no
per-expert loop, so a training step costs what a LoRA step of the same rank costs.

Initialisation: ``B = 0``, ``λ = coefficient_init``, ``A ~ N(0, σ²)`` i.i.d. with
``σ = 1/√(3·fan_in)``. The paper only says "random Gaussian" (its official code is not
public here); we take the Gaussian with the variance of LoRA's kaiming-uniform(a=√5) init.
Reason: with ``B = 0`` the scale of A is the effective learning rate of the delta (an Adam
step on B moves ``ΔW`` by ≈ lr·|A|), so matching LoRA keeps the paper's lr (5e-4, tuned
against LoRA-style implementations) meaningful and makes MLAE-vs-LoRA comparisons differ
only in the decomposition and masking. Each row is an independent draw, so every expert
starts from its own state as the paper requires.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from surgeon.methods.base import ExpertSampler
from surgeon.methods.lora.layer import LowRankLayer, fan_in, gaussian_down, lora_like_std
from surgeon.methods.matrices import DenseMatrix


class MlaeLayer(LowRankLayer):
    """``base_layer`` + masked LoRA experts.

    Args:
        base_layer: the Linear / Conv2d to adapt (frozen).
        num_experts: E, experts per group (the fixed allocation of this layer, or rank/k).
        expert_rank: k, the rank of each expert.
        coefficient_init: initial λ.
        p: drop probability of an expert per training forward (0 = no stochastic masking).
        slices: adapt only these thirds of a fused qkv (one expert set per slice) or None.
        sampler: the model's shared seeded sampler (masks come from ``sampler.rand``).
        generator: surgery-time generator for A's Gaussian init.

    State: ``down.s`` (A ``[E·k, fan_in]``), ``up.s`` (B ``[d_s, E·k]``) per group ``s`` and
    ``coefficient`` (λ ``[S·E]``, groups in order).
    """

    method_name = "mlae"

    def __init__(self, base_layer: nn.Module, *, num_experts: int, expert_rank: int, coefficient_init: float,
                 p: float, slices: list[str] | None, sampler: ExpertSampler,
                 generator: torch.Generator | None = None):
        super().__init__(base_layer, slices)
        if not 0 <= p < 1:
            raise ValueError(f"mlae.masking.p must be in [0, 1), got {p}")
        self.num_experts = num_experts
        self.expert_rank = expert_rank
        self.p = p
        self.sampler = sampler  # shared, plain attribute (not a submodule, not state)
        ref = base_layer.weight
        rank, fan = num_experts * expert_rank, fan_in(base_layer)
        self.down, self.up = nn.ModuleDict(), nn.ModuleDict()
        for name, r0, r1 in self.parts:
            a = gaussian_down(rank, fan, lora_like_std(fan), generator)
            self.down[name] = DenseMatrix("down", a.to(ref.device, ref.dtype))
            self.up[name] = DenseMatrix("up", torch.zeros(r1 - r0, rank, device=ref.device, dtype=ref.dtype))
        self.coefficient = nn.Parameter(
            torch.full((len(self.parts) * num_experts,), float(coefficient_init), device=ref.device, dtype=ref.dtype))

    def rank_per_expert(self) -> int:
        return self.expert_rank

    def expert_mask(self) -> torch.Tensor | None:
        """This training forward's kept-expert mask, scaled: ``[S·E]`` or ``[G, S·E]`` of 0 or 1/(1-p).

        None when nothing is dropped (eval mode, or p = 0). Draws ``sampler.rand`` — one value
        per expert (per batch group when ``sampler.groups`` > 1) — so masks replay from the seed.
        """
        if not self.training or self.p == 0:
            return None
        groups = max(1, self.sampler.groups)
        draws = self.sampler.rand(groups * self.coefficient.numel())
        # kept with probability 1-p, scaled 1/(1-p): one where() (fewer small ops per layer and step)
        mask = torch.where(draws >= self.p, 1.0 / (1 - self.p), 0.0)
        mask = mask.to(self.coefficient.device, self.coefficient.dtype, non_blocking=True)
        return mask if groups == 1 else mask.view(groups, -1)

    def coefficients(self) -> torch.Tensor:
        coefficient = self.coefficient
        mask = self.expert_mask()
        if mask is not None:
            coefficient = coefficient * mask                       # [S·E] or [G, S·E]
        if self.expert_rank == 1:  # rank-1 experts: c is λ itself (repeat_interleave would copy)
            return coefficient
        return coefficient.repeat_interleave(self.expert_rank, dim=-1)

    def merged_coefficients(self) -> torch.Tensor:
        # All experts, no mask and no 1/(1-p): what the model computes at inference.
        return self.coefficient.detach().float().repeat_interleave(self.expert_rank)

    def extra_params(self) -> int:
        return super().extra_params() + self.coefficient.numel()

    def describe(self) -> str:
        where = "+".join(name for name, _, _ in self.parts)
        text = f"{self.num_experts} experts" + (f" x rank {self.expert_rank}" if self.expert_rank > 1 else "")
        text += f", p {self.p:g}" if self.p else ""
        return text + ("" if where == "all" else f", {where}")
