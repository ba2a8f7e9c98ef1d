"""How alike the experts of a MoSA adapter are: cosine similarity of their deltas.

Expert ``i`` of an expert-split matrix holds ``W0 + D ⊙ M_i`` on its mask ``M_i`` (and what
the others' entries hold elsewhere: ``W0``, or ``c·W0`` under ``decay: toward_zero``). Its
*delta* is that weight minus the dense init ``W0``; per adapter, the deltas of every split
matrix (down and/or up, with the expert's own bias delta when biases are per expert or split)
are flattened into one vector per expert and compared by cosine similarity, as the MLAE paper
compares LoRA experts' ``ΔW_j`` (:mod:`surgeon.methods.mlae.similarity`).

The masks are disjoint, so the weight parts ``D ⊙ M_i`` of two experts never share an entry:
their inner product is 0 and a non-zero similarity comes from what experts do share — their
per-expert biases and, under ``decay: toward_zero``, the decayed init ``(c - 1)·W0`` on the
entries they hold but do not train. (The report says so next to the numbers.)
"""
from __future__ import annotations

import torch
import torch.nn as nn

from surgeon.methods.adapter.layer import AdapterLayer
from surgeon.methods.matrices import ExpertSplitMatrix


def expert_deltas(layer: AdapterLayer) -> torch.Tensor | None:
    """``[N, P]`` float64: each expert's flattened delta from the dense init over the adapter's
    expert-split matrices (weights, and biases that differ per expert); None without experts."""
    parts = []
    count = layer.num_experts
    for matrix in (layer.down, layer.up):
        if not isinstance(matrix, ExpertSplitMatrix) or matrix.num_experts != count:
            continue
        with torch.no_grad():
            weights = [matrix.expert_weight(i).double() - matrix.weight0.double() for i in range(count)]
            parts.append(torch.stack([w.flatten() for w in weights]))
            if matrix.bias_mode in ("split", "per_expert"):
                parts.append(torch.stack([matrix.expert_bias(i).double() - matrix.bias0.double()
                                          for i in range(count)]))
    return torch.cat(parts, dim=1) if parts else None


def cosine_rows(x: torch.Tensor) -> torch.Tensor:
    """``[N, N]`` cosine similarities of the rows of ``x [N, P]``; an all-zero row scores 0."""
    gram = x @ x.T
    norms = gram.diagonal().clamp_min(0).sqrt()
    denom = norms[:, None] * norms[None, :]
    return torch.where(denom > 0, gram / denom.clamp_min(1e-300), torch.zeros_like(gram)).float()


def adapter_expert_similarity(model: nn.Module) -> dict:
    """Mean pairwise cosine similarity of the experts' deltas, per MoSA adapter and averaged.

    Returns:
        ``{"mean": float | None, "layers": {name: float}, "matrices": {name: Tensor[N, N]}}``,
        the shape of :func:`surgeon.methods.mlae.similarity.expert_similarity`'s result;
        ``mean`` is None when no adapter has two experts.
    """
    layers: dict[str, float] = {}
    matrices: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if not isinstance(module, AdapterLayer):
            continue
        deltas = expert_deltas(module)
        if deltas is None or deltas.shape[0] < 2:
            continue
        sims = cosine_rows(deltas.cpu())
        n = sims.shape[0]
        matrices[name] = sims
        layers[name] = float(sims[~torch.eye(n, dtype=torch.bool)].mean())
    mean = sum(layers.values()) / len(layers) if layers else None
    return {"mean": mean, "layers": layers, "matrices": matrices}
