"""The table of timm family conventions that semantic targets resolve through.

Most of a backbone's anatomy is found by structure (:mod:`surgeon.anatomy.structure`): an
attention is a module that owns query/key/value projections, an MLP a feed-forward module of a
block, a block a repeated unit of a stage. What structure cannot tell is written here, per timm
family (the ``timm.models`` module that defines the architecture) or per attention class:

- :data:`FUSED_LAYOUTS` — where q, k and v sit in the output rows of a fused projection when it
  is not timm's usual ``[q | k | v]`` thirds (``[k | v]`` halves for ``kv``, ``[q | k]`` for
  ``qk``): LeViT, EfficientFormer and TinyViT interleave them per head with a key size that
  differs from the value size, MaxViT's ``head_first`` layout interleaves per head, ...;
- :data:`FAMILIES` — the family's name in messages, what mixes its tokens when it has no
  attention (so a refusal says why: "no attention in ConvNeXt: its blocks mix tokens with a
  7x7 depthwise convolution"), and the few names structure gets wrong (RegNet's blocks are
  ``s1.b1``, MLP-Mixer's token MLP is not the block's MLP).

``tests/test_targets.py`` checks every layout against the module's own forward pass.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch.nn as nn

Spans = tuple[tuple[int, int], ...]
Layout = dict[str, Spans]


def contiguous(sizes: dict[str, int]) -> Layout:
    """``{part: rows}`` for parts stored one after the other (``[q | k | v]`` with sizes)."""
    out, start = {}, 0
    for part, size in sizes.items():
        out[part] = ((start, start + size),)
        start += size
    return out


def per_head(heads: int, sizes: dict[str, int]) -> Layout:
    """``{part: rows}`` for parts interleaved per head: head h holds ``[q_h | k_h | v_h]``."""
    width = sum(sizes.values())
    out: dict[str, list[tuple[int, int]]] = {part: [] for part in sizes}
    for h in range(heads):
        start = h * width
        for part, size in sizes.items():
            out[part].append((start, start + size))
            start += size
    return {part: tuple(spans) for part, spans in out.items()}


def _levit(attn, role, out):
    if role == "qkv":  # q, k, v = qkv(x).view(B, N, heads, -1).split([key_dim, key_dim, val_dim])
        return per_head(attn.num_heads, {"q": attn.key_dim, "k": attn.key_dim, "v": attn.val_dim})
    if role == "kv":  # AttentionDownsample: k, v = kv(x).view(B, N, heads, -1).split([key_dim, val_dim])
        return per_head(attn.num_heads, {"k": attn.key_dim, "v": attn.val_dim})
    return None


def _head_split(attn, role, out):
    # EfficientFormer / TinyViT: qkv(x).reshape(B, N, heads, -1).split([key_dim, key_dim, val_dim])
    if role == "qkv":
        return per_head(attn.num_heads, {"q": attn.key_dim, "k": attn.key_dim, "v": attn.val_dim})
    return None


def _maxxvit(attn, role, out):
    if role != "qkv":
        return None
    if getattr(attn, "head_first", False):  # view(B, heads, dim_head * 3, -1).chunk(3)
        return per_head(attn.num_heads, {"q": attn.dim_head, "k": attn.dim_head, "v": attn.dim_head})
    return None  # reshape(B, 3, heads, dim_head, -1): timm's thirds


def _cascaded(attn, role, out):
    # EfficientViT (MSRA): each of qkvs[h] splits its output [key_dim | key_dim | val_dim]
    if role == "qkv":
        return contiguous({"q": attn.key_dim, "k": attn.key_dim, "v": attn.val_dim})
    return None


def _shvit(attn, role, out):
    if role == "qkv":  # torch.split(qkv, [qk_dim, qk_dim, pdim])
        return contiguous({"q": attn.qk_dim, "k": attn.qk_dim, "v": attn.pdim})
    return None


def _lite_mla(attn, role, out):
    # EfficientViT (MIT): channels reshape(B, -1, 3 * dim, H*W): per head [q | k | v] of dim each; the
    # multi-scale aggregation convolves within groups of `dim` channels, so the layout holds.
    if role == "qkv":
        return per_head(out // (3 * attn.dim), {"q": attn.dim, "k": attn.dim, "v": attn.dim})
    return None


def _linear_self_attention(attn, role, out):
    # MobileViT-v2: qkv_proj splits [1 | embed_dim | embed_dim]: a one-channel context score, keys, values
    if role == "qkv":
        return contiguous({"q": 1, "k": attn.embed_dim, "v": attn.embed_dim})
    return None


def _gcvit(attn, role, out):
    if role == "qkv" and getattr(attn, "use_global", False):  # the global query comes from outside: qkv is [k | v]
        return contiguous({"k": out // 2, "v": out // 2})
    return None


def _halo(attn, role, out):
    if role == "kv":  # kv reshaped (B * heads, dim_head_qk + dim_head_v, ...) then split
        return per_head(attn.num_heads, {"k": attn.dim_head_qk, "v": attn.dim_head_v})
    return None


def _bottleneck_attn(attn, role, out):
    if role == "qkv":  # torch.split(x, [dim_out_qk, dim_out_qk, dim_out_v])
        return contiguous({"q": attn.dim_out_qk, "k": attn.dim_out_qk, "v": attn.dim_out_v})
    return None


def _lambda(attn, role, out):
    if role == "qkv":  # torch.split(qkv, [heads * dim_qk, dim_qk, dim_v])
        return contiguous({"q": attn.num_heads * attn.dim_qk, "k": attn.dim_qk, "v": attn.dim_v})
    return None


#: ``"module.Class"`` of an attention -> ``f(attention, role, out_rows) -> {part: row spans} | None``
#: for its fused projections (role ``qkv``, ``kv`` or ``qk``); None falls back to timm's thirds/halves.
FUSED_LAYOUTS: dict[str, Callable[[nn.Module, str, int], Layout | None]] = {
    "timm.models.levit.Attention": _levit,
    "timm.models.levit.AttentionDownsample": _levit,
    "timm.models.efficientformer.Attention": _head_split,
    "timm.models.tiny_vit.Attention": _head_split,
    "timm.models.maxxvit.Attention2d": _maxxvit,
    "timm.models.maxxvit.AttentionCl": _maxxvit,
    "timm.layers.attention2d.Attention2d": _maxxvit,
    "timm.models.efficientvit_msra.CascadedGroupAttention": _cascaded,
    "timm.models.shvit.SHSA": _shvit,
    "timm.models.efficientvit_mit.LiteMLA": _lite_mla,
    "timm.models.mobilevit.LinearSelfAttention": _linear_self_attention,
    "timm.models.gcvit.WindowAttentionGlobal": _gcvit,
    "timm.layers.halo_attn.HaloAttn": _halo,
    "timm.layers.bottleneck_attn.BottleneckAttn": _bottleneck_attn,
    "timm.layers.lambda_layer.LambdaLayer": _lambda,
}


def class_key(module: nn.Module) -> str:
    cls = type(module)
    return f"{cls.__module__}.{cls.__qualname__}"


def fused_layout(attention: nn.Module, role: str, out: int) -> Layout | None:
    """Where q, k, v sit in the ``out`` output rows of ``attention``'s fused projection ``role``
    (``qkv``, ``kv``, ``qk``); None when the layout is unknown (the projection is not sliced).

    Known classes come from :data:`FUSED_LAYOUTS`; any other uses timm's convention: ``qkv(x)
    .reshape(B, N, 3, heads, head_dim)``, i.e. ``[q | k | v]`` thirds (halves for kv and qk).
    """
    known = FUSED_LAYOUTS.get(class_key(attention))
    if known is not None:
        layout = known(attention, role, out)
        if layout is not None:
            return layout
    parts = {"qkv": ("q", "k", "v"), "kv": ("k", "v"), "qk": ("q", "k")}[role]
    if out % len(parts):
        return None
    return contiguous({p: out // len(parts) for p in parts})


@dataclass(frozen=True)
class Family:
    """What structure cannot tell about one timm family (the ``timm.models`` module name).

    Attributes:
        name: how messages and docs call it.
        mixer: what mixes tokens in its blocks when it has no attention (completes "no attention in X: ...").
        blocks: extra block-name patterns (regexes over dotted names), for blocks that are not list items.
        not_mlp: child names that look like an MLP but mix tokens (MLP-Mixer's ``mlp_tokens``).
    """

    name: str
    mixer: str = ""
    blocks: tuple[str, ...] = ()
    not_mlp: tuple[str, ...] = ()
    notes: dict = field(default_factory=dict)


_CNN = "it is a convolutional network"
FAMILIES: dict[str, Family] = {
    "beit": Family("BEiT"),
    "byoanet": Family("ByoaNet"),
    "byobnet": Family("ByobNet", _CNN),
    "cait": Family("CaiT"),
    "coat": Family("CoaT"),
    "convit": Family("ConViT"),
    "convmixer": Family("ConvMixer", "its blocks mix tokens with a depthwise convolution"),
    "convnext": Family("ConvNeXt", "its blocks mix tokens with a 7x7 depthwise convolution"),
    "cpubone": Family("CPUBone", "its blocks mix tokens with convolutions"),
    "crossvit": Family("CrossViT"),
    "csatv2": Family("CSATv2"),
    "cspnet": Family("CSPNet", _CNN),
    "cspnext": Family("CSPNeXt", _CNN),
    "davit": Family("DaViT"),
    "deepseek_vit": Family("DeepSeek ViT"),
    "deit": Family("DeiT"),
    "densenet": Family("DenseNet", _CNN),
    "dla": Family("DLA", _CNN),
    "dpn": Family("DPN", _CNN),
    "edgenext": Family("EdgeNeXt"),
    "efficientformer": Family("EfficientFormer"),
    "efficientformer_v2": Family("EfficientFormer-V2"),
    "efficientnet": Family("EfficientNet", _CNN),
    "efficientvim": Family("EfficientViM", "its blocks mix tokens with a state-space model (HSM-SSD)"),
    "efficientvit_mit": Family("EfficientViT (MIT)"),
    "efficientvit_msra": Family("EfficientViT (MSRA)"),
    "eva": Family("EVA"),
    "fasternet": Family("FasterNet", "its blocks mix tokens with a partial convolution"),
    "fastvit": Family("FastViT"),
    "focalnet": Family("FocalNet", "its blocks mix tokens with focal modulation (convolutions)"),
    "gcvit": Family("GCViT"),
    "gemma4_vit": Family("Gemma 4 ViT"),
    "ghostnet": Family("GhostNet", _CNN),
    "hardcorenas": Family("HardCoRe-NAS", _CNN),
    "hgnet": Family("HGNet", _CNN),
    "hiera": Family("Hiera"),
    "hieradet_sam2": Family("Hiera (SAM2)"),
    "hrnet": Family("HRNet", _CNN),
    "iformer": Family("iFormer"),
    "inception_next": Family("InceptionNeXt", "its blocks mix tokens with inception-style depthwise convolutions"),
    "inception_resnet_v2": Family("Inception-ResNet-v2", _CNN),
    "inception_v3": Family("Inception-v3", _CNN),
    "inception_v4": Family("Inception-v4", _CNN),
    "lcnetv2": Family("LCNetV2", _CNN),
    "levit": Family("LeViT"),
    "lowformer": Family("LowFormer"),
    "mambaout": Family("MambaOut", "its blocks are gated convolutions"),
    "maxxvit": Family("MaxViT / CoAtNet"),
    "metaformer": Family("MetaFormer", "its blocks mix tokens with pooling (PoolFormer) or convolutions"),
    "mlp_mixer": Family("MLP-Mixer", "its blocks mix tokens with an MLP over the token axis",
                        not_mlp=("mlp_tokens",)),
    "mobilenetv3": Family("MobileNetV3", _CNN),
    "mobilenetv5": Family("MobileNetV5"),
    "mobilevit": Family("MobileViT"),
    "mvitv2": Family("MViTv2"),
    "naflexvit": Family("NaFlexViT"),
    "nasnet": Family("NASNet", _CNN),
    "nest": Family("NesT"),
    "nextvit": Family("Next-ViT"),
    "nfnet": Family("NFNet", _CNN),
    "pit": Family("PiT"),
    "pnasnet": Family("PNASNet", _CNN),
    "pvt_v2": Family("PVTv2"),
    "qwen3_vit": Family("Qwen3 ViT"),
    "rdnet": Family("RDNet", _CNN),
    "regnet": Family("RegNet", _CNN, blocks=(r"s\d+\.b\d+",)),
    "repghost": Family("RepGhost", _CNN),
    "repvit": Family("RepViT", "its blocks mix tokens with a depthwise convolution"),
    "res2net": Family("Res2Net", _CNN),
    "resnest": Family("ResNeSt", _CNN),
    "resnet": Family("ResNet", _CNN),
    "resnetv2": Family("ResNetV2", _CNN),
    "rexnet": Family("ReXNet", _CNN),
    "selecsls": Family("SelecSLS", _CNN),
    "senet": Family("SENet", _CNN),
    "sequencer": Family("Sequencer", "its blocks mix tokens with bidirectional LSTMs"),
    "shvit": Family("SHViT"),
    "sknet": Family("SKNet", _CNN),
    "starnet": Family("StarNet", _CNN),
    "swiftformer": Family("SwiftFormer"),
    "swin_transformer": Family("Swin"),
    "swin_transformer_v2": Family("SwinV2"),
    "swin_transformer_v2_cr": Family("SwinV2-CR"),
    "tiny_vit": Family("TinyViT"),
    "tnt": Family("TNT"),
    "tresnet": Family("TResNet", _CNN),
    "twins": Family("Twins"),
    "vgg": Family("VGG", _CNN),
    "visformer": Family("Visformer"),
    "vision_transformer": Family("ViT"),
    "vision_transformer_hybrid": Family("ViT hybrid"),
    "vision_transformer_relpos": Family("ViT (relative position)"),
    "vision_transformer_sam": Family("ViT (SAM)"),
    "vitamin": Family("ViTamin"),
    "volo": Family("VOLO"),
    "vovnet": Family("VoVNet", _CNN),
    "xception": Family("Xception", _CNN),
    "xception_aligned": Family("Xception (aligned)", _CNN),
    "xcit": Family("XCiT"),
}


def family_key(model: nn.Module) -> str:
    """The timm family of a model: the ``timm.models`` module that defines its class (``convnext``)."""
    return type(model).__module__.rsplit(".", 1)[-1]


def family(model: nn.Module) -> Family:
    """The :class:`Family` of ``model`` (a plain one named after its class for an unknown family)."""
    return FAMILIES.get(family_key(model)) or Family(type(model).__name__)
