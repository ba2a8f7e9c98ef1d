"""Built-in backbone: fractal generator, shipped weights and card, pretraining, transfer."""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from surgeon.builtin import BUILTIN_BACKBONES, builtin_weights
from surgeon.builtin.fractal import fractal_split, render_instances, sample_ifs
from surgeon.errors import UserError

SPEC = BUILTIN_BACKBONES["fractal_vit_tiny"]


# --- fractal generator --------------------------------------------------------------------


def test_ifs_bank_deterministic_contractive_and_prefix_stable():
    a, b = sample_ifs(12, seed=5), sample_ifs(12, seed=5)
    np.testing.assert_array_equal(a.A, b.A)
    np.testing.assert_array_equal(a.p, b.p)
    assert not np.array_equal(a.A, sample_ifs(12, seed=6).A)
    # Class k depends on the seed only, not on how many classes were asked for.
    np.testing.assert_array_equal(sample_ifs(5, seed=5).A, a.A[:5])
    assert set(a.n_maps.tolist()) <= {2, 3, 4}
    used = a.p > 0
    assert (used.sum(1) == a.n_maps).all()
    np.testing.assert_allclose(a.p.sum(1), 1.0)
    # Every map is a contraction, so every attractor exists and the chaos game converges.
    assert np.linalg.norm(a.A[used], ord=2, axis=(1, 2)).max() < 1.0


def test_render_deterministic_and_seed_sensitive():
    bank = sample_ifs(4, seed=0)
    labels = np.array([0, 1, 2, 3, 0, 1])
    x1 = render_instances(bank, labels, seed=1, n_points=500)
    x2 = render_instances(bank, labels, seed=1, n_points=500)
    x3 = render_instances(bank, labels, seed=2, n_points=500)
    assert x1.shape == (6, 32, 32, 3) and x1.dtype == np.uint8
    np.testing.assert_array_equal(x1, x2)
    assert not np.array_equal(x1, x3)
    # Two instances of one class differ (placement / colour / parameter jitter).
    assert not np.array_equal(x1[0], x1[4])


def test_fractal_split_balanced_and_not_blank():
    x, y = fractal_split(5, 6, class_seed=0, instance_seed=1)
    assert x.shape == (30, 32, 32, 3)
    assert np.bincount(y).tolist() == [6] * 5
    # Foreground differs from the background in every image (the attractor was drawn).
    assert (x.reshape(30, -1).std(1) > 10).all()


# --- shipped weights ----------------------------------------------------------------------


def test_registry_and_unknown_name():
    path = builtin_weights("fractal_vit_tiny")
    assert path.is_file() and path.suffix == ".safetensors"
    assert path.stat().st_size < 8e6
    assert SPEC["card"].is_file()
    with pytest.raises(UserError) as e:
        builtin_weights("imagenet_vit")
    assert "imagenet_vit" in str(e.value) and "fractal_vit_tiny" in str(e.value)


def _random_model(num_classes=10):
    import timm

    return timm.create_model(SPEC["model_name"], pretrained=False, num_classes=num_classes, **SPEC["kwargs"])


def test_weights_cover_exactly_the_backbone():
    from safetensors.torch import load_file

    sd = load_file(str(builtin_weights("fractal_vit_tiny")))
    model_sd = _random_model().state_dict()
    backbone = {k for k in model_sd if not k.startswith("head.")}
    assert set(sd) == backbone  # strict on backbone keys, no head
    for k, v in sd.items():
        assert v.dtype == torch.float16 and v.shape == model_sd[k].shape, k
        assert torch.isfinite(v).all(), k


@pytest.mark.parametrize("num_classes", [10, 1000, 0])
def test_timm_loads_weights_with_new_head(num_classes):
    import timm
    from safetensors.torch import load_file

    path = builtin_weights("fractal_vit_tiny")
    sd = load_file(str(path))
    torch.manual_seed(0)
    model = timm.create_model(SPEC["model_name"], pretrained=True, num_classes=num_classes,
                              pretrained_cfg_overlay=SPEC["pretrained_cfg_overlay"], **SPEC["kwargs"])
    got = model.state_dict()
    for k, v in sd.items():  # fp16 file -> fp32 model, values preserved
        assert got[k].dtype == torch.float32
        torch.testing.assert_close(got[k], v.float(), rtol=0, atol=0)
    x, _ = fractal_split(2, 4, class_seed=9, instance_seed=9)
    xt = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 127.5 - 1
    with torch.no_grad():
        out = model.eval()(xt)
    assert out.shape == (8, num_classes if num_classes else 192)
    assert torch.isfinite(out).all()


def test_plain_file_overlay_also_works_for_a_new_head():
    # The form a user would write by hand: only file=, any num_classes but timm's 1000.
    import timm

    path = builtin_weights("fractal_vit_tiny")
    model = timm.create_model(SPEC["model_name"], pretrained=True, num_classes=7,
                              pretrained_cfg_overlay=dict(file=str(path)), **SPEC["kwargs"])
    assert model.head.out_features == 7


def test_card_describes_the_weights():
    card = json.loads(SPEC["card"].read_text())
    assert card["model_name"] == SPEC["model_name"]
    assert card["kwargs"] == SPEC["kwargs"]
    assert card["weights"] == builtin_weights("fractal_vit_tiny").name
    pre = card["pretraining"]
    assert {"seed", "classes", "per_class", "steps", "epochs"} <= set(pre)
    assert 0 < card["upstream_val_acc"] <= 1
    assert card["wall_seconds"] > 0 and card["images_per_s"] > 0 and card["date"]
    # The shipped backbone learned its upstream task far above chance.
    assert card["upstream_val_acc"] > 5 / pre["classes"]
    assert "transfer" in card


# --- pretraining command ------------------------------------------------------------------


@pytest.mark.slow
def test_pretrain_builtin_tiny_run_is_deterministic(tmp_path):
    from safetensors.torch import load_file

    from surgeon.builtin.pretrain import pretrain_builtin

    kw = dict(classes=3, per_class=8, val_per_class=4, epochs=1, batch_size=8, threads=1, progress=False)
    card = pretrain_builtin(tmp_path / "a.safetensors", seed=1, **kw)
    pretrain_builtin(tmp_path / "b.safetensors", seed=1, **kw)
    a, b = load_file(str(tmp_path / "a.safetensors")), load_file(str(tmp_path / "b.safetensors"))
    assert a.keys() == b.keys() and not any(k.startswith("head.") for k in a)
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert json.loads((tmp_path / "a.json").read_text())["pretraining"]["seed"] == 1
    assert card["pretraining"]["steps"] == 3 and 0 <= card["upstream_val_acc"] <= 1


@pytest.mark.slow
def test_transfer_beats_random_init():
    """Linear probe on digits: the shipped backbone's features beat a random ViT's."""
    from surgeon.builtin.pretrain import transfer_check

    r = transfer_check(builtin_weights("fractal_vit_tiny"), tasks=("digits",), seeds=(0, 1),
                       protocols=("linear",), train_split="train", eval_split="val", progress=False)
    row = r["digits"]["linear"]
    assert row["pretrained_mean"] > row["random_mean"], row


# --- the built-in backbone as a timm name ---------------------------------------------------


def _shipped_backbone():
    from safetensors.torch import load_file

    return {k: v.float() for k, v in load_file(str(builtin_weights("fractal_vit_tiny"))).items()}


@pytest.mark.parametrize("num_classes", [None, 7])
def test_timm_create_model_by_name_loads_the_shipped_weights(num_classes):
    import timm

    import surgeon.builtin.models  # noqa: F401 - what plain timm users import

    kwargs = {} if num_classes is None else {"num_classes": num_classes}
    model = timm.create_model("fractal_vit_tiny", pretrained=True, **kwargs)
    assert model.num_classes == (num_classes or 0)  # the file has no head: a feature model by default
    assert model.patch_embed.patch_size == (8, 8) and len(model.blocks) == 6
    assert timm.data.resolve_input_data_config(model)["input_size"] == (3, 32, 32)
    state = model.state_dict()
    for key, value in _shipped_backbone().items():
        torch.testing.assert_close(state[key], value, rtol=0, atol=0)


def test_recipe_with_the_name_and_pretrained_true_loads_offline(monkeypatch):
    import surgeon
    import surgeon.weights

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(surgeon.weights, "_reachable", lambda *a, **k: pytest.fail("probed the network"))
    for pretrained in (True, "builtin:fractal_vit_tiny"):
        recipe = surgeon.load_recipe({"name": "x", "model": {"name": "fractal_vit_tiny", "pretrained": pretrained}})
        model = surgeon.build_model(recipe, num_classes=4)
        state = model.state_dict()
        for key, value in _shipped_backbone().items():
            torch.testing.assert_close(state[key], value, rtol=0, atol=0)
        assert model.num_classes == 4


def test_model_option_sets_the_whole_backbone(cli):
    import json

    res = cli("plan", "bitfit", "--model", "fractal_vit_tiny", "--json")
    assert res.code == 0, res
    assert json.loads(res.out)["backbone_params"] == 2_710_080  # depth 6, 8x8 patches, 32 px (docs/builtin.md)
    assert cli("validate", "lora", "--model", "fractal_vit_tiny").code == 0


@pytest.mark.slow
def test_run_on_the_named_backbone_merges_to_a_plain_timm_folder(tmp_path, cli):
    """A run with model.name fractal_vit_tiny: its merged folder names the timm architecture
    (vit_tiny_patch16_224 with the built-in's arguments), so plain timm loads it; apply prints
    both report files."""
    import json
    import os
    import subprocess
    import sys

    import surgeon
    from surgeon.merge_run import fixed_batch

    from .helpers import PLAIN_TIMM_CHECK, write_imagefolder, write_recipe

    data = write_imagefolder(tmp_path / "img", per_split={"train": 4, "val": 2, "test": 2})
    recipe = write_recipe(tmp_path / "r.yaml", data, model={"name": "fractal_vit_tiny", "pretrained": True, "kwargs": {}},
                          surgery=[{"target": "blocks.*.attn.proj", "unfreeze": "bias"}],
                          train={"max_steps": 2, "batch_size": 6, "base_lr": 0.05})
    res = cli("apply", recipe, "--out", tmp_path / "run")
    assert res.code == 0, res
    run = tmp_path / "run"
    assert f"report: {run / 'report.md'} and {run / 'report.html'}" in res.err
    config = json.loads((run / "merged" / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224"
    assert config["model_args"]["patch_size"] == 8 and config["model_args"]["depth"] == 6
    # surgeon's own weights: their licence and origin, no timm pretrained tag
    assert "tag" not in config["pretrained_cfg"] and config["pretrained_cfg"]["license"] == "apache-2.0"
    assert "built-in fractal_vit_tiny" in config["pretrained_cfg"]["description"]
    unmerged = surgeon.load_run(run, merged=False)
    x = fixed_batch(unmerged, seed=2)
    with torch.no_grad():
        expected = unmerged(x)
    torch.save((x, expected), tmp_path / "io.pt")
    proc = subprocess.run([sys.executable, "-c", PLAIN_TIMM_CHECK, str(run / "merged"), str(tmp_path / "io.pt")],
                          capture_output=True, text=True, timeout=300, cwd=tmp_path,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr
    diff, classes, depth = proc.stdout.split()
    assert float(diff) < 1e-4 and classes == "3" and depth == "6"
