"""surgeon: declarative parameter-efficient surgery for timm backbones.

    import surgeon
    recipe = surgeon.load_recipe("recipes/mlae.yaml", overrides={"model.name": "vit_small_patch16_224"})
    model = surgeon.build_model(recipe)        # timm model with the surgery applied
    surgeon.merge(model, mode="average")       # in place: experts merged, LoRA-family folded away
    model = surgeon.load_run("runs/x", merged=True)
"""
from __future__ import annotations

__version__ = "0.1.0"

from surgeon.errors import RecipeError, UserError
from surgeon.recipe import Recipe, load_recipe

# ``import surgeon`` must not import torch or timm (seconds): the CLI's --help, ls, show ... import
# this package. The names that need torch are loaded on first use.
_LAZY = {"SurgeryPlan": "surgeon.surgery", "apply_surgery": "surgeon.surgery", "merge": "surgeon.surgery"}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'surgeon' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


def build_model(recipe: Recipe | str | dict, *, weights: bool = True, num_classes: int | None = None,
                device=None, probe: bool = True):
    """The recipe's timm backbone with its surgery applied.

    Args:
        recipe: a :class:`Recipe`, or anything :func:`load_recipe` accepts.
        weights: load the recipe's pretrained weights (False: random init, never downloads).
        num_classes: head size; default ``model.num_classes`` of the recipe.
        device: e.g. ``"meta"`` to build shapes only (planning).
        probe: run one forward pass to prove every patch takes effect.

    Returns:
        the patched ``nn.Module``; its :class:`SurgeryPlan` is ``model.surgeon_plan``.
    """
    # torch + timm (seconds to import): only when a model is built
    from surgeon.backbone import create_backbone
    from surgeon.surgery import apply_surgery

    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    model = create_backbone(recipe["model"], num_classes=num_classes, weights=weights, device=device)
    plan = apply_surgery(model, recipe["surgery"], seed=recipe["train"]["seed"], locate=recipe.where, probe=probe)
    model.surgeon_plan = plan
    return model


def load_run(run_dir, *, merged: bool = True, device: str = "cpu"):
    """The trained model of a run directory (merged by default). See :mod:`surgeon.run`."""
    from surgeon.run import load_run as _load_run

    return _load_run(run_dir, merged=merged, device=device)


__all__ = ["Recipe", "RecipeError", "SurgeryPlan", "UserError", "apply_surgery", "build_model", "load_recipe",
           "load_run", "merge", "__version__"]
