"""The recipe's model: its timm backbone with the surgery applied.

:func:`build_model` is the public door (``surgeon.build_model``); :func:`build_checked_model`
adds what a training run needs on top: weight-loading problems a user can fix turned into
:class:`~surgeon.errors.UserError` and timm's load report checked, so a file that leaves
backbone tensors random is refused.
"""
from __future__ import annotations

import warnings

import torch.nn as nn

from surgeon.backbone import create_backbone
from surgeon.errors import UserError
from surgeon.recipe import Recipe, load_recipe
from surgeon.seeding import seed_everything
from surgeon.surgery import apply_surgery, classifier_heads
from surgeon.weights import check_load_report, load_report


def build_model(recipe: Recipe | str | dict, *, weights: bool = True, num_classes: int | None = None,
                device=None, probe: bool = True) -> nn.Module:
    """The recipe's timm backbone with its surgery applied.

    Args:
        recipe: a :class:`~surgeon.recipe.Recipe`, or anything :func:`~surgeon.recipe.load_recipe` accepts.
        weights: load the recipe's pretrained weights (False: random init, never downloads).
        num_classes: head size; default ``model.num_classes`` of the recipe.
        device: e.g. ``"meta"`` to build shapes only (planning).
        probe: run one forward pass to prove every patch takes effect.

    Returns:
        the patched ``nn.Module``; its :class:`~surgeon.surgery.SurgeryPlan` is ``model.surgeon_plan``.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    model = create_backbone(recipe.model, num_classes=num_classes, weights=weights, device=device)
    plan = apply_surgery(model, recipe.surgery, seed=recipe.train.seed, locate=recipe.where, probe=probe)
    model.surgeon_plan = plan
    return model


def build_checked_model(recipe: Recipe, *, num_classes: int | None = None, weights: bool = True, device="cpu",
                        probe: bool = True) -> nn.Module:
    """:func:`build_model` on ``device`` with the weight-loading problems a user can fix turned into
    :class:`UserError` (no network, a file of another architecture, a corrupt file) and timm's
    load report checked (a file that leaves backbone tensors random is refused)."""
    pretrained = recipe.model.pretrained if weights else False
    where = recipe.where(("model", "pretrained"))
    try:
        with load_report() as report:
            model = build_model(recipe, num_classes=num_classes, weights=weights, probe=probe)
    except UserError:
        raise
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        if pretrained is False:
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:400]
        hint = ("the file must hold weights of the same architecture as model.name/model.kwargs"
                if pretrained is not True else
                "download the weights on a machine with network and pass them as a file or local-dir:FOLDER")
        raise UserError(f"cannot load the pretrained weights {pretrained!r} into {recipe.model.name}: {first}",
                        where=where, hint=hint) from None
    if pretrained is not False:
        heads = {id(h) for h in classifier_heads(model)}  # two for distilled models (LeViT, DeiT-distilled)
        head_names = [n for n, m in model.named_modules() if id(m) in heads and n] or ["head", "fc", "classifier"]
        check_load_report(report, head_names, str(pretrained))
    return model.to(device)


def rebuild_backbone(recipe: Recipe, device="cpu") -> nn.Module:
    """A run's patched model with its backbone weights, before the trained tensors are loaded.

    Seeded exactly as ``surgeon apply`` seeds it, so a ``pretrained: false`` backbone comes back
    with the same random weights (verified against the adapter's fingerprint by the caller).
    """
    seed_everything(recipe.train.seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="model.pretrained is false")
        return build_checked_model(recipe, probe=False, device=device)
