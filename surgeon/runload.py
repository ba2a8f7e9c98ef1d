"""Rebuilding the trained model of a run directory (``surgeon.load_run``).

A run is rebuilt from ``RUN/recipe.yaml`` (architecture, surgery, seeds) + the backbone weights
the recipe names + ``adapter.safetensors``; a merged run needs neither the recipe's backbone
weights nor surgeon when it is a timm folder. The layout is :mod:`surgeon.rundir`.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import timm
import torch.nn as nn
from safetensors import safe_open

from surgeon.errors import UserError
from surgeon.io import load_tensors, read_json
from surgeon.model import build_checked_model, rebuild_backbone
from surgeon.recipe import Recipe, load_recipe
from surgeon.rundir import RunPaths, merged_kind, read_run_recipe
from surgeon.surgery import backbone_fingerprint, load_surgery_state, merge
from surgeon.train.checkpoint import load_checkpoint


def load_run_recipe(run_dir: Path) -> Recipe:
    """The run's recipe validated again (a :class:`surgeon.recipe.Recipe`)."""
    read_run_recipe(run_dir)  # the clear errors for a missing run come from here
    return load_recipe(str(RunPaths(Path(run_dir)).recipe))


def check_backbone(model: nn.Module, adapter: Path) -> None:
    """Refuse to pair trained tensors with backbone weights other than those they were trained on."""
    try:
        with safe_open(str(adapter), framework="pt") as f:
            expected = (f.metadata() or {}).get("backbone_fingerprint")
    except Exception:  # noqa: BLE001 - load_tensors reports a corrupt file
        return
    if expected and expected != backbone_fingerprint(model):
        raise UserError("the backbone weights differ from the ones this run was trained on",
                        where=str(adapter),
                        hint="model.pretrained in RUN/recipe.yaml must name the same weights as during training "
                             "(the file was replaced, or a random init no longer reproduces with this torch/timm)")


def load_run(run_dir, *, merged: bool = True, merge_mode: str | None = None, device: str = "cpu") -> nn.Module:
    """The trained model of a run directory, in eval mode.

    Args:
        run_dir: a directory written by ``surgeon apply``.
        merged: the merged model (the merged folder of ``merge_mode`` if it exists: ``RUN/merged``
            for the recipe's own, ``RUN/merged-<mode>`` for another; else merged in memory);
            False gives the model with its surgery layers (experts, masks) as trained, e.g. for
            stochastic/fixed/ensemble inference.
        merge_mode: ``average`` | ``jigsaw``; default the recipe's ``eval.merge_mode``. With
            ``merged=False`` it is the mode the model's ``merge`` inference uses.
        device: where to put it.

    Returns:
        the model; ``model.surgeon_recipe`` holds the run's recipe (a timm folder loaded with
        ``merged=True`` is otherwise a plain timm model).

    Raises:
        UserError: not a run, no trained tensors yet, files that do not match the recipe.
    """
    run_dir = Path(run_dir)
    paths = RunPaths(run_dir)
    recipe = load_run_recipe(run_dir)
    merge_mode = merge_mode or recipe.eval.merge_mode
    folder = paths.merged_for(merge_mode, recipe.eval.merge_mode)
    kind = merged_kind(run_dir, folder) if merged else None
    remake = f"re-create it with `surgeon merge {run_dir}" + ("`" if folder == paths.merged else f" --mode {merge_mode}`")
    held = read_json(folder / "surgeon.json").get("merge_mode", "average") if kind is not None else merge_mode
    if held != merge_mode:
        # Written by a surgeon that kept one merged folder for every mode: not this mode's merge.
        raise UserError(f"{folder.name}/ holds a '{held}' merge, not the '{merge_mode}' merge"
                        + (" the run's figures use" if folder == paths.merged else ""), where=str(folder), hint=remake)
    if kind == "timm":
        try:
            model = timm.create_model(f"local-dir:{folder}", pretrained=True)
        except Exception as exc:  # noqa: BLE001
            raise UserError(f"cannot load the merged model: {exc}", where=str(folder), hint=remake) from None
    elif kind == "dense-adapter":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = build_checked_model(recipe, weights=False, probe=False)
        merge(model, mode=merge_mode)
        tensors = load_tensors(folder / "model.safetensors")
        result = model.load_state_dict(tensors, strict=False)
        if result.missing_keys or result.unexpected_keys:
            raise UserError(f"the merged checkpoint does not match the recipe's model (missing {result.missing_keys[:3]}, "
                            f"unexpected {result.unexpected_keys[:3]})", where=str(folder / "model.safetensors"),
                            hint=remake)
    else:
        model = rebuild_backbone(recipe)
        if paths.adapter.is_file():
            tensors, where = load_tensors(paths.adapter), str(paths.adapter)
            check_backbone(model, paths.adapter)
        elif paths.best.is_file():
            tensors, where = load_tensors(paths.best), str(paths.best)
            warnings.warn(f"{run_dir}: the run did not finish; using its best checkpoint so far", stacklevel=2)
        elif paths.last.is_file():
            tensors, where = load_checkpoint(paths.last)["model"], str(paths.last)
            warnings.warn(f"{run_dir}: the run did not finish; using its last checkpoint", stacklevel=2)
        else:
            raise UserError(f"run {str(run_dir)!r} has no trained tensors (no adapter.safetensors or checkpoint)",
                            hint="the run was stopped before its first checkpoint; resume it with "
                                 f"`surgeon apply --resume {run_dir}`")
        load_surgery_state(model, tensors, where)
        if hasattr(model, "surgeon_sampler"):
            model.surgeon_sampler.mode = "merge"
            model.surgeon_sampler.merge_mode = merge_mode
        if merged:
            merge(model, mode=merge_mode)
    model.surgeon_recipe = recipe
    model.eval()
    return model.to(device)
