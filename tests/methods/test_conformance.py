"""Every method on every tiny backbone family through one set of checks.

The table is (method case × family); every case must:

1. count its parameters the papers' way (``plan.extra_params``) as an independent formula says;
2. start at the backbone's function (zero-initialised update: the same logits as plain timm);
3. take effect (perturbing its trainable tensors changes the output);
4. merge exactly (merged == unmerged to 1e-5 relative, in eval);
5. for methods that fold into the weights, leave a model whose state dict loads strictly into
   plain timm and computes the same function;
6. refuse to merge a NaN update (methods that add layers; the base weights stay untouched);
7. survive a save/load round trip of its surgery tensors (safetensors file, fresh model).

Each method's own maths (formulas, masks, draws, allocation) is in ``test_<method>.py``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import pytest
import torch
import torch.nn as nn

from surgeon.errors import UserError
from surgeon.io import load_tensors, save_tensors
from surgeon.methods.adapter.layer import AdapterLayer, MergedAdapter
from surgeon.methods.base import SurgeryLayer, get_method
from surgeon.methods.experts import split_matrices
from surgeon.methods.mlae.allocation import pattern_counts
from surgeon.surgery import load_surgery_state, merge, surgery_state

from .families import FAMILIES, FC1, QKV, Family, build, build_recipe, image, plain_timm, rel_err, wake


def kept(n: int, keep: float) -> int:
    return max(1, min(n, round(keep * n)))


# --------------------------------------------------------------------------- expected counts

def adapter_params(recipe: str, fam: Family) -> int:
    """The papers' count of the shipped adapter recipes (bottleneck 64), from the block widths."""
    widths = list(fam.mlp) + (list(fam.attn) if recipe == "houlsby" else [])
    b, total = 64, 0
    for c in widths:
        tensors = [b * c, b, c * b, c]  # down.weight, down.bias, up.weight, up.bias
        norm = [c, c]  # the adapter's own LayerNorm (all but Houlsby), pruned too in SparseAdapter
        if recipe == "sparse_adapter":
            total += sum(kept(n, 0.25) for n in tensors + norm)
        else:
            total += sum(tensors) + (sum(norm) if recipe != "houlsby" else 0)
    return total


def pair_params(pairs: list[tuple]) -> int:
    """``(rank, fan_in, rows, keep_a, keep_b, magnitude)`` per (A [r, fan_in], B [rows, r]) pair."""
    total = 0
    for r, fan, rows, keep_a, keep_b, magnitude in pairs:
        a, b = r * fan, rows * r
        total += (a if keep_a is None else kept(a, keep_a)) + (b if keep_b is None else kept(b, keep_b))
        total += rows if magnitude else 0
    return total


def low_rank_pairs(fam: Family, key: str, magnitude: bool = False) -> list[tuple]:
    """The pairs of :func:`low_rank_rules` for ``key`` (lora, mosl, sparse_lora, dora)."""
    qkv_keep = (0.5, 0.5) if key == "sparse_lora" else (None, None)
    fc1_keep = (None, 0.3) if key == "sparse_lora" else (None, None)
    pairs = []
    if fam.qkv:
        pairs += [(4, c, c, *qkv_keep, magnitude) for c in fam.attn for _ in ("q", "v")]
    elif key in ("lora", "dora"):  # ConvNeXt: the 4x4 stem conv and a 2x2 stride-2 downsampling conv
        pairs += [(3, 3 * 4 * 4, 16, None, None, magnitude), (2, 16 * 2 * 2, 32, None, None, magnitude)]
    if fam.fc1:
        pairs += [(4, c, 4 * c, *fc1_keep, magnitude) for c in fam.mlp]
    return pairs


def mlae_params(fam: Family, counts: list[int], *, expert_rank: int = 1, slices: int = 0,
                widths: list[int] | None = None) -> int:
    """Experts of rank k: per expert k rows of A (fan_in), k columns of B (its rows) and one λ."""
    widths = widths or (fam.attn if fam.qkv else fam.mlp)
    total = 0
    for c, experts in zip(widths, counts):
        rows = c if slices else (3 * c if fam.qkv else 4 * c)
        total += max(slices, 1) * experts * (expert_rank * (c + rows) + 1)
    return total


def head_prefix(model: nn.Module) -> str:
    head = model.get_classifier()
    return next(n for n, m in model.named_modules() if m is head)


def unfrozen_params(fam: Family, what: str) -> int:
    plain = plain_timm(next(k for k, f in FAMILIES.items() if f == fam))
    head = head_prefix(plain)
    return sum(p.numel() for n, p in plain.named_parameters()
               if not n.startswith(head + ".") and (what == "all" or n.rsplit(".", 1)[-1] == "bias"))


# --------------------------------------------------------------------------- the cases

def lr(target, rank=4, slices=None, key="lora", **extra):
    return {"target": target, key: {"rank": rank, "alpha": 2 * rank, "slices": slices}, **extra}


def low_rank_rules(key: str) -> Callable[[Family], list[dict]]:
    """q,v slices of every qkv (rank 4) and every fc1 (Linear, or 1x1 conv on ConvNeXt); on ConvNeXt
    also a 4x4 and a 2x2 stride-2 convolution. MoSL splits A and B of the qkv slices (flat) and B of
    fc1 per row; SparseLoRA prunes A and B of the slices and B of fc1."""
    method = {"mosl": "lora", "sparse_lora": "lora"}.get(key, key)
    qkv_extra = {"mosl": {"experts": {"count": 4, "sparse": ["down", "up"]}},
                 "sparse_lora": {"prune": {"keep": 0.5}}}.get(key, {})
    fc1_extra = {"mosl": {"experts": {"count": 3, "granularity": "row"}},
                 "sparse_lora": {"prune": {"keep": 0.3, "matrices": ["up"]}}}.get(key, {})

    def rules(fam: Family) -> list[dict]:
        out = []
        if fam.qkv:
            out.append(lr(QKV, slices=["q", "v"], key=method, **qkv_extra))
        elif key in ("lora", "dora"):
            out += [lr("stem.0", rank=3, key=method), lr("stages.1.downsample.1", rank=2, key=method)]
        if fam.fc1:
            out.append(lr(FC1, key=method, **fc1_extra))
        return out
    return rules


MLAE_PAIRS = "stages.{0..1}.blocks.0.mlp.fc1"  # ConvNeXt: two matches for two explicit counts


def mlae_rules(masking: dict, rank: int = 4, expert_rank: int = 1, slices=None) -> Callable[[Family], list[dict]]:
    def rules(fam: Family) -> list[dict]:
        target = QKV if fam.qkv else (MLAE_PAIRS if "counts" in masking else FC1)
        return [{"target": target,
                 "mlae": {"rank": rank, "expert_rank": expert_rank, "coefficient_init": 0.5,
                          "slices": slices if fam.qkv else None, "masking": masking}}]
    return rules


@dataclass(frozen=True)
class Case:
    method: str                                    # the recipe key (registry)
    display: str                                   # the plan's method name
    params: Callable[[Family], int]                # the expected Params, computed independently
    families: tuple[str, ...]
    rules: Callable[[Family], list[dict]] | None = None   # rules on a family ...
    recipe: str | None = None                      # ... or a shipped recipe on the family's model
    overrides: dict = field(default_factory=dict)


ADAPTER_FAMILIES = ("vit", "deit", "swin", "convnext", "convnext_linear", "eva02", "beit")
LOW_RANK_FAMILIES = ("vit", "deit", "swin", "swinv2", "convnext", "eva02", "beit")
ALL_FAMILIES = tuple(FAMILIES)


def _n_blocks(fam: Family) -> int:
    return len(fam.attn if fam.qkv else fam.mlp)


CASES = {
    **{recipe: Case("adapter", {"mosa_hier": "mosa", "mosa_flat": "mosa", "sparse_adapter": "sparse_adapter"}.get(
        recipe, "adapter"), (lambda f, r=recipe: adapter_params(r, f)), ADAPTER_FAMILIES, recipe=recipe)
       for recipe in ("adaptformer", "pfeiffer", "houlsby", "mosa_hier", "mosa_flat", "sparse_adapter")},
    **{key: Case("lora", key, (lambda f, k=key: pair_params(low_rank_pairs(f, k))), LOW_RANK_FAMILIES,
                 low_rank_rules(key)) for key in ("lora", "mosl", "sparse_lora")},
    "lora_k": Case("lora", "lora", lambda f: pair_params([(4, c, c, None, None, False) for c in f.attn]), ("vit",),
                   lambda f: [lr(QKV, slices=["k"])]),
    "dora": Case("dora", "dora", lambda f: pair_params(low_rank_pairs(f, "dora", magnitude=True)),
                 LOW_RANK_FAMILIES, low_rank_rules("dora")),
    "mlae": Case("mlae", "mlae", lambda f: mlae_params(f, [3] * _n_blocks(f), expert_rank=2), LOW_RANK_FAMILIES,
                 mlae_rules({"strategy": "stochastic", "p": 0.5}, rank=6, expert_rank=2)),
    "mlae_fixed": Case("mlae", "mlae", lambda f: mlae_params(f, pattern_counts("incremental", _n_blocks(f), 4)),
                       LOW_RANK_FAMILIES, mlae_rules({"strategy": "fixed", "pattern": "incremental"})),
    "mlae_mixed_slices": Case("mlae", "mlae",
                              lambda f: mlae_params(f, [2, 5], slices=2 if f.qkv else 0,
                                                    widths=None if f.qkv else list(f.mlp[:2])),
                              LOW_RANK_FAMILIES, mlae_rules({"strategy": "mixed", "counts": [2, 5], "p": 0.3},
                                                            slices=["q", "v"])),
    "bitfit": Case("unfreeze", "bitfit", lambda f: unfrozen_params(f, "bias"), ALL_FAMILIES,
                   lambda f: [{"target": "**", "unfreeze": "bias"}]),
    "full": Case("unfreeze", "full", lambda f: unfrozen_params(f, "all"), ("vit", "convnext", "beit"),
                 lambda f: [{"target": "**", "unfreeze": "all"}]),
}
TABLE = [(case, family) for case, c in CASES.items() for family in c.families]


def make(case: Case, family: str, seed: int = 0) -> nn.Module:
    if case.recipe is not None:
        model = build_recipe(case.recipe, family, seed=seed, **case.overrides)
        wake(model)
        return model
    return build(family, case.rules(FAMILIES[family]), seed=seed)


def plain_backbone(case: Case, family: str, seed: int = 0) -> nn.Module:
    """The family's plain timm model with the random weights :func:`make` gave the backbone."""
    torch.manual_seed(0 if case.recipe is None else seed)
    plain = plain_timm(family)
    wake(plain)
    return plain


def surgery_tensors(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """The trainable tensors the method owns (the head excluded)."""
    head = head_prefix(model)
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad and not n.startswith(head + ".")]


@torch.no_grad()
def perturb(model: nn.Module, seed: int = 1, std: float = 0.2) -> None:
    """Noise in every trainable tensor of the method, pruned entries (``mask`` buffers) kept as they are."""
    gen = torch.Generator().manual_seed(seed)
    for _, p in surgery_tensors(model):
        p.add_(std * torch.randn(p.shape, generator=gen).to(p.dtype))
    for m in model.modules():
        for mask_name, value in (("mask", "weight"), ("bias_mask", "bias"), ("weight_mask", "weight")):
            mask = getattr(m, mask_name, None)
            if isinstance(mask, torch.Tensor) and mask.dtype == torch.bool and getattr(m, "pruned", "") == "zero":
                getattr(m, value).mul_(mask)


@pytest.mark.parametrize("case_name,family", TABLE, ids=[f"{c}-{f}" for c, f in TABLE])
def test_method_conformance(case_name, family, tmp_path):
    case = CASES[case_name]
    fam = FAMILIES[family]
    folds = get_method(case.method).folds
    model = make(case, family).eval()
    plan = model.surgeon_plan

    # 1. the papers' parameter count; the plan names the method
    assert plan.extra_params == case.params(fam), (plan.extra_params, case.params(fam))
    assert {t.method for t in plan.targets} == {case.display}
    trainable = sum(p.numel() for _, p in surgery_tensors(model))
    assert trainable >= plan.extra_params  # a pruned matrix is stored whole

    # 2. zero-initialised update: exactly the backbone's function
    x = image(model)
    plain = plain_backbone(case, family).eval()
    with torch.no_grad():
        y0 = model(x)
        assert torch.equal(y0, plain(x))

    # 3. takes effect
        perturb(model)
        y1 = model(x)
    assert rel_err(y1, y0) > 1e-3

    # 7. save/load round trip of the surgery tensors (a fresh model from the same recipe)
    path = tmp_path / "adapter.safetensors"
    save_tensors(path, surgery_state(model))
    fresh = make(case, family).eval()
    load_surgery_state(fresh, load_tensors(path), str(path))
    with torch.no_grad():
        assert torch.equal(fresh(x), y1)

    # 4. merged == unmerged (a training forward first: its draws and masks must not leak into eval)
    with torch.no_grad():
        model.train()(x)
        assert torch.equal(model.eval()(x), y1)
        merge(model)
        y2 = model(x)
    assert torch.isfinite(y2).all() and rel_err(y2, y1) < 1e-5
    assert not split_matrices(model)
    layers = [m for m in model.modules() if isinstance(m, SurgeryLayer)]
    assert all(getattr(m, "merged_layer", False) for m in layers)

    # 5. folding methods: plain timm again
    if folds:
        assert not layers
        plain.load_state_dict(model.state_dict(), strict=True)  # exactly timm's keys
        with torch.no_grad():
            assert rel_err(plain(x), y1) < 1e-5
    else:
        assert layers and all(isinstance(m, MergedAdapter) for m in layers)

    # 6. NaN refusal: a method that adds layers will not merge a broken update
    fresh_layers = [m for m in fresh.modules() if isinstance(m, SurgeryLayer)]
    if fresh_layers:
        layer = fresh_layers[0]
        base = {n: p.detach().clone() for n, p in layer.base_layer.named_parameters()}
        name, poisoned = next((n, p) for n, p in layer.named_parameters()
                              if p.requires_grad and not n.startswith("base_layer") and ("up." in n or n == "magnitude"))
        with torch.no_grad():
            poisoned.view(-1)[0] = math.nan
        with pytest.raises(UserError, match="NaN|non-finite"):
            merge(fresh)
        assert all(torch.equal(p, base[n]) for n, p in layer.base_layer.named_parameters()), name
    else:
        assert case.method == "unfreeze"


def test_the_table_covers_every_method_and_family():
    from surgeon.methods.registry import method_keys

    assert {c.method for c in CASES.values()} == set(method_keys())
    assert {f for c in CASES.values() for f in c.families} == set(FAMILIES)
    assert set(FAMILIES) >= {"vit", "deit", "swin", "swinv2", "convnext", "eva02", "beit"}


@pytest.mark.parametrize("recipe", ["adaptformer", "houlsby", "mosa_flat", "sparse_adapter"])
@pytest.mark.parametrize("family", ["vit", "convnext", "convnext_linear"])
def test_adapter_layout_and_trainable_tensors(recipe, family):
    """Adapters read the layout off the module (NCHW conv MLPs: 1x1-conv adapters) and only
    adapter tensors (and the head) train."""
    model = build_recipe(recipe, family)
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    fam = FAMILIES[family]
    assert len(layers) == len(fam.mlp) + (len(fam.attn) if recipe == "houlsby" else 0)
    assert {l.channel_dim for l in layers} == {1 if family == "convnext" else -1}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert all(".down." in n or ".up." in n or ".norm." in n or n.startswith("head") for n in trainable), trainable
