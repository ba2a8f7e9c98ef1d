"""validate / plan / ls / cp / schema, selectors, parameter counts, exit codes."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch.nn as nn

import surgeon
from surgeon.resources import builtin_recipes, schema_path
from surgeon.surgery.selectors import compile_selector

from .helpers import ROOT, TINY_VIT


@pytest.mark.parametrize("pattern,name,hit", [
    ("blocks.*.mlp", "blocks.3.mlp", True),
    ("blocks.*.mlp", "blocks.3.mlp.fc1", False),
    ("**.blocks.*.mlp", "blocks.3.mlp", True),
    ("**.blocks.*.mlp", "layers.1.blocks.0.mlp", True),
    ("**.blocks.*.mlp", "layers.1.blocks.0.mlp.fc1", False),
    ("blocks.{0..5}.attn", "blocks.5.attn", True),
    ("blocks.{0..5}.attn", "blocks.6.attn", False),
    ("blocks.*.{attn,mlp}", "blocks.1.attn", True),
    ("re:blocks\\.[0-3]\\.mlp", "blocks.2.mlp", True),
    ("**", "", True),
])
def test_selector_semantics(pattern, name, hit):
    assert bool(compile_selector(pattern).fullmatch(name)) is hit


def test_validate_builtin_recipes_exit_0(cli):
    names = [str(p) for p in builtin_recipes().values()]
    res = cli("validate", *names)
    assert res.code == 0, res
    assert res.out.count("✓") == len(names)


def test_validate_reports_all_errors_and_exit_2(cli, write):
    bad = write("bad.yaml", "name: x\nmodel: {name: vit_tiny_patch16_224, pretraind: 1}\ntrain: {epochs: -1}\n")
    good = write("good.yaml", "name: g\nmodel: {name: vit_tiny_patch16_224}\n")
    res = cli("validate", good, bad)
    assert res.code == 2
    assert f"{bad}:2:" in res.err and f"{bad}:3:" in res.err
    assert "did you mean 'pretrained'" in res.err
    assert "1 of 2 recipe(s) invalid" in res.err
    assert "Traceback" not in res.text


def test_validate_selector_matching_nothing(cli, write):
    path = write("r.yaml", "name: x\nmodel: {name: vit_tiny_patch16_224}\nsurgery:\n  - target: blocks.*.mpl\n    unfreeze: bias\n")
    res = cli("validate", path)
    assert res.code == 2
    assert "matches no module" in res.err and f"{path}:4:13" in res.err
    assert "blocks.*.mlp" in res.err  # the hint names the near miss


@pytest.mark.parametrize("args,needle", [
    (["plan", "nope.yaml"], "not found"),
    (["plan", "bitfit", "--set", "train.epochs"], "expected KEY=VALUE"),
    (["plan", "bitfit", "--set", "train.epochs=-3"], "minimum"),
    (["plan", "bitfit", "--model", "resnet9000"], "unknown timm model"),
    (["plan", "bitfit", "--set", "model.kwargs={no_such_arg: 1}"], "model.kwargs"),
    (["cp", "no_such_recipe", "x.yaml"], "no built-in recipe"),
])
def test_user_errors_exit_2_without_traceback(cli, args, needle):
    res = cli(*args)
    assert res.code == 2, res
    assert needle in res.err
    assert "Traceback" not in res.text


def test_internal_error_exits_1_with_report_link(cli, monkeypatch):
    import surgeon.recipe

    def boom(*a, **k):
        raise RuntimeError("kaboom")
    monkeypatch.setattr(surgeon.recipe, "load_recipe", boom)
    res = cli("plan", "bitfit")
    assert res.code == 1
    assert "bug in surgeon" in res.err and "kaboom" in res.err


def test_plan_json_paper_counts(cli):
    """ViT-B/16: backbone 85.80M, BitFit 0.10M (METHODS.md §1)."""
    res = cli("plan", "bitfit", "--model", "vit_base_patch16_224", "--json")
    assert res.code == 0, res
    data = json.loads(res.out)
    for key in ("backbone_params", "extra_params", "head_params", "trainable_params", "targets"):
        assert key in data
    assert round(data["backbone_params"] / 1e6, 2) == 85.80
    assert round(data["extra_params"] / 1e6, 2) == 0.10
    assert data["trainable_params"] == data["extra_params"] + data["head_params"]
    assert {"module", "method", "params"} <= set(data["targets"][0])


def test_plan_full_and_linear(cli):
    full = json.loads(cli("plan", "full", "--json").out)
    assert full["extra_params"] == full["backbone_params"]
    linear = json.loads(cli("plan", "linear", "--json", "--set", "model.num_classes=10").out)
    assert linear["extra_params"] == 0 and linear["head_params"] == 768 * 10 + 10


def test_plan_table(cli):
    res = cli("plan", "bitfit", "--model", "deit_tiny_patch16_224")
    assert res.code == 0
    assert "selectors" in res.out and "totals" in res.out and "% of backbone" in res.out


def test_build_model_freezes_backbone_and_trains_head():
    model = surgeon.build_model({"name": "lin", "model": dict(TINY_VIT, num_classes=3)})
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert trainable == ["head.weight", "head.bias"]
    assert isinstance(model.get_classifier(), nn.Linear) and model.get_classifier().out_features == 3


def test_ls_cp_schema(cli, tmp_path):
    res = cli("ls")
    assert res.code == 0 and "bitfit" in res.out and "BitFit" in res.out
    dest = tmp_path / "mine.yaml"
    assert cli("cp", "bitfit", dest).code == 0
    assert dest.read_text() == builtin_recipes()["bitfit"].read_text()
    res = cli("cp", "bitfit", dest)
    assert res.code == 2 and "--force" in res.err
    dest.write_text("changed")
    assert cli("cp", "bitfit", dest, "--force").code == 0 and dest.read_text() != "changed"
    assert cli("cp", "linear", tmp_path).code == 0 and (tmp_path / "linear.yaml").exists()
    res = cli("schema")
    assert res.code == 0 and json.loads(res.out) == json.loads(schema_path().read_text())


def test_console_script_exit_codes(tmp_path):
    """The installed entry point itself (a subprocess: real exit codes, real stderr)."""
    bad = tmp_path / "bad.yaml"
    bad.write_text("[1, 2]\n")
    proc = subprocess.run([sys.executable, "-m", "surgeon.cli", "validate", str(bad)],
                          capture_output=True, text=True, cwd=ROOT)
    assert proc.returncode == 2
    assert "must be a mapping" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.parametrize("order", [("adapter", "lora"), ("lora", "adapter")])
def test_rules_compose_in_either_order(order):
    """A LoRA inside an MLP that an adapter wraps takes effect whichever rule comes first."""
    rules = {"adapter": {"target": "**.blocks.*.mlp", "adapter": {"bottleneck": 4}},
             "lora": {"target": "**.blocks.*.mlp.fc1", "lora": {"rank": 2}}}
    model = surgeon.build_model({"name": "x", "model": TINY_VIT, "surgery": [rules[k] for k in order]}, weights=False)
    assert sorted({t.method for t in model.surgeon_plan.targets}) == ["adapter", "lora"]
    assert model.surgeon_plan.extra_params > 0
