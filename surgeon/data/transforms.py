"""Image transforms from the backbone's timm data config, overridable by the recipe.

The data config comes from :func:`timm.data.resolve_input_data_config` — not
``resolve_model_data_config``, which reads the *pretrained* config and so misses a changed
``img_size`` (``create_model(..., img_size=32)`` still reports 224 there). ``data.image_size``,
``data.mean`` and ``data.std`` override its fields.

Train (``data.augment``):

* ``rrc_flip`` — RandomResizedCrop (scale 0.08–1, ratio 3/4–4/3) + horizontal flip, via
  :func:`timm.data.create_transform` with colour jitter off (what the MoSA and MLAE papers'
  text says for FGVC);
* ``resize_crop_flip`` — resize the shorter side to ``size · 256/224`` (256 for 224), random
  crop ``H x W``, horizontal flip: what the published MoSA code runs for FGVC/GICD
  (``src/data/transforms.py``);
* ``flip`` — resize to ``H x W`` + horizontal flip;
* ``resize`` — plain resize to ``H x W`` (the VTAB-1k protocol, published code and papers).

Eval (val/test) matches the train geometry: after ``rrc_flip`` it is timm's eval transform
(resize the shorter side to ``size / crop_pct``, centre crop, as timm evaluates); after
``resize_crop_flip`` the published one (shorter side to ``size · 256/224``, centre crop); after
``flip`` or ``resize`` it is the same plain resize to ``H x W`` without flip, because a model
trained on whole squashed images should not be evaluated on centre crops (VTAB-1k evaluates
this way). ``data.interpolation`` overrides the backbone's resize interpolation (the published
code resizes bilinearly, timm's ViT configs say bicubic).

Every transform maps a PIL RGB image to a float32 tensor ``[3, H, W]`` normalised with
``(x / 255 - mean) / std``. They are built from torchvision/timm classes only (no lambdas), so
datasets holding them pickle into DataLoader workers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import timm.data
import torch
from timm.data.transforms import MaybeToTensor, str_to_interp_mode
from torchvision import transforms as T

from surgeon.recipe.sections import DataConfig

AUGMENTS = ("rrc_flip", "resize_crop_flip", "flip", "resize")
RESIZE_RATIO = 256 / 224  # the published FGVC pipeline: Resize(256) -> RandomCrop(224)


@dataclass(frozen=True)
class TransformSet:
    """The resolved transforms and the settings they were built from.

    Attributes:
        train: PIL RGB -> float32 ``[3, H, W]``, random per ``augment``.
        eval: PIL RGB -> float32 ``[3, H, W]``, deterministic.
        input_size: ``(3, H, W)`` in pixels.
        interpolation: timm interpolation name, e.g. ``"bicubic"``.
        mean, std: per-channel normalisation (RGB, for images scaled to 0..1).
        crop_pct: timm's eval crop fraction (used only after ``rrc_flip``).
        crop_mode: timm's eval crop mode (used only after ``rrc_flip``).
        augment: the ``data.augment`` value.
    """

    train: Callable
    eval: Callable
    input_size: tuple[int, int, int]
    interpolation: str
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    crop_pct: float
    crop_mode: str
    augment: str

    def describe(self) -> str:
        """One sentence for reports, e.g. ``train: RandomResizedCrop 224x224 + flip; eval: ...``."""
        h, w = self.input_size[1:]
        size = f"{h}x{w} px"
        if self.augment == "rrc_flip":
            train = f"RandomResizedCrop to {size} + horizontal flip"
            scale = math.floor(min(h, w) / self.crop_pct)
            evals = (f"resize shorter side to {scale} px + centre crop {size} "
                     f"(crop_pct {self.crop_pct:g})")
        elif self.augment == "resize_crop_flip":
            scale = _resize_side(h, w)
            train = f"resize shorter side to {scale} px + random crop {size} + horizontal flip"
            evals = f"resize shorter side to {scale} px + centre crop {size}"
        else:
            train = f"resize to {size}" + (" + horizontal flip" if self.augment == "flip" else "")
            evals = f"resize to {size}"
        return (f"train: {train}; eval: {evals}; {self.interpolation} interpolation; "
                f"normalised with mean {_fmt(self.mean)}, std {_fmt(self.std)}")


def _fmt(values) -> str:
    return "(" + ", ".join(f"{x:.4g}" for x in values) + ")"


def resolve_data_config(data_cfg: DataConfig, model: torch.nn.Module) -> dict:
    """The model's timm input config with the recipe's overrides applied.

    Args:
        data_cfg: the recipe's typed ``data`` section (``image_size``, ``mean``, ``std`` may be None).
        model: the timm model (its ``pretrained_cfg`` and actual input size are read).

    Returns:
        dict with ``input_size (3, H, W)``, ``interpolation``, ``mean``, ``std``, ``crop_pct``,
        ``crop_mode``.
    """
    cfg = dict(timm.data.resolve_input_data_config(model))
    if data_cfg.image_size:
        s = int(data_cfg.image_size)
        cfg["input_size"] = (3, s, s)
    if data_cfg.mean is not None:
        cfg["mean"] = tuple(float(x) for x in data_cfg.mean)
    if data_cfg.std is not None:
        cfg["std"] = tuple(float(x) for x in data_cfg.std)
    if data_cfg.interpolation:
        cfg["interpolation"] = data_cfg.interpolation
    cfg.setdefault("crop_pct", timm.data.DEFAULT_CROP_PCT)
    cfg["crop_pct"] = cfg["crop_pct"] or timm.data.DEFAULT_CROP_PCT
    cfg["crop_mode"] = cfg.get("crop_mode") or "center"
    cfg["interpolation"] = cfg.get("interpolation") or "bilinear"
    return cfg


def _resize_side(h: int, w: int) -> int:
    """Shorter-side resize before a crop of ``h x w`` in the published pipeline (256 for 224)."""
    return int(round(min(h, w) * RESIZE_RATIO))


def _resize_crop(size: tuple[int, int], interpolation: str, mean, std, train: bool) -> T.Compose:
    steps = [T.Resize(_resize_side(*size), interpolation=str_to_interp_mode(interpolation))]
    steps += [T.RandomCrop(size), T.RandomHorizontalFlip(p=0.5)] if train else [T.CenterCrop(size)]
    steps += [MaybeToTensor(), T.Normalize(mean=torch.tensor(mean), std=torch.tensor(std))]
    return T.Compose(steps)


def _plain_resize(size: tuple[int, int], interpolation: str, mean, std, flip: bool) -> T.Compose:
    steps = [T.Resize(size, interpolation=str_to_interp_mode(interpolation))]
    if flip:
        steps.append(T.RandomHorizontalFlip(p=0.5))
    steps += [MaybeToTensor(), T.Normalize(mean=torch.tensor(mean), std=torch.tensor(std))]
    return T.Compose(steps)


def build_transforms(data_cfg: DataConfig, model: torch.nn.Module) -> TransformSet:
    """Train and eval transforms for ``model`` as the recipe's ``data`` section asks.

    Args:
        data_cfg: the typed ``data`` section (``augment``, ``image_size``, ``mean``, ``std``).
        model: the timm backbone whose data config is the default.

    Returns:
        :class:`TransformSet`; both transforms map PIL RGB -> float32 ``[3, H, W]``.
    """
    cfg = resolve_data_config(data_cfg, model)
    augment = data_cfg.augment
    assert augment in AUGMENTS, augment  # the schema enforces the enum
    size = tuple(int(x) for x in cfg["input_size"][1:])
    mean, std, interp = tuple(cfg["mean"]), tuple(cfg["std"]), cfg["interpolation"]
    if augment == "rrc_flip":
        train = timm.data.create_transform(
            cfg["input_size"], is_training=True, hflip=0.5, color_jitter=None,
            interpolation=interp, mean=mean, std=std)
        evaluate = timm.data.create_transform(
            cfg["input_size"], is_training=False, interpolation=interp, mean=mean, std=std,
            crop_pct=cfg["crop_pct"], crop_mode=cfg["crop_mode"])
    elif augment == "resize_crop_flip":
        train = _resize_crop(size, interp, mean, std, train=True)
        evaluate = _resize_crop(size, interp, mean, std, train=False)
    else:
        train = _plain_resize(size, interp, mean, std, flip=augment == "flip")
        evaluate = _plain_resize(size, interp, mean, std, flip=False)
    return TransformSet(train=train, eval=evaluate, input_size=(3, *size), interpolation=interp,
                        mean=mean, std=std, crop_pct=float(cfg["crop_pct"]),
                        crop_mode=cfg["crop_mode"], augment=augment)
