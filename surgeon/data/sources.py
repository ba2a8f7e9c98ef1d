"""Data sources: parse ``data.source`` and turn it into train/val/test datasets.

=======================  ======================================================================
``imagefolder:PATH``     ``PATH/train/<class>/*`` with optional ``PATH/val`` (or ``valid``,
                         ``validation``) and ``PATH/test``; or a single tree ``PATH/<class>/*``.
                         Class names are the sorted ``train`` folder names and index the labels
                         of every split; a class folder in val/test but not in train is an
                         error. Without a val folder, ``data.val_fraction`` of each class is held
                         out (seeded, stratified). Images are found recursively by extension.
``vtab1k:ROOT/TASK``     The PEFT literature's VTAB-1k lists in ``ROOT/TASK``: ``train800.txt``,
                         ``val200.txt``, ``train800val200.txt``, ``test.txt``; lines
                         ``relative/path.jpg <label>``, paths relative to ``ROOT/TASK``.
``filelist:FILE``        One list of ``path label`` lines (paths relative to FILE's folder or
                         absolute; integer labels ``0..K-1``; ``#`` comment lines and blank lines
                         ignored). ``data.val_fraction`` of each class is held out for
                         validation (seeded, stratified); there is no test split.
``fgvc:ROOT``            VPT-style FGVC: ``ROOT/train.json``, ``ROOT/val.json``,
                         ``ROOT/test.json``, each ``{"relative/image/path": label}``. Images are
                         looked up under ``ROOT/images/``, then ``ROOT/Images/``, then ``ROOT``
                         (the layouts of CUB/NABirds, Stanford Dogs, Flowers/Cars in VPT's
                         release): the first folder that holds the most of the first 50 listed
                         images wins and is used for all three files. Without ``val.json``,
                         ``data.val_fraction`` of train is held out.
``builtin:NAME``         Offline sets from :mod:`surgeon.builtin.datasets` (in-memory arrays).
=======================  ======================================================================

``data.protocol``:

* ``tune`` — train on the training split, validate on val, **no test split** (never touch test
  while choosing hyper-parameters), for every source;
* ``final`` — for the sources with a VTAB-style pair (``vtab1k``, ``fgvc``, ``builtin``) train on
  train+val (``train800val200.txt``; train.json+val.json; ``trainval``), keep val for
  monitoring (it overlaps train, as in the papers), and test on test; for ``imagefolder`` and
  ``filelist`` train stays train, val stays val (so best-epoch selection is meaningful) and the
  test split is added when there is one.

Labels of list/json sources: ``K = 1 + the largest label in the lists of the task``; class names
are the images' parent folder names when each label has exactly one distinct folder, else
``"0".."K-1"``. ``K`` is bounded before anything of that length is built: by
``model.num_classes`` when the recipe declares it, else by the number of images listed (a label
beyond either is refused at its file and line).

An image tree is walked once, following symlinked folders but never into a folder already
walked (a symlink loop cannot hang the scan), and each real file counts once (a file reached
twice through symlinks is not trained on twice, nor split into both train and val).

Every split gets a fingerprint (:attr:`DataSplits.fingerprint`: per split the number of images,
their total size in bytes and a hash of paths, sizes and labels; for ``builtin:`` sets a hash of
the generated arrays): cheap (one ``stat`` per listed image, done anyway to check it exists),
stored in every checkpoint, compared when a run resumes (:func:`data_changes`).

Every file named in a list is checked with ``os.path.exists`` before training, so a missing
image is reported (list file and line) up front; with ``data.bad_images: skip`` missing files are
dropped, warned about and counted in ``dataset.skipped`` instead.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
from dataclasses import dataclass, field
from functools import partial
from typing import Callable

import numpy as np
import torch
from torch.utils.data import Dataset

from surgeon.errors import UserError
from surgeon.recipe.sections import MAX_CLASSES, DataConfig

from .datasets import IMG_EXTENSIONS, ArrayDataset, ImageFileDataset
from .transforms import TransformSet, build_transforms

log = logging.getLogger("surgeon.data")

KNOWN_SCHEMES = ("builtin", "imagefolder", "vtab1k", "filelist", "fgvc")
_SCHEME_USAGE = ("builtin:NAME, imagefolder:PATH, vtab1k:ROOT/TASK, filelist:FILE, fgvc:ROOT")
_VAL_DIRS = ("val", "valid", "validation")
_FGVC_PROBE = 50  # listed images tried per candidate folder when locating fgvc images


@dataclass
class DataSplits:
    """The datasets of one run.

    Attributes:
        train: items ``(image float32 [3, H, W] normalised, label int)``, train transform.
        val: same items with the eval transform, or ``None``.
        test: same items with the eval transform, or ``None`` (always ``None`` under ``tune``).
        num_classes: K; labels are ``0..K-1``.
        class_names: ``len == num_classes``.
        provenance: one paragraph for reports: what the data is, where from, split sizes,
            transforms.
        source: the ``data.source`` spec string.
        val_in_train: every val image is also a training image (the ``final`` protocol of
            VTAB-style sources): val scores then measure fit, not generalisation, and must not
            select a checkpoint.
        fingerprint: ``{"classes": {"count", "hash"}, "splits": {name: {"images", "bytes",
            "hash"}}}``, plain data (stored in checkpoints; see :func:`data_changes`); None for
            splits built by hand.
    """

    train: Dataset
    val: Dataset | None
    test: Dataset | None
    num_classes: int
    class_names: list[str]
    provenance: str
    source: str
    val_in_train: bool = False
    fingerprint: dict | None = None


# --------------------------------------------------------------------------------------------
# Intermediate form shared by the file-based sources.

@dataclass
class _Entry:
    path: str   # absolute (or cwd-relative) image path
    label: int
    where: str | Callable[[], str]  # "list.txt:12" / the class folder / lazy "train.json:3"


@dataclass
class _Split:
    entries: list[_Entry]
    origin: str  # for the provenance text, e.g. "train800val200.txt"


@dataclass
class _Found:
    train: _Split
    val: _Split | None
    test: _Split | None
    classes: list[str]
    what: str                      # first sentence of the provenance
    notes: list[str] = field(default_factory=list)
    base: str = "the list's folder"  # what listed paths are relative to (for error hints)


def parse_source(spec: str) -> tuple[str, str]:
    """Split ``"scheme:arg"``; raise :class:`UserError` for an unknown scheme or empty argument."""
    scheme, sep, arg = str(spec).partition(":")
    scheme = scheme.strip().lower()
    if not sep or scheme not in KNOWN_SCHEMES:
        hint = f"use one of {_SCHEME_USAGE}"
        if not sep and os.path.isdir(os.path.expanduser(str(spec))):
            hint = f"for a folder of class sub-folders write imagefolder:{spec}"
        elif not sep and os.path.isfile(os.path.expanduser(str(spec))):
            hint = f"for a list of `path label` lines write filelist:{spec}"
        raise UserError(f"unknown data source {spec!r}; known schemes: {', '.join(KNOWN_SCHEMES)}",
                        where="data.source", hint=hint)
    arg = arg.strip()
    if not arg:
        thing = "dataset" if scheme == "builtin" else "path"
        raise UserError(f"data source {spec!r} names no {thing}",
                        where="data.source", hint=f"use one of {_SCHEME_USAGE}")
    if scheme != "builtin":
        arg = os.path.expandvars(os.path.expanduser(arg))
    return scheme, arg


def build_splits(data_cfg: DataConfig, model: torch.nn.Module, *, seed: int,
                 num_classes: int | None = None) -> DataSplits:
    """Build train/val/test datasets for ``data_cfg.source`` with ``model``'s transforms.

    Args:
        data_cfg: the recipe's typed ``data`` section: ``source``, ``protocol`` (tune|final),
            ``image_size``, ``augment``, ``val_fraction``, ``bad_images`` (error|skip), ``mean``,
            ``std`` (``num_workers`` is for the loader).
        model: the timm backbone; its ``timm.data.resolve_input_data_config`` gives the input
            size, interpolation, mean/std and crop_pct unless the recipe overrides them.
        seed: the *data* seed: it draws the held-out validation split (single trees, filelist,
            fgvc without val.json) and is the ``seed`` of ``builtin_split`` (0 = the canonical
            built-in sets). Same seed, same splits. To compare training seeds on fixed data,
            keep this one fixed (e.g. 0) rather than passing each run's training seed.
        num_classes: the class count the recipe declares (``model.num_classes``), if any: a
            listed label must be below it.

    Returns:
        :class:`DataSplits`; train items use the train transform, val/test the eval transform.

    Raises:
        UserError: unknown scheme, missing path, empty class folder or split, bad label (not
            an integer, negative, beyond the class count), a list that is not UTF-8, missing
            image listed in a file (``bad_images: error``).
    """
    source = data_cfg.source
    scheme, arg = parse_source(source)
    tf = build_transforms(data_cfg, model)
    protocol = data_cfg.protocol
    if scheme == "builtin":
        return _build_builtin(source, arg, protocol, seed, tf)
    finder = {"imagefolder": _find_imagefolder, "vtab1k": _find_vtab1k,
              "filelist": _find_filelist, "fgvc": _find_fgvc}[scheme]
    found = finder(arg, data_cfg, protocol, seed, num_classes)
    return _assemble(source, found, data_cfg, protocol, tf)


def source_classes(data_cfg: DataConfig, *, seed: int = 0, num_classes: int | None = None) -> list[str]:
    """The class names of ``data_cfg.source`` (``len`` = the head size ``apply`` would use),
    found the way :func:`build_splits` finds them but without building datasets.

    No image is opened and listed files are not checked for existence: imagefolder lists the
    tree (one directory walk: slow only for millions of files), vtab1k/filelist read their list
    files, fgvc its json files (and probes where the first 50 images lie), builtin its registry.

    Args:
        data_cfg: the recipe's typed ``data`` section (``source``, ``protocol``, ``val_fraction``).
        seed: the data seed (as :func:`build_splits`).
        num_classes: the declared class count, if any (as :func:`build_splits`).

    Raises:
        UserError: as :func:`build_splits` for an unknown scheme, a missing path or a bad list.
    """
    scheme, arg = parse_source(data_cfg.source)
    if scheme == "builtin":
        return list(_builtin_info(data_cfg.source, arg)["class_names"])
    finder = {"imagefolder": _find_imagefolder, "vtab1k": _find_vtab1k,
              "filelist": _find_filelist, "fgvc": _find_fgvc}[scheme]
    return list(finder(arg, data_cfg, data_cfg.protocol, seed, num_classes).classes)


def data_changes(old: dict | None, new: dict | None) -> list[str]:
    """What differs between two :attr:`DataSplits.fingerprint` s, in words (empty: the same
    data, or a fingerprint is missing: a checkpoint written before fingerprints existed)."""
    if not old or not new:
        return []
    out = []
    oc, nc = old.get("classes", {}), new.get("classes", {})
    if oc.get("count") != nc.get("count"):
        out.append(f"{nc.get('count')} classes (was {oc.get('count')})")
    elif oc.get("hash") != nc.get("hash"):
        out.append("other class names")
    splits = old.get("splits", {}), new.get("splits", {})
    for name in ("train", "val", "test"):
        a, b = splits[0].get(name), splits[1].get(name)
        if a == b:
            continue
        if a is None or b is None:
            out.append(f"{name}: {'no split' if b is None else str(b['images']) + ' images'} "
                       f"(was {'no split' if a is None else str(a['images']) + ' images'})")
        elif a["images"] != b["images"]:
            out.append(f"{name}: {b['images']} images (was {a['images']})")
        elif a["bytes"] != b["bytes"]:
            out.append(f"{name}: the same number of images, {b['bytes'] - a['bytes']:+,} bytes")
        else:
            out.append(f"{name}: the same number and size of images, but other files or labels")
    return out


def _fingerprint(class_names: list[str], splits: dict[str, list[tuple[str, int, int]] | None]) -> dict:
    """:attr:`DataSplits.fingerprint` from the class names and, per split, ``(path, bytes,
    label)`` rows (or None for an absent split)."""
    out = {"classes": {"count": len(class_names), "hash": _hash("\n".join(class_names).encode())}, "splits": {}}
    for name, rows in splits.items():
        if rows is None:
            continue
        h = hashlib.blake2b(digest_size=16)
        for path, size, label in rows:
            h.update(f"{path}\t{size}\t{label}\n".encode("utf-8", "surrogateescape"))
        out["splits"][name] = {"images": len(rows), "bytes": sum(r[1] for r in rows), "hash": h.hexdigest()}
    return out


def _hash(data: bytes) -> str:
    return hashlib.blake2b(data, digest_size=16).hexdigest()


# --------------------------------------------------------------------------------------------
# Shared helpers

def _need_dir(path: str, what: str, hint: str) -> None:
    if not os.path.exists(path):
        raise UserError(f"{what} not found", where=path, hint=hint)
    if not os.path.isdir(path):
        raise UserError(f"{what} is not a directory", where=path, hint=hint)


def _need_file(path: str, what: str, hint: str) -> None:
    if not os.path.isfile(path):
        problem = "is not a file" if os.path.exists(path) else "not found"
        raise UserError(f"{what} {problem}", where=path, hint=hint)


def stratified_split(labels: list[int] | np.ndarray, val_fraction: float, seed: int
                     ) -> tuple[list[int], list[int]]:
    """Seeded, stratified train/val split of indices ``0..N-1``.

    Each class with ``n >= 2`` images gives ``max(1, round(n * val_fraction))`` images (at most
    ``n - 1``) to val, so every class that can be validated is; single-image classes stay in
    train.

    Returns:
        ``(train_indices, val_indices)``, each sorted.
    """
    labels = np.asarray(labels, dtype=np.int64)
    rng = np.random.default_rng(int(seed))
    train, val = [], []
    for c in np.unique(labels):  # sorted: the draw order is fixed
        idx = np.flatnonzero(labels == c)
        idx = idx[rng.permutation(len(idx))]
        k = 0 if len(idx) < 2 else min(len(idx) - 1, max(1, int(round(len(idx) * val_fraction))))
        val += idx[:k].tolist()
        train += idx[k:].tolist()
    return sorted(train), sorted(val)


def _carve_val(split: _Split, val_fraction: float, seed: int) -> tuple[_Split, _Split | None]:
    tr, va = stratified_split([e.label for e in split.entries], val_fraction, seed)
    if not va:
        log.warning("%s: too few images per class to hold out a validation split; "
                    "training without validation", split.origin)
        return split, None
    note = f"{val_fraction:g} of each class held out with seed {seed}"
    return (_Split([split.entries[i] for i in tr], f"{split.origin} minus held-out val"),
            _Split([split.entries[i] for i in va], f"{split.origin}, {note}"))


def _names_from_paths(splits: list[_Split], k: int) -> list[str]:
    """Class names from parent folders when each label has exactly one distinct folder name."""
    folders: dict[int, set[str]] = {}
    for s in splits:
        for e in s.entries:
            folders.setdefault(e.label, set()).add(os.path.basename(os.path.dirname(e.path)))
    names = [next(iter(folders[c])) if len(folders.get(c, ())) == 1 else None for c in range(k)]
    if None not in names and len(set(names)) == k:
        return names
    return [str(c) for c in range(k)]


def _warn_label_gaps(splits: list[_Split], k: int, origin: str) -> None:
    seen = {e.label for s in splits for e in s.entries}
    absent = [c for c in range(k) if c not in seen]
    if absent:
        extra = " (labels look 1-based; they must start at 0)" if absent == [0] else ""
        log.warning("%s: labels 0..%d have no images for %s%s", origin, k - 1,
                    _preview(absent), extra)


def _preview(items: list, n: int = 5) -> str:
    text = ", ".join(str(x) for x in items[:n])
    return text + (f", … ({len(items)} in all)" if len(items) > n else "")


def _class_count(splits: list[_Split], declared: int | None) -> int:
    """``K = 1 + the largest label``, refused (at the label's file and line) when it exceeds the
    declared ``model.num_classes``, or, undeclared, the number of images listed (a class without
    a single image is a typo's, like label ``99999999999``), before anything of length K exists."""
    top = max((e for s in splits for e in s.entries), key=lambda e: e.label)
    k = top.label + 1
    where = top.where() if callable(top.where) else top.where
    if declared is not None:
        if k > declared:
            raise UserError(f"label {top.label} is out of range: model.num_classes is {declared}, so labels are "
                            f"0..{declared - 1}", where=where,
                            hint="fix the label, or raise model.num_classes (or remove it: the labels then give "
                                 "the class count)")
        return k
    images = len({e.path for s in splits for e in s.entries})
    bound = min(images, MAX_CLASSES)
    if k > bound:
        raise UserError(f"label {top.label} would make {k:,} classes (labels are 0..K-1), more than the "
                        f"{images:,} images listed" if images < MAX_CLASSES else
                        f"label {top.label} would make {k:,} classes, more than surgeon's limit of {MAX_CLASSES:,}",
                        where=where,
                        hint="labels are class indices 0..K-1; if the data really has more classes than images, "
                             "declare the count with model.num_classes")
    return k


def _parse_label(token: str, where: str) -> int:
    try:
        label = int(token)
    except ValueError:
        raise UserError(f"label {token!r} is not an integer", where=where,
                        hint="labels are integers 0..K-1") from None
    if label < 0:
        raise UserError(f"label {label} is out of range (labels are 0..K-1)", where=where)
    return label


def _read_text(file: str) -> str:
    """A list or json file as text; not UTF-8 (or unreadable) is a :class:`UserError` naming the
    line and the byte."""
    try:
        with open(file, "rb") as f:
            raw = f.read()
    except OSError as exc:
        raise UserError(f"cannot read the file: {exc.strerror}", where=file) from None
    try:
        return raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = raw.count(b"\n", 0, exc.start) + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise UserError(f"not UTF-8 text: byte 0x{raw[exc.start]:02x} at column {column} of line {line}",
                        where=f"{file}:{line}",
                        hint="save the file as UTF-8 (e.g. `iconv -f latin1 -t utf-8 OLD > NEW`)") from None


def _read_list(file: str, base: str) -> list[_Entry]:
    """Parse ``path label`` lines (path may contain spaces; ``#`` lines and blanks skipped)."""
    entries = []
    text = _read_text(file)
    # Line numbers as a text-mode file iteration counts them (universal newlines).
    for n, line in enumerate(text.replace("\r\n", "\n").replace("\r", "\n").split("\n"), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{file}:{n}"
        parts = line.rsplit(None, 1)
        if len(parts) != 2:
            raise UserError(f"expected `path label`, got {line!r}", where=where,
                            hint="one image per line: a path, a space, an integer label")
        rel, token = parts
        entries.append(_Entry(os.path.join(base, rel), _parse_label(token, where), where))
    if not entries:
        raise UserError("the list has no images", where=file,
                        hint="each line is `relative/path.jpg <label>`")
    return entries


def _check_files(split: _Split, bad_images: str, hint: str
                 ) -> tuple[list[tuple[str, int]], list[str], list[tuple[str, int, int]]]:
    """Existence check of every listed image: ``error`` raises on the first missing one (with the
    total count), ``skip`` drops and returns them. Returns ``(samples, missing, rows)``, rows
    ``(path, bytes, label)`` of the samples for the fingerprint."""
    samples, missing, rows = [], [], []
    first = None
    for e in split.entries:
        try:
            info = os.stat(e.path)
            found = stat.S_ISREG(info.st_mode)
        except (OSError, ValueError):
            found = False
        if found:
            samples.append((e.path, e.label))
            rows.append((e.path, info.st_size, e.label))
        else:
            missing.append(e.path)
            first = first or e
    if missing and (bad_images == "error" or not samples):
        extra = f" ({len(missing)} of {len(split.entries)} listed images are missing)" \
            if len(missing) > 1 else ""
        where = first.where() if callable(first.where) else first.where
        raise UserError(f"image file not found: {first.path}{extra}", where=where,
                        hint=hint if bad_images == "error" or samples else
                        "no listed image exists; check the root folder")
    if missing:
        log.warning("%s: skipping %d missing image(s): %s", split.origin, len(missing),
                    _preview(missing, 3))
    return samples, missing, rows


def _assemble(source: str, found: _Found, data_cfg: DataConfig, protocol: str,
              tf: TransformSet) -> DataSplits:
    bad = data_cfg.bad_images
    hint = (f"listed paths are relative to {found.base}; fix the path or set "
            "`data.bad_images: skip` to drop missing images")
    datasets = {}
    rows: dict[str, list | None] = {}
    missing_at_build: set[str] = set()  # a set: vtab's train800val200 repeats val200
    for name in ("train", "val", "test"):
        split: _Split | None = getattr(found, name)
        if split is None:
            datasets[name] = rows[name] = None
            continue
        samples, missing, rows[name] = _check_files(split, bad, hint)
        missing_at_build.update(missing)
        datasets[name] = ImageFileDataset(
            samples, tf.train if name == "train" else tf.eval, classes=found.classes,
            bad_images=bad, missing=missing)
    sizes = ", ".join(f"{n} {len(d)} images ({getattr(found, n).origin})"
                      for n, d in datasets.items() if d is not None)
    if datasets["test"] is None:
        sizes += "; no test split" + (" (protocol tune)" if protocol == "tune" else "")
    text = (f"{found.what}. {len(found.classes)} classes ({_preview(found.classes)}). "
            f"Protocol {protocol}: {sizes}. Transforms — {tf.describe()}.")
    if missing_at_build:
        text += f" {len(missing_at_build)} listed image(s) were missing and skipped."
    if found.notes:
        text += " " + " ".join(found.notes)
    val_in_train = bool(found.val and found.val.entries) and \
        {e.path for e in found.val.entries} <= {e.path for e in found.train.entries}
    return DataSplits(train=datasets["train"], val=datasets["val"], test=datasets["test"],
                      num_classes=len(found.classes), class_names=list(found.classes),
                      provenance=text, source=source, val_in_train=val_in_train,
                      fingerprint=_fingerprint(list(found.classes), rows))


# --------------------------------------------------------------------------------------------
# imagefolder:PATH

def _is_image(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMG_EXTENSIONS)


def _subdirs(path: str) -> list[str]:
    return sorted(d.name for d in os.scandir(path) if d.is_dir() and not d.name.startswith("."))


def _scan_class(folder: str, seen: set[str]) -> tuple[list[str], int]:
    """The images under ``folder``, in ``os.walk`` order (a folder's files sorted, then its
    sub-folders, sorted, depth first), following symlinked folders.

    A link to a folder that holds it (``x -> .``, ``x -> ..``: a loop) is not followed, a folder
    already walked (two links to one folder) is not walked again, and a file whose real path is
    in ``seen`` (shared by the classes of one split) is left out; the real paths of the files
    returned are added to ``seen``.

    Returns:
        ``(paths, duplicates)``: the image paths and how many files were left out as seen.
    """
    files, duplicates = [], 0
    visited: set[str] = set()
    stack = [folder]
    while stack:
        path = stack.pop()
        real = os.path.realpath(path)
        if real in visited:
            continue
        visited.add(real)
        try:
            entries = sorted(os.scandir(path), key=lambda d: d.name)
        except OSError as exc:
            raise UserError(f"cannot list the folder: {exc.strerror}", where=path) from None
        subdirs = []
        for entry in entries:
            try:
                is_dir = entry.is_dir()
            except OSError:
                is_dir = False
            if is_dir:
                if entry.name.startswith("."):
                    continue
                if entry.is_symlink():
                    target = os.path.realpath(entry.path)
                    if real == target or real.startswith(target.rstrip(os.sep) + os.sep):
                        continue  # a link to a folder that holds it: a loop, not more images
                subdirs.append(entry.path)
            elif _is_image(entry.name):
                # The real path without a syscall per file unless the file itself is a link.
                key = os.path.realpath(entry.path) if entry.is_symlink() else os.path.join(real, entry.name)
                if key in seen:
                    duplicates += 1
                    continue
                seen.add(key)
                files.append(entry.path)
        stack.extend(reversed(subdirs))
    return files, duplicates


def _scan_tree(path: str, classes: list[str] | None, split_name: str) -> tuple[list[str], _Split]:
    """Scan ``path/<class>/...``; ``classes`` (from train) fixes the label mapping."""
    found = _subdirs(path)
    if not found:
        loose = [f for f in os.listdir(path) if _is_image(f)]
        raise UserError(f"the {split_name} folder has no class sub-folders"
                        + (f" ({len(loose)} images lie directly in it)" if loose else ""),
                        where=path, hint="imagefolder expects PATH/<class>/<image> "
                        "(or PATH/train/<class>/<image>)")
    if classes is None:
        classes = found
    else:
        unknown = [c for c in found if c not in classes]
        if unknown:
            raise UserError(f"class folder {unknown[0]!r} is in {split_name}/ but not in train/",
                            where=os.path.join(path, unknown[0]),
                            hint="every class of val/test needs training images; "
                                 "add it to train/ or remove it")
    index = {c: i for i, c in enumerate(classes)}
    entries = []
    seen: set[str] = set()
    duplicates = 0
    for c in found:
        folder = os.path.join(path, c)
        files, dup = _scan_class(folder, seen)
        duplicates += dup
        if not files and dup:
            raise UserError(f"class folder {c!r} holds only images already counted (in it or in another class "
                            "folder, through symlinks)", where=folder,
                            hint="an image belongs to one class: remove the symlinks or the folder")
        if not files:
            raise UserError(f"class folder {c!r} contains no images", where=folder,
                            hint=f"add images ({', '.join(IMG_EXTENSIONS)}) or remove the folder")
        entries += [_Entry(f, index[c], folder) for f in files]
    if duplicates:
        log.warning("%s: %d image(s) reached more than once through symlinks were counted once", path, duplicates)
    return classes, _Split(entries, f"{split_name}/" if split_name != "tree" else "the tree")


def _find_imagefolder(root: str, cfg: DataConfig, protocol: str, seed: int, num_classes: int | None) -> _Found:
    _need_dir(root, "data directory", "imagefolder:PATH expects a folder of class sub-folders, "
              "or train/ [val/] [test/] sub-folders of class sub-folders")
    subdirs = _subdirs(root)
    if "train" in subdirs:
        classes, train = _scan_tree(os.path.join(root, "train"), None, "train")
        val_dirs = [d for d in _VAL_DIRS if d in subdirs]
        if len(val_dirs) > 1:
            raise UserError(f"found several validation folders: {', '.join(val_dirs)}",
                            where=root, hint="keep one of them (val/ is read)")
        val = _scan_tree(os.path.join(root, val_dirs[0]), classes, val_dirs[0])[1] \
            if val_dirs else None
        test = _scan_tree(os.path.join(root, "test"), classes, "test")[1] \
            if "test" in subdirs else None
        ignored = [d for d in subdirs if d not in ("train", "test", *val_dirs)]
        if ignored:
            log.warning("%s: ignoring folder(s) %s (only train/, val/, test/ are read)",
                        root, ", ".join(ignored))
        layout = "/, ".join(["train", *val_dirs, *(["test"] if test else [])]) + "/"
        what = f"ImageFolder tree {root} ({layout} sub-folders)"
        if val is None:
            train, val = _carve_val(train, cfg.val_fraction, seed)
    else:
        for d in (*_VAL_DIRS, "test"):
            # PATH/test/<class>/... without PATH/train: a split layout missing its train part,
            # not a class called "test" (that would hold images, not class folders).
            if d in subdirs and _subdirs(os.path.join(root, d)):
                raise UserError(f"found a {d}/ folder of class folders but no train/ folder",
                                where=root, hint="put the training images in "
                                f"{os.path.join(root, 'train')}/<class>/")
        classes, tree = _scan_tree(root, None, "tree")
        train, val = _carve_val(tree, cfg.val_fraction, seed)
        test = None
        what = f"ImageFolder tree {root} (one tree of class folders, split into train/val)"
    return _Found(train, val, test if protocol == "final" else None, classes, what)


# --------------------------------------------------------------------------------------------
# vtab1k:ROOT/TASK

_VTAB_HINT = ("vtab1k:ROOT/TASK expects ROOT/TASK/{train800,val200,train800val200,test}.txt "
              "as distributed with the PEFT literature")


def _find_vtab1k(task_dir: str, cfg: DataConfig, protocol: str, seed: int, num_classes: int | None) -> _Found:
    _need_dir(task_dir, "VTAB-1k task folder", _VTAB_HINT)
    if not any(os.path.exists(os.path.join(task_dir, f)) for f in ("val200.txt", "test.txt")):
        tasks = [d for d in _subdirs(task_dir)
                 if os.path.exists(os.path.join(task_dir, d, "val200.txt"))]
        if tasks:
            raise UserError("this is the VTAB-1k root, not a task folder", where=task_dir,
                            hint=f"name a task: vtab1k:{os.path.join(task_dir, tasks[0])} "
                                 f"(tasks here: {_preview(tasks, 8)})")

    def listed(name: str) -> _Split:
        path = os.path.join(task_dir, name)
        _need_file(path, f"VTAB-1k list {name}", _VTAB_HINT)
        return _Split(_read_list(path, task_dir), name)

    val = listed("val200.txt")
    notes = []
    if protocol == "tune":
        train, test = listed("train800.txt"), None
    else:
        if os.path.exists(os.path.join(task_dir, "train800val200.txt")):
            train = listed("train800val200.txt")
        else:  # same images, spelled as two files: accept it rather than fail
            t800 = listed("train800.txt")
            train = _Split(t800.entries + val.entries, "train800.txt + val200.txt")
            notes.append("train800val200.txt absent: trained on train800.txt + val200.txt.")
        test = listed("test.txt")
    splits = [s for s in (train, val, test) if s]
    k = _class_count(splits, num_classes)
    _warn_label_gaps(splits, k, task_dir)
    task = os.path.basename(os.path.normpath(task_dir))
    what = f"VTAB-1k task {task!r} from {task_dir} (PEFT-literature lists)"
    return _Found(train, val, test, _names_from_paths(splits, k), what, notes, base=task_dir)


# --------------------------------------------------------------------------------------------
# filelist:FILE

def _find_filelist(file: str, cfg: DataConfig, protocol: str, seed: int, num_classes: int | None) -> _Found:
    _need_file(file, "file list", "filelist:FILE expects a text file of `path label` lines")
    base = os.path.dirname(os.path.abspath(file))
    full = _Split(_read_list(file, base), os.path.basename(file))
    k = _class_count([full], num_classes)
    _warn_label_gaps([full], k, file)
    names = _names_from_paths([full], k)
    train, val = _carve_val(full, cfg.val_fraction, seed)
    what = f"File list {file} ({len(full.entries)} images, split into train/val)"
    return _Found(train, val, None, names, what, base=base)


# --------------------------------------------------------------------------------------------
# fgvc:ROOT

_FGVC_HINT = "fgvc:ROOT expects ROOT/train.json, ROOT/val.json, ROOT/test.json as in VPT"


def _json_where(file: str, text: str, key: str) -> str:
    at = text.find(json.dumps(key))
    return f"{file}:{text.count(chr(10), 0, at) + 1}" if at >= 0 else file


def _read_json(file: str) -> tuple[list[tuple[str, int]], str]:
    """``([(relative path, label)], file text)`` from a ``{path: label}`` JSON object."""
    text = _read_text(file)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(f"not valid JSON: {e.msg}", where=f"{file}:{e.lineno}",
                        hint=_FGVC_HINT) from None
    if not isinstance(data, dict):
        raise UserError(f"expected a JSON object {{image path: label}}, got {type(data).__name__}",
                        where=file, hint=_FGVC_HINT)
    if not data:
        raise UserError("the file lists no images", where=file, hint=_FGVC_HINT)
    rows = []
    for rel, label in data.items():
        if isinstance(label, bool) or not isinstance(label, int):
            raise UserError(f"label {label!r} of {rel!r} is not an integer",
                            where=_json_where(file, text, rel), hint="labels are integers 0..K-1")
        if label < 0:
            raise UserError(f"label {label} of {rel!r} is out of range (labels are 0..K-1)",
                            where=_json_where(file, text, rel))
        rows.append((rel, label))
    return rows, text


def _find_fgvc(root: str, cfg: DataConfig, protocol: str, seed: int, num_classes: int | None) -> _Found:
    _need_dir(root, "FGVC data folder", _FGVC_HINT)
    names = ["train.json", "val.json"] + (["test.json"] if protocol == "final" else [])
    rows: dict[str, list] = {}
    texts: dict[str, str] = {}  # for line numbers in error messages
    for name in names:
        path = os.path.join(root, name)
        if name == "val.json" and not os.path.exists(path):
            continue  # optional: held out from train below
        _need_file(path, f"FGVC split file {name}", _FGVC_HINT)
        rows[name], texts[name] = _read_json(path)

    # Where the images are: VPT's releases put them under images/ (CUB, NABirds), Images/
    # (Stanford Dogs) or directly under ROOT (Flowers: jpg/..., Cars: cars_train/...).
    candidates = [os.path.join(root, "images"), os.path.join(root, "Images"), root]
    probe = [rel for rel, _ in rows["train.json"][:_FGVC_PROBE]]
    scores = [sum(os.path.isfile(os.path.join(c, rel)) for rel in probe) for c in candidates]
    best = candidates[int(np.argmax(scores))]  # argmax takes the first of ties
    if max(scores) == 0:
        rel = rows["train.json"][0][0]
        raise UserError(f"image {rel!r} listed in train.json is in none of images/, Images/ or "
                        f"the root folder", where=os.path.join(root, "train.json"),
                        hint=f"put the images under {candidates[0]} (keys are relative to it)")

    def split_of(name: str) -> _Split:
        file = os.path.join(root, name)
        # Line numbers are looked up only for a missing image (a search per key would be slow).
        entries = [_Entry(os.path.join(best, rel), label,
                          partial(_json_where, file, texts[name], rel))
                   for rel, label in rows[name]]
        return _Split(entries, name)

    train = split_of("train.json")
    val = split_of("val.json") if "val.json" in rows else None
    test = split_of("test.json") if "test.json" in rows else None
    if val is None:
        part, val = _carve_val(train, cfg.val_fraction, seed)
        if protocol == "tune" or val is None:
            train = part
    elif protocol == "final":
        train = _Split(train.entries + val.entries, "train.json + val.json")
    splits = [s for s in (train, val, test) if s]
    k = _class_count(splits, num_classes)
    _warn_label_gaps(splits, k, root)
    rel_base = os.path.relpath(best, root)
    what = (f"FGVC (VPT-style json) data at {root}, images under "
            f"{'the root folder' if rel_base == '.' else rel_base + '/'}")
    return _Found(train, val, test, _names_from_paths(splits, k), what, base=best)


# --------------------------------------------------------------------------------------------
# builtin:NAME

def _builtin_module(source: str):
    # A hook looked up at call time, not imported with this module: the built-in sets are an
    # optional part of an installation (a slim one may leave them out: a clear error then), and
    # the generators (numpy, scikit-learn) load only when a built-in set is used.
    try:
        from surgeon.builtin import datasets as builtin
    except ModuleNotFoundError as e:
        if not (e.name or "").startswith("surgeon.builtin"):
            raise
        raise UserError(f"built-in data sets are not available in this installation ({source})",
                        where="data.source",
                        hint="use imagefolder:PATH, vtab1k:ROOT/TASK, filelist:FILE or fgvc:ROOT"
                        ) from None
    return builtin


def _builtin_info(source: str, name: str) -> dict:
    try:
        return _builtin_module(source).builtin_info(name)
    except (KeyError, ValueError) as e:
        raise UserError(f"unknown built-in data set {name!r} ({e})", where="data.source") from None


def _build_builtin(source: str, name: str, protocol: str, seed: int,
                   tf: TransformSet) -> DataSplits:
    builtin = _builtin_module(source)
    info = _builtin_info(source, name)
    names = list(info["class_names"])
    k = int(info["num_classes"])
    assert len(names) == k, (name, k, len(names))
    wanted = {"train": "trainval", "val": "val", "test": "test"} if protocol == "final" else \
             {"train": "train", "val": "val", "test": None}
    datasets, sizes = {}, []
    fingerprint = _fingerprint(names, {})
    for role, split in wanted.items():
        if split is None:
            datasets[role] = None
            continue
        images, labels = builtin.builtin_split(name, split, seed=seed)
        # The generated arrays themselves: a changed generator (or cache) shows up on resume.
        digest = hashlib.blake2b(memoryview(np.ascontiguousarray(images)).cast("B"), digest_size=16)
        digest.update(np.ascontiguousarray(labels, dtype=np.int64).tobytes())
        fingerprint["splits"][role] = {"images": int(len(labels)), "bytes": int(np.asarray(images).nbytes),
                                       "hash": digest.hexdigest()}
        if len(labels) == 0:
            raise UserError(f"built-in data set {name!r} has no images in split {split!r}",
                            where="data.source")
        assert 0 <= int(np.min(labels)) and int(np.max(labels)) < k, (name, split)
        datasets[role] = ArrayDataset(images, labels, tf.train if role == "train" else tf.eval,
                                      classes=names)
        sizes.append(f"{role} {len(labels)} images ({split})")
    test_note = "; no test split (protocol tune)" if datasets["test"] is None else ""
    native = info.get("image_size")
    text = (f"Built-in data set {name!r}: {info.get('provenance', '').strip()} "
            f"{k} classes ({_preview(names)})"
            + (f", native size {native} px" if native else "") + ". "
            f"Protocol {protocol}: {', '.join(sizes)}{test_note}. Transforms — {tf.describe()}.")
    return DataSplits(train=datasets["train"], val=datasets["val"], test=datasets["test"],
                      num_classes=k, class_names=names, provenance=text, source=source,
                      val_in_train=protocol == "final", fingerprint=fingerprint)
