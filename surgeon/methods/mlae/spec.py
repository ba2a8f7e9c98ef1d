"""``mlae``: Masked LoRA Experts (Wang et al. 2024): config, schema, checks, description."""
from __future__ import annotations

from dataclasses import dataclass

from surgeon.methods.registry import MethodSpec, Rule, fmt_number


@dataclass(frozen=True)
class MaskingConfig:
    """``mlae.masking``: the expert masking strategy (paper Table 4)."""

    strategy: str
    p: float | tuple[float, ...]
    pattern: str | None
    counts: tuple[int, ...] | None


@dataclass(frozen=True)
class MlaeConfig:
    """A rule's ``mlae`` section (see :data:`SCHEMA`)."""

    rank: int
    expert_rank: int
    coefficient_init: float
    slices: tuple[str, ...] | None
    masking: MaskingConfig


SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "description": (
        "MLAE: a rank-`rank` LoRA cut into rank-`expert_rank` experts with learnable coefficients lambda and "
        "expert-level masking; folded into the base weight at merge."
    ),
    "properties": {
        "rank": {
            "type": "integer",
            "minimum": 1,
            "default": 8,
            "description": (
                "Total rank r (number of experts x expert_rank); with fixed/mixed masking, the average per layer "
                "that the pattern distributes."
            ),
        },
        "expert_rank": {
            "type": "integer",
            "minimum": 1,
            "default": 1,
            "description": "Rank of each expert (paper Table 6); must divide rank.",
        },
        "coefficient_init": {"type": "number", "default": 1.0, "description": "Initial value of every lambda_j."},
        "slices": {
            "type": ["array", "null"],
            "items": {"type": "string", "enum": ["q", "k", "v"]},
            "uniqueItems": True,
            "minItems": 1,
            "default": None,
            "description": "As for lora; null = the whole layer.",
        },
        "masking": {
            "type": "object",
            "additionalProperties": False,
            "default": {},
            "description": "Expert masking strategy (paper Table 4).",
            "properties": {
                "strategy": {
                    "type": "string",
                    "enum": ["stochastic", "fixed", "mixed", "none"],
                    "default": "stochastic",
                    "description": (
                        "`stochastic` each expert dropped with probability p per step, kept ones scaled 1/(1-p); "
                        "`fixed` a per-layer number of experts; `mixed` both; `none` plain cellular LoRA."
                    ),
                },
                "p": {
                    "description": (
                        "Drop probability, one value for all layers or one per matched layer (stochastic, mixed)."
                    ),
                    "default": 0.5,
                    "oneOf": [
                        {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
                        {
                            "type": "array",
                            "minItems": 1,
                            "items": {"type": "number", "minimum": 0, "exclusiveMaximum": 1},
                        },
                    ],
                },
                "pattern": {
                    "type": ["string", "null"],
                    "enum": ["incremental", "decremental", "hourglass", "protruding", "random", None],
                    "default": None,
                    "description": (
                        "Named per-layer expert-count pattern (paper Appendix A.5) for fixed / mixed; defined for "
                        "any depth with the same total number of experts as rank/expert_rank per layer."
                    ),
                },
                "counts": {
                    "type": ["array", "null"],
                    "items": {"type": "integer", "minimum": 0},
                    "default": None,
                    "description": (
                        "Explicit per-layer expert counts for fixed / mixed (one per matched layer); a layer with "
                        "0 experts is left unpatched."
                    ),
                },
            },
        },
    },
}


class MlaeSpec(MethodSpec):
    key = "mlae"
    schema = SCHEMA
    config_type = MlaeConfig

    def is_stochastic(self, rule: Rule) -> bool:
        return rule.config.masking.strategy in ("stochastic", "mixed")

    def problems(self, rule: Rule, at: tuple, where) -> list:
        cfg = rule.config
        out = []
        dotted = ".".join(map(str, at)) + ".mlae"
        if cfg.rank % cfg.expert_rank:
            out.append((where(at + ("mlae", "expert_rank")), dotted + ".expert_rank",
                        f"expert_rank {cfg.expert_rank} does not divide rank {cfg.rank}", None))
        masking = cfg.masking
        fixed = masking.strategy in ("fixed", "mixed")
        has_alloc = masking.pattern is not None or masking.counts is not None
        if fixed and not has_alloc:
            out.append((where(at + ("mlae", "masking")), dotted + ".masking",
                        f"strategy '{masking.strategy}' needs a per-layer allocation",
                        "set pattern (incremental, decremental, hourglass, protruding, random) or counts"))
        if not fixed and has_alloc:
            out.append((where(at + ("mlae", "masking")), dotted + ".masking",
                        f"pattern/counts have no effect with strategy '{masking.strategy}'",
                        "use strategy fixed or mixed"))
        if masking.pattern is not None and masking.counts is not None:
            out.append((where(at + ("mlae", "masking", "counts")), dotted + ".masking.counts",
                        "give pattern or counts, not both", None))
        if masking.strategy == "mixed" and isinstance(masking.p, tuple):
            out.append((where(at + ("mlae", "masking", "p")), dotted + ".masking.p",
                        "mixed masking uses one p for all layers", None))
        return out

    def describe(self, rule: Rule) -> str:
        m = rule.config
        rank, er = m.rank, m.expert_rank
        text = (f"MLAE rank {rank} as {rank // max(er, 1)} experts of rank {er}, "
                f"λ initialised to {fmt_number(m.coefficient_init)}, {_masking(m.masking)}")
        if m.slices:
            text += f", on the {', '.join(m.slices)} slices"
        return text


def _masking(m: MaskingConfig) -> str:
    p = m.p
    if isinstance(p, tuple):
        p_text = f"per-layer p = {', '.join(fmt_number(v) for v in p)}"
    else:
        p_text = f"p = {fmt_number(p)}"
    if m.counts:
        alloc = "counts " + ", ".join(str(c) for c in m.counts)
    else:
        alloc = f"{m.pattern or 'unspecified'} pattern"
    return {"stochastic": f"stochastic expert masking ({p_text}, kept experts scaled by 1/(1-p))",
            "fixed": f"fixed per-layer expert counts ({alloc})",
            "mixed": f"fixed per-layer expert counts ({alloc}) plus stochastic masking ({p_text})",
            "none": "no masking (plain cellular LoRA)"}.get(m.strategy, f"masking {m.strategy}")


SPEC = MlaeSpec()
