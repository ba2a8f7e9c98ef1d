"""model.pretrained: local files, local-dir folders, built-ins, the hub cache, and failing fast offline."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import safetensors.torch
import timm
import torch

from surgeon.errors import UserError
from surgeon.weights import check_load_report, load_report, pretrained_kwargs

from .helpers import write_imagefolder, write_recipe

NAME = "vit_tiny_patch16_224"
SOURCE_ARGS = {"img_size": 32, "patch_size": 8, "depth": 2}


@pytest.fixture(scope="module")
def source_model():
    torch.manual_seed(0)
    return timm.create_model(NAME, num_classes=10, **SOURCE_ARGS)


@pytest.fixture(scope="module")
def weight_files(source_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("weights")
    sd = source_model.state_dict()
    safetensors.torch.save_file(sd, str(root / "w.safetensors"))
    torch.save(sd, root / "w.pth")
    torch.save({"state_dict": sd}, root / "wrapped.bin")
    timm.models.save_for_hf(source_model, str(root / "hf"), safe_serialization=True)
    return root


def _create(spec, **kwargs):
    with load_report() as report:
        model = timm.create_model(NAME, **kwargs, **pretrained_kwargs(NAME, spec))
    return model, report


@pytest.mark.parametrize("kind", ["w.safetensors", "w.pth", "wrapped.bin", "local-dir"])
def test_local_weights_load_with_new_head_and_resampled_embeddings(kind, weight_files, source_model):
    spec = f"local-dir:{weight_files / 'hf'}" if kind == "local-dir" else str(weight_files / kind)
    # Another image size (48 px: 6x6 patches instead of 4x4) and another class count.
    model, report = _create(spec, img_size=48, patch_size=8, depth=2, num_classes=3)
    assert model.head.weight.shape == (3, 192)
    assert model.pos_embed.shape == (1, 1 + 36, 192)  # resampled from 1 + 16 tokens
    for key in ("blocks.1.mlp.fc1.weight", "blocks.0.attn.qkv.bias", "patch_embed.proj.weight", "cls_token"):
        assert torch.equal(model.state_dict()[key], source_model.state_dict()[key]), key
    # The head is re-initialised, never taken from the checkpoint, and only the head is missing.
    assert sorted(report.missing) == ["head.bias", "head.weight"]
    check_load_report(report, ["head"], spec)


def test_same_class_count_still_reinitialises_the_head(weight_files, source_model):
    model, _ = _create(str(weight_files / "w.safetensors"), num_classes=10, **SOURCE_ARGS)
    assert not torch.equal(model.head.weight, source_model.head.weight)


def test_weights_of_another_architecture_are_refused(weight_files):
    model, report = _create(str(weight_files / "w.safetensors"), img_size=32, patch_size=8, depth=3, num_classes=3)
    with pytest.raises(UserError, match=r"do not fit the model: 12 backbone tensor\(s\)"):
        check_load_report(report, ["head"], "w.safetensors")


@pytest.mark.parametrize("content,message", [
    (b"garbage" * 20, "cannot read the weights file"),
    (None, "truncated"),
])
def test_corrupt_safetensors_named(tmp_path, weight_files, content, message):
    bad = tmp_path / "bad.safetensors"
    data = (weight_files / "w.safetensors").read_bytes()
    bad.write_bytes(content if content is not None else data[: len(data) // 2])
    with pytest.raises(UserError) as exc:
        pretrained_kwargs(NAME, str(bad))
    assert str(bad) in str(exc.value)
    assert message in str(exc.value) or "incomplete" in str(exc.value)


def test_truncated_and_foreign_torch_files_named(tmp_path, weight_files):
    data = (weight_files / "w.pth").read_bytes()
    for name, content in [("trunc.pth", data[: len(data) // 2]), ("text.pth", b"hello world")]:
        bad = tmp_path / name
        bad.write_bytes(content)
        with pytest.raises(UserError, match="not a PyTorch checkpoint") as exc:
            pretrained_kwargs(NAME, str(bad))
        assert str(bad) in str(exc.value)


def test_missing_file_folder_and_suffix(tmp_path):
    with pytest.raises(UserError, match="not found"):
        pretrained_kwargs(NAME, str(tmp_path / "nope.safetensors"))
    with pytest.raises(UserError, match="local-dir:"):
        pretrained_kwargs(NAME, str(tmp_path))  # a folder given as a file
    with pytest.raises(UserError, match="no model.safetensors"):
        pretrained_kwargs(NAME, f"local-dir:{tmp_path}")
    (tmp_path / "w.txt").write_text("x")
    with pytest.raises(UserError, match="unsupported weights file type"):
        pretrained_kwargs(NAME, str(tmp_path / "w.txt"))


def test_builtin_names():
    with pytest.raises(UserError, match="unknown built-in backbone"):
        pretrained_kwargs(NAME, "builtin:no_such_backbone")
    builtin = pytest.importorskip("surgeon.builtin")
    for name, spec in builtin.BUILTIN_BACKBONES.items():
        with pytest.raises(UserError, match=f"holds weights of {spec['model_name']}"):
            pretrained_kwargs("resnet18", f"builtin:{name}")
        if Path(spec["file"]).is_file():
            with load_report() as report:
                model = timm.create_model(spec["model_name"], num_classes=5, **spec["kwargs"],
                                          **pretrained_kwargs(spec["model_name"], f"builtin:{name}"))
            check_load_report(report, ["head"], name)
            assert model.head.out_features == 5


def test_hub_weights_from_the_local_cache_need_no_network(monkeypatch, tmp_path, source_model):
    """pretrained: true with the weights in the Hugging Face cache loads them without any request."""
    import huggingface_hub.constants

    cfg = timm.models.get_pretrained_cfg(NAME)
    repo = tmp_path / ("models--" + cfg.hf_hub_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    snap = repo / "snapshots" / "abc123"
    snap.mkdir(parents=True)
    safetensors.torch.save_file(source_model.state_dict(), str(snap / "model.safetensors"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setattr("surgeon.weights._reachable", lambda *a, **k: pytest.fail("the network was probed"))
    kwargs = pretrained_kwargs(NAME, True)
    assert kwargs["pretrained_cfg_overlay"]["file"].endswith("model.safetensors")
    model = timm.create_model(NAME, num_classes=3, **SOURCE_ARGS, **kwargs)
    assert torch.equal(model.blocks[0].mlp.fc2.weight, source_model.blocks[0].mlp.fc2.weight)


def test_offline_hub_fails_fast_in_process(monkeypatch, tmp_path):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE") as exc:  # refused before any network attempt
        pretrained_kwargs(NAME, True)
    assert "local-dir:" in str(exc.value)
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")  # nothing listens there: no network
    with pytest.raises(UserError, match="cannot be reached"):
        pretrained_kwargs(NAME, True)


def test_offline_pretrained_true_exits_2_fast(tmp_path):
    """`surgeon apply` with pretrained: true and no network: exit 2, no run directory, and no hang
    (the subprocess timeout is the guard; wall-clock targets live in benchmarks, not tests)."""
    data = write_imagefolder(tmp_path / "data", per_split={"train": 2, "val": 1})
    recipe = write_recipe(tmp_path / "r.yaml", data, model={"pretrained": True})
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hf"), "TORCH_HOME": str(tmp_path / "torch"),
           "HTTPS_PROXY": "http://127.0.0.1:9", "CI": "1", "OMP_NUM_THREADS": "1"}
    env.pop("HF_HUB_OFFLINE", None)
    proc = subprocess.run([sys.executable, "-m", "surgeon.cli", "apply", str(recipe), "--out", str(tmp_path / "run")],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "cannot download the pretrained weights" in proc.stderr and "local-dir:" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()
