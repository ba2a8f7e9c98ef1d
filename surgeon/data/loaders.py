"""DataLoaders whose order and augmentation are a function of ``(seed, epoch)``.

Build one loader per epoch with :func:`build_loader` (cheap: workers start when iteration does).
A resumed run rebuilds the loader of the interrupted epoch with the same ``(seed, epoch)`` and
gets the same order; with ``start_batch=k`` it starts at the k-th batch without reading the
first k, and the batches it yields are identical to those of an uninterrupted run because each
item's augmentation is seeded from ``(seed, epoch, index)`` (see :mod:`surgeon.data.datasets`).

Several processes (``torchrun``, DDP): with ``shard=(rank, world)`` each process loads its share
of the *same* global order, so a world of W processes sees exactly the batches of one process.

- Training (:class:`ShardedBatchSampler`): the global batch of ``batch_size`` is cut into
  ``grad_accum`` micro-batches exactly as one process cuts it (``tensor_split``), and each
  micro-batch into W contiguous shares, again by ``tensor_split``; rank r loads share r of every
  micro-batch (:func:`batch_shares`). Micro-batch k on every rank is then a slice of the same
  global micro-batch k, so the ranks' k-th forward passes draw the same experts as the one
  process's k-th forward. A rank whose share of a micro-batch is empty (a micro-batch smaller
  than W) loads the micro-batch's first item as *padding*, weighted 0 in the loss, so every rank
  runs the same number of forward passes.
- Evaluation: rank r takes items ``r, r + W, r + 2W, ...`` of the dataset (strided, no padding:
  the shards differ in length by at most one and every item is counted once when the results
  are gathered).
"""
from __future__ import annotations

import random
import signal
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from .datasets import BadSample, _SeededTransformDataset


def _derive_seed(seed: int, epoch: int, stream: int) -> int:
    # SeedSequence rather than seed + epoch: with a plain sum, (seed 1, epoch 0) and
    # (seed 0, epoch 1) would share an order, correlating runs that differ only in seed.
    return int(np.random.SeedSequence([int(seed), int(epoch), stream]).generate_state(1)[0])


class EpochSampler(Sampler[int]):
    """Indices ``0..n-1``, shuffled by a generator seeded from ``(seed, epoch)``.

    Args:
        n: dataset length.
        shuffle: permute (train) or keep the dataset order (eval).
        seed, epoch: determine the permutation.
        start: number of leading indices to leave out (resume mid-epoch).
    """

    def __init__(self, n: int, *, shuffle: bool, seed: int, epoch: int, start: int = 0):
        self.n, self.shuffle, self.seed, self.epoch = int(n), bool(shuffle), int(seed), int(epoch)
        self.start = min(max(int(start), 0), self.n)

    def order(self) -> list[int]:
        """The full order of this epoch (``start`` not applied)."""
        if not self.shuffle:
            return list(range(self.n))
        g = torch.Generator().manual_seed(_derive_seed(self.seed, self.epoch, 0))
        return torch.randperm(self.n, generator=g).tolist()

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start:])

    def __len__(self) -> int:
        return self.n - self.start


def batch_shares(n: int, grad_accum: int, world: int, rank: int) -> list[tuple[int, int, int]]:
    """This rank's share of a global batch of ``n`` items, per non-empty micro-batch.

    The batch is split into ``grad_accum`` micro-batches by ``tensor_split`` (sizes differ by at
    most one, larger first), each micro-batch into ``world`` shares the same way.

    Returns:
        ``[(start, stop, micro_start)]``: positions ``[start, stop)`` of the batch that are this
        rank's share of the micro-batch beginning at ``micro_start``; ``start == stop`` when the
        share is empty (the caller pads with the item at ``micro_start``). With ``world`` 1 the
        shares are the micro-batches of one process.
    """
    out = []
    micro_start = 0
    for k in range(grad_accum):
        m = n // grad_accum + (1 if k < n % grad_accum else 0)
        if m == 0:
            continue
        start = micro_start + rank * (m // world) + min(rank, m % world)
        size = m // world + (1 if rank < m % world else 0)
        out.append((start, start + size, micro_start))
        micro_start += m
    return out


def share_positions(n: int, grad_accum: int, world: int, rank: int) -> list[int]:
    """Positions within a global batch of ``n`` items that this rank loads, in order (padding
    included: see :func:`batch_shares`)."""
    positions = []
    for start, stop, micro_start in batch_shares(n, grad_accum, world, rank):
        positions += list(range(start, stop)) if stop > start else [micro_start]
    return positions


class ShardedBatchSampler(Sampler[list[int]]):
    """This rank's share of each global batch of an epoch's order (see the module docstring).

    Args:
        order: the epoch's :class:`EpochSampler` (``start`` 0: ``start_batch`` skips batches).
        batch_size: the global batch (all ranks together).
        drop_last: drop the last incomplete global batch.
        grad_accum: micro-batches per global batch.
        rank, world: this process and the number of processes.
        start_batch: global batches of the epoch to leave out (resume).
    """

    def __init__(self, order: EpochSampler, *, batch_size: int, drop_last: bool, grad_accum: int, rank: int,
                 world: int, start_batch: int = 0):
        self.order, self.batch_size, self.drop_last = order, int(batch_size), bool(drop_last)
        self.grad_accum, self.rank, self.world, self.start_batch = int(grad_accum), int(rank), int(world), int(start_batch)

    def _batches(self) -> list[list[int]]:
        order = self.order.order()
        batches = [order[i:i + self.batch_size] for i in range(0, len(order), self.batch_size)]
        if self.drop_last and batches and len(batches[-1]) < self.batch_size:
            batches.pop()
        return batches[self.start_batch:]

    def __iter__(self) -> Iterator[list[int]]:
        for batch in self._batches():
            yield [batch[i] for i in share_positions(len(batch), self.grad_accum, self.world, self.rank)]

    def __len__(self) -> int:
        return len(self._batches())


class _StridedSampler(Sampler[int]):
    """Items ``rank, rank + world, ...`` of ``0..n-1`` (evaluation shards)."""

    def __init__(self, n: int, rank: int, world: int):
        self.n, self.rank, self.world = int(n), int(rank), int(world)

    def __iter__(self) -> Iterator[int]:
        return iter(range(self.rank, self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


def collate(batch: list):
    """``default_collate`` that lets a :class:`BadSample` through (runs in the worker)."""
    for item in batch:
        if isinstance(item, BadSample):
            return item
    return default_collate(batch)


def seed_worker(worker_id: int) -> None:
    """``worker_init_fn``: seed python ``random`` and numpy from the worker's torch seed.

    torch seeds each worker with ``base_seed + worker_id``, and ``base_seed`` is drawn from the
    loader's generator (seeded from ``(seed, epoch)``), so this is deterministic too.

    Workers also ignore SIGINT: Ctrl-C in a terminal reaches the whole process group, and the
    main process stops at the end of its step (which still needs the workers' batches).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    s = torch.initial_seed() % 2**32
    random.seed(s)
    np.random.seed(s)


class SurgeonDataLoader(DataLoader):
    """A DataLoader that (1) tells surgeon datasets their ``(seed, epoch)`` when iteration starts,
    so augmentation is seeded per item, and (2) re-raises an unreadable-image marker from a worker
    as a clean :class:`~surgeon.errors.UserError` naming the file."""

    def __init__(self, dataset: Dataset, *, seed: int, epoch: int, **kwargs):
        super().__init__(dataset, **kwargs)
        self.seed, self.epoch = int(seed), int(epoch)

    def __iter__(self):
        if isinstance(self.dataset, _SeededTransformDataset):
            # Set before the workers start: they receive a copy of the dataset at this point.
            self.dataset.set_epoch_seed(self.seed, self.epoch)
        return self._checked(super().__iter__())

    @staticmethod
    def _checked(it):
        error = None
        try:
            for batch in it:
                if isinstance(batch, BadSample):
                    error = batch.to_error()
                    break
                yield batch
        finally:
            # Stop the workers now — also when the consumer breaks out early — instead of when
            # the garbage collector gets to the iterator: the raised error's traceback keeps this
            # frame alive, and a later collection (possibly inside a freshly forked worker of the
            # next loader) would wait seconds joining workers it does not own.
            shutdown = getattr(it, "_shutdown_workers", None)
            if shutdown is not None:
                shutdown()
            it = None
        if error is not None:
            raise error


def build_loader(dataset: Dataset, *, batch_size: int, shuffle: bool, seed: int,
                 num_workers: int, drop_last: bool = False, epoch: int = 0,
                 start_batch: int = 0, shard: tuple[int, int] | None = None, grad_accum: int = 1) -> DataLoader:
    """A DataLoader with order and augmentation fixed by ``(seed, epoch)``.

    Args:
        dataset: a dataset from :func:`surgeon.data.build_splits` (any map-style dataset works;
            per-item augmentation seeds apply to surgeon datasets only).
        batch_size: images per batch.
        shuffle: shuffle the order (train) or keep it (eval).
        seed: the run seed.
        num_workers: worker processes (0 = load in this process). Results do not depend on it.
        drop_last: drop the last incomplete batch.
        epoch: epoch number; build a new loader for each epoch.
        start_batch: skip the first ``start_batch`` batches of this epoch without loading them
            (resume mid-epoch); the remaining batches equal those of a full pass.
        shard: ``(rank, world)`` of a multi-process run: this rank's share of the global order
            (see the module docstring); ``batch_size`` stays the global batch when shuffling
            (training) and is the per-rank batch otherwise (evaluation).
        grad_accum: micro-batches per global batch (how the training shares are cut).

    Returns:
        DataLoader yielding ``(images float32 [B, 3, H, W], labels int64 [B])``.
    """
    # The generator only feeds torch's per-worker base seed (the sampler has its own).
    generator = torch.Generator().manual_seed(_derive_seed(seed, epoch, 1))
    batching: dict = {}
    if shard is not None and shard[1] > 1 and shuffle:
        order = EpochSampler(len(dataset), shuffle=True, seed=seed, epoch=epoch)
        batching["batch_sampler"] = ShardedBatchSampler(order, batch_size=batch_size, drop_last=drop_last,
                                                        grad_accum=grad_accum, rank=shard[0], world=shard[1],
                                                        start_batch=start_batch)
    elif shard is not None and shard[1] > 1:
        batching = {"batch_size": batch_size, "sampler": _StridedSampler(len(dataset), *shard), "drop_last": drop_last}
    else:
        sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed, epoch=epoch,
                               start=int(start_batch) * int(batch_size))
        batching = {"batch_size": batch_size, "sampler": sampler, "drop_last": drop_last}
    return SurgeonDataLoader(
        dataset, seed=seed, epoch=epoch, **batching,
        num_workers=num_workers, collate_fn=collate,
        worker_init_fn=seed_worker if num_workers > 0 else None, generator=generator,
        persistent_workers=False, pin_memory=False)
