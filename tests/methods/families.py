"""The one table of tiny backbone families the method tests run on, and the helpers that build,
perturb and compare models (not tests themselves).

Every family is a real timm architecture at a few-KB size: ViT, DeiT, Swin, SwinV2, ConvNeXt
(NCHW 1x1-conv MLPs and NHWC Linear MLPs), EVA-02 and BEiT. ``mlp`` / ``attn`` list the channel
width of every block (one entry per module a ``**.blocks.*.mlp`` / ``**.blocks.*.attn`` selector
matches), so parameter counts can be computed without the code under test.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import timm
import torch
import torch.nn as nn

import surgeon
from surgeon.methods.lowrank import LowRankLayer
from surgeon.methods.matrices import PrunedMatrix

from ..helpers import ROOT

warnings.filterwarnings("ignore", message=".*pretrained is false.*")


@dataclass(frozen=True)
class Family:
    model: str
    kwargs: dict
    mlp: tuple[int, ...]   # channel width of each block's MLP
    attn: tuple[int, ...]  # channel width of each block's attention (empty: no attention)
    bypass: bool = False   # the attention computes F.linear(x, qkv.weight, ...): the weight path
    fc1: bool = True       # each block's MLP has an ``fc1`` (C -> 4C); EVA-02's SwiGLU has fc1_g/fc1_x

    @property
    def qkv(self) -> bool:
        """Has a fused ``attn.qkv`` Linear per block."""
        return bool(self.attn)


_CONVNEXT = {"depths": [1, 1, 1, 1], "dims": [16, 32, 48, 64], "ls_init_value": 1.0,  # layer scale 1: effects visible
             "pretrained_cfg_overlay": {"input_size": [3, 32, 32]}}
FAMILIES = {
    "vit": Family("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}, (192, 192), (192, 192)),
    "deit": Family("deit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2}, (192, 192), (192, 192)),
    "swin": Family("swin_tiny_patch4_window7_224", {"img_size": 32, "patch_size": 4, "window_size": 4,
                                                    "depths": [1, 1], "num_heads": [1, 2], "embed_dim": 32},
                   (32, 64), (32, 64)),
    "swinv2": Family("swinv2_tiny_window8_256", {"img_size": 32, "window_size": 4, "embed_dim": 32, "depths": [1, 1],
                                                 "num_heads": [2, 4]}, (32, 64), (32, 64), bypass=True),
    "convnext": Family("convnext_atto", _CONVNEXT, (16, 32, 48, 64), ()),                         # NCHW 1x1-conv MLPs
    "convnext_linear": Family("convnext_atto", {**_CONVNEXT, "conv_mlp": False}, (16, 32, 48, 64), ()),  # NHWC Linear
    "eva02": Family("eva02_tiny_patch14_224", {"img_size": 28, "depth": 2}, (192, 192), (192, 192), bypass=True,
                    fc1=False),
    "beit": Family("beit_base_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 64,
                                             "num_heads": 2}, (64, 64), (64, 64), bypass=True),
}
QKV = "**.blocks.*.attn.qkv"
FC1 = "**.blocks.*.mlp.fc1"  # Linear in ViT/Swin, 1x1 Conv2d in ConvNeXt atto
NUM_CLASSES = 5


def recipe_dict(family: str, rules: list[dict], seed: int = 0) -> dict:
    """A recipe mapping: ``family``'s tiny model (random init, 5 classes) with ``rules``."""
    fam = FAMILIES[family]
    return {"name": "t", "model": {"name": fam.model, "pretrained": False, "num_classes": NUM_CLASSES,
                                   "kwargs": fam.kwargs},
            "surgery": rules, "train": {"seed": seed}}


def build(family: str, rules: list[dict], seed: int = 0) -> nn.Module:
    """A tiny model of ``family`` with ``rules`` applied.

    The backbone's random weights come from a fixed global seed (the same backbone for every
    call); ``seed`` is the recipe's ``train.seed`` (surgery init, masks, expert draws).
    """
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = surgeon.build_model(recipe_dict(family, rules, seed), weights=False)
    wake(model)
    return model


def load(recipe: str, family: str, **overrides) -> surgeon.Recipe:
    """A shipped recipe on ``family``'s tiny model (random init, 5 classes), with ``overrides``."""
    fam = FAMILIES[family]
    return surgeon.load_recipe(ROOT / "recipes" / f"{recipe}.yaml",
                               overrides={"model.name": fam.model, "model.pretrained": False, "model.kwargs": fam.kwargs,
                                          "model.num_classes": NUM_CLASSES, **overrides})


def build_recipe(recipe: str, family: str, seed: int = 0, **overrides) -> nn.Module:
    """:func:`load` then build; ``seed`` seeds the backbone's random init."""
    torch.manual_seed(seed)
    return surgeon.build_model(load(recipe, family, **overrides), weights=False)


def plain_timm(family: str) -> nn.Module:
    """The family's plain timm model (what a folding method's merged state dict must load into)."""
    fam = FAMILIES[family]
    return timm.create_model(fam.model, pretrained=False, num_classes=NUM_CLASSES, **fam.kwargs)


def wake(model: nn.Module) -> None:
    """Give branch gates that a random init closes a pretrained-like value.

    SwinV2 zero-initialises its res-post-norm weights and ConvNeXt its layer scale (1e-6), so
    in a random model those branches are (almost) multiplied by 0 and no surgery inside them
    could change the output: a fact of the random init, not of the surgery.
    """
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name and name.endswith("weight") and not p.any():
                p.fill_(1.0)
            elif p.dim() == 1 and name.endswith("gamma") and p.abs().max() <= 1e-5:
                p.fill_(0.5)


def low_rank_layers(model: nn.Module) -> list[LowRankLayer]:
    return [m for m in model.modules() if isinstance(m, LowRankLayer)]


def perturb_low_rank(model: nn.Module, seed: int = 1, std: float = 0.2) -> None:
    """Random values in every trainable tensor of the low-rank layers (B included), pruned entries kept 0."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for layer in low_rank_layers(model):
            for name, p in layer.named_parameters():
                if name.startswith("base_layer"):
                    continue
                p.add_(torch.randn(p.shape, generator=gen) * std)
            for m in layer.modules():
                if isinstance(m, PrunedMatrix):
                    m.weight.mul_(m.mask)


def image(model: nn.Module, batch: int = 2, seed: int = 0) -> torch.Tensor:
    """A seeded standard-normal batch of the model's input size."""
    size = timm.data.resolve_input_data_config(model)["input_size"]
    return torch.randn(batch, *size, generator=torch.Generator().manual_seed(seed))


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).detach())
