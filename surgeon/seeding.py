"""Seeds and random-number-generator state: what makes a run reproducible and resumable.

- :func:`seed_everything` seeds Python, numpy and torch from the recipe's seed;
- :func:`step_seed` is the torch seed of one optimizer step (its dropout masks);
- :func:`rng_state` / :func:`set_rng_state` capture and restore every stream a training step
  consumes (Python, numpy, torch, CUDA and the model's expert sampler), as tensors and plain
  data so a checkpoint loads with ``weights_only=True``.
"""
from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    """Seed Python, numpy and torch (CPU and CUDA). The expert sampler and the data order have
    their own seeded generators (built from the same recipe seed)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def step_seed(seed: int, step: int, rank: int = 0) -> int:
    """The torch seed of optimizer step ``step`` (dropout masks and any other torch randomness of
    the step): a function of the run seed, the step and the process rank only, so a resumed run,
    an official-code replay or another world size draws the same masks for the same step."""
    return int(np.random.SeedSequence([int(seed), int(step), int(rank), 2]).generate_state(1)[0])


def rng_state(sampler=None) -> dict:
    """Every random stream a training step consumes, as tensors and plain Python data."""
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": _to_lists(random.getstate()),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }
    if sampler is not None:
        state["sampler"] = sampler.state_dict()
    return state


def set_rng_state(state: dict, sampler=None) -> None:
    """Restore what :func:`rng_state` captured (the sampler's too, when given)."""
    random.setstate(_to_tuples(state["python"]))
    np_state = state["numpy"]
    np.random.set_state((np_state["kind"], np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["gauss"]))
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    if sampler is not None and "sampler" in state:
        sampler.load_state_dict(state["sampler"])


def _to_lists(x):
    return [_to_lists(v) for v in x] if isinstance(x, tuple) else x


def _to_tuples(x):
    return tuple(_to_tuples(v) for v in x) if isinstance(x, list) else x
