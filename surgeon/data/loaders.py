"""DataLoaders whose order and augmentation are a function of ``(seed, epoch)``.

Build one loader per epoch with :func:`build_loader` (cheap: workers start when iteration does).
A resumed run rebuilds the loader of the interrupted epoch with the same ``(seed, epoch)`` and
gets the same order; with ``start_batch=k`` it starts at the k-th batch without reading the
first k, and the batches it yields are identical to those of an uninterrupted run because each
item's augmentation is seeded from ``(seed, epoch, index)`` (see :mod:`surgeon.data.datasets`).
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
                 start_batch: int = 0) -> DataLoader:
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

    Returns:
        DataLoader yielding ``(images float32 [B, 3, H, W], labels int64 [B])``.
    """
    sampler = EpochSampler(len(dataset), shuffle=shuffle, seed=seed, epoch=epoch,
                           start=int(start_batch) * int(batch_size))
    # The generator only feeds torch's per-worker base seed (the sampler has its own).
    generator = torch.Generator().manual_seed(_derive_seed(seed, epoch, 1))
    return SurgeonDataLoader(
        dataset, seed=seed, epoch=epoch, batch_size=batch_size, sampler=sampler,
        num_workers=num_workers, drop_last=drop_last, collate_fn=collate,
        worker_init_fn=seed_worker if num_workers > 0 else None, generator=generator,
        persistent_workers=False, pin_memory=False)
