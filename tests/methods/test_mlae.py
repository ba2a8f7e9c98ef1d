"""MLAE: the explicit Σ_j formula, masking statistics, seeds, fixed patterns, similarity.
(Merge, plain-timm load and the shared checks of every family: tests/methods/test_conformance.py.)
"""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import surgeon
from surgeon.errors import RecipeError
from surgeon.methods.lowrank import SLICE_INDEX, LowRankLayer
from surgeon.methods.mlae.allocation import PATTERNS, pattern_counts, quarters
from surgeon.methods.mlae.similarity import cosine_matrix, expert_similarity

from ..helpers import ROOT
from .families import FAMILIES, QKV, build, image, rel_err
from .families import low_rank_layers as layers
from .families import perturb_low_rank as perturb


def lora_rule(target, rank=4, slices=None, **extra):
    return {"target": target, "lora": {"rank": rank, "alpha": 2 * rank, "slices": slices}, **extra}


def mlae_rule(target=QKV, rank=4, expert_rank=1, coefficient_init=1.0, slices=None, **masking):
    return {"target": target, "mlae": {"rank": rank, "expert_rank": expert_rank, "coefficient_init": coefficient_init,
                                       "slices": slices, "masking": masking}}


def explicit_delta_output(layer: LowRankLayer, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """Σ_s Σ_j m_j λ_j B_j (A_j x), one expert at a time (the reference, loops on purpose)."""
    k, e = layer.weighting.expert_rank, layer.weighting.num_experts
    out = torch.zeros(*x.shape[:-1], layer.out_features)
    for s, (name, spans) in enumerate(layer.parts):
        a, b = layer.down[name].weight, layer.up[name].weight
        out_rows = torch.cat([torch.arange(r0, r1) for r0, r1 in spans])  # B's rows, in order
        for j in range(e):
            index = s * e + j
            coef = layer.coefficient[index] * (1.0 if mask is None else mask[index])
            rows = slice(j * k, (j + 1) * k)
            out[..., out_rows] += coef * (x @ a[rows].T) @ b[:, rows].T
    return out


def replay_masks(layer: LowRankLayer, state: torch.Tensor, groups: int = 1) -> torch.Tensor:
    """The mask a training forward drew from the sampler state ``state``: ``[G, S·E]``."""
    gen = torch.Generator().manual_seed(0)
    gen.set_state(state)
    draws = torch.rand(groups * layer.coefficient.numel(), generator=gen).view(groups, -1)
    return (draws >= layer.weighting.p).float() / (1 - layer.weighting.p)


@pytest.mark.parametrize("expert_rank,slices", [(1, None), (2, ["q", "v"]), (4, ["k"])])
def test_forward_equals_explicit_expert_sum(expert_rank, slices):
    model = build("vit", [mlae_rule(rank=8, expert_rank=expert_rank, slices=slices, strategy="stochastic", p=0.5)])
    perturb(model)
    layer = layers(model)[0]
    assert layer.weighting.num_experts == 8 // expert_rank
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        # eval: every expert, unscaled
        layer.eval()
        assert rel_err(layer(x), layer.base_layer(x) + explicit_delta_output(layer, x, None)) < 1e-5
        # training: this forward's mask, kept experts scaled 1/(1-p)
        layer.train()
        state = layer.weighting.sampler.generator.get_state()
        y = layer(x)
        mask = replay_masks(layer, state)[0]
        assert rel_err(y, layer.base_layer(x) + explicit_delta_output(layer, x, mask)) < 1e-5
        # the weight path (parents that read .weight) computes the same function
        layer.weighting.sampler.generator.set_state(state)
        assert rel_err(nn.functional.linear(x, layer.weight, layer.bias), y) < 1e-5


def test_batch_groups_get_their_own_masks():
    model = build("vit", [mlae_rule(rank=6, slices=["q", "v"], strategy="stochastic", p=0.5)])
    perturb(model)
    layer = layers(model)[0].train()
    layer.weighting.sampler.groups = 2
    x = torch.randn(4, 3, layer.in_features)
    with torch.no_grad():
        state = layer.weighting.sampler.generator.get_state()
        y = layer(x)
        masks = replay_masks(layer, state, groups=2)
        assert not torch.equal(masks[0], masks[1])
        for g in range(2):
            half = x[2 * g:2 * g + 2]
            expected = layer.base_layer(half) + explicit_delta_output(layer, half, masks[g])
            assert rel_err(y[2 * g:2 * g + 2], expected) < 1e-5


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_masking_statistics_match_p(p):
    layer = layers(build("vit", [mlae_rule(rank=8, slices=["q", "v"], strategy="stochastic", p=p)]))[0].train()
    masks = torch.stack([layer.weighting.mask(layer) for _ in range(1500)])  # [1500, 16] draws
    kept = masks > 0
    n = kept.numel()
    assert abs(kept.float().mean().item() - (1 - p)) < 4 * (p * (1 - p) / n) ** 0.5 + 1e-3
    assert torch.allclose(masks[kept], torch.full_like(masks[kept], 1 / (1 - p)))  # kept: exactly 1/(1-p)
    assert kept.float().mean(0).sub(1 - p).abs().max() < 0.08  # every expert, not only on average
    layer.eval()
    assert layer.weighting.mask(layer) is None and torch.equal(layer.coefficients(), layer.coefficient)


def test_per_layer_p_list():
    model = build("vit", [mlae_rule(rank=8, strategy="stochastic", p=[0.0, 0.8])])
    first, second = [layer.train() for layer in layers(model)]
    assert (first.weighting.p, second.weighting.p) == (0.0, 0.8)
    assert first.weighting.mask(first) is None  # p = 0 never drops (and draws nothing)
    rate = torch.stack([second.weighting.mask(second) for _ in range(800)]).gt(0).float().mean().item()
    assert abs(rate - 0.2) < 0.03


@pytest.mark.parametrize("masking,needle", [
    ({"strategy": "stochastic", "p": [0.5, 0.5, 0.5]}, "p has 3 entries but the selector matched 2 layers"),
    ({"strategy": "fixed", "counts": [4]}, "counts has 1 entries but the selector matched 2 layers"),
    ({"strategy": "fixed", "counts": [0, 0]}, "every matched layer 0 experts"),
])
def test_per_layer_lists_must_fit_the_matches(masking, needle):
    with pytest.raises(RecipeError, match=needle):
        build("vit", [mlae_rule(**masking)])


def test_masks_come_from_the_seeded_sampler_not_the_global_rng():
    def train_outputs(seed, global_seed):
        model = build("vit", [mlae_rule(rank=8, strategy="stochastic", p=0.5)], seed=seed)
        perturb(model)
        model.train()
        x = image(model)
        torch.manual_seed(global_seed)
        with torch.no_grad():
            return [model(x) for _ in range(3)]

    a, b, c = train_outputs(11, 0), train_outputs(11, 99), train_outputs(12, 0)
    assert all(torch.equal(u, v) for u, v in zip(a, b))      # global RNG does not matter
    assert not all(torch.equal(u, v) for u, v in zip(a, c))  # the run seed does
    assert not torch.equal(a[0], a[1])                       # new masks every forward


def test_dropped_experts_get_no_gradient_that_step():
    layer = layers(build("vit", [mlae_rule(rank=8, strategy="stochastic", p=0.5)]))[0]
    perturb(nn.Sequential(layer))
    layer.train()
    state = layer.weighting.sampler.generator.get_state()
    layer(torch.randn(2, 3, layer.in_features)).square().sum().backward()
    dropped = replay_masks(layer, state)[0] == 0
    assert dropped.any() and (~dropped).any()
    a_grad, b_grad = layer.down["all"].weight.grad, layer.up["all"].weight.grad
    assert not a_grad[dropped].any() and not b_grad[:, dropped].any() and not layer.coefficient.grad[dropped].any()
    assert a_grad[~dropped].abs().sum() > 0 and layer.coefficient.grad[~dropped].abs().sum() > 0


def test_init_gaussian_a_zero_b_coefficients():
    model = build("vit", [mlae_rule(rank=8, coefficient_init=0.25, strategy="none")])
    layer = layers(model)[0]
    a = layer.down["all"].weight
    assert not layer.up["all"].weight.any() and torch.equal(layer.coefficient, torch.full((8,), 0.25))
    expected_std = (3 * layer.in_features) ** -0.5  # variance of LoRA's kaiming-uniform(a=√5)
    assert abs(a.std().item() / expected_std - 1) < 0.1
    assert (a.abs() > 1.0 / layer.in_features ** 0.5).any()  # Gaussian tails beyond the uniform bound
    assert layer.weighting.p == 0 and layer.train().weighting.mask(layer) is None


# --------------------------------------------------------------------------- fixed patterns

PAPER_A5 = {  # MLAE Appendix A.5, 12 blocks, 96 experts (typos in the printed lists fixed by the budget)
    "incremental": [2, 2, 2, 6, 6, 6, 10, 10, 10, 14, 14, 14],
    "decremental": [14, 14, 14, 10, 10, 10, 6, 6, 6, 2, 2, 2],
    "hourglass": [14, 14, 14, 2, 2, 2, 2, 2, 2, 14, 14, 14],
    "protruding": [2, 2, 2, 14, 14, 14, 14, 14, 14, 2, 2, 2],
}


@pytest.mark.parametrize("pattern", list(PAPER_A5))
def test_patterns_reproduce_the_paper_for_12_blocks(pattern):
    assert pattern_counts(pattern, 12, 8) == PAPER_A5[pattern]


@pytest.mark.parametrize("depth", [1, 2, 5, 10, 13, 24, 32])
def test_patterns_generalise_with_the_same_budget(depth):
    for mean in (1, 4, 8):
        for pattern in PATTERNS:
            gen = torch.Generator().manual_seed(depth)
            counts = pattern_counts(pattern, depth, mean, gen)
            assert len(counts) == depth and sum(counts) == depth * mean and min(counts) >= 0, (pattern, counts)
            if pattern == "random":
                assert min(counts) >= 1 and max(counts) <= -(-7 * mean // 4)
        inc = pattern_counts("incremental", depth, mean)
        assert pattern_counts("decremental", depth, mean) == inc[::-1] or depth % 2
        if depth % 2 == 0:
            for pattern in ("hourglass", "protruding"):
                counts = pattern_counts(pattern, depth, mean)
                assert counts == counts[::-1], (pattern, counts)  # symmetric about the middle
    q = quarters(depth)
    assert q == sorted(q) and set(q) <= {0, 1, 2, 3}


def test_fixed_pattern_builds_layers_with_those_counts():
    torch.manual_seed(0)
    recipe = {"name": "t", "model": {"name": "vit_tiny_patch16_224", "pretrained": False, "num_classes": 5,
                                     "kwargs": {"img_size": 32, "patch_size": 8, "depth": 12, "embed_dim": 48,
                                                "num_heads": 2}},
              "surgery": [mlae_rule(rank=8, strategy="fixed", pattern="hourglass")]}
    model = surgeon.build_model(recipe, weights=False)
    got = [layer.weighting.num_experts for layer in layers(model)]
    assert got == PAPER_A5["hourglass"] and all(layer.weighting.p == 0 for layer in layers(model))
    assert model.surgeon_plan.extra_params == 96 * (48 + 3 * 48 + 1)  # masked experts do not exist
    # mixed: the same allocation plus one p; random: reproducible from the seed, same budget
    recipe["surgery"] = [mlae_rule(rank=8, strategy="mixed", pattern="random", p=0.3)]
    counts = [[layer.weighting.num_experts for layer in layers(surgeon.build_model(recipe, weights=False))]
              for _ in range(2)]
    assert counts[0] == counts[1] and sum(counts[0]) == 96 and min(counts[0]) >= 1 and max(counts[0]) <= 14
    recipe["train"] = {"seed": 1}
    other = [layer.weighting.num_experts for layer in layers(surgeon.build_model(recipe, weights=False))]
    assert other != counts[0] and sum(other) == 96


def test_zero_experts_leave_the_module_unpatched():
    model = build("vit", [mlae_rule(rank=4, strategy="fixed", counts=[0, 3])])
    assert type(model.blocks[0].attn.qkv) is nn.Linear
    qkv = model.blocks[1].attn.qkv
    assert isinstance(qkv, LowRankLayer) and qkv.method_name == "mlae" and qkv.weighting.num_experts == 3
    assert [t.module for t in model.surgeon_plan.targets] == ["blocks.1.attn.qkv"]


# --------------------------------------------------------------------------- effect, counts

@pytest.mark.parametrize("family", ["vit", "eva02", "beit", "swinv2"])
def test_mlae_takes_effect(family):
    model = build(family, [mlae_rule(rank=4, strategy="stochastic", p=0.5)]).eval()
    x = image(model)
    with torch.no_grad():
        before = model.forward_features(x)
        perturb(model)
        after = model.forward_features(x)
    assert rel_err(after, before) > 1e-3
    if FAMILIES[family].bypass:
        assert all(layer.probe_hits > 0 for layer in layers(model))


@pytest.mark.parametrize("recipe", ["mlae", "mlae_fixed", "mlae_mixed"])
def test_shipped_recipes_reproduce_the_papers_params(recipe):
    # MLAE Table 1: 0.30M on ViT-B/16 = 12 blocks × (8·768 + 2304·8 + 8 λ) = 295,008 (0.295 → 0.30;
    # Table 11's 0.29 is the same model without the 96 λ, 294,912, or truncated).
    r = surgeon.load_recipe(ROOT / "recipes" / f"{recipe}.yaml", overrides={"model.pretrained": False})
    plan = surgeon.build_model(r, weights=False, device="meta").surgeon_plan
    assert plan.extra_params == 295_008 and round(plan.extra_params / 1e6, 2) == 0.30
    assert len(plan.targets) == 12 and {t.method for t in plan.targets} == {"mlae"}
    assert r.train.base_lr == 5e-4 and r.train.lr_scaling == "none" and r.train.batch_size == 64


# --------------------------------------------------------------------------- expert similarity

def test_expert_similarity_matches_flattened_delta_w():
    model = build("vit", [mlae_rule(rank=6, expert_rank=2, slices=["q", "v"], strategy="none"),
                          lora_rule("**.blocks.*.mlp.fc1", rank=3)])
    perturb(model)
    result = expert_similarity(model)
    assert set(result["layers"]) == {"blocks.0.attn.qkv", "blocks.1.attn.qkv", "blocks.0.mlp.fc1", "blocks.1.mlp.fc1"}
    layer = model.blocks[0].attn.qkv
    for name in ("q", "v"):
        a, b, lam = layer.down[name].weight, layer.up[name].weight, layer.coefficient
        s = SLICE_INDEX[name] - (SLICE_INDEX[name] > 0)  # q -> group 0, v -> group 1
        flat = torch.stack([(lam[s * 3 + j] * b[:, 2 * j:2 * j + 2] @ a[2 * j:2 * j + 2]).flatten() for j in range(3)])
        expected = nn.functional.cosine_similarity(flat[:, None], flat[None], dim=-1)
        assert torch.allclose(result["matrices"][f"blocks.0.attn.qkv.{name}"], expected, atol=1e-5)
    fc1 = model.blocks[1].mlp.fc1  # LoRA: the rank-1 terms of B A
    a, b = fc1.down["all"].weight, fc1.up["all"].weight
    flat = torch.stack([torch.outer(b[:, j], a[j]).flatten() for j in range(3)])
    expected = nn.functional.cosine_similarity(flat[:, None], flat[None], dim=-1)
    assert torch.allclose(result["matrices"]["blocks.1.mlp.fc1"], expected, atol=1e-5)
    off = expected[~torch.eye(3, dtype=torch.bool)].mean().item()
    assert abs(result["layers"]["blocks.1.mlp.fc1"] - off) < 1e-5
    assert abs(result["mean"] - sum(result["layers"].values()) / 4) < 1e-9


def test_similarity_of_identical_and_orthogonal_experts():
    a = torch.tensor([[1.0, 0.0], [2.0, 0.0], [0.0, 1.0]])     # experts 0 and 1 parallel, 2 orthogonal
    b = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    sims = cosine_matrix(a, b)
    assert torch.allclose(sims, torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.0, 1.0]]))
    assert torch.equal(cosine_matrix(a, torch.zeros(2, 3)), torch.zeros(3, 3))  # B = 0 at init: 0, not NaN
    assert expert_similarity(build("vit", []))["mean"] is None


def test_describe_and_families_table_is_shared():
    model = build("swin", [mlae_rule(rank=4, expert_rank=2, strategy="stochastic", p=0.25, slices=["v"])])
    assert {t.detail for t in model.surgeon_plan.targets} == {"2 experts x rank 2, p 0.25, v"}
    assert set(FAMILIES) >= {"vit", "deit", "swin", "convnext", "eva02", "beit", "swinv2"}
