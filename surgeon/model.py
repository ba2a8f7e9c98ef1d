"""The recipe's model: its timm backbone with the surgery applied.

:func:`build_model` is the public door (``surgeon.build_model``); :func:`build_checked_model`
adds what a training run needs on top: weight-loading problems a user can fix turned into
:class:`~surgeon.errors.UserError` and timm's load report checked, so a file that leaves
backbone tensors random is refused.
"""
from __future__ import annotations

import warnings
from contextlib import nullcontext

import torch
import torch.nn as nn

from surgeon.backbone import create_backbone
from surgeon.errors import RecipeError, SurgeonWarning, UserError
from surgeon.methods.lowrank import LowRankLayer
from surgeon.methods.matrices import ExpertSplitMatrix
from surgeon.recipe import Recipe, load_recipe
from surgeon.seeding import seed_everything
from surgeon.surgery import apply_surgery, classifier_heads
from surgeon.surgery.selectors import compile_selector
from surgeon.weights import check_load_report, load_report

#: A surgery adding more than this many times the backbone's parameters is refused (full
#: fine-tuning trains 1x; nothing parameter-efficient comes near 10x): such a size is a typo
#: (``bottleneck: 4e9``) and allocating it would exhaust memory. Above 1x it is a warning.
MAX_EXTRA_RATIO = 10


def build_model(recipe: Recipe | str | dict, *, weights: bool = True, num_classes: int | None = None,
                device=None, probe: bool = True, check_sizes: bool = True) -> nn.Module:
    """The recipe's timm backbone with its surgery applied.

    Args:
        recipe: a :class:`~surgeon.recipe.Recipe`, or anything :func:`~surgeon.recipe.load_recipe` accepts.
        weights: load the recipe's pretrained weights (False: random init, never downloads).
        num_classes: head size; default ``model.num_classes`` of the recipe.
        device: e.g. ``"meta"`` to build shapes only (planning).
        probe: run one forward pass to prove every patch takes effect.
        check_sizes: refuse absurd sizes before allocating (:func:`size_problems`, on a
            meta-device build first when ``device`` is a real one); False when the caller has
            just checked them.

    Raises:
        RecipeError: a bad selector, a rule that cannot patch its modules, an absurd size.

    Returns:
        the patched ``nn.Module``; its :class:`~surgeon.surgery.SurgeryPlan` is ``model.surgeon_plan``.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    selector_problems(recipe)
    meta = device is not None and torch.device(device).type == "meta"
    if not meta and check_sizes:
        # The sizes are checked on a shapes-only build first, so an absurd one is refused
        # before anything is allocated (a meta build costs a fraction of a second). Its other
        # warnings would repeat the real build's.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            warnings.simplefilter("always", SurgeonWarning)
            build_model(recipe, weights=False, num_classes=num_classes, device="meta", probe=False)
    model = create_backbone(recipe.model, num_classes=num_classes, weights=weights, device=device)
    # On the meta device the surgery's own tensors (initial weights, masks) are shapes only too:
    # `validate`/`plan` of a huge adapter allocate nothing.
    with torch.device("meta") if meta else nullcontext():
        plan = apply_surgery(model, recipe.surgery, seed=recipe.train.seed, locate=recipe.where, probe=probe)
    model.surgeon_plan = plan
    if meta and check_sizes:
        size_problems(model, recipe)
    return model


def selector_problems(recipe: Recipe) -> None:
    """Compile every rule's selector; a bad one (an invalid ``re:``, an unclosed brace) is raised
    as a :class:`RecipeError` at its rule's ``target`` line."""
    problems = []
    for i, rule in enumerate(recipe.surgery):
        patterns = [rule.target] if isinstance(rule.target, str) else rule.target
        for pattern in patterns if isinstance(patterns, (list, tuple)) else ():
            try:
                compile_selector(pattern)
            except UserError as exc:
                problems.append((recipe.where(("surgery", i, "target")), f"surgery.{i}.target", exc.message, exc.hint))
                break
    if problems:
        raise RecipeError(problems)


def _count(n: int) -> str:
    """A parameter count for messages: 12,345 / 1.2M / 3.1B."""
    if n >= 1e9:
        return f"{n / 1e9:,.1f}B"
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n:,}"


def size_problems(model: nn.Module, recipe: Recipe) -> None:
    """Refuse (located :class:`RecipeError`) or warn (:class:`SurgeonWarning`) about sizes that
    make no sense, on a model built on the meta device, i.e. before anything is allocated:

    - the surgery adds more than :data:`MAX_EXTRA_RATIO` times the backbone's parameters
      (error) or more than the backbone (warning), with the count and the largest rule;
    - an expert split with more experts than the entries it divides (most experts would be
      empty): error;
    - a low-rank update whose rank exceeds ``min(in, out)`` of the weight it adapts (the extra
      rank adds parameters, not expressiveness): warning.
    """
    plan = model.surgeon_plan
    where = recipe.where
    problems, notes = [], []
    by_rule: dict[int, int] = {}
    for t in plan.targets:
        by_rule[t.rule] = by_rule.get(t.rule, 0) + t.params
    modules = dict(model.named_modules())
    rule_of = {t.module: t.rule for t in plan.targets}
    ranked_rules: set[int] = set()
    split_rules: set[int] = set()
    for name, rule in rule_of.items():
        layer = modules.get(name)
        if layer is None:
            continue
        for sub_name, sub in layer.named_modules() if rule not in split_rules else ():
            at = f"{name}.{sub_name}" if sub_name else name
            if isinstance(sub, ExpertSplitMatrix):
                n_experts = sub.num_experts
                ranked = {"all": sub.out_features * sub.in_features, "row": sub.in_features,
                          "column": sub.out_features}.get(sub.granularity, n_experts)
                if ranked < n_experts:
                    split_rules.add(rule)  # one problem per rule
                    what = {"all": "entries of", "row": "entries per row of", "column": "entries per column of"}
                    problems.append((where(("surgery", rule, "experts", "count")), f"surgery.{rule}.experts.count",
                                     f"{n_experts} experts split {at} ({sub.out_features}x{sub.in_features}), which has "
                                     f"only {ranked} {what[sub.granularity]} it: {n_experts - ranked} of the experts "
                                     "would be empty",
                                     f"use at most {ranked} experts here, or granularity: all"))
                    break
        if isinstance(layer, LowRankLayer) and rule not in ranked_rules:
            for group in layer.down:
                rank, fan_in = layer.down[group].out_features, layer.down[group].in_features
                rows = layer.up[group].out_features
                if rank > min(fan_in, rows):
                    ranked_rules.add(rule)  # one note per rule
                    notes.append((where(("surgery", rule)), f"rank {rank} on {name} exceeds min(in, out) = "
                                  f"{min(fan_in, rows)} of the weight it adapts ({rows}x{fan_in}): the extra rank "
                                  f"adds parameters ({_count(layer.extra_params())} on this layer), not "
                                  "expressiveness"))
                    break
    backbone = max(1, plan.backbone_params)
    if by_rule and plan.extra_params > backbone:
        rule, largest = max(by_rule.items(), key=lambda kv: kv[1])
        text = (f"the surgery adds {_count(plan.extra_params)} parameters, {plan.extra_params / backbone:,.1f}x the "
                f"backbone's {_count(plan.backbone_params)} (rule surgery.{rule}: {_count(largest)})")
        if plan.extra_params > MAX_EXTRA_RATIO * backbone:
            problems.append((where(("surgery", rule)), f"surgery.{rule}", text,
                             f"parameter-efficient surgery adds a fraction of the backbone; at most "
                             f"{MAX_EXTRA_RATIO}x is accepted: lower the rule's size (bottleneck, rank, experts)"))
        else:
            notes.append((where(("surgery", rule)), text))
    if problems:
        raise RecipeError(problems)
    for at, text in notes:
        warnings.warn(f"{at}: {text}", SurgeonWarning, stacklevel=3)


def check_input_size(model: nn.Module, input_size, where: str) -> None:
    """Run ``model`` (built on the meta device) on a batch of ``input_size`` ``(C, H, W)``: an
    image size the model cannot take fails here, before training, not at the first step."""
    model.eval()
    try:
        with torch.no_grad():
            model(torch.empty(2, *input_size, device="meta"))
    except (AssertionError, RuntimeError, ValueError) as exc:
        if isinstance(exc, NotImplementedError) or "meta" in str(exc).lower():
            return  # an op without a meta kernel (or one that reads values): not judged here
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UserError(f"the model cannot take the data's {input_size[1]}x{input_size[2]} images: {first}",
                        where=where,
                        hint="set data.image_size to the model's input size (or model.kwargs.img_size to the "
                             "data's), or model.kwargs.dynamic_img_size: true for a ViT") from None


def build_checked_model(recipe: Recipe, *, num_classes: int | None = None, weights: bool = True, device="cpu",
                        probe: bool = True, check_sizes: bool = True) -> nn.Module:
    """:func:`build_model` on ``device`` with the weight-loading problems a user can fix turned into
    :class:`UserError` (no network, a file of another architecture, a corrupt file) and timm's
    load report checked (a file that leaves backbone tensors random is refused)."""
    pretrained = recipe.model.pretrained if weights else False
    where = recipe.where(("model", "pretrained"))
    try:
        with load_report() as report:
            model = build_model(recipe, num_classes=num_classes, weights=weights, probe=probe,
                                check_sizes=check_sizes)
    except UserError:
        raise
    except (RuntimeError, OSError, ValueError, KeyError) as exc:
        if pretrained is False:
            raise
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:400]
        hint = ("the file must hold weights of the same architecture as model.name/model.kwargs"
                if pretrained is not True else
                "download the weights on a machine with network and pass them as a file or local-dir:FOLDER")
        raise UserError(f"cannot load the pretrained weights {pretrained!r} into {recipe.model.name}: {first}",
                        where=where, hint=hint) from None
    if pretrained is not False:
        heads = {id(h) for h in classifier_heads(model)}  # two for distilled models (LeViT, DeiT-distilled)
        head_names = [n for n, m in model.named_modules() if id(m) in heads and n] or ["head", "fc", "classifier"]
        check_load_report(report, head_names, str(pretrained))
    return model.to(device)


def rebuild_backbone(recipe: Recipe, device="cpu") -> nn.Module:
    """A run's patched model with its backbone weights, before the trained tensors are loaded.

    Seeded exactly as ``surgeon apply`` seeds it, so a ``pretrained: false`` backbone comes back
    with the same random weights (verified against the adapter's fingerprint by the caller).
    """
    seed_everything(recipe.train.seed)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="model.pretrained is false")
        return build_checked_model(recipe, probe=False, device=device)
