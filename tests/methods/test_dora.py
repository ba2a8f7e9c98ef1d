"""DoRA: the weight decomposition W' = m ⊙ (W + ΔW) / ‖W + ΔW‖_row against explicit formulas —
fast path, weight path, Conv2d, slices, PEFT's dropout semantics, the norm as a constant in
backward — its initialisation, its parameter count and its recipe. (Zero init, effect, exact
merge, plain-timm load, NaN refusal and round trip on every family: test_conformance.py.)
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import surgeon
from surgeon.errors import RecipeError

from ..helpers import ROOT
from .families import QKV, build, image, rel_err
from .families import low_rank_layers as layers
from .families import perturb_low_rank as perturb


def dora_rule(target=QKV, rank=4, alpha=8, slices=None, dropout=0.0):
    return {"target": target, "dora": {"rank": rank, "alpha": alpha, "slices": slices, "dropout": dropout}}


def explicit_weight(layer, *, detach_norm: bool = True) -> torch.Tensor:
    """W' from the layer's tensors by the paper's formula, written out row by row."""
    weight = layer.base_layer.weight
    delta = torch.zeros_like(weight)
    m = torch.ones(weight.shape[0])
    col = 0
    adapted = torch.zeros(weight.shape[0], dtype=torch.bool)
    for name, spans in layer.parts:
        a, b = layer.down[name].weight, layer.up[name].weight
        rows = torch.cat([torch.arange(r0, r1) for r0, r1 in spans])  # the group's rows, in B's order
        delta[rows] = (layer.weighting.scaling * b @ a).reshape(delta[rows].shape)
        m = m.index_put((rows,), layer.magnitude[col:col + len(rows)])
        adapted[rows] = True
        col += len(rows)
    combined = weight + delta
    norm = combined.flatten(1).norm(dim=1)
    norm = norm.detach() if detach_norm else norm
    scale = torch.where(adapted, m / norm, torch.ones_like(norm))
    return combined * scale.reshape(-1, *([1] * (weight.dim() - 1)))


@pytest.mark.parametrize("slices", [None, ["q", "v"], ["k"]])
def test_fast_and_weight_paths_equal_the_decomposed_weight(slices):
    model = build("vit", [dora_rule(slices=slices)])
    perturb(model)
    layer = layers(model)[0]
    x = torch.randn(2, 5, layer.in_features)
    expected = F.linear(x, explicit_weight(layer), layer.bias)
    for mode in (layer.train, layer.eval):  # no dropout: training and eval compute the same
        mode()
        assert rel_err(layer(x), expected) < 1e-5
    assert rel_err(F.linear(x, layer.weight, layer.bias), expected) < 1e-5  # what BEiT/EVA-02/SwinV2 use
    if slices:  # rows outside the adapted thirds are the base layer's, untouched
        w = layer.weight.detach()
        for third, (lo, hi) in zip("qkv", [(0, 192), (192, 384), (384, 576)]):
            if third not in slices:
                assert torch.equal(w[lo:hi], layer.base_layer.weight[lo:hi])


def test_conv2d_norm_runs_over_in_kh_kw_per_output_channel():
    model = build("convnext", [dora_rule("stem.0", rank=3, alpha=3)])
    perturb(model)
    layer = layers(model)[0]
    conv = layer.base_layer
    x = torch.randn(2, 3, 32, 32)
    expected = F.conv2d(x, explicit_weight(layer), conv.bias, conv.stride, conv.padding)
    assert rel_err(layer(x), expected) < 1e-5


def test_magnitude_starts_at_the_row_norms_and_the_layer_at_the_backbone():
    model = build("vit", [dora_rule(slices=["q", "v"])])
    layer = layers(model)[0]
    w = layer.base_layer.weight
    torch.testing.assert_close(layer.magnitude, torch.cat([w[:192].norm(dim=1), w[384:].norm(dim=1)]))
    assert torch.equal(layer.weight, w)  # B = 0 and m = ‖W‖: exactly W
    assert not any(m.weight.any() for m in layer.up.values())


def test_the_norm_is_a_constant_in_backward():
    """Gradients are those of the formula with ‖W + ΔW‖ detached (paper §4.3, PEFT), not of the
    fully differentiated one."""
    model = build("vit", [dora_rule(slices=["q", "v"])])
    perturb(model)
    layer = layers(model)[0].train()
    x = torch.randn(3, 4, layer.in_features)
    target = torch.randn(3, 4, layer.out_features)
    params = [layer.magnitude, layer.down["q"].weight, layer.up["v"].weight]

    def grads(out):
        return torch.autograd.grad((out - target).square().sum(), params)

    ours = grads(layer(x))
    detached = grads(F.linear(x, explicit_weight(layer, detach_norm=True), layer.bias))
    full = grads(F.linear(x, explicit_weight(layer, detach_norm=False), layer.bias))
    for g, d, f in zip(ours, detached, full):
        torch.testing.assert_close(g, d, rtol=1e-4, atol=1e-5)
    assert any(not torch.allclose(d, f, rtol=1e-2, atol=1e-4) for d, f in zip(detached, full))


def test_input_dropout_follows_peft():
    """With dropout in training, PEFT rescales the base term computed from the dropped input:
    y = x Wᵀ + b + (s - 1) ⊙ (drop(x) Wᵀ) + s ⊙ (α/r) B A drop(x), s = m / ‖W + ΔW‖ (detached)."""
    model = build("vit", [dora_rule(dropout=0.5)])
    perturb(model)
    layer = layers(model)[0].train()
    x = torch.randn(2, 5, layer.in_features)
    torch.manual_seed(3)
    y = layer(x)
    torch.manual_seed(3)
    dropped = layer.dropout(x)  # the same mask
    w, a, b, s = layer.base_layer.weight, layer.down["all"].weight, layer.up["all"].weight, layer.weighting.scaling
    scale = layer.magnitude / (w + s * b @ a).norm(dim=1)
    expected = F.linear(x, w, layer.bias) + (scale - 1) * F.linear(dropped, w) + scale * (s * dropped @ a.T @ b.T)
    w_prime = explicit_weight(layer)
    assert rel_err(y, expected) < 1e-5
    assert not torch.allclose(y, F.linear(x, w_prime, layer.bias))  # dropout did act
    layer.eval()
    assert rel_err(layer(x), F.linear(x, w_prime, layer.bias)) < 1e-5


def test_weight_path_trains_every_tensor():
    model = build("beit", [dora_rule(slices=["q", "v"])])
    perturb(model)
    model.train()
    model(image(model)).square().mean().backward()
    for layer in layers(model):
        assert layer.probe_hits > 0  # the parent read .weight (it never calls the layer)
        assert layer.magnitude.grad is not None and layer.magnitude.grad.abs().sum() > 0
        for mat in [*layer.down.values(), *layer.up.values()]:
            assert mat.weight.grad is not None and mat.weight.grad.abs().sum() > 0


def test_parameter_count_is_loras_plus_the_magnitudes():
    lora = build("vit", [{"target": QKV, "lora": {"rank": 4, "alpha": 8, "slices": ["q", "v"]}}])
    dora = build("vit", [dora_rule(slices=["q", "v"])])
    rows = 2 * 2 * 192  # 2 blocks x (q, v) x 192 output units
    assert dora.surgeon_plan.extra_params == lora.surgeon_plan.extra_params + rows == 2 * 2 * (4 * 192 * 2) + rows
    assert {t.detail for t in dora.surgeon_plan.targets} == {"rank 4, alpha 8, q+v, magnitude per output unit"}


def test_merge_is_fp32_and_casts_back():
    model = build("vit", [dora_rule(slices=["q"])])
    perturb(model)
    layer = layers(model)[0]
    expected = explicit_weight(layer).detach()
    layer.base_layer.to(torch.bfloat16)
    base = layer.base_layer.weight.detach().float()
    layer.base_layer.float()
    layer.base_layer.weight.data.copy_(base)  # the bf16-rounded weight, as fp32 for the reference
    expected = explicit_weight(layer).detach().to(torch.bfloat16)
    layer.base_layer.to(torch.bfloat16)
    merged = layer.merge()
    assert merged.weight.dtype == torch.bfloat16 and torch.equal(merged.weight, expected)


def test_shipped_recipe_reproduces_loras_params_plus_the_magnitudes():
    r = surgeon.load_recipe(ROOT / "recipes" / "dora.yaml", overrides={"model.pretrained": False})
    plan = surgeon.build_model(r, weights=False, device="meta").surgeon_plan
    assert plan.extra_params == 589_824 + 12 * 2 * 768 == 608_256  # LoRA-16 q,v (MoSA Table 13) + m
    assert {t.method for t in plan.targets} == {"dora"} and len(plan.targets) == 12
    assert r.train == surgeon.load_recipe(ROOT / "recipes" / "lora.yaml").train  # trained as lora.yaml


@pytest.mark.parametrize("section,needle", [
    ({"experts": {"count": 4}}, "experts (MoSA) apply to adapter or lora rules, not dora"),
    ({"prune": {"keep": 0.5}}, "prune applies to adapter or lora rules, not dora"),
])
def test_dora_takes_no_modifiers(section, needle):
    with pytest.raises(RecipeError) as exc:
        surgeon.load_recipe({"name": "d", "model": {"name": "vit_tiny_patch16_224", "pretrained": False},
                             "surgery": [{**dora_rule(), **section}]}, check_model=False)
    assert needle in str(exc.value)


def test_report_sentence():
    from surgeon.report.run_report import describe_rule

    assert describe_rule(dora_rule(slices=["q", "v"])) == (
        "`**.blocks.*.attn.qkv`: DoRA rank 4, α 8 (scale 2): LoRA direction, learned magnitude per output unit, "
        "on the q, v slices of the fused layer")
