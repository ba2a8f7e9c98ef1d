"""Run directories end to end: `surgeon apply` → files and events, `merge`, `eval`, `load_run`,
a merged LoRA run in plain timm (no surgeon import), and every bad input exiting 2."""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import pytest
import torch
import yaml

import surgeon
from surgeon.apply import apply_recipe
from surgeon.merge_run import fixed_batch
from surgeon.model import rebuild_backbone
from surgeon.runload import load_run_recipe

from .helpers import PLAIN_TIMM_CHECK, read_events, write_imagefolder, write_recipe

pytestmark = pytest.mark.slow  # every test here trains through `surgeon apply`

START_KEYS = {"time", "recipe", "model", "data", "num_classes", "plan", "device", "seed", "provenance"}
TRAIN_KEYS = {"step", "epoch", "loss", "ce", "consistency", "alignment", "lr", "img_per_s", "time"}
EVAL_KEYS = {"split", "step", "epoch", "top1", "loss", "inference"}
END_KEYS = {"best_val_top1", "best_step", "test_top1", "train_seconds", "img_per_s", "steps"}
MERGE_KEYS = {"mode", "max_abs_diff", "max_rel_diff"}


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("data") / "img", per_split={"train": 6, "val": 3, "test": 3})


@pytest.fixture(scope="module")
def mosa_run(tmp_path_factory, data):
    """One finished MoSA run (adapter experts + consistency), made through the CLI's code path."""
    from surgeon.cli import main

    tmp = tmp_path_factory.mktemp("mosa")
    recipe = write_recipe(tmp / "r.yaml", data, regularizers={"consistency": {"weight": 1.0}},
                          train={"epochs": 2, "batch_size": 6})
    torch.set_num_threads(1)
    with pytest.raises(SystemExit) as exc:
        main(["apply", str(recipe), "--out", str(tmp / "run")])
    assert exc.value.code == 0
    return tmp / "run"


def test_apply_writes_the_run_directory(mosa_run, data):
    files = {p.name for p in mosa_run.iterdir()}
    assert {"recipe.yaml", "metrics.jsonl", "summary.json", "adapter.safetensors", "checkpoints", "merged",
            "predictions_test.json"} <= files
    recipe = yaml.safe_load((mosa_run / "recipe.yaml").read_text())
    assert recipe["model"]["num_classes"] == 3  # filled in from the data
    assert recipe["data"]["source"] == f"imagefolder:{data}"  # absolute
    assert recipe["train"]["seed"] == 3407 and recipe["eval"]["inference"] == "merge"  # defaults resolved

    events = read_events(mosa_run)
    kinds = [e["event"] for e in events]
    assert kinds[0] == "start" and kinds.count("end") == 1 and kinds[-1] == "merge"
    by = {k: [e for e in events if e["event"] == k] for k in set(kinds)}
    assert START_KEYS <= by["start"][0].keys() and by["start"][0]["num_classes"] == 3
    assert by["start"][0]["plan"]["extra_params"] > 0
    assert all(TRAIN_KEYS <= e.keys() for e in by["train"])
    assert [e["step"] for e in by["train"]] == list(range(1, 7))  # 18 images / 6 = 3 steps x 2 epochs
    assert by["train"][-1]["consistency"] > 0
    assert all(EVAL_KEYS <= e.keys() for e in by["eval"])
    assert [(e["split"], e["step"]) for e in by["eval"]] == [("val", 3), ("val", 6), ("test", by["end"][0]["best_step"])]
    end = by["end"][0]
    assert END_KEYS <= end.keys() and end["steps"] == 6 and 0 <= end["test_top1"] <= 100
    merge = by["merge"][0]
    assert MERGE_KEYS <= merge.keys() and merge["mode"] == "average" and merge["max_abs_diff"] < 1e-4

    summary = json.loads((mosa_run / "summary.json").read_text())
    assert summary["test_top1"] == end["test_top1"] and summary["merge"]["format"] == "dense-adapter"
    assert summary["params"]["extra_params"] == by["start"][0]["plan"]["extra_params"]
    preds = json.loads((mosa_run / "predictions_test.json").read_text())
    assert len(preds["labels"]) == len(preds["preds"]) == 9 and preds["class_names"] == ["class0", "class1", "class2"]
    acc = 100 * sum(a == b for a, b in zip(preds["labels"], preds["preds"])) / 9
    assert acc == pytest.approx(end["test_top1"])
    # MoSA runs get the expert-similarity analysis (per adapter) and its report section too.
    analysis = json.loads((mosa_run / "analysis.json").read_text())["expert_similarity"]
    assert [(e["module"], e["kind"]) for e in analysis["per_layer"]] == [("blocks.0.mlp", "adapter"),
                                                                       ("blocks.1.mlp", "adapter")]
    assert len(analysis["matrix"]) == 2 and analysis["matrix_keys"] == ["blocks.0.mlp", "blocks.1.mlp"]
    report = (mosa_run / "report.md").read_text()
    assert "## Expert similarity" in report and "MoSA experts' deltas" in report
    assert "Mean over the 2 adapted modules in 2 blocks" in report
    # adapter.safetensors is small: the trained tensors, not the backbone.
    assert (mosa_run / "adapter.safetensors").stat().st_size < 0.1 * (mosa_run / "merged" / "model.safetensors").stat().st_size


def test_eval_matches_training_and_merge_modes(mosa_run, cli):
    summary = json.loads((mosa_run / "summary.json").read_text())
    res = cli("eval", str(mosa_run), "--json")
    assert res.code == 0, res
    payload = json.loads(res.out)
    assert payload["split"] == "test" and payload["n"] == 9
    assert payload["top1"] == pytest.approx(summary["test_top1"])
    res = cli("eval", str(mosa_run), "--inference", "ensemble", "--per-class", "--split", "val")
    assert res.code == 0 and "ensemble inference" in res.out and "class2" in res.out
    assert cli("eval", str(mosa_run), "--inference", "fixed").code == 0
    assert cli("eval", str(mosa_run), "--inference", "stochastic").code == 0

    # Another merge mode gets its own folder: merged/ stays the recipe's (average) merge, which the
    # run's figures measure; summary.json keeps both checks.
    average = (mosa_run / "merged" / "model.safetensors").read_bytes()
    res = cli("merge", str(mosa_run), "--mode", "jigsaw")
    assert res.code == 0, res
    assert str(mosa_run / "merged-jigsaw") in res.out
    merges = [e for e in read_events(mosa_run) if e["event"] == "merge"]
    assert merges[-1]["mode"] == "jigsaw" and merges[-1]["max_abs_diff"] < 1e-4
    assert merges[-1]["path"] == str(mosa_run / "merged-jigsaw")
    assert json.loads((mosa_run / "merged-jigsaw" / "surgeon.json").read_text())["merge_mode"] == "jigsaw"
    assert json.loads((mosa_run / "merged" / "surgeon.json").read_text())["merge_mode"] == "average"
    assert (mosa_run / "merged" / "model.safetensors").read_bytes() == average
    after = json.loads((mosa_run / "summary.json").read_text())
    assert after["merge"]["mode"] == "average" and set(after["merges"]) == {"average", "jigsaw"}
    assert after["test_top1"] == summary["test_top1"]
    # eval follows the mode asked for: the recipe's by default, jigsaw's own folder on request
    res = cli("eval", str(mosa_run), "--json")
    assert json.loads(res.out)["merge_mode"] == "average" and json.loads(res.out)["top1"] == pytest.approx(summary["test_top1"])
    res = cli("eval", str(mosa_run), "--merge-mode", "jigsaw", "--json")
    assert res.code == 0, res
    jigsaw = json.loads(res.out)
    assert jigsaw["merge_mode"] == "jigsaw" and jigsaw["n"] == 9
    unmerged = surgeon.load_run(mosa_run, merged=False, merge_mode="jigsaw")  # jigsaw on the fly
    merged = surgeon.load_run(mosa_run, merge_mode="jigsaw")                  # merged-jigsaw/ from disk
    x = fixed_batch(merged, seed=3)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), unmerged(x), atol=1e-5, rtol=0)
    assert "ensemble inference):" in cli("eval", str(mosa_run), "--inference", "ensemble").out
    report = (mosa_run / "report.md")
    assert cli("report", str(mosa_run)).code == 0
    assert "`merged-jigsaw/`: the `jigsaw` merge" in report.read_text()
    # merged/ of another mode (what an earlier surgeon left after `merge --mode jigsaw`) is refused
    # with the command that rewrites it, not loaded as if it were the run's merge.
    info = mosa_run / "merged" / "surgeon.json"
    info.write_text(json.dumps({**json.loads(info.read_text()), "merge_mode": "jigsaw"}))
    res = cli("eval", str(mosa_run))
    assert res.code == 2 and "merged/ holds a 'jigsaw' merge, not the 'average' merge" in res.err
    assert f"surgeon merge {mosa_run}`" in res.err
    res = cli("merge", str(mosa_run))  # the recipe's mode again: merged/ rewritten, merged-jigsaw/ kept
    assert res.code == 0 and json.loads((mosa_run / "merged" / "surgeon.json").read_text())["merge_mode"] == "average"
    assert (mosa_run / "merged-jigsaw").is_dir()


def test_load_run_merged_equals_unmerged(mosa_run):
    merged = surgeon.load_run(mosa_run)
    unmerged = surgeon.load_run(mosa_run, merged=False)
    assert type(merged.blocks[0].mlp).__name__ != type(unmerged.blocks[0].mlp).__name__
    x = fixed_batch(merged, seed=1)
    with torch.no_grad():
        torch.testing.assert_close(merged(x), unmerged(x), atol=1e-5, rtol=0)


@pytest.mark.parametrize("surgery", [
    [{"target": "blocks.*.attn.qkv", "lora": {"rank": 4, "slices": ["q", "v"]}}],
    [{"target": "blocks.*.attn.proj", "unfreeze": "bias"}],
], ids=["lora", "bitfit"])
def test_merged_run_loads_in_plain_timm(tmp_path, data, surgery):
    recipe = write_recipe(tmp_path / "r.yaml", data, surgery=surgery, train={"epochs": 2, "batch_size": 6,
                                                                          "base_lr": 0.05})
    run = apply_recipe(str(recipe), out=str(tmp_path / "run"))
    config = json.loads((run / "merged" / "config.json").read_text())
    assert config["model_args"]["img_size"] == [32, 32] and config["model_args"]["patch_size"] == 8
    assert config["model_args"]["depth"] == 2 and config["num_classes"] == 3
    assert config["label_names"] == ["class0", "class1", "class2"]
    unmerged = surgeon.load_run(run, merged=False)
    x = fixed_batch(unmerged, seed=2)
    with torch.no_grad():
        expected = unmerged(x)
    torch.save((x, expected), tmp_path / "io.pt")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-c", PLAIN_TIMM_CHECK, str(run / "merged"), str(tmp_path / "io.pt")],
                          capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    diff, classes, depth = proc.stdout.split()
    assert float(diff) < 1e-4 and classes == "3" and depth == "2"
    # Training changed the folded weights: the merged model is not the untrained backbone.
    untrained = rebuild_backbone(load_run_recipe(run)).state_dict()
    merged = surgeon.load_run(run).state_dict()
    key = "blocks.0.attn.qkv.weight" if "lora" in surgery[0] else "blocks.0.attn.proj.bias"
    assert not torch.equal(merged[key], untrained.get(key, untrained.get(key.replace(".weight", ".base_layer.weight"))))


def test_default_run_dir_and_plain_progress(tmp_path, data, cli, monkeypatch):
    monkeypatch.chdir(tmp_path)
    recipe = write_recipe(tmp_path / "r.yaml", data, surgery=[], train={"max_steps": 2, "merge": False})
    res = cli("apply", str(recipe))
    assert res.code == 0, res
    last = res.out.strip().splitlines()[-1]
    assert re.fullmatch(r"runs/tiny-vit_tiny_patch16_224-img-\d{8}-\d{6}", last), last
    assert (tmp_path / last / "summary.json").is_file()
    assert "step 1/2" in res.err and "\x1b[" not in res.err  # plain lines, no live bar, under CI


# --------------------------------------------------------------------------- bad inputs

def _apply(cli, recipe, *args):
    return cli("apply", str(recipe), *args)


def test_bad_data_inputs_exit_2(tmp_path, data, cli):
    cases = {}
    recipe = write_recipe(tmp_path / "r.yaml", data)
    cases["missing data dir"] = (_apply(cli, recipe, "--data", f"imagefolder:{tmp_path / 'nope'}"), "not found")

    empty = write_imagefolder(tmp_path / "empty", per_split={"train": 2})
    for f in (empty / "train" / "class1").iterdir():
        f.unlink()
    cases["empty class folder"] = (_apply(cli, recipe, "--data", f"imagefolder:{empty}"), "class1")

    broken = write_imagefolder(tmp_path / "broken", per_split={"train": 4, "val": 1})
    (broken / "train" / "class0" / "0.png").write_bytes(b"not a png at all")
    cases["unreadable image"] = (_apply(cli, recipe, "--data", f"imagefolder:{broken}", "--out", str(tmp_path / "b")),
                                 "0.png")

    lines = [f"{data}/train/class{k}/{i}.png {k if k < 2 else 7}" for k in range(3) for i in range(4)]
    (tmp_path / "list.txt").write_text("\n".join(lines))
    cases["label out of range"] = (_apply(cli, recipe, "--data", f"filelist:{tmp_path / 'list.txt'}",
                                          "--set", "model.num_classes=3"), "label 7 is out of range")
    cases["class-count mismatch"] = (_apply(cli, recipe, "--set", "model.num_classes=5"), "model.num_classes is 5")

    # One case per class of issue 11 that a recipe or data can trigger (tests/test_reliability.py
    # has the rest and the details).
    (tmp_path / "huge.txt").write_text(f"{data}/train/class0/0.png 0\n{data}/train/class1/0.png 99999999999\n")
    cases["1. absurd label"] = (_apply(cli, recipe, "--data", f"filelist:{tmp_path / 'huge.txt'}"),
                                f"{tmp_path / 'huge.txt'}:2")
    cases["1. absurd size"] = (_apply(cli, recipe, "--set", "surgery.0.adapter.bottleneck=4000000000"), "bottleneck")
    links = write_imagefolder(tmp_path / "links", per_split={"train": 2})
    os.symlink(links / "train" / "class0", links / "train" / "class0" / "loop")  # a loop: scanned once
    for f in (links / "train" / "class2").iterdir():
        f.unlink()
    (links / "train" / "class2").rmdir()
    os.symlink(links / "train" / "class1", links / "train" / "class2")  # the same images as class1
    cases["2. class of linked images"] = (_apply(cli, recipe, "--data", f"imagefolder:{links}"),
                                          "holds only images already counted")
    cases["6. non-finite lr"] = (_apply(cli, recipe, "--set", "train.base_lr=.nan"), "not a finite number")
    (tmp_path / "a-file").write_text("x")
    cases["7. --out below a file"] = (_apply(cli, recipe, "--out", str(tmp_path / "a-file" / "run")),
                                      "is a file, not a folder")
    cases["8. patch_size 0"] = (_apply(cli, recipe, "--set", "model.kwargs.patch_size=0"), "patch_size")
    cases["8. image size of the data"] = (_apply(cli, recipe, "--set", "data.image_size=48"), "data.image_size")
    (tmp_path / "latin1.txt").write_bytes(f"{data}/train/class0/0.png 0\nd\xe9j\xe0.png 1\n".encode("latin-1"))
    cases["8. list not UTF-8"] = (_apply(cli, recipe, "--data", f"filelist:{tmp_path / 'latin1.txt'}"), "not UTF-8")

    for name, (res, text) in cases.items():
        assert res.code == 2, (name, res)
        assert text in res.err, (name, res.err)
        assert "Traceback" not in res.err, name
        if name[0].isdigit():
            assert "\nrun directory:" not in "\n" + res.err, name  # refused before a run directory was made
    assert not (tmp_path / "a-file" / "run").exists() and (tmp_path / "a-file").read_text() == "x"


def test_bad_run_inputs_exit_2(tmp_path, data, cli):
    import fcntl
    import shutil

    own = shutil.copytree(data, tmp_path / "data")  # changed below
    recipe = write_recipe(tmp_path / "r.yaml", own, surgery=[], train={"max_steps": 2, "merge": False})
    run = tmp_path / "run"
    assert _apply(cli, recipe, "--out", str(run)).code == 0
    # 3. a run another process writes to (a second open file description: flock conflicts in-process too)
    fd = os.open(run / ".lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, b"4242 surgeon apply\n")
    locked = [(cli("apply", "--resume", str(run)), "process 4242 (surgeon apply) is writing to it"),
              (cli("merge", str(run)), "the run is in use")]
    os.close(fd)
    # 4. the data changed since the checkpoint
    shutil.copy(own / "train" / "class0" / "0.png", own / "train" / "class0" / "new.png")
    changed = cli("apply", "--resume", str(run))
    (own / "train" / "class0" / "new.png").unlink()
    # 5. other classes with the run's class count
    other = write_imagefolder(tmp_path / "other", per_split={"train": 2, "test": 2})
    for split in ("train", "test"):
        for k in range(3):
            (other / split / f"class{k}").rename(other / split / f"kind{k}")
    checks = [
        (cli("eval", str(tmp_path / "nope")), "does not exist"),
        (cli("merge", str(tmp_path)), "no recipe.yaml"),
        (_apply(cli, recipe, "--out", str(run)), "already holds a run"),
        (cli("eval", str(run), "--inference", "ensemble"), "needs experts"),
        (cli("eval", str(run), "--split", "train2"), "no 'train2' split"),
        (cli("merge", str(run), "--mode", "jigsaw"), "needs experts"),
        (cli("merge", str(run), "--mode", "quilt"), "unknown merge mode"),
        (cli("eval", str(run), "--merge-mode", "jigsaw"), "needs experts"),
        (cli("apply", "--resume", str(tmp_path / "nope")), "does not exist"),
        *locked,
        (changed, "the data changed since the checkpoint (train: 19 images (was 18))"),
        (cli("eval", str(run), "--data", f"imagefolder:{other}"), "the data's classes differ from the run's"),
    ]
    assert cli("eval", str(run), "--data", f"imagefolder:{other}", "--allow-class-mismatch").code == 0
    (run / "checkpoints" / "last.pt").write_bytes(b"\x00" * 100)
    checks.append((cli("apply", "--resume", str(run)), "not a surgeon checkpoint"))
    (run / "adapter.safetensors").write_bytes(b"\x00" * 100)
    checks.append((cli("eval", str(run)), "adapter.safetensors"))
    for res, text in checks:
        assert res.code == 2, res
        assert text in res.err, res.err
        assert "Traceback" not in res.err
