"""Top-1 accuracy (overall and per class) under the four MoSA inference mechanisms.

``inference`` (paper Table 6):

- ``merge`` — experts merged into one dense weight (``sampler.merge_mode``: average | jigsaw);
- ``stochastic`` — every forward draws experts, as in training;
- ``fixed`` — always expert ``expert``;
- ``ensemble`` — the mean of the logits of the N single-expert models (N forwards).

The mechanisms are switched with :mod:`surgeon.methods.experts` (the model's shared
``ExpertSampler``: ``mode``, ``expert``, ``merge_mode``). Models without experts (or already
merged) ignore them. Evaluation never disturbs training: the sampler's generator and
torch's RNG are restored afterwards, so evaluating more often does not change the trained
weights.
"""
from __future__ import annotations

import math
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

INFERENCE_MODES = ("merge", "stochastic", "fixed", "ensemble")


@dataclass
class EvalResult:
    """Accuracy of one split.

    Attributes:
        top1: percent of correct top-1 predictions.
        loss: mean cross-entropy (nats per image).
        n: images evaluated.
        labels, preds: per image, dataset order.
        per_class: ``[{"class", "index", "n", "top1"}]`` (top1 None for a class with no images).
    """

    top1: float
    loss: float
    n: int
    inference: str
    labels: list[int] = field(default_factory=list)
    preds: list[int] = field(default_factory=list)
    per_class: list[dict] = field(default_factory=list)


def num_experts(recipe) -> int:
    """The smallest expert count of the recipe's rules (0 without experts)."""
    counts = [r["experts"]["count"] for r in recipe["surgery"] if "experts" in r]
    return min(counts) if counts else 0


@contextmanager
def inference(model: nn.Module, mode: str = "merge", *, expert: int = 0, merge_mode: str = "average"):
    """Eval mode with the expert layers set for ``mode`` (``ensemble``: set per pass by
    :func:`logits_of`); afterwards the train/eval mode, the sampler settings, the sampler's
    generator and torch's RNG are all as before."""
    from surgeon.methods.experts import inference as layer_inference
    from surgeon.methods.experts import sampler_of

    sampler = sampler_of(model)
    generator_state = sampler.generator.get_state() if sampler is not None else None
    torch_state = torch.get_rng_state()
    was_training = model.training
    model.eval()
    try:
        with layer_inference(model, "merge" if mode == "ensemble" else mode, expert, merge_mode):
            yield
    finally:
        model.train(was_training)
        torch.set_rng_state(torch_state)
        if sampler is not None:
            sampler.generator.set_state(generator_state)


def logits_of(model: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """Logits ``[B, K]`` of ``x`` under ``mode`` (call inside :func:`inference`); ``ensemble``
    averages the logits of the N single-expert passes."""
    if mode == "ensemble":
        from surgeon.methods.experts import ensemble_logits

        return ensemble_logits(model, x)
    return model(x)


def autocast_context(device: torch.device, precision: str):
    """``torch.autocast`` for ``bf16``/``fp16`` (``precision`` already resolved), else a no-op."""
    if precision in ("bf16", "fp16"):
        return torch.autocast(device.type, dtype=torch.bfloat16 if precision == "bf16" else torch.float16)
    return nullcontext()


@torch.no_grad()
def evaluate(model: nn.Module, loader, *, mode: str = "merge", expert: int = 0, merge_mode: str = "average",
             num_classes: int, class_names: list[str] | None = None, precision: str = "fp32") -> EvalResult:
    """Evaluate ``model`` on every batch of ``loader`` (items ``[B, C, H, W]``, ``[B]``).

    Args:
        mode: one of :data:`INFERENCE_MODES`.
        expert: the expert of ``fixed``.
        merge_mode: ``average`` | ``jigsaw`` for ``merge``.
        num_classes: K (sizes the per-class table).
        precision: ``fp32`` | ``bf16`` | ``fp16`` autocast.
    """
    if mode not in INFERENCE_MODES:
        raise ValueError(f"unknown inference mode {mode!r}")
    device = next(model.parameters()).device
    labels, preds = [], []
    loss_sum = 0.0
    with inference(model, mode, expert=expert, merge_mode=merge_mode):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast_context(device, precision):
                z = logits_of(model, x, mode)
            z = z.float()
            loss_sum += F.cross_entropy(z, y, reduction="sum").item()
            labels += y.tolist()
            preds += z.argmax(dim=-1).tolist()
    n = len(labels)
    correct = sum(int(a == b) for a, b in zip(labels, preds))
    names = list(class_names) if class_names else [str(i) for i in range(num_classes)]
    per_class = []
    for k in range(num_classes):
        idx = [i for i, a in enumerate(labels) if a == k]
        hit = sum(int(preds[i] == k) for i in idx)
        per_class.append({"class": names[k] if k < len(names) else str(k), "index": k, "n": len(idx),
                          "top1": 100.0 * hit / len(idx) if idx else None})
    return EvalResult(top1=100.0 * correct / n if n else math.nan, loss=loss_sum / n if n else math.nan, n=n,
                      inference=mode, labels=labels, preds=preds, per_class=per_class)


def eval_run(run_dir, *, data: str | None = None, mode: str | None = None, split: str | None = None,
             device: str = "cpu", batch_size: int | None = None) -> tuple[EvalResult, str, dict]:
    """Evaluate a run directory (what ``surgeon eval`` prints).

    Args:
        data: a ``data.source`` spec to evaluate on instead of the run's data (same classes).
        mode: inference mechanism; default the recipe's ``eval.inference``.
        split: ``test`` | ``val`` | ``train``; default test if the data has one, else val.

    Returns:
        (result, split name, info) where info has ``source``, ``model``, ``recipe``.

    Raises:
        UserError: not a run, unknown split, class count that does not match the model.
    """
    from pathlib import Path

    from surgeon.data import build_loader, build_splits
    from surgeon.errors import UserError
    from surgeon.run import load_run, load_run_recipe, merged_kind

    recipe = load_run_recipe(Path(run_dir))
    ev = recipe["eval"]
    mode = mode or ev["inference"]
    if mode not in INFERENCE_MODES:
        raise UserError(f"unknown inference '{mode}'", hint="choose one of: " + ", ".join(INFERENCE_MODES))
    if mode != "merge" and not num_experts(recipe):
        raise UserError(f"inference '{mode}' needs experts; the recipe '{recipe.name}' has none",
                        hint="use --inference merge")
    # merge: the merged artefact when there is one (what users deploy); otherwise the trained
    # layers with the sampler in merge mode.
    model = load_run(run_dir, merged=(mode == "merge" and merged_kind(Path(run_dir)) is not None), device=device)
    data_cfg = dict(recipe["data"])
    if data:
        data_cfg["source"] = data
    splits = build_splits(data_cfg, model, seed=data_cfg["seed"])
    classes = model.num_classes if hasattr(model, "num_classes") else None
    if classes is not None and splits.num_classes != classes:
        raise UserError(f"the data has {splits.num_classes} classes but the run's model predicts {classes}",
                        where=data or data_cfg["source"], hint="evaluate on data with the run's classes")
    if split is None:
        split = "test" if splits.test is not None else "val"
    dataset = getattr(splits, split, None) if split in ("train", "val", "test") else None
    if dataset is None:
        raise UserError(f"the data has no '{split}' split", where=data_cfg["source"],
                        hint="choose --split among: " + ", ".join(s for s in ("train", "val", "test")
                                                                   if getattr(splits, s) is not None))
    if split == "train":
        dataset = dataset.with_transform(splits.val.transform) if splits.val is not None else dataset
    loader = build_loader(dataset, batch_size=batch_size or recipe["train"]["batch_size"], shuffle=False,
                          seed=recipe["train"]["seed"], num_workers=recipe["data"]["num_workers"])
    result = evaluate(model, loader, mode=mode, expert=ev["expert"], merge_mode=ev["merge_mode"],
                      num_classes=splits.num_classes, class_names=splits.class_names)
    return result, split, {"source": data_cfg["source"], "model": recipe["model"]["name"], "recipe": recipe.name}
