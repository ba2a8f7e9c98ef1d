"""Checks beyond the schema that need no model: names timm knows, options that contradict."""
from __future__ import annotations

import difflib

from .loader import RawRecipe

Problem = tuple[str, str, str, "str | None"]


def unknown_model_problem(name: str, where: str) -> Problem | None:
    """A problem if timm has no model called ``name`` (with a did-you-mean hint)."""
    # timm (and torch, seconds) only when a model name is checked; surgeon's own timm names too.
    import timm

    import surgeon.builtin.models  # noqa: F401 - registers fractal_vit_tiny with timm

    if timm.is_model(name):
        return None
    close = difflib.get_close_matches(name, timm.list_models(), n=3, cutoff=0.6)
    hint = f"did you mean {' or '.join(repr(c) for c in close)}?" if close else "see timm.list_models('vit_*')"
    return (where, "model.name", f"unknown timm model '{name}'", hint)


def static_problems(raw: RawRecipe, data: dict, *, check_model: bool = True) -> list[Problem]:
    """Contradictions a schema cannot express. ``data`` is the schema-valid recipe with defaults.

    ``check_model=False`` skips the one check that imports timm (is ``model.name`` a timm model).
    """
    problems: list[Problem] = []
    model_problem = unknown_model_problem(data["model"]["name"], raw.where(("model", "name"))) if check_model else None
    if model_problem:
        problems.append(model_problem)

    rules = data["surgery"]
    has_experts = False
    stochastic = False
    for i, rule in enumerate(rules):
        at = ("surgery", i)
        method = next(k for k in ("adapter", "lora", "mlae", "unfreeze") if k in rule)
        if "experts" in rule:
            has_experts = True
            stochastic = True
            if method not in ("adapter", "lora"):
                problems.append((raw.where(at + ("experts",)), f"surgery.{i}.experts",
                                 f"experts (MoSA) apply to adapter or lora rules, not {method}",
                                 "remove experts, or use adapter/lora in this rule"))
            if "prune" in rule:
                problems.append((raw.where(at + ("prune",)), f"surgery.{i}.prune",
                                 "prune (SparseAdapter/SparseLoRA) and experts (MoSA) exclude each other",
                                 "keep one of them"))
            elif not rule["experts"]["sparse"]:
                problems.append((raw.where(at + ("experts", "sparse")), f"surgery.{i}.experts.sparse",
                                 "experts with no sparse matrix are one plain adapter",
                                 "use sparse: [up] (hierarchical) or [down, up] (flat), or drop experts"))
        if "prune" in rule and method not in ("adapter", "lora"):
            problems.append((raw.where(at + ("prune",)), f"surgery.{i}.prune",
                             f"prune applies to adapter or lora rules, not {method}", None))
        if method == "mlae":
            problems.extend(_mlae_problems(raw, rule["mlae"], at))
            if rule["mlae"]["masking"]["strategy"] in ("stochastic", "mixed"):
                stochastic = True
        if method == "lora" and rule["lora"]["dropout"] > 0:
            stochastic = True
        if method == "adapter" and rule["adapter"]["input_from"] and rule["adapter"]["placement"] != "parallel":
            problems.append((raw.where(at + ("adapter", "input_from")), f"surgery.{i}.adapter.input_from",
                             "input_from applies to parallel adapters (a sequential adapter reads its module's output)",
                             "remove input_from, or use placement: parallel"))
        if "experts" in rule and rule["experts"]["decay"] == "toward_zero" and data["train"]["optimizer"] == "sgd":
            problems.append((raw.where(at + ("experts", "decay")), f"surgery.{i}.experts.decay",
                             "decay: toward_zero is a decoupled (AdamW) weight decay; train.optimizer is sgd",
                             "use train.optimizer adamw or adamw_hf, or experts.decay: toward_init"))

    ev = data["eval"]
    if ev["inference"] != "merge" and not has_experts:
        problems.append((raw.where(("eval", "inference")), "eval.inference",
                         f"inference '{ev['inference']}' needs a rule with experts (MoSA/MoSL)",
                         "use inference: merge, or add experts to a rule"))
    if ev["merge_mode"] != "average" and not has_experts:
        problems.append((raw.where(("eval", "merge_mode")), "eval.merge_mode",
                         f"merge_mode '{ev['merge_mode']}' needs a rule with experts (MoSA/MoSL)",
                         "remove eval.merge_mode"))
    if ev["inference"] == "fixed":
        counts = [r["experts"]["count"] for r in rules if "experts" in r]
        if counts and ev["expert"] >= min(counts):
            problems.append((raw.where(("eval", "expert")), "eval.expert",
                             f"expert {ev['expert']} does not exist (experts are 0..{min(counts) - 1})", None))

    reg = data["regularizers"]
    if reg["consistency"]["weight"] > 0 and not stochastic:
        problems.append((raw.where(("regularizers", "consistency", "weight")), "regularizers.consistency.weight",
                         "consistency needs a stochastic module (experts, MLAE masking or LoRA dropout): "
                         "both passes would be identical", "set the weight to 0 or add experts"))
    if reg["feature_alignment"]["weight"] > 0 and reg["consistency"]["weight"] == 0 and not stochastic:
        problems.append((raw.where(("regularizers", "feature_alignment", "weight")),
                         "regularizers.feature_alignment.weight",
                         "feature alignment compares two stochastic passes; this recipe has none", None))

    train = data["train"]
    if train["batch_size"] % train["grad_accum"]:
        problems.append((raw.where(("train", "grad_accum")), "train.grad_accum",
                         f"batch_size {train['batch_size']} is not divisible by grad_accum {train['grad_accum']}",
                         None))
    return problems


def _mlae_problems(raw: RawRecipe, cfg: dict, at: tuple) -> list[Problem]:
    out: list[Problem] = []
    dotted = ".".join(map(str, at)) + ".mlae"
    if cfg["rank"] % cfg["expert_rank"]:
        out.append((raw.where(at + ("mlae", "expert_rank")), dotted + ".expert_rank",
                    f"expert_rank {cfg['expert_rank']} does not divide rank {cfg['rank']}", None))
    masking = cfg["masking"]
    fixed = masking["strategy"] in ("fixed", "mixed")
    has_alloc = masking["pattern"] is not None or masking["counts"] is not None
    if fixed and not has_alloc:
        out.append((raw.where(at + ("mlae", "masking")), dotted + ".masking",
                    f"strategy '{masking['strategy']}' needs a per-layer allocation",
                    "set pattern (incremental, decremental, hourglass, protruding, random) or counts"))
    if not fixed and has_alloc:
        out.append((raw.where(at + ("mlae", "masking")), dotted + ".masking",
                    f"pattern/counts have no effect with strategy '{masking['strategy']}'",
                    "use strategy fixed or mixed"))
    if masking["pattern"] is not None and masking["counts"] is not None:
        out.append((raw.where(at + ("mlae", "masking", "counts")), dotted + ".masking.counts",
                    "give pattern or counts, not both", None))
    if masking["strategy"] == "mixed" and isinstance(masking["p"], list):
        out.append((raw.where(at + ("mlae", "masking", "p")), dotted + ".masking.p",
                    "mixed masking uses one p for all layers", None))
    return out
