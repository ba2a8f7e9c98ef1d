"""Offline built-ins: a formula-pretrained backbone and small VTAB-1k-style datasets.

- :mod:`surgeon.builtin.datasets`: ``BUILTIN_DATASETS``, ``builtin_info``, ``builtin_split``
  (``--data builtin:NAME``).
- :mod:`surgeon.builtin.fractal`: the fractal (iterated function system) image generator.
- :mod:`surgeon.builtin.pretrain`: ``pretrain_builtin``, which made the shipped weights.
- This module: the registry of shipped backbones (``model.pretrained: builtin:NAME``) and
  the user cache directory.

Importing this package is cheap (no numpy / torch): the CLI and the recipe checks can look
names up without paying for the generators.
"""
from __future__ import annotations

import os
from pathlib import Path

from surgeon.errors import UserError

_WEIGHTS = Path(__file__).resolve().parent / "weights"

#: Shipped backbones: name -> how to build the timm model and where its weights are.
#: ``file`` holds the backbone only (no ``head.*``) in float16; ``card`` is its json card
#: (how it was made, upstream held-out accuracy, transfer checks). ``pretrained_cfg_overlay``
#: is what to pass to ``timm.create_model`` so the head is re-initialised for any
#: ``num_classes`` (``num_classes=0`` there tells timm the file has no classifier; with only
#: ``file=``, ``num_classes=1000`` would fail on the missing head). ``license``: the weights'
#: licence (surgeon made them), recorded in a merged run's ``config.json``.
BUILTIN_BACKBONES: dict[str, dict] = {
    "fractal_vit_tiny": dict(
        model_name="vit_tiny_patch16_224",
        kwargs=dict(img_size=32, patch_size=8, depth=6),
        file=_WEIGHTS / "fractal_vit_tiny.safetensors",
        card=_WEIGHTS / "fractal_vit_tiny.json",
        license="apache-2.0",
        pretrained_cfg_overlay=dict(file=str(_WEIGHTS / "fractal_vit_tiny.safetensors"), num_classes=0),
    ),
}


def builtin_weights(name: str) -> Path:
    """Path of a shipped backbone's ``.safetensors`` weights.

    Use it with the entry's model name and kwargs::

        spec = BUILTIN_BACKBONES[name]
        timm.create_model(spec["model_name"], pretrained=True, num_classes=K,
                          pretrained_cfg_overlay=dict(file=str(builtin_weights(name)), num_classes=0),
                          **spec["kwargs"])

    Raises:
        UserError: unknown name (lists the known ones), or the file is missing from the
            installation.
    """
    if name not in BUILTIN_BACKBONES:
        raise UserError(
            f"unknown built-in backbone {name!r}",
            hint=f"use one of: {', '.join(BUILTIN_BACKBONES)} (model.pretrained: builtin:NAME)",
        )
    path = Path(BUILTIN_BACKBONES[name]["file"])
    if not path.is_file():
        raise UserError(
            f"the weights of built-in backbone {name!r} are missing from this installation",
            where=str(path),
            hint="reinstall surgeon, or recreate them with `surgeon pretrain-builtin`",
        )
    return path


def cache_dir() -> Path:
    """surgeon's cache directory (not created here).

    ``$SURGEON_CACHE`` if set, else ``$XDG_CACHE_HOME/surgeon``, else ``~/.cache/surgeon``.
    """
    if os.environ.get("SURGEON_CACHE"):
        return Path(os.environ["SURGEON_CACHE"]).expanduser()
    if os.environ.get("XDG_CACHE_HOME"):
        return Path(os.environ["XDG_CACHE_HOME"]).expanduser() / "surgeon"
    return Path.home() / ".cache" / "surgeon"
