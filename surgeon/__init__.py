"""surgeon: declarative parameter-efficient surgery for timm backbones.

    import surgeon
    recipe = surgeon.load_recipe("recipes/mlae.yaml", overrides={"model.name": "vit_small_patch16_224"})
    model = surgeon.build_model(recipe)        # timm model with the surgery applied
    surgeon.merge(model, mode="average")       # in place: experts merged, LoRA-family folded away
    model = surgeon.load_run("runs/x", merged=True)

This module is the package's face: it defines nothing itself. ``import surgeon`` must not
import torch or timm (seconds): the CLI's ``--help``, ``ls``, ``show`` ... import this package,
so the names that need torch load on first use (:func:`__getattr__`).
"""
from __future__ import annotations

import importlib

from surgeon.resources import VERSION as __version__

from surgeon.errors import RecipeError, UserError
from surgeon.recipe import Recipe, load_recipe

# name -> the module that defines it (loaded on first use: these import torch and timm).
_LAZY = {"build_model": "surgeon.model", "load_run": "surgeon.runload", "merge": "surgeon.surgery",
         "SurgeryPlan": "surgeon.surgery", "apply_surgery": "surgeon.surgery"}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(_LAZY[name]), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'surgeon' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


__all__ = ["Recipe", "RecipeError", "SurgeryPlan", "UserError", "apply_surgery", "build_model", "load_recipe",
           "load_run", "merge", "__version__"]
