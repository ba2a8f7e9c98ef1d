"""Weight strategies composed onto surgery layers: dense, expert-split (MoSA/MoSL), pruned (Sparse*).

A *matrix* is a small module that owns the tensors of one linear map ``y = x Wᵀ + b`` and
hands out its **effective** weight ``[out, in]`` (and bias ``[out]``) for the current forward
pass. Layers (adapters' ``down``/``up``, LoRA's ``A``/``B``) hold matrices instead of raw
``nn.Parameter``s, so expert splitting and pruning are chosen per matrix by the recipe rule
(STYLE.md point 2: strategies, not subclass towers).

API (every class is an ``nn.Module`` subclass of :class:`Matrix`)::

    m = make_matrix(init_weight, role, rule, ctx, init_bias=None)   # picks the strategy
    w, b = m.effective()            # weight [out, in] or [G, out, in]; bias [out] / [G, out] / None
    y = m(x)                        # = apply_linear(x, *m.effective()); channels-last
    y = m(x, channel_dim=1)         # NCHW (1x1-conv formulation)
    w, b = m.merged("average")      # fp32, detached: the dense tensors after merging
    m.extra_params()                # papers' count: dense size (split), kept entries (pruned)
    m.num_experts                   # N for an ExpertSplitMatrix, else None
    m.describe()                    # e.g. "4 experts" / "keep 25%" / ""

Strategies:

- :class:`DenseMatrix`: plain trainable ``weight`` (and ``bias``).
- :class:`ExpertSplitMatrix` (METHODS.md §2): frozen buffer ``weight0`` (the dense init),
  one trainable ``delta`` of the same shape (zero at start) and a ``uint8`` buffer
  ``expert_index`` assigning every entry to one of N experts (random-quantile split).
  Expert ``i``'s weight is ``weight0 + delta ⊙ (expert_index == i)``: memory does not grow
  with N and every parameter takes part in every step (the gradient mask is implicit).
  Merge: ``average`` ``weight0 + delta / N``; ``jigsaw`` ``weight0 + delta``.
- :class:`PrunedMatrix` (SparseAdapter/SparseLoRA): trainable ``weight`` and a fixed boolean
  ``mask`` buffer (bias pruned likewise, or dense); pruned entries are zero and stay zero
  (``pruned: zero``) or keep their random init, untrained (``pruned: frozen``, the published
  MoSA baselines).

Which expert is used (ExpertSplitMatrix only) follows the model's shared
:class:`~surgeon.methods.base.ExpertSampler` (``ctx.sampler``):

- training mode: every forward draws uniformly from ``sampler.randint`` (one draw per split
  matrix per forward; down and up draw separately);
- eval mode: ``sampler.mode`` = ``merge`` (the merged weight of ``sampler.merge_mode``),
  ``stochastic`` (draw as in training) or ``fixed`` (expert ``sampler.expert``);
- when drawing and ``sampler.groups`` = G > 1, G experts are drawn and ``effective()``
  returns stacked weights ``[G, out, in]``: :func:`apply_linear` applies expert g to the
  g-th contiguous slice of the batch (batched consistency: one forward of 2B samples).

Randomness at surgery time (scores for splits and pruning) comes from ``ctx.init_generator``
so the masks are reproducible from the recipe's seed; masks are persistent buffers and are
saved with the run.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from surgeon.methods.base import ExpertSampler, PatchContext
from surgeon.methods.registry import Rule

GRANULARITIES = ("all", "row", "column")
MAX_EXPERTS = 255  # the expert index is stored as uint8


# --------------------------------------------------------------------------- helpers

def kaiming_uniform(out_features: int, in_features: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """A ``[out, in]`` CPU weight initialised like ``nn.Linear`` (kaiming-uniform, a=√5)."""
    w = torch.empty(out_features, in_features)
    nn.init.kaiming_uniform_(w, a=math.sqrt(5), generator=generator)
    return w


def random_quantile_index(shape: tuple[int, ...], num_experts: int, granularity: str = "all",
                          generator: torch.Generator | None = None) -> torch.Tensor:
    """Assign every entry of a tensor of ``shape`` to one of ``num_experts`` experts.

    Scores ``S ~ U(0,1)`` of ``shape`` are cut at their N-quantiles (METHODS.md §2, paper
    Eq. 3): the entry of rank ``k`` among the ``n`` compared entries goes to expert
    ``floor(k·N / n)``, so the masks are disjoint, covering and their sizes differ by at most
    one. The ranks of i.i.d. uniform scores are a uniformly random permutation, so for
    ``all`` (and 1-D tensors) we draw that permutation directly (``randperm``: the same
    distribution, no sort); ``row``/``column`` rank the scores along one dimension.

    Args:
        shape: ``[out, in]`` for a weight, ``[out]`` for a bias.
        granularity: ``all`` ranks over the whole tensor; ``row`` within each row (each
            output unit gets ≈1/N of its inputs per expert); ``column`` within each column.
            A 1-D tensor is always ranked as a whole.
        generator: CPU generator (``ctx.init_generator``).

    Returns:
        ``uint8`` CPU tensor of ``shape`` with values in ``[0, N)``.
    """
    if not 2 <= num_experts <= MAX_EXPERTS:
        raise ValueError(f"experts.count must be between 2 and {MAX_EXPERTS}, got {num_experts}")
    if granularity not in GRANULARITIES:
        raise ValueError(f"granularity must be one of {GRANULARITIES}, got {granularity!r}")
    if len(shape) == 1 or granularity == "all":
        numel = math.prod(shape)
        pattern = _quantile_pattern(numel, num_experts)               # expert of rank k
        return pattern[torch.randperm(numel, generator=generator)].reshape(shape)
    dim = 1 if granularity == "row" else 0
    order = torch.rand(shape, generator=generator).argsort(dim=dim)   # order[.., j] = entry of rank j
    pattern = _quantile_pattern(shape[dim], num_experts)
    pattern = pattern.reshape([-1 if d == dim else 1 for d in range(2)]).expand_as(order)
    return torch.empty(shape, dtype=torch.uint8).scatter_(dim, order, pattern)


def _quantile_pattern(n: int, num_experts: int) -> torch.Tensor:
    """``uint8 [n]``: expert ``floor(k·N / n)`` for rank ``k`` (non-decreasing, balanced)."""
    bounds = [(i * n + num_experts - 1) // num_experts for i in range(num_experts + 1)]  # first k with floor(kN/n) >= i
    sizes = torch.tensor([b - a for a, b in zip(bounds, bounds[1:])])
    # output_size: known anyway, and it lets the meta device (planning) build the pattern too.
    return torch.repeat_interleave(torch.arange(num_experts, dtype=torch.uint8), sizes, output_size=n)


def kept_count(numel: int, keep: float) -> int:
    """How many of ``numel`` entries a ``keep`` fraction keeps: ``round(keep·numel)``, at least 1."""
    return max(1, min(numel, round(keep * numel)))


def random_keep_mask(shape: tuple[int, ...], keep: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """A boolean CPU mask of ``shape`` keeping :func:`kept_count` uniformly random entries."""
    if not 0 < keep <= 1:
        raise ValueError(f"prune.keep must be in (0, 1], got {keep}")
    numel = math.prod(shape)
    mask = torch.zeros(numel, dtype=torch.bool)
    mask[torch.randperm(numel, generator=generator)[:kept_count(numel, keep)]] = True
    return mask.reshape(shape)


def apply_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 channel_dim: int = -1) -> torch.Tensor:
    """``x Wᵀ + b`` over ``x``'s channel dimension, for one weight or one per batch group.

    Args:
        x: ``[B, ..., in]`` (``channel_dim=-1``, channels-last: ViT tokens, Swin/ConvNeXt NHWC)
            or ``[B, in, ...]`` (``channel_dim=1``, NCHW conv features).
        weight: ``[out, in]``, or ``[G, out, in]``: expert g applies to batch rows
            ``g·B/G … (g+1)·B/G - 1`` (B must be divisible by G).
        bias: ``[out]``, ``[G, out]`` or None.

    Returns:
        ``x`` with its channel dimension mapped from ``in`` to ``out``.
    """
    if channel_dim not in (-1, 1):
        raise ValueError("channel_dim must be -1 (channels-last) or 1 (NCHW)")
    if weight.dim() == 2:
        if channel_dim == -1 or x.dim() == 2:
            return F.linear(x, weight, bias)
        if x.dim() == 4:  # NCHW: a 1x1 convolution, no permute
            return F.conv2d(x, weight[:, :, None, None], bias)
        y = torch.einsum("bc...,oc->bo...", x, weight)
        return y if bias is None else y + bias.reshape(1, -1, *([1] * (x.dim() - 2)))
    groups = weight.shape[0]
    batch = x.shape[0]
    if batch % groups:
        raise ValueError(f"batch size {batch} is not divisible by the {groups} expert groups")
    if channel_dim == -1:
        xg = x.reshape(groups, -1, x.shape[-1])                         # [G, B/G·…, in]
        y = torch.bmm(xg, weight.transpose(1, 2))                        # [G, B/G·…, out]
        if bias is not None:
            y = y + bias[:, None, :]
        return y.reshape(*x.shape[:-1], weight.shape[1])
    xg = x.reshape(groups, batch // groups, x.shape[1], -1)              # [G, B/G, in, P]
    y = torch.einsum("gbcp,goc->gbop", xg, weight)
    if bias is not None:
        y = y + bias[:, None, :, None]
    return y.reshape(batch, weight.shape[1], *x.shape[2:])


# --------------------------------------------------------------------------- strategies

class Matrix(nn.Module):
    """One linear map's tensors; see the module docstring for the API.

    Attributes:
        role: ``"down"`` or ``"up"`` (LoRA: A is down, B is up).
        out_features, in_features: the weight is ``[out_features, in_features]``.
        num_experts: N for expert-split matrices, else None.
    """

    num_experts: int | None = None

    def __init__(self, role: str, out_features: int, in_features: int):
        super().__init__()
        self.role = role
        self.out_features = out_features
        self.in_features = in_features

    def effective(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """``(weight, bias)`` for this forward pass (draws experts where applicable)."""
        raise NotImplementedError

    def merged(self, mode: str = "average") -> tuple[torch.Tensor, torch.Tensor | None]:
        """Dense fp32 ``(weight [out, in], bias [out] | None)`` after merging, detached."""
        raise NotImplementedError

    def extra_params(self) -> int:
        """Trainable parameters as the papers count them."""
        raise NotImplementedError

    def describe(self) -> str:
        return ""

    def forward(self, x: torch.Tensor, channel_dim: int = -1) -> torch.Tensor:
        weight, bias = self.effective()
        return apply_linear(x, weight, bias, channel_dim)

    def extra_repr(self) -> str:
        return f"{self.role}: {self.in_features} -> {self.out_features}" + (f", {self.describe()}" if self.describe() else "")


class DenseMatrix(Matrix):
    """A plain trainable weight ``[out, in]`` (parameter ``weight``) and optional ``bias``."""

    def __init__(self, role: str, init_weight: torch.Tensor, init_bias: torch.Tensor | None = None):
        super().__init__(role, *init_weight.shape)
        self.weight = nn.Parameter(init_weight.detach().clone())
        self.bias = nn.Parameter(init_bias.detach().clone()) if init_bias is not None else None

    def effective(self):
        return self.weight, self.bias

    def merged(self, mode: str = "average"):
        return self.weight.detach().float().clone(), None if self.bias is None else self.bias.detach().float().clone()

    def extra_params(self) -> int:
        return self.weight.numel() + (0 if self.bias is None else self.bias.numel())


class ExpertSplitMatrix(Matrix):
    """MoSA/MoSL split matrix: expert ``i`` = ``weight0 + delta ⊙ (expert_index == i)``.

    State (all persistent, saved with the run): buffer ``weight0`` ``[out, in]`` (the dense
    init, frozen), parameter ``delta`` ``[out, in]`` (zero at start), buffer ``expert_index``
    ``uint8 [out, in]``. Bias (``bias_mode``):

    - ``per_expert`` (the published default, ``MODEL.ADAPTER.BIAS=True``): every expert owns a
      full bias, buffer ``bias0 [out]`` + parameter ``bias_delta [N, out]`` (zero at start);
      expert ``i`` uses ``bias0 + bias_delta[i]``, so a row is trained only when its expert is
      drawn; merging averages the N biases (both modes: a full bias has no entries to jigsaw);
    - ``split`` (published ``BIAS=False``): ``bias0``/``bias_index`` buffers + ``bias_delta [out]``,
      split into experts like the weight;
    - ``dense``: one shared trainable ``bias``.

    Weight decay (``decay``): ``toward_init`` decays ``delta`` toward 0, i.e. every expert toward
    its initial ``weight0``. ``toward_zero`` is what the published implementation's N adapter
    copies get from AdamW: every copy's *whole* weight decays toward 0 each step — the entries
    it trains (``weight0 + delta`` on its mask: :meth:`decay_`) and the ones it never trains
    (``copy_decay · weight0`` elsewhere: a persistent scalar buffer ``copy_decay``, 1 at start,
    multiplied by ``1 - lr·wd`` per step). With ``weight0 = 0`` (MoSA's up-projection) the two
    are the same numbers; they differ for a split down-projection (flat MoSA, MoSL's A).
    """

    def __init__(self, role: str, init_weight: torch.Tensor, num_experts: int, sampler: ExpertSampler, *,
                 granularity: str = "all", init_bias: torch.Tensor | None = None, bias_mode: str = "dense",
                 decay: str = "toward_init", generator: torch.Generator | None = None):
        super().__init__(role, *init_weight.shape)
        device = init_weight.device
        self.num_experts = num_experts
        self.granularity = granularity
        self.sampler = sampler  # shared, plain attribute (not a submodule, not state)
        self.register_buffer("weight0", init_weight.detach().clone())
        self.delta = nn.Parameter(torch.zeros_like(init_weight))
        index = random_quantile_index(tuple(init_weight.shape), num_experts, granularity, generator)
        self.register_buffer("expert_index", index.to(device))
        if decay not in ("toward_init", "toward_zero"):
            raise ValueError(f"experts.decay must be 'toward_init' or 'toward_zero', got {decay!r}")
        self.decay = decay
        if decay == "toward_zero":
            self.register_buffer("copy_decay", torch.ones((), device=device, dtype=torch.float32))
        self.bias_mode = bias_mode if init_bias is not None else "none"
        self.bias = None
        if self.bias_mode == "dense":
            self.bias = nn.Parameter(init_bias.detach().clone())
        elif self.bias_mode == "split":
            self.register_buffer("bias0", init_bias.detach().clone())
            self.bias_delta = nn.Parameter(torch.zeros_like(init_bias))
            bias_index = random_quantile_index(tuple(init_bias.shape), num_experts, "all", generator)
            self.register_buffer("bias_index", bias_index.to(device))
        elif self.bias_mode == "per_expert":
            self.register_buffer("bias0", init_bias.detach().clone())
            self.bias_delta = nn.Parameter(init_bias.new_zeros(num_experts, *init_bias.shape))
        elif self.bias_mode != "none":
            raise ValueError(f"experts.bias must be 'per_expert', 'split' or 'dense', got {bias_mode!r}")

    # Which experts this forward uses: None = merged weight; else a CPU long tensor [G].
    def _draw(self) -> torch.Tensor | None:
        s = self.sampler
        if self.training or s.mode == "stochastic":
            return s.randint(self.num_experts, max(1, s.groups))
        if s.mode == "fixed":
            if not 0 <= s.expert < self.num_experts:
                raise ValueError(f"expert {s.expert} does not exist: this layer has {self.num_experts} experts (0-based)")
            return torch.tensor([s.expert])
        return None

    def _untrained(self, base: torch.Tensor, decayed: bool) -> torch.Tensor:
        """What an expert holds on the entries it does not train: ``weight0``, or
        ``copy_decay · weight0`` under ``decay: toward_zero`` (weights only: biases take no decay)."""
        return base * self.copy_decay.to(base.dtype) if decayed and self.decay == "toward_zero" else base

    def _select(self, base: torch.Tensor, delta: torch.Tensor, index: torch.Tensor, experts: torch.Tensor,
                decayed: bool = True) -> torch.Tensor:
        # One fused elementwise op, no loop over experts: base + delta on the chosen expert's entries.
        other = self._untrained(base, decayed)
        if experts.numel() == 1:
            return torch.where(index == int(experts), base + delta, other)
        chosen = experts.to(index.device, non_blocking=True).to(index.dtype)
        chosen = chosen.reshape(-1, *([1] * index.dim()))                 # [G, 1, ...]
        return torch.where(index.unsqueeze(0) == chosen, base + delta, other)  # [G, *shape]

    def _merge_formula(self, base: torch.Tensor, delta: torch.Tensor, mode: str, decayed: bool = True) -> torch.Tensor:
        if mode == "average":
            if decayed and self.decay == "toward_zero":
                # Each entry is trained by one expert (W0 + D) and held by N - 1 others (c · W0).
                c = self.copy_decay.to(base.dtype)
                return base * ((1 + (self.num_experts - 1) * c) / self.num_experts) + delta / self.num_experts
            return base + delta / self.num_experts
        if mode == "jigsaw":
            return base + delta
        raise ValueError(f"merge mode must be 'average' or 'jigsaw', not {mode!r}")

    def _bias(self, experts: torch.Tensor | None, groups: int) -> torch.Tensor | None:
        if self.bias_mode == "dense":
            if experts is None or experts.numel() == 1:
                return self.bias
            return self.bias.expand(groups, -1)
        if self.bias_mode == "split":
            if experts is None:
                return self._merge_formula(self.bias0, self.bias_delta, self.sampler.merge_mode, decayed=False)
            return self._select(self.bias0, self.bias_delta, self.bias_index, experts, decayed=False)
        if self.bias_mode == "per_expert":
            if experts is None:
                return self.bias0 + self.bias_delta.mean(0)
            if experts.numel() == 1:
                return self.bias0 + self.bias_delta[int(experts)]
            return self.bias0 + self.bias_delta[experts.to(self.bias_delta.device, non_blocking=True)]  # [G, out]
        return None

    def effective(self):
        experts = self._draw()
        if experts is None:
            weight = self._merge_formula(self.weight0, self.delta, self.sampler.merge_mode)
        else:
            weight = self._select(self.weight0, self.delta, self.expert_index, experts)
        return weight, self._bias(experts, 1 if experts is None else experts.numel())

    def expert_weight(self, i: int) -> torch.Tensor:
        """Expert ``i``'s effective weight ``[out, in]`` (for analysis and tests)."""
        return self._select(self.weight0, self.delta, self.expert_index, torch.tensor([i]))

    def expert_bias(self, i: int) -> torch.Tensor | None:
        """Expert ``i``'s effective bias ``[out]`` (None without a bias)."""
        return self._bias(torch.tensor([i]), 1)

    @torch.no_grad()
    def decay_(self, factor: float) -> None:
        """One step of ``decay: toward_zero`` weight decay with ``factor = lr · weight_decay``:
        every expert's trained entries ``weight0 + delta`` and held entries ``copy_decay · weight0``
        shrink by ``1 - factor`` (what AdamW does to each of the published N copies)."""
        self.delta.mul_(1 - factor).sub_(self.weight0, alpha=factor)
        self.copy_decay.mul_(1 - factor)

    def merged(self, mode: str = "average"):
        weight = self._merge_formula(self.weight0.detach().float(), self.delta.detach().float(), mode)
        if self.bias_mode == "dense":
            bias = self.bias.detach().float().clone()
        elif self.bias_mode == "split":
            bias = self._merge_formula(self.bias0.detach().float(), self.bias_delta.detach().float(), mode, decayed=False)
        elif self.bias_mode == "per_expert":
            bias = self.bias0.detach().float() + self.bias_delta.detach().float().mean(0)
        else:
            bias = None
        return weight, bias

    def extra_params(self) -> int:
        # The N experts share one budget: the dense size counts once (METHODS.md §1).
        return self.out_features * self.in_features + (self.out_features if self.bias_mode != "none" else 0)

    def describe(self) -> str:
        return f"{self.num_experts} experts"

    def extra_repr(self) -> str:
        return super().extra_repr() + f", granularity={self.granularity}, bias={self.bias_mode}, decay={self.decay}"


class PrunedMatrix(Matrix):
    """SparseAdapter/SparseLoRA matrix: parameter ``weight`` ``[out, in]`` and a fixed boolean ``mask``.

    Two semantics for the pruned entries (``pruned``):

    - ``zero`` (the SparseAdapter paper): the parameter is zero there from the start and its
      gradient there is zero, so AdamW (moments 0, decay of 0 is 0) keeps it exactly zero; the
      effective weight ``weight * mask`` is zero there regardless;
    - ``frozen`` (the published MoSA baselines, which only mask gradients): the parameter keeps
      its initial values everywhere; pruned entries get no gradient
      (``where(mask, weight, weight.detach())``), so they keep their random init — up to the
      optimizer's decoupled weight decay, which shrinks them as it does in the published code.

    The bias is pruned to the same kept fraction with its own mask (``bias_mode="pruned"``,
    buffer ``bias_mask``: the papers' counts, e.g. 0.79M for SparseAdapter-64 on ViT-L, need it)
    or kept dense (``"dense"``).
    """

    def __init__(self, role: str, init_weight: torch.Tensor, keep: float, *,
                 init_bias: torch.Tensor | None = None, bias_mode: str = "pruned", pruned: str = "zero",
                 generator: torch.Generator | None = None):
        super().__init__(role, *init_weight.shape)
        if bias_mode not in ("pruned", "dense"):
            raise ValueError(f"prune.bias must be 'pruned' or 'dense', got {bias_mode!r}")
        if pruned not in ("zero", "frozen"):
            raise ValueError(f"prune.pruned must be 'zero' or 'frozen', got {pruned!r}")
        device = init_weight.device
        mask = random_keep_mask(tuple(init_weight.shape), keep, generator)
        self.keep = keep
        self.pruned = pruned
        self.kept = kept_count(mask.numel(), keep)  # Python ints, so counting works on the meta device too
        self.register_buffer("mask", mask.to(device))
        self.weight = nn.Parameter(self._initial(init_weight, self.mask))
        self.bias_mode = bias_mode if init_bias is not None else "none"
        self.bias = None
        if init_bias is not None:
            if bias_mode == "pruned":
                bias_mask = random_keep_mask(tuple(init_bias.shape), keep, generator)
                self.kept += kept_count(bias_mask.numel(), keep)
                self.register_buffer("bias_mask", bias_mask.to(device))
                self.bias = nn.Parameter(self._initial(init_bias, self.bias_mask))
            else:
                self.kept += init_bias.numel()
                self.bias = nn.Parameter(init_bias.detach().clone())

    def _initial(self, init: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return init.detach().clone() * mask if self.pruned == "zero" else init.detach().clone()

    def _masked(self, value: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if self.pruned == "zero":
            return value * mask
        return torch.where(mask, value, value.detach())  # frozen: no gradient on pruned entries

    def _effective_bias(self) -> torch.Tensor | None:
        return self._masked(self.bias, self.bias_mask) if self.bias_mode == "pruned" else self.bias

    def effective(self):
        return self._masked(self.weight, self.mask), self._effective_bias()

    def merged(self, mode: str = "average"):
        weight, bias = self.effective()
        return weight.detach().float().clone(), None if bias is None else bias.detach().float().clone()

    def extra_params(self) -> int:
        return self.kept

    def describe(self) -> str:
        return f"keep {self.keep:.0%}" + (", pruned frozen" if self.pruned == "frozen" else "")


# --------------------------------------------------------------------------- factory

def make_matrix(init_weight: torch.Tensor, role: str, rule: Rule, ctx: PatchContext,
                init_bias: torch.Tensor | None = None) -> Matrix:
    """The matrix strategy the rule asks for, holding ``init_weight`` (and ``init_bias``).

    - ``rule.experts`` present and ``role`` in ``experts.sparse`` → :class:`ExpertSplitMatrix`
      (``count``, ``granularity``, ``bias``, ``decay``), drawing from ``ctx.sampler``;
    - ``rule.prune`` present and ``role`` in ``prune.matrices`` → :class:`PrunedMatrix`
      (``keep``, ``bias``, ``pruned``);
    - otherwise → :class:`DenseMatrix`.

    Args:
        init_weight: the dense initial weight ``[out, in]`` on the target device (e.g. from
            :func:`kaiming_uniform` with ``ctx.init_generator``, or zeros).
        role: ``"down"`` or ``"up"``.
        rule: the typed rule (:func:`surgeon.recipe.rule` builds one from a partial mapping).
        ctx: the patch context (sampler, init generator).
        init_bias: initial bias ``[out]`` or None for a bias-free map.

    Raises:
        ValueError: experts and prune in one rule, or a bad count/granularity/keep.
    """
    if role not in ("down", "up"):
        raise ValueError(f"role must be 'down' or 'up', got {role!r}")
    experts, prune = rule.experts, rule.prune
    if experts is not None and prune is not None:
        raise ValueError("a rule takes either experts (MoSA) or prune (SparseAdapter/SparseLoRA), not both")
    if experts is not None and role in experts.sparse:
        return ExpertSplitMatrix(role, init_weight, int(experts.count), ctx.sampler,
                                 granularity=experts.granularity, init_bias=init_bias,
                                 bias_mode=experts.bias, decay=experts.decay, generator=ctx.init_generator)
    if prune is not None and role in prune.matrices:
        if prune.score != "random":
            raise ValueError(f"prune.score {prune.score!r} is not supported (only 'random')")
        return PrunedMatrix(role, init_weight, float(prune.keep), init_bias=init_bias,
                            bias_mode=prune.bias, pruned=prune.pruned, generator=ctx.init_generator)
    return DenseMatrix(role, init_weight, init_bias)


__all__ = ["DenseMatrix", "ExpertSplitMatrix", "Matrix", "PrunedMatrix", "apply_linear", "kaiming_uniform", "kept_count",
           "make_matrix", "random_keep_mask", "random_quantile_index"]
