"""Creating the timm backbone a recipe names, with or without its pretrained weights."""
from __future__ import annotations

import warnings
from contextlib import nullcontext

import timm
import torch
import torch.nn as nn

import surgeon.builtin.models  # noqa: F401 - registers the built-in backbones (fractal_vit_tiny) with timm
from surgeon.errors import UserError


def create_backbone(model_cfg: dict, *, num_classes: int | None = None, weights: bool = True,
                    device: str | torch.device | None = None) -> nn.Module:
    """``timm.create_model`` for a recipe's ``model`` section.

    Args:
        model_cfg: the recipe's ``model`` mapping (name, pretrained, num_classes, kwargs).
        num_classes: classes of the new head; default ``model_cfg['num_classes']`` or timm's default.
        weights: load the pretrained weights the recipe asks for; False gives random init
            (what ``plan``/``validate`` use: they never download).
        device: ``"meta"`` builds shapes only (fast, no memory) for planning.

    Raises:
        UserError: unknown model, bad kwargs, or weights that cannot be loaded.
    """
    name = model_cfg["name"]
    if not timm.is_model(name):
        raise UserError(f"unknown timm model '{name}'", hint="see timm.list_models()")
    kwargs = dict(model_cfg.get("kwargs") or {})
    classes = num_classes or model_cfg.get("num_classes")
    if classes:
        kwargs["num_classes"] = classes
    pretrained = model_cfg.get("pretrained", False) if weights else False
    if pretrained is not False:
        from surgeon.weights import pretrained_kwargs  # only needed when weights are loaded
        kwargs.update(pretrained_kwargs(name, pretrained))
    elif weights:
        warnings.warn("model.pretrained is false: PEFT on a randomly initialised backbone is rarely what you want",
                      stacklevel=2)
    ctx = torch.device(device) if device is not None else nullcontext()
    try:
        with ctx:
            return timm.create_model(name, **kwargs)
    except TypeError as exc:
        raise UserError(f"timm.create_model('{name}') rejected model.kwargs: {exc}",
                        hint="check model.kwargs against the model's constructor arguments") from None
    except (AssertionError, ValueError, RuntimeError) as exc:
        if pretrained is not False:
            raise
        raise UserError(f"timm.create_model('{name}', **{kwargs}) failed: {exc}",
                        hint="check model.kwargs (e.g. img_size must be divisible by patch_size)") from None
