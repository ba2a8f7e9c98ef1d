"""Resumable training state, written atomically.

:func:`save_checkpoint` / :func:`load_checkpoint` hold the full training state for ``--resume``:
surgery tensors (:func:`surgeon.surgery.surgery_state`), optimizer, scheduler, grad scaler,
every RNG (:func:`surgeon.seeding.rng_state`), the data position and counters. Written with
``torch.save`` through :func:`surgeon.io.atomic_write` (temporary file, fsync, rename), so a
SIGKILL at any moment leaves either the old or the new checkpoint, never a torn one.
Everything in it is a tensor or plain Python data, so it loads with ``weights_only=True``.
"""
from __future__ import annotations

from pathlib import Path

import torch

from surgeon.errors import UserError
from surgeon.io import atomic_write

CHECKPOINT_VERSION = 1


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomically ``torch.save`` a training state (see module docstring for its contents)."""
    state = {"version": CHECKPOINT_VERSION, **state}
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: Path) -> dict:
    """Load a training state written by :func:`save_checkpoint`.

    Raises:
        UserError: missing, truncated or foreign file (named).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError("checkpoint not found", where=str(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unpickling error means a corrupt file
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot read the checkpoint: {first}", where=str(path),
                        hint="the file is corrupt; delete it to restart the run from its beginning") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise UserError("not a surgeon checkpoint (or one of another version)", where=str(path))
    return state
