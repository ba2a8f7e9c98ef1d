"""``dora``: the shared :class:`~surgeon.methods.lowrank.LowRankLayer` (LoRA's ``c = α/r``) with a
:class:`DoraMagnitude` decomposition.

For each adapted output row ``i`` (the whole layer, or the q/k/v thirds a rule's ``slices``
name)::

    W'_i = m_i · (W_i + ΔW_i) / ‖W_i + ΔW_i‖,     ΔW = (α/r) · B A

``m`` is a trainable vector initialised to ``‖W_i‖`` (``B = 0``), so training starts at the
backbone's function. As in the paper (§4.3) and PEFT, the norm is a constant in backward
(``detach``): the magnitude and the direction's numerator get gradients, the norm does not.

The fast path follows PEFT's ``DoraLinearLayer.forward``: with the base output
``y = x Wᵀ + b`` and the low-rank output ``l = (α/r) · B A x``, the layer returns
``y + (m/‖·‖ - 1) ⊙ (x Wᵀ) + (m/‖·‖) ⊙ l`` — when input dropout is active, ``x Wᵀ`` and ``l``
are both computed from the dropped input, as PEFT does. For a Conv2d the norm runs over
``in·kh·kw`` per output channel. Merging writes ``W'`` into the base weight (fp32), so the
merged model is plain timm.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from surgeon.methods.base import Method, PatchContext
from surgeon.methods.lowrank import Decomposition, FixedScale, LowRankLayer, group_rows, kaiming_down, module_problem
from surgeon.methods.registry import Rule


def row_norms(weight: torch.Tensor) -> torch.Tensor:
    """``‖W_i‖`` per output unit ``i``: ``[out]`` for a ``[out, in]`` or ``[out, in, kh, kw]`` weight."""
    return torch.linalg.vector_norm(weight.flatten(1), dim=1)


class DoraMagnitude(Decomposition):
    """DoRA's learned magnitude: parameter ``magnitude`` ``[adapted rows]`` on the layer."""

    def attach(self, layer: LowRankLayer) -> None:
        weight = layer.base_layer.weight
        with torch.no_grad():  # ΔW = 0 at init (B = 0): the norms of the base weight's adapted rows
            norms = row_norms(weight.float())
            norms = torch.cat([group_rows(norms, group.spans) for group in layer.parts])
        layer.magnitude = nn.Parameter(norms.to(weight.dtype))

    def scale(self, layer: LowRankLayer, combined: torch.Tensor) -> torch.Tensor:
        """``m / ‖W + ΔW‖`` on the adapted rows and 1 on the others: ``[out]``; the norm of
        ``combined`` (= W + ΔW) is detached."""
        norms = row_norms(combined.detach())
        # (first row, end row, offset in the magnitude) of every adapted span, in row order
        spans, col = [], 0
        for group in layer.parts:
            for r0, r1 in group.spans:
                spans.append((r0, r1, col))
                col += r1 - r0
        pieces, pos = [], 0
        for r0, r1, col in sorted(spans):
            if r0 > pos:
                pieces.append(norms.new_ones(r0 - pos))
            pieces.append(layer.magnitude[col:col + r1 - r0].to(norms.dtype) / norms[r0:r1])
            pos = r1
        if pos < layer.out_rows:
            pieces.append(norms.new_ones(layer.out_rows - pos))
        return torch.cat(pieces)

    def combine(self, layer: LowRankLayer, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        combined = weight + delta
        scale = self.scale(layer, combined).to(combined.dtype)
        return combined * scale.reshape(-1, *([1] * (combined.dim() - 1)))

    def forward(self, layer: LowRankLayer, x: torch.Tensor, base_out: torch.Tensor, down: torch.Tensor,
                up: torch.Tensor) -> torch.Tensor:
        weight = layer.base_layer.weight
        delta = (up @ down).reshape(weight.shape).to(weight.dtype)
        scale = self.scale(layer, weight + delta).to(base_out.dtype)
        shape = (-1, 1, 1) if layer.is_conv else (-1,)  # broadcast over the channel dimension
        scale = scale.reshape(shape)
        dropped = layer.dropout(x)
        lora = layer.up_project(layer.down_project(dropped, down), up)
        if isinstance(layer.dropout, nn.Identity) or not layer.training:
            bias = layer.base_layer.bias
            base = base_out if bias is None else base_out - bias.reshape(shape)  # x Wᵀ without the bias
        elif layer.is_conv:
            conv = layer.base_layer
            base = F.conv2d(dropped, weight, None, conv.stride, conv.padding, conv.dilation)
        else:
            base = F.linear(dropped, weight)
        return base_out + (scale - 1) * base + scale * lora

    def extra_params(self, layer: LowRankLayer) -> int:
        return layer.magnitude.numel()

    def describe(self) -> str:
        return "magnitude per output unit"


class Dora(Method):
    key = "dora"
    takes_rows = True

    def cannot_patch(self, name: str, module: nn.Module, rule: Rule) -> str | None:
        return module_problem(module, rule.config.slices, name)

    def patch(self, name: str, module: nn.Module, ctx: PatchContext) -> nn.Module:
        cfg = ctx.rule.config
        problem = module_problem(module, cfg.slices, name)
        if problem:  # e.g. an earlier rule already wrapped this module
            raise ValueError(problem)
        layer = LowRankLayer(module, ctx, method_name="dora", slices=cfg.slices, rows=ctx.rows, rank=cfg.rank,
                             init_down=kaiming_down, weighting=FixedScale(cfg.rank, cfg.alpha), dropout=cfg.dropout,
                             decomposition=DoraMagnitude())
        layer.target_name = name
        return layer


METHOD = Dora()
