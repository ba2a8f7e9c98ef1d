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
from timm.optim import param_groups_weight_decay

from surgeon.methods.matrices import ExpertSplitMatrix
from surgeon.recipe.sections import TrainConfig


@dataclass(frozen=True)
class StepBudget:
    """How long a run is, in optimizer steps.

    Attributes:
        steps_per_epoch: loader batches per epoch.
        total_steps: steps of the whole run (``epochs * steps_per_epoch``, capped by max_steps).
        warmup_steps: linear warm-up length, at most half of the run (see ``warmup_requested``).
        drop_last: whether the train loader drops an incomplete last batch.
        warmup_requested: the warm-up the recipe asked for, in steps; larger than
            ``warmup_steps`` when it was clamped to half of the run (a run that is mostly
            warm-up never reaches its peak lr: ``max_steps=60`` with 10 warm-up epochs would
            train at a fraction of the lr throughout).
    """

    steps_per_epoch: int
    total_steps: int
    warmup_steps: int
    drop_last: bool
    warmup_requested: int = 0

    @property
    def warmup_clamped(self) -> bool:
        """True if the recipe's warm-up was longer than half of the run and was shortened."""
        return self.warmup_requested > self.warmup_steps

    @property
    def epochs(self) -> int:
        """Epochs actually run (the last one may be partial when max_steps cuts it)."""
        return math.ceil(self.total_steps / self.steps_per_epoch)


def step_budget(train_cfg: TrainConfig, num_train: int) -> StepBudget:
    """Steps per epoch, total steps and warm-up steps for ``num_train`` training images.

    The last incomplete batch is dropped (every step sees ``batch_size`` images, as in the
    papers' timm loaders) unless the split is smaller than one batch, in which case each epoch
    is that one short batch.
    """
    batch = train_cfg.batch_size
    drop_last = num_train >= batch
    steps_per_epoch = num_train // batch if drop_last else 1
    total = train_cfg.epochs * steps_per_epoch
    if train_cfg.max_steps:
        total = min(total, int(train_cfg.max_steps))
    if train_cfg.warmup_steps is not None:
        warmup = int(train_cfg.warmup_steps)
    else:
        warmup = int(round(float(train_cfg.warmup_epochs) * steps_per_epoch))
    if train_cfg.lr_step == "epoch":
        # The schedule moves once per epoch: warm-up is whole epochs, clamped to half the epochs.
        epochs = math.ceil(total / steps_per_epoch)
        requested = math.ceil(warmup / steps_per_epoch)
        return StepBudget(steps_per_epoch, total, min(requested, epochs // 2) * steps_per_epoch, drop_last,
                          requested * steps_per_epoch)
    return StepBudget(steps_per_epoch, total, min(warmup, total // 2), drop_last, warmup)


def peak_lr(train_cfg: TrainConfig) -> float:
    """``base_lr * batch_size / 256`` with ``lr_scaling: linear`` (MoSA), else ``base_lr`` (MLAE)."""
    lr = float(train_cfg.base_lr)
    if train_cfg.lr_scaling == "linear":
        lr *= train_cfg.batch_size / 256
    return lr


def lr_factor(step: int, *, warmup_steps: int, total_steps: int, schedule: str, min_factor: float,
              steps_per_epoch: int | None = None) -> float:
    """Multiplier of the peak lr used by optimizer step ``step`` (0-based).

    Per step (``steps_per_epoch`` None, ``train.lr_step: step``): warm-up is linear from
    ``1/warmup_steps`` to 1 (the first step already moves: a zero-lr step would be wasted); then
    ``cosine`` decays to ``min_factor`` at the last step's end, or ``constant`` stays at 1.

    Per epoch (``steps_per_epoch`` given, ``train.lr_step: epoch``): the published MoSA schedule
    (its ``WarmupCosineSchedule`` stepped once per epoch): every step of epoch ``e`` uses
    ``e / W`` during the ``W`` warm-up epochs — so the first epoch trains at lr 0, as the
    published code does — then ``0.5 (1 + cos(π (e - W) / (E - W)))`` (floored at
    ``min_factor``), ``E`` the number of epochs.
    """
    if steps_per_epoch:
        epoch = step // steps_per_epoch
        warmup_epochs = warmup_steps // steps_per_epoch
        epochs = max(1, math.ceil(total_steps / steps_per_epoch))
        if epoch < warmup_epochs:
            return epoch / warmup_epochs
        if schedule == "constant":
            return 1.0
        progress = (epoch - warmup_epochs) / max(1, epochs - warmup_epochs)
        return max(min_factor, 0.5 * (1.0 + math.cos(math.pi * progress)))
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


class HFAdamW(torch.optim.Optimizer):
    """The AdamW the published MoSA code trains with (Hugging Face ``transformers``' 2020 class).

    Per parameter with a gradient: ``m ← β1 m + (1-β1) g``, ``v ← β2 v + (1-β2) g²``,
    ``p ← p - lr·√(1-β2ᵗ)/(1-β1ᵗ) · m / (√v + eps)`` — eps added to the *uncorrected* √v, unlike
    :class:`torch.optim.AdamW` — and only then decoupled weight decay of the updated value,
    ``p ← p - lr·wd·p`` (torch decays before the update). A parameter in ``decay_rules`` decays
    by its own rule instead (``rule(lr·wd)``; expert-split deltas, see
    :meth:`surgeon.methods.matrices.ExpertSplitMatrix.decay_`).
    """

    def __init__(self, params, lr: float, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-6,
                 weight_decay: float = 0.0, decay_rules: dict | None = None):
        super().__init__(params, {"lr": lr, "betas": betas, "eps": eps, "weight_decay": weight_decay})
        self.decay_rules = decay_rules or {}

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            beta1, beta2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float64)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = float(state["step"])
                exp_avg, exp_avg_sq = state["exp_avg"], state["exp_avg_sq"]
                exp_avg.mul_(beta1).add_(p.grad, alpha=1 - beta1)
                exp_avg_sq.mul_(beta2).addcmul_(p.grad, p.grad, value=1 - beta2)
                step_size = group["lr"] * math.sqrt(1 - beta2 ** t) / (1 - beta1 ** t)
                p.addcdiv_(exp_avg, exp_avg_sq.sqrt().add_(group["eps"]), value=-step_size)
                factor = group["lr"] * group["weight_decay"]
                if factor:
                    rule = self.decay_rules.get(p)
                    if rule is None:
                        p.mul_(1 - factor)
                    else:
                        rule(factor)
        return loss


def _decay_rules(model: nn.Module) -> dict:
    """``{delta parameter: decay rule}`` for expert-split matrices with ``decay: toward_zero``."""
    return {m.delta: m.decay_ for m in model.modules()
            if isinstance(m, ExpertSplitMatrix) and m.decay == "toward_zero" and m.delta.requires_grad}


def build_optimizer(model: nn.Module, train_cfg: TrainConfig) -> torch.optim.Optimizer:
    """The optimizer over the trainable parameters only (``train.optimizer``).

    - ``adamw`` (torch's, ``eps`` = ``train.eps``) and ``sgd`` (momentum 0.9): weight decay
      follows timm's ``param_groups_weight_decay``: it applies to matrices, and not to biases,
      norm weights, 1-d scales (MLAE's lambda, a learnable adapter scale) or the model's
      ``no_weight_decay()`` names (ViT position embedding, class token). A parameter with
      ``no_weight_decay = True`` is exempt too.
    - ``adamw_hf`` (:class:`HFAdamW`, the published MoSA code's optimizer): decay after the
      update, on every parameter whose name does not contain ``bias`` (the published rule: it
      decays LayerNorm weights too).

    Expert-split matrices with ``experts.decay: toward_zero`` decay by their own rule (each
    expert's whole weight toward 0); under torch's ``adamw`` the rule runs before the step, as
    torch's own decay does.
    """
    wd = train_cfg.weight_decay
    lr = peak_lr(train_cfg)
    rules = _decay_rules(model) if wd else {}
    if train_cfg.optimizer == "adamw_hf":
        named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        groups = [{"params": [p for n, p in named if "bias" not in n], "weight_decay": wd},
                  {"params": [p for n, p in named if "bias" in n], "weight_decay": 0.0}]
        return HFAdamW([g for g in groups if g["params"]], lr=lr, eps=train_cfg.eps or 1e-6,
                       decay_rules=rules)
    skip = set(model.no_weight_decay()) if hasattr(model, "no_weight_decay") else set()
    skip |= {n for n, p in model.named_parameters() if getattr(p, "no_weight_decay", False)}
    groups = param_groups_weight_decay(model, weight_decay=wd, no_weight_decay_list=skip)
    groups = [g for g in groups if g["params"]]
    if rules:  # these decay by their own rule, not by the optimizer's p *= 1 - lr*wd
        groups = [{**g, "params": [p for p in g["params"] if p not in rules]} for g in groups]
        groups = [g for g in groups if g["params"]] + [{"params": list(rules), "weight_decay": 0.0, "decay_rule": wd}]
    if train_cfg.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, lr=lr, momentum=0.9)
    else:
        optimizer = torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), eps=train_cfg.eps or 1e-8)
    if rules:
        def decay_first(opt, args, kwargs):
            for group in opt.param_groups:
                if group.get("decay_rule"):
                    for p in group["params"]:
                        if p.grad is not None:
                            rules[p](group["lr"] * group["decay_rule"])

        optimizer.register_step_pre_hook(decay_first)
    return optimizer


def build_scheduler(optimizer: torch.optim.Optimizer, train_cfg: TrainConfig,
                    budget: StepBudget) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step LambdaLR: linear warm-up then cosine (or constant) to ``min_lr``."""
    peak = peak_lr(train_cfg)
    per_epoch = train_cfg.lr_step == "epoch"
    factor = LrFactor(warmup_steps=budget.warmup_steps, total_steps=budget.total_steps,
                      schedule=train_cfg.schedule, min_factor=min(1.0, train_cfg.min_lr / peak),
                      steps_per_epoch=budget.steps_per_epoch if per_epoch else None)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
