"""``lora``: a :class:`~surgeon.methods.lowrank.LowRankLayer` with ``c = α/r`` on every matched
Linear/Conv2d; the rule's ``experts`` / ``prune`` choose the matrices (MoSL / SparseLoRA)."""
from __future__ import annotations

import torch.nn as nn

from surgeon.methods.base import Method, PatchContext
from surgeon.methods.lowrank import FixedScale, LowRankLayer, kaiming_down, module_problem
from surgeon.methods.registry import Rule


class Lora(Method):
    key = "lora"
    takes_rows = True

    def cannot_patch(self, name: str, module: nn.Module, rule: Rule) -> str | None:
        return module_problem(module, rule.config.slices, name)

    def patch(self, name: str, module: nn.Module, ctx: PatchContext) -> nn.Module:
        cfg = ctx.rule.config
        problem = module_problem(module, cfg.slices, name)
        if problem:  # e.g. an earlier rule already wrapped this module
            raise ValueError(problem)
        layer = LowRankLayer(module, ctx, method_name="lora", slices=cfg.slices, rows=ctx.rows, rank=cfg.rank,
                             init_down=kaiming_down, weighting=FixedScale(cfg.rank, cfg.alpha), dropout=cfg.dropout)
        layer.target_name = name
        return layer


METHOD = Lora()
