"""What a run records besides its metrics: the environment (versions, command line, recipe
commit, device), summary.csv (one row per epoch, rebuilt on resume), TensorBoard event files,
one file mode for every file, and the origin a merged timm folder claims for its weights."""
from __future__ import annotations

import csv
import json
import os
import platform
import shlex
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch

from surgeon.apply import _same_recipe_or_fail
from surgeon.errors import UserError
from surgeon.io import file_mode, save_tensors, set_file_mode, write_json
from surgeon.merge_run import _weights_origin, _write_origin
from surgeon.recipe import load_recipe, section
from surgeon.rundir import MetricsLog, RunPaths, with_added_keys, without_added_defaults
from surgeon.train.loggers import CSV_COLUMNS, EpochSummary, SummaryCsv, TensorBoardLog, check_loggers
from surgeon.train.provenance import environment, git_state

from .helpers import TINY_MODEL, read_events, write_imagefolder, write_recipe


# ----------------------------------------------------------------------------- events

def _train(step, epoch, loss, lr=0.1, ips=100.0, **extra):
    return {"event": "train", "step": step, "epoch": epoch, "loss": loss, "ce": loss, "consistency": 0.0,
            "alignment": 0.0, "lr": lr, "img_per_s": ips, "time": float(step), **extra}


def _events() -> list[dict]:
    """Two 4-step epochs and a partial third (2 steps) with windows of 2 steps, a validation at
    each epoch end, checkpoints at steps 2 (mid-epoch), 4, 8 (epoch ends) and 10 (the last)."""
    return [
        {"event": "start", "time": "2025-01-01T00:00:00"},
        _train(2, 1, 1.0, lr=0.1, ips=100.0),
        {"event": "checkpoint", "step": 2, "epoch": 1, "batch": 2, "time": 2.0},
        _train(4, 1, 3.0, lr=0.2, ips=300.0),
        {"event": "eval", "split": "val", "step": 4, "epoch": 1, "top1": 50.0, "loss": 1.5},
        {"event": "checkpoint", "step": 4, "epoch": 2, "batch": 0, "time": 4.5},
        _train(6, 2, 2.0, lr=0.3),
        {"event": "nonfinite", "step": 7, "epoch": 2, "count": 1, "in_a_row": 1},
        _train(8, 2, 4.0, lr=0.4),
        {"event": "eval", "split": "val", "step": 8, "epoch": 2, "top1": 75.0, "loss": 0.5},
        {"event": "checkpoint", "step": 8, "epoch": 3, "batch": 0, "time": 8.5},
        _train(10, 3, 6.0, lr=0.5),
        {"event": "eval", "split": "val", "step": 10, "epoch": 3, "top1": 80.0, "loss": 0.25},
        {"event": "checkpoint", "step": 10, "epoch": 3, "batch": 2, "time": 10.5},
        {"event": "eval", "split": "test", "step": 10, "epoch": 3, "top1": 70.0, "loss": 0.75},
        {"event": "end", "steps": 10, "time": 11.0},
    ]


def test_epoch_summary_has_one_row_per_epoch():
    summary = EpochSummary()
    for event in _events():
        summary(event)
    rows = summary.rows
    assert [(r["epoch"], r["step"]) for r in rows] == [(1, 4), (2, 8), (3, 10)]  # the third is partial
    first = rows[0]
    assert first["loss"] == pytest.approx(2.0) and first["ce"] == pytest.approx(2.0)  # (1·2 + 3·2) / 4 steps
    assert first["lr"] == 0.2 and first["val_top1"] == 50.0 and first["val_loss"] == 1.5 and first["time"] == 4.5
    assert first["img_per_s"] == pytest.approx(150.0)  # 4 steps in 2/100 + 2/300 s per image
    assert rows[1]["loss"] == pytest.approx(3.0) and rows[1]["val_top1"] == 75.0
    assert rows[2]["loss"] == 6.0 and rows[2]["val_top1"] == 80.0 and rows[2]["time"] == 11.0  # not the test eval
    assert EpochSummary().rows == [] and set(rows[0]) == set(CSV_COLUMNS)


def _csv_rows(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_summary_csv_is_written_as_the_run_goes_and_rebuilt_after_a_cut(tmp_path):
    events = _events()
    paths = RunPaths(tmp_path)
    log = MetricsLog(paths.metrics)
    log.add_listener(SummaryCsv(paths.summary_csv, paths.metrics))
    for e in events[:7]:  # through the step-6 train window
        log.log(**e)
    assert [r["epoch"] for r in _csv_rows(paths.summary_csv)] == ["1"]  # flushed when epoch 1 ended
    log.close()
    full = tmp_path / "full"
    full.mkdir()
    whole = MetricsLog(RunPaths(full).metrics)
    whole.add_listener(SummaryCsv(RunPaths(full).summary_csv, RunPaths(full).metrics))
    for e in events:
        whole.log(**e)
    whole.close()

    # A resume cuts metrics.jsonl back to the step-4 checkpoint (epoch 1 and its row stay), then
    # redoes steps 5-10: the CSV is rebuilt from the cut log, so no row appears twice.
    kept = events[:6]
    paths.metrics.write_text("".join(json.dumps(e) + "\n" for e in kept))
    log = MetricsLog(paths.metrics)
    log.add_listener(SummaryCsv(paths.summary_csv, paths.metrics))
    for e in events[6:]:
        log.log(**e)
    log.close()
    assert _csv_rows(paths.summary_csv) == _csv_rows(RunPaths(full).summary_csv)
    assert [r["epoch"] for r in _csv_rows(paths.summary_csv)] == ["1", "2", "3"]
    assert list(_csv_rows(paths.summary_csv)[0]) == list(CSV_COLUMNS)


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_scalars_and_purge_on_resume(tmp_path):
    pytest.importorskip("tensorboard")
    events = _events()
    tb = TensorBoardLog(tmp_path / "tb", terms=("consistency",))
    for e in events:
        tb(e)
    tb.close()
    scalars = _scalars(tmp_path / "tb")
    assert set(scalars) == {"train/loss", "train/ce", "train/consistency", "train/lr", "train/img_per_s",
                            "val/top1", "val/loss", "test/top1", "test/loss", "train/nonfinite_steps"}
    assert scalars["train/loss"] == [(2, 1.0), (4, 3.0), (6, 2.0), (8, 4.0), (10, 6.0)]
    assert scalars["val/top1"] == [(4, 50.0), (8, 75.0), (10, 80.0)]
    assert "train/alignment" not in scalars  # only the recipe's active regularisers

    # A session resumed from the step-4 checkpoint hides what the lost session logged after it.
    resumed = TensorBoardLog(tmp_path / "tb", purge_step=5)
    for e in events[6:9]:
        tb_event = dict(e, loss=e.get("loss", 0) + 100) if e["event"] == "train" else e
        resumed(tb_event)
    resumed.close()
    loss = _scalars(tmp_path / "tb")["train/loss"]
    assert loss == [(2, 1.0), (4, 3.0), (6, 102.0), (8, 104.0)]


def test_missing_tensorboard_is_a_user_error_naming_the_extra(tmp_path, monkeypatch, cli):
    recipe = load_recipe({"name": "x", "model": TINY_MODEL, "train": {"log": ["tensorboard"]}})
    check_loggers(load_recipe({"name": "x", "model": TINY_MODEL}))  # nothing asked, nothing checked
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # what a missing package gives
    with pytest.raises(UserError) as exc:
        check_loggers(recipe)
    assert "pip install 'surgeon[tensorboard]'" in str(exc.value) and "train.log" in str(exc.value)
    data = write_imagefolder(tmp_path / "img", per_split={"train": 2, "val": 1})
    path = write_recipe(tmp_path / "r.yaml", data, train={"log": ["tensorboard"]})
    res = cli("apply", path, "--out", tmp_path / "run")
    assert res.code == 2 and "surgeon[tensorboard]" in res.err and "Traceback" not in res.err
    assert f"{path}:" in res.err  # located at the recipe's train section
    assert not (tmp_path / "run").exists()  # refused before a run directory was made


def test_recipe_schema_takes_known_loggers_only(write):
    assert load_recipe({"name": "x", "model": TINY_MODEL}).train.log == ()
    with pytest.raises(UserError) as exc:
        load_recipe(str(write("r.yaml", "name: x\nmodel: {name: vit_tiny_patch16_224}\ntrain: {log: [wandb]}\n")))
    assert "train.log" in str(exc.value) and "tensorboard" in str(exc.value)


def test_resume_accepts_a_run_written_before_train_log():
    new = load_recipe({"name": "x", "model": TINY_MODEL}).to_dict()
    old = json.loads(json.dumps(new))
    del old["train"]["log"]
    _same_recipe_or_fail(old, new, "RUN/recipe.yaml")  # the key did not exist: same recipe
    with pytest.raises(UserError, match="train.log"):
        _same_recipe_or_fail(old, {**new, "train": {**new["train"], "log": ["tensorboard"]}}, "RUN/recipe.yaml")
    assert with_added_keys(old) == new and "log" not in old["train"]  # a copy, the run's mapping untouched
    # What a sweep's name is computed from: as before train.log existed, unless it is used.
    assert without_added_defaults(new) == old
    logged = {**new, "train": {**new["train"], "log": ["tensorboard"]}}
    assert without_added_defaults(logged) == logged


# ------------------------------------------------------------------------ file modes

@pytest.mark.parametrize("umask", [0o022, 0o027])
def test_run_files_get_the_umask_mode_whoever_writes_them(tmp_path, umask):
    old = os.umask(umask)
    try:
        assert file_mode() == 0o666 & ~umask
        save_tensors(tmp_path / "a.safetensors", {"x": torch.zeros(2)})  # safetensors creates 0600
        write_json(tmp_path / "b.json", {})
        folder = tmp_path / "merged"
        folder.mkdir()
        (folder / "model.safetensors").touch(mode=0o600)
        set_file_mode(folder)
    finally:
        os.umask(old)
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.rglob("*") if p.is_file()}
    assert modes == {"a.safetensors": 0o666 & ~umask, "b.json": 0o666 & ~umask,
                     "model.safetensors": 0o666 & ~umask}


# ------------------------------------------------------------------------ provenance

def _git(repo: Path, *args: str) -> str:
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}
    env.update(GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@t", GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@t")
    return subprocess.run(["git", "-C", str(repo), *args], check=True, capture_output=True, text=True,
                          env=env).stdout.strip()


@pytest.mark.skipif(shutil.which("git") is None, reason="needs git")
def test_git_state_of_the_recipes_folder(tmp_path):
    repo = tmp_path / "repo"
    (repo / "recipes").mkdir(parents=True)
    recipe = repo / "recipes" / "r.yaml"
    recipe.write_text("name: x\n")
    (repo / ".gitignore").write_text("ignored.yaml\n")
    _git(repo, "init", "-q")
    _git(repo, "add", ".")
    _git(repo, "commit", "-q", "-m", "first")
    head = _git(repo, "rev-parse", "HEAD")
    state = git_state(recipe)
    assert state == {"commit": head, "dirty": False, "root": str(repo.resolve()), "file": "committed"}
    recipe.write_text("name: y\n")
    assert git_state(recipe)["dirty"] is True and git_state(recipe)["file"] == "modified"
    (repo / "recipes" / "new.yaml").write_text("name: z\n")
    assert git_state(repo / "recipes" / "new.yaml")["file"] == "untracked"
    (repo / "recipes" / "ignored.yaml").write_text("name: z\n")
    assert git_state(repo / "recipes" / "ignored.yaml")["file"] == "ignored"
    outside = tmp_path / "plain" / "r.yaml"
    outside.parent.mkdir()
    outside.write_text("name: x\n")
    assert git_state(outside) is None


def test_environment_records_versions_command_device_threads(tmp_path):
    import surgeon

    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: x\n")
    env = environment(torch.device("cpu"), str(recipe))
    assert env["surgeon"] == surgeon.__version__ and env["torch"] == torch.__version__
    assert env["timm"] == timm.__version__ and env["python"] == platform.python_version()
    assert env["command"] == shlex.join(sys.orig_argv) and env["cwd"] == os.getcwd()
    assert env["device"] == "cpu" and env["cuda"] is None and env["device_name"]
    assert env["threads"] == torch.get_num_threads() and env["cpus"] == os.cpu_count()
    assert env["recipe"]["path"] == str(recipe.resolve())
    assert environment(torch.device("cpu"), "<dict>")["recipe"] is None
    json.dumps(env)  # it goes into summary.json and the start event


def test_report_shows_the_environment(tmp_path):
    from surgeon.report import write_report

    from .fake_runs import make_run

    run = make_run(tmp_path, steps=20)
    summary = json.loads((run / "summary.json").read_text())
    summary["environment"] = {"surgeon": "0.1.0", "torch": "2.14.1", "timm": "1.0.31", "python": "3.11.7",
                              "command": "surgeon apply lora --set train.epochs=2", "device": "cpu",
                              "device_name": "AMD EPYC", "threads": 1, "cpus": 2,
                              "recipe": {"path": "/r/lora.yaml", "git": {"commit": "0123456789abcdef", "dirty": True,
                                                                         "file": "modified", "root": "/r"}}}
    (run / "summary.json").write_text(json.dumps(summary))
    md = write_report(run).read_text()
    assert "### Environment" in md and "surgeon 0.1.0, torch 2.14.1, timm 1.0.31, python 3.11.7" in md
    assert "`surgeon apply lora --set train.epochs=2`" in md and "cpu (AMD EPYC), 1 torch thread(s) of 2 CPUs" in md
    assert "`/r/lora.yaml` at commit `0123456789ab` (work tree dirty), file modified" in md
    assert "`environment." not in md  # not repeated under "Other values in summary.json"


# ------------------------------------------------------------------- merged weights' origin

def test_merged_config_claims_timms_tag_only_for_timms_weights(tmp_path):
    model = lambda **kw: section("model", {"name": "vit_tiny_patch16_224", **kw})
    assert _weights_origin(model(pretrained=True)) is None  # timm's weights: timm's tag and licence stay
    for cfg in (model(pretrained="builtin:fractal_vit_tiny"),
                section("model", {"name": "fractal_vit_tiny", "pretrained": True})):
        origin = _weights_origin(cfg)
        assert origin["license"] == "apache-2.0" and "built-in fractal_vit_tiny" in origin["description"]
    assert _weights_origin(model(pretrained=False)) == {}
    assert _weights_origin(model(pretrained="/w/vit.safetensors")) == {}
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"architecture": "vit_tiny_patch16_224", "pretrained_cfg": {
        "tag": "augreg_in21k_ft_in1k", "license": "apache-2.0", "mean": [0.5] * 3, "num_classes": 3}}))
    _write_origin(config, {})
    assert json.loads(config.read_text())["pretrained_cfg"] == {"mean": [0.5] * 3, "num_classes": 3}
    _write_origin(config, {"license": "apache-2.0"})
    assert json.loads(config.read_text())["pretrained_cfg"]["license"] == "apache-2.0"


# ------------------------------------------------------------------------ end to end

@pytest.mark.slow
def test_a_run_records_its_environment_csv_tensorboard_and_one_file_mode(tmp_path, cli):
    pytest.importorskip("tensorboard")
    data = write_imagefolder(tmp_path / "img", per_split={"train": 6, "val": 3, "test": 3})
    recipe = write_recipe(tmp_path / "r.yaml", data, regularizers={"consistency": {"weight": 1.0}},
                          train={"epochs": 3, "batch_size": 6, "log": ["tensorboard"]})
    old = os.umask(0o027)
    try:
        res = cli("apply", recipe, "--out", tmp_path / "run")
    finally:
        os.umask(old)
    assert res.code == 0, res
    run = tmp_path / "run"
    env = json.loads((run / "summary.json").read_text())["environment"]
    assert env["torch"] == torch.__version__ and env["recipe"]["path"] == str(recipe.resolve())
    assert env["threads"] == torch.get_num_threads() and env["device"] == "cpu"
    assert read_events(run)[0]["environment"] == env  # and in the session's start event
    assert f"torch {torch.__version__}" in (run / "report.md").read_text()
    rows = _csv_rows(run / "summary.csv")
    assert [(r["epoch"], r["step"]) for r in rows] == [("1", "3"), ("2", "6"), ("3", "9")]
    evals = [e for e in read_events(run) if e["event"] == "eval" and e["split"] == "val"]
    assert [float(r["val_top1"]) for r in rows] == [e["top1"] for e in evals]
    assert all(float(r["consistency"]) > 0 for r in rows)
    scalars = _scalars(run / "tensorboard")
    assert [s for s, _ in scalars["train/loss"]] == list(range(1, 10))
    assert [v for _, v in scalars["val/top1"]] == pytest.approx([e["top1"] for e in evals])
    assert "train/consistency" in scalars and "train/alignment" not in scalars
    modes = {p.relative_to(run): stat.S_IMODE(p.stat().st_mode) for p in run.rglob("*") if p.is_file()}
    assert set(modes.values()) == {0o640}, modes  # adapter, checkpoints, merged/model.safetensors included
    assert Path("merged/model.safetensors") in modes and Path("adapter.safetensors") in modes


@pytest.mark.slow
def test_resume_rebuilds_the_csv_and_hides_lost_tensorboard_steps(tmp_path, monkeypatch):
    pytest.importorskip("tensorboard")
    from surgeon.apply import apply_recipe
    from surgeon.train.trainer import Trainer

    class Killed(BaseException):
        pass

    data = write_imagefolder(tmp_path / "img", per_split={"train": 8, "val": 3, "test": 3})
    recipe = write_recipe(tmp_path / "r.yaml", data, train={"epochs": 3, "batch_size": 4, "checkpoint_every": 4,
                                                          "merge": False, "log": ["tensorboard"]})
    full = apply_recipe(str(recipe), out=str(tmp_path / "full"))
    original = Trainer.save_checkpoint

    def save_then_die(self):
        original(self)
        if self.step == 8:  # mid-epoch 2 (6 steps per epoch); steps 9-10 then die unsaved
            for _ in range(2):
                self.train_step(torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))
            raise Killed

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_die)
    with pytest.raises(Killed):
        apply_recipe(str(recipe), out=str(tmp_path / "cut"))
    monkeypatch.setattr(Trainer, "save_checkpoint", original)
    resumed = apply_recipe(None, resume=str(tmp_path / "cut"))

    timing = {"img_per_s", "time"}
    strip = lambda rows: [{k: v for k, v in r.items() if k not in timing} for r in rows]
    assert strip(_csv_rows(resumed / "summary.csv")) == strip(_csv_rows(full / "summary.csv"))
    assert [r["epoch"] for r in _csv_rows(resumed / "summary.csv")] == ["1", "2", "3"]
    got, want = _scalars(resumed / "tensorboard"), _scalars(full / "tensorboard")
    for tag in ("train/loss", "train/lr", "val/top1", "test/top1"):
        assert got[tag] == want[tag], tag  # steps 9-10 of the killed session are hidden, not doubled


@pytest.mark.slow
def test_merged_config_of_builtin_weights_claims_no_timm_tag(tmp_path):
    """vit_tiny_patch16_224 with model.pretrained builtin:fractal_vit_tiny used to write timm's
    augreg tag into merged/config.json; a random init claims no licence at all."""
    from surgeon.apply import apply_recipe

    data = write_imagefolder(tmp_path / "img", per_split={"train": 4, "val": 2, "test": 2})
    surgery = [{"target": "blocks.*.attn.proj", "unfreeze": "bias"}]
    builtin = {"name": "vit_tiny_patch16_224", "pretrained": "builtin:fractal_vit_tiny",
               "kwargs": {"img_size": 32, "patch_size": 8, "depth": 6}}
    for name, model in (("builtin", builtin), ("random", {})):
        recipe = write_recipe(tmp_path / f"{name}.yaml", data, model=model, surgery=surgery,
                              train={"max_steps": 1, "batch_size": 6})
        run = apply_recipe(str(recipe), out=str(tmp_path / name))
        cfg = json.loads((run / "merged" / "config.json").read_text())["pretrained_cfg"]
        assert "tag" not in cfg, cfg
        if name == "builtin":
            assert cfg["license"] == "apache-2.0" and "fractal_vit_tiny" in cfg["description"]
        else:
            assert "license" not in cfg and "description" not in cfg
        assert cfg["mean"] == [0.5, 0.5, 0.5] and cfg["num_classes"] == 3  # the rest is timm's, untouched
