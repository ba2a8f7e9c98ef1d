"""Layer kinds beyond a transformer's Linear, for every method that needs them:

- the low-rank family (LoRA, MoSL, SparseLoRA, MLAE, DoRA) on k×k Conv2d (groups = 1, as PEFT)
  and on 1×1 convolutions used as linears, with exact merges that load strictly into plain timm;
- LeViT's ``LinearNorm`` (Linear + BatchNorm): the Linear is patched and the merge folds into it,
  with q/k/v interleaved per head (semantic targets find the rows);
- adapters in parallel to a CNN's residual blocks (channels-first, 1×1-conv adapters), which the
  MoSA-family recipes' ``{mlp: block}`` resolves to in a network without MLPs.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
import torch.nn as nn

import surgeon
from surgeon.methods.adapter.layer import AdapterLayer, MergedAdapter
from surgeon.methods.base import SurgeryLayer
from surgeon.methods.lowrank import LowRankLayer
from surgeon.surgery import merge

from ..helpers import ROOT
from .families import rel_err

warnings.filterwarnings("ignore", message=".*pretrained is false.*")

RESNET = {"name": "test_resnet", "pretrained": False, "num_classes": 5,
          "kwargs": {"pretrained_cfg_overlay": {"input_size": [3, 32, 32]}}}
LEVIT = {"name": "levit_128s", "pretrained": False, "num_classes": 5, "kwargs": {"img_size": 64}}


def build(model: dict, rules: list[dict], seed: int = 0) -> nn.Module:
    torch.manual_seed(0)
    recipe = {"name": "t", "model": model, "surgery": rules, "train": {"seed": seed}}
    return surgeon.build_model(recipe, weights=False).eval()


def build_shipped(recipe: str, model: dict) -> nn.Module:
    torch.manual_seed(0)
    loaded = surgeon.load_recipe(ROOT / "recipes" / f"{recipe}.yaml", overrides={
        "model.name": model["name"], "model.pretrained": False, "model.num_classes": 5, "model.kwargs": model["kwargs"]})
    return surgeon.build_model(loaded, weights=False).eval()


def plain(model: dict) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(model["name"], num_classes=5, **model["kwargs"]).eval()


def image(model: nn.Module, batch: int = 2) -> torch.Tensor:
    size = timm.data.resolve_input_data_config(model)["input_size"]
    return torch.randn(batch, *size, generator=torch.Generator().manual_seed(1))


@torch.no_grad()
def perturb(model: nn.Module, std: float = 0.2) -> None:
    gen = torch.Generator().manual_seed(2)
    head = {id(p) for p in model.get_classifier().parameters()} if not isinstance(model.get_classifier(), tuple) \
        else {id(p) for h in model.get_classifier() for p in h.parameters()}
    for p in model.parameters():
        if p.requires_grad and id(p) not in head:
            p.add_(std * torch.randn(p.shape, generator=gen))


def check_fold(model: nn.Module, spec: dict) -> None:
    """Zero init = plain timm; perturbed tensors change the output; merge is exact; the merged
    state dict loads strictly into plain timm and computes the same."""
    reference = plain(spec)
    x = image(model)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))
        perturb(model)
        y = model(x)
        assert rel_err(y, reference(x)) > 1e-3
        merge(model)
        assert not any(isinstance(m, SurgeryLayer) for m in model.modules())
        assert rel_err(model(x), y) < 1e-5
    reference.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        assert rel_err(reference(x), y) < 1e-5


CONV_METHODS = {
    "lora": {"lora": {"rank": 3, "alpha": 6}},
    "mosl": {"lora": {"rank": 3}, "experts": {"count": 3, "sparse": ["down", "up"]}},
    "sparse_lora": {"lora": {"rank": 3}, "prune": {"keep": 0.5}},
    "mlae": {"mlae": {"rank": 4, "expert_rank": 2, "masking": {"strategy": "stochastic", "p": 0.5}}},
    "dora": {"dora": {"rank": 3}},
}


@pytest.mark.parametrize("method", list(CONV_METHODS))
def test_low_rank_on_kxk_and_1x1_convolutions(method):
    """3x3 convolutions (the stride-2 stem and the blocks') and the 1x1 downsampling convolutions
    of a ResNet: A is a conv with the base's kernel, stride and padding, B a 1x1 conv."""
    rules = [{"target": ["conv1.0", "layer*.0.conv{1,2}", "layer*.0.downsample.1"], **CONV_METHODS[method]}]
    model = build(RESNET, rules)
    layers = [m for m in model.modules() if isinstance(m, LowRankLayer)]
    kernels = {m.base_layer.kernel_size for m in layers}
    assert kernels == {(3, 3), (1, 1)} and all(m.is_conv for m in layers)
    if method == "mosl":  # the batched consistency pass: each half of the batch its own expert
        trained = copy.deepcopy(model).train()  # (a copy: training mode moves BatchNorm statistics)
        trained.surgeon_sampler.groups = 2
        assert trained(image(model, batch=4)).shape == (4, 5)
    check_fold(model, RESNET)


def test_grouped_convolutions_are_refused_with_the_reason():
    with pytest.raises(surgeon.errors.RecipeError, match=r"blocks\.3\.0\.conv_dw is a grouped convolution \(groups=128\)"):
        build({"name": "test_efficientnet", "pretrained": False, "num_classes": 5,
               "kwargs": {"pretrained_cfg_overlay": {"input_size": [3, 32, 32]}}},
              [{"target": "blocks.3.0.conv_dw", "lora": {"rank": 2}}])


@pytest.mark.parametrize("recipe", ["lora", "mlae", "mosl", "dora", "sparse_lora"])
def test_levit_linear_norm_folds(recipe):
    """LeViT's qkv is LinearNorm (Linear + BatchNorm1d): the shipped recipes patch the Linear (per-head
    q/k/v rows for the sliced ones) and the merged model is plain timm."""
    model = build_shipped(recipe, LEVIT)
    layers = [m for m in model.modules() if isinstance(m, LowRankLayer)]
    assert layers and all(isinstance(m.base_layer, nn.Linear) for m in layers)
    assert any(m.target_name.endswith("attn.qkv.linear") for m in layers)
    if recipe in ("lora", "dora", "mosl", "sparse_lora"):
        attn = model.stages[0].blocks[0].attn
        first = next(m for m in layers if m.target_name == "stages.0.blocks.0.attn.qkv.linear")
        assert [g.name for g in first.parts] == ["q", "v"] and len(first.parts[0].spans) == attn.num_heads
    check_fold(model, LEVIT)


@pytest.mark.parametrize("recipe", ["mosa_hier", "adaptformer", "pfeiffer"])
def test_adapters_parallel_to_cnn_blocks(recipe):
    """In a CNN the MoSA-family recipes' `{mlp: block}` is every residual block that keeps its
    input's shape; the adapter is a pair of 1x1 convolutions on NCHW features, reading the block's
    input (there is no norm in front of it)."""
    model = build_shipped(recipe, RESNET)
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    assert [m.module_name for m in layers] == ["layer1.0"]
    assert layers[0].channel_dim == 1 and layers[0].input_from is None
    reference = plain(RESNET)
    x = image(model)
    with torch.no_grad():
        assert torch.equal(model(x), reference(x))  # W_up = 0: the backbone's function
        perturb(model)
        y = model(x)
        assert rel_err(y, reference(x)) > 1e-3
        merge(model)
        assert isinstance(model.layer1[0], MergedAdapter)
        assert rel_err(model(x), y) < 1e-5


def test_sequential_adapters_after_every_cnn_block():
    """`{blocks: all}` with sequential adapters: every block, shape-changing ones included (the
    adapter reads the block's output)."""
    model = build(RESNET, [{"target": {"blocks": "all"}, "adapter": {"placement": "sequential", "bottleneck": 4}}])
    layers = [m for m in model.modules() if isinstance(m, AdapterLayer)]
    assert [m.module_name for m in layers] == ["layer1.0", "layer2.0", "layer3.0", "layer4.0"]
    x = image(model)
    with torch.no_grad():
        perturb(model)
        y = model(x)
        merged = merge(copy.deepcopy(model))
        assert rel_err(merged(x), y) < 1e-5


def test_adapter_answers_for_the_wrapped_modules_attributes():
    """A block may read plain attributes of the module an adapter wraps (Hiera's block reads
    `attn.q_stride`): the adapter answers with the base module's, but never with a weight (a parent
    computing with it would bypass the adapter)."""
    vit = {"name": "vit_tiny_patch16_224", "pretrained": False, "num_classes": 5,
           "kwargs": {"img_size": 32, "patch_size": 8, "depth": 1}}
    model = build(vit, [{"target": {"attention": "block", "mlp": "block"},
                         "adapter": {"placement": "sequential", "bottleneck": 4}}])
    attn, mlp = model.blocks[0].attn, model.blocks[0].mlp
    assert isinstance(attn, AdapterLayer) and attn.num_heads == attn.base_layer.num_heads == 3
    assert mlp.fc1 is mlp.base_layer.fc1
    with pytest.raises(AttributeError):
        mlp.weight  # noqa: B018


def test_adapter_sizes_an_attention_from_its_output_projection():
    """An attention's output width is its `proj`'s, even when a layer registered after it computes
    something else (SwinV2-CR's position MLP, CaiT's talking heads: out = the number of heads)."""
    from surgeon.methods.adapter.layer import module_io

    attn = nn.Module()
    attn.qkv, attn.proj, attn.meta_mlp = nn.Linear(8, 24), nn.Linear(8, 8), nn.Linear(2, 3)
    assert module_io(attn) == (8, 8, -1)
    mlp = nn.Sequential(nn.Linear(8, 32), nn.Linear(32, 6))  # no proj: the last layer, as before
    assert module_io(mlp) == (8, 6, -1)
