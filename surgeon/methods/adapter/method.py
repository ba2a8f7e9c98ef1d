"""``adapter``: wraps every matched module in an :class:`~surgeon.methods.adapter.layer.AdapterLayer`.

A rule ``{target, adapter: {...}, experts?: {...}, prune?: {...}}`` gives each matched module a
bottleneck adapter whose matrices are the strategies the modifiers choose (METHODS.md §1–2):
dense (AdaptFormer, Pfeiffer, Houlsby), expert-split (MoSA) or pruned (SparseAdapter).
Merging gives a :class:`~surgeon.methods.adapter.layer.MergedAdapter`: one dense adapter of
the original size. Eval-time expert control is :mod:`surgeon.methods.experts`.
"""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn as nn

from surgeon.anatomy import norm_before
from surgeon.methods.base import Method, PatchContext
from surgeon.methods.matrices import kaiming_uniform, make_matrix
from surgeon.methods.modifiers import is_expert_split
from surgeon.methods.registry import Rule

from .layer import AdapterLayer, MergedAdapter, PrunedLayerNorm, module_io


def _label(rule: Rule) -> str:
    """``4 experts (up)`` / ``keep 25% (down, up)`` / ``""`` for plan tables (no square brackets:
    rich tables read them as markup)."""
    if is_expert_split(rule.experts):
        e = rule.experts
        extra = "" if e.granularity == "all" else f", {e.granularity}"
        return f"{e.count} experts ({', '.join(e.sparse)}){extra}"
    if rule.prune is not None:
        p = rule.prune
        return f"keep {p.keep:.0%} ({', '.join(p.matrices)})"
    return ""


def _sibling(root: nn.Module | None, name: str, candidates) -> tuple[str, nn.Module]:
    """The first of ``candidates`` beside ``name`` (same parent), e.g. ``blocks.3.norm2`` for
    ``blocks.3.mlp``; returns ``(child name, module)``."""
    candidates = [candidates] if isinstance(candidates, str) else list(candidates)
    parent_name = name.rpartition(".")[0]
    parent = root.get_submodule(parent_name) if root is not None and parent_name else root
    for sibling in candidates:
        module = getattr(parent, sibling, None) if parent is not None else None
        if isinstance(module, nn.Module):
            return sibling, module
    children = ", ".join(n for n, _ in parent.named_children()) if parent is not None else "?"
    raise ValueError(f"adapter.input_from: '{parent_name or '(model)'}' has no child named {' or '.join(candidates)} "
                     f"(its children: {children})")


class Adapter(Method):
    key = "adapter"
    folds = False  # a merged adapter is a dense adapter module, not timm weights

    def cannot_patch(self, name: str, module: nn.Module, rule: Rule) -> str | None:
        if module_io(module) is None:
            return f"is a {type(module).__name__} with no Linear or Conv2d layer to size the adapter from"
        return None

    def patch(self, name: str, module: nn.Module, ctx: PatchContext) -> nn.Module:
        rule, cfg = ctx.rule, ctx.rule.config
        if isinstance(module, AdapterLayer | MergedAdapter):
            raise ValueError("already has an adapter from an earlier rule; give each module one adapter rule")
        in_features, out_features, channel_dim = module_io(module)
        if cfg.placement == "sequential":
            in_features = out_features  # the adapter reads the module's output
        bottleneck = int(cfg.bottleneck)
        ref = next((p for p in module.parameters() if p.is_floating_point()), None)
        device, dtype = (ref.device, ref.dtype) if ref is not None else (torch.device("cpu"), torch.float32)

        # Dense init on CPU from the seeded generator (reproducible, also for meta-device plans),
        # then moved: W_down kaiming-uniform(a=√5) with bias 0, W_up and its bias 0 (METHODS.md §1),
        # so training starts at the backbone's function. For MoSA these are the frozen W0.
        down_w = kaiming_uniform(bottleneck, in_features, ctx.init_generator).to(device, dtype)
        down_b = torch.zeros(bottleneck, device=device, dtype=dtype)
        up_w = torch.zeros(out_features, bottleneck, device=device, dtype=dtype)
        up_b = torch.zeros(out_features, device=device, dtype=dtype)
        down = make_matrix(down_w, "down", rule, ctx, init_bias=down_b)
        up = make_matrix(up_w, "up", rule, ctx, init_bias=up_b)
        layer = AdapterLayer(module, down, up, placement=cfg.placement, activation=cfg.activation,
                             layernorm=bool(cfg.layernorm), scale=float(cfg.scale),
                             learnable_scale=bool(cfg.learnable_scale), channel_dim=channel_dim, module_name=name,
                             label=_label(rule), dropout=float(cfg.dropout))
        prune = rule.prune
        if prune is not None and prune.norm and not isinstance(layer.norm, nn.Identity):
            layer.norm = PrunedLayerNorm(layer.norm, float(prune.keep), prune.pruned, channel_dim,
                                         ctx.init_generator)
        if isinstance(cfg.input_from, Mapping):  # {mlp: norm}: the norm in front of the target, if any
            norm = norm_before(ctx.root, name) if ctx.root is not None else None
            if norm is not None:
                layer.read_input_of(norm.rpartition(".")[2], ctx.root.get_submodule(norm))
        elif cfg.input_from:
            layer.read_input_of(*_sibling(ctx.root, name, cfg.input_from))
        layer.norm.to(device=device, dtype=dtype)
        if isinstance(layer.scale, nn.Parameter):
            layer.scale.data = layer.scale.data.to(device=device, dtype=dtype)
        return layer


METHOD = Adapter()
