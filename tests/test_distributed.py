"""Training on several processes (torchrun + DDP, gloo on CPU): the global batch split between
the ranks, identical expert draws on every rank, every method under
``find_unused_parameters=False``, and 2-process runs equal to 1-process runs.

The tests that start processes are marked slow (each process imports torch and timm).
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from surgeon.data.loaders import EpochSampler, ShardedBatchSampler, batch_shares, build_loader, share_positions
from surgeon.io import load_tensors
from surgeon.methods.base import ExpertSampler
from surgeon.train.checkpoint import load_checkpoint
from surgeon.train.distributed import World, launched_world_size, sampler_digest

from .helpers import ROOT, read_events, write_imagefolder, write_recipe


# ------------------------------------------------------------------ sharding (no processes)

@pytest.mark.parametrize("n,accum", [(4, 1), (4, 2), (7, 3), (1, 1), (3, 4), (64, 8)])
@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_batch_shares_cover_each_micro_batch_once(n, accum, world):
    """Rank r's share of micro-batch k is a slice of the one-process micro-batch k; the shares of
    all ranks are that micro-batch, each position once; an empty share pads with the first item."""
    micro = [len(t) for t in torch.arange(n).tensor_split(accum) if len(t)]
    per_rank = [batch_shares(n, accum, world, r) for r in range(world)]
    assert all(len(shares) == len(micro) for shares in per_rank)  # same forward passes on every rank
    start = 0
    for k, m in enumerate(micro):
        covered = [p for r in range(world) for p in range(per_rank[r][k][0], per_rank[r][k][1])]
        assert covered == list(range(start, start + m))
        assert all(per_rank[r][k][2] == start for r in range(world))
        start += m
    if world == 1:
        assert [stop - s for s, stop, _ in per_rank[0]] == micro
        assert share_positions(n, accum, 1, 0) == list(range(n))
    for r in range(world):
        padded = [s for s, stop, _ in per_rank[r] if s == stop]
        assert len(share_positions(n, accum, world, r)) == sum(max(stop - s, 1) for s, stop, _ in per_rank[r])
        assert len(padded) == sum(1 for m in micro if m <= r)


def test_sharded_batches_are_the_one_process_batches_split():
    """Two ranks' train loaders together load exactly the one-process batches (order, drop_last,
    resume at a global batch)."""
    order = EpochSampler(23, shuffle=True, seed=5, epoch=2)
    full = order.order()
    one = [full[i:i + 6] for i in range(0, 18, 6)]  # drop_last: 3 batches of 6
    for start in (0, 1):
        ranks = [list(ShardedBatchSampler(order, batch_size=6, drop_last=True, grad_accum=2, rank=r, world=2,
                                          start_batch=start)) for r in range(2)]
        assert [len(x) for x in ranks] == [3 - start] * 2
        for b, batch in enumerate(one[start:]):
            # micro-batches are positions 0-2 and 3-5; rank 0 takes the first two of each, rank 1 the last
            assert ranks[0][b] == [batch[0], batch[1], batch[3], batch[4]]
            assert ranks[1][b] == [batch[2], batch[5]]


def test_eval_shards_are_strided_and_cover_every_item_once():
    data = torch.utils.data.TensorDataset(torch.arange(7).float().view(7, 1), torch.arange(7))
    seen = []
    for r in range(3):
        loader = build_loader(data, batch_size=2, shuffle=False, seed=0, num_workers=0, shard=(r, 3))
        labels = [y for _, ys in loader for y in ys.tolist()]
        assert labels == list(range(r, 7, 3))
        seen += labels
    assert sorted(seen) == list(range(7))


def test_one_process_loader_is_unchanged_by_the_shard_argument():
    data = torch.utils.data.TensorDataset(torch.arange(10).float().view(10, 1), torch.arange(10))
    a = [ys.tolist() for _, ys in build_loader(data, batch_size=4, shuffle=True, seed=3, num_workers=0, epoch=1)]
    b = [ys.tolist() for _, ys in build_loader(data, batch_size=4, shuffle=True, seed=3, num_workers=0, epoch=1,
                                               shard=(0, 1), grad_accum=2)]
    assert a == b


def test_sampler_digest_tracks_the_draws():
    a, b = ExpertSampler(seed=7), ExpertSampler(seed=7)
    assert sampler_digest(a) == sampler_digest(b) and sampler_digest(None) == ""
    a.randint(4)
    assert sampler_digest(a) != sampler_digest(b)
    b.randint(4)
    assert sampler_digest(a) == sampler_digest(b)


def test_world_from_environment(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    assert launched_world_size() == 1
    monkeypatch.setenv("WORLD_SIZE", "x")
    from surgeon.errors import UserError

    with pytest.raises(UserError, match="WORLD_SIZE"):
        launched_world_size()
    assert World().is_main and not World().distributed and World(rank=1, size=2).distributed


# ------------------------------------------------- every method family: one DDP step (2 ranks)

#: (method family, conformance case); "linear" trains the head only; "mosa_consistency" runs the
#: objective's two forward passes through DDP before one backward.
DDP_CASES = {"adapter": "adaptformer", "mosa": "mosa_hier", "sparse_adapter": "sparse_adapter", "lora": "lora",
             "mosl": "mosl", "sparse_lora": "sparse_lora", "mlae_stochastic": "mlae", "mlae_fixed": "mlae_fixed",
             "dora": "dora", "bitfit": "bitfit", "full": "full", "linear": None, "mosa_consistency": "mosa_hier"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str) -> None:
    """One rank: for each case, one DDP step (find_unused_parameters=False) on a tiny ViT."""
    import torch.distributed as dist

    from surgeon.recipe.sections import RegularizersConfig  # noqa: F401 - import check only
    from surgeon.train.distributed import World, sampler_digest, wrap
    from tests.methods.families import build
    from tests.methods.test_conformance import CASES, make

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    w = World(rank=rank, size=world, backend="gloo")
    results = {}
    for family, case in DDP_CASES.items():
        try:
            model = make(CASES[case], "vit") if case else build("vit", [])
            model.train()
            ddp = wrap(model, w, torch.device("cpu"))
            g = torch.Generator().manual_seed(100 + rank)  # each rank its own images
            x, y = torch.randn(3, 3, 32, 32, generator=g), torch.randint(0, 5, (3,), generator=g)
            if family == "mosa_consistency":
                z1, z2 = ddp(x), ddp(x)
                loss = F.cross_entropy(z1, y) + F.kl_div(z1.log_softmax(-1), z2.log_softmax(-1).detach(),
                                                         log_target=True, reduction="batchmean")
            else:
                loss = F.cross_entropy(ddp(x), y)
            loss.backward()
            trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
            missing = [n for n, p in trainable if p.grad is None]
            # After DDP's all-reduce every rank holds the same (averaged) gradients.
            flat = torch.cat([p.grad.flatten() for _, p in trainable if p.grad is not None])
            grads = [torch.zeros_like(flat) for _ in range(world)]
            dist.all_gather(grads, flat)
            digests = [None] * world
            dist.all_gather_object(digests, sampler_digest(getattr(model, "surgeon_sampler", None)))
            results[family] = {"error": None, "trainable": len(trainable), "missing": missing,
                               "same_grads": all(torch.equal(grads[0], t) for t in grads),
                               "nonzero": bool(flat.abs().sum() > 0), "digests": digests}
        except Exception as exc:  # noqa: BLE001 - reported per family by the parent test
            results[family] = {"error": f"{type(exc).__name__}: {exc}"}
    if rank == 0:
        Path(out).write_text(json.dumps(results))
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def ddp_steps(tmp_path_factory):
    import torch.multiprocessing as mp

    out = tmp_path_factory.mktemp("ddp") / "results.json"
    mp.spawn(_ddp_worker, args=(2, _free_port(), str(out)), nprocs=2, join=True)
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.parametrize("family", list(DDP_CASES))
def test_one_ddp_step_per_method_family(ddp_steps, family):
    """find_unused_parameters=False works: the step raises nothing, every trainable tensor got a
    gradient, the ranks hold the same all-reduced gradients and the same expert-sampler state."""
    r = ddp_steps[family]
    assert r["error"] is None, r["error"]
    assert r["trainable"] > 0 and r["missing"] == [] and r["nonzero"], r
    assert r["same_grads"], r
    assert len(set(r["digests"])) == 1, r["digests"]


# ------------------------------------------ 2 processes vs 1: the same trained tensors

def _torchrun(nproc: int, *args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "surgeon", *args]
    return subprocess.Popen(cmd, env=env, cwd=str(ROOT), stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen)


def _max_rel(a: dict, b: dict) -> float:
    """Largest ``max|a - b| / max|a|`` over the tensors (float tensors; integers must be equal)."""
    assert a.keys() == b.keys()
    worst = 0.0
    for k in a:
        if not a[k].is_floating_point():
            assert torch.equal(a[k], b[k]), k
            continue
        if a[k].abs().max() > 0:
            worst = max(worst, ((a[k] - b[k]).abs().max() / a[k].abs().max()).item())
        else:
            assert torch.equal(a[k], b[k]), k
    return worst


#: The MoSA recipe's own optimizer (adamw_hf, eps 1e-6, lr 1e-3). Dropout is off everywhere (the
#: default of model.dropout and adapter.dropout): each rank seeds its dropout masks from (seed,
#: step, rank), the same distribution as one process but not the same numbers.
EQUIV_TRAIN = {"epochs": 2, "batch_size": 4, "grad_accum": 2, "merge": False, "optimizer": "adamw_hf",
               "eps": 1.0e-6, "base_lr": 1.0e-3, "checkpoint_every": 3}
EQUIV = {
    "mosa_hier_consistency": ([{"target": "blocks.*.mlp", "adapter": {"bottleneck": 8, "dropout": 0.0},
                                "experts": {"count": 4, "sparse": ["up"]}}], {"consistency": {"weight": 1.0}}),
    "mlae": ([{"target": "blocks.*.attn.qkv", "mlae": {"rank": 4, "expert_rank": 1,
                                                        "masking": {"strategy": "stochastic", "p": 0.5}}}], None),
}


@pytest.fixture(scope="module")
def equiv_data(tmp_path_factory):
    return write_imagefolder(tmp_path_factory.mktemp("eqdata"), per_split={"train": 7, "val": 3, "test": 3})


@pytest.mark.slow
@pytest.mark.parametrize("case", list(EQUIV))
def test_two_processes_train_what_one_process_trains(tmp_path, equiv_data, case):
    """``torchrun --nproc-per-node 2 -m surgeon apply`` (gloo) and a one-process run of the same
    recipe and global batch (4, two micro-batches) end with the same tensors to 1e-5 relative,
    the same val/test figures and the same expert-sampler state; rank 0 alone wrote the run.

    Dropout off (see ``EQUIV_TRAIN``). Not bitwise: two processes sum the gradient in another
    order, so the tensors agree to float rounding, amplified a little by Adam.
    """
    from surgeon.apply import apply_recipe

    surgery, reg = EQUIV[case]
    recipe = write_recipe(tmp_path / "r.yaml", equiv_data, surgery=surgery, regularizers=reg, train=EQUIV_TRAIN)
    two = _torchrun(2, "apply", str(recipe), "--out", str(tmp_path / "two"))
    one = apply_recipe(str(recipe), out=str(tmp_path / "one"))
    out, err = two.communicate(timeout=600)
    assert two.returncode == 0, err.decode()[-3000:]
    assert out.decode().split() == [str(tmp_path / "two")]  # rank 0 alone prints the run directory
    rel = _max_rel(load_tensors(one / "adapter.safetensors"), load_tensors(tmp_path / "two" / "adapter.safetensors"))
    print(f"\n{case}: max relative difference 2 processes vs 1: {rel:.2e}")
    assert rel < 1e-5
    ev1 = [(e["split"], e["step"], e["top1"], e["n"]) for e in read_events(one) if e["event"] == "eval"]
    ev2 = [(e["split"], e["step"], e["top1"], e["n"]) for e in read_events(tmp_path / "two") if e["event"] == "eval"]
    assert ev1 == ev2 and ev1[-1][0] == "test" and ev1[-1][3] == 9  # each test image counted once
    s1, s2 = (load_checkpoint(r / "checkpoints" / "last.pt")["rng"]["sampler"]["generator"]
              for r in (one, tmp_path / "two"))
    assert torch.equal(s1, s2)  # the same draws, in the same number
    summary = json.loads((tmp_path / "two" / "summary.json").read_text())
    assert summary["distributed"] == {"world_size": 2, "backend": "gloo"}
    assert summary["environment"]["numerics"]["float32_matmul_precision"] in ("highest", "high", "medium")
    # One writer: one start and one end event, one line per train window.
    events = [e["event"] for e in read_events(tmp_path / "two")]
    assert events.count("start") == 1 and events.count("end") == 1


def _kill_tree(pid: int) -> None:
    """SIGKILL ``pid`` and its descendants (torchrun starts each worker in its own session)."""
    def children(p: int) -> list[int]:
        out = []
        for task in Path(f"/proc/{p}/task").glob("*"):
            try:
                out += [int(c) for c in (task / "children").read_text().split()]
            except OSError:
                pass
        return out

    stack, tree = [pid], []
    while stack:
        p = stack.pop()
        tree.append(p)
        stack += children(p)
    for p in reversed(tree):  # the workers first, then torchrun
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").is_dir(), reason="finds torchrun's workers through /proc")
def test_killed_under_two_processes_resumed_under_one(tmp_path, equiv_data):
    """A 2-process run SIGKILLed after a mid-epoch checkpoint, resumed by one process, ends where
    an uninterrupted one-process run ends (1e-5 relative): the checkpoint holds the global step
    and data position, and the sampler state every rank shared."""
    from surgeon.apply import apply_recipe

    surgery, reg = EQUIV["mosa_hier_consistency"]
    train = {**EQUIV_TRAIN, "epochs": 4, "checkpoint_every": 2}
    recipe = write_recipe(tmp_path / "r.yaml", equiv_data, surgery=surgery, regularizers=reg, train=train)
    victim = tmp_path / "killed"
    proc = _torchrun(2, "apply", str(recipe), "--out", str(victim))
    metrics, killed = victim / "metrics.jsonl", None
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and killed is None:
        events = [json.loads(x) for x in metrics.read_text().splitlines() if x.endswith("}")] if metrics.is_file() else []
        for i, e in enumerate(events):
            if e["event"] == "checkpoint" and e["batch"] != 0 and e["step"] >= 4 and i + 1 < len(events):
                _kill_tree(proc.pid)
                killed = e["step"]
                break
        time.sleep(0.005)
    proc.communicate(timeout=60)
    assert killed is not None, "the run ended before a mid-epoch checkpoint could be interrupted"
    state = load_checkpoint(victim / "checkpoints" / "last.pt")["trainer"]
    assert state["batch"] != 0 and not any(e["event"] == "end" for e in read_events(victim))
    resumed = apply_recipe(None, resume=str(victim))
    clean = apply_recipe(str(recipe), out=str(tmp_path / "clean"))
    rel = _max_rel(load_tensors(clean / "adapter.safetensors"), load_tensors(resumed / "adapter.safetensors"))
    print(f"\nkilled after the step-{killed} checkpoint (2 processes), resumed at step {state['step']} by one: "
          f"max relative difference {rel:.2e}")
    assert rel < 1e-5


# ------------------------------------------------------------------------ surgeon apply --nproc

def test_nproc_launches_torchrun_with_the_same_arguments(cli, monkeypatch):
    """--nproc N goes through torch.distributed.run (standalone, N processes, -m surgeon) with the
    apply arguments minus --nproc; a rank's user error becomes exit 2."""
    import torch.distributed.run as torchrun
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError, ProcessFailure

    seen = []
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setattr(torchrun, "run", lambda args: seen.append(args))
    res = cli("apply", "r.yaml", "--set", "train.epochs=1", "--set", "seed=2", "--out", "o", "--nproc", "3")
    assert res.code == 0, res
    (args,) = seen
    assert args.standalone and args.nproc_per_node == "3" and args.module
    assert [args.training_script, *args.training_script_args] == [
        "surgeon", "apply", "r.yaml", "--set", "train.epochs=1", "--set", "seed=2", "--out", "o"]

    def fail(args):
        raise ChildFailedError("surgeon", {1: ProcessFailure(local_rank=1, pid=1, exitcode=2, error_file="")})

    monkeypatch.setattr(torchrun, "run", fail)
    assert cli("apply", "r.yaml", "--nproc", "2").code == 2


def test_nproc_refused_inside_torchrun_and_below_one(cli, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")
    res = cli("apply", "r.yaml", "--nproc", "2")
    assert res.code == 2 and "inside a torchrun launch" in res.err and "Traceback" not in res.err
    monkeypatch.delenv("WORLD_SIZE")
    assert cli("apply", "r.yaml", "--nproc", "0").code == 2


@pytest.mark.slow
def test_apply_nproc_two_trains_and_reports_user_errors(tmp_path, equiv_data):
    surgery, reg = EQUIV["mlae"]
    recipe = write_recipe(tmp_path / "r.yaml", equiv_data, surgery=surgery, regularizers=reg,
                          train={**EQUIV_TRAIN, "epochs": 1})
    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "surgeon", "apply", str(recipe), "--nproc", "2"]
    done = subprocess.run(cmd + ["--out", str(tmp_path / "run")], env=env, cwd=str(ROOT), capture_output=True,
                          text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split() == [str(tmp_path / "run")]
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["distributed"]["world_size"] == 2
    bad = subprocess.run(cmd + ["--data", f"imagefolder:{tmp_path / 'nowhere'}"], env=env, cwd=str(ROOT),
                         capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "nowhere" in bad.stderr and "Traceback" not in bad.stderr, bad.stderr[-3000:]
