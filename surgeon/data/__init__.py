"""Data for surgeon runs: sources, transforms, loaders.

Public API (what the trainer uses)::

    splits = build_splits(recipe.data, model, seed=recipe.data.seed)   # -> DataSplits
    loader = build_loader(splits.train, batch_size=64, shuffle=True, seed=seed,
                          num_workers=recipe.data.num_workers, drop_last=True, epoch=epoch)
    for images, labels in loader:   # float32 [B, 3, H, W] normalised, int64 [B]
        ...
    splits.train.skipped            # images skipped under `data.bad_images: skip`

Sources (``data.source``): ``imagefolder:PATH``, ``vtab1k:ROOT/TASK``, ``filelist:FILE``,
``fgvc:ROOT``, ``builtin:NAME``; see :mod:`surgeon.data.sources` for layouts and the protocol.
Transforms: :mod:`surgeon.data.transforms`. Determinism and resume: :mod:`surgeon.data.loaders`.
"""
from .datasets import ArrayDataset, ImageFileDataset, read_image, to_rgb
from .loaders import build_loader
from .sources import KNOWN_SCHEMES, DataSplits, build_splits, parse_source, stratified_split
from .transforms import TransformSet, build_transforms, resolve_data_config

__all__ = [
    "DataSplits", "build_splits", "build_loader", "build_transforms", "resolve_data_config",
    "TransformSet", "ImageFileDataset", "ArrayDataset", "KNOWN_SCHEMES", "parse_source",
    "stratified_split", "read_image", "to_rgb",
]
