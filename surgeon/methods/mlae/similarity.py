"""How alike the experts of a layer are (MLAE paper §4.3, Figs. 4-5, Appendix A.4).

For each adapted layer (and each qkv slice of it), expert ``j``'s update is the matrix
``ΔW_j = B_j diag(c_j) A_j`` (MLAE: ``λ_j b_j a_jᵀ``; LoRA: the rank-1 terms of ``B A``).
The paper flattens every ``ΔW_j`` and averages the pairwise cosine similarities, per block
and then over blocks. We never materialise ``ΔW_j`` ([out, in] each): the Frobenius inner
product of two low-rank terms is ``⟨B_i A_i, B_j A_j⟩ = Σ (B_iᵀ B_j) ⊙ (A_i A_jᵀ)``, so an
``[R, R]`` Gram of A times one of B gives every pair at once.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from surgeon.methods.lowrank import LowRankLayer


def expert_gram(down: torch.Tensor, up: torch.Tensor, expert_rank: int = 1) -> torch.Tensor:
    """``[E, E]`` Frobenius inner products of the experts' ``ΔW_j``.

    Args:
        down: ``A [E·k, in]``; up: ``B diag(c) [out, E·k]``; expert_rank: k.
    """
    rank = down.shape[0]
    experts = rank // expert_rank
    gram = (up.T @ up) * (down @ down.T)                                   # [R, R]
    return gram.view(experts, expert_rank, experts, expert_rank).sum(dim=(1, 3))


def cosine_matrix(down: torch.Tensor, up: torch.Tensor, expert_rank: int = 1) -> torch.Tensor:
    """``[E, E]`` cosine similarities of the flattened ``ΔW_j``; an all-zero expert scores 0."""
    gram = expert_gram(down.double(), up.double(), expert_rank)
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    return torch.where(denom > 0, gram / denom.clamp_min(1e-300), torch.zeros_like(gram)).float()


def expert_similarity(model: nn.Module) -> dict:
    """Mean pairwise cosine similarity of the experts' ``ΔW_j``, per layer and averaged.

    Works on every LoRA-family layer of ``model`` (LoRA, MoSL and SparseLoRA use their merged
    A/B; MLAE includes λ). A layer with slices averages its slices.

    Returns:
        ``{"mean": float | None, "layers": {name: float}, "matrices": {name[.slice]: Tensor[E, E]}}``;
        ``mean`` averages the layers (None if no layer has two experts).
    """
    layers: dict[str, float] = {}
    matrices: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if not isinstance(module, LowRankLayer):
            continue
        values = []
        for group, down, up, k in module.expert_factors():
            sims = cosine_matrix(down, up, k)
            key = name if group == "all" else f"{name}.{group}"
            matrices[key] = sims
            n = sims.shape[0]
            if n > 1:
                off = sims[~torch.eye(n, dtype=torch.bool)]
                values.append(float(off.mean()))
        if values:
            layers[name] = sum(values) / len(values)
    mean = sum(layers.values()) / len(layers) if layers else None
    return {"mean": mean, "layers": layers, "matrices": matrices}
