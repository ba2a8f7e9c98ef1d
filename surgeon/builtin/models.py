"""The shipped backbones as timm model names: importing this module registers them with timm.

After ``import surgeon.builtin.models``::

    timm.create_model("fractal_vit_tiny", pretrained=True)                  # backbone only (num_classes 0)
    timm.create_model("fractal_vit_tiny", pretrained=True, num_classes=10)  # + a fresh 10-class head

builds ``vit_tiny_patch16_224`` with ``img_size=32, patch_size=8, depth=6`` and loads the weights
shipped in ``surgeon/builtin/weights/`` (no network). surgeon imports this module wherever it
imports timm to build or check a model (:mod:`surgeon.backbone`, the recipe's model-name check),
so a recipe can say ``model: {name: fractal_vit_tiny, pretrained: true}`` and the CLI
``--model fractal_vit_tiny``. ``import surgeon`` alone does not register it, because it must not
import torch/timm (start-up time): plain timm users import this module.

The pretrained config is vit_tiny_patch16_224's (bicubic, crop_pct 0.9, mean = std = 0.5) at
32x32 input, with ``file=`` the shipped ``.safetensors`` and ``num_classes=0``: the file holds
no classifier, so timm keeps the freshly initialised head for any ``num_classes``.
"""
from __future__ import annotations

from timm.models import register_model
from timm.models.vision_transformer import _create_vision_transformer

from surgeon.builtin import BUILTIN_BACKBONES

_SPEC = BUILTIN_BACKBONES["fractal_vit_tiny"]

#: timm reads a module's ``default_cfgs`` when :func:`register_model` registers an entrypoint.
default_cfgs = {
    "fractal_vit_tiny": dict(
        file=str(_SPEC["file"]),
        num_classes=0,
        input_size=(3, 32, 32),
        fixed_input_size=True,
        interpolation="bicubic",
        crop_pct=0.9,
        crop_mode="center",
        mean=(0.5, 0.5, 0.5),
        std=(0.5, 0.5, 0.5),
        first_conv="patch_embed.proj",
        classifier="head",
        license=_SPEC["license"],
    ),
}


@register_model
def fractal_vit_tiny(pretrained: bool = False, **kwargs):
    """surgeon's formula-pretrained ViT (docs/builtin.md): ViT-Tiny, 32x32 input, 8x8 patches,
    6 blocks, 2.71M backbone parameters. ``pretrained=True`` loads the shipped weights.

    Keyword arguments override the architecture's (e.g. ``img_size=64``: timm resamples the
    position embeddings of the shipped weights).
    """
    # vit_tiny_patch16_224's width and heads, with the built-in's img_size, patch_size and depth
    args = dict(embed_dim=192, num_heads=3, **_SPEC["kwargs"])
    return _create_vision_transformer("fractal_vit_tiny", pretrained=pretrained, **dict(args, **kwargs))
