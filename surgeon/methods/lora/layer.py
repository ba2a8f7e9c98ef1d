"""Low-rank weight deltas on a Linear or Conv2d: the layer shared by LoRA (and MoSL, SparseLoRA) and MLAE.

Every method of the family adds ``ΔW = B · diag(c) · A`` to a frozen ``base_layer`` weight:

- ``A`` (down) ``[R, in·kh·kw]`` and ``B`` (up) ``[out, R]`` are made of one (A, B) pair per
  *group*: the whole layer, or each adapted third (``q``, ``k``, ``v``) of a fused qkv
  Linear. A group's ``B`` only fills its third's rows, so ``B`` is block-structured;
- ``c`` ``[R]`` is the per-rank scaling: ``α/r`` for LoRA, ``m ⊙ λ / (1-p)`` for MLAE.

Two ways the delta reaches the computation:

1. **fast path** — the layer is called: ``base(x) + ((dropout(x) Aᵀ) (B diag(c))ᵀ)``. Two thin
   matmuls (for a Conv2d: ``A`` as a conv with the base's kernel/stride/padding, ``B`` as a
   1×1 conv); ``ΔW`` is never materialised.
2. **weight path** — the parent never calls the layer but reads ``layer.weight`` (BEiT,
   EVA-02 tiny/small and SwinV2 compute ``F.linear(x, self.qkv.weight, bias)``, DESIGN.md).
   The :attr:`LowRankLayer.weight` property returns ``base.weight + ΔW`` (materialised, with
   gradients to A, B, c), so the surgery still takes effect; each read counts as a probe hit.
   LoRA dropout cannot act on a weight and is skipped on this path.

``merge`` folds ``ΔW`` (fp32) into ``base_layer.weight`` and returns ``base_layer``: the state
dict gets exactly the plain timm keys back.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from surgeon.errors import UserError
from surgeon.methods.base import PatchContext, SurgeryLayer
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


def module_problem(module: nn.Module, slices: list[str] | None, name: str | None = None) -> str | None:
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


def slice_groups(module: nn.Module, slices: list[str] | None) -> list[tuple[str, int, int]]:
    """The adapted output rows: ``[(group name, first row, end row)]`` in q, k, v order."""
    out = out_features(module)
    if not slices:
        return [(WHOLE, 0, out)]
    third = out // 3
    return [(s, SLICE_INDEX[s] * third, (SLICE_INDEX[s] + 1) * third)
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


def block_up(weights: list[torch.Tensor], rows: list[tuple[int, int]], out: int) -> torch.Tensor:
    """Per-group ``B_s [(G,) d_s, r_s]`` → block matrix ``B [(G,) out, R]``.

    Group s fills rows ``rows[s]`` and its own rank columns; everything else is zero, so one
    matmul puts every group's update into its output slice.
    """
    if len(weights) == 1 and rows[0] == (0, out):
        return weights[0]
    weights = _grouped(weights)
    total = sum(w.shape[-1] for w in weights)
    full = weights[0].new_zeros(*weights[0].shape[:-2], out, total)
    col = 0
    for w, (r0, r1) in zip(weights, rows):
        full[..., r0:r1, col:col + w.shape[-1]] = w  # differentiable: autograd tracks the copy
        col += w.shape[-1]
    return full


def scale_columns(up: torch.Tensor, coefficients: torch.Tensor | float) -> torch.Tensor:
    """``B diag(c)``: ``up [(G,) out, R]`` times ``c`` (a number, ``[R]`` or ``[G, R]``)."""
    if not isinstance(coefficients, torch.Tensor):
        return up * coefficients
    return up * coefficients.unsqueeze(-2)  # [.., 1, R] broadcasts over the out rows


class LowRankLayer(SurgeryLayer):
    """``base_layer`` plus ``ΔW = B diag(c) A``; see the module docstring.

    Subclasses create ``down`` / ``up`` (``nn.ModuleDict`` of :class:`Matrix`, one per group,
    same keys) and implement :meth:`coefficients` (``c`` for this forward) and
    :meth:`merged_coefficients` (``c`` after training: fp32, no masking).

    Attributes:
        parts: ``[(group name, first row, end row)]`` — the adapted output rows per group.
        target_name: the module's name in the model (set by the method; used in messages).
    """

    method_name = "low_rank"
    down: nn.ModuleDict
    up: nn.ModuleDict

    def __init__(self, base_layer: nn.Module, slices: list[str] | None, dropout: float = 0.0):
        super().__init__(base_layer)
        self.is_conv = isinstance(base_layer, nn.Conv2d)
        self.parts = slice_groups(base_layer, slices)
        self.out_rows = out_features(base_layer)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.target_name = ""

    # ------------------------------------------------------------------ what subclasses define
    def coefficients(self) -> torch.Tensor | float:
        """``c`` for this forward pass: a number, ``[R]`` or per batch group ``[G, R]``."""
        raise NotImplementedError

    def merged_coefficients(self) -> torch.Tensor | float:
        """``c`` of the trained layer (fp32, detached, no masking): what merge folds in."""
        raise NotImplementedError

    def rank_per_expert(self) -> int:
        """Rank of one expert (the rank-k blocks :func:`expert_similarity` compares)."""
        return 1

    # ------------------------------------------------------------------ factors
    def _rows(self) -> list[tuple[int, int]]:
        return [(r0, r1) for _, r0, r1 in self.parts]

    def factors(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(A [(G,) R, fan_in], B diag(c) [(G,) out, R])`` for this forward (draws experts/masks)."""
        down, up, coefficients = self._factors()
        return down, scale_columns(up, coefficients)

    def _factors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | float]:
        """``(A, B, c)`` for this forward, ``c`` not yet applied (draws in the same order as :meth:`factors`)."""
        keys = [name for name, _, _ in self.parts]
        down = stack_down([self.down[k].effective()[0] for k in keys])
        up = block_up([self.up[k].effective()[0] for k in keys], self._rows(), self.out_rows)
        return down, up, self.coefficients()

    def merged_factors(self, mode: str = "average") -> tuple[torch.Tensor, torch.Tensor]:
        """fp32, detached ``(A [R, fan_in], B diag(c) [out, R])`` after merging expert-split matrices."""
        keys = [name for name, _, _ in self.parts]
        down = stack_down([self.down[k].merged(mode)[0] for k in keys])
        up = block_up([self.up[k].merged(mode)[0] for k in keys], self._rows(), self.out_rows)
        return down, scale_columns(up, self.merged_coefficients())

    def delta_weight(self, mode: str = "average") -> torch.Tensor:
        """fp32 ``ΔW`` of the trained layer, shaped like ``base_layer.weight``."""
        down, up = self.merged_factors(mode)
        return (up @ down).reshape(self.base_layer.weight.shape)

    # ------------------------------------------------------------------ the two paths
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x [B, ..., in]`` (Linear) or ``[B, in, H, W]`` (Conv2d) → the base output plus the delta's."""
        down, up, coefficients = self._factors()
        y = self.base_layer(x)
        h = self._down(self.dropout(x), down)                   # [B, ..., R] or [B, R, H', W']
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
        return y + apply_linear(h, up, None, channel_dim=1 if self.is_conv else -1)

    def _down(self, x: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
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
        return base + (up @ down).reshape(base.shape).to(base.dtype)

    @property
    def bias(self) -> torch.Tensor | None:
        """The base layer's bias (low-rank methods leave it unchanged)."""
        return self.base_layer.bias

    def __getattr__(self, name: str):
        # Parents may read plain attributes of the wrapped layer (in_features, kernel_size, ...).
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Never fall back for the delta's own names: a silent base weight would undo the surgery.
            if name in ("base_layer", "weight", "bias"):
                raise
            return getattr(self.base_layer, name)

    # ------------------------------------------------------------------ SurgeryLayer API
    def extra_params(self) -> int:
        return sum(m.extra_params() for m in self.down.values()) + sum(m.extra_params() for m in self.up.values())

    def merge(self, mode: str = "average") -> nn.Module:
        """Fold ``ΔW`` into ``base_layer.weight`` (fp32 arithmetic, cast back) and return ``base_layer``.

        Raises:
            UserError: ``ΔW`` (or the merged weight) has NaN/inf entries; the base weight is
                left untouched.
        """
        weight = self.base_layer.weight
        with torch.no_grad():
            delta = self.delta_weight(mode).to(weight.device)
            merged = (weight.float() + delta).to(weight.dtype)
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
        k = 1: the rank-1 terms of ``BA``). Used by :func:`surgeon.methods.mlae.expert_similarity`.
        """
        down, up = self.merged_factors("average")
        out, col = [], 0
        for name, r0, r1 in self.parts:
            rank = self.down[name].out_features
            out.append((name, down[col:col + rank], up[r0:r1, col:col + rank], self.rank_per_expert()))
            col += rank
        return out


class LoraLayer(LowRankLayer):
    """LoRA: ``ΔW = (α/r) · B A`` per group; MoSL / SparseLoRA when the rule splits or prunes A/B.

    State (per group ``s`` in ``all`` or ``q``/``k``/``v``): ``down.s`` (A ``[r, fan_in]``,
    kaiming-uniform a=√5) and ``up.s`` (B ``[d_s, r]``, zero), each a
    :class:`~surgeon.methods.matrices.Matrix` chosen by :func:`make_matrix` from the rule's
    ``experts`` (MoSL: A is ``down``, B is ``up``) or ``prune`` section.
    """

    method_name = "lora"

    def __init__(self, base_layer: nn.Module, ctx: PatchContext):
        cfg = ctx.rule["lora"]
        super().__init__(base_layer, cfg["slices"], cfg["dropout"])
        self.rank = cfg["rank"]
        self.alpha = cfg["alpha"] if cfg["alpha"] is not None else cfg["rank"]
        self.scaling = self.alpha / self.rank
        ref = base_layer.weight
        self.down, self.up = nn.ModuleDict(), nn.ModuleDict()
        for name, r0, r1 in self.parts:
            a = kaiming_uniform(self.rank, fan_in(base_layer), ctx.init_generator)
            b = torch.zeros(r1 - r0, self.rank)
            self.down[name] = make_matrix(a.to(ref.device, ref.dtype), "down", ctx.rule, ctx)
            self.up[name] = make_matrix(b.to(ref.device, ref.dtype), "up", ctx.rule, ctx)

    def coefficients(self) -> float:
        return self.scaling

    def merged_coefficients(self) -> float:
        return self.scaling

    def describe(self) -> str:
        where = "+".join(name for name, _, _ in self.parts)
        text = f"rank {self.rank}, alpha {self.alpha:g}" + ("" if where == WHOLE else f", {where}")
        for role, mats in (("A", self.down), ("B", self.up)):
            detail = next(iter(mats.values())).describe()
            if detail:
                text += f", {role}: {detail}"
        return text


def gaussian_down(rows: int, cols: int, std: float, generator: torch.Generator | None) -> torch.Tensor:
    """A ``[rows, cols]`` CPU tensor with i.i.d. ``N(0, std²)`` entries."""
    return torch.randn(rows, cols, generator=generator) * std


def lora_like_std(fan: int) -> float:
    """The std of ``nn.Linear``'s kaiming-uniform(a=√5) init, ``1/√(3·fan_in)``."""
    return 1.0 / math.sqrt(3 * fan)


__all__ = ["LoraLayer", "LowRankLayer", "SLICE_INDEX", "block_up", "fan_in", "gaussian_down", "lora_like_std",
           "module_problem", "slice_groups", "stack_down"]
