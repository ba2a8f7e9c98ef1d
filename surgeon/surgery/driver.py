"""Apply a recipe's surgery rules to a timm model, prove they take effect, merge them away.

The driver is method-agnostic: it resolves selectors against the real module tree, asks
each rule's :class:`~surgeon.methods.base.Method` for replacements, swaps them in, then runs
one probe forward pass and checks every patched layer ran. Problems are collected for all
rules and raised together, each at its recipe line.
"""
from __future__ import annotations

import difflib
import warnings
from dataclasses import asdict, dataclass, field
from typing import Callable

import timm
import torch
import torch.nn as nn

from surgeon.errors import RecipeError, SurgeonWarning, UserError
from surgeon.methods.base import ExpertSampler, PatchContext, RuleContext, SurgeryLayer, get_method
from surgeon.methods.modes import MERGE_MODES
from surgeon.methods.registry import Rule
from surgeon.methods.targets import SemanticTarget, target_text

from surgeon.anatomy import anatomy
from .selectors import select_modules
from .targets import Match, TargetError, describe_matches, resolve_target

Locate = Callable[[tuple], str]


@dataclass
class Target:
    """One patched module: what the plan table shows per row."""

    rule: int
    selector: str
    module: str
    method: str
    params: int
    detail: str = ""


@dataclass
class SurgeryPlan:
    """What the surgery did, counted the papers' way (METHODS.md §1).

    Attributes:
        backbone_params: parameters of the unpatched model without its classifier head.
        extra_params: trainable parameters the surgery added or unfroze, head excluded ("Params (M)").
        head_params: parameters of the (re-initialised, always trained) classifier head.
        trainable_params: every tensor element the optimizer updates (may exceed
            extra + head: a pruned matrix is stored whole).
        matches: per rule, ``{"rule", "selector", "method", "count"}``, and ``"resolved"`` (what
            the modules are, e.g. ``12 × blocks.*.attn.qkv [q, v]``) for a semantic target.
        targets: per patched module, a :class:`Target`.
    """

    backbone_params: int
    extra_params: int
    head_params: int
    trainable_params: int
    matches: list[dict] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["extra_params_m"] = round(self.extra_params / 1e6, 4)
        out["extra_percent_of_backbone"] = 100.0 * self.extra_params / max(self.backbone_params, 1)
        return out


def _selector_text(selector) -> str:
    return target_text(selector)


def _nearby_names(model: nn.Module, selector) -> str | None:
    names = [n for n, _ in model.named_modules() if n]
    pattern = selector if isinstance(selector, str) else selector[0]
    # Compare against name "shapes" (digits folded) so blocks.0.mlp ~ blocks.*.mlp.
    shapes = sorted({".".join("*" if p.isdigit() else p for p in n.split(".")) for n in names})
    close = difflib.get_close_matches(pattern.replace("**.", ""), shapes, n=3, cutoff=0.5)
    if close:
        return "modules with similar names: " + ", ".join(close)
    return "list module names with: python -c \"import timm; print([n for n,_ in timm.create_model('NAME').named_modules()])\""


def classifier_heads(model: nn.Module) -> list[nn.Module]:
    """The classifier head modules (timm's ``get_classifier``; distilled models such as LeViT
    and DeiT-distilled return two, the class and the distillation head)."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    heads = head if isinstance(head, (tuple, list)) else [head]
    return [h for h in heads if isinstance(h, nn.Module)]


def classifier_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of the classifier head(s) (timm's ``get_classifier``)."""
    return [p for head in classifier_heads(model) for p in head.parameters()]


def _parent_map(model: nn.Module) -> dict[int, tuple[nn.Module, str]]:
    return {id(child): (parent, attr)
            for parent in model.modules() for attr, child in parent.named_children()}


def apply_surgery(model: nn.Module, rules: tuple[Rule, ...] | list[Rule], *, seed: int = 0,
                  locate: Locate | None = None, probe: bool = True) -> SurgeryPlan:
    """Patch ``model`` in place according to ``rules`` (the recipe's typed ``surgery``).

    Freezes the backbone, applies every rule, keeps the classifier head trainable, attaches
    the shared :class:`ExpertSampler` as ``model.surgeon_sampler`` and, if ``probe``, runs one
    forward pass to prove each patched layer is used.

    Raises:
        RecipeError: every rule problem at once (no match, unpatchable module, no effect).
    """
    locate = locate or (lambda path: "surgery." + ".".join(map(str, path[1:])))
    head_ids = {id(p) for p in classifier_parameters(model)}
    original_ids = {id(p) for p in model.parameters()}
    backbone_params = sum(p.numel() for p in model.parameters() if id(p) not in head_ids)
    head_modules = {id(m) for m in classifier_heads(model)}
    for p in model.parameters():
        p.requires_grad_(False)

    sampler = ExpertSampler(seed=seed)
    init_generator = torch.Generator(device="cpu")
    init_generator.manual_seed(seed + 1)
    problems: list[tuple[str, str, str, str | None]] = []
    plan_matches: list[dict] = []
    targets: list[Target] = []

    # Resolve every target on the pristine model, so one rule's wrappers do not rename
    # the modules another rule targets.
    named = dict(model.named_modules())
    resolved: list[list[Match] | TargetError] = []
    unmatched: list[list[str]] = []  # per rule: the parts of its target this backbone lacks
    anat = None
    for i, rule in enumerate(rules):
        unmatched.append([])
        if isinstance(rule.target, SemanticTarget):
            anat = anat or anatomy(model)
            try:
                resolved.append(resolve_target(model, rule.target, anat, unmatched=unmatched[i]))
            except TargetError as exc:
                resolved.append(exc)
        else:
            resolved.append([Match(n, named[n]) for n in select_modules(model, rule.target)])

    parents = _parent_map(model)
    current: dict[int, nn.Module] = {}  # id(original module) -> its replacement
    patched: list[tuple[int, str, SurgeryLayer]] = []
    for i, (rule, found) in enumerate(zip(rules, resolved)):
        method = get_method(rule.method)
        name_shown = rule.spec.display_name(rule)
        where = locate(("surgery", i, "target"))
        sel = _selector_text(rule.target)
        if isinstance(found, TargetError):
            plan_matches.append({"rule": i, "selector": sel, "method": name_shown, "count": 0, "resolved": ""})
            problems.append((where, f"surgery.{i}.target", f"target {sel}: {found}",
                             "the target names parts this backbone does not have; use a selector (module names) "
                             "or another target"))
            continue
        entry = {"rule": i, "selector": sel, "method": name_shown, "count": len(found)}
        if isinstance(rule.target, SemanticTarget):
            entry["resolved"] = describe_matches(found)
        if unmatched[i]:
            # Part of a union target (Houlsby's attention + MLP on a CNN) has nothing to patch:
            # the rest still applies, but the user must hear that half of it did not.
            entry["unmatched"] = unmatched[i]
            warnings.warn(f"{where}: target {sel}: {'; '.join(unmatched[i])}; only the rest of the target is "
                          f"patched ({entry['resolved']})", SurgeonWarning, stacklevel=2)
        plan_matches.append(entry)
        rows = {m.name: m.rows for m in found if m.rows}
        matches = [(m.name, m.module) for m in found]
        if not matches:
            problems.append((where, f"surgery.{i}.target", f"selector '{sel}' matches no module of {type(model).__name__}",
                             _nearby_names(model, rule.target)))
            continue
        if rows and not method.takes_rows:
            first = next(iter(rows))
            problems.append((where, f"surgery.{i}.target",
                             f"target {sel} names parts of fused projections ({first}: {', '.join(rows[first])}), "
                             f"which {name_shown} cannot patch: it wraps whole modules",
                             "use {attention: block} / {attention: qkv} for whole modules, or a low-rank method "
                             "(lora, dora, mlae)"))
            continue
        if not method.trains_own_parameters:
            heads = [n for n, m in matches if id(m) in head_modules]
            if heads:
                problems.append((where, f"surgery.{i}.target",
                                 f"selector '{sel}' matches the classifier head ({heads[0]}), which is always re-initialised and trained",
                                 "narrow the selector, e.g. '**.blocks.*.mlp'"))
                continue
            bad = [(n, method.cannot_patch(n, m, rule)) for n, m in matches]
            bad = [(n, why) for n, why in bad if why]
            if bad:
                shown = "; ".join(f"{n} {why}" for n, why in bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "")
                problems.append((where, f"surgery.{i}.target",
                                 f"{name_shown} cannot patch {len(bad)} of the {len(matches)} matched modules: {shown}",
                                 "narrow the selector so it matches only modules this method supports"))
                continue
        else:
            matches = [(n, m) for n, m in matches if not method.cannot_patch(n, m, rule)]
            if not matches:
                problems.append((where, f"surgery.{i}.target", method.nothing_to_patch(sel, rule), None))
                continue
        # Per-rule state (e.g. MLAE's allocation over the matched layers), computed once.
        try:
            state = method.prepare(RuleContext(rule=rule, rule_index=i,
                                               matches=[(n, current.get(id(m), m)) for n, m in matches],
                                               sampler=sampler, init_generator=init_generator, root=model))
        except ValueError as exc:  # the rule does not fit its matches
            problems.append((locate(("surgery", i)), f"surgery.{i}", f"{matches[0][0]}: {exc}", None))
            continue
        for j, (mod_name, module) in enumerate(matches):
            ctx = PatchContext(rule=rule, rule_index=i, layer_index=j, num_layers=len(matches),
                               sampler=sampler, init_generator=init_generator, root=model, state=state,
                               rows=rows.get(mod_name))
            target_module = current.get(id(module), module)
            try:
                before = {id(p) for p in target_module.parameters() if p.requires_grad}
                replacement = method.patch(mod_name, target_module, ctx)
            except ValueError as exc:  # a method's own argument check on this module
                problems.append((locate(("surgery", i)), f"surgery.{i}", f"{mod_name}: {exc}", None))
                break
            if replacement is not target_module:
                # The original parent, even if an earlier rule wrapped it: a wrapper holds the
                # original as its base_layer, which is where this child is still called from.
                parent, attr = parents[id(module)]
                setattr(parent, attr, replacement)
                current[id(module)] = replacement
            if isinstance(replacement, SurgeryLayer) and replacement is not target_module:
                patched.append((i, mod_name, replacement))
                targets.append(Target(i, sel, mod_name, name_shown, replacement.extra_params(), replacement.describe()))
            else:
                new = sum(p.numel() for p in replacement.parameters()
                          if p.requires_grad and id(p) not in before and id(p) not in head_ids)
                if new:
                    targets.append(Target(i, sel, mod_name, name_shown, new))
    if problems:
        raise RecipeError(problems)

    for p in classifier_parameters(model):
        p.requires_grad_(True)
    model.surgeon_sampler = sampler

    if probe and patched:
        problems = _probe(model, patched, locate)
        if problems:
            raise RecipeError(problems)

    layer_extra = sum(layer.extra_params() for _, _, layer in patched)
    unfrozen = sum(p.numel() for p in model.parameters()
                   if p.requires_grad and id(p) in original_ids and id(p) not in head_ids)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return SurgeryPlan(backbone_params=backbone_params, extra_params=layer_extra + unfrozen,
                       head_params=sum(p.numel() for p in classifier_parameters(model)),
                       trainable_params=trainable, matches=plan_matches, targets=targets)


def probe_input(model: nn.Module, batch: int = 2) -> torch.Tensor:
    """A random input of the model's configured size on its device ``[batch, C, H, W]``."""
    cfg = timm.data.resolve_input_data_config(model)
    param = next(model.parameters())
    return torch.randn(batch, *cfg["input_size"], device=param.device, dtype=param.dtype)


def _probe(model: nn.Module, patched, locate: Locate) -> list:
    """Run one forward pass; every patched layer must have run (or had its weight read)."""
    for _, _, layer in patched:
        layer.probe_hits = 0
    hooks = [layer.register_forward_pre_hook(_count_hit) for _, _, layer in patched]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(probe_input(model))
    except UserError as exc:  # a layer that cannot work where it was put: blame its rule
        rule = next((i for i, name, _ in patched if name == exc.where), None)
        if rule is None:
            raise
        return [(locate(("surgery", rule, "target")), f"surgery.{rule}.target", exc.message, exc.hint)]
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    dead: dict[int, list[str]] = {}
    for i, name, layer in patched:
        if layer.probe_hits == 0:
            dead.setdefault(i, []).append(name)
    problems = []
    for i, names in dead.items():
        problems.append((locate(("surgery", i, "target")), f"surgery.{i}.target",
                         f"the patch on {len(names)} module(s) has no effect: {names[0]}"
                         f"{' and others' if len(names) > 1 else ''} is never called in the forward pass",
                         "its parent computes with the weights directly; target the parent module or "
                         "use a method that folds into the weight (lora, mlae)"))
    return problems


def _count_hit(module: SurgeryLayer, args) -> None:
    module.probe_hits += 1


def surgery_layers(model: nn.Module) -> list[tuple[str, SurgeryLayer]]:
    """Every surgery layer of the model, as (name, layer)."""
    return [(n, m) for n, m in model.named_modules() if isinstance(m, SurgeryLayer)]


def merge(model: nn.Module, mode: str = "average") -> nn.Module:
    """Merge every surgery layer in place (fp32): folds LoRA-family deltas into base weights
    and removes their modules; turns MoSA experts into one dense adapter of the original size.

    Args:
        mode: ``average`` (W0 + D/N) or ``jigsaw`` (W0 + D) for expert-split matrices.

    Returns:
        the same model object (for chaining).
    """
    if mode not in MERGE_MODES:
        raise ValueError(f"merge mode must be {' or '.join(repr(m) for m in MERGE_MODES)}, not {mode!r}")
    while True:
        layers = surgery_layers(model)
        # Deepest first, so a wrapper merges after whatever it wraps.
        layers = [(n, m) for n, m in layers if not getattr(m, "merged_layer", False)]
        if not layers:
            break
        layers.sort(key=lambda nm: nm[0].count("."), reverse=True)
        name, layer = layers[0]
        replacement = layer.merge(mode)
        if replacement is not layer:
            parent_name, _, attr = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, attr, replacement)
    return model
