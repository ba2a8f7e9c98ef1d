"""`--gpus` of `surgeon suite` / `surgeon sweep`: the flag's checks, one GPU per spawned worker,
every task exactly once, failures that do not stop the other workers. No GPU is needed: the
device count is injected (``surgeon.gpus.cuda_device_count``) and the workers' tasks record the
``CUDA_VISIBLE_DEVICES`` they see."""
from __future__ import annotations

import json
import os

import pytest
import yaml

from surgeon import gpus as gp
from surgeon.errors import UserError
from tests.gpu_tasks import record


@pytest.fixture
def devices(monkeypatch):
    """``devices(n)``: this machine now has ``n`` CUDA devices (0: no CUDA)."""
    def set_count(n: int) -> None:
        monkeypatch.setattr(gp, "cuda_device_count", lambda: n)

    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return set_count


@pytest.mark.parametrize("text, bit", [("0,,x", "expected comma-separated GPU indices"),
                                       ("", "expected comma-separated GPU indices"),
                                       ("-1", "expected comma-separated GPU indices"),
                                       ("1.5", "expected comma-separated GPU indices"),
                                       ("0,1,0", "GPU 0 is listed twice"),
                                       ("0,4", "GPU 4 does not exist (this machine has 4 CUDA devices: 0-3)")])
def test_parse_gpus_refuses_bad_lists(devices, text, bit):
    devices(4)
    with pytest.raises(UserError) as exc:
        gp.parse_gpus(text)
    assert bit in str(exc.value) and exc.value.where == "--gpus"


def test_parse_gpus_without_cuda_and_with_workers(devices):
    devices(0)
    with pytest.raises(UserError, match="torch sees no CUDA device"):
        gp.parse_gpus("0")
    devices(2)
    with pytest.raises(UserError, match="with --gpus each GPU is one worker"):
        gp.parse_gpus("0,1", workers=2)
    assert gp.parse_gpus(" 1, 0", workers=1) == ["1", "0"]


def test_parse_gpus_indices_count_the_visible_devices(devices, monkeypatch):
    devices(2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,6")
    assert gp.parse_gpus("1") == ["6"]  # index 1 of what this process sees is physical GPU 6


def test_pinned_env_restores_the_previous_value(monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "2,3")
    with gp.pinned_env("3"):
        assert os.environ["CUDA_VISIBLE_DEVICES"] == "3"
    assert os.environ["CUDA_VISIBLE_DEVICES"] == "2,3"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    with gp.pinned_env("0"):
        pass
    assert "CUDA_VISIBLE_DEVICES" not in os.environ


def _records(folder, names):
    return {n: json.loads((folder / f"{n}.json").read_text()) for n in names}


def test_run_on_gpus_one_gpu_per_worker_each_task_once(tmp_path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    names = [f"t{i}" for i in range(7)]
    events = []
    res = gp.run_on_gpus(record, [(str(tmp_path), n, "slow") for n in names], ["0", "1", "2"], logs=tmp_path / "logs",
                         on_event=lambda kind, i, gpu, info: events.append((kind, i, gpu)))
    # every worker's environment carried exactly its own GPU
    assert res.worker_env == {0: "0", 1: "1", 2: "2"}
    assert sorted(res.done) == list(range(7)) and res.failed == {}
    recs = _records(tmp_path, names)
    assert all(r["runs"] == 1 for r in recs.values())  # each task ran exactly once
    for i, n in enumerate(names):
        assert res.done[i][0] == recs[n]["gpu"]
    gpu_of_pid = {}
    for r in recs.values():
        assert gpu_of_pid.setdefault(r["pid"], r["gpu"]) == r["gpu"]  # a worker keeps its GPU
    assert len(set(gpu_of_pid.values())) == len(gpu_of_pid)  # and no two workers share one
    assert sorted(i for kind, i, _ in events if kind == "start") == list(range(7))
    assert "CUDA_VISIBLE_DEVICES" not in os.environ  # this process is left as it was
    assert sum((tmp_path / "logs" / f"gpu{g}.log").read_text().count("task ") for g in "012") == 7


def test_run_on_gpus_failures_do_not_stop_the_others(tmp_path):
    kinds = ["ok", "user", "bug", "die", "ok", "ok"]
    tasks = [(str(tmp_path), f"t{i}", k) for i, k in enumerate(kinds)]
    res = gp.run_on_gpus(record, tasks, ["0", "1"], logs=tmp_path / "logs")
    assert sorted(res.done) == [0, 4, 5]
    assert {i: kind for i, (_, kind, _) in res.failed.items()} == {1: "user", 2: "bug", 3: "lost"}
    assert "task t1 refused" in res.failed[1][2] and "exit code 3" in res.failed[3][2]
    assert all(r["runs"] == 1 for r in _records(tmp_path, ["t0", "t1", "t2", "t4", "t5"]).values())
    logs = "".join(p.read_text() for p in (tmp_path / "logs").iterdir())
    assert "ValueError: task t2 broke" in logs  # the bug's traceback is in its worker's log


# ------------------------------------------------------------------------------------ CLI

def _suite(tmp_path) -> str:
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump({
        "name": "tiny", "recipes": ["lora"], "datasets": ["builtin:digits"], "seeds": [0, 1],
        "model": {"name": "vit_tiny_patch16_224", "pretrained": False,
                  "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2}},
        "set": {"train.max_steps": 2, "train.batch_size": 16, "train.eval_every": 2, "train.warmup_steps": 0,
                "data.num_workers": 0}}))
    return str(path)


@pytest.mark.parametrize("extra, bit", [(["--gpus", "0,,x"], "--gpus '0,,x': expected comma-separated"),
                                        (["--gpus", "0,1", "--workers", "2"], "each GPU is one worker"),
                                        (["--gpus", "7"], "GPU 7 does not exist")])
def test_suite_and_sweep_refuse_bad_gpus_before_anything_runs(cli, tmp_path, devices, extra, bit):
    devices(2)
    res = cli("suite", _suite(tmp_path), "--out", tmp_path / "s", *extra)
    assert res.code == 2 and bit in res.err and "Traceback" not in res.err, res
    assert not (tmp_path / "s").exists()
    pytest.importorskip("optuna")
    res = cli("sweep", "lora", "--data", "builtin:digits", "--grid", "train.base_lr=[1e-2,1e-3]",
              "--out", tmp_path / "w", *extra)
    assert res.code == 2 and bit in res.err and "Traceback" not in res.err, res
    assert not (tmp_path / "w").exists()


def test_gpus_without_cuda_exit_2_saying_so(cli, tmp_path, devices):
    devices(0)
    res = cli("suite", _suite(tmp_path), "--out", tmp_path / "s", "--gpus", "0")
    assert res.code == 2 and "torch sees no CUDA device" in res.err, res


def test_suite_hands_its_unfinished_cells_to_the_gpu_workers(tmp_path, devices, monkeypatch):
    """run_suite gives every cell still to train, with its GPU list, to run_on_gpus (stopped
    there: what the workers then do is the test above)."""
    from surgeon import suite_runner

    devices(2)
    seen = {}

    class Stop(Exception):
        pass

    def fake(fn, tasks, gpus, *, logs, on_event=None):
        seen.update(fn=fn, cells=[c.label for c in tasks], gpus=gpus, logs=logs)
        raise Stop

    monkeypatch.setattr(suite_runner, "run_on_gpus", fake)
    with pytest.raises(Stop):
        suite_runner.run_suite(_suite(tmp_path), out=tmp_path / "s", gpus="1,0")
    assert seen == {"fn": suite_runner.train_cell, "gpus": ["1", "0"], "logs": tmp_path / "s" / "logs",
                    "cells": ["lora × builtin:digits × seed 0", "lora × builtin:digits × seed 1"]}


@pytest.mark.slow
def test_suite_on_two_gpus_trains_each_cell_once_and_records_its_gpu(tmp_path, devices):
    """Real cells in spawned workers (on the CPU here: the workers see a CUDA_VISIBLE_DEVICES
    that names no device); the report is written, and a rerun trains nothing."""
    from surgeon.suite_runner import run_suite

    devices(2)
    out = tmp_path / "s"
    run_suite(_suite(tmp_path), out=out, gpus="0,1")
    gpus = []
    for seed in (0, 1):
        run = out / "lora" / "digits" / f"seed{seed}"
        env = json.loads((run / "summary.json").read_text())["environment"]
        gpus.append(env["cuda_visible_devices"])
        assert sum(1 for line in (run / "metrics.jsonl").read_text().splitlines() if '"start"' in line) == 1
    assert set(gpus) <= {"0", "1"}
    assert (out / "report" / "comparison.md").is_file() or any((out / "report").glob("*.md"))
    before = {p: p.stat().st_mtime for p in out.rglob("summary.json")}
    run_suite(_suite(tmp_path), out=out, gpus="0,1")
    assert {p: p.stat().st_mtime for p in out.rglob("summary.json")} == before


@pytest.mark.slow
def test_sweep_on_two_gpus_runs_every_trial_once(tmp_path, devices):
    pytest.importorskip("optuna")
    from surgeon.sweep import run_sweep
    from tests.test_sweep import FAST, TINY

    devices(2)
    out = tmp_path / "w"
    result = run_sweep("lora", grid=["train.base_lr=[1e-2,5e-3,1e-3]"], overrides=TINY, seeds=[0], out=out,
                       gpus="0,1", **FAST)
    assert [t.state for t in result.trials] == ["complete"] * 3 and result.finals[0].state == "complete"
    for t in result.trials:
        run = out / t.run_dir
        env = json.loads((run / "summary.json").read_text())["environment"]
        assert env["cuda_visible_devices"] in ("0", "1")
