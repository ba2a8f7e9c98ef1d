"""Several training processes on ``torch.distributed`` (``torchrun`` + DistributedDataParallel).

A process started by ``torchrun`` finds ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` in its
environment; :func:`init_world` joins the process group (NCCL on CUDA, gloo on CPU) and returns
the :class:`World`. Without those variables (or with ``WORLD_SIZE`` 1) nothing is initialised and
training is the single-process code path, unchanged.

What the ranks share, and why the result equals one process's (docs in README "Several GPUs"):

- the data: each rank loads its share of the same global batch
  (:func:`surgeon.data.loaders.batch_shares`); DDP averages the gradients, and each rank weights
  its loss by its share of the global batch, so the update is the one-process update;
- the expert draws: every rank builds the same model from the same seed, so its
  :class:`~surgeon.methods.base.ExpertSampler` starts in the same state, and every rank runs the
  same number of forward passes per step (padding included), so the samplers stay in step.
  :func:`sampler_digest` lets the trainer check it at every checkpoint;
- the dropout masks are *not* shared: each rank seeds its step from ``(seed, step, rank)``.

Rank 0 alone writes (checkpoints, metrics, summary, merge, report) and shows progress.
"""
from __future__ import annotations

import hashlib
import os
import signal
from dataclasses import dataclass

import torch
import torch.distributed as dist

from surgeon.errors import UserError


@dataclass(frozen=True)
class World:
    """This process's place among the training processes.

    Attributes:
        rank: global rank (0 writes the run directory).
        size: number of processes (1: no process group).
        local_rank: rank on this machine (its GPU index).
        backend: ``nccl`` | ``gloo`` (None for one process).
    """

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.size > 1

    def to_dict(self) -> dict:
        return {"world_size": self.size, "backend": self.backend}


def launched_world_size() -> int:
    """``WORLD_SIZE`` as set by ``torchrun`` (1 when not launched by it)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        raise UserError(f"WORLD_SIZE is '{os.environ['WORLD_SIZE']}', not a number",
                        hint="launch with torchrun (it sets WORLD_SIZE, RANK and LOCAL_RANK)") from None


def init_world(device: torch.device) -> tuple[World, torch.device]:
    """Join the process group of a ``torchrun`` launch (once per process).

    Args:
        device: the recipe's resolved training device; a CUDA device becomes ``cuda:LOCAL_RANK``.

    Returns:
        ``(world, device)``: a single-process :class:`World` and ``device`` unchanged when not
        launched by torchrun.
    """
    size = launched_world_size()
    if size == 1:
        return World(), device
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if local_rank >= count:
            raise UserError(f"process {local_rank} on this machine has no GPU (only {count} visible)",
                            hint="start at most one process per GPU (torchrun --nproc-per-node)")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
    # NCCL refuses two processes on one GPU; SURGEON_DIST_BACKEND=gloo allows that (and tests).
    backend = os.environ.get("SURGEON_DIST_BACKEND") or ("nccl" if device.type == "cuda" else "gloo")
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return World(rank=rank, size=size, local_rank=local_rank, backend=backend), device


def shutdown(world: World) -> None:
    """Leave the process group (no-op for one process)."""
    if world.distributed and dist.is_initialized():
        dist.destroy_process_group()


def broadcast_object(obj, world: World, src: int = 0):
    """``obj`` of rank ``src`` on every rank (picklable objects; ``obj`` ignored elsewhere)."""
    if not world.distributed:
        return obj
    box = [obj if world.rank == src else None]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def all_gather_object(obj, world: World) -> list:
    """Every rank's ``obj``, in rank order."""
    if not world.distributed:
        return [obj]
    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def all_agree(flag: bool, world: World, device: torch.device) -> bool:
    """True when ``flag`` is true on every rank (a MIN all-reduce of one number)."""
    if not world.distributed:
        return flag
    t = torch.tensor([1 if flag else 0], device=device, dtype=torch.int32)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def all_reduce_sum(tensor: torch.Tensor, world: World) -> torch.Tensor:
    """In-place sum of ``tensor`` over the ranks (returned for chaining)."""
    if world.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_tensors(tensors, world: World, src: int = 0) -> None:
    """Overwrite ``tensors`` (an iterable of tensors on the training device) with rank ``src``'s."""
    if world.distributed:
        for t in tensors:
            dist.broadcast(t.data, src=src)


def barrier(world: World) -> None:
    if world.distributed:
        dist.barrier()


def sampler_digest(sampler) -> str:
    """A short hash of an expert sampler's generator state ('' without a sampler): equal on
    every rank as long as the ranks made the same draws."""
    if sampler is None:
        return ""
    return hashlib.sha256(sampler.generator.get_state().numpy().tobytes()).hexdigest()[:16]


def wrap(model: torch.nn.Module, world: World, device: torch.device) -> torch.nn.Module:
    """``model`` in DistributedDataParallel over its trainable parameters (``model`` itself for
    one process). ``find_unused_parameters=False``: every trainable tensor of every method takes
    part in every step (tests/test_distributed.py checks each method family);
    buffers are not synchronised at each forward: they are not trained, and the backbone's are equal on every
    rank from the start (DDP copies rank 0's parameters and buffers once, at construction)."""
    if not world.distributed:
        return model
    from torch.nn.parallel import DistributedDataParallel  # only multi-process runs need it

    import inspect  # the buffer option's name changed in torch 2.14 (the old one warns there)

    no_buffer_sync = ({"forward_sync_buffers": False}
                      if "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
                      else {"broadcast_buffers": False})
    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=False, **no_buffer_sync)


class NullMetricsLog:
    """The metrics log of ranks other than 0: they write nothing."""

    def add_listener(self, listener) -> None:
        pass

    def log(self, event: str, **fields) -> dict:
        return {"event": event, **fields}

    def offset(self) -> int:
        return 0

    def truncate(self, offset: int) -> None:
        pass

    def close(self) -> None:
        pass


def launch_local(nproc: int, argv: list[str]) -> int:
    """Run ``python -m surgeon ARGV`` on ``nproc`` processes of this machine through torch's own
    launcher (``torch.distributed.run``, i.e. ``torchrun --standalone --nproc-per-node nproc``).

    Ctrl-C: torch's launcher passes the SIGINT on to the ranks (each runs in its own session) and
    waits for them; they stop as one process does (checkpoint, the resume line, exit 130), and
    this returns 130 instead of the launcher's traceback.

    Returns:
        the exit code: 0, 130 when interrupted, 2 when a rank stopped on a user error (the ranks
        printed it), else 1.
    """
    from torch.distributed.elastic.multiprocessing import SignalException  # the launcher's own types
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import get_args_parser, run

    args = get_args_parser().parse_args(["--standalone", f"--nproc-per-node={int(nproc)}", "-m", "surgeon", *argv])
    try:
        run(args)
    except ChildFailedError as exc:
        codes = [failure.exitcode for failure in exc.failures.values()]
        return 130 if 130 in codes else 2 if 2 in codes else 1
    except SignalException as exc:
        return 130 if exc.sigval == signal.SIGINT else 128 + int(exc.sigval)
    return 0
