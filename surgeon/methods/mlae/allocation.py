"""MLAE fixed masking: how many experts each matched layer gets (paper Table 4, Appendix A.5).

The paper lists its patterns for the 12 blocks of ViT-B with 8 rank-1 experts per block on
average (total 96)::

    incremental  [2, 2, 2, 6, 6, 6, 10, 10, 10, 14, 14, 14]
    decremental  [14, 14, 14, 10, 10, 10, 6, 6, 6, 2, 2, 2]
    hourglass    [14, 14, 14, 2, 2, 2, 2, 2, 2, 14, 14, 14]
    protruding   [2, 2, 2, 14, 14, 14, 14, 14, 14, 2, 2, 2]
    random       integers in [1, 14] averaging 8

(The printed hourglass list has 13 entries and the protruding list 11; both are typos: "all
these settings are under the same trainable parameter budget" = 96 fixes them as above.)

**Generalisation to any depth L and any mean E** (E = rank / expert_rank experts per layer):

1. Cut the layers into four quarters, symmetric about the middle: layer ``l`` of the first
   half is in quarter ``min(3, floor(4 (l + ½) / L))``; layer ``L-1-l`` mirrors it (``3 - q``).
   (Depth 2 has no outer quarters: hourglass and protruding are then uniform.)
2. Each quarter has a level relative to E — the paper's 2, 6, 10, 14 over 8 are
   ``1/4, 3/4, 5/4, 7/4``: incremental ``(2q+1)/4``, decremental its mirror, hourglass
   ``7/4`` in the outer quarters and ``1/4`` in the middle half, protruding the opposite.
3. Counts are the levels apportioned to the same total budget ``L·E`` (largest remainder;
   ties go to the layers nearest the middle, so symmetric patterns stay symmetric): every
   pattern has as many experts as stochastic masking with E per layer (the same parameters
   when all layers have the same width, as in ViT; Swin's later stages are wider).
   For L = 12, E = 8 this gives the lists above.
4. ``random``: integers in ``[1, ceil(7E/4)]`` (the paper's 1..14 for E = 8) summing to ``L·E``,
   drawn from a generator seeded by the run seed and the rule index, so every layer of the
   rule sees the same allocation.

A layer may get 0 experts (small E, e.g. incremental with E = 1): that layer is left
unpatched, since a wrapper with no experts would add nothing.
"""
from __future__ import annotations

import math

import torch

from .spec import MaskingConfig

PATTERNS = ("incremental", "decremental", "hourglass", "protruding", "random")


def quarters(num_layers: int) -> list[int]:
    """Quarter index 0..3 of each layer, symmetric about the middle (see the module docstring)."""
    first = [min(3, (4 * l + 2) // num_layers) for l in range((num_layers + 1) // 2)]
    second = [3 - first[num_layers - 1 - l] for l in range((num_layers + 1) // 2, num_layers)]
    return first + second


def apportion(total: int, weights: list[float]) -> list[int]:
    """Non-negative integers proportional to ``weights`` summing exactly to ``total`` (largest remainder)."""
    scale = total / sum(weights)
    ideal = [w * scale for w in weights]
    counts = [math.floor(v + 1e-9) for v in ideal]
    leftover = total - sum(counts)
    # Ties go to the layer nearest the middle (then the earlier one): symmetric weights stay symmetric.
    middle = (len(ideal) - 1) / 2
    order = sorted(range(len(ideal)), key=lambda i: (-round(ideal[i] - counts[i], 9), abs(i - middle), i))
    for i in order[:leftover]:
        counts[i] += 1
    return counts


def pattern_counts(pattern: str, num_layers: int, mean_experts: int,
                   generator: torch.Generator | None = None) -> list[int]:
    """Per-layer expert counts for a named pattern; they sum to ``num_layers * mean_experts``.

    Args:
        pattern: one of :data:`PATTERNS`.
        num_layers: L, the number of layers the rule matched.
        mean_experts: E, the experts a layer has on average (rank / expert_rank).
        generator: CPU generator for ``random`` (required there).
    """
    if pattern not in PATTERNS:
        raise ValueError(f"unknown masking pattern {pattern!r}; choose one of {', '.join(PATTERNS)}")
    total = num_layers * mean_experts
    if pattern == "random":
        return random_counts(num_layers, mean_experts, generator)
    level = {
        "incremental": lambda q: (2 * q + 1) / 4,
        "decremental": lambda q: (7 - 2 * q) / 4,
        "hourglass": lambda q: 7 / 4 if q in (0, 3) else 1 / 4,
        "protruding": lambda q: 1 / 4 if q in (0, 3) else 7 / 4,
    }[pattern]
    return apportion(total, [level(q) for q in quarters(num_layers)])


def random_counts(num_layers: int, mean_experts: int, generator: torch.Generator | None) -> list[int]:
    """Integers in ``[1, ceil(7E/4)]`` with mean exactly E: uniform draws, then ±1 repairs at random layers."""
    low, high = 1, max(1, math.ceil(7 * mean_experts / 4))
    # device="cpu" (the generator's): the counts are needed as numbers even in a meta-device build.
    counts = torch.randint(low, high + 1, (num_layers,), generator=generator, device="cpu").tolist()
    target = num_layers * mean_experts
    while sum(counts) != target:
        step = 1 if sum(counts) < target else -1
        movable = [i for i, c in enumerate(counts) if low <= c + step <= high]
        pick = movable[int(torch.randint(len(movable), (1,), generator=generator, device="cpu"))]
        counts[pick] += step
    return counts


def rule_generator(seed: int, rule_index: int) -> torch.Generator:
    """A generator every layer of one rule re-creates identically (random allocation)."""
    gen = torch.Generator(device="cpu")
    gen.manual_seed(seed * 1_000_003 + 7919 * (rule_index + 1))
    return gen


def layer_expert_counts(masking: MaskingConfig, num_layers: int, mean_experts: int, seed: int,
                        rule_index: int) -> list[int]:
    """Expert count of every matched layer for a ``masking`` section (fixed / mixed).

    Raises:
        ValueError: ``counts`` has a length other than ``num_layers``, or every count is 0.
    """
    if masking.counts is not None:
        counts = list(masking.counts)
        if len(counts) != num_layers:
            raise ValueError(f"mlae.masking.counts has {len(counts)} entries but the selector matched "
                             f"{num_layers} layers; give one count per matched layer")
    else:
        counts = pattern_counts(masking.pattern, num_layers, mean_experts, rule_generator(seed, rule_index))
    if not any(counts):
        raise ValueError("mlae.masking gives every matched layer 0 experts: the rule would do nothing")
    return counts


def layer_drop_probability(p: float | list[float], num_layers: int, layer_index: int) -> float:
    """This layer's drop probability from one value or a per-layer list.

    Raises:
        ValueError: the list's length is not ``num_layers``.
    """
    if isinstance(p, (list, tuple)):
        if len(p) != num_layers:
            raise ValueError(f"mlae.masking.p has {len(p)} entries but the selector matched {num_layers} layers; "
                             f"give one p per matched layer or a single number")
        return float(p[layer_index])
    return float(p)
