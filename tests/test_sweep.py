"""surgeon sweep: grid parsing and validation, the VTAB protocol, failures, pruning, resume,
edge extension, workers sharing one storage, the optional Optuna dependency."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from surgeon.errors import UserError
from surgeon.sweep import space
from tests.helpers import read_events
from tests.helpers import ROOT

optuna = pytest.importorskip("optuna")

# The built-in LoRA recipe on a 2-block 32 px ViT (random init) and the built-in digits task:
# 4 steps of 16 images, validated at steps 2 and 4 (about a second per trial).
TINY = ["model.name=vit_tiny_patch16_224", "model.pretrained=false",
        "model.kwargs={img_size: 32, patch_size: 8, depth: 2}", "data.source=builtin:digits",
        "data.num_workers=0", "train.max_steps=4", "train.batch_size=16", "train.eval_every=2",
        "train.warmup_steps=0", "train.checkpoint_every=1"]
FAST = dict(poll_s=0.2, heartbeat_s=0.5)


def _sweep(out, grid=("train.base_lr=[1e-2,1e-3]",), *, overrides=(), **kw):
    from surgeon.sweep import run_sweep

    kw = {**FAST, "seeds": [0], **kw}
    return run_sweep("lora", grid=list(grid), overrides=TINY + list(overrides), out=out, **kw)


def _recipe(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "recipe.yaml").read_text())


def _study(out: Path, name: str):
    storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(out / "study.journal")))
    return optuna.load_study(study_name=name, storage=storage)


# ------------------------------------------------------------------------ grid parsing

def test_parse_grid_is_typed_like_set_and_keeps_order():
    grid = space.parse_grid(["train.base_lr=[1e-2,5e-3,1e-3]", "surgery.0.mlae.masking.p=[0.1, 0.5]",
                             "train.optimizer=[adamw, sgd]", "surgery.0.lora.rank=[4, 8]"])
    assert list(grid) == ["train.base_lr", "surgery.0.mlae.masking.p", "train.optimizer", "surgery.0.lora.rank"]
    assert grid["train.base_lr"] == [0.01, 0.005, 0.001] and all(type(v) is float for v in grid["train.base_lr"])
    assert grid["train.optimizer"] == ["adamw", "sgd"]
    assert grid["surgery.0.lora.rank"] == [4, 8] and all(type(v) is int for v in grid["surgery.0.lora.rank"])
    configs = space.configurations({"a": [1, 2], "b": ["x", "y", "z"]})
    assert len(configs) == 6 and configs[0] == {"a": 1, "b": "x"} and configs[1] == {"a": 1, "b": "y"}
    assert space.short_name({"train.base_lr": 0.001, "surgery.0.mlae.masking.p": 0.5}) == "base_lr0.001_p0.5"


def test_grid_parse_problems_are_all_listed():
    with pytest.raises(UserError) as exc:
        space.parse_grid(["nokey", "train.base_lr=1e-3", "train.epochs=[1, 1]", "data.protocol=[tune]",
                          "train.base_lr=[1e-3", "a..b=[1]"])
    text = str(exc.value)
    for bit in ("'nokey'", "expected a non-empty list", "listed twice", "data.protocol: cannot be searched",
                "not valid YAML", "empty key segment"):
        assert bit in text, bit


def test_cli_grid_validation_lists_every_problem_and_runs_nothing(cli, tmp_path):
    out = tmp_path / "sw"
    res = cli("sweep", "mlae", "--data", "builtin:digits", "--out", out,
              "--grid", "train.base_lr=[1e-2,abc]", "--grid", "train.bogus=[1]",
              "--grid", "surgery.3.lora.rank=[4]", "--grid", "train.seed=[1,2]",
              "--grid", "surgery.0.mlae.masking.p=[0.5,-1]")
    assert res.code == 2, res
    for bit in ("--grid train.base_lr=abc", "--grid train.bogus=1", "--grid surgery.3.lora.rank=4",
                "--grid train.seed", "--grid surgery.0.mlae.masking.p=-1", "5 problem(s)", "nothing was run"):
        assert bit in res.err, bit
    assert "Traceback" not in res.err
    assert not out.exists()


def test_option_conflicts_are_user_errors(cli, tmp_path):
    base = ["sweep", "lora", "--data", "builtin:digits", "--out", tmp_path / "x", "--grid", "train.base_lr=[1e-2,1e-3]"]
    for extra, bit in ((["--trials", "2", "--sampler", "grid"], "--trials is for --sampler tpe"),
                       (["--trials", "9"], "only 2 configurations"),
                       (["--trials", "1", "--extend-edges"], "--extend-edges needs the grid sampler"),
                       (["--sampler", "random"], "expected grid or tpe"),
                       (["--seeds", "0,x"], "comma-separated integers"),
                       (["--workers", "0"], "expected 1 or more")):
        res = cli(*base, *extra)
        assert res.code == 2 and bit in res.err, (extra, res)


def test_missing_optuna_names_the_extra(cli, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "optuna", None)  # `import optuna` now raises ImportError
    res = cli("sweep", "lora", "--data", "builtin:digits", "--grid", "train.base_lr=[1e-3]", "--out", tmp_path / "s")
    assert res.code == 2, res
    assert "needs Optuna" in res.err and "pip install 'surgeon[sweep]'" in res.err
    assert not (tmp_path / "s").exists()


# ------------------------------------------------------------------------- edge values

def test_next_edge_value_keeps_the_outer_ratio():
    lrs = [1e-2, 5e-3, 1e-3, 5e-4]
    assert space.next_edge_value(lrs, "high") == pytest.approx(2e-2)
    assert space.next_edge_value(lrs, "low") == pytest.approx(2.5e-4)
    assert space.next_edge_value([5e-4, 1e-4], "low") == 2e-05  # a clean float, not 2.0000000000000003e-05
    assert space.next_edge_value([1e-2, 5e-3], "high") == 2e-2
    assert space.next_edge_value([0.1, 0.5, 0.7], "high") == pytest.approx(0.98)
    assert space.next_edge_value([0.1, 0.5, 0.7], "low") == pytest.approx(0.02)
    # integers stay integers; a zero has no ratio: the step is the difference
    assert space.next_edge_value([8, 16], "high") == 32 and type(space.next_edge_value([8, 16], "high")) is int
    assert space.next_edge_value([0, 1e-4], "low") == -1e-4
    assert space.next_edge_value([0, 1], "high") == 2
    assert space.next_edge_value([-1.0, -2.0], "low") == -4.0
    assert space.next_edge_value([1], "high") is None
    # repeated extension continues geometrically
    vals = [1e-3, 1e-2]
    for expected in (1e-1, 1.0, 10.0):
        new = space.next_edge_value(vals, "high")
        assert new == pytest.approx(expected)
        vals.append(new)
    assert space.extension_count(vals, [1e-3, 1e-2], "high") == 3
    assert space.extension_count(vals, [1e-3, 1e-2], "low") == 0


def test_edge_side_only_for_numeric_grids():
    assert space.edge_side([1e-2, 1e-3, 1e-4], 1e-4) == "low"
    assert space.edge_side([1e-2, 1e-3, 1e-4], 1e-2) == "high"
    assert space.edge_side([1e-2, 1e-3, 1e-4], 1e-3) is None
    assert space.edge_side(["adamw", "sgd"], "sgd") is None
    assert space.edge_side([True, False], True) is None
    assert space.edge_side([4], 4) is None


# --------------------------------------------------------------------- sweeps that train

@pytest.mark.slow
def test_sweep_tunes_on_val_then_retrains_best_on_trainval(tmp_path):
    out = tmp_path / "sw"
    res = _sweep(out)
    assert [t.state for t in res.trials] == ["complete", "complete"]
    assert [t.config for t in res.trials] == [{"train.base_lr": 0.01}, {"train.base_lr": 0.001}]
    for t in res.trials:
        run = out / t.run_dir
        assert run.parent.name == "trials" and run.name.startswith(f"{t.index + 1:03d}-base_lr")
        recipe = _recipe(run)
        assert recipe["data"]["protocol"] == "tune" and recipe["train"]["merge"] is False
        assert recipe["train"]["base_lr"] == t.config["train.base_lr"]
        summary = json.loads((run / "summary.json").read_text())
        assert summary["test_top1"] is None and summary["test_images"] == 0  # no test image touched
        vals = [e for e in read_events(run) if e["event"] == "eval" and e["split"] == "val"]
        assert [e["step"] for e in vals] == [2, 4]
        assert t.val_last == vals[-1]["top1"]  # the objective: the end of the schedule
        assert t.val_best == summary["best_val_top1"] == max(e["top1"] for e in vals)
        assert not (run / "merged").exists()
    best = max(res.trials, key=lambda t: (t.val_last, t.val_best, -t.index))
    assert res.best.config == best.config
    # the final run: best configuration, train+val, tested, merged
    assert [f.seed for f in res.finals] == [0] and res.finals[0].state == "complete"
    final = out / "final" / "seed0"
    recipe = _recipe(final)
    assert recipe["data"]["protocol"] == "final" and recipe["train"]["seed"] == 0
    assert recipe["train"]["base_lr"] == res.best.config["train.base_lr"]
    summary = json.loads((final / "summary.json").read_text())
    assert summary["train_images"] == 1000 and summary["test_images"] > 0
    assert res.finals[0].test_top1 == summary["test_top1"] == res.test_mean
    assert (final / "merged").is_dir()
    # two values: the best is on an edge, and the report says so
    assert len(res.edges) == 1 and res.edges[0].key == "train.base_lr"
    md = (out / "report.md").read_text()
    assert "**Warning:** the best `train.base_lr`" in md and "Final runs" in md
    assert (out / "report.html").is_file() and (out / "plots" / "sweep.png").stat().st_size > 1000
    stored = json.loads((out / "result.json").read_text())
    assert stored["best_config"] == res.best.config and stored["test_mean"] == res.test_mean
    # the storage agrees: one complete trial per configuration
    study = _study(out, res.study)
    assert sorted(t.value for t in study.trials if t.state.name == "COMPLETE") == sorted(t.val_last for t in res.trials)

    # The same call again: nothing trains (run directories untouched), same result.
    mtimes = {p: p.stat().st_mtime for p in out.glob("*/*/summary.json")}
    again = _sweep(out)
    assert {p: p.stat().st_mtime for p in out.glob("*/*/summary.json")} == mtimes
    assert again.best.config == res.best.config and again.test_mean == res.test_mean


@pytest.mark.slow
def test_diverged_trial_is_recorded_not_fatal(tmp_path):
    out = tmp_path / "sw"
    res = _sweep(out, ("train.base_lr=[1e-3,1e30]",), overrides=["train.max_bad_steps=1"], seeds=[])
    by_lr = {t.config["train.base_lr"]: t for t in res.trials}
    assert by_lr[1e-3].state == "complete"
    bad = by_lr[1e30]
    assert bad.state == "failed" and "non-finite" in bad.reason and bad.val_last is None
    assert res.best.config == {"train.base_lr": 1e-3}
    events = read_events(out / bad.run_dir)
    assert events[-1]["event"] == "stopped" and events[-1]["reason"] == "nonfinite"
    study = _study(out, res.study)
    failed = [t for t in study.trials if t.state.name == "FAIL" and t.user_attrs.get("failure") == "diverged"]
    assert len(failed) == 1 and failed[0].params == {"train.base_lr": 1e30}
    md = (out / "report.md").read_text()
    assert "failed (diverged)" in md and "train.base_lr=1e+30): failed (diverged): training stopped at step 2" in md
    # a rerun does not retry a diverged configuration
    mtime = (out / bad.run_dir / "metrics.jsonl").stat().st_mtime
    _sweep(out, ("train.base_lr=[1e-3,1e30]",), overrides=["train.max_bad_steps=1"], seeds=[])
    assert (out / bad.run_dir / "metrics.jsonl").stat().st_mtime == mtime


@pytest.mark.slow
def test_prune_stops_a_trial_and_records_why(tmp_path, monkeypatch):
    """The pruning decision is Optuna's; here a pruner that condemns everything shows the wiring:
    the trainer stops after the warm-up, the study says PRUNED, the run says why."""
    monkeypatch.setattr(optuna.pruners, "MedianPruner", lambda **kw: optuna.pruners.ThresholdPruner(lower=101.0))
    out = tmp_path / "sw"
    res = _sweep(out, ("train.base_lr=[1e-3]",), prune=True)
    (t,) = res.trials
    assert t.state == "pruned" and "step 2" in t.reason and t.steps == 2
    assert t.val_best == max(_study(out, res.study).trials[0].intermediate_values.values())
    assert "pruned at step 2" in (out / "report.md").read_text()
    stopped = [e for e in read_events(out / t.run_dir) if e["event"] == "stopped"]
    assert stopped and stopped[-1]["reason"].startswith("pruned") and stopped[-1]["step"] == 2
    assert not (out / t.run_dir / "summary.json").exists()
    study = _study(out, res.study)
    assert [x.state.name for x in study.trials] == ["PRUNED"] and study.trials[0].intermediate_values
    assert res.best is None and res.finals == []
    # Never at the last evaluation: the run is complete there (here the only one, at step 4).
    res = _sweep(tmp_path / "sw2", ("train.base_lr=[1e-3]",), overrides=["train.eval_every=4"], prune=True, seeds=[])
    assert [t.state for t in res.trials] == ["complete"]


@pytest.mark.slow
def test_trainer_hook_reports_each_validation_and_can_stop(tmp_path):
    from surgeon.apply import apply_recipe
    from surgeon.train.trainer import TrainingStopped

    seen = []

    def hook(step, epoch, top1):
        seen.append((step, epoch, top1))
        return "enough" if step == 4 else None

    with pytest.raises(TrainingStopped) as exc:
        apply_recipe("lora", overrides=TINY + ["train.merge=false"], out=str(tmp_path / "r"), on_validate=hook)
    assert exc.value.step == 4 and exc.value.reason == "enough"
    vals = [e for e in read_events(tmp_path / "r") if e["event"] == "eval"]
    assert [(s, e) for s, e, _ in seen] == [(2, 1), (4, 1)] and [t for *_, t in seen] == [e["top1"] for e in vals]
    assert read_events(tmp_path / "r")[-1] == {"event": "stopped", "step": 4, "epoch": 1, "reason": "enough",
                                               "time": read_events(tmp_path / "r")[-1]["time"]}


class _Killed(BaseException):
    """Stands for kill -9: escapes every handler, records nothing."""


@pytest.mark.slow
def test_resume_after_interruption(tmp_path, monkeypatch):
    """A sweep killed in the middle of its second trial, run again: the first trial is not
    re-run, the second resumes from its checkpoint, then the final run."""
    from surgeon.sweep import runner

    real = runner._apply

    def dies_in_second_trial(*args, on_validate=None, **kw):
        def hook(step, epoch, top1):
            if "base_lr0.001" in str(kw.get("out")) and step == 2:
                raise _Killed()
            return on_validate(step, epoch, top1) if on_validate else None
        return real(*args, on_validate=hook, **kw)

    monkeypatch.setattr(runner, "_apply", dies_in_second_trial)
    monkeypatch.setattr(runner._Worker, "_abandon", lambda *a: None)  # a killed process records nothing
    out = tmp_path / "sw"
    with pytest.raises(_Killed):
        _sweep(out)
    first, second = out / "trials" / "001-base_lr0.01", out / "trials" / "002-base_lr0.001"
    assert (first / "summary.json").is_file() and not (second / "summary.json").exists()
    assert (second / "checkpoints" / "last.pt").is_file()
    mtime = (first / "summary.json").stat().st_mtime
    name = json.loads((out / "sweep.json").read_text())["study"]
    assert [t.state.name for t in _study(out, name).trials] == ["COMPLETE", "RUNNING"]

    monkeypatch.undo()
    res = _sweep(out)
    assert (first / "summary.json").stat().st_mtime == mtime
    assert [e["event"] for e in read_events(first)].count("start") == 1
    starts = [e for e in read_events(second) if e["event"] == "start"]
    assert [s["resumed_from_step"] for s in starts] == [None, 1]  # resumed from the step-1 checkpoint
    assert [t.state for t in res.trials] == ["complete", "complete"] and res.trials[1].attempts == 2
    assert res.finals[0].state == "complete"
    states = [(t.state.name, t.user_attrs.get("failure")) for t in _study(out, name).trials]
    assert states == [("COMPLETE", None), ("FAIL", "interrupted"), ("COMPLETE", None)]


@pytest.mark.slow
def test_extend_edges_adds_values_until_the_best_is_inside(tmp_path, monkeypatch):
    """The objective is replaced by a known curve (peak at lr 1e-1) so the extension path is exact."""
    from surgeon.sweep import runner

    def fake_apply(recipe, *, overrides, out, **kw):
        lr = next(float(o.split("=", 1)[1]) for o in overrides if o.startswith("train.base_lr="))
        score = 90.0 - 10 * abs(math.log10(lr) + 1)  # best at 1e-1
        run = Path(out)
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text(json.dumps({"event": "eval", "split": "val", "step": 4, "top1": score}) + "\n")
        (run / "summary.json").write_text(json.dumps({"best_val_top1": score, "steps": 4, "wall_seconds": 0.1}))

    monkeypatch.setattr(runner, "_apply", fake_apply)
    monkeypatch.setattr(runner, "_preflight", lambda spec: 800)
    res = _sweep(tmp_path / "sw", ("train.base_lr=[1e-4,1e-3]",), extend_edges=True, seeds=[])
    assert [t.config["train.base_lr"] for t in res.trials] == pytest.approx([1e-4, 1e-3, 1e-2, 1e-1, 1.0])
    assert res.best.config["train.base_lr"] == pytest.approx(1e-1) and res.edges == []
    # without the flag: the same study, no new trials, and a plain warning
    res2 = _sweep(tmp_path / "sw2", ("train.base_lr=[1e-4,1e-3]",), seeds=[])
    assert len(res2.trials) == 2 and res2.edges[0].side == "high" and "--extend-edges" in res2.edges[0].note


@pytest.mark.slow
def test_extend_edges_stops_after_three_and_at_invalid_values(tmp_path, monkeypatch):
    from surgeon.sweep import runner

    def fake_apply(recipe, *, overrides, out, **kw):
        p = next(float(o.split("=", 1)[1]) for o in overrides if o.startswith("surgery.0.lora.dropout="))
        lr = next(float(o.split("=", 1)[1]) for o in overrides if o.startswith("train.base_lr="))
        score = 50 + 10 * p - lr  # best: the largest dropout, the smallest lr
        run = Path(out)
        run.mkdir(parents=True)
        (run / "metrics.jsonl").write_text(json.dumps({"event": "eval", "split": "val", "step": 4, "top1": score}) + "\n")
        (run / "summary.json").write_text(json.dumps({"best_val_top1": score, "steps": 4, "wall_seconds": 0.1}))

    monkeypatch.setattr(runner, "_apply", fake_apply)
    monkeypatch.setattr(runner, "_preflight", lambda spec: 800)
    res = _sweep(tmp_path / "sw", ("surgery.0.lora.dropout=[0.2,0.4]", "train.base_lr=[4e-3,2e-3]"),
                 extend_edges=True, seeds=[])
    grid = res.grid
    # dropout 0.4 -> 0.8 -> 1.6 is out of range (the schema refuses it): stop there
    assert grid["surgery.0.lora.dropout"] == pytest.approx([0.2, 0.4, 0.8])
    # lr: 3 extensions below 2e-3 (1e-3, 5e-4, 2.5e-4), then the limit
    assert sorted(grid["train.base_lr"]) == pytest.approx([2.5e-4, 5e-4, 1e-3, 2e-3, 4e-3])
    assert len(res.trials) == 3 * 5
    notes = {(e.key, e.side): e.note for e in res.edges}
    assert "invalid" in notes[("surgery.0.lora.dropout", "high")]
    assert "limit" in notes[("train.base_lr", "low")]
    # A rerun replays the same decisions from the stored results and trains nothing new.
    calls = []
    monkeypatch.setattr(runner, "_apply", lambda *a, **kw: calls.append(kw))
    again = _sweep(tmp_path / "sw", ("surgery.0.lora.dropout=[0.2,0.4]", "train.base_lr=[4e-3,2e-3]"),
                   extend_edges=True, seeds=[])
    assert calls == [] and again.grid == grid and len(again.trials) == 15
    assert again.best.config == res.best.config


@pytest.mark.slow
def test_tpe_sampler_trains_n_distinct_configurations(tmp_path):
    res = _sweep(tmp_path / "sw", ("train.base_lr=[1e-2,3e-3,1e-3]",), trials=2, seeds=[])
    assert res.sampler == "tpe" and len(res.trials) == 2
    assert len({t.config["train.base_lr"] for t in res.trials}) == 2
    assert all(t.state == "complete" for t in res.trials)


def test_a_sweep_directory_refuses_another_sweep(tmp_path):
    from surgeon.sweep import runner

    spec = runner.prepare_spec("lora", grid=["train.base_lr=[1e-2,1e-3]"], overrides=TINY, out=tmp_path / "sw")
    runner._write_sweep_json(spec, "x")
    assert runner.prepare_spec("lora", grid=["train.base_lr=[1e-2,1e-3]"], overrides=TINY, out=tmp_path / "sw",
                               seeds="0,1", prune=True).study == spec.study  # seeds/pruning may change
    with pytest.raises(UserError, match="holds another sweep .*grid differs"):
        runner.prepare_spec("lora", grid=["train.base_lr=[1e-2]"], overrides=TINY, out=tmp_path / "sw")


def test_storage_passwords_stay_out_of_files(tmp_path):
    from surgeon.sweep import runner

    url = "postgresql://me:s3cret@db.example/sweeps"
    spec = runner.prepare_spec("lora", grid=["train.base_lr=[1e-2,1e-3]"], overrides=TINY, out=tmp_path / "sw",
                               storage=url)
    runner._write_sweep_json(spec, runner.st.masked(url))
    text = (tmp_path / "sw" / "sweep.json").read_text()
    assert "s3cret" not in text and "postgresql://me:***@db.example/sweeps" in text
    with pytest.raises(UserError, match="pass --storage again"):
        runner.prepare_spec("lora", grid=["train.base_lr=[1e-2,1e-3]"], overrides=TINY, out=tmp_path / "sw")
    assert runner.prepare_spec("lora", grid=["train.base_lr=[1e-2,1e-3]"], overrides=TINY, out=tmp_path / "sw",
                               storage=url).storage == url


# ----------------------------------------------------------------------- real processes

def _cli_cmd(out: Path, *extra: str) -> list[str]:
    cmd = [sys.executable, "-m", "surgeon.cli", "sweep", "lora", "--out", str(out)]
    for o in TINY:
        cmd += ["--set", o]
    return cmd + list(extra)


def _env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CI": "1", "PYTHONPATH": str(ROOT)}


@pytest.mark.slow
def test_kill_9_mid_trial_then_same_command_continues(tmp_path):
    out = tmp_path / "sw"
    cmd = _cli_cmd(out, "--grid", "train.base_lr=[1e-2,1e-3,1e-4]", "--seeds", "0",
                   "--set", "train.max_steps=40", "--set", "train.eval_every=10", "--set", "train.checkpoint_every=5")
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=log, stderr=log, start_new_session=True)
    second = out / "trials" / "002-base_lr0.001"
    deadline = time.time() + 240
    while not (second / "checkpoints" / "last.pt").is_file():
        assert proc.poll() is None, (tmp_path / "first.log").read_text()[-3000:]
        assert time.time() < deadline, "the second trial never wrote a checkpoint"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    log.close()
    assert not (second / "summary.json").exists()
    first_mtime = (out / "trials" / "001-base_lr0.01" / "summary.json").stat().st_mtime

    done = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "was interrupted" in done.stderr and "resuming" in done.stderr
    assert (out / "trials" / "001-base_lr0.01" / "summary.json").stat().st_mtime == first_mtime
    starts = [e for e in read_events(second) if e["event"] == "start"]
    assert len(starts) == 2 and starts[1]["resumed_from_step"] >= 5
    result = json.loads((out / "result.json").read_text())
    assert [t["state"] for t in result["trials"]] == ["complete"] * 3
    assert result["finals"][0]["state"] == "complete" and result["test_mean"] is not None
    assert "trial | train.base_lr" in done.stdout and "report:" in done.stdout


@pytest.mark.slow
def test_two_processes_share_one_storage(tmp_path):
    """Two sweep processes on one journal file (as two machines on one database would): both
    train, no configuration trains twice, every result is there; then --workers 2 the same way."""
    out = tmp_path / "sw"
    cmd = _cli_cmd(out, "--grid", "train.base_lr=[1e-2,5e-3,2e-3,1e-3,5e-4,2e-4]", "--seeds", "0,1",
                   "--set", "train.max_steps=12", "--set", "train.eval_every=6")
    procs = [subprocess.Popen(cmd, cwd=ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    outs = [p.communicate(timeout=900) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    result = json.loads((out / "result.json").read_text())
    study = _study(out, result["study"])
    owners = {}
    for t in study.trials:
        if t.state.name == "COMPLETE":
            owners.setdefault(t.user_attrs["config_key"], []).append(t.user_attrs["owner"]["pid"])
    assert len(owners) == 6 and all(len(v) == 1 for v in owners.values())  # each configuration trained once
    assert len({v[0] for v in owners.values()}) == 2  # both processes trained
    for t in result["trials"]:
        starts = [e for e in read_events(out / t["run_dir"]) if e["event"] == "start"]
        assert len(starts) == 1 and t["state"] == "complete"
    assert [f["state"] for f in result["finals"]] == ["complete", "complete"]

    out2 = tmp_path / "sw2"
    # Longer trials: the spawned worker needs a few seconds to start.
    done = subprocess.run(_cli_cmd(out2, "--grid", "train.base_lr=[1e-2,5e-3,2e-3,1e-3,5e-4,2e-4]", "--seeds", "0",
                                   "--set", "train.max_steps=40", "--set", "train.eval_every=20", "--workers", "2"),
                          cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    study = _study(out2, json.loads((out2 / "result.json").read_text())["study"])
    complete = [t for t in study.trials if t.state.name == "COMPLETE"]
    assert len(complete) == 6 and len({t.user_attrs["config_key"] for t in complete}) == 6
    assert len({t.user_attrs["owner"]["pid"] for t in complete}) == 2
    assert (out2 / "logs" / "worker1.log").stat().st_size > 0
