"""``dora``: DoRA, weight-decomposed low-rank adaptation (Liu et al. 2024): config, schema,
checks, description.

``W' = m ⊙ (W + s·B A) / ‖W + s·B A‖_row`` with ``s = α/r``: LoRA gives the direction, the
trainable magnitude vector ``m`` (one per adapted output unit, initialised to the row norms of
``W``) its length. As in PEFT and the paper (§4.3) the norm is treated as a constant in
backward. The layer is :class:`surgeon.methods.dora.method.DoraMagnitude` on the shared
low-rank layer; it folds into the Linear at merge (the merged model is plain timm).
"""
from __future__ import annotations

from dataclasses import dataclass

from surgeon.methods.lora.spec import SCHEMA as LORA_SCHEMA
from surgeon.methods.registry import MethodSpec, Rule, fmt_number


@dataclass(frozen=True)
class DoraConfig:
    """A rule's ``dora`` section (see :data:`SCHEMA`)."""

    rank: int
    alpha: float | None
    dropout: float
    slices: tuple[str, ...] | None


# DoRA's hyper-parameters are LoRA's (rank, alpha, dropout, slices): one definition, with the
# descriptions that differ restated.
_LORA_PROPERTIES = LORA_SCHEMA["properties"]
SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "description": (
        "DoRA (Liu et al. 2024, as PEFT implements it): LoRA's update as a direction with a learned magnitude, W' "
        "= m * (W + s B A) / ||W + s B A|| per output row (s = alpha/rank), on a Linear (or Conv2d) layer; A "
        "kaiming-uniform, B zero, m initialised to the row norms of W, so training starts at the backbone's "
        "function. The norm is a constant in backward (DoRA paper section 4.3). Folded into the base weight at "
        "merge."
    ),
    "properties": {
        **_LORA_PROPERTIES,
        "dropout": {
            **_LORA_PROPERTIES["dropout"],
            "description": (
                "Dropout on the input of the DoRA update (training only; as PEFT, the rescaled base term then "
                "reads the dropped input too). Not applied where a parent reads the weight directly "
                "(BEiT/EVA-02/SwinV2 qkv)."
            ),
        },
        "slices": {
            **_LORA_PROPERTIES["slices"],
            "description": (
                "On a fused qkv Linear, adapt only these thirds of the output (e.g. [q, v]), each with its own A, "
                "B and magnitudes; null = the whole layer."
            ),
        },
    },
}


class DoraSpec(MethodSpec):
    key = "dora"
    schema = SCHEMA
    config_type = DoraConfig
    matrix_names = ("A", "B")
    matrix_biases = False

    def is_stochastic(self, rule: Rule) -> bool:
        return rule.config.dropout > 0

    def describe(self, rule: Rule) -> str:
        d = rule.config
        alpha = d.alpha or d.rank
        text = (f"DoRA rank {d.rank}, α {fmt_number(alpha)} (scale {alpha / d.rank:g}): LoRA direction, learned "
                "magnitude per output unit")
        if d.dropout:
            text += f", input dropout {fmt_number(d.dropout)}"
        if d.slices:
            text += f", on the {', '.join(d.slices)} slices of the fused layer"
        return text


SPEC = DoraSpec()
