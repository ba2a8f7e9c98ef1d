"""The tensors a surgery adds to a model: what a run saves, loads, and how it knows its backbone.

- :func:`surgery_state` — the tensors that, together with the recipe and the backbone weights,
  rebuild the trained model: every trainable parameter, plus the buffers the surgery layers
  added (expert masks, frozen initial weights ``W0``, pruning masks). The frozen backbone is
  not included (it comes back from ``model.pretrained``).
- :func:`load_surgery_state` — copies them back, refusing a file that does not fit the model.
- :func:`backbone_fingerprint` — a short hash of everything else, stored with the tensors.
"""
from __future__ import annotations

import hashlib

import torch
import torch.nn as nn

from surgeon.errors import UserError
from surgeon.methods.base import SurgeryLayer


def _surgery_modules(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SurgeryLayer)]


def surgery_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Trainable parameters + surgery-layer buffers, keyed by ``model.state_dict()`` names.

    Buffers of a surgery layer's ``base_layer`` (the original timm module) are left out: they
    are part of the backbone.
    """
    state = model.state_dict(keep_vars=True)
    out = {k: v for k, v in state.items() if isinstance(v, nn.Parameter) and v.requires_grad}
    for prefix, layer in _surgery_modules(model):
        prefix = f"{prefix}." if prefix else ""
        for name, buf in layer.named_buffers():
            if name.startswith("base_layer.") or ".base_layer." in name:
                continue
            key = prefix + name
            if key in state:  # persistent buffers only
                out[key] = buf
    return {k: v.detach() for k, v in out.items()}


def load_surgery_state(model: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Copy saved surgery tensors into ``model``; every trainable parameter must be covered.

    Raises:
        UserError: the file does not match the model the recipe builds (names or shapes).
    """
    expected = surgery_state(model)
    unknown = sorted(set(tensors) - set(expected))
    missing = sorted(k for k in expected if k not in tensors)
    bad_shape = sorted(k for k in tensors if k in expected and tensors[k].shape != expected[k].shape)
    if unknown or missing or bad_shape:
        parts = []
        if missing:
            parts.append(f"missing {len(missing)} tensor(s) such as {missing[0]}")
        if unknown:
            parts.append(f"{len(unknown)} unknown tensor(s) such as {unknown[0]}")
        if bad_shape:
            k = bad_shape[0]
            parts.append(f"shape mismatch for {k}: saved {tuple(tensors[k].shape)}, model {tuple(expected[k].shape)}")
        raise UserError("saved tensors do not match the model rebuilt from the run's recipe: " + "; ".join(parts),
                        where=where, hint="the run directory was edited or written by another surgeon version")
    with torch.no_grad():
        for key, value in tensors.items():
            expected[key].copy_(value.to(expected[key].device, expected[key].dtype))


def backbone_fingerprint(model: nn.Module) -> str:
    """A short hash of the frozen weights (everything :func:`surgery_state` leaves out).

    ``adapter.safetensors`` stores it, so a run rebuilt later from ``model.pretrained`` can tell
    when those weights are not the ones it was trained on (a file replaced on disk, a random
    init that no longer reproduces). About 4096 evenly spaced values per tensor are hashed:
    cheap for ViT-L, and any re-download, re-init or fine-tune changes them.
    """
    trained = set(surgery_state(model))
    h = hashlib.sha256()
    for key, value in model.state_dict().items():
        if key in trained or not value.is_floating_point():
            continue
        flat = value.detach().reshape(-1)
        sample = flat[:: max(1, flat.numel() // 4096)].to("cpu", torch.float32).contiguous()
        h.update(key.encode())
        h.update(sample.numpy().tobytes())
    return h.hexdigest()[:16]
