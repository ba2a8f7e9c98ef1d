"""The rule-level modifiers a method may accept: ``experts`` (MoSA: expert-split matrices) and
``prune`` (SparseAdapter/SparseLoRA: pruned matrices). Import-light: their configs, schema
fragments, static checks and descriptions; the tensors are :mod:`surgeon.methods.matrices`.

A method says which of them it accepts (``MethodSpec.modifiers``); the recipe schema gives every
rule both keys, and the static checks refuse a modifier on a method that does not take it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

Problem = tuple[str, str, str, "str | None"]
Where = Callable[[tuple], str]


@dataclass(frozen=True)
class ExpertsConfig:
    """MoSA's split of a rule's matrices into ``count`` sparse experts (see :data:`EXPERTS_SCHEMA`)."""

    count: int
    split: str
    granularity: str
    sparse: tuple[str, ...]
    bias: str
    decay: str


@dataclass(frozen=True)
class PruneConfig:
    """SparseAdapter/SparseLoRA pruning of a rule's matrices (see :data:`PRUNE_SCHEMA`)."""

    keep: float
    score: str
    matrices: tuple[str, ...]
    bias: str
    pruned: str
    norm: bool


EXPERTS_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "description": (
        "MoSA: split the module's matrices into `count` non-overlapping sparse experts; each training forward "
        "activates one expert per split matrix, drawn uniformly from the seeded generator."
    ),
    "properties": {
        "count": {
            "type": "integer",
            "minimum": 2,
            "maximum": 255,
            "default": 4,
            "description": "N, the number of experts.",
        },
        "split": {
            "type": "string",
            "enum": ["random_quantile"],
            "default": "random_quantile",
            "description": "Scores ~ U(0,1) of the matrix's shape cut at the N-quantiles into N disjoint masks.",
        },
        "granularity": {
            "type": "string",
            "enum": ["all", "row", "column"],
            "default": "all",
            "description": "Quantiles over the whole matrix, per row, or per column.",
        },
        "sparse": {
            "type": "array",
            "items": {"type": "string", "enum": ["down", "up"]},
            "uniqueItems": True,
            "default": ["up"],
            "description": (
                "Which matrices are split: [up] hierarchical (dense down, the paper's best), [down, up] flat, [] "
                "none."
            ),
        },
        "bias": {
            "type": "string",
            "enum": ["per_expert", "split", "dense"],
            "default": "per_expert",
            "description": (
                "Biases of split matrices: `per_expert` every expert owns a full bias, trained only when it is "
                "drawn, averaged at merge (the published default, MODEL.ADAPTER.BIAS=True); `split` split into "
                "experts like the weights (published BIAS=False); `dense` one shared bias. Default per_expert."
            ),
        },
        "decay": {
            "type": "string",
            "enum": ["toward_init", "toward_zero"],
            "default": "toward_init",
            "description": (
                "How weight decay acts on an expert: `toward_init` decays the trained difference D, i.e. each "
                "expert toward its initial weight; `toward_zero` decays each expert's whole weight toward 0, as "
                "AdamW does to the published N adapter copies (the same numbers when the initial weight is 0, as "
                "MoSA's up-projection). Default toward_init."
            ),
        },
    },
}

PRUNE_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "description": "SparseAdapter / SparseLoRA. Prune at surgery time; pruned entries are zero and stay zero.",
    "properties": {
        "keep": {
            "type": "number",
            "exclusiveMinimum": 0,
            "maximum": 1,
            "default": 0.25,
            "description": "Kept fraction of each pruned matrix (1/N for N = 4 by default).",
        },
        "score": {
            "type": "string",
            "enum": ["random"],
            "default": "random",
            "description": "Pruning score; random keeps a uniformly random subset.",
        },
        "matrices": {
            "type": "array",
            "items": {"type": "string", "enum": ["down", "up"]},
            "uniqueItems": True,
            "minItems": 1,
            "default": ["down", "up"],
            "description": "Which matrices are pruned.",
        },
        "bias": {
            "type": "string",
            "enum": ["pruned", "dense"],
            "default": "pruned",
            "description": (
                "Biases of pruned matrices are pruned to the same kept fraction (the papers' Params column counts "
                "them so) or stay dense."
            ),
        },
        "pruned": {
            "type": "string",
            "enum": ["zero", "frozen"],
            "default": "zero",
            "description": (
                "Pruned entries: `zero` are zero and stay zero (the SparseAdapter paper); `frozen` keep their "
                "random initial values and get no gradient (the published MoSA baselines, which only mask "
                "gradients; weight decay still shrinks them). Default zero."
            ),
        },
        "norm": {
            "type": "boolean",
            "default": False,
            "description": (
                "Adapter rules with layernorm: also prune the adapter's LayerNorm weight and bias to the kept "
                "fraction (as `pruned` says), as the published SparseAdapter baseline does with every trainable "
                "adapter tensor (its Params column, e.g. 0.30M on ViT-B/16, counts them so). Default false."
            ),
        },
    },
}

#: modifier key -> (config type, schema fragment), in the order rules list them.
MODIFIERS = {"experts": (ExpertsConfig, EXPERTS_SCHEMA), "prune": (PruneConfig, PRUNE_SCHEMA)}


def is_expert_split(experts: ExpertsConfig | None) -> bool:
    """True if a rule's ``experts`` splits at least one matrix (MoSA/MoSL)."""
    return experts is not None and bool(experts.sparse)


def structure_problems(method: str, experts: ExpertsConfig | None, prune: PruneConfig | None, at: tuple,
                       where: Where, takes_experts: list[str], takes_prune: list[str]) -> list[Problem]:
    """Modifiers the rule's method does not take, or that contradict each other.

    Args:
        method: the rule's method key; at: ``("surgery", i)``; where: path -> location.
        takes_experts, takes_prune: the method keys that accept each modifier (registry order).
    """
    i = at[1]
    out: list[Problem] = []
    if experts is not None:
        if method not in takes_experts:
            out.append((where(at + ("experts",)), f"surgery.{i}.experts",
                        f"experts (MoSA) apply to {' or '.join(takes_experts)} rules, not {method}",
                        f"remove experts, or use {'/'.join(takes_experts)} in this rule"))
        if prune is not None:
            out.append((where(at + ("prune",)), f"surgery.{i}.prune",
                        "prune (SparseAdapter/SparseLoRA) and experts (MoSA) exclude each other", "keep one of them"))
        elif not experts.sparse:
            out.append((where(at + ("experts", "sparse")), f"surgery.{i}.experts.sparse",
                        "experts with no sparse matrix are one plain adapter",
                        "use sparse: [up] (hierarchical) or [down, up] (flat), or drop experts"))
    if prune is not None and method not in takes_prune:
        out.append((where(at + ("prune",)), f"surgery.{i}.prune",
                    f"prune applies to {' or '.join(takes_prune)} rules, not {method}", None))
    return out


def training_problems(experts: ExpertsConfig | None, optimizer: str, at: tuple, where: Where) -> list[Problem]:
    """``experts.decay: toward_zero`` is a decoupled (AdamW) decay: refused with SGD."""
    if experts is None or experts.decay != "toward_zero" or optimizer != "sgd":
        return []
    return [(where(at + ("experts", "decay")), f"surgery.{at[1]}.experts.decay",
             "decay: toward_zero is a decoupled (AdamW) weight decay; train.optimizer is sgd",
             "use train.optimizer adamw or adamw_hf, or experts.decay: toward_init")]


def describe(experts: ExpertsConfig | None, prune: PruneConfig | None, matrix_names: tuple[str, str],
             matrix_biases: bool, merge_mode: str) -> list[str]:
    """The modifiers of a rule in words (one phrase each) for reports.

    Args:
        matrix_names: how the method calls its down/up matrices (``A``/``B`` for LoRA).
        matrix_biases: whether its matrices have biases (adapters do, LoRA's do not).
    """
    down, up = matrix_names
    parts = []
    if experts is not None:
        sparse = list(experts.sparse)
        kind = {("up",): f"hierarchical: dense {down}, split {up}",
                ("down", "up"): f"flat: {down} and {up} split", (): "no matrix split"}.get(
            tuple(sorted(sparse)), f"split {', '.join(sparse)}")
        bias = f", biases {experts.bias}" if matrix_biases else ""
        parts.append(f"split into {experts.count} sparse experts ({kind}; quantiles over "
                     f"{experts.granularity}{bias}; one expert drawn per split matrix at each training "
                     f"step; merged by {merge_mode})")
    if prune is not None:
        names = {"down": down, "up": up}
        parts.append(f"pruned at surgery time to keep {100 * prune.keep:.0f}% of "
                     f"{' and '.join(names.get(m, m) for m in prune.matrices)} ({prune.score} score"
                     + (f", biases {prune.bias})" if matrix_biases and prune.bias else ")"))
    return parts
