"""Bottleneck adapter layers: the trainable one (dense / MoSA / SparseAdapter) and its merged form.

``A(x) = s · W_up(act(W_down(LN?(x))))`` wraps a module ``M`` (METHODS.md §1):

- ``parallel`` (AdaptFormer): ``M(u) + A(u)``;
- ``sequential`` (Pfeiffer, Houlsby): ``v = M(u); v + A(v)``.

``W_down``/``W_up`` are :mod:`~surgeon.methods.matrices` strategies, so the same layer is a
plain adapter, a MoSA adapter (expert-split matrices) or a SparseAdapter (pruned matrices).

Layouts: the adapter maps the channel dimension of the tensor it sees — the last one for
channels-last tensors (ViT tokens ``[B, N, C]``, Swin ``[B, H, W, C]``, ConvNeXt Linear-MLP
NHWC), dim 1 for NCHW conv features (ConvNeXt atto/nano conv-MLPs, CNN stages), where it is a
pair of 1x1 convolutions. :func:`module_io` reads the layout off the module's structure.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from surgeon.errors import UserError
from surgeon.methods.base import ACTIVATIONS, SurgeryLayer
from surgeon.methods.matrices import Matrix, apply_linear, kept_count, random_keep_mask

try:  # timm's channels-first LayerNorm (NCHW), for the optional norm in front of a 1x1-conv adapter
    from timm.layers import LayerNorm2d
except ImportError:  # pragma: no cover - timm always provides it
    LayerNorm2d = None


def module_io(module: nn.Module) -> tuple[int, int, int] | None:
    """``(in_features, out_features, channel_dim)`` of a module, or None if it has no Linear/Conv2d.

    ``in`` comes from the first parametrised Linear/Conv2d in module order, ``out`` from the
    last one; the layout from the first one: a Conv2d consumes NCHW (``channel_dim=1``), a
    Linear channels-last (``-1``). This covers timm's ``Mlp``/``SwiGLU``/``ConvMlp``,
    attention modules (``qkv`` … ``proj``), ConvNeXt blocks (``conv_dw`` first: NCHW in and
    out, even with a Linear MLP inside), Swin blocks (NHWC) and CNN blocks.
    """
    layers = [m for m in module.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    if not layers:
        return None
    first, last = layers[0], layers[-1]
    # An attention's output is its output projection's, even when layers registered after it
    # compute something else (SwinV2-CR's position MLP, CaiT's talking heads, ConViT's pos_proj).
    proj = next((getattr(module, n) for n in ("proj", "o_proj", "out_proj") if isinstance(getattr(module, n, None),
                                                                                   (nn.Linear, nn.Conv2d))), None)
    if proj is not None:
        last = proj
    in_features = first.in_features if isinstance(first, nn.Linear) else first.in_channels
    out_features = last.out_features if isinstance(last, nn.Linear) else last.out_channels
    return in_features, out_features, (1 if isinstance(first, nn.Conv2d) else -1)


def _norm(channels: int, channel_dim: int, enabled: bool) -> nn.Module:
    if not enabled:
        return nn.Identity()
    # eps 1e-6: timm's ViT norms and the published MoSA adapter_norm use it.
    return nn.LayerNorm(channels, eps=1e-6) if channel_dim == -1 else LayerNorm2d(channels, eps=1e-6)


class PrunedLayerNorm(nn.Module):
    """The adapter's LayerNorm with its affine ``weight``/``bias`` pruned to a kept fraction
    (``prune.norm``: the published SparseAdapter baseline prunes every trainable adapter tensor).

    Pruned entries follow ``prune.pruned`` as the matrices do: ``zero`` (zero and stay zero) or
    ``frozen`` (keep their init, 1 and 0, and get no gradient). Channels-last, or NCHW
    (``channel_dim=1``: normalised over dim 1, as timm's ``LayerNorm2d``).
    """

    def __init__(self, norm: nn.LayerNorm, keep: float, pruned: str, channel_dim: int,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.normalized_shape, self.eps, self.channel_dim, self.pruned = norm.normalized_shape, norm.eps, channel_dim, pruned
        self.keep = keep
        self.kept = 0
        for name in ("weight", "bias"):
            init = getattr(norm, name).detach()
            mask = random_keep_mask(tuple(init.shape), keep, generator).to(init.device)
            self.register_buffer(f"{name}_mask", mask)
            self.register_parameter(name, nn.Parameter(init.clone() * mask if pruned == "zero" else init.clone()))
            self.kept += kept_count(mask.numel(), keep)

    def effective(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(weight, bias)`` ``[C]`` with the pruned entries zero or frozen."""
        out = []
        for value, mask in ((self.weight, self.weight_mask), (self.bias, self.bias_mask)):
            out.append(value * mask if self.pruned == "zero" else torch.where(mask, value, value.detach()))
        return out[0], out[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.effective()
        if self.channel_dim == 1:
            return F.layer_norm(x.movedim(1, -1), self.normalized_shape, weight, bias, self.eps).movedim(-1, 1)
        return F.layer_norm(x, self.normalized_shape, weight, bias, self.eps)


def _input_of(args: tuple, kwargs: dict) -> torch.Tensor:
    # timm calls blocks/MLPs/attention with the features first; some pass them as x=.
    return args[0] if args else kwargs["x"]


def _stash_input(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook on an ``adapter.input_from`` module: keep its input for the adapter that
    reads it. A plain function (no closure), so a deep copy of the model keeps working."""
    module.__dict__["_surgeon_input"] = _input_of(args, kwargs)


def watch_input(module: nn.Module) -> None:
    """Make ``module`` keep its latest input for an adapter with ``input_from`` (idempotent)."""
    if not getattr(module, "_surgeon_watched", False):
        module.register_forward_pre_hook(_stash_input, with_kwargs=True)
        module.__dict__["_surgeon_watched"] = True


class _AdapterForward(SurgeryLayer):
    """Shared forward of the trainable and the merged adapter (they differ in their matrices)."""

    placement: str
    channel_dim: int
    module_name: str
    in_features: int
    input_from: str | None = None

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def read_input_of(self, name: str | None, module: nn.Module | None) -> None:
        """Read the adapter's input from ``module`` (a sibling of the wrapped module, e.g. the
        block's ``norm2`` in front of its ``mlp``) instead of the wrapped module's own input.

        The sibling is held as a plain attribute, not a submodule (it belongs to the backbone).
        """
        self.input_from = name
        self.__dict__["_input_module"] = module
        if module is not None:
            watch_input(module)

    def _source(self, args: tuple, kwargs: dict, out):
        if self.placement == "sequential":
            return out
        if self.input_from is None:
            return _input_of(args, kwargs)
        source = self.__dict__["_input_module"].__dict__.pop("_surgeon_input", None)
        if source is None:
            raise UserError(f"the adapter on {self.module_name} reads the input of its sibling '{self.input_from}', "
                            f"which did not run before it in this forward pass", where=self.module_name,
                            hint="adapter.input_from must name a module the parent calls just before the target "
                                 "(e.g. norm2 before mlp in a transformer block)")
        return source

    def forward(self, *args, **kwargs):
        out = self.base_layer(*args, **kwargs)  # pass everything through: EVA rope=, BEiT shared_rel_pos_bias=
        source = self._source(args, kwargs, out)
        if not isinstance(out, torch.Tensor) or not isinstance(source, torch.Tensor):
            raise UserError(f"the adapter on {self.module_name} needs a module that maps one tensor to one tensor, "
                            f"but it returns {type(out).__name__}", hint="target the module's parent or child instead")
        if source.dim() < 2 or source.shape[self.channel_dim] != self.in_features:
            raise UserError(f"the {self.placement} adapter on {self.module_name} expects {self.in_features} channels "
                            f"(dim {self.channel_dim}) but sees a tensor of shape {tuple(source.shape)}",
                            hint="target modules whose input and output have the same layout (e.g. '**.blocks.*.mlp'), "
                                 "or use placement: sequential")
        delta = self._project(source)
        if delta.shape != out.shape:
            raise UserError(f"the {self.placement} adapter on {self.module_name} produces {tuple(delta.shape)} but the module "
                            f"returns {tuple(out.shape)}",
                            hint="target modules whose input and output have the same layout (e.g. '**.blocks.*.mlp'), "
                                 "or use placement: sequential")
        return out + delta


class AdapterLayer(_AdapterForward):
    """A trainable bottleneck adapter around ``base_layer``.

    Args:
        base_layer: the wrapped timm module ``M``.
        down: :class:`Matrix` ``[bottleneck, in]``; up: :class:`Matrix` ``[out, bottleneck]``.
        placement: ``parallel`` or ``sequential``.
        activation: ``gelu`` | ``relu`` | ``silu``.
        layernorm: LayerNorm (affine, trainable, eps 1e-6) on the adapter's input.
        scale: s; a trainable scalar parameter ``scale`` if ``learnable_scale``.
        dropout: dropout probability on the bottleneck activation (after the non-linearity,
            before ``up``; training only), as the published MoSA/AdaptFormer adapters.
        channel_dim: -1 (channels-last) or 1 (NCHW).
        module_name: the module's name in the model (for messages).
        label: the matrices' strategy for :meth:`describe`, e.g. ``4 experts (up)``.
    """

    method_name = "adapter"

    def __init__(self, base_layer: nn.Module, down: Matrix, up: Matrix, *, placement: str, activation: str,
                 layernorm: bool, scale: float, learnable_scale: bool, channel_dim: int, module_name: str = "",
                 label: str = "", dropout: float = 0.0):
        super().__init__(base_layer)
        assert placement in ("parallel", "sequential")
        self.placement = placement
        self.channel_dim = channel_dim
        self.module_name = module_name
        self.in_features = down.in_features
        self.activation = activation
        self.norm = _norm(down.in_features, channel_dim, layernorm)
        self.down = down
        self.act = ACTIVATIONS[activation]()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.up = up
        if learnable_scale:
            self.scale = nn.Parameter(torch.tensor(float(scale)))
        else:
            self.scale = float(scale)
        self.initial_scale = float(scale)  # what describe() shows of a scale built on the meta device
        self.label = label

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(self.act(self.down(self.norm(x), self.channel_dim)))
        return self.up(h, self.channel_dim) * self.scale

    def extra_params(self) -> int:
        norm = self.norm.kept if isinstance(self.norm, PrunedLayerNorm) else sum(p.numel() for p in self.norm.parameters())
        return self.down.extra_params() + self.up.extra_params() + norm + (1 if isinstance(self.scale, nn.Parameter) else 0)

    @property
    def num_experts(self) -> int | None:
        counts = {m.num_experts for m in (self.down, self.up) if m.num_experts}
        return counts.pop() if counts else None

    def describe(self) -> str:
        parts = [self.placement + (f" from {self.input_from} input" if self.input_from else ""),
                 f"bottleneck {self.down.out_features}"]
        if not isinstance(self.norm, nn.Identity):
            parts.append("LN")
        learnable = isinstance(self.scale, nn.Parameter)
        value = self.scale if not learnable else self.initial_scale if self.scale.is_meta else float(self.scale.detach())
        parts.append(f"{self.activation}, s={value:g}"
                     + (" learnable" if learnable else ""))
        if isinstance(self.dropout, nn.Dropout):
            parts.append(f"dropout {self.dropout.p:g}")
        if self.label:
            parts.append(self.label)
        return ", ".join(parts)

    @torch.no_grad()
    def merge(self, mode: str = "average") -> "MergedAdapter":
        """A :class:`MergedAdapter` of the original (dense) size; arithmetic in fp32.

        Expert-split matrices merge by ``mode`` (average ``W0 + D/N``, jigsaw ``W0 + D``),
        pruned ones become dense with zeros; the scale is folded into the up-projection
        (``s·(W h + b) = (sW) h + sb``), so inference costs exactly one dense adapter.
        """
        dtype = next(self.up.parameters()).dtype
        down_w, down_b = self.down.merged(mode)
        up_w, up_b = self.up.merged(mode)
        scale = float(self.scale.detach()) if isinstance(self.scale, nn.Parameter) else self.scale
        up_w = up_w * scale
        up_b = None if up_b is None else up_b * scale
        for t in (down_w, down_b, up_w, up_b):
            if t is not None and not t.is_meta and not torch.isfinite(t).all():
                raise UserError(f"merging the adapter on {self.module_name} gives non-finite weights (NaN/inf): "
                                "the trained tensors are already broken",
                                hint="train again with a lower base_lr, grad_clip or precision: fp32")
        merged = MergedAdapter(self.base_layer, in_features=self.down.in_features, bottleneck=self.down.out_features,
                               out_features=self.up.out_features, placement=self.placement, activation=self.activation,
                               layernorm=not isinstance(self.norm, nn.Identity), channel_dim=self.channel_dim,
                               down_bias=down_b is not None, up_bias=up_b is not None, module_name=self.module_name)
        merged.read_input_of(self.input_from, self.__dict__.get("_input_module"))
        for module in (merged.norm, merged.down, merged.up):  # base_layer stays where it is
            module.to(device=down_w.device)
        merged.down.weight.copy_(down_w)
        merged.up.weight.copy_(up_w)
        if down_b is not None:
            merged.down.bias.copy_(down_b)
        if up_b is not None:
            merged.up.bias.copy_(up_b)
        if isinstance(self.norm, PrunedLayerNorm):
            weight, bias = self.norm.effective()
            merged.norm.weight.copy_(weight)
            merged.norm.bias.copy_(bias)
        elif not isinstance(self.norm, nn.Identity):
            merged.norm.load_state_dict(self.norm.state_dict())
        # Store in the dtype the adapter trained in (fp32 normally; bf16 if the model was cast),
        # rounding once after the fp32 arithmetic.
        for module in (merged.norm, merged.down, merged.up):
            module.to(dtype=dtype)
        return merged


class MergedAdapter(_AdapterForward):
    """The dense adapter a merge leaves behind: ``M`` plus plain ``down``/``up`` Linear tensors.

    Its structure depends only on the recipe (``norm.*`` if layernorm, ``down.weight/bias``,
    ``up.weight/bias``, ``base_layer.*``), so ``build_model(recipe)`` + ``merge`` gives the same
    state-dict keys as the saved merged model. The scale is already folded into ``up``.
    Channels-last: ``down`` is ``[bottleneck, in]``; NCHW uses the same tensors as 1x1 convs.
    """

    method_name = "adapter"
    merged_layer = True

    def __init__(self, base_layer: nn.Module, *, in_features: int, bottleneck: int, out_features: int,
                 placement: str, activation: str, layernorm: bool, channel_dim: int,
                 down_bias: bool = True, up_bias: bool = True, module_name: str = ""):
        super().__init__(base_layer)
        self.placement = placement
        self.channel_dim = channel_dim
        self.module_name = module_name
        self.in_features = in_features
        self.activation = activation
        # Built on the base layer's device; from_config callers (rebuild for loading) may be on meta.
        device = next((p.device for p in base_layer.parameters()), None)
        self.norm = _norm(in_features, channel_dim, layernorm).to(device)
        self.down = nn.Linear(in_features, bottleneck, bias=down_bias, device=device)
        self.act = ACTIVATIONS[activation]()
        self.up = nn.Linear(bottleneck, out_features, bias=up_bias, device=device)

    def _project(self, x: torch.Tensor) -> torch.Tensor:
        h = self.act(apply_linear(self.norm(x), self.down.weight, self.down.bias, self.channel_dim))
        return apply_linear(h, self.up.weight, self.up.bias, self.channel_dim)

    def extra_params(self) -> int:
        return sum(p.numel() for m in (self.norm, self.down, self.up) for p in m.parameters())

    def describe(self) -> str:
        return f"merged {self.placement}, bottleneck {self.down.out_features}"

    def merge(self, mode: str = "average") -> "MergedAdapter":
        return self
