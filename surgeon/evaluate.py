"""``surgeon eval``: top-1 of a trained run under any of the four MoSA inference mechanisms.

The evaluation itself is :func:`surgeon.train.evaluation.evaluate`; this module rebuilds the
run's model (merged when that is what ``merge`` inference means) and its data.

Refused (exit 2): a model whose weights are not finite (a diverged run has no score), and data
whose class names differ from the run's (the same count of other classes would be scored by
index, silently) unless ``allow_class_mismatch``.
"""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from surgeon.data import build_loader, build_splits
from surgeon.errors import UserError
from surgeon.io import read_json
from surgeon.methods.modes import INFERENCE_MODES, MERGE_MODES
from surgeon.recipe import Recipe
from surgeon.rundir import RunPaths, merged_kind
from surgeon.runload import load_run, load_run_recipe
from surgeon.train.evaluation import EvalResult, evaluate


def num_experts(recipe: Recipe) -> int:
    """The smallest expert count of the recipe's rules (0 without experts)."""
    counts = [r.experts.count for r in recipe.surgery if r.experts is not None]
    return min(counts) if counts else 0


def run_class_names(run_dir: Path) -> list[str] | None:
    """The class names a run was trained on: ``summary.json``, else the ``start`` event of
    ``metrics.jsonl`` (an unfinished run); None if neither says."""
    paths = RunPaths(Path(run_dir))
    if paths.summary.is_file():
        try:
            names = read_json(paths.summary).get("class_names")
            if isinstance(names, list):
                return [str(n) for n in names]
        except UserError:
            pass
    try:
        with open(paths.metrics, encoding="utf-8") as f:
            for line in f:
                event = json.loads(line)
                if event.get("event") == "start" and isinstance(event.get("class_names"), list):
                    return [str(n) for n in event["class_names"]]
    except (OSError, ValueError):
        pass
    return None


def _last_event(run_dir: Path) -> dict:
    """The last complete event of ``metrics.jsonl`` ({} if none)."""
    try:
        lines = RunPaths(Path(run_dir)).metrics.read_text(encoding="utf-8").splitlines()
    except OSError:
        return {}
    for line in reversed(lines):
        try:
            return json.loads(line)
        except ValueError:
            continue  # a torn last line
    return {}


def eval_run(run_dir, *, data: str | None = None, mode: str | None = None, split: str | None = None,
             device: str = "cpu", batch_size: int | None = None,
             merge_mode: str | None = None, allow_class_mismatch: bool = False) -> tuple[EvalResult, str, dict]:
    """Evaluate a run directory (what ``surgeon eval`` prints).

    Args:
        data: a ``data.source`` spec to evaluate on instead of the run's data (same classes).
        mode: inference mechanism; default the recipe's ``eval.inference``.
        split: ``test`` | ``val`` | ``train``; default test if the data has one, else val.
        merge_mode: how ``merge`` inference merges the experts; default the recipe's
            ``eval.merge_mode``. Its merged folder (``merged/``, or ``merged-<mode>/`` from
            ``surgeon merge RUN --mode <mode>``) is evaluated when it exists.
        allow_class_mismatch: score data whose class names differ from the run's (labels
            matched by index) instead of refusing it.

    Returns:
        (result, split name, info) where info has ``source``, ``model``, ``recipe``, ``merge_mode``.

    Raises:
        UserError: not a run, unknown split, class count or names that do not match the model's,
            a model with non-finite weights (the run diverged).
    """
    recipe = load_run_recipe(Path(run_dir))
    ev = recipe.eval
    mode = mode or ev.inference
    if mode not in INFERENCE_MODES:
        raise UserError(f"unknown inference '{mode}'", hint="choose one of: " + ", ".join(INFERENCE_MODES))
    if mode != "merge" and not num_experts(recipe):
        raise UserError(f"inference '{mode}' needs experts; the recipe '{recipe.name}' has none",
                        hint="use --inference merge")
    merge_mode = merge_mode or ev.merge_mode
    if merge_mode not in MERGE_MODES:
        raise UserError(f"unknown merge mode '{merge_mode}'", hint="choose one of: " + ", ".join(MERGE_MODES))
    if merge_mode != ev.merge_mode and not num_experts(recipe):
        raise UserError(f"merge mode '{merge_mode}' needs experts; the recipe '{recipe.name}' has none",
                        hint="omit --merge-mode")
    last = _last_event(Path(run_dir))
    if (not RunPaths(Path(run_dir)).adapter.is_file() and last.get("event") == "stopped"
            and str(last.get("reason", "")).startswith("nonfinite")):
        raise UserError(f"the run diverged at step {last.get('step')} (non-finite values) and has no result to "
                        "evaluate", where=str(run_dir),
                        hint="see the nonfinite/stopped events in metrics.jsonl; train again with a lower "
                             "train.base_lr or train.grad_clip")
    # merge: the merged artefact of that mode when there is one (what users deploy); otherwise
    # the trained layers with the sampler in merge mode.
    folder = RunPaths(Path(run_dir)).merged_for(merge_mode, ev.merge_mode)
    model = load_run(run_dir, merged=(mode == "merge" and merged_kind(Path(run_dir), folder) is not None),
                     merge_mode=merge_mode, device=device)
    bad = next((n for n, p in model.named_parameters() if p.is_floating_point() and not bool(torch.isfinite(p).all())),
               None)
    if bad is not None:
        raise UserError(f"the run's model has non-finite (NaN or infinite) weights ({bad}): the run diverged and "
                        "has no score", where=str(run_dir),
                        hint="see the nonfinite/stopped events in metrics.jsonl; train again with a lower "
                             "train.base_lr or train.grad_clip")
    data_cfg = dataclasses.replace(recipe.data, source=data) if data else recipe.data
    classes = model.num_classes if hasattr(model, "num_classes") else None
    splits = build_splits(data_cfg, model, seed=data_cfg.seed, num_classes=classes)
    if classes is not None and splits.num_classes != classes:
        raise UserError(f"the data has {splits.num_classes} classes but the run's model predicts {classes}",
                        where=data or data_cfg.source, hint="evaluate on data with the run's classes")
    trained = run_class_names(Path(run_dir))
    if trained is not None and list(splits.class_names) != trained and not allow_class_mismatch:
        i = next(i for i, (a, b) in enumerate(zip(trained + [None] * len(splits.class_names), splits.class_names))
                 if a != b)
        raise UserError(f"the data's classes differ from the run's: class {i} is {splits.class_names[i]!r} in the data "
                        f"but {trained[i] if i < len(trained) else None!r} in the run "
                        f"({sum(a != b for a, b in zip(trained, splits.class_names))} of {len(trained)} names differ)",
                        where=data or data_cfg.source,
                        hint="evaluate on data with the run's classes, or pass --allow-class-mismatch to score it "
                             "anyway (labels are matched by index)")
    if split is None:
        split = "test" if splits.test is not None else "val"
    dataset = getattr(splits, split, None) if split in ("train", "val", "test") else None
    if dataset is None:
        raise UserError(f"the data has no '{split}' split", where=data_cfg.source,
                        hint="choose --split among: " + ", ".join(s for s in ("train", "val", "test")
                                                                   if getattr(splits, s) is not None))
    if split == "train":
        dataset = dataset.with_transform(splits.val.transform) if splits.val is not None else dataset
    loader = build_loader(dataset, batch_size=batch_size or recipe.train.batch_size, shuffle=False,
                          seed=recipe.train.seed, num_workers=recipe.data.num_workers)
    result = evaluate(model, loader, mode=mode, expert=ev.expert, merge_mode=merge_mode,
                      num_classes=splits.num_classes, class_names=splits.class_names)
    return result, split, {"source": data_cfg.source, "model": recipe.model.name, "recipe": recipe.name,
                           "merge_mode": merge_mode if num_experts(recipe) else None}
