"""The trainer: schedule, optimizer groups, regularisers, determinism, resume (also after SIGKILL),
non-finite steps, gradient accumulation."""
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
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import surgeon
from surgeon.errors import UserError
from surgeon.apply import apply_recipe
from surgeon.recipe import section
from surgeon.train.checkpoint import load_checkpoint
from surgeon.train.regularizers import Objective, alignment_loss, consistency_loss, find_blocks
from surgeon.train.schedule import build_optimizer, lr_factor, peak_lr, step_budget

from .helpers import TINY_MODEL, read_events, write_imagefolder, write_recipe


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("data") / "img", per_split={"train": 8, "val": 3, "test": 3})


def _run(recipe: Path, out: Path, **kwargs) -> Path:
    return apply_recipe(str(recipe), out=str(out), **kwargs)


def _tensors(run: Path, name: str = "adapter.safetensors") -> dict:
    return load_file(str(run / name))


def _losses(run: Path) -> list[tuple]:
    return [(e["step"], e["loss"], e["ce"], e["consistency"], e["lr"]) for e in read_events(run) if e["event"] == "train"]


def _assert_same_tensors(a: dict, b: dict, atol: float = 0.0):
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), f"{k}: max diff {(a[k] - b[k]).abs().max().item()}"
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0)


# ------------------------------------------------------------------------ schedule

def test_step_budget_warmup_and_cap():
    cfg = {"batch_size": 4, "epochs": 10, "max_steps": None, "warmup_steps": None, "warmup_epochs": 2}
    b = step_budget(section("train", cfg), num_train=18)
    assert (b.steps_per_epoch, b.total_steps, b.warmup_steps, b.drop_last) == (4, 40, 8, True)
    b = step_budget(section("train", {**cfg, "max_steps": 13}), num_train=18)
    assert (b.total_steps, b.epochs) == (13, 4)
    b = step_budget(section("train", {**cfg, "warmup_steps": 100}), num_train=18)
    assert (b.warmup_steps, b.warmup_requested, b.warmup_clamped) == (20, 100, True)  # at most half the run
    b = step_budget(section("train", cfg), num_train=3)  # fewer images than a batch: one short batch per epoch
    assert (b.steps_per_epoch, b.drop_last) == (1, False)


def test_lr_schedule_shape():
    kw = dict(warmup_steps=4, total_steps=14, schedule="cosine", min_factor=0.1)
    values = [lr_factor(s, **kw) for s in range(14)]
    assert values[:4] == [0.25, 0.5, 0.75, 1.0]
    assert values[4] == 1.0 and all(a >= b for a, b in zip(values[4:], values[5:]))
    assert values[-1] == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 9 / 10)))
    assert lr_factor(10, warmup_steps=0, total_steps=20, schedule="constant", min_factor=0) == 1.0
    assert peak_lr(section("train", {"base_lr": 1e-3, "lr_scaling": "linear", "batch_size": 128})) == pytest.approx(5e-4)
    assert peak_lr(section("train", {"base_lr": 1e-3, "lr_scaling": "none", "batch_size": 128})) == 1e-3


def test_optimizer_trains_only_trainable_and_skips_decay_on_1d():
    recipe = surgeon.load_recipe({"name": "t", "model": TINY_MODEL, "surgery": [
        {"target": "blocks.*.mlp", "adapter": {"bottleneck": 4, "learnable_scale": True}}]})
    model = surgeon.build_model(recipe, weights=False, num_classes=3)
    opt = build_optimizer(model, recipe.train)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for g in opt.param_groups if g["weight_decay"] > 0 for p in g["params"]}
    plain = {names[id(p)] for g in opt.param_groups if g["weight_decay"] == 0 for p in g["params"]}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert decayed | plain == trainable and not decayed & plain
    assert "head.weight" in decayed and "head.bias" in plain
    assert all(model.get_parameter(n).ndim >= 2 for n in decayed)
    assert any("scale" in n for n in plain)  # the learnable adapter scale: 1-d, no decay


# ------------------------------------------------------------------------ regularisers

def test_consistency_loss_is_symmetric_kl_with_stop_gradient():
    torch.manual_seed(0)
    z1 = torch.randn(5, 7, requires_grad=True)
    z2 = torch.randn(5, 7, requires_grad=True)
    loss = consistency_loss(z1, z2)
    p1, p2 = z1.softmax(-1), z2.softmax(-1)
    kl = lambda p, q: (p * (p.log() - q.log())).sum(-1).mean()  # KL(p || q), batch mean
    assert loss.item() == pytest.approx(0.5 * (kl(p2, p1) + kl(p1, p2)).item(), rel=1e-5)
    assert consistency_loss(z1, z1).item() == pytest.approx(0.0, abs=1e-7)
    # Stop-gradient: each pass only gets the gradient of the term where it is the prediction.
    loss.backward()
    g1 = z1.grad.clone()
    z1.grad = None
    (0.5 * F.kl_div(z1.log_softmax(-1), z2.softmax(-1).detach(), reduction="batchmean")).backward()
    torch.testing.assert_close(g1, z1.grad)


def test_alignment_loss_and_blocks():
    a = [torch.ones(2, 3), torch.zeros(2, 4)]
    b = [torch.zeros(2, 3), torch.zeros(2, 4)]
    assert alignment_loss(a, b).item() == pytest.approx(0.5)
    import timm

    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=3)
    assert [n for n, _ in find_blocks(vit)] == ["blocks.0", "blocks.1", "blocks.2"]


def _mosa_model(seed=0):
    recipe = surgeon.load_recipe({"name": "t", "model": TINY_MODEL, "surgery": [
        {"target": "blocks.*.mlp", "adapter": {"bottleneck": 4}, "experts": {"count": 4}}],
        "regularizers": {"consistency": {"weight": 1.0}}})
    torch.manual_seed(seed)
    model = surgeon.build_model(recipe, weights=False, num_classes=3)
    with torch.no_grad():  # move the experts away from their zero init so draws matter
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.5)
    return recipe, model


@pytest.mark.parametrize("batched", [False, True])
def test_objective_two_passes_differ_and_alignment_hooks(batched):
    recipe, model = _mosa_model()
    reg = {"consistency": {"weight": 1.0, "batched": batched}, "feature_alignment": {"weight": 0.5, "blocks": "1:"}}
    objective = Objective(model, section("regularizers", reg))
    model.train()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 0])
    parts = objective(model, x, y)
    assert parts["consistency"].item() > 0 and parts["alignment"].item() > 0
    assert parts["loss"].item() == pytest.approx(
        (parts["ce"] + parts["consistency"] + 0.5 * parts["alignment"]).item(), rel=1e-6)
    assert [n for n, _ in objective.features.blocks] == ["blocks.1"]
    parts["loss"].backward()
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    assert model.surgeon_sampler.groups == 1  # restored after the batched pass


# ------------------------------------------------------------------ determinism and resume

RESUME_TRAIN = {"epochs": 3, "batch_size": 4, "checkpoint_every": 4, "merge": False}
RESUME_REG = {"consistency": {"weight": 1.0}}


class _Killed(BaseException):
    """Stands in for SIGKILL in-process: nothing catches a BaseException subclass."""


@pytest.mark.slow
def test_same_seed_same_numbers_other_seed_not(tmp_path, data):
    recipe = write_recipe(tmp_path / "r.yaml", data, train=RESUME_TRAIN, regularizers=RESUME_REG,
                          data={"augment": "rrc_flip"})
    a = _run(recipe, tmp_path / "a")
    b = _run(recipe, tmp_path / "b")
    _assert_same_tensors(_tensors(a), _tensors(b))
    assert _losses(a) == _losses(b) and len(_losses(a)) == 18
    c = _run(recipe, tmp_path / "c", overrides=["train.seed=1"])
    assert _losses(c) != _losses(a)


@pytest.mark.slow
def test_resume_mid_epoch_gives_identical_weights(tmp_path, data, monkeypatch):
    """Interrupt right after the mid-epoch checkpoint at step 8 (epoch 2, batch 2), resume, and
    end with the same tensors, losses and evaluations as an uninterrupted run."""
    from surgeon.train.trainer import Trainer

    recipe = write_recipe(tmp_path / "r.yaml", data, train=RESUME_TRAIN, regularizers=RESUME_REG,
                          data={"augment": "rrc_flip"})
    full = _run(recipe, tmp_path / "full")

    original = Trainer.save_checkpoint

    def save_then_die(self):
        original(self)
        if self.step == 8:
            self.train_step(*next(iter([(torch.zeros(4, 3, 32, 32), torch.zeros(4, dtype=torch.long))])))  # lost work
            raise _Killed

    monkeypatch.setattr(Trainer, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        _run(recipe, tmp_path / "cut")
    monkeypatch.setattr(Trainer, "save_checkpoint", original)
    state = load_checkpoint(tmp_path / "cut" / "checkpoints" / "last.pt")
    assert (state["trainer"]["step"], state["trainer"]["epoch"], state["trainer"]["batch"]) == (8, 1, 2)
    assert not (tmp_path / "cut" / "adapter.safetensors").exists()

    resumed = apply_recipe(None, resume=str(tmp_path / "cut"))
    _assert_same_tensors(_tensors(full), _tensors(resumed))
    _assert_same_tensors(load_checkpoint(full / "checkpoints" / "last.pt")["model"],
                         load_checkpoint(resumed / "checkpoints" / "last.pt")["model"])
    assert _losses(full) == _losses(resumed)  # no step repeated or lost in the log either
    evals = lambda run: [(e["split"], e["step"], e["top1"]) for e in read_events(run) if e["event"] == "eval"]
    assert evals(full) == evals(resumed)
    starts = [e for e in read_events(resumed) if e["event"] == "start"]
    assert [s["resumed_from_step"] for s in starts] == [None, 8]


@pytest.mark.slow
def test_resume_refuses_another_recipe(tmp_path, data, cli):
    recipe = write_recipe(tmp_path / "r.yaml", data, train={"max_steps": 2, "merge": False})
    run = _run(recipe, tmp_path / "run")
    res = cli("apply", str(recipe), "--resume", str(run), "--set", "train.base_lr=0.5")
    assert res.code == 2 and "recipe differs" in res.err and "train.base_lr: 0.01 -> 0.5" in res.err
    # The same recipe resumes a finished run: nothing is retrained, the end is redone once.
    before = _tensors(run)
    res = cli("apply", str(recipe), "--resume", str(run))
    assert res.code == 0, res
    _assert_same_tensors(before, _tensors(run))
    assert [e["event"] for e in read_events(run)].count("end") == 1
    assert [e["step"] for e in read_events(run) if e["event"] == "train"] == [1, 2]


@pytest.mark.slow
def test_sigkill_and_resume_identical_to_uninterrupted(tmp_path, data):
    """The real thing: a subprocess killed with SIGKILL right after a mid-epoch checkpoint has been
    written, resumed with --resume, compared with an uninterrupted run (run alongside it)."""
    epochs, steps_per_epoch = 12, 6
    recipe = write_recipe(tmp_path / "r.yaml", data,
                          train={"epochs": epochs, "batch_size": 4, "checkpoint_every": 5, "merge": False},
                          regularizers=RESUME_REG, data={"augment": "rrc_flip"})
    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "surgeon.cli", "apply", str(recipe)]
    clean, victim = tmp_path / "clean", tmp_path / "killed"
    clean_proc = subprocess.Popen(cmd + ["--out", str(clean)], env=env, stdout=subprocess.DEVNULL,
                                  stderr=subprocess.PIPE)
    proc = subprocess.Popen(cmd + ["--out", str(victim)], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    metrics = victim / "metrics.jsonl"
    killed_after = None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and killed_after is None:
        events = []
        if metrics.is_file():
            events = [json.loads(line) for line in metrics.read_text().splitlines() if line.endswith("}")]
        for i, e in enumerate(events):
            # A mid-epoch checkpoint followed by another event: its file is on disk (the event is
            # logged just before the save, the next one only after it).
            if e["event"] == "checkpoint" and e["batch"] != 0 and e["step"] >= 10 and i + 1 < len(events):
                os.kill(proc.pid, signal.SIGKILL)
                killed_after = (e["step"], events[-1]["event"], events[-1].get("step"))
                break
        time.sleep(0.002)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL, proc.stderr.read().decode()[-2000:]
    state = load_checkpoint(victim / "checkpoints" / "last.pt")["trainer"]
    assert not any(e["event"] == "end" for e in read_events(victim))
    assert state["batch"] != 0 and state["step"] < epochs * steps_per_epoch  # resumes mid-epoch

    subprocess.run(cmd + ["--resume", str(victim)], env=env, check=True, capture_output=True, timeout=600)
    assert clean_proc.wait(timeout=600) == 0, clean_proc.stderr.read().decode()[-2000:]
    _assert_same_tensors(_tensors(clean), _tensors(victim))
    _assert_same_tensors(load_checkpoint(clean / "checkpoints" / "last.pt")["model"],
                         load_checkpoint(victim / "checkpoints" / "last.pt")["model"])
    assert _losses(clean) == _losses(victim)
    print(f"\nSIGKILL after the step-{killed_after[0]} checkpoint (last event seen: {killed_after[1]} "
          f"step {killed_after[2]}); resumed at step {state['step']} (epoch {state['epoch'] + 1}, batch "
          f"{state['batch']}) of {epochs * steps_per_epoch}; {len(_tensors(clean))} tensors and "
          f"{len(_losses(clean))} logged losses bitwise identical to the uninterrupted run")


# ------------------------------------------------------------------ non-finite, accumulation

def _poison(monkeypatch, bad_steps):
    """Make the objective's loss NaN on the given (1-based) calls."""
    original = Objective.__call__
    calls = {"n": 0}

    def call(self, model, x, y):
        calls["n"] += 1
        parts = original(self, model, x, y)
        if calls["n"] in bad_steps:
            parts["loss"] = parts["loss"] * float("nan")
        return parts

    monkeypatch.setattr(Objective, "__call__", call)


@pytest.mark.slow
def test_nonfinite_steps_are_skipped_counted_and_reported(tmp_path, data, monkeypatch):
    recipe = write_recipe(tmp_path / "r.yaml", data, train={"epochs": 1, "batch_size": 4, "merge": False},
                          surgery=[])
    _poison(monkeypatch, {2, 3})
    run = _run(recipe, tmp_path / "run")
    events = read_events(run)
    bad = [e for e in events if e["event"] == "nonfinite"]
    assert [(e["step"], e["count"]) for e in bad] == [(2, 1), (3, 2)]
    end = next(e for e in events if e["event"] == "end")
    assert end["nonfinite_steps"] == 2 and end["steps"] == 6
    assert all(math.isfinite(v) for v in _tensors(run)["head.weight"].flatten().tolist())


@pytest.mark.slow
def test_too_many_nonfinite_steps_stop_with_checkpoint_intact(tmp_path, data, monkeypatch, cli):
    recipe = write_recipe(tmp_path / "r.yaml", data, surgery=[],
                          train={"epochs": 2, "batch_size": 4, "checkpoint_every": 4, "max_bad_steps": 3})
    _poison(monkeypatch, set(range(7, 100)))  # steps 7, 8, 9 fail: stop at 9
    res = cli("apply", str(recipe), "--out", str(tmp_path / "run"))
    assert res.code == 2, res
    assert "3 non-finite losses in a row" in res.err and "Traceback" not in res.err
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "last.pt")
    # The step-8 checkpoint (two skipped updates, weights untouched by them) is the last one;
    # the stop at step 9 does not write another.
    assert state["trainer"]["step"] == 8 and state["trainer"]["bad_in_row"] == 2
    assert all(torch.isfinite(t).all() for t in state["model"].values())
    last = read_events(tmp_path / "run")[-1]
    assert (last["event"], last["step"]) == ("stopped", 9)


@pytest.mark.slow
def test_gradient_accumulation_matches_full_batch(tmp_path, data):
    base = {"max_steps": 1, "batch_size": 6, "merge": False, "warmup_steps": 0}
    recipe = write_recipe(tmp_path / "r.yaml", data, surgery=[{"target": "blocks.*.attn.proj", "unfreeze": "bias"}],
                          train=base)
    one = _run(recipe, tmp_path / "one")
    three = _run(recipe, tmp_path / "three", overrides=["train.grad_accum=3"])
    _assert_same_tensors(_tensors(one), _tensors(three), atol=1e-6)
    assert not torch.equal(_tensors(one)["head.weight"], _tensors(_run(
        recipe, tmp_path / "other", overrides=["train.batch_size=3"]))["head.weight"])


@pytest.mark.slow
def test_bf16_autocast_trains(tmp_path, data):
    recipe = write_recipe(tmp_path / "r.yaml", data, train={"max_steps": 3, "precision": "bf16", "merge": False})
    run = _run(recipe, tmp_path / "run")
    summary = json.loads((run / "summary.json").read_text())
    assert summary["precision"] == "bf16" and summary["steps"] == 3
    assert all(v.dtype == torch.float32 for v in _tensors(run).values() if v.is_floating_point())  # fp32 masters


@pytest.mark.slow
def test_recipe_without_val_improvement_keeps_latest_best(tmp_path, data):
    """Ties on val top-1 select the later step (documented rule)."""
    recipe = write_recipe(tmp_path / "r.yaml", data, surgery=[], train={"epochs": 2, "batch_size": 4, "base_lr": 1e-9,
                                                                        "merge": False})
    run = _run(recipe, tmp_path / "run")
    vals = [e for e in read_events(run) if e["event"] == "eval" and e["split"] == "val"]
    end = next(e for e in read_events(run) if e["event"] == "end")
    top = max(v["top1"] for v in vals)
    assert end["best_step"] == max(v["step"] for v in vals if v["top1"] == top)


def test_user_error_for_bad_device(tmp_path, data):
    recipe = write_recipe(tmp_path / "r.yaml", data, train={"device": "cuda:7"} if not torch.cuda.is_available()
                          else {"device": "nonsense"})
    with pytest.raises(UserError):
        _run(recipe, tmp_path / "run")
