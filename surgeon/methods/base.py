"""The two small bases every method builds on, and how a method's implementation is found.

- :class:`Method` turns one recipe rule into patches: it says whether it can patch a module,
  prepares what the rule's modules share (:meth:`Method.prepare`) and returns the module to
  put in each one's place.
- :class:`SurgeryLayer` is a module that wraps the original ``base_layer`` and adds the
  method's tensors. It knows its parameter count (the papers' definition) and how to merge
  itself back into plain modules.

A method's implementation is ``METHOD`` in ``surgeon/methods/<key>/method.py``;
:func:`get_method` loads it for a key of the registry (:mod:`surgeon.methods.registry`).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Callable, ClassVar

import torch
import torch.nn as nn

from surgeon.methods.registry import Rule, method_specs


@dataclass
class ExpertSampler:
    """Shared, seeded source of MoSA expert draws and MLAE masks for one model.

    All surgery layers of a model hold the same sampler, so one generator state (saved in
    checkpoints) reproduces every draw. ``mode`` says how expert layers behave in eval mode:
    ``merge`` (the merged weight), ``stochastic`` (draw per forward), ``fixed`` (expert
    ``expert``). In training mode they always draw. ``groups`` > 1 makes each layer draw one
    expert per batch group (the batched consistency pass of 2B = two groups of B).
    """

    seed: int = 0
    mode: str = "merge"
    expert: int = 0
    merge_mode: str = "average"
    groups: int = 1
    generator: torch.Generator = field(init=False, repr=False)

    def __post_init__(self):
        self.generator = torch.Generator(device="cpu")
        self.generator.manual_seed(self.seed)

    def randint(self, high: int, size: int = 1) -> torch.Tensor:
        """``size`` uniform integers in [0, high) from the shared generator (CPU tensor)."""
        return torch.randint(high, (size,), generator=self.generator)

    def rand(self, size: int) -> torch.Tensor:
        """``size`` uniform floats in [0, 1) from the shared generator (CPU tensor)."""
        return torch.rand(size, generator=self.generator)

    def state_dict(self) -> dict:
        return {"generator": self.generator.get_state(), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        self.generator.set_state(state["generator"])


@dataclass
class RuleContext:
    """What a method may need to know while preparing one rule (:meth:`Method.prepare`).

    Attributes:
        rule: the typed rule.
        rule_index: position of the rule in ``surgery``.
        matches: ``[(name, module)]`` the rule will patch, in model order.
        sampler: the model's shared :class:`ExpertSampler` (``sampler.seed`` is the run seed).
        init_generator: seeded generator for surgery-time randomness.
        root: the model being patched.
    """

    rule: Rule
    rule_index: int
    matches: list[tuple[str, nn.Module]]
    sampler: ExpertSampler
    init_generator: torch.Generator
    root: nn.Module | None = None


@dataclass
class PatchContext:
    """What a method may need to know while patching one module.

    Attributes:
        rule: the typed rule (:class:`~surgeon.methods.registry.Rule`).
        rule_index: position of the rule in ``surgery``.
        layer_index: index of this module among the rule's matches (0-based, model order).
        num_layers: how many modules the rule matched (per-layer lists have this length).
        sampler: the model's shared :class:`ExpertSampler`.
        init_generator: seeded generator for surgery-time randomness (masks, pruning, init).
        root: the model being patched (to find a module's siblings, e.g. ``adapter.input_from``).
        state: what the method's :meth:`Method.prepare` returned for this rule (None by default).
        rows: ``{part: ((first row, end row), ...)}`` when a semantic target adapts only parts of
            this module's output rows (q and v of a fused projection), else None. Only methods
            with :attr:`Method.takes_rows` get one.
    """

    rule: Rule
    rule_index: int
    layer_index: int
    num_layers: int
    sampler: ExpertSampler
    init_generator: torch.Generator
    root: nn.Module | None = None
    state: Any = None
    rows: dict[str, tuple[tuple[int, int], ...]] | None = None


class SurgeryLayer(nn.Module):
    """A module wrapping ``base_layer`` (the original timm module) plus the method's tensors.

    Subclasses implement ``forward``, :meth:`extra_params` and :meth:`merge`. The driver
    counts calls of ``forward`` (and of ``weight`` reads for layers that expose one) to prove
    that the surgery takes effect.
    """

    method_name: ClassVar[str] = "surgery"
    #: True for the dense result of a merge (e.g. a merged MoSA adapter): merge() leaves it be.
    merged_layer: ClassVar[bool] = False

    def __init__(self, base_layer: nn.Module):
        super().__init__()
        self.base_layer = base_layer
        self.probe_hits = 0  # incremented by the driver's probe; plain int, not state

    def __getattr__(self, name: str):
        # Parents may read plain attributes of the wrapped module (a Linear's in_features, Hiera's
        # attn.q_stride, attn.num_heads): the wrapper answers with the base module's.
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Never for a weight: a parent computing with the base weight would bypass the surgery.
            if name in ("base_layer", "weight", "bias"):
                raise
            return getattr(self.base_layer, name)

    def extra_params(self) -> int:
        """Trainable parameters added by this layer, as the papers count them ("Params (M)")."""
        raise NotImplementedError

    def merge(self, mode: str = "average") -> nn.Module:
        """The module that replaces this one after merging (fp32 arithmetic).

        Weight-folding methods return ``base_layer`` with the delta added to its weight, so
        the model's state dict gets plain timm keys back; adapter methods return a dense
        adapter layer.
        """
        raise NotImplementedError

    def describe(self) -> str:
        """Short human description for plan tables, e.g. ``bottleneck 64, 4 experts [up]``."""
        return ""


class Method:
    """Applies one kind of rule (its recipe ``key``) to modules: the torch side of a method.

    Subclasses implement :meth:`patch`, and :meth:`cannot_patch` / :meth:`prepare` when needed.
    Plan names, checks and descriptions are the method's spec (:mod:`surgeon.methods.registry`).
    """

    key: ClassVar[str] = ""
    #: True when merging folds the method into existing weights (the merged model is plain timm).
    folds: ClassVar[bool] = True
    #: True for methods that train the matched modules' own parameters (``unfreeze``): they may
    #: match the classifier head, and matched modules they cannot patch are skipped, not errors.
    trains_own_parameters: ClassVar[bool] = False
    #: True for methods that can adapt only some output rows of a layer (``PatchContext.rows``: the
    #: q/k/v parts of a fused projection a semantic target names), i.e. the low-rank family.
    takes_rows: ClassVar[bool] = False

    def cannot_patch(self, name: str, module: nn.Module, rule: Rule) -> str | None:
        """Why this method cannot patch ``module`` (a sentence), or None if it can."""
        return None

    def prepare(self, ctx: RuleContext) -> Any:
        """Per-rule state, computed once before the rule's modules are patched and handed to
        each :meth:`patch` as ``ctx.state`` (e.g. MLAE's per-layer expert allocation).

        Raises:
            ValueError: the rule cannot apply to its matches (reported at the rule).
        """
        return None

    def patch(self, name: str, module: nn.Module, ctx: PatchContext) -> nn.Module:
        """Return the module that takes ``module``'s place (possibly ``module`` itself)."""
        raise NotImplementedError

    def nothing_to_patch(self, selector: str, rule: Rule) -> str:
        """The message when a :attr:`trains_own_parameters` method finds nothing to train."""
        return f"'{selector}' matches no module this method can train"


@lru_cache(maxsize=None)
def get_method(key: str) -> Method:
    """The :class:`Method` of a registered recipe key (``surgeon/methods/<key>/method.py``)."""
    if key not in method_specs():
        raise KeyError(f"no method {key!r}; known: {', '.join(method_specs())}")
    method = importlib.import_module(f"surgeon.methods.{key}.method").METHOD
    if not isinstance(method, Method) or method.key != key:
        raise RuntimeError(f"surgeon/methods/{key}/method.py must define METHOD, a Method with key {key!r}")
    return method


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}
