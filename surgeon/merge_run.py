"""Merge a trained run into ``RUN/merged/`` and measure what merging changed.

Two artefacts, chosen by what the merge leaves behind:

- **timm folder** — when every surgery folds into existing weights (the low-rank methods: LoRA,
  MoSL, SparseLoRA, DoRA, MLAE; BitFit, full, linear) the merged model's state dict has exactly
  the keys of a fresh ``timm.create_model(name, **kwargs)``. It is written with
  ``timm.models.save_for_hf(model, dir, safe_serialization=True)``; ``config.json`` records the
  model args (img_size, patch_size, depth, num_classes, ...), the class names and the data
  config, so ``timm.create_model('local-dir:RUN/merged', pretrained=True)`` rebuilds it without
  surgeon. Its ``pretrained_cfg`` names timm's pretrained tag and licence only when the run
  started from timm's own weights (``model.pretrained: true``); a run on the built-in weights
  names their licence and origin, one on a local file or a random init names none.
- **dense adapter** — adapters add modules timm does not have; the merged model (every MoSA
  adapter now one dense adapter of the original size) is saved whole as
  ``merged/model.safetensors`` with the recipe, and ``surgeon.load_run(RUN)`` rebuilds it
  (no backbone download needed: the file holds every weight).

``merged/surgeon.json`` says which (``format``), the merge mode, and the check below.

Each merge mode has its own folder (:meth:`surgeon.rundir.RunPaths.merged_for`): ``merged/``
holds the merge of the recipe's ``eval.merge_mode`` — the one the run's figures (its
validation and test top-1, ``summary.json``, the report) were measured with — and
``surgeon merge RUN --mode jigsaw`` on an ``average`` run writes ``merged-jigsaw/`` beside it
(its top-1: ``surgeon eval RUN --merge-mode jigsaw``). ``summary.json`` keeps every mode's
check under ``merges`` and the recipe's under ``merge``.

The check: the unmerged model in eval mode (experts combined by the same merge formula on the
fly) and the merged model *reloaded from disk* are run on one fixed batch (seeded normal noise,
8 images of the model's input size); ``max_abs_diff`` is the largest absolute difference of
their logits and ``max_rel_diff`` that divided by the largest absolute unmerged logit.
"""
from __future__ import annotations

import shutil
import warnings
from pathlib import Path

import timm
import timm.data
import timm.models
import torch
import torch.nn as nn

from surgeon.builtin import BUILTIN_BACKBONES
from surgeon.config import plain
from surgeon.data.transforms import resolve_data_config
from surgeon.errors import UserError
from surgeon.io import read_json, save_tensors, set_file_mode, writable_dir, write_json
from surgeon.methods.experts import evaluation
from surgeon.methods.modes import MERGE_MODES
from surgeon.recipe.sections import ModelConfig
from surgeon.rundir import MetricsLog, RunLock, RunPaths
from surgeon.runload import load_run, load_run_recipe
from surgeon.surgery import merge, surgery_layers


def fixed_batch(model: nn.Module, n: int = 8, seed: int = 0) -> torch.Tensor:
    """``[n, C, H, W]`` standard-normal images of the model's input size (seeded, CPU generator)."""
    size = timm.data.resolve_input_data_config(model)["input_size"]
    g = torch.Generator().manual_seed(seed)
    param = next(model.parameters())
    return torch.randn(n, *size, generator=g).to(param.device)


def is_plain_timm(model: nn.Module, recipe) -> bool:
    """True if ``model`` has exactly the state-dict keys and shapes of the timm model the recipe
    names (so a timm folder can hold it)."""
    if surgery_layers(model):
        return False
    if any(torch.nn.utils.parametrize.is_parametrized(m) for m in model.modules()):
        return False
    kwargs = plain(recipe.model.kwargs)
    kwargs["num_classes"] = model.num_classes
    with torch.device("meta"):
        fresh = timm.create_model(recipe.model.name, **kwargs)
    ours = {k: v.shape for k, v in model.state_dict().items()}
    theirs = {k: v.shape for k, v in fresh.state_dict().items()}
    return ours == theirs


def _plain_timm_identity(model_cfg: ModelConfig) -> dict:
    """``save_for_hf`` model_config entries that make a folder of a surgeon built-in backbone
    (``model.name: fractal_vit_tiny``) name the timm architecture it is made of, with its
    arguments, so plain timm loads RUN/merged without importing surgeon. Empty for timm names."""
    spec = BUILTIN_BACKBONES.get(model_cfg.name)
    if spec is None:
        return {}
    args = {**spec["kwargs"], **plain(model_cfg.kwargs)}  # the recipe's kwargs win, as at build time
    return {"pretrained_cfg": {"architecture": spec["model_name"]}, "model_args": args}


#: ``pretrained_cfg`` keys that describe where timm's weights come from (not the architecture
#: or its preprocessing): true of the merged model only if it started from those weights.
_ORIGIN_KEYS = ("tag", "license", "description", "origin_url", "paper_name", "paper_ids", "notes")


def _weights_origin(model_cfg: ModelConfig) -> dict | None:
    """The ``pretrained_cfg`` origin entries RUN/merged/config.json should carry: None keeps
    timm's own (the run started from timm's weights for that tag), otherwise the entries that
    replace them (the built-in backbone's licence and origin; nothing for a local file or a
    random init, whose licence surgeon cannot know)."""
    pretrained = model_cfg.pretrained
    builtin = None
    if isinstance(pretrained, str) and pretrained.startswith("builtin:"):
        builtin = pretrained.removeprefix("builtin:")
    elif pretrained is True and model_cfg.name in BUILTIN_BACKBONES:
        builtin = model_cfg.name
    if builtin is not None:
        spec = BUILTIN_BACKBONES.get(builtin, {})
        return {"license": spec.get("license"),
                "description": f"fine-tuned by surgeon from its built-in {builtin} weights (formula-driven "
                               "pretraining; docs/builtin.md), not timm's pretrained weights"}
    if pretrained is True:
        return None
    return {}


def _write_origin(config_path: Path, origin: dict) -> None:
    """Replace the origin entries of a ``save_for_hf`` config.json's ``pretrained_cfg``."""
    config = read_json(config_path)
    cfg = config.get("pretrained_cfg") or {}
    for key in _ORIGIN_KEYS:
        cfg.pop(key, None)
    cfg.update({k: v for k, v in origin.items() if v is not None})
    config["pretrained_cfg"] = cfg
    write_json(config_path, config)


def _class_names(paths: RunPaths) -> list[str] | None:
    if paths.summary.is_file():
        try:
            names = read_json(paths.summary).get("class_names")
            if isinstance(names, list) and names:
                return [str(n) for n in names]
        except UserError:
            pass
    return None


def merge_run(run_dir, *, mode: str | None = None, model: nn.Module | None = None, log: MetricsLog | None = None,
              device: str = "cpu") -> dict:
    """Merge a run's trained model into its folder for ``mode`` (replacing an earlier merge of
    that mode): ``RUN/merged/`` for the recipe's ``eval.merge_mode``, ``RUN/merged-<mode>/``
    for another (see the module docstring).

    Args:
        run_dir: the run directory.
        mode: ``average`` | ``jigsaw``; default the recipe's ``eval.merge_mode``.
        model: the trained, unmerged model if the caller has it (the end of ``apply``); it is
            merged in place. Default: rebuilt from the run (needs the backbone weights).
        log: the run's open metrics log (opened here otherwise).

    Returns:
        ``{"mode", "format", "max_abs_diff", "max_rel_diff", "path"}`` (also logged as a
        ``merge`` event and stored in ``summary.json``).

    Raises:
        UserError: not a run, an unknown mode, ``jigsaw`` on a run without experts, a run
            directory that cannot be written, or a run another process is writing to (its lock,
            :class:`~surgeon.rundir.RunLock`).
    """
    run_dir = Path(run_dir)
    load_run_recipe(run_dir)  # a missing or foreign run is said so before anything is written
    writable_dir(run_dir, "merged model (in the run directory)")
    with RunLock(run_dir, "surgeon merge"):
        return _merge_locked(run_dir, mode=mode, model=model, log=log, device=device)


def _merge_locked(run_dir: Path, *, mode, model, log, device) -> dict:
    paths = RunPaths(run_dir)
    recipe = load_run_recipe(run_dir)
    own_mode = recipe.eval.merge_mode
    mode = mode or own_mode
    if mode not in MERGE_MODES:
        raise UserError(f"unknown merge mode '{mode}'", hint=f"use {' or '.join(MERGE_MODES)}")
    if mode != own_mode and not any(rule.experts is not None for rule in recipe.surgery):
        raise UserError(f"merge mode '{mode}' needs experts (MoSA/MoSL); the run '{recipe.name}' has none, so "
                        f"every merge mode gives the same model", where=str(paths.recipe),
                        hint=f"run `surgeon merge {run_dir}` without --mode")
    target = paths.merged_for(mode, own_mode)
    if model is None:
        model = load_run(run_dir, merged=False, device=device)
    model.eval()
    x = fixed_batch(model)
    with torch.no_grad(), evaluation(model, "merge", merge_mode=mode):
        reference = model(x).float()
    data_config = resolve_data_config(recipe.data, model)
    merge(model, mode=mode)

    tmp = paths.root / f".{target.name}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if is_plain_timm(model, recipe):
        fmt = "timm"
        names = _class_names(paths)
        model_config = {"label_names": names} if names else {}
        model_config.update(_plain_timm_identity(recipe.model))
        timm.models.save_for_hf(model.cpu(), str(tmp), safe_serialization=True,
                                model_config=model_config or None,
                                data_config={k: data_config[k] for k in ("input_size", "interpolation", "mean", "std",
                                                                         "crop_pct", "crop_mode")})
        origin = _weights_origin(recipe.model)
        if origin is not None:
            _write_origin(tmp / "config.json", origin)
    else:
        fmt = "dense-adapter"
        save_tensors(tmp / "model.safetensors", model.state_dict(),
                     metadata={"format": "surgeon-dense-adapter", "merge_mode": mode})
    shutil.copyfile(paths.recipe, tmp / "recipe.yaml")
    write_json(tmp / "surgeon.json", {"format": fmt, "merge_mode": mode, "recipe": recipe.name,
                                      "model": recipe.model.name})
    set_file_mode(tmp)  # save_for_hf's safetensors file is created 0600; the run's other files are not
    # Swap the folder in: an interrupted merge leaves the old merge (or none), never half of one.
    old = paths.root / f".{target.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        target.rename(old)
    tmp.rename(target)
    shutil.rmtree(old, ignore_errors=True)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        reloaded = load_run(run_dir, merged=True, merge_mode=mode, device=str(reference.device))
    with torch.no_grad():
        merged_out = reloaded(x.to(next(reloaded.parameters()).device)).float()
    diff = (merged_out - reference).abs().max().item()
    scale = reference.abs().max().item()
    info = {"mode": mode, "format": fmt, "max_abs_diff": diff, "max_rel_diff": diff / max(scale, 1e-12),
            "path": str(target)}
    info_file = target / "surgeon.json"
    write_json(info_file, {**read_json(info_file), **{k: info[k] for k in ("max_abs_diff", "max_rel_diff")}})
    own_log = log is None
    log = log or MetricsLog(paths.metrics)
    try:
        log.log("merge", **info)
    finally:
        if own_log:
            log.close()
    if paths.summary.is_file():
        summary = read_json(paths.summary)
        summary.setdefault("merges", {})[mode] = info
        if mode == own_mode:
            summary["merge"] = info
        write_json(paths.summary, summary)
    return info
