"""Creating the timm backbone a recipe names, with or without its pretrained weights.

Two recipe fields shape the backbone beyond ``timm.create_model``'s arguments:

- ``model.tag``: preferred pretrained tags (timm's ``architecture.tag``), tried in order; the
  first one timm has for the architecture is used, so ``--model vit_base_patch16_224`` gets
  the papers' ``orig_in21k`` weights and ``--model swin_base_patch4_window7_224`` its
  ``ms_in22k`` ones. A tag written in ``model.name`` wins; an architecture with none of the
  tags uses timm's default tag (one-line notice when weights are downloaded).
- ``model.dropout``: dropout rates by role, set on the backbone's own ``nn.Dropout`` modules
  after creation (``mlp``: inside every MLP; ``attn_proj``: after the attention projection;
  ``attn``: on the attention weights; ``pos``: after the position embedding; ``head``: before
  the classifier) and ``path`` (stochastic depth, timm's ``drop_path_rate``). The published
  MoSA ViT uses 0.1 in the MLP and after the position embedding, and none in attention —
  which timm's ``proj_drop_rate`` (MLP *and* attention projection) cannot express.
"""
from __future__ import annotations

import warnings
from contextlib import nullcontext

import timm
import torch
import torch.nn as nn

import surgeon.builtin.models  # noqa: F401 - registers the built-in backbones (fractal_vit_tiny) with timm
from surgeon.builtin import BUILTIN_BACKBONES
from surgeon.config import plain
from surgeon.errors import UserError
from surgeon.recipe.sections import DropoutConfig, ModelConfig
from surgeon.weights import pretrained_kwargs


def create_backbone(model_cfg: ModelConfig, *, num_classes: int | None = None, weights: bool = True,
                    device: str | torch.device | None = None) -> nn.Module:
    """``timm.create_model`` for a recipe's ``model`` section.

    Args:
        model_cfg: the recipe's typed ``model`` section (``surgeon.recipe.section("model", {...})``
            builds one from a partial mapping).
        num_classes: classes of the new head; default ``model_cfg.num_classes`` or timm's default.
        weights: load the pretrained weights the recipe asks for; False gives random init
            (what ``plan``/``validate`` use: they never download).
        device: ``"meta"`` builds shapes only (fast, no memory) for planning.

    Raises:
        UserError: unknown model, bad kwargs, or weights that cannot be loaded.
    """
    name, notice = resolve_model_name(model_cfg)
    if not timm.is_model(name):
        raise UserError(f"unknown timm model '{name}'", hint="see timm.list_models()")
    kwargs = plain(model_cfg.kwargs)  # timm gets builtin lists and dicts, as written in the recipe
    dropout = model_cfg.dropout
    if dropout.path is not None:
        kwargs["drop_path_rate"] = float(dropout.path)
    classes = num_classes or model_cfg.num_classes
    if classes:
        kwargs["num_classes"] = classes
    pretrained = model_cfg.pretrained if weights else False
    if pretrained is not False:
        kwargs.update(pretrained_kwargs(name, pretrained))
        if notice and pretrained is True:
            warnings.warn(notice, stacklevel=2)
    elif weights:
        warnings.warn("model.pretrained is false: PEFT on a randomly initialised backbone is rarely what you want",
                      stacklevel=2)
    ctx = torch.device(device) if device is not None else nullcontext()
    try:
        with ctx:
            model = timm.create_model(name, **kwargs)
        set_dropout(model, dropout)
        return model
    except TypeError as exc:
        raise UserError(f"timm.create_model('{name}') rejected model.kwargs: {exc}",
                        hint="check model.kwargs against the model's constructor arguments") from None
    except ArithmeticError as exc:  # e.g. patch_size: 0, whatever the weights
        raise UserError(f"timm.create_model('{name}', **{kwargs}) failed: {type(exc).__name__}: {exc}",
                        hint="check model.kwargs (sizes must be positive; img_size divisible by patch_size)") from None
    except (AssertionError, ValueError, RuntimeError) as exc:
        if pretrained is not False:
            raise
        raise UserError(f"timm.create_model('{name}', **{kwargs}) failed: {exc}",
                        hint="check model.kwargs (e.g. img_size must be divisible by patch_size)") from None


def resolve_model_name(model_cfg: ModelConfig) -> tuple[str, str | None]:
    """The timm name a recipe's ``model`` section creates, with its pretrained tag.

    Returns:
        ``(name, notice)``: e.g. ``("vit_base_patch16_224.orig_in21k", None)``; ``notice`` is a
        one-line message when the recipe prefers tags the architecture does not have (the
        name is then the bare architecture: timm's default tag).
    """
    name = model_cfg.name
    tags = model_cfg.tag or []
    tags = [tags] if isinstance(tags, str) else list(tags)
    if "." in name or not tags or not timm.is_model(name) or name in BUILTIN_BACKBONES:
        return name, None  # surgeon's built-in backbones have one set of weights: no tag to prefer
    available = {n.split(".", 1)[1] for n in timm.list_pretrained(f"{name}.*")}
    for tag in tags:
        if tag in available:
            return f"{name}.{tag}", None
    default = timm.models.get_pretrained_cfg(name)
    default_tag = getattr(default, "tag", None) if default is not None else None
    return name, (f"{name} has none of the pretrained tags {', '.join(tags)} (model.tag); using timm's default"
                  + (f" ({default_tag})" if default_tag else ""))


# role -> (which nn.Dropout modules, by dotted-name predicate)
DROPOUT_ROLES = {
    "mlp": lambda n: ".mlp." in f".{n}",
    "attn_proj": lambda n: n.endswith("attn.proj_drop"),
    "attn": lambda n: n.endswith("attn.attn_drop"),
    "pos": lambda n: n.rsplit(".", 1)[-1] == "pos_drop",
    "head": lambda n: n.rsplit(".", 1)[-1] == "head_drop",
}


def set_dropout(model: nn.Module, rates: DropoutConfig) -> None:
    """Set the rate of the backbone's dropout modules by role (``model.dropout``; None = leave).

    Warns (one line) for a role the architecture has no dropout module for.
    """
    for role, matches in DROPOUT_ROLES.items():
        rate = getattr(rates, role)
        if rate is None:
            continue
        modules = [m for n, m in model.named_modules() if isinstance(m, nn.Dropout) and matches(n)]
        if not modules and rate > 0:
            warnings.warn(f"model.dropout.{role}: {type(model).__name__} has no {role} dropout module; "
                          f"the rate {rate:g} has no effect", stacklevel=3)
        for m in modules:
            m.p = float(rate)
