"""``unfreeze``: train existing backbone parameters — BitFit (``bias``) and full fine-tuning
(``all``): schema and description. The rule's value is a plain string."""
from __future__ import annotations

from surgeon.methods.registry import MethodSpec, Rule

SCHEMA = {
    "type": "string",
    "enum": ["bias", "all"],
    "description": "Train the selected modules' own parameters: `bias` (BitFit) or `all` (full fine-tuning).",
}


class UnfreezeSpec(MethodSpec):
    key = "unfreeze"
    schema = SCHEMA
    config_type = None  # the value itself: "bias" or "all"

    def display_name(self, rule: Rule) -> str:
        return {"bias": "bitfit", "all": "full"}[rule.config]

    def describe(self, rule: Rule) -> str:
        return {"bias": "BitFit: the biases of the matched modules train",
                "all": "every parameter of the matched modules trains (full fine-tuning)"}.get(
            rule.config, f"unfreeze {rule.config}")


SPEC = UnfreezeSpec()
