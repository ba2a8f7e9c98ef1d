"""``unfreeze``: train existing backbone parameters — BitFit (``bias``) and full fine-tuning (``all``).

Nothing is added to the model, so nothing needs merging: the trained weights are the model.
"""
from __future__ import annotations

import torch.nn as nn

from surgeon.methods.base import Method, PatchContext
from surgeon.methods.registry import Rule


def selected_parameters(module: nn.Module, what: str) -> list[nn.Parameter]:
    """The module's own parameters (recursively) that ``unfreeze: what`` trains."""
    return [p for n, p in module.named_parameters() if what == "all" or n.rsplit(".", 1)[-1] == "bias"]


class Unfreeze(Method):
    key = "unfreeze"
    trains_own_parameters = True

    def nothing_to_patch(self, selector: str, rule: Rule) -> str:
        return f"'{selector}' matches no module with parameters to unfreeze ({rule.config})"

    def cannot_patch(self, name: str, module: nn.Module, rule: Rule) -> str | None:
        if not selected_parameters(module, rule.config):
            return "has no bias" if rule.config == "bias" else "has no parameters"
        return None

    def patch(self, name: str, module: nn.Module, ctx: PatchContext) -> nn.Module:
        for p in selected_parameters(module, ctx.rule.config):
            p.requires_grad_(True)
        return module


METHOD = Unfreeze()
