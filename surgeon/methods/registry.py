"""The method registry: the one place that knows which surgery methods exist.

A method is a folder ``surgeon/methods/<key>/`` whose ``spec.py`` defines ``SPEC``, a
:class:`MethodSpec`: the recipe key (the folder's name), the JSON Schema of the rule section,
the frozen config dataclass it becomes, which modifiers it takes (``experts``, ``prune``), its
static checks, its name in plans and its sentence in reports. Everything here is import-light
(no torch): the recipe schema, ``surgeon show`` and ``validate`` are built from it.

The torch side of a method (the :class:`~surgeon.methods.base.Method` that patches modules) is
its folder's ``method.py``, loaded by :func:`surgeon.methods.base.get_method` when a model is
built. Adding a method = one folder (``spec.py`` + ``method.py``) + a recipe + its tests;
nothing else lists methods.
"""
from __future__ import annotations

import importlib
import pkgutil
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, Callable, ClassVar

from surgeon.config import build

from . import modifiers as mod
from .modifiers import ExpertsConfig, PruneConfig
from .targets import SemanticTarget, build_target, target_markdown

Problem = tuple[str, str, str, "str | None"]
Where = Callable[[tuple], str]


@dataclass(frozen=True)
class Rule:
    """One validated surgery rule: its selector, its method and that method's typed config.

    Attributes:
        target: a selector (glob or ``re:``), a tuple of them, or a
            :class:`~surgeon.methods.targets.SemanticTarget`.
        method: the recipe key of the rule's method (``adapter``, ``lora``, ...).
        config: the method's config (its spec's ``config_type``; a plain string for ``unfreeze``).
        experts, prune: the modifiers, None when absent.
    """

    target: str | tuple[str, ...] | SemanticTarget
    method: str
    config: Any
    experts: ExpertsConfig | None = None
    prune: PruneConfig | None = None

    @property
    def spec(self) -> "MethodSpec":
        return get_spec(self.method)


class MethodSpec:
    """What the recipe layer knows of one method. Subclass it in ``<folder>/spec.py`` as ``SPEC``.

    Attributes:
        key: the recipe key; must be the folder's name.
        schema: the JSON Schema of the rule section. An object schema goes to the published
            schema's ``$defs`` under ``key``; any other (``unfreeze``'s string) is written inline.
        config_type: the frozen dataclass a validated section becomes (None: the value itself).
        modifiers: the rule-level modifiers it accepts (``experts``, ``prune``).
        matrix_names: how reports name its down/up matrices (modifier descriptions).
        matrix_biases: whether its matrices have biases (modifier descriptions).
    """

    key: ClassVar[str] = ""
    schema: ClassVar[dict] = {}
    config_type: ClassVar[type | None] = None
    modifiers: ClassVar[frozenset[str]] = frozenset()
    matrix_names: ClassVar[tuple[str, str]] = ("down-projection", "up-projection")
    matrix_biases: ClassVar[bool] = True

    def parse(self, value) -> Any:
        """The typed config of a validated, defaults-filled rule section."""
        return value if self.config_type is None else build(self.config_type, value)

    def display_name(self, rule: Rule) -> str:
        """The name plans and reports show (e.g. ``mosa`` for an adapter rule with experts)."""
        return self.key

    def is_stochastic(self, rule: Rule) -> bool:
        """Whether the method itself draws at random in training (masking, dropout); experts
        are counted by the checks whatever the method."""
        return False

    def problems(self, rule: Rule, at: tuple, where: Where) -> list[Problem]:
        """Contradictions in the rule the schema cannot express, ``(where, field, message, hint)``;
        ``at`` is ``("surgery", i)``."""
        return []

    def describe(self, rule: Rule) -> str:
        """The method part of the rule's sentence in reports."""
        raise NotImplementedError


@lru_cache(maxsize=1)
def method_specs() -> dict[str, MethodSpec]:
    """Recipe key -> spec of every method folder, sorted by key (the order schemas and messages
    list them in).

    Raises:
        RuntimeError: a folder whose ``SPEC`` is missing or has another key (a bug in surgeon).
    """
    specs: dict[str, MethodSpec] = {}
    folder = Path(__file__).resolve().parent
    for info in sorted(pkgutil.iter_modules([str(folder)]), key=lambda i: i.name):
        if not info.ispkg or not (folder / info.name / "spec.py").is_file():
            continue
        spec = getattr(importlib.import_module(f"{__package__}.{info.name}.spec"), "SPEC", None)
        if not isinstance(spec, MethodSpec) or spec.key != info.name:
            raise RuntimeError(f"surgeon/methods/{info.name}/spec.py must define SPEC, a MethodSpec with key "
                               f"{info.name!r}")
        specs[spec.key] = spec
    return specs


def method_keys() -> list[str]:
    """The recipe keys of every method, sorted."""
    return list(method_specs())


def get_spec(key: str) -> MethodSpec:
    return method_specs()[key]


def rule_method(rule: dict) -> str | None:
    """The method key of a rule mapping (the first one it has), or None."""
    return next((k for k in method_specs() if k in rule), None)


def accepting(modifier: str) -> list[str]:
    """The method keys that take ``modifier`` (``experts`` or ``prune``)."""
    return [k for k, s in method_specs().items() if modifier in s.modifiers]


def parse_rule(data: dict) -> Rule:
    """A :class:`Rule` from a validated, defaults-filled rule mapping."""
    key = rule_method(data)
    assert key is not None, f"a validated rule has no method: {sorted(data)}"
    parts = {name: build(cls, data[name]) for name, (cls, _) in mod.MODIFIERS.items() if name in data}
    return Rule(target=build_target(data["target"]), method=key, config=get_spec(key).parse(data[key]), **parts)


def rule_problems(rule: Rule, at: tuple, where: Where, *, optimizer: str) -> list[Problem]:
    """Every static problem of one rule: its modifiers, its method's own checks, the experts'
    decay against the optimizer."""
    out = mod.structure_problems(rule.method, rule.experts, rule.prune, at, where,
                                 accepting("experts"), accepting("prune"))
    out += target_problems(rule, at, where)
    out += rule.spec.problems(rule, at, where)
    out += mod.training_problems(rule.experts, optimizer, at, where)
    return out


def target_problems(rule: Rule, at: tuple, where: Where) -> list[Problem]:
    """A semantic target that names q/k/v parts says which rows to adapt: a method's own
    ``slices`` would say it twice."""
    target = rule.target
    slices = getattr(rule.config, "slices", None)
    if isinstance(target, SemanticTarget) and slices:
        parts = target.sliced_parts()
        hint = (f"write target: {{attention: [{', '.join(slices)}]}} and remove {rule.method}.slices" if not parts
                else f"remove {rule.method}.slices")
        return [(where(at + (rule.method, "slices")), f"surgery.{at[1]}.{rule.method}.slices",
                 f"slices apply to a selector's fused qkv; the semantic target {target.text()} names its own parts",
                 hint)]
    return []


def is_stochastic(rule: Rule) -> bool:
    """Whether the rule draws at random in training (experts, or its method's masking/dropout)."""
    return rule.experts is not None or rule.spec.is_stochastic(rule)


def describe_rule(rule: Rule, merge_mode: str = "average") -> str:
    """One surgery rule as a sentence, e.g. "`blocks.*.mlp`: parallel bottleneck adapter (...)"."""
    spec = rule.spec
    parts = [spec.describe(rule)] + mod.describe(rule.experts, rule.prune, spec.matrix_names, spec.matrix_biases,
                                                 merge_mode)
    return f"{target_markdown(rule.target)}: " + "; ".join(parts)


def fmt_number(x) -> str:
    """A recipe number as reports show it: ``0.1``, ``1`` for ``1.0``, ints as they are."""
    return f"{x:g}" if isinstance(x, float) else str(x)
