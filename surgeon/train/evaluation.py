"""Top-1 accuracy (overall and per class) of a model on a loader, under the four MoSA inference
mechanisms (paper Table 6; :mod:`surgeon.methods.modes`):

- ``merge`` — experts merged into one dense weight (``merge_mode``: average | jigsaw);
- ``stochastic`` — every forward draws experts, as in training;
- ``fixed`` — always expert ``expert``;
- ``ensemble`` — the mean of the logits of the N single-expert models (N forwards).

Models without experts (or already merged) ignore them. Evaluation never disturbs training
(:func:`surgeon.methods.experts.evaluation` restores every RNG it touches), so evaluating more
often does not change the trained weights. Evaluating a run directory is :mod:`surgeon.evaluate`.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

from surgeon.methods.experts import evaluation, logits_of
from surgeon.methods.modes import INFERENCE_MODES


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
        mode: one of :data:`~surgeon.methods.modes.INFERENCE_MODES`.
        expert: the expert of ``fixed``.
        merge_mode: ``average`` | ``jigsaw`` for ``merge``.
        num_classes: K (sizes the per-class table).
        precision: ``fp32`` | ``bf16`` | ``fp16`` autocast.
    """
    labels, preds, loss_sum = predictions(model, loader, mode=mode, expert=expert, merge_mode=merge_mode,
                                          precision=precision)
    return summarize(labels, preds, loss_sum, num_classes=num_classes, class_names=class_names, inference=mode)


@torch.no_grad()
def predictions(model: nn.Module, loader, *, mode: str = "merge", expert: int = 0, merge_mode: str = "average",
                precision: str = "fp32") -> tuple[list[int], list[int], float]:
    """Labels, top-1 predictions (per item, loader order) and the summed cross-entropy (nats)
    of ``model`` on ``loader`` under inference ``mode`` (arguments as :func:`evaluate`)."""
    if mode not in INFERENCE_MODES:
        raise ValueError(f"unknown inference mode {mode!r}")
    device = next(model.parameters()).device
    labels, preds = [], []
    loss_sum = 0.0
    with evaluation(model, mode, expert=expert, merge_mode=merge_mode):
        for x, y in loader:
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with autocast_context(device, precision):
                z = logits_of(model, x, mode)
            z = z.float()
            loss_sum += F.cross_entropy(z, y, reduction="sum").item()
            labels += y.tolist()
            preds += z.argmax(dim=-1).tolist()
    return labels, preds, loss_sum


def summarize(labels: list[int], preds: list[int], loss_sum: float, *, num_classes: int,
              class_names: list[str] | None = None, inference: str = "merge") -> EvalResult:
    """The :class:`EvalResult` of per-item ``labels``/``preds`` and a summed loss (nats)."""
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
                      inference=inference, labels=labels, preds=preds, per_class=per_class)
