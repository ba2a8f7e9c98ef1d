"""The two small bases every method builds on, and the method registry.

- :class:`Method` turns one recipe rule into patches: it says whether it can patch a module
  and returns the module to put in its place.
- :class:`SurgeryLayer` is a module that wraps the original ``base_layer`` and adds the
  method's tensors. It knows its parameter count (the papers' definition) and how to merge
  itself back into plain modules.

A method registers itself under its recipe key with :func:`register`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, ClassVar

import torch
import torch.nn as nn


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
class PatchContext:
    """What a method may need to know while patching one module.

    Attributes:
        rule: the recipe rule (validated, defaults filled).
        rule_index: position of the rule in ``surgery``.
        layer_index: index of this module among the rule's matches (0-based, model order).
        num_layers: how many modules the rule matched (per-layer lists have this length).
        sampler: the model's shared :class:`ExpertSampler`.
        init_generator: seeded generator for surgery-time randomness (masks, pruning, init).
        root: the model being patched (to find a module's siblings, e.g. ``adapter.input_from``).
    """

    rule: dict
    rule_index: int
    layer_index: int
    num_layers: int
    sampler: ExpertSampler
    init_generator: torch.Generator
    root: nn.Module | None = None


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
    """Applies one kind of rule (its recipe ``key``) to modules.

    Subclasses implement :meth:`display_name`, :meth:`cannot_patch` and :meth:`patch`.
    """

    key: ClassVar[str] = ""

    def display_name(self, rule: dict) -> str:
        """The name shown in plans and reports (e.g. ``mosa`` for an adapter rule with experts)."""
        return self.key

    def cannot_patch(self, name: str, module: nn.Module, rule: dict) -> str | None:
        """Why this method cannot patch ``module`` (a sentence), or None if it can."""
        return None

    def patch(self, name: str, module: nn.Module, ctx: PatchContext) -> nn.Module:
        """Return the module that takes ``module``'s place (possibly ``module`` itself)."""
        raise NotImplementedError


METHODS: dict[str, Method] = {}


def register(cls: type[Method]) -> type[Method]:
    """Class decorator: make ``cls`` the method for recipe key ``cls.key``."""
    if not cls.key or cls.key in METHODS:
        raise RuntimeError(f"method key {cls.key!r} is empty or registered twice")
    METHODS[cls.key] = cls()
    return cls


def get_method(key: str) -> Method:
    _import_builtin_methods()
    return METHODS[key]


def _import_builtin_methods() -> None:
    # Import the method packages for their @register side effect (no-op once imported).
    from surgeon import methods  # noqa: F401
    for pkg in ("adapter", "lora", "mlae", "unfreeze"):
        __import__(f"surgeon.methods.{pkg}")


ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU}
