"""The training objective: cross-entropy plus MoSA's two regularisers (METHODS.md §2).

With ``regularizers.consistency.weight`` = α and ``regularizers.feature_alignment.weight`` = β,
a batch ``x`` (labels ``y``) goes through the model twice with independent expert draws, giving
logits ``z1, z2`` ``[B, K]`` and block features ``h1_l, h2_l``::

    loss = CE(z1, y) + α · ½ (KL(p1 ‖ sg p2) + KL(p2 ‖ sg p1)) + β · Σ_{l ∈ blocks} MSE(h1_l, h2_l) / L

``sg`` is stop-gradient on the target side, as in the published code. Each KL term is computed as
``F.kl_div(log_softmax(z_pred), softmax(z_target).detach(), reduction="batchmean")``, i.e. the
divergence of the prediction from the detached target, summed over classes and averaged over
the batch; each pass gets the gradient that pulls it towards the other. Alignment features are
the chosen blocks' outputs captured by forward hooks (no stop-gradient: both passes move
together); ``L`` is the model's number of blocks (12 on ViT-B). This is the published
``DEEPREG`` term exactly: ``REG_WEIGHT · 0.01 · Σ_{l<6} MSE / 12`` is β = 0.01 (with α = 1,
blocks ``0:6``) — the value that reproduces the paper.

``batched`` runs both passes as one forward of ``[2B]``: the model's ``ExpertSampler`` is told
``groups = 2`` so every expert layer draws one expert for each half.

Without α or β (the usual case for non-MoSA recipes) there is one pass and the loss is CE.
"""
from __future__ import annotations

import re
import warnings

import torch
import torch.nn as nn
import torch.nn.functional as F

from surgeon.errors import UserError
from surgeon.methods.experts import expert_groups
from surgeon.recipe.sections import RegularizersConfig

IDENTICAL_PASSES_WARNING = 20  # consecutive steps
_BLOCK_NAME = re.compile(r"(^|.*\.)(blocks|layers)\.(\d+)$")


def consistency_loss(z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
    """½ (KL(p1 ‖ sg p2) + KL(p2 ‖ sg p1)) for logits ``[B, K]``; a scalar (nats per sample)."""
    lp1, lp2 = F.log_softmax(z1.float(), dim=-1), F.log_softmax(z2.float(), dim=-1)
    kl_1 = F.kl_div(lp1, lp2.detach(), reduction="batchmean", log_target=True)
    kl_2 = F.kl_div(lp2, lp1.detach(), reduction="batchmean", log_target=True)
    return 0.5 * (kl_1 + kl_2)


def alignment_loss(feats1: list[torch.Tensor], feats2: list[torch.Tensor], num_blocks: int | None = None) -> torch.Tensor:
    """``Σ_l MSE(h1_l, h2_l) / num_blocks`` over paired block outputs (any shapes, pairwise equal);
    ``num_blocks`` defaults to the number of pairs (then it is the mean)."""
    assert feats1 and len(feats1) == len(feats2), (len(feats1), len(feats2))
    total = torch.stack([F.mse_loss(a.float(), b.float()) for a, b in zip(feats1, feats2)]).sum()
    return total / (num_blocks or len(feats1))


def find_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's transformer/conv blocks in forward order, e.g. ViT ``blocks.0..11``,
    Swin ``layers.i.blocks.j`` (per block, not per stage), ConvNeXt ``stages.i.blocks.j``."""
    named = [(n, m) for n, m in model.named_modules() if _BLOCK_NAME.match(n)]
    # Prefer the innermost "blocks.N" (Swin's layers.N hold blocks.M): drop a module that
    # contains another match.
    names = [n for n, _ in named]
    inner = [(n, m) for n, m in named if not any(o != n and o.startswith(n + ".") for o in names)]
    # A surgery wrapper around a whole block keeps the block's name; its base_layer is not a block.
    return [(n, m) for n, m in inner if ".base_layer" not in n]


def parse_block_slice(text: str) -> slice:
    """``"0:6"`` -> ``slice(0, 6)``; ``":"`` -> all blocks."""
    start, _, stop = text.partition(":")
    return slice(int(start) if start else None, int(stop) if stop else None)


class BlockFeatures:
    """Forward hooks that keep the outputs of a chosen set of blocks during one forward pass.

    Use ``with features: model(x)`` then read ``features.outputs`` (one tensor per block, in
    forward order). Outputs that are tuples (some timm blocks) contribute their first element.
    """

    def __init__(self, blocks: list[tuple[str, nn.Module]]):
        self.blocks = blocks
        self.outputs: list[torch.Tensor] = []
        self._handles: list = []

    def _hook(self, module, args, output):
        self.outputs.append(output[0] if isinstance(output, (tuple, list)) else output)

    def __enter__(self):
        self.outputs = []
        self._handles = [m.register_forward_hook(self._hook) for _, m in self.blocks]
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []


class Objective:
    """The training loss of a recipe: CE, plus consistency and alignment when weighted.

    Args:
        model: the patched model (its ``surgeon_sampler`` is used for the batched variant).
        reg_cfg: the recipe's typed ``regularizers`` section.

    Call ``objective(model, x, y)`` with ``x [B, C, H, W]``, ``y [B]`` (``model`` may be the
    DistributedDataParallel around the model given here); returns a dict of scalar
    tensors ``loss`` (to backpropagate), ``ce``, ``consistency``, ``alignment`` (the unweighted
    terms; 0 when off).
    """

    def __init__(self, model: nn.Module, reg_cfg: RegularizersConfig):
        self.alpha = float(reg_cfg.consistency.weight)
        self.beta = float(reg_cfg.feature_alignment.weight)
        self.batched = bool(reg_cfg.consistency.batched)
        self.two_passes = self.alpha > 0 or self.beta > 0
        self.features = None
        self.num_blocks = None
        # Steps whose two passes gave identical logits, counted until they first differ (-1).
        # Right after initialisation they may legitimately agree (a zero-init up-projection
        # makes every expert the identity), so only a long streak means the draws do nothing.
        self._identical_streak = 0
        if self.beta > 0:
            blocks = find_blocks(model)
            if not blocks:
                raise UserError(f"feature_alignment: cannot find the blocks of {type(model).__name__} "
                                "(no module named like blocks.N or layers.N)",
                                where="regularizers.feature_alignment",
                                hint="set regularizers.feature_alignment.weight to 0 for this model")
            chosen = blocks[parse_block_slice(reg_cfg.feature_alignment.blocks)]
            if not chosen:
                raise UserError(f"feature_alignment.blocks '{reg_cfg.feature_alignment.blocks}' selects none of "
                                f"the model's {len(blocks)} blocks", where="regularizers.feature_alignment.blocks",
                                hint=f"use a slice within 0:{len(blocks)}")
            self.features = BlockFeatures(chosen)
            self.num_blocks = len(blocks)

    def _forward(self, model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        if self.features is None:
            return model(x), []
        with self.features:
            logits = model(x)
        return logits, list(self.features.outputs)

    def __call__(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> dict[str, torch.Tensor]:
        zero = torch.zeros((), device=x.device)
        if not self.two_passes:
            logits = model(x)
            ce = F.cross_entropy(logits.float(), y)
            return {"loss": ce, "ce": ce, "consistency": zero, "alignment": zero}
        if self.batched:
            # The sampler lives on the model itself, not on a DistributedDataParallel around it.
            core = model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model
            with expert_groups(core, 2):
                logits, feats = self._forward(model, torch.cat([x, x]))
            z1, z2 = logits.chunk(2)
            f1 = [f.chunk(2)[0] for f in feats]
            f2 = [f.chunk(2)[1] for f in feats]
        else:
            z1, f1 = self._forward(model, x)
            z2, f2 = self._forward(model, x)
        if self._identical_streak >= 0:
            same = torch.equal(z1.detach(), z2.detach())
            self._identical_streak = self._identical_streak + 1 if same else -1
            if self._identical_streak == IDENTICAL_PASSES_WARNING:
                warnings.warn(f"the two stochastic passes gave identical logits for {IDENTICAL_PASSES_WARNING} steps, "
                              "so the consistency/alignment "
                              "regularisers have no effect (do the patched layers draw experts in training mode"
                              + (" and honour sampler.groups for the batched variant?" if self.batched else "?")
                              + ")", stacklevel=2)
        ce = F.cross_entropy(z1.float(), y)
        cons = consistency_loss(z1, z2) if self.alpha > 0 else zero
        align = alignment_loss(f1, f2, self.num_blocks) if self.beta > 0 else zero
        loss = ce + self.alpha * cons + self.beta * align
        return {"loss": loss, "ce": ce, "consistency": cons, "alignment": align}
