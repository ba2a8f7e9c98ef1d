"""Eval-time control of expert-split layers (MoSA, MoSL): the paper's inference mechanisms.

All expert-split matrices of a model share one :class:`~surgeon.methods.base.ExpertSampler`
(``model.surgeon_sampler``, attached by the surgery driver). In **training** mode every split
matrix draws an expert per forward pass, whatever the settings here. In **eval** mode they
follow the sampler (METHODS.md §2, paper Table 6; the names: :mod:`surgeon.methods.modes`):

==============  ==========================================================================
``merge``       the merged dense weight (``merge_mode``: average ``W0 + D/N`` or jigsaw
                ``W0 + D``) — the same numbers :func:`surgeon.merge` produces (default)
``stochastic``  a fresh uniform draw per forward pass per split matrix
``fixed``       every split matrix uses expert ``expert`` (0-based)
``ensemble``    not a layer mode: :func:`ensemble_logits` averages the logits of the N
                ``fixed`` passes (N x cost)
==============  ==========================================================================

Typical trainer use::

    from surgeon.methods.experts import evaluation, logits_of
    with torch.no_grad(), evaluation(model, cfg.inference, expert=cfg.expert, merge_mode=cfg.merge_mode):
        logits = logits_of(model, images, cfg.inference)      # ensemble: the mean of N passes

    with expert_groups(model, 2):       # batched consistency: one forward of 2B samples,
        logits = model(torch.cat([x, x]))  # each half with its own expert draws

On a model without expert-split layers (plain adapters, LoRA, a merged model) every helper
is a harmless no-op and :func:`expert_count` returns None.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

import torch
import torch.nn as nn

from surgeon.errors import UserError
from surgeon.methods.base import ExpertSampler
from surgeon.methods.matrices import ExpertSplitMatrix
from surgeon.methods.modes import INFERENCE_MODES, LAYER_MODES, MERGE_MODES


def split_matrices(model: nn.Module) -> list[ExpertSplitMatrix]:
    """Every expert-split matrix of the model, in module order."""
    return [m for m in model.modules() if isinstance(m, ExpertSplitMatrix)]


def expert_count(model: nn.Module) -> int | None:
    """N, the number of experts of the model's split matrices; None if it has none.

    Raises:
        UserError: the split matrices disagree on N (then ``fixed``/``ensemble`` are undefined).
    """
    counts = {m.num_experts for m in split_matrices(model)}
    if not counts:
        return None
    if len(counts) > 1:
        raise UserError(f"the model's expert-split layers have different expert counts {sorted(counts)}; "
                        "fixed and ensemble inference need one count",
                        hint="use the same experts.count in every rule, or inference: merge / stochastic")
    return counts.pop()


def sampler_of(model: nn.Module) -> ExpertSampler | None:
    """The model's shared sampler: ``model.surgeon_sampler``, else the one its split matrices hold."""
    sampler = getattr(model, "surgeon_sampler", None)
    if sampler is None:
        matrices = split_matrices(model)
        sampler = matrices[0].sampler if matrices else None
    return sampler


def set_inference(model: nn.Module, mode: str = "merge", expert: int = 0, merge_mode: str = "average") -> None:
    """Make the model's expert-split layers use ``mode`` in eval mode (persistent until changed).

    Args:
        mode: ``merge`` | ``stochastic`` | ``fixed`` (for ``ensemble`` call :func:`ensemble_logits`).
        expert: the expert for ``fixed`` (0-based, < :func:`expert_count`).
        merge_mode: ``average`` | ``jigsaw`` for ``merge``.

    Raises:
        UserError: unknown mode, ``ensemble`` (not a layer mode) or an expert out of range.
    """
    if mode not in LAYER_MODES:
        hint = "call surgeon.methods.experts.ensemble_logits(model, x)" if mode == "ensemble" else None
        raise UserError(f"inference mode must be one of {', '.join(LAYER_MODES)}, not {mode!r}", hint=hint)
    if merge_mode not in MERGE_MODES:
        raise UserError(f"merge_mode must be one of {', '.join(MERGE_MODES)}, not {merge_mode!r}")
    sampler = sampler_of(model)
    if sampler is None:
        return
    if mode == "fixed":
        n = expert_count(model)
        if n is not None and not 0 <= expert < n:
            raise UserError(f"eval.expert is {expert} but the model has {n} experts (0..{n - 1})",
                            hint=f"set eval.expert to a value between 0 and {n - 1}")
    sampler.mode, sampler.expert, sampler.merge_mode = mode, int(expert), merge_mode


@contextmanager
def inference(model: nn.Module, mode: str = "merge", expert: int = 0, merge_mode: str = "average") -> Iterator[None]:
    """:func:`set_inference` for the duration of a ``with`` block, then the previous settings."""
    sampler = sampler_of(model)
    saved = None if sampler is None else (sampler.mode, sampler.expert, sampler.merge_mode)
    set_inference(model, mode, expert, merge_mode)
    try:
        yield
    finally:
        if sampler is not None:
            sampler.mode, sampler.expert, sampler.merge_mode = saved


@contextmanager
def expert_groups(model: nn.Module, groups: int) -> Iterator[None]:
    """Inside the block, every drawing split matrix draws ``groups`` experts and applies expert g
    to the g-th contiguous slice of the batch (batch size must be divisible by ``groups``)."""
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    sampler = sampler_of(model)
    saved = None if sampler is None else sampler.groups
    if sampler is not None:
        sampler.groups = groups
    try:
        yield
    finally:
        if sampler is not None:
            sampler.groups = saved


@contextmanager
def evaluation(model: nn.Module, mode: str = "merge", *, expert: int = 0, merge_mode: str = "average") -> Iterator[None]:
    """Eval mode with the expert layers set for ``mode`` (``ensemble``: set per pass by
    :func:`logits_of`), leaving no trace: afterwards the train/eval mode, the sampler settings,
    the sampler's generator and torch's RNG are all as before, so evaluating more often does
    not change what training draws."""
    sampler = sampler_of(model)
    generator_state = sampler.generator.get_state() if sampler is not None else None
    torch_state = torch.get_rng_state()
    was_training = model.training
    model.eval()
    try:
        with inference(model, "merge" if mode == "ensemble" else mode, expert, merge_mode):
            yield
    finally:
        model.train(was_training)
        torch.set_rng_state(torch_state)
        if sampler is not None:
            sampler.generator.set_state(generator_state)


def logits_of(model: nn.Module, x: torch.Tensor, mode: str) -> torch.Tensor:
    """Logits ``[B, K]`` of ``x`` under ``mode`` (call inside :func:`evaluation`); ``ensemble``
    averages the logits of the N single-expert passes."""
    if mode == "ensemble":
        return ensemble_logits(model, x)
    return model(x)


def ensemble_logits(model: nn.Module, x: torch.Tensor, **forward_kwargs) -> torch.Tensor:
    """Mean of the logits of the N experts: N forward passes, pass i with every split matrix
    fixed to expert i (paper Table 6 "ensemble", N x cost). The model is run in eval mode and
    its previous mode restored; gradients follow the caller's grad mode.

    Returns:
        ``[B, num_classes]`` averaged logits (a plain forward if the model has no experts).
    """
    n = expert_count(model)
    was_training = model.training
    model.eval()
    try:
        if n is None:
            return model(x, **forward_kwargs)
        total = None
        for i in range(n):  # N whole-model passes: the definition of ensembling, not a hot-path loop
            with inference(model, "fixed", expert=i):
                logits = model(x, **forward_kwargs)
            total = logits if total is None else total + logits
        return total / n
    finally:
        model.train(was_training)


def predict(model: nn.Module, x: torch.Tensor, mode: str = "merge", expert: int = 0,
            merge_mode: str = "average") -> torch.Tensor:
    """Eval-mode logits under any of the four inference mechanisms (``merge`` | ``stochastic`` |
    ``fixed`` | ``ensemble``); the model's train/eval mode and sampler settings are restored."""
    if mode == "ensemble":
        return ensemble_logits(model, x)
    was_training = model.training
    model.eval()
    try:
        with inference(model, mode, expert, merge_mode):
            return model(x)
    finally:
        model.train(was_training)


__all__ = ["INFERENCE_MODES", "ensemble_logits", "evaluation", "expert_count", "expert_groups", "inference",
           "logits_of", "predict", "sampler_of", "set_inference", "split_matrices"]
