"""Resolving a rule's target against a model: selectors by name, semantic targets by anatomy.

:func:`resolve_target` turns a :class:`~surgeon.methods.targets.SemanticTarget` into the
modules it means in this model (:mod:`surgeon.anatomy.structure`), each with the output rows
to adapt when it is a part of a fused projection (``{attention: [q, v]}`` on ViT's fused
``qkv`` = its first and last thirds; on PVTv2 = the whole ``q`` and the second half of
``kv``). When the model has nothing of what the target names, the error says why, in one
line ("no attention in ConvNeXt: its blocks mix tokens with a 7x7 depthwise convolution").
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import torch.nn as nn

from surgeon.methods.targets import SemanticTarget

from surgeon.anatomy import Anatomy, Site, anatomy
from surgeon.anatomy.conventions import Layout, family


@dataclass
class Match:
    """One module a rule patches.

    Attributes:
        name: its dotted name in the model.
        module: the module.
        rows: ``{part: row spans}`` when only parts of its output rows are adapted (a slice of a
            fused projection, one low-rank pair per part); None for the whole module.
    """

    name: str
    module: nn.Module
    rows: Layout | None = None

    @property
    def label(self) -> str:
        return self.name + (f" [{', '.join(self.rows)}]" if self.rows else "")


class TargetError(ValueError):
    """The model has nothing the semantic target names; the message says why (one line)."""


def _model_name(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return cfg.get("architecture") or type(model).__name__


def _no_attention(model: nn.Module, anat: Anatomy) -> str:
    spec = family(model)
    why = f": {spec.mixer}" if spec.mixer else ": no module computes queries, keys and values"
    return f"no attention in {spec.name} ({_model_name(model)}){why}"


def _no_mlp(model: nn.Module, anat: Anatomy) -> str:
    spec = family(model)
    if anat.blocks:
        why = "its blocks have no MLP, and none that keeps its input's shape to stand for one"
    else:
        why = "no MLP, and no repeated blocks"
    lead = f"{spec.mixer}; " if spec.mixer and "convolutional" in spec.mixer else ""
    return f"no MLP in {spec.name} ({_model_name(model)}): {lead}{why}"


def _block_indices(target: SemanticTarget, anat: Anatomy) -> set[int] | None:
    chosen = target.block_slice
    if chosen is None:
        return None
    count = len(anat.blocks)
    if not count:
        raise TargetError(f"blocks '{target.blocks}': {anat.family_name} has no repeated blocks to count")
    if isinstance(chosen, int):
        if not -count <= chosen < count:
            raise TargetError(f"blocks {chosen}: the model has {count} blocks (0..{count - 1})")
        return {chosen % count}
    indices = set(range(count)[chosen])
    if not indices:
        raise TargetError(f"blocks '{target.blocks}' selects none of the model's {count} blocks")
    return indices


def _attention_matches(site: Site, want) -> list[Match]:
    if want == "block":
        return [Match(site.name, site.module)]
    if want == "norm":
        return [Match(site.norm, None)] if site.norm else []
    out = []
    for p in site.projections:
        if want == "qkv":
            if p.role != "proj":
                out.append(Match(p.name, p.module))
            continue
        wanted = [part for part in p.parts if part in want]
        if not wanted:
            continue
        if p.layout is None or p.role in ("q", "k", "v", "proj"):
            if p.layout is None and p.role in ("qkv", "qk", "kv") and len(wanted) < len(p.parts):
                continue  # a fused layer whose layout is unknown cannot be sliced
            out.append(Match(p.name, p.module))
        else:
            out.append(Match(p.name, p.module, {part: p.layout[part] for part in wanted}))
    return out


def _mlp_matches(site: Site, want) -> list[Match]:
    if want == "block":
        return [Match(site.name, site.module)]
    if want == "norm":
        return [Match(site.norm, None)] if site.norm else []
    out = []
    if "fc1" in want:
        out += [Match(n, m) for n, m in site.fc1]
    if "fc2" in want:
        out += [Match(n, m) for n, m in site.fc2]
    return out


def resolve_target(model: nn.Module, target: SemanticTarget, anat: Anatomy | None = None,
                   unmatched: list[str] | None = None) -> list[Match]:
    """The modules ``target`` names in ``model`` (pristine), in model order, each once.

    A target that names several parts (``{attention: block, mlp: block}``) resolves when one part
    matches; the reason each other part matched nothing is appended to ``unmatched`` (if given),
    so the caller can say that only part of the target was patched.

    Raises:
        TargetError: nothing matches (no attention in a CNN, no such blocks, ...), with the reason.
    """
    anat = anat or anatomy(model)
    indices = _block_indices(target, anat)

    def chosen(site: Site) -> bool:
        return indices is None or site.block in indices

    found: list[Match] = []
    missing: list[str] = []
    if target.attention is not None:
        sites = [s for s in anat.attentions if chosen(s)]
        matches = [m for s in sites for m in _attention_matches(s, target.attention)]
        if not anat.attentions:
            missing.append(_no_attention(model, anat))
        elif not matches:
            missing.append(_nothing_in(target, "attention", anat))
        found += matches
    if target.mlp is not None:
        sites = [s for s in anat.mlps if chosen(s)]
        matches = [m for s in sites for m in _mlp_matches(s, target.mlp)]
        if target.mlp == "block":  # a CNN's residual units stand for their block's MLP
            matches += [Match(*anat.blocks[i]) for i in anat.conv_blocks if indices is None or i in indices]
        if not anat.mlps and not matches:
            missing.append(_no_mlp(model, anat))
        elif not matches:
            missing.append(_nothing_in(target, "mlp", anat))
        found += matches
    if target.attention is None and target.mlp is None:
        found = [Match(*anat.blocks[i]) for i in sorted(indices if indices is not None else range(len(anat.blocks)))]
        if not found:
            missing.append(f"{anat.family_name} ({_model_name(model)}) has no repeated blocks")
    if not found:
        raise TargetError("; ".join(missing))
    if unmatched is not None:
        unmatched.extend(missing)

    named = dict(model.named_modules())
    order = {n: i for i, n in enumerate(named)}
    unique: dict[str, Match] = {}
    for m in found:
        m.module = named[m.name] if m.module is None else m.module
        if m.name in unique and unique[m.name].rows and m.rows:  # two sites share a fused layer
            unique[m.name].rows.update(m.rows)
        unique.setdefault(m.name, m)
    return sorted(unique.values(), key=lambda m: order[m.name])


def _nothing_in(target: SemanticTarget, key: str, anat: Anatomy) -> str:
    want = getattr(target, key)
    label = "MLP" if key == "mlp" else key
    if want == "norm":
        what = f"norm in front of its {label}"
    elif want == "block":
        what = label
    else:
        what = f"{label} projection {', '.join(want)}" if key == "attention" else f"MLP layer {', '.join(want)}"
    where = f" in blocks {target.blocks}" if target.blocks is not None else ""
    return f"{anat.family_name} has no {what}{where}"


_INDEX = re.compile(r"(?<=\.)\d+(?=\.|$)|^\d+(?=\.|$)")


def describe_matches(matches: list[Match]) -> str:
    """What a target resolved to, folded over block indices: ``12 × blocks.*.attn.qkv [q, v]``."""
    counts = Counter(_INDEX.sub("*", m.label) for m in matches)
    return "; ".join(f"{n} × {shape}" if n > 1 else shape for shape, n in counts.items())
