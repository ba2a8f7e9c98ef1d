"""A backbone's anatomy: its blocks, attentions (with their q/k/v projections) and MLPs, found by
structure, for semantic targets (:mod:`surgeon.surgery.targets`).

- **attention**: a module that owns query/key/value projections as children — a fused ``qkv``
  (or ``qk``/``kv``), separate ``q``/``k``/``v`` (``q_proj``, ``query``, ``wq``, ...), or ``q``
  and a fused ``kv`` (PVTv2, Twins) — or whose class is an attention and owns any of them.
  A projection child may wrap its layer (LeViT's ``LinearNorm`` = Linear + BatchNorm, a
  ``ConvNorm``, a ``Sequential``): the layer is the one Linear / ungrouped Conv2d inside it.
  Where q, k, v sit in a fused layer's rows is :func:`surgeon.anatomy.conventions.fused_layout`;
- **MLP**: a feed-forward module of a block — its class is an ``Mlp``/``FFN``/``FeedForward``, or
  it is a block's child called ``mlp``/``ffn``/``channel_mixer``/... — not inside an attention,
  not the classifier head; ``fc1`` are its input layers (both halves of a gated MLP), ``fc2``
  its output layer;
- **block**: a repeated unit of a stage: the list item (``blocks.3``, ``layers.1.blocks.0``,
  ``layer2.1``) that holds an attention or MLP, or, in a CNN, the innermost list item with
  layers of its own; stems, downsampling layers and the head are not blocks;
- **norm in front**: the norm a block calls right before the module (``norm2`` before ``mlp``):
  the child registered just before it, when that child is a normalisation layer.

Every name is a ``model.named_modules()`` name of the pristine model.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch.nn as nn

from .conventions import Layout, family, family_key, fused_layout

ROLE_NAMES = {
    "qkv": ("qkv", "to_qkv", "qkv_proj", "qkvs"),
    "qk": ("qk", "to_qk", "qk_proj"),
    "kv": ("kv", "to_kv", "kv_proj"),
    "q": ("q", "q_proj", "query", "wq", "to_q", "to_query", "q_lin"),
    "k": ("k", "k_proj", "key", "wk", "to_k", "to_key", "k_lin"),
    "v": ("v", "v_proj", "value", "wv", "to_v", "to_value", "v_lin"),
    "proj": ("proj", "o_proj", "out_proj", "to_out", "output", "wo", "out_lin"),
}
ROLE_PARTS = {"qkv": ("q", "k", "v"), "qk": ("q", "k"), "kv": ("k", "v"), "q": ("q",), "k": ("k",), "v": ("v",),
              "proj": ("proj",)}
ATTENTION_CLASS = re.compile(r"att(ention|n)|^XCA$|MLA$|MHSA|SHSA", re.IGNORECASE)
MLP_CLASS = re.compile(r"mlp|ffn|feedforward|feed_forward", re.IGNORECASE)
NOT_MLP_CLASS = re.compile(r"head|classifier|pool|embed|block|stage|layer$", re.IGNORECASE)
MLP_NAME = re.compile(r"^(mlp|ffn|feed_forward|channel_mixer|mlp_channels|channel_mlp)\d*$")
NORM_CLASS = re.compile(r"norm", re.IGNORECASE)
NOT_BLOCK_SEGMENT = re.compile(r"^(stem|patch_embed|downsample|head|attn_pool|global_pool|fc_norm|pre_logits)")
HEAD_NAMES = ("head", "head_dist", "attn_pool", "global_pool", "fc_norm", "pre_logits", "fc", "classifier",
              "last_linear", "head_drop", "norm_pre")


def main_layer(module: nn.Module) -> nn.Module | None:
    """The Linear or ungrouped Conv2d a projection computes with: the module itself, or the one
    such layer inside a wrapper (Linear + norm, conv + norm, a Sequential); None if there is
    none or more than one."""
    if _adaptable(module):
        return module
    layers = [m for m in module.modules() if _adaptable(m)]
    return layers[0] if len(layers) == 1 else None


def _adaptable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) or (isinstance(module, nn.Conv2d) and module.groups == 1)


def _conv_or_linear_count(module: nn.Module) -> int:
    return sum(isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d)) for m in module.modules())


def _layers(module: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in module.named_modules() if _adaptable(m)]


def is_norm(module: nn.Module) -> bool:
    """A normalisation layer: its class says so and it computes no Linear/Conv2d of its own."""
    return bool(NORM_CLASS.search(type(module).__name__)) and \
        not any(isinstance(m, (nn.Linear, nn.Conv2d)) for m in module.modules())


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix and name else prefix or name


@dataclass
class Projection:
    """One q/k/v/output projection layer of an attention.

    Attributes:
        role: ``qkv``, ``qk``, ``kv``, ``q``, ``k``, ``v`` or ``proj``.
        name: the dotted name of the layer to patch (a Linear or an ungrouped Conv2d).
        module: that layer.
        layout: for a fused role, ``{part: row spans}`` of the layer's output rows; None when
            the layout is unknown (the layer can be adapted whole, not sliced).
    """

    role: str
    name: str
    module: nn.Module
    layout: Layout | None = None

    @property
    def parts(self) -> tuple[str, ...]:
        if self.layout is not None:
            return tuple(self.layout)
        return ROLE_PARTS[self.role]


@dataclass
class Site:
    """An attention or MLP: where it is, its block, its layers and the norm in front of it."""

    kind: str                      # "attention" or "mlp"
    name: str
    module: nn.Module
    block: int | None = None       # index into Anatomy.blocks
    norm: str | None = None        # the norm called right before it, if any
    projections: list[Projection] = field(default_factory=list)   # attention only
    fc1: list[tuple[str, nn.Module]] = field(default_factory=list)  # mlp only
    fc2: list[tuple[str, nn.Module]] = field(default_factory=list)  # mlp only


@dataclass
class Anatomy:
    """The parts of one model that semantic targets name (see the module docstring).

    Attributes:
        family: the timm family key (``vision_transformer``).
        blocks: ``[(name, module)]`` in depth order.
        attentions, mlps: the :class:`Site` s in model order.
        conv_blocks: indices of blocks with neither attention nor MLP that keep their input's
            shape: a CNN's residual units, whose feed-forward sub-layer is the block itself.
    """

    family: str
    blocks: list[tuple[str, nn.Module]]
    attentions: list[Site]
    mlps: list[Site]
    conv_blocks: list[int]

    @property
    def family_name(self) -> str:
        from .conventions import FAMILIES  # the display name only

        spec = FAMILIES.get(self.family)
        return spec.name if spec else self.family


def _head_ids(model: nn.Module) -> set[int]:
    """ids of the classifier head's modules (and other pooling/head modules at the top level)."""
    ids: set[int] = set()
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    heads = list(head) if isinstance(head, (tuple, list)) else [head]
    heads += [child for name, child in model.named_children() if name in HEAD_NAMES]
    for head in heads:
        if isinstance(head, nn.Module):
            ids.update(id(m) for m in head.modules())
    return ids


def _children(module: nn.Module) -> dict[str, nn.Module]:
    return dict(module.named_children())


def _projections(name: str, module: nn.Module) -> list[Projection]:
    children = _children(module)
    found: list[Projection] = []
    for role, names in ROLE_NAMES.items():
        for child_name in names:
            child = children.get(child_name)
            if child is None:
                continue
            items = list(child.named_children()) if isinstance(child, nn.ModuleList) else [("", child)]
            for item_name, item in items:
                layer = main_layer(item)
                if layer is None:
                    continue
                layer_name = _join(_join(_join(name, child_name), item_name),
                                   next(n for n, m in item.named_modules() if m is layer))
                out = layer.out_features if isinstance(layer, nn.Linear) else layer.out_channels
                layout = fused_layout(module, role, out) if role in ("qkv", "qk", "kv") else None
                found.append(Projection(role, layer_name, layer, layout))
            break  # one child name per role
    return found


def _is_attention(module: nn.Module, projections: list[Projection]) -> bool:
    roles = {p.role for p in projections}
    if roles & {"qkv", "qk"} or ("q" in roles and roles & {"k", "kv"}):
        return True
    return bool(ATTENTION_CLASS.search(type(module).__name__)) and bool(roles - {"proj"})


def _inside(name: str, outer: str) -> bool:
    """``name`` is ``outer`` or one of its descendants."""
    return outer == "" or name == outer or name.startswith(outer + ".")


def norm_before(model: nn.Module, name: str) -> str | None:
    """The name of the norm registered just before module ``name`` in its parent (``blocks.3.norm2``
    before ``blocks.3.mlp``): the norm the block calls in front of it. None when the child before it
    is not a normalisation layer (post-norm blocks, blocks without norms) or it is the first."""
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    names = [n for n, _ in parent.named_children()]
    i = names.index(attr)
    if i == 0:
        return None
    before = getattr(parent, names[i - 1])
    return _join(parent_name, names[i - 1]) if is_norm(before) else None


def _keeps_shape(module: nn.Module) -> bool:
    """Whether a block maps its input to an output of the same shape, read off its layers: the
    first layer's inputs equal the last one's outputs and nothing strides or pools."""
    layers = [m for _, m in _layers(module)]
    if not layers:
        return False
    first, last = layers[0], layers[-1]
    width_in = first.in_features if isinstance(first, nn.Linear) else first.in_channels
    width_out = last.out_features if isinstance(last, nn.Linear) else last.out_channels
    if width_in != width_out:
        return False
    for m in module.modules():
        stride = getattr(m, "stride", 1)
        if isinstance(m, (nn.Conv1d, nn.Conv2d, nn.MaxPool2d, nn.AvgPool2d)):
            strides = stride if isinstance(stride, tuple) else (stride,)
            if any(s not in (1, None) for s in strides):
                return False
        if isinstance(m, (nn.ConvTranspose2d, nn.PixelShuffle, nn.PixelUnshuffle, nn.Upsample)):
            return False
    return True


def anatomy(model: nn.Module) -> Anatomy:
    """The :class:`Anatomy` of ``model`` (call it on the pristine, unpatched model)."""
    spec = family(model)
    head = _head_ids(model)
    named = [(n, m) for n, m in model.named_modules() if n and id(m) not in head]

    attentions: list[Site] = []
    for name, module in named:
        projections = _projections(name, module)
        if projections and _is_attention(module, projections):
            attentions.append(Site("attention", name, module, projections=projections))

    mlps = _find_mlps(named, attentions, spec.not_mlp)

    # Blocks: the list items holding a site, and list items with two layers or more (CNN blocks);
    # innermost (one that holds another is a stage), never inside an attention or MLP.
    sites = attentions + mlps
    candidates: dict[str, nn.Module] = {}
    extra = [re.compile(p) for p in spec.blocks]
    for name, module in named:
        segments = name.split(".")
        if any(NOT_BLOCK_SEGMENT.match(seg) for seg in segments):
            continue
        if not (segments[-1].isdigit() or any(p.fullmatch(name) for p in extra)):
            continue
        if any(name != s.name and _inside(name, s.name) for s in sites):
            continue
        if any(_inside(s.name, name) for s in sites) or _conv_or_linear_count(module) >= 2:
            candidates[name] = module
    blocks = [(n, m) for n, m in candidates.items() if not any(o != n and _inside(o, n) for o in candidates)]
    block_index = {n: i for i, (n, _) in enumerate(blocks)}
    for site in sites:
        owner = next((b for b in block_index if _inside(site.name, b)), None)
        site.block = None if owner is None else block_index[owner]
        site.norm = norm_before(model, site.name)

    occupied = {s.block for s in sites if s.block is not None}
    conv_blocks = [i for i, (_, m) in enumerate(blocks) if i not in occupied and _keeps_shape(m)]
    return Anatomy(family_key(model), blocks, attentions, mlps, conv_blocks)


def _find_mlps(named, attentions: list[Site], not_mlp: tuple[str, ...]) -> list[Site]:
    """MLP sites: by class first (``Mlp``, ``ConvMlp``, ``FFN`` ...), by child name where no class
    says so; outermost, outside attentions and the head."""
    inside_attention = lambda n: any(_inside(n, a.name) for a in attentions)  # noqa: E731
    holds_attention = lambda n: any(_inside(a.name, n) for a in attentions)  # noqa: E731

    def usable(name, module) -> bool:
        last = name.rsplit(".", 1)[-1]
        return (last not in not_mlp and not inside_attention(name) and not holds_attention(name)
                and len(_layers(module)) >= 1)

    by_class = [(n, m) for n, m in named
                if MLP_CLASS.search(type(m).__name__) and not NOT_MLP_CLASS.search(type(m).__name__) and usable(n, m)]
    by_name = [(n, m) for n, m in named if MLP_NAME.match(n.rsplit(".", 1)[-1]) and usable(n, m)
               and not any(_inside(c, n) for c, _ in by_class)]
    found = by_class + [x for x in by_name if not any(_inside(x[0], c) for c, _ in by_class)]
    names = [n for n, _ in found]
    outermost = [(n, m) for n, m in found if not any(o != n and _inside(n, o) for o in names)]
    order = {n: i for i, (n, _) in enumerate(named)}
    outermost.sort(key=lambda nm: order[nm[0]])
    sites = []
    for name, module in outermost:
        layers = [(_join(name, n), m) for n, m in _layers(module)]
        fc2 = [layers[-1]]
        width = layers[0][1].in_features if isinstance(layers[0][1], nn.Linear) else layers[0][1].in_channels
        fc1 = [(n, m) for n, m in layers[:-1]
               if (m.in_features if isinstance(m, nn.Linear) else m.in_channels) == width] or layers[:1]
        sites.append(Site("mlp", name, module, fc1=fc1, fc2=fc2))
    return sites
