"""Map-style datasets that yield ``(image float32 [3, H, W], label int)``.

Two kinds, one behaviour:

* :class:`ImageFileDataset` decodes image files lazily (imagefolder, vtab1k, filelist, fgvc);
* :class:`ArrayDataset` wraps in-memory uint8 arrays (the ``builtin:`` sets).

Both hand a PIL RGB image to a torchvision/timm transform, so the same transforms apply to every
source. Both are picklable (DataLoader workers) and support *per-sample augmentation seeds*: the
loader from :func:`surgeon.data.build_loader` tells the dataset its ``(seed, epoch)`` and every
item is then transformed under an RNG seeded from ``(seed, epoch, index)``. An augmented batch
therefore depends only on which indices it holds — not on the number of workers, on which worker
read it, or on how many batches a resumed run skipped.

Unreadable images (``data.bad_images``):

* ``error`` — reading raises :class:`~surgeon.errors.UserError` naming the file. Inside a
  DataLoader worker the error travels back as a :class:`BadSample` marker (an exception raised in
  a worker would reach the user wrapped in a worker traceback) and the loader re-raises it cleanly.
* ``skip`` — the item is replaced by the next readable one (so batches keep their size), a
  warning names the file once, and :attr:`ImageFileDataset.skipped` counts distinct bad files.
  The flags live in shared memory so files found bad in worker processes are counted too.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torch.utils.data import Dataset, get_worker_info

from surgeon.errors import UserError

log = logging.getLogger("surgeon.data")

#: File name endings treated as images when walking folders (the torchvision ImageFolder set).
IMG_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".bmp", ".pgm", ".tif", ".tiff", ".webp")

_SKIP_HINT = (
    "fix or delete the file, or set `data.bad_images: skip` to skip unreadable images "
    "(they are counted in the report)"
)

# What PIL raises for files it cannot decode: unknown format (UnidentifiedImageError is an
# OSError), truncated data (OSError), bad headers (SyntaxError/ValueError in some plugins),
# decompression bombs, and mode conversions it does not support.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError,
                  UnidentifiedImageError)


@dataclass(frozen=True)
class BadSample:
    """Marker a worker returns instead of an item when an image cannot be read (``error`` mode).

    The collate function passes it through and the surgeon loader raises :meth:`to_error` in the
    main process, so the user sees the same located message with or without workers.
    """

    path: str
    reason: str

    def to_error(self) -> UserError:
        return UserError(f"cannot read image: {self.reason}", where=self.path, hint=_SKIP_HINT)


def to_rgb(img: Image.Image) -> Image.Image:
    """Return ``img`` as an 8-bit RGB PIL image.

    Grayscale, palette, CMYK, RGBA/LA (alpha dropped) convert through PIL. 16-bit grayscale
    (``I;16*``, common for scans) is rescaled to 8 bit first, because PIL's own conversion clips
    every value above 255 to white.
    """
    if img.mode == "RGB":
        return img
    if img.mode.startswith("I;16"):
        arr = np.asarray(img, dtype=np.uint16)
        img = Image.fromarray((arr >> 8).astype(np.uint8), mode="L")
    elif img.mode == "P" and "transparency" in img.info:
        # PIL warns for palette+transparency unless it goes through RGBA first.
        img = img.convert("RGBA")
    return img.convert("RGB")


def read_image(path: str) -> Image.Image:
    """Decode the image at ``path`` fully and return it as RGB (raises PIL/OS errors as is)."""
    with open(path, "rb") as f:
        img = Image.open(f)
        img.load()  # decode now, while the file is open; lazy decoding would fail later
    return to_rgb(img)


def _sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 32-bit seed for one item of one epoch; SeedSequence mixes the three so nearby
    (seed, epoch, index) triples give unrelated streams."""
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1)[0])


class _SeededTransformDataset(Dataset):
    """Shared part: a transform applied under a per-sample seed when the loader set one."""

    def __init__(self, transform: Callable | None, targets: Sequence[int], classes: Sequence[str]):
        self.transform = transform
        self.targets: list[int] = [int(t) for t in targets]
        self.classes: list[str] = list(classes)
        self._epoch_seed: tuple[int, int] | None = None

    def __len__(self) -> int:
        return len(self.targets)

    def set_epoch_seed(self, seed: int | None, epoch: int = 0) -> None:
        """Make item ``i``'s augmentation a function of ``(seed, epoch, i)``; ``None`` undoes it.

        Called by the loader from :func:`surgeon.data.build_loader` when iteration starts.
        """
        self._epoch_seed = None if seed is None else (int(seed), int(epoch))

    def _apply_transform(self, img: Image.Image, index: int):
        if self.transform is None:
            return img
        if self._epoch_seed is None:
            return self.transform(img)
        # Seed python `random` (timm's RandomResizedCrop) and torch's CPU generator (torchvision
        # flips) for this item only, then restore them: with num_workers=0 this runs in the
        # training process, whose RNG streams (dropout, expert draws) must not be disturbed.
        # Only the CPU generator is touched, never CUDA's.
        s = _sample_seed(*self._epoch_seed, index)
        py_state = random.getstate()
        torch_state = torch.get_rng_state()
        try:
            random.seed(s)
            torch.default_generator.manual_seed(s)
            return self.transform(img)
        finally:
            random.setstate(py_state)
            torch.set_rng_state(torch_state)

    def with_transform(self, transform: Callable | None):
        """A shallow copy of this dataset with another transform (same files, same counters)."""
        clone = self.__class__.__new__(self.__class__)
        clone.__dict__.update(self.__dict__)
        clone.transform = transform
        clone._epoch_seed = None
        return clone

    def class_counts(self) -> list[int]:
        """Images per class, ``len == len(self.classes)``."""
        return np.bincount(np.asarray(self.targets, dtype=np.int64),
                           minlength=len(self.classes)).tolist()


class ImageFileDataset(_SeededTransformDataset):
    """Images read from files.

    Args:
        samples: ``(path, label)`` pairs, paths absolute or relative to the working directory,
            labels in ``0..len(classes)-1``.
        transform: PIL RGB image -> float32 tensor ``[3, H, W]``.
        classes: class names, index = label.
        bad_images: ``"error"`` or ``"skip"`` (see module docstring).
        missing: files already dropped before training because they do not exist
            (``skip`` mode); they count towards :attr:`skipped`.

    Items: ``(image float32 [3, H, W], label int)``.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform: Callable | None, *,
                 classes: Sequence[str], bad_images: str = "error",
                 missing: Sequence[str] = ()):
        assert bad_images in ("error", "skip"), bad_images
        super().__init__(transform, [lbl for _, lbl in samples], classes)
        self.samples: list[tuple[str, int]] = [(str(p), int(lbl)) for p, lbl in samples]
        self.bad_images = bad_images
        self.missing: list[str] = list(missing)
        # One byte per sample in shared memory: DataLoader workers are separate processes and
        # the training process must see which files they found unreadable.
        self._bad = torch.zeros(len(self.samples), dtype=torch.uint8).share_memory_()

    @property
    def skipped(self) -> int:
        """Number of distinct images skipped so far: missing at build time + found unreadable."""
        return len(self.missing) + int(self._bad.sum())

    @property
    def skipped_files(self) -> list[str]:
        """Paths of the skipped images (missing ones first)."""
        bad = torch.nonzero(self._bad).flatten().tolist()
        return self.missing + [self.samples[i][0] for i in bad]

    def __getitem__(self, index: int):
        n = len(self.samples)
        for offset in range(n):
            i = (index + offset) % n
            if self._bad[i]:  # known bad (skip mode): do not decode it again
                continue
            path, label = self.samples[i]
            try:
                img = read_image(path)
            except _DECODE_ERRORS as e:
                reason = f"{type(e).__name__}: {e}"
                if self.bad_images == "error":
                    if get_worker_info() is not None:
                        return BadSample(path, reason)
                    raise BadSample(path, reason).to_error() from None
                if not self._bad[i]:
                    self._bad[i] = 1
                    log.warning("skipping unreadable image %s (%s)", path, reason)
                continue
            # The substitute keeps the requested index's seed: the batch stays a function of the
            # requested indices.
            return self._apply_transform(img, index), label
        err = UserError(f"none of the {n} images of this split can be read",
                        where=self.samples[index][0] if n else None, hint=_SKIP_HINT)
        if get_worker_info() is not None:
            return BadSample(err.where or "?", err.message)
        raise err


class ArrayDataset(_SeededTransformDataset):
    """Images held in memory (the ``builtin:`` sets).

    Args:
        images: uint8 array ``[N, H, W, 3]`` (``[N, H, W]`` or ``[N, H, W, 1]`` grayscale is
            expanded to RGB).
        labels: int array ``[N]`` in ``0..len(classes)-1``.
        transform: PIL RGB image -> float32 tensor ``[3, H, W]``.
        classes: class names, index = label.

    Items: ``(image float32 [3, H, W], label int)``. Nothing can be unreadable: ``skipped == 0``.
    """

    skipped = 0
    skipped_files: list[str] = []
    missing: list[str] = []

    def __init__(self, images: np.ndarray, labels: np.ndarray, transform: Callable | None, *,
                 classes: Sequence[str]):
        images = np.asarray(images)
        if images.ndim == 4 and images.shape[-1] == 1:
            images = images[..., 0]
        assert images.ndim in (3, 4) and (images.ndim == 3 or images.shape[-1] == 3), images.shape
        assert len(images) == len(labels), (images.shape, np.shape(labels))
        if images.dtype != np.uint8:
            images = np.clip(images, 0, 255).astype(np.uint8)
        super().__init__(transform, np.asarray(labels).tolist(), classes)
        self.images = images

    def __getitem__(self, index: int):
        img = to_rgb(Image.fromarray(self.images[index]))
        return self._apply_transform(img, index), self.targets[index]
