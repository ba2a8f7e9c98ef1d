"""Resumable training state, written atomically and verified.

:func:`save_checkpoint` / :func:`load_checkpoint` hold the full training state for ``--resume``:
surgery tensors (:func:`surgeon.surgery.surgery_state`), optimizer, scheduler, grad scaler,
every RNG (:func:`surgeon.seeding.rng_state`), the data position and counters, and the data's
fingerprint (:attr:`surgeon.data.DataSplits.fingerprint`). Written with ``torch.save`` through
:func:`surgeon.io.atomic_write` (temporary file, fsync, read back, rename), so a SIGKILL or a
second Ctrl-C at any moment leaves either the old or the new checkpoint, never a torn one, and
a write that does not read back never replaces the old one. Everything in it is a tensor or
plain Python data, so it loads with ``weights_only=True``: a file that needs more is not a
surgeon checkpoint, and is never unpickled.

:func:`save_surgery_tensors` writes ``checkpoints/best.safetensors`` (and the run's adapter) the
same way, verified against the tensors it was given; :func:`check_surgery_tensors` verifies one
before a resume relies on it.
"""
from __future__ import annotations

from pathlib import Path

import torch

from surgeon.errors import UserError
from surgeon.io import atomic_write, load_tensors

CHECKPOINT_VERSION = 1


def save_checkpoint(path: Path, state: dict) -> None:
    """Atomically ``torch.save`` a training state (see module docstring for its contents); the
    temporary file is loaded back (``weights_only``) before it replaces the old checkpoint."""
    state = {"version": CHECKPOINT_VERSION, **state}
    atomic_write(path, lambda tmp: torch.save(state, tmp), verify=lambda tmp: _read(Path(tmp), str(path)))


def _read(path: Path, shown: str) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception:  # noqa: BLE001 - any failure means this is not a checkpoint we wrote
        # torch's own message suggests weights_only=False, i.e. running the file's code: never.
        raise UserError("not a surgeon checkpoint: the file is corrupt, truncated or something else "
                        "(it was not loaded)", where=shown,
                        hint="delete it to restart the run from its beginning (or from an older copy)") from None
    if not isinstance(state, dict) or state.get("version") != CHECKPOINT_VERSION:
        raise UserError("not a surgeon checkpoint (or one of another version)", where=shown,
                        hint="delete it to restart the run from its beginning")
    return state


def load_checkpoint(path: Path) -> dict:
    """Load a training state written by :func:`save_checkpoint`.

    Raises:
        UserError: missing, truncated or foreign file (named).
    """
    path = Path(path)
    if not path.is_file():
        raise UserError("checkpoint not found", where=str(path))
    return _read(path, str(path))


def save_surgery_tensors(path: Path, tensors: dict, metadata: dict[str, str] | None = None) -> None:
    """Atomically write surgery tensors as safetensors, read back and compared with ``tensors``
    before the file replaces the old one (a torn or wrong write is never kept)."""
    # safetensors.torch: this module imports torch anyway.
    from safetensors.torch import load_file, save_file

    cpu = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}

    def verify(tmp) -> None:
        back = load_file(str(tmp))
        if back.keys() != cpu.keys() or any(not torch.equal(back[k], cpu[k]) for k in cpu):
            raise OSError(f"{path}: the written tensors do not read back as written")

    atomic_write(path, lambda tmp: save_file(cpu, str(tmp), metadata=metadata), verify=verify)


def check_surgery_tensors(path: Path, expected: dict) -> None:
    """Raise a :class:`UserError` unless ``path`` holds tensors with exactly the names and shapes
    of ``expected`` (a model's surgery state): for ``best.safetensors`` before a resume."""
    try:
        tensors = load_tensors(path)
    except UserError as exc:
        raise UserError(exc.message, where=exc.where,
                        hint="delete it to resume (the best state is then chosen among the steps still to come)") from None
    missing = sorted(set(expected) - set(tensors))
    unexpected = sorted(set(tensors) - set(expected))
    wrong = [k for k in expected if k in tensors and tuple(tensors[k].shape) != tuple(expected[k].shape)]
    if missing or unexpected or wrong:
        detail = "; ".join(x for x in (f"missing {missing[:3]}" if missing else "",
                                       f"unexpected {unexpected[:3]}" if unexpected else "",
                                       f"other shapes for {wrong[:3]}" if wrong else "") if x)
        raise UserError(f"the saved best state does not fit the run's model ({detail})", where=str(path),
                        hint="delete it to resume (the best state is then chosen among the steps still to come)")
