"""Checks beyond the schema that need no model: names timm knows, options that contradict.

Each method checks its own rule (:meth:`~surgeon.methods.registry.MethodSpec.problems`) and
the modifiers theirs (:mod:`surgeon.methods.modifiers`); this module adds what spans sections:
the model name, the evaluation mechanism against the rules' experts, the regularisers against
the rules' randomness, and the batch split.
"""
from __future__ import annotations

import difflib

from surgeon.methods.registry import is_stochastic, rule_problems

Problem = tuple[str, str, str, "str | None"]


def unknown_model_problem(name: str, where: str) -> Problem | None:
    """A problem if timm has no model called ``name`` (with a did-you-mean hint)."""
    # timm (and torch, seconds) only when a model name is checked: `surgeon show` and a recipe
    # that fails its schema never import them. surgeon's own timm names are registered too.
    import timm

    import surgeon.builtin.models  # noqa: F401 - registers fractal_vit_tiny with timm

    if timm.is_model(name):
        return None
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else "see timm.list_models('vit_*')"
    return (where, "model.name", f"unknown timm model '{name}'", hint)


def static_problems(recipe, *, check_model: bool = True) -> list[Problem]:
    """Contradictions a schema cannot express in a schema-valid :class:`~surgeon.recipe.Recipe`.

    ``check_model=False`` skips the one check that imports timm (is ``model.name`` a timm model).
    """
    where = recipe.where
    problems: list[Problem] = []
    model_problem = unknown_model_problem(recipe.model.name, where(("model", "name"))) if check_model else None
    if model_problem:
        problems.append(model_problem)

    rules = recipe.surgery
    for i, rule in enumerate(rules):
        problems += rule_problems(rule, ("surgery", i), where, optimizer=recipe.train.optimizer)
    has_experts = any(rule.experts is not None for rule in rules)
    stochastic = any(is_stochastic(rule) for rule in rules)

    ev = recipe.eval
    if ev.inference != "merge" and not has_experts:
        problems.append((where(("eval", "inference")), "eval.inference",
                         f"inference '{ev.inference}' needs a rule with experts (MoSA/MoSL)",
                         "use inference: merge, or add experts to a rule"))
    if ev.merge_mode != "average" and not has_experts:
        problems.append((where(("eval", "merge_mode")), "eval.merge_mode",
                         f"merge_mode '{ev.merge_mode}' needs a rule with experts (MoSA/MoSL)",
                         "remove eval.merge_mode"))
    if ev.inference == "fixed":
        counts = [r.experts.count for r in rules if r.experts is not None]
        if counts and ev.expert >= min(counts):
            problems.append((where(("eval", "expert")), "eval.expert",
                             f"expert {ev.expert} does not exist (experts are 0..{min(counts) - 1})", None))

    reg = recipe.regularizers
    if reg.consistency.weight > 0 and not stochastic:
        problems.append((where(("regularizers", "consistency", "weight")), "regularizers.consistency.weight",
                         "consistency needs a stochastic module (experts, MLAE masking or LoRA dropout): "
                         "both passes would be identical", "set the weight to 0 or add experts"))
    if reg.feature_alignment.weight > 0 and reg.consistency.weight == 0 and not stochastic:
        problems.append((where(("regularizers", "feature_alignment", "weight")),
                         "regularizers.feature_alignment.weight",
                         "feature alignment compares two stochastic passes; this recipe has none", None))

    train = recipe.train
    if train.batch_size % train.grad_accum:
        problems.append((where(("train", "grad_accum")), "train.grad_accum",
                         f"batch_size {train.batch_size} is not divisible by grad_accum {train.grad_accum}",
                         None))
    return problems
