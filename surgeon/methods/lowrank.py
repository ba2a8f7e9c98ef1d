"""Low-rank weight deltas on a Linear or Conv2d: the one layer of LoRA, MoSL, SparseLoRA, MLAE and DoRA.

Every method of the family adds ``ΔW = B · diag(c) · A`` to a frozen ``base_layer`` weight:

- ``A`` (down) ``[R, in·kh·kw]`` and ``B`` (up) ``[out, R]`` are made of one (A, B) pair per
  *group*: the whole layer, or each adapted part (``q``, ``k``, ``v``) of a fused projection —
  timm's ``[q | k | v]`` thirds, or the rows a semantic target found (a per-head layout gives a
  part many spans of rows). A group's ``B`` only fills its part's rows, so ``B`` is
  block-structured. Each is a
  :class:`~surgeon.methods.matrices.Matrix` strategy: dense, expert-split (MoSL) or pruned
  (SparseLoRA), chosen by the rule's modifiers;
- ``c`` ``[R]`` is the per-rank scaling, a :class:`Weighting` strategy: :class:`FixedScale`
  ``α/r`` (LoRA, DoRA), :class:`LearnedCoefficients` ``λ`` (MLAE without masking) or
  :class:`MaskedCoefficients` ``m ⊙ λ / (1-p)`` (MLAE's expert dropout);
- an optional :class:`Decomposition` strategy changes how ``W`` and ``ΔW`` combine (DoRA:
  a learned magnitude per output row); without one the layer is ``W + ΔW``.

Two ways the delta reaches the computation:

1. **fast path** — the layer is called: ``base(x) + ((dropout(x) Aᵀ) (B diag(c))ᵀ)``. Two thin
   matmuls (for a Conv2d: ``A`` as a conv with the base's kernel/stride/padding, ``B`` as a
   1×1 conv); ``ΔW`` is never materialised.
2. **weight path** — the parent never calls the layer but reads ``layer.weight`` (BEiT,
   EVA-02 tiny/small and SwinV2 compute ``F.linear(x, self.qkv.weight, bias)``, DESIGN.md).
   The :attr:`LowRankLayer.weight` property returns ``base.weight + ΔW`` (materialised, with
   gradients to A, B, c), so the surgery still takes effect; each read counts as a probe hit.
   Input dropout cannot act on a weight and is skipped on this path.

``merge`` folds ``ΔW`` (fp32) into ``base_layer.weight`` and returns ``base_layer``: the state
dict gets exactly the plain timm keys back.
"""
from __future__ import annotations

import math
from typing import Callable, NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from surgeon.errors import UserError
from surgeon.methods.base import ExpertSampler, PatchContext, SurgeryLayer
from surgeon.methods.matrices import apply_linear, kaiming_uniform, make_matrix

SLICE_INDEX = {"q": 0, "k": 1, "v": 2}
WHOLE = "all"  # group name when a layer is adapted as a whole (no slices)


def out_features(module: nn.Module) -> int:
    return module.out_features if isinstance(module, nn.Linear) else module.out_channels


def fan_in(module: nn.Module) -> int:
    """Inputs per output unit: ``in`` for a Linear, ``in·kh·kw`` for a Conv2d."""
    return module.weight[0].numel()


def is_fused_qkv(name: str, module: nn.Module) -> bool:
    """Whether ``module`` (called ``name`` in the model) is a fused q/k/v projection.

    timm names every fused projection ``qkv`` (ViT, DeiT, BEiT, EVA, Swin, ...: ``attn.qkv``),
    with outputs ``3 × num_heads × head_dim``. A Linear whose outputs merely happen to be a
    multiple of 3 (ConvNeXt's ``mlp.fc1``: 4 × 96 = 384) is not one: slicing it in thirds
    would adapt arbitrary rows.
    """
    return name.rsplit(".", 1)[-1].lower().endswith("qkv") and out_features(module) % 3 == 0


def module_problem(module: nn.Module, slices, name: str | None = None) -> str | None:
    """Why a low-rank delta cannot go on ``module`` (a phrase after its name), or None.

    ``name``: the module's name in the model; with ``slices`` it must be a fused qkv
    (:func:`is_fused_qkv`).
    """
    if isinstance(module, SurgeryLayer):
        return f"is already patched ({module.method_name}); one low-rank method per module"
    if isinstance(module, nn.Conv2d):
        if module.groups != 1:
            return f"is a grouped convolution (groups={module.groups}); low-rank deltas need groups=1"
        if module.padding_mode != "zeros":
            return f"uses padding_mode={module.padding_mode!r}; only 'zeros' is supported"
    elif not isinstance(module, nn.Linear):
        return f"is a {type(module).__name__}, not a Linear or Conv2d"
    if slices and out_features(module) % 3:
        return (f"has {out_features(module)} outputs, not a fused qkv (a multiple of 3), "
                f"so slices {list(slices)} do not apply")
    if slices and name is not None and not is_fused_qkv(name, module):
        return (f"is not a fused qkv projection (a module named '...qkv'), so slices {list(slices)} do not apply; "
                f"remove slices to adapt the whole layer, or target '**.attn.qkv'")
    return None


Spans = tuple[tuple[int, int], ...]


class RowGroup(NamedTuple):
    """One (A, B) pair's output rows: ``spans`` of ``(first row, end row)``, in order."""

    name: str
    spans: Spans

    @property
    def size(self) -> int:
        """How many output rows the group adapts (the rows of its ``B``)."""
        return sum(r1 - r0 for r0, r1 in self.spans)


def slice_groups(module: nn.Module, slices, rows: dict[str, Spans] | None = None) -> list[RowGroup]:
    """The adapted output rows, one :class:`RowGroup` per (A, B) pair.

    ``rows`` (``{part: spans}``, from a semantic target) wins; else ``slices`` cut a fused qkv in
    thirds, in q, k, v order; else the whole layer is one group.
    """
    if rows:
        return [RowGroup(name, tuple(tuple(span) for span in spans)) for name, spans in rows.items()]
    out = out_features(module)
    if not slices:
        return [RowGroup(WHOLE, ((0, out),))]
    third = out // 3
    return [RowGroup(s, ((SLICE_INDEX[s] * third, (SLICE_INDEX[s] + 1) * third),))
            for s in sorted(slices, key=SLICE_INDEX.__getitem__)]


def _grouped(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Bring 2-D ``[m, n]`` and per-batch-group 3-D ``[G, m, n]`` tensors to a common rank."""
    groups = max((t.shape[0] for t in tensors if t.dim() == 3), default=None)
    if groups is None:
        return tensors
    return [t if t.dim() == 3 else t.expand(groups, *t.shape) for t in tensors]


def stack_down(weights: list[torch.Tensor]) -> torch.Tensor:
    """Per-group ``A_s [(G,) r_s, fan_in]`` → ``A [(G,) R, fan_in]`` (rows concatenated)."""
    if len(weights) == 1:
        return weights[0]
    return torch.cat(_grouped(weights), dim=-2)


def block_up(weights: list[torch.Tensor], rows: list[Spans], out: int) -> torch.Tensor:
    """Per-group ``B_s [(G,) d_s, r_s]`` → block matrix ``B [(G,) out, R]``.

    Group s fills the row spans ``rows[s]`` (its ``d_s`` rows, in order) and its own rank
    columns; everything else is zero, so one matmul puts every group's update into its rows.
    """
    if len(weights) == 1 and tuple(rows[0]) == ((0, out),):
        return weights[0]
    weights = _grouped(weights)
    total = sum(w.shape[-1] for w in weights)
    full = weights[0].new_zeros(*weights[0].shape[:-2], out, total)
    col = 0
    for w, spans in zip(weights, rows):
        cols = slice(col, col + w.shape[-1])
        if len(spans) == 1:
            r0, r1 = spans[0]
            full[..., r0:r1, cols] = w  # differentiable: autograd tracks the copy
        else:
            start = 0
            for r0, r1 in spans:
                full[..., r0:r1, cols] = w[..., start:start + r1 - r0, :]
                start += r1 - r0
        col += w.shape[-1]
    return full


def group_rows(tensor: torch.Tensor, spans: Spans) -> torch.Tensor:
    """The rows of ``tensor`` (dim 0) that ``spans`` name, in order."""
    if len(spans) == 1:
        return tensor[spans[0][0]:spans[0][1]]
    return torch.cat([tensor[r0:r1] for r0, r1 in spans])


def scale_columns(up: torch.Tensor, coefficients: torch.Tensor | float) -> torch.Tensor:
    """``B diag(c)``: ``up [(G,) out, R]`` times ``c`` (a number, ``[R]`` or ``[G, R]``)."""
    if not isinstance(coefficients, torch.Tensor):
        return up * coefficients
    return up * coefficients.unsqueeze(-2)  # [.., 1, R] broadcasts over the out rows


def gaussian_down(rows: int, cols: int, std: float, generator: torch.Generator | None) -> torch.Tensor:
    """A ``[rows, cols]`` CPU tensor with i.i.d. ``N(0, std²)`` entries."""
    return torch.randn(rows, cols, generator=generator) * std


def lora_like_std(fan: int) -> float:
    """The std of ``nn.Linear``'s kaiming-uniform(a=√5) init, ``1/√(3·fan_in)``."""
    return 1.0 / math.sqrt(3 * fan)


# --------------------------------------------------------------------------- weightings: c

class Weighting:
    """Strategy for ``c``, the per-rank scaling of ``ΔW = B diag(c) A``.

    A weighting that trains registers its parameters on the layer (:meth:`attach`), so the
    state dict names stay the layer's (``coefficient``); it holds configuration only.
    """

    def attach(self, layer: "LowRankLayer") -> None:
        """Register the weighting's parameters on ``layer`` (after its matrices)."""

    def value(self, layer: "LowRankLayer") -> torch.Tensor | float:
        """``c`` for this forward pass: a number, ``[R]`` or per batch group ``[G, R]``."""
        raise NotImplementedError

    def merged(self, layer: "LowRankLayer") -> torch.Tensor | float:
        """``c`` of the trained layer (fp32, detached, no masking): what merge folds in."""
        raise NotImplementedError

    def extra_params(self, layer: "LowRankLayer") -> int:
        return 0

    def rank_per_expert(self) -> int:
        """Rank of one expert (the rank-k blocks :func:`expert_similarity` compares)."""
        return 1

    def describe(self, layer: "LowRankLayer") -> str:
        raise NotImplementedError


class FixedScale(Weighting):
    """LoRA's ``c = α/r`` for every rank (a number: the fast path scales the thin activation)."""

    def __init__(self, rank: int, alpha: float | None):
        self.rank = rank
        self.alpha = alpha if alpha is not None else rank
        self.scaling = self.alpha / self.rank

    def value(self, layer) -> float:
        return self.scaling

    def merged(self, layer) -> float:
        return self.scaling

    def describe(self, layer) -> str:
        text = f"rank {self.rank}, alpha {self.alpha:g}" + ("" if layer.adapted == WHOLE else f", {layer.adapted}")
        for role, mats in (("A", layer.down), ("B", layer.up)):
            detail = next(iter(mats.values())).describe()
            if detail:
                text += f", {role}: {detail}"
        return text


class LearnedCoefficients(Weighting):
    """MLAE's trainable ``λ`` ``[S·E]`` (one per expert of each group), ``c = repeat(λ, k)``.

    Args:
        num_experts: E, experts per group; expert_rank: k; init: the initial λ.
    """

    p = 0.0

    def __init__(self, num_experts: int, expert_rank: int, init: float):
        self.num_experts = num_experts
        self.expert_rank = expert_rank
        self.init = float(init)

    def attach(self, layer) -> None:
        ref = layer.base_layer.weight
        layer.coefficient = nn.Parameter(
            torch.full((len(layer.parts) * self.num_experts,), self.init, device=ref.device, dtype=ref.dtype))

    def mask(self, layer) -> torch.Tensor | None:
        """This training forward's kept-expert mask (None: nothing is dropped)."""
        return None

    def value(self, layer) -> torch.Tensor:
        coefficient = layer.coefficient
        mask = self.mask(layer)
        if mask is not None:
            coefficient = coefficient * mask                       # [S·E] or [G, S·E]
        if self.expert_rank == 1:  # rank-1 experts: c is λ itself (repeat_interleave would copy)
            return coefficient
        return coefficient.repeat_interleave(self.expert_rank, dim=-1)

    def merged(self, layer) -> torch.Tensor:
        # All experts, no mask and no 1/(1-p): what the model computes at inference.
        return layer.coefficient.detach().float().repeat_interleave(self.expert_rank)

    def extra_params(self, layer) -> int:
        return layer.coefficient.numel()

    def rank_per_expert(self) -> int:
        return self.expert_rank

    def describe(self, layer) -> str:
        text = f"{self.num_experts} experts" + (f" x rank {self.expert_rank}" if self.expert_rank > 1 else "")
        text += f", p {self.p:g}" if self.p else ""
        return text + ("" if layer.adapted == WHOLE else f", {layer.adapted}")


class MaskedCoefficients(LearnedCoefficients):
    """MLAE's expert dropout on top of ``λ``: per training forward each expert is kept with
    probability ``1-p`` and scaled ``1/(1-p)``, drawn from the model's seeded sampler; eval uses
    every expert unscaled."""

    def __init__(self, num_experts: int, expert_rank: int, init: float, p: float, sampler: ExpertSampler):
        super().__init__(num_experts, expert_rank, init)
        if not 0 < p < 1:
            raise ValueError(f"masking p must be in (0, 1), got {p}")
        self.p = p
        self.sampler = sampler  # shared, plain attribute (not a submodule, not state)

    def mask(self, layer) -> torch.Tensor | None:
        """``[S·E]`` or ``[G, S·E]`` of 0 or 1/(1-p); None in eval mode. Draws ``sampler.rand`` —
        one value per expert (per batch group when ``sampler.groups`` > 1) — so masks replay
        from the seed."""
        if not layer.training:
            return None
        groups = max(1, self.sampler.groups)
        draws = self.sampler.rand(groups * layer.coefficient.numel())
        # kept with probability 1-p, scaled 1/(1-p): one where() (fewer small ops per layer and step)
        mask = torch.where(draws >= self.p, 1.0 / (1 - self.p), 0.0)
        mask = mask.to(layer.coefficient.device, layer.coefficient.dtype, non_blocking=True)
        return mask if groups == 1 else mask.view(groups, -1)


class Decomposition:
    """Strategy for how ``W`` and ``ΔW`` combine, when it is not ``W + ΔW`` (DoRA's magnitude).

    It registers its parameters on the layer (:meth:`attach`) and takes over the fast path
    (:meth:`forward`), the materialised weight (:meth:`combine`, used by the weight path and by
    merge) and its share of the parameter count.
    """

    def attach(self, layer: "LowRankLayer") -> None:
        """Register the strategy's parameters on ``layer`` (after its matrices and weighting)."""

    def forward(self, layer: "LowRankLayer", x: torch.Tensor, base_out: torch.Tensor, down: torch.Tensor,
                up: torch.Tensor) -> torch.Tensor:
        """The layer's output for input ``x``; ``base_out = base_layer(x)``, ``down`` = A and
        ``up`` = B diag(c) of this forward."""
        raise NotImplementedError

    def combine(self, layer: "LowRankLayer", weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The effective weight from the base ``weight`` and ``delta`` (both shaped like it)."""
        raise NotImplementedError

    def extra_params(self, layer: "LowRankLayer") -> int:
        return 0

    def describe(self) -> str:
        return ""


# --------------------------------------------------------------------------- the layer

class LowRankLayer(SurgeryLayer):
    """``base_layer`` plus ``ΔW = B diag(c) A``; see the module docstring.

    Args:
        base_layer: the Linear / Conv2d to adapt (frozen).
        ctx: the patch context (rule modifiers for the matrices, sampler, init generator).
        method_name: shown in messages (``lora``, ``mlae``, ``dora``).
        slices: adapt only these thirds of a fused qkv (one (A, B) pair each), or None.
        rows: ``{part: row spans}`` to adapt instead (one (A, B) pair each): what a semantic
            target found in a fused projection (e.g. PVTv2's ``kv`` for ``v``, LeViT's per-head
            ``qkv``). None: ``slices`` decide.
        rank: rows of each group's ``A``.
        init_down: ``(rank, fan_in, generator) -> [rank, fan_in]`` CPU init of ``A`` (``B`` is 0).
        weighting: the :class:`Weighting` strategy for ``c``.
        dropout: dropout probability on the input of the delta (fast path, training only).
        decomposition: an optional :class:`Decomposition` strategy.

    State (per group ``s`` in ``all`` or ``q``/``k``/``v``): ``down.s`` (A), ``up.s`` (B), plus
    what the strategies register (``coefficient`` for MLAE, ``magnitude`` for DoRA).

    Attributes:
        parts: one :class:`RowGroup` per (A, B) pair — the adapted output rows per group.
        target_name: the module's name in the model (used in messages).
    """

    down: nn.ModuleDict
    up: nn.ModuleDict

    def __init__(self, base_layer: nn.Module, ctx: PatchContext, *, method_name: str, slices, rank: int,
                 init_down: Callable, weighting: Weighting, dropout: float = 0.0,
                 decomposition: Decomposition | None = None, rows: dict[str, Spans] | None = None):
        super().__init__(base_layer)
        self.method_name = method_name
        self.is_conv = isinstance(base_layer, nn.Conv2d)
        self.parts = slice_groups(base_layer, slices, rows)
        self.out_rows = out_features(base_layer)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.target_name = ""
        self.weighting = weighting
        self.decomposition = decomposition
        ref = base_layer.weight
        self.down, self.up = nn.ModuleDict(), nn.ModuleDict()
        for name, spans in self.parts:
            a = init_down(rank, fan_in(base_layer), ctx.init_generator)
            b = torch.zeros(RowGroup(name, spans).size, rank)
            self.down[name] = make_matrix(a.to(ref.device, ref.dtype), "down", ctx.rule, ctx)
            self.up[name] = make_matrix(b.to(ref.device, ref.dtype), "up", ctx.rule, ctx)
        weighting.attach(self)
        if decomposition is not None:
            decomposition.attach(self)

    @property
    def adapted(self) -> str:
        """The adapted groups as text: ``all`` or e.g. ``q+v``."""
        return "+".join(group.name for group in self.parts)

    # ------------------------------------------------------------------ factors
    def coefficients(self) -> torch.Tensor | float:
        """``c`` for this forward pass (draws masks where the weighting masks)."""
        return self.weighting.value(self)

    def _rows(self) -> list[Spans]:
        return [group.spans for group in self.parts]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [(G,) R, fan_in], B diag(c) [(G,) out, R])`` for this forward (draws experts/masks)."""
        down, up, coefficients = self._factors()
        return down, scale_columns(up, coefficients)

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | float]:
        """``(A, B, c)`` for this forward, ``c`` not yet applied (draws in the same order as :meth:`factors`)."""
        keys = [group.name for group in self.parts]
        down = stack_down([self.down[k].effective()[0] for k in keys])
        up = block_up([self.up[k].effective()[0] for k in keys], self._rows(), self.out_rows)
        return down, up, self.coefficients()

    def merged_factors(self, mode: str = "average") -> tuple[torch.Tensor, torch.Tensor]:
        """fp32, detached ``(A [R, fan_in], B diag(c) [out, R])`` after merging expert-split matrices."""
        keys = [group.name for group in self.parts]
        down = stack_down([self.down[k].merged(mode)[0] for k in keys])
        up = block_up([self.up[k].merged(mode)[0] for k in keys], self._rows(), self.out_rows)
        return down, scale_columns(up, self.weighting.merged(self))

    def delta_weight(self, mode: str = "average") -> torch.Tensor:
        """fp32 ``ΔW`` of the trained layer, shaped like ``base_layer.weight``."""
        down, up = self.merged_factors(mode)
        return (up @ down).reshape(self.base_layer.weight.shape)

    def combine(self, weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        """The effective weight from a base ``weight`` and ``delta`` shaped like it: ``W + ΔW``, or
        what the decomposition strategy makes of them."""
        return weight + delta if self.decomposition is None else self.decomposition.combine(self, weight, delta)

    # ------------------------------------------------------------------ the two paths
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, ..., in]`` (Linear) or ``[B, in, H, W]`` (Conv2d) → the base output plus the delta's."""
        down, up, coefficients = self._factors()
        y = self.base_layer(x)
        if self.decomposition is not None:
            return self.decomposition.forward(self, x, y, down, scale_columns(up, coefficients))
        h = self.down_project(self.dropout(x), down)            # [B, ..., R] or [B, R, H', W']
        # Hot path (benchmarks/README.md): a number c (LoRA's α/r) scales the thin rank-R
        # activation, and not at all when it is 1, so no [out, R] copy of B is made and saved for
        # backward; per-rank c (MLAE) scales B's columns (cheaper than h at realistic token counts).
        if isinstance(coefficients, torch.Tensor):
            up = scale_columns(up, coefficients)
        elif coefficients != 1:
            h = h * coefficients
        if up.dim() == 2 and not self.is_conv:
            # y + h Bᵀ as one addmm (beta=1): no separate elementwise pass over the [tokens, out] output.
            return torch.addmm(y.reshape(-1, y.shape[-1]), h.reshape(-1, h.shape[-1]), up.t()).view(y.shape)
        return y + self.up_project(h, up)

    def down_project(self, x: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
        """``x`` through ``A``: ``[B, ..., R]`` (Linear) or, as a conv with the base's kernel,
        stride and padding, ``[B, R, H', W']`` (Conv2d)."""
        if not self.is_conv:
            return apply_linear(x, down)
        conv = self.base_layer
        kernel = (down.shape[-2], conv.in_channels, *conv.kernel_size)
        if down.dim() == 2:
            return F.conv2d(x, down.reshape(kernel), None, conv.stride, conv.padding, conv.dilation)
        groups = down.shape[0]  # per-batch-group experts (batched consistency pass)
        if x.shape[0] % groups:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by the {groups} expert groups")
        return torch.cat([F.conv2d(xg, dg.reshape(kernel), None, conv.stride, conv.padding, conv.dilation)
                          for xg, dg in zip(x.chunk(groups), down)])

    def up_project(self, h: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        """``h`` through ``up`` (``[(G,) out, R]``) over the channel dimension."""
        return apply_linear(h, up, None, channel_dim=1 if self.is_conv else -1)

    @property
    def weight(self) -> torch.Tensor:
        """``base_layer.weight + ΔW`` for parents that compute with the weight directly.

        Materialises ``ΔW`` (differentiable) and draws this forward's experts/masks, like a
        call of the layer would. Counts as a probe hit: the driver's check that the surgery
        takes effect sees parents that bypass ``forward``.
        """
        self.probe_hits += 1
        down, up = self.factors()
        if down.dim() == 3 or up.dim() == 3:
            raise UserError(
                f"{self.target_name or 'a patched module'} is used through its weight by its parent "
                f"(F.linear(x, module.weight)), which cannot apply a different expert draw to each half "
                f"of a batch",
                hint="set regularizers.consistency.batched: false (two separate passes)")
        base = self.base_layer.weight
        return self.combine(base, (up @ down).reshape(base.shape).to(base.dtype))

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias (low-rank methods leave it unchanged)."""
        return self.base_layer.bias

    # ------------------------------------------------------------------ SurgeryLayer API
    def extra_params(self) -> int:
        count = sum(m.extra_params() for m in self.down.values()) + sum(m.extra_params() for m in self.up.values())
        count += self.weighting.extra_params(self)
        if self.decomposition is not None:
            count += self.decomposition.extra_params(self)
        return count

    def describe(self) -> str:
        text = self.weighting.describe(self)
        if self.decomposition is not None and self.decomposition.describe():
            text += f", {self.decomposition.describe()}"
        return text

    def merge(self, mode: str = "average") -> nn.Module:
        """Fold ``ΔW`` into ``base_layer.weight`` (fp32 arithmetic, cast back) and return ``base_layer``.

        Raises:
            UserError: ``ΔW`` (or the merged weight) has NaN/inf entries; the base weight is
                left untouched.
        """
        weight = self.base_layer.weight
        with torch.no_grad():
            delta = self.delta_weight(mode).to(weight.device)
            merged = self.combine(weight.float(), delta).to(weight.dtype)
            if not (torch.isfinite(delta).all() and torch.isfinite(merged).all()):
                raise UserError(
                    f"cannot merge {self.method_name} into {self.target_name or 'a module'}: its update has "
                    f"NaN/inf entries (training diverged), the weights were left unmerged",
                    hint="resume from an earlier checkpoint or lower the learning rate")
            weight.copy_(merged)
        return self.base_layer

    def expert_factors(self) -> list[tuple[str, torch.Tensor, torch.Tensor, int]]:
        """Per group: ``(name, A [R_s, fan_in], B diag(c) [d_s, R_s], expert rank)``, fp32 merged.

        Expert ``j`` of a group is the rank-k term ``B[:, jk:(j+1)k] A[jk:(j+1)k]`` (for LoRA,
        k = 1: the rank-1 terms of ``BA``). Used by :func:`surgeon.methods.mlae.similarity.expert_similarity`.
        """
        down, up = self.merged_factors("average")
        out, col = [], 0
        for name, spans in self.parts:
            rank = self.down[name].out_features
            out.append((name, down[col:col + rank], group_rows(up, spans)[:, col:col + rank],
                        self.weighting.rank_per_expert()))
            col += rank
        return out


def kaiming_down(rank: int, fan: int, generator: torch.Generator | None) -> torch.Tensor:
    """LoRA's ``A`` init: kaiming-uniform(a=√5) like ``nn.Linear`` (CPU, from ``generator``)."""
    return kaiming_uniform(rank, fan, generator)


def gaussian_lora_like_down(rank: int, fan: int, generator: torch.Generator | None) -> torch.Tensor:
    """MLAE's ``A`` init: ``N(0, σ²)`` with LoRA's variance, ``σ = 1/√(3·fan_in)``."""
    return gaussian_down(rank, fan, lora_like_std(fan), generator)


__all__ = ["Decomposition", "FixedScale", "LearnedCoefficients", "LowRankLayer", "MaskedCoefficients", "RowGroup",
           "SLICE_INDEX", "Spans", "WHOLE", "Weighting", "block_up", "fan_in", "gaussian_down", "group_rows",
           "is_fused_qkv", "kaiming_down", "lora_like_std", "module_problem", "scale_columns", "slice_groups",
           "stack_down"]
