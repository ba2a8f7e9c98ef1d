"""LoRA, MoSL and SparseLoRA: the two paths of the low-rank layer, slices, the papers' counts,
expert draws, pruning under AdamW, fp32 merge, user errors. (Merge, plain-timm load and the
shared checks of every family: tests/methods/test_conformance.py.)
"""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn

import surgeon
from surgeon.errors import RecipeError, UserError
from surgeon.methods.lowrank import LowRankLayer, block_up, stack_down
from surgeon.methods.matrices import ExpertSplitMatrix, PrunedMatrix

from ..helpers import ROOT
from .families import FAMILIES, QKV, build, image, rel_err
from .families import low_rank_layers as layers
from .families import perturb_low_rank as perturb


# --------------------------------------------------------------------------- rules

def lora_rule(target, rank=4, slices=None, **extra):
    return {"target": target, "lora": {"rank": rank, "alpha": 2 * rank, "slices": slices}, **extra}


MOSL_FLAT = {"count": 4, "sparse": ["down", "up"]}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_on_qkv_takes_effect_in_every_family(family):
    if not FAMILIES[family].qkv:
        rules, target = [lora_rule("**.blocks.*.mlp.fc1")], nn.Conv2d if family == "convnext" else nn.Linear
    else:
        rules, target = [lora_rule(QKV, slices=["q", "v"])], nn.Linear
    model = build(family, rules).eval()
    patched = layers(model)
    assert patched and all(isinstance(layer.base_layer, target) for layer in patched)
    calls = []
    for layer in patched:
        layer.register_forward_pre_hook(lambda m, a: calls.append(m))
        layer.probe_hits = 0
    x = image(model)
    with torch.no_grad():
        before = model.forward_features(x)
        assert torch.equal(model.forward_features(x), before)  # B = 0: the identity at start
        perturb(model)
        after = model.forward_features(x)
    assert rel_err(after, before) > 1e-3
    if FAMILIES[family].bypass:
        # The parent never calls the wrapper: the delta arrives through the weight property.
        assert not calls
        assert all(layer.probe_hits > 0 for layer in patched)
    else:
        assert len(calls) == 3 * len(patched)  # three forwards above


def test_weight_path_trains_and_matches_the_fast_path():
    model = build("beit", [lora_rule(QKV, slices=["q", "v"])])
    perturb(model)
    model.train()
    model(image(model)).square().mean().backward()
    for layer in layers(model):
        for mat in [*layer.down.values(), *layer.up.values()]:
            assert mat.weight.grad is not None and mat.weight.grad.abs().sum() > 0
    # For a layer that is called, forward == F.linear with the materialised weight.
    layer = layers(build("vit", [lora_rule(QKV, slices=["q", "v"])]))[0]
    perturb(nn.Sequential(layer))
    x = torch.randn(2, 5, layer.in_features)
    with torch.no_grad():
        assert rel_err(layer(x), nn.functional.linear(x, layer.weight, layer.bias)) < 1e-5


def test_slices_touch_only_their_thirds():
    model = build("vit", [lora_rule(QKV, slices=["q", "v"])])
    perturb(model)
    layer = layers(model)[0].eval()
    dim = layer.in_features
    x = torch.randn(3, 7, dim)
    with torch.no_grad():
        diff = layer(x) - layer.base_layer(x)
        delta = layer.delta_weight()
        w_diff = layer.weight - layer.base_layer.weight
    q, k, v = slice(0, dim), slice(dim, 2 * dim), slice(2 * dim, 3 * dim)
    assert torch.all(diff[..., k] == 0) and torch.all(delta[k] == 0) and torch.all(w_diff[k] == 0)
    for third in (q, v):
        assert diff[..., third].abs().max() > 1e-3 and delta[third].abs().max() > 1e-3
    # one (A, B) pair per slice, each B covering one third
    assert set(layer.down) == {"q", "v"} and all(b.weight.shape == (dim, 4) for b in layer.up.values())


def test_slice_order_in_recipe_does_not_matter():
    a = build("vit", [lora_rule(QKV, slices=["v", "q"])], seed=5).state_dict()
    b = build("vit", [lora_rule(QKV, slices=["q", "v"])], seed=5).state_dict()
    assert list(a) == list(b) and any(".down.q." in k for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_parameter_counts_tiny():
    # ViT-tiny: dim 192, 2 blocks. LoRA r=4 on q,v: 2 slices × (4·192 + 192·4) per block.
    model = build("vit", [lora_rule(QKV, slices=["q", "v"])])
    assert model.surgeon_plan.extra_params == 2 * 2 * (4 * 192 + 192 * 4)
    assert model.surgeon_plan.trainable_params == model.surgeon_plan.extra_params + model.surgeon_plan.head_params
    # SparseLoRA counts only the kept entries; MoSL its dense size.
    sparse = build("vit", [lora_rule(QKV, slices=["q", "v"], prune={"keep": 0.5})])
    assert sparse.surgeon_plan.extra_params == 2 * 2 * 2 * round(0.5 * 4 * 192)
    mosl = build("vit", [lora_rule(QKV, slices=["q", "v"], experts=MOSL_FLAT)])
    assert mosl.surgeon_plan.extra_params == 2 * 2 * (4 * 192 + 192 * 4)
    # Conv k×k: A is [r, in·kh·kw], B is [out, r]; ConvNeXt atto fc1 is a 1x1 conv 16 -> 64 etc.
    conv = build("convnext", [lora_rule("stem.0", rank=3), lora_rule("stages.1.downsample.1", rank=2)])
    assert conv.surgeon_plan.extra_params == 3 * (3 * 4 * 4) + 16 * 3 + 2 * (16 * 2 * 2) + 32 * 2


@pytest.mark.parametrize("recipe,display,expected", [
    ("lora", "lora", 589_824), ("mosl", "mosl", 589_824), ("sparse_lora", "sparse_lora", 147_456)])
def test_shipped_recipes_reproduce_the_papers_params(recipe, display, expected):
    # MoSA Table 13 (ViT-B/16): LoRA-16 0.59M, MoSL-16 0.59M, SparseLoRA-16 0.15M.
    r = surgeon.load_recipe(ROOT / "recipes" / f"{recipe}.yaml", overrides={"model.pretrained": False})
    model = surgeon.build_model(r, weights=False, device="meta")
    plan = model.surgeon_plan
    assert plan.extra_params == expected
    assert {t.method for t in plan.targets} == {display} and len(plan.targets) == 12
    assert round(plan.backbone_params / 1e6, 2) == 85.80


def test_mosl_matrices_and_reproducible_draws():
    rules = [lora_rule(QKV, slices=["q", "v"], experts={"count": 4, "sparse": ["up"]})]

    def train_outputs(seed):
        model = build("vit", rules, seed=seed)
        layer = layers(model)[0]
        assert all(isinstance(m, ExpertSplitMatrix) for m in layer.up.values())
        assert not any(isinstance(m, ExpertSplitMatrix) for m in layer.down.values())  # hierarchical: A dense
        perturb(model)
        model.train()
        x = image(model)
        with torch.no_grad():
            return [model(x) for _ in range(3)]

    a, b, c = train_outputs(7), train_outputs(7), train_outputs(8)
    assert all(torch.equal(u, v) for u, v in zip(a, b))
    assert not all(torch.equal(u, v) for u, v in zip(a, c))
    assert not all(torch.equal(a[0], u) for u in a[1:])  # draws change between forwards


def test_sparse_lora_pruned_entries_stay_zero_under_adamw():
    model = build("vit", [lora_rule(QKV, slices=["q", "v"], prune={"keep": 0.5})])
    matrices = [m for m in model.modules() if isinstance(m, PrunedMatrix)]
    assert len(matrices) == 2 * 2 * 2  # 2 blocks × 2 slices × (A, B)
    for m in matrices:
        assert m.kept == round(0.5 * m.weight.numel()) and not m.weight[~m.mask].any()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2, weight_decay=0.1)
    model.train()
    x = image(model, batch=4)
    for _ in range(3):
        opt.zero_grad()
        model(x).logsumexp(-1).mean().backward()
        opt.step()
    for m in matrices:
        assert not m.weight[~m.mask].any()
        assert m.weight[m.mask].abs().sum() > 0  # the kept entries did train (B moved off zero)
    delta = layers(model)[0].delta_weight()
    assert torch.isfinite(delta).all()


def test_merge_refuses_non_finite_delta_and_keeps_weights():
    model = build("vit", [lora_rule(QKV, slices=["q", "v"])])
    layer = layers(model)[0]
    base = layer.base_layer.weight.detach().clone()
    with torch.no_grad():
        layer.up["v"].weight[0, 0] = float("nan")
    with pytest.raises(UserError, match="NaN/inf"):
        surgeon.merge(model)
    assert torch.equal(layer.base_layer.weight, base)


def test_merge_is_fp32_and_casts_back_to_base_dtype():
    model = build("vit", [lora_rule(QKV, slices=["q"])])
    perturb(model)
    layer = layers(model)[0]
    layer.base_layer.to(torch.bfloat16)
    base, delta = layer.base_layer.weight.detach().clone(), layer.delta_weight()
    expected = (base.float() + delta).to(torch.bfloat16)
    naive = base + delta.to(torch.bfloat16)  # bf16 arithmetic rounds twice
    assert not torch.equal(expected, naive)
    merged = layer.merge()
    assert merged.weight.dtype == torch.bfloat16
    assert torch.equal(merged.weight, expected)


def test_plan_and_display_names():
    model = build("vit", [lora_rule(QKV, slices=["q", "v"], experts=MOSL_FLAT),
                          lora_rule("**.blocks.*.mlp.fc2", prune={})])
    methods = {t.module: (t.method, t.detail) for t in model.surgeon_plan.targets}
    assert methods["blocks.0.attn.qkv"] == ("mosl", "rank 4, alpha 8, q+v, A: 4 experts, B: 4 experts")
    assert methods["blocks.1.mlp.fc2"] == ("sparse_lora", "rank 4, alpha 8, A: keep 25%, B: keep 25%")


@pytest.mark.parametrize("family,rules,needle", [
    ("vit", [lora_rule("**.blocks.*.norm1")], "is a LayerNorm, not a Linear or Conv2d"),
    ("swin", [lora_rule("**.blocks.*.mlp.fc1", slices=["q"])], "not a fused qkv"),
    ("convnext", [lora_rule("**.blocks.*.conv_dw")], "grouped convolution"),
    ("vit", [lora_rule(QKV), lora_rule("blocks.0.attn.qkv")], "already patched"),
])
def test_unpatchable_modules_are_recipe_errors(family, rules, needle):
    with pytest.raises(RecipeError, match=needle):
        build(family, rules)


def test_grouped_factors_match_per_group_products():
    # Batched consistency: per-batch-group expert weights [G, ...] mixed with dense ones.
    gen = torch.Generator().manual_seed(0)
    a_q, a_v = torch.randn(2, 3, 6, generator=gen), torch.randn(3, 6, generator=gen)
    b_q, b_v = torch.randn(4, 3, generator=gen), torch.randn(2, 4, 3, generator=gen)
    down = stack_down([a_q, a_v])
    up = block_up([b_q, b_v], [((0, 4),), ((8, 12),)], 12)
    assert down.shape == (2, 6, 6) and up.shape == (2, 12, 6)
    for g in range(2):
        expected = torch.zeros(12, 6)
        expected[0:4] = b_q @ a_q[g]
        expected[8:12] = b_v[g] @ a_v
        assert torch.allclose(up[g] @ down[g], expected, atol=1e-6)


def test_weight_path_rejects_batched_expert_groups():
    model = build("beit", [lora_rule(QKV, slices=["q", "v"], experts={"count": 2})]).train()
    model.surgeon_sampler.groups = 2
    with pytest.raises(UserError, match="batched"):
        model(image(model, batch=4))
    # A called layer handles the groups: each half of the batch gets its own expert.
    vit = build("vit", [lora_rule(QKV, slices=["q", "v"], experts={"count": 2})]).train()
    vit.surgeon_sampler.groups = 2
    assert vit(image(vit, batch=4)).shape == (4, 5)


def test_dropout_only_in_training_fast_path():
    rules = [{"target": QKV, "lora": {"rank": 4, "dropout": 0.5, "slices": ["q", "v"]}}]
    layer = layers(build("vit", rules))[0]
    perturb(nn.Sequential(layer))
    x = torch.randn(2, 3, layer.in_features)
    layer.train()
    with torch.no_grad():
        assert not torch.equal(layer(x), layer(x))
        layer.eval()
        assert torch.equal(layer(x), layer(x))


def test_alpha_scales_the_delta():
    def delta(alpha):
        model = build("vit", [{"target": QKV, "lora": {"rank": 4, "alpha": alpha}}], seed=3)
        perturb(model)
        return layers(model)[0].delta_weight()

    assert torch.allclose(delta(8.0), 2 * delta(4.0), atol=1e-6)
    assert torch.allclose(delta(None), delta(4.0))  # null alpha = rank: scale 1


def test_deepcopy_keeps_layers_working():
    model = build("vit", [lora_rule(QKV, slices=["q", "v"])])
    perturb(model)
    clone = copy.deepcopy(model).eval()
    x = image(model)
    with torch.no_grad():
        assert torch.equal(clone(x), model.eval()(x))
    assert math.isclose(sum(p.numel() for p in clone.parameters()), sum(p.numel() for p in model.parameters()))
    assert isinstance(layers(clone)[0], LowRankLayer) and layers(clone)[0].method_name == "lora"


@pytest.mark.parametrize("method,cfg", [("lora", "{rank: 4, slices: [q, v]}"), ("mlae", "{rank: 4, slices: [q]}")])
@pytest.mark.parametrize("conv_mlp", [False, True], ids=["linear_fc1", "conv_fc1"])
def test_slices_refused_on_a_layer_that_is_not_a_fused_qkv(cli, write, method, cfg, conv_mlp):
    """ConvNeXt's mlp.fc1 (24 -> 96 = 3 × 32 outputs) is not a qkv: cutting it in thirds would adapt
    arbitrary rows. The refusal names the rule's line."""
    path = write("r.yaml", "name: x\nmodel: {name: convnext_atto, pretrained: false, kwargs: "
                           f"{{dims: [24, 48, 96, 192], depths: [1, 1, 1, 1], conv_mlp: {str(conv_mlp).lower()}}}}}\n"
                           f"surgery:\n  - target: 'stages.*.blocks.*.mlp.fc1'\n    {method}: {cfg}\n")
    res = cli("validate", path)
    assert res.code == 2, res
    assert f"{path}:4:" in res.err and "stages.0.blocks.0.mlp.fc1 is not a fused qkv projection" in res.err
    assert "Traceback" not in res.text
    # Without slices the same layers are fine: the refusal is about slices only.
    path.write_text(path.read_text().replace(", slices: [q, v]", "").replace(", slices: [q]", ""))
    assert cli("validate", path).code == 0
