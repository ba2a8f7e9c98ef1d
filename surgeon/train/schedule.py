"""Step budget, learning rate, optimizer and schedule from a recipe's ``train`` section.

Units: a *step* is one optimizer update (one loader batch of ``batch_size`` images, split into
``grad_accum`` micro-batches); the schedule is defined per step, so warm-up given in epochs is
converted with the number of steps per epoch.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn


@dataclass(frozen=True)
class StepBudget:
    """How long a run is, in optimizer steps.

    Attributes:
        steps_per_epoch: loader batches per epoch.
        total_steps: steps of the whole run (``epochs * steps_per_epoch``, capped by max_steps).
        warmup_steps: linear warm-up length (< total_steps unless the run is all warm-up).
        drop_last: whether the train loader drops an incomplete last batch.
    """

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    drop_last: bool

    @property
    def epochs(self) -> int:
        """Epochs actually run (the last one may be partial when max_steps cuts it)."""
        return math.ceil(self.total_steps / self.steps_per_epoch)


def step_budget(train_cfg: dict, num_train: int) -> StepBudget:
    """Steps per epoch, total steps and warm-up steps for ``num_train`` training images.

    The last incomplete batch is dropped (every step sees ``batch_size`` images, as in the
    papers' timm loaders) unless the split is smaller than one batch, in which case each epoch
    is that one short batch.
    """
    batch = train_cfg["batch_size"]
    drop_last = num_train >= batch
    steps_per_epoch = num_train // batch if drop_last else 1
    total = train_cfg["epochs"] * steps_per_epoch
    if train_cfg.get("max_steps"):
        total = min(total, int(train_cfg["max_steps"]))
    if train_cfg.get("warmup_steps") is not None:
        warmup = int(train_cfg["warmup_steps"])
    else:
        warmup = int(round(float(train_cfg["warmup_epochs"]) * steps_per_epoch))
    return StepBudget(steps_per_epoch, total, min(warmup, total), drop_last)


def peak_lr(train_cfg: dict) -> float:
    """``base_lr * batch_size / 256`` with ``lr_scaling: linear`` (MoSA), else ``base_lr`` (MLAE)."""
    lr = float(train_cfg["base_lr"])
    if train_cfg["lr_scaling"] == "linear":
        lr *= train_cfg["batch_size"] / 256
    return lr


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_factor: float) -> float:
    """Multiplier of the peak lr used by optimizer step ``step`` (0-based).

    Warm-up is linear from ``1/warmup_steps`` to 1 (the first step already moves: a zero-lr step
    would be wasted); then ``cosine`` decays to ``min_factor`` at the last step's end, or
    ``constant`` stays at 1.
    """
    if step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_factor + (1.0 - min_factor) * 0.5 * (1.0 + math.cos(math.pi * progress))


class LrFactor:
    """Picklable ``lr_lambda`` for :class:`torch.optim.lr_scheduler.LambdaLR`."""

    def __init__(self, **kwargs):
        self.kwargs = kwargs

    def __call__(self, step: int) -> float:
        return lr_factor(step, **self.kwargs)


def build_optimizer(model: nn.Module, train_cfg: dict) -> torch.optim.Optimizer:
    """AdamW (or SGD, momentum 0.9) over the trainable parameters only.

    Weight decay follows timm's ``param_groups_weight_decay``: it applies to matrices, and not to
    biases, norm weights, 1-d scales (MLAE's lambda, a learnable adapter scale) or the model's
    ``no_weight_decay()`` names (ViT position embedding, class token); this is what the papers'
    timm-based code bases do. A parameter with ``no_weight_decay = True`` is exempt too.
    """
    from timm.optim import param_groups_weight_decay

    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    skip |= {n for n, p in model.named_parameters() if getattr(p, "no_weight_decay", False)}
    groups = param_groups_weight_decay(model, weight_decay=train_cfg["weight_decay"], no_weight_decay_list=skip)
    groups = [g for g in groups if g["params"]]
    lr = peak_lr(train_cfg)
    if train_cfg["optimizer"] == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=1e-8)


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg: dict,
                    budget: StepBudget) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR: linear warm-up then cosine (or constant) to ``min_lr``."""
    peak = peak_lr(train_cfg)
    factor = LrFactor(warmup_steps=budget.warmup_steps, total_steps=budget.total_steps,
                      schedule=train_cfg["schedule"], min_factor=min(1.0, train_cfg["min_lr"] / peak))
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
