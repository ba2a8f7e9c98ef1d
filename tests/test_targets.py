"""Semantic targets: what ``{attention: [q, v]}``, ``{mlp: block}``, ``{blocks: "0:6"}`` ... resolve to on
each kind of backbone (fused qkv, separate q/k/v, q + fused kv, per-head layouts, CNNs), the family
conventions table checked against the attention modules' own forward passes, the refusals and
their reasons, and the recipe-level checks."""
from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torch.nn as nn

import surgeon
from surgeon.errors import RecipeError
from surgeon.methods.targets import SemanticTarget, build_target
from surgeon.anatomy.structure import anatomy, norm_before
from surgeon.anatomy.conventions import FAMILIES, FUSED_LAYOUTS, class_key, fused_layout
from surgeon.surgery.targets import TargetError, describe_matches, resolve_target

from .helpers import ROOT

warnings.filterwarnings("ignore", message=".*pretrained is false.*")

TINY = {
    "vit": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 3}),
    "pvt_v2": ("pvt_v2_b0", {"depths": [1, 1, 1, 1], "pretrained_cfg_overlay": {"input_size": [3, 32, 32]}}),
    "levit": ("levit_128s", {"img_size": 64}),
    "cait": ("cait_xxs24_224", {"img_size": 32, "patch_size": 8, "depth": 2, "depth_token_only": 1}),
    "eva02": ("eva02_tiny_patch14_224", {"img_size": 28, "depth": 2}),
    "swinv2": ("swinv2_tiny_window8_256", {"img_size": 32, "window_size": 4, "embed_dim": 32, "depths": [1, 1],
                                           "num_heads": [2, 4]}),
    "convnext": ("test_convnext", {}),
    "resnet": ("test_resnet", {}),
}


def tiny(key: str, device: str | None = None) -> nn.Module:
    name, kwargs = TINY[key]
    torch.manual_seed(0)
    with warnings.catch_warnings(), torch.device(device or "cpu"):
        warnings.simplefilter("ignore")
        return timm.create_model(name, num_classes=5, **kwargs)


def resolve(key: str, target: dict):
    return resolve_target(tiny(key, "meta"), build_target(target))


def names(matches) -> list[str]:
    return [m.name for m in matches]


# --------------------------------------------------------------------------- resolution

def test_vit_targets_resolve_to_the_modules_the_globs_name():
    c = 192
    qv = resolve("vit", {"attention": ["q", "v"]})
    assert names(qv) == [f"blocks.{i}.attn.qkv" for i in range(3)]
    assert qv[0].rows == {"q": ((0, c),), "v": ((2 * c, 3 * c),)}  # the thirds `slices: [q, v]` adapts
    assert [m.rows for m in resolve("vit", {"attention": "qkv"})] == [None] * 3  # whole, one pair
    assert names(resolve("vit", {"attention": "block"})) == [f"blocks.{i}.attn" for i in range(3)]
    assert names(resolve("vit", {"attention": ["proj"]})) == [f"blocks.{i}.attn.proj" for i in range(3)]
    assert names(resolve("vit", {"mlp": "block"})) == [f"blocks.{i}.mlp" for i in range(3)]
    assert names(resolve("vit", {"mlp": ["fc1", "fc2"]}))[:2] == ["blocks.0.mlp.fc1", "blocks.0.mlp.fc2"]
    assert names(resolve("vit", {"mlp": "norm"})) == [f"blocks.{i}.norm2" for i in range(3)]
    assert names(resolve("vit", {"attention": "norm"})) == [f"blocks.{i}.norm1" for i in range(3)]
    assert names(resolve("vit", {"blocks": "0:2"})) == ["blocks.0", "blocks.1"]
    # combined: union in model order (the order the glob list gives), restricted to the blocks
    both = resolve("vit", {"attention": "block", "mlp": "block", "blocks": "-2:"})
    assert names(both) == ["blocks.1.attn", "blocks.1.mlp", "blocks.2.attn", "blocks.2.mlp"]
    assert names(resolve("vit", {"attention": ["q", "v"], "blocks": 1})) == ["blocks.1.attn.qkv"]
    assert describe_matches(qv) == "3 × blocks.*.attn.qkv [q, v]"


def test_pvt_v2_q_and_fused_kv():
    """PVTv2 has a separate q and a fused [k | v]: q whole, v the second half of kv."""
    matches = resolve("pvt_v2", {"attention": ["q", "v"]})
    first = [m for m in matches if m.name.startswith("stages.0.")]
    assert [(m.name, m.rows) for m in first] == [("stages.0.blocks.0.attn.q", None),
                                                 ("stages.0.blocks.0.attn.kv", {"v": ((32, 64),)})]
    assert {m.name.rsplit(".", 1)[1] for m in resolve("pvt_v2", {"attention": "qkv"})} == {"q", "kv"}


def test_levit_per_head_layout_through_linear_norm():
    """LeViT: qkv is a Linear + BatchNorm (patch the Linear); q, k, v interleave per head with
    key_dim 16 and value dim 4 x 16 = 64."""
    model = tiny("levit", "meta")
    matches = resolve_target(model, build_target({"attention": ["q", "v"]}))
    first = matches[0]
    assert first.name == "stages.0.blocks.0.attn.qkv.linear" and isinstance(first.module, nn.Linear)
    attn = model.stages[0].blocks[0].attn
    width = 2 * attn.key_dim + attn.val_dim
    assert len(first.rows["q"]) == attn.num_heads
    assert first.rows["q"][1] == (width, width + attn.key_dim)
    assert first.rows["v"][0] == (2 * attn.key_dim, width)
    # The downsampling attention: q is a Sequential(Subsample, LinearNorm), kv per head [k | v].
    down = [m for m in matches if "attn_downsample" in m.name]
    assert {m.name.rsplit(".", 2)[-2] for m in down} == {"ln", "kv"}


def test_separate_q_k_v_and_swiglu_fc1():
    cait = resolve("cait", {"attention": ["q", "v"]})
    assert "blocks_token_only.0.attn.q" in names(cait) and "blocks_token_only.0.attn.v" in names(cait)
    assert "blocks_token_only.0.attn.k" not in names(cait)
    glu = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=1, mlp_layer=timm.layers.SwiGLU)
    matches = resolve_target(glu, build_target({"mlp": ["fc1"]}))
    assert names(matches) == ["blocks.0.mlp.fc1_g", "blocks.0.mlp.fc1_x"]  # both halves of SwiGLU


def test_post_norm_blocks_have_no_norm_in_front():
    model = tiny("swinv2", "meta")
    assert norm_before(model, "layers.0.blocks.0.mlp") is None            # SwinV2: mlp, then norm2
    assert norm_before(tiny("vit", "meta"), "blocks.0.mlp") == "blocks.0.norm2"


def test_cnn_blocks_stand_for_their_mlp_when_they_keep_the_shape():
    model = tiny("resnet", "meta")
    anat = anatomy(model)
    assert [n for n, _ in anat.blocks] == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    matches = resolve_target(model, build_target({"mlp": "block"}))
    assert names(matches) == ["layer1.0"]  # the only block that keeps its input's shape (no stride, same width)


@pytest.mark.parametrize("key,target,needle", [
    ("convnext", {"attention": ["q", "v"]}, "no attention in ConvNeXt (test_convnext): its blocks mix tokens "
                                            "with a 7x7 depthwise convolution"),
    ("resnet", {"attention": "qkv"}, "no attention in ResNet (test_resnet): it is a convolutional network"),
    ("vit", {"blocks": "5:9"}, "selects none of the model's 3 blocks"),
    ("vit", {"blocks": 3}, "the model has 3 blocks (0..2)"),
    ("swinv2", {"mlp": "norm"}, "SwinV2 has no norm in front of its MLP"),
])
def test_refusals_say_why(key, target, needle):
    with pytest.raises(TargetError) as exc:
        resolve(key, target)
    assert needle in str(exc.value)


def test_every_family_in_the_table_has_a_name():
    from timm.models import _registry

    families = {_registry._model_to_module[n] for n in timm.list_models()  # timm's own (not surgeon's builtin)
                if _registry._model_entrypoints[n].__module__.startswith("timm.")}
    assert families <= set(FAMILIES), sorted(families - set(FAMILIES))


# --------------------------------------------------------------------------- the layouts, checked

# One model per layout of the table (and timm's default thirds/halves), small enough for a test.
LAYOUT_MODELS = [
    ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 1}),      # thirds
    ("pvt_v2_b0", {"depths": [1, 1, 1, 1], "pretrained_cfg_overlay": {"input_size": [3, 32, 32]}}),  # [k | v]
    ("levit_128s", {"img_size": 64}),                                              # per head [kd, kd, vd]
    ("efficientformer_l1", {}),                                                    # per head, last stage
    ("tiny_vit_5m_224", {}),                                                       # per head, norm inside
    ("efficientvit_m0", {"img_size": 64}),                                         # cascaded heads [kd, kd, vd]
    ("shvit_s1", {}),                                                              # split [qk, qk, pdim]
    ("efficientvit_b0", {}),                                                       # LiteMLA per head
    ("mobilevitv2_050", {}),                                                       # [1 | d | d]
    ("gcvit_xxtiny", {"img_size": 64}),                                            # global blocks: [k | v]
    ("convit_tiny", {"img_size": 32, "patch_size": 8, "depth": 2, "local_up_to_layer": 1}),  # qk + v, qkv
]


def _attention_calls(model: nn.Module, sites, x: torch.Tensor) -> dict[str, tuple]:
    """The (args, kwargs) each attention module is called with in one forward pass."""
    calls, hooks = {}, []
    for site in sites:
        def grab(mod, args, kwargs, name=site.name):
            calls.setdefault(name, (args, kwargs))
        hooks.append(site.module.register_forward_pre_hook(grab, with_kwargs=True))
    with torch.no_grad():
        model(x)
    for h in hooks:
        h.remove()
    return calls


@pytest.mark.parametrize("name,kwargs", LAYOUT_MODELS, ids=[m for m, _ in LAYOUT_MODELS])
def test_fused_layouts_match_the_attention_forward(name, kwargs):
    """For every fused projection, zero the rows the layout calls v (weights and bias): the
    attention then computes with v = 0, so its output no longer depends on its input. If the
    rows were wrong, some of v would be left and the output would still vary. Parts partition
    the rows."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model(name, num_classes=5, **kwargs).eval()
    anat = anatomy(model)
    fused = [s for s in anat.attentions if any(p.role in ("qkv", "kv", "qk") for p in s.projections)]
    assert fused, f"{name}: no fused projection found"
    size = timm.data.resolve_input_data_config(model)["input_size"]
    calls = _attention_calls(model, fused, torch.randn(2, *size))
    checked = 0
    for site in fused:
        if site.name not in calls:
            continue
        args, kw = calls[site.name]
        with torch.no_grad():
            for p in site.projections:
                if p.role not in ("qkv", "kv", "qk"):
                    continue
                out = p.module.weight.shape[0]
                rows = sorted(r for spans in p.layout.values() for span in spans for r in range(*span))
                assert rows == list(range(out)), f"{p.name}: parts do not partition the {out} rows"
                if "v" not in p.layout:
                    continue
                for r0, r1 in p.layout["v"]:
                    p.module.weight[r0:r1] = 0
                    if p.module.bias is not None:
                        p.module.bias[r0:r1] = 0
            if not any("v" in (p.layout or {}) for p in site.projections if p.role in ("qkv", "kv", "qk")):
                continue  # q/k fused, v separate (ConViT's GPSA): nothing to zero here
            a = site.module(*args, **kw)
            b = site.module(torch.randn_like(args[0]) * 3 + 1, *args[1:], **kw)
        assert torch.allclose(a, b, atol=1e-5), f"{site.name} ({class_key(site.module)}): v rows are wrong"
        checked += 1
    assert checked, f"{name}: no attention with a fused v was called"


def test_layout_table_classes_exist():
    """Every class the table names is importable from timm (a renamed class would silently fall back)."""
    import importlib

    for key in FUSED_LAYOUTS:
        module, _, cls = key.rpartition(".")
        assert hasattr(importlib.import_module(module), cls), key


def test_unknown_fused_layout_is_thirds_only_when_it_divides():
    attn = nn.Module()
    assert fused_layout(attn, "qkv", 12) == {"q": ((0, 4),), "k": ((4, 8),), "v": ((8, 12),)}
    assert fused_layout(attn, "kv", 6) == {"k": ((0, 3),), "v": ((3, 6),)}
    assert fused_layout(attn, "qkv", 13) is None


# --------------------------------------------------------------------------- recipes and the driver

def _recipe(target, method: str = "lora", cfg: dict | None = None, model: str = "vit", **extra) -> dict:
    name, kwargs = TINY[model]
    return {"name": "t", "model": {"name": name, "pretrained": False, "num_classes": 5, "kwargs": kwargs},
            "surgery": [{"target": target, method: cfg if cfg is not None else {"rank": 4}, **extra}]}


def test_semantic_target_in_a_recipe_is_typed_and_shown():
    recipe = surgeon.load_recipe(_recipe({"attention": ["q", "v"], "blocks": "0:2"}))
    rule = recipe.surgery[0]
    assert rule.target == SemanticTarget(attention=("q", "v"), blocks="0:2")
    model = surgeon.build_model(recipe, weights=False, device="meta")
    match = model.surgeon_plan.matches[0]
    assert match["selector"] == "{attention: [q, v], blocks: 0:2}"
    assert match["resolved"] == "2 × blocks.*.attn.qkv [q, v]" and match["count"] == 2
    assert {t.detail for t in model.surgeon_plan.targets} == {"rank 4, alpha 4, q+v"}


def test_semantic_lora_equals_slices_lora_bit_for_bit():
    """`{attention: [q, v]}` on ViT is exactly `**.blocks.*.attn.qkv` with `slices: [q, v]`: same
    tensors, same initial draws, same names."""
    torch.manual_seed(0)
    glob = surgeon.build_model(_recipe("**.blocks.*.attn.qkv", cfg={"rank": 4, "slices": ["q", "v"]}), weights=False)
    torch.manual_seed(0)
    sem = surgeon.build_model(_recipe({"attention": ["q", "v"]}), weights=False)
    a, b = glob.state_dict(), sem.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("target,needle", [
    ({"attention": ["q", "x"]}, "surgery.0.target"),
    ({"mlp": "fc3"}, "surgery.0.target"),
    ({"blocks": "1-3"}, "surgery.0.target"),
    ({}, "surgery.0.target"),
    ({"attention": "block", "heads": 2}, "surgery.0.target"),
])
def test_malformed_semantic_targets_are_located_recipe_errors(target, needle):
    with pytest.raises(RecipeError, match=needle.replace(".", r"\.")):
        surgeon.load_recipe(_recipe(target))


def test_slices_with_a_semantic_target_is_a_recipe_error():
    with pytest.raises(RecipeError, match=r"surgery\.0\.lora\.slices.*names its own parts"):
        surgeon.load_recipe(_recipe({"attention": "qkv"}, cfg={"rank": 4, "slices": ["q"]}))


def test_adapter_cannot_take_parts_of_a_fused_projection():
    recipe = surgeon.load_recipe(_recipe({"attention": ["q", "v"]}, "adapter", {"bottleneck": 4}))
    with pytest.raises(RecipeError, match="parts of fused projections .* which adapter cannot patch"):
        surgeon.build_model(recipe, weights=False, device="meta")


def test_refusal_is_a_located_recipe_error():
    recipe = surgeon.load_recipe(_recipe({"attention": ["q", "v"]}, model="convnext"))
    with pytest.raises(RecipeError) as exc:
        surgeon.build_model(recipe, weights=False, device="meta")
    assert "surgery.0.target" in str(exc.value) and "no attention in ConvNeXt" in str(exc.value)


def test_a_union_target_half_missing_is_said_not_silently_dropped():
    """Houlsby's `{attention: block, mlp: block}` on a CNN patches the MLP half; the user hears that the
    attention half had nothing to patch (a warning at the rule, and `unmatched` in the plan)."""
    from surgeon.errors import SurgeonWarning
    recipe = surgeon.load_recipe(_recipe({"attention": "block", "mlp": "block"}, "adapter", {"bottleneck": 4},
                                         model="convnext"))
    with pytest.warns(SurgeonWarning, match=r"surgery\.0\.target|no attention in ConvNeXt") as record:
        model = surgeon.build_model(recipe, weights=False, device="meta")
    message = " ".join(str(w.message) for w in record if issubclass(w.category, SurgeonWarning))
    assert "no attention in ConvNeXt" in message and "only the rest of the target is patched" in message
    match = model.surgeon_plan.matches[0]
    assert match["count"] > 0 and "mlp" in match["resolved"]
    assert len(match["unmatched"]) == 1 and "no attention in ConvNeXt" in match["unmatched"][0]
    with warnings.catch_warnings():  # both halves present (ViT): nothing to say
        warnings.simplefilter("error", SurgeonWarning)
        vit = surgeon.build_model(surgeon.load_recipe(_recipe({"attention": "block", "mlp": "block"}, "adapter",
                                                              {"bottleneck": 4})), weights=False, device="meta")
    assert "unmatched" not in vit.surgeon_plan.matches[0]


def test_input_from_the_norm_in_front():
    """`input_from: {mlp: norm}` reads norm2's input on ViT (as [norm2, norm] does) and, on a
    post-norm SwinV2 block, the MLP's own input (the residual stream)."""
    cfg = {"bottleneck": 4, "input_from": {"mlp": "norm"}}
    vit = surgeon.build_model(_recipe({"mlp": "block"}, "adapter", cfg), weights=False)
    assert vit.blocks[0].mlp.input_from == "norm2"
    swin = surgeon.build_model(_recipe({"mlp": "block"}, "adapter", cfg, model="swinv2"), weights=False)
    assert swin.layers[0].blocks[0].mlp.input_from is None
    # the named form on SwinV2 reads norm2, which runs after the MLP: the probe refuses it
    with pytest.raises(RecipeError, match="did not run before it"):
        surgeon.build_model(_recipe({"mlp": "block"}, "adapter", {"bottleneck": 4, "input_from": ["norm2"]},
                                    model="swinv2"), weights=False)


def test_norms_as_targets_for_unfreeze():
    model = surgeon.build_model(_recipe({"mlp": "norm"}, "unfreeze", "all"), weights=False, device="meta")
    trained = {n for n, p in model.named_parameters() if p.requires_grad and not n.startswith("head")}
    assert trained == {f"blocks.{i}.norm2.{w}" for i in range(3) for w in ("weight", "bias")}


@pytest.mark.parametrize("recipe", ["lora", "dora", "mosl", "sparse_lora", "lora_r8", "mlae", "mlae_fixed",
                                    "mlae_mixed", "adaptformer", "mosa_hier", "mosa_flat", "sparse_adapter",
                                    "pfeiffer", "houlsby"])
def test_shipped_recipes_use_semantic_targets(recipe):
    rule = surgeon.load_recipe(ROOT / "recipes" / f"{recipe}.yaml").surgery[0]
    assert isinstance(rule.target, SemanticTarget)


def test_lora_recipe_on_pvt_v2_counts_q_and_the_v_half():
    """`surgeon apply recipes/lora.yaml --model pvt_v2_b0`: rank 16 on q (C -> C) and on the v half
    of kv (C -> C) in every block: 2 x 16 x (C + C) per block."""
    recipe = surgeon.load_recipe(ROOT / "recipes" / "lora.yaml", overrides={"model.name": "pvt_v2_b0",
                                                                           "model.pretrained": False})
    model = surgeon.build_model(recipe, weights=False, device="meta")
    widths, depths = [32, 64, 160, 256], [2, 2, 2, 2]
    assert model.surgeon_plan.extra_params == sum(d * 2 * 16 * 2 * c for c, d in zip(widths, depths))
