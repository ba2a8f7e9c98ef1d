"""Reliability (issue 11): bad input, faults and concurrent use never hang, exhaust memory, print a
traceback or corrupt a run. One section per class of the issue; docs/reliability.md says which
test backs which promise. End-to-end cases that train are marked slow."""
from __future__ import annotations

import json
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch.overrides import TorchFunctionMode

import surgeon
from surgeon.errors import RecipeError, SurgeonWarning, UserError
from surgeon.model import build_model
from surgeon.recipe.loader import parse_yaml_text
from surgeon.surgery.selectors import compile_selector, int_range_regex

TINY = """\
name: t
model:
  name: vit_tiny_patch16_224
  pretrained: false
  kwargs: {img_size: 32, patch_size: 8, depth: 2}
data: {source: "builtin:digits", num_workers: 0}
surgery:
  - target: blocks.*.mlp
    adapter: {bottleneck: 8}
train: {epochs: 1, batch_size: 8, max_steps: 2}
"""


def _within(seconds: int, fn):
    """``fn()``, failed (not hung) if it takes longer than ``seconds``."""
    def alarm(signum, frame):
        raise TimeoutError(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(seconds)
    try:
        return fn()
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def _problems(exc: RecipeError) -> str:
    return "\n".join(f"{w} {f} {m}" for w, f, m, _ in exc.problems)


# ------------------------------------------------------------- 1. unbounded work from a small input

class _LargeCpuTensors(TorchFunctionMode):
    """Records every torch call that returns a CPU tensor of more than ``limit`` elements."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.seen = limit, []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if isinstance(out, torch.Tensor) and out.device.type == "cpu" and out.numel() > self.limit:
            self.seen.append((getattr(func, "__name__", str(func)), tuple(out.shape)))
        return out


def test_meta_build_allocates_nothing_for_the_surgery(write):
    """`validate`/`plan` build on the meta device: the adapters' initial weights, expert indices and
    masks are shapes too (a bottleneck of 4096 would otherwise be ~6M floats per layer on the CPU)."""
    recipe = surgeon.load_recipe(write("r.yaml", TINY), ["surgery.0.adapter.bottleneck=4096",
                                                         "surgery.0.experts={count: 4}"])
    with pytest.warns(SurgeonWarning, match="adds"), _LargeCpuTensors(100_000) as spy:
        model = build_model(recipe, weights=False, device="meta")
    assert spy.seen == []
    assert model.surgeon_plan.extra_params > 3_000_000  # the plan is still counted exactly
    assert all(p.is_meta for p in model.parameters())


@pytest.mark.parametrize("override,needle", [
    ("surgery.0.adapter.bottleneck=4e9", "3,080.0B parameters"),          # refused before any allocation
    ("surgery.0.adapter.bottleneck=100000", "77.0M parameters, 82.7x the backbone"),
])
def test_absurd_sizes_are_refused_with_the_count(write, override, needle):
    recipe = surgeon.load_recipe(write("r.yaml", TINY), [override])
    for device in ("meta", "cpu"):  # a real-device build checks on meta first
        with pytest.raises(RecipeError) as exc:
            build_model(recipe, weights=False, device=device)
        assert needle in _problems(exc.value) and "r.yaml:8:5" in _problems(exc.value)


def test_rank_beyond_the_weight_and_empty_experts(write):
    lora = ["~surgery.0.adapter", "surgery.0.target=blocks.*.attn.qkv", "surgery.0.lora={rank: 300}"]
    with pytest.warns(SurgeonWarning, match=r"rank 300 on blocks.0.attn.qkv exceeds min\(in, out\) = 192"):
        build_model(surgeon.load_recipe(write("r.yaml", TINY), lora), weights=False, device="meta")
    experts = ["surgery.0.adapter.bottleneck=2", "surgery.0.experts={count: 255, granularity: row}"]
    with pytest.raises(RecipeError) as exc:
        build_model(surgeon.load_recipe(write("r.yaml", TINY), experts), weights=False, device="meta")
    assert len(exc.value.problems) == 1  # one problem per rule, not per layer
    assert "only 2 entries per row" in _problems(exc.value) and "253 of the experts would be empty" in _problems(exc.value)


@pytest.mark.parametrize("override,needle", [
    ("train.seed=1e23", "maximum of 4294967295"),
    ("data.seed=-1", "minimum of 0"),
    ("train.batch_size=1e20", "maximum of 1048576"),
    ("data.num_workers=100000", "maximum of 256"),
    ("model.num_classes=99999999999", "maximum of 1000000"),
])
def test_absurd_scalars_are_refused_by_the_schema(write, override, needle):
    with pytest.raises(RecipeError) as exc:
        surgeon.load_recipe(write("r.yaml", TINY), [override])
    assert needle in str(exc.value) and f"--set {override}" in str(exc.value)


def test_integral_floats_become_ints(write):
    r = surgeon.load_recipe(write("r.yaml", TINY), ["surgery.0.adapter.bottleneck=1e1", "train.max_steps=2e0"])
    assert r.surgery[0].config.bottleneck == 10 and type(r.surgery[0].config.bottleneck) is int
    assert type(r.train.max_steps) is int


def test_selector_ranges_compile_lazily():
    regex = compile_selector("blocks.{0..300000000}.attn.qkv")  # was a list of 300 million names
    assert len(regex.pattern) < 300
    assert regex.fullmatch("blocks.299999999.attn.qkv") and regex.fullmatch("blocks.0.attn.qkv")
    assert not regex.fullmatch("blocks.300000001.attn.qkv") and not regex.fullmatch("blocks.01.attn.qkv")


def test_int_range_regex_matches_exactly_the_range():
    import random
    import re

    rng = random.Random(0)
    for _ in range(300):
        lo = rng.choice([0, 1, 9, 10, 99, 100, rng.randrange(2000)])
        hi = lo + rng.choice([0, 1, 9, 10, 90, 100, rng.randrange(3000)])
        regex = re.compile(int_range_regex(lo, hi))
        for x in range(max(0, lo - 12), hi + 12):
            assert bool(regex.fullmatch(str(x))) == (lo <= x <= hi), (lo, hi, x)


# ------------------------------------------------------------------------ 6. non-finite values

@pytest.mark.parametrize("line,needle", [
    ("train: {base_lr: .nan}", "train.base_lr: NaN is not a finite number"),
    ("train: {weight_decay: 1e400}", "train.weight_decay: infinity is not a finite number"),
    ("regularizers: {consistency: {weight: -.inf}}", "regularizers.consistency.weight: -infinity is not a finite"),
    ("data: {val_fraction: .NaN}", "data.val_fraction: NaN is not a finite number"),
    ("surgery: [{target: x, adapter: {scale: .nan}}]", "surgery.0.adapter.scale: NaN is not a finite number"),
    ("eval: {foo: .inf}", "eval.foo: infinity is not a finite number"),  # even where no field is
])
def test_every_non_finite_number_is_refused_where_written(write, line, needle):
    text = "name: x\nmodel: {name: vit_tiny_patch16_224, kwargs: {drop_rate: 0.0}}\n" + line + "\n"
    with pytest.raises(RecipeError) as exc:
        surgeon.load_recipe(write("r.yaml", text), check_model=False)
    value = line.rstrip("}]").rsplit(": ", 1)[1]
    assert any(w.endswith(f"r.yaml:3:{line.index(value) + 1}") and needle in f"{f}: {m}"
               for w, f, m, _ in exc.value.problems), str(exc.value)
    assert "minimum" not in str(exc.value)  # said once, as non-finite
    kwargs = text.replace("drop_rate: 0.0", "drop_rate: .inf")
    with pytest.raises(RecipeError, match=r"r.yaml:2:.*model.kwargs.drop_rate: infinity"):
        surgeon.load_recipe(write("r.yaml", kwargs), check_model=False)


def test_non_finite_override_is_blamed_on_the_override(write):
    scale = ["surgery.0.adapter.scale=.nan"]
    with pytest.raises(RecipeError) as exc:
        surgeon.load_recipe(write("r.yaml", TINY), scale)
    assert exc.value.problems[0][0] == "--set surgery.0.adapter.scale=.nan"
    assert "lower" not in str(exc.value)  # not hinted as "lower the lr"


# ------------------------------------------------------------------------ 8. remaining tracebacks

@pytest.mark.parametrize("depth", [100, 3000, 50_000])
def test_yaml_nested_thousands_deep_is_a_user_error(write, depth):
    path = write("deep.yaml", "name: x\nmodel: {name: vit_tiny_patch16_224}\ndata: {source: "
                 + "[" * depth + "]" * depth + "}\n")
    with pytest.raises(UserError, match="nests"):
        surgeon.load_recipe(path)
    with pytest.raises(UserError, match="nests"):
        surgeon.load_recipe(write("r.yaml", TINY), ["data.x=" + "[" * depth + "]" * depth])


# ------------------------------------------------------------------------ 10. messages that mislead

def test_yaml_merge_keys_with_override(write):
    path = write("r.yaml", TINY.replace("surgery:\n  - target: blocks.*.mlp\n    adapter: {bottleneck: 8}\n",
                                        "x-adapter: &a {bottleneck: 8, scale: 0.5}\n"
                                        "surgery:\n  - target: blocks.*.mlp\n    adapter: {<<: *a, bottleneck: 4}\n"))
    with pytest.raises(RecipeError, match="x-adapter"):  # the anchor's holder is not a recipe field...
        surgeon.load_recipe(path)
    data, origin = parse_yaml_text(path.read_text(), "r.yaml")  # ...but the merge itself is read right
    assert data["surgery"][0]["adapter"] == {"bottleneck": 4, "scale": 0.5}
    assert origin[("surgery", 0, "adapter", "bottleneck")] == "r.yaml:10:35"
    assert origin[("surgery", 0, "adapter", "scale")] == "r.yaml:7:38"  # where the merged value was written
    data, _ = parse_yaml_text("a: &a {x: 1}\nb: &b {x: 2, y: 2}\nc: {<<: [*a, *b], y: 3}\n", "f")
    assert data["c"] == {"x": 1, "y": 3}  # of several merged mappings the first wins; own keys win over all
    with pytest.raises(UserError, match="duplicate key 'x'"):
        parse_yaml_text("c: {<<: {x: 1}, x: 2, x: 3}\n", "f")
    # a merged mapping's own merges resolve first: its own key beats what it merged
    data, _ = parse_yaml_text("a: &a {x: 1, y: 1}\nb: &b {<<: *a, x: 2}\nc: {<<: [*b, *a]}\n", "f")
    assert data["c"] == {"x": 2, "y": 1}


def test_yaml_merge_keys_cannot_loop_or_explode():
    with pytest.raises(UserError, match="merges itself"):
        parse_yaml_text("a: &a {x: 1, <<: *a}\n", "f")
    with pytest.raises(UserError, match="takes a mapping or a list of mappings"):
        parse_yaml_text("a: {<<: [1, 2]}\n", "f")
    # ten levels, each merging the one below ten times: resolved once per node, not 10**10 times
    levels = ["l0: &l0 {x: 0}"] + [f"l{i}: &l{i} {{<<: [{', '.join([f'*l{i - 1}'] * 10)}], k{i}: {i}}}"
                                   for i in range(1, 11)]
    data, _ = parse_yaml_text("\n".join(levels) + "\n", "f")
    assert data["l10"] == {"x": 0, **{f"k{i}": i for i in range(1, 11)}}


@pytest.mark.parametrize("override,needle", [
    ("surgery.0.mlae.masking.p=1.5", "masking.p: 1.5 is greater than or equal to the maximum of 1"),
    ("surgery.0.mlae.masking.p=[0.1, 1.5]", "masking.p.1: 1.5 is greater than or equal to the maximum of 1"),
    ("surgery.0.mlae.masking.p=abc", "'abc' is not accepted here: expected a number or a list of numbers"),
    ("surgery.0.target=3", "3 is not accepted here: expected a string, a list of strings or a mapping"),
])
def test_scalar_or_list_fields_say_what_is_accepted(override, needle):
    with pytest.raises(RecipeError) as exc:
        surgeon.load_recipe("mlae", [override], check_model=False)
    assert needle in str(exc.value) and "is not of type" not in str(exc.value)
    assert exc.value.problems[0][0] == f"--set {override}"


def test_set_below_a_scalar_is_blamed_on_the_set(write):
    path = write("r.yaml", TINY)
    with pytest.raises(UserError) as exc:
        surgeon.load_recipe(path, ["name.x=1"])
    assert exc.value.where == "--set name.x=1" and "name is 't', not a mapping" in exc.value.message
    with pytest.raises(UserError) as exc:
        surgeon.load_recipe(path, ["surgery.3.x=1"])
    assert exc.value.where == "--set surgery.3.x=1"
    # A mapping the override creates is the override's too.
    with pytest.raises(RecipeError) as exc:
        surgeon.load_recipe(path, ["eval.foo.bar=1"])
    assert exc.value.problems[0][0] == "--set eval.foo.bar=1"


def test_bad_regex_selector_is_located(write):
    path = write("r.yaml", TINY.replace("target: blocks.*.mlp", 'target: "re:blocks.(("'))
    with pytest.raises(RecipeError) as exc:
        build_model(surgeon.load_recipe(path), weights=False, device="meta")
    assert exc.value.problems[0][0] == f"{path}:8:13" and "invalid regular expression" in str(exc.value)


# ------------------------------------------------------------------------- data (classes 1, 2, 4, 8)

@pytest.fixture(scope="module")
def shapes():
    """The 32-px tiny ViT on the meta device (what `apply` builds the data with)."""
    from surgeon.backbone import create_backbone
    from surgeon.recipe import section

    return create_backbone(section("model", {"name": "vit_tiny_patch16_224", "pretrained": False,
                                             "kwargs": {"img_size": 32, "patch_size": 8}}), weights=False,
                           device="meta")


def _data(source: str, **kw):
    from surgeon.recipe import section

    return section("data", {"source": source, "num_workers": 0, "augment": "resize", "val_fraction": 0.25, **kw})


def _images(root, names):
    from .helpers import write_imagefolder

    write_imagefolder(root / "_src", classes=1, per_split={"x": 1}, size=8)
    png = (root / "_src" / "x" / "class0" / "0.png").read_bytes()
    for name in names:
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(png)


@pytest.mark.parametrize("lines,declared,needle,line", [
    (["a.png 0", "b.png 1", "c.png 99999999999"], None, "would make 100,000,000,000 classes", 3),  # was out of memory
    (["a.png 0", "b.png 1", "c.png 7"], 3, "model.num_classes is 3, so labels are 0..2", 3),
    (["a.png 0", "b.png 5", "c.png 1"], None, "more than the 3 images listed", 2),
])
def test_list_labels_are_bounded_before_anything_is_built(tmp_path, shapes, lines, declared, needle, line):
    from surgeon.data import build_splits
    from surgeon.data.sources import source_classes

    _images(tmp_path, ["a.png", "b.png", "c.png"])
    (tmp_path / "l.txt").write_text("\n".join(lines) + "\n")
    for build in (lambda: build_splits(_data(f"filelist:{tmp_path / 'l.txt'}"), shapes, seed=0, num_classes=declared),
                  lambda: source_classes(_data(f"filelist:{tmp_path / 'l.txt'}"), num_classes=declared)):
        with pytest.raises(UserError) as exc:
            build()
        assert needle in exc.value.message and exc.value.where == f"{tmp_path / 'l.txt'}:{line}"


def test_plan_bounds_list_labels_by_the_declared_class_count(tmp_path, write, cli):
    """`plan --data` sizes the head from the labels as `apply` does: a declared
    model.num_classes is the bound, not the number of images listed."""
    _images(tmp_path, ["a.png", "b.png"])
    (tmp_path / "l.txt").write_text("a.png 0\nb.png 5\n")
    recipe = write("r.yaml", TINY)
    res = cli("plan", recipe, "--data", f"filelist:{tmp_path / 'l.txt'}")
    assert res.code == 2 and f"{tmp_path / 'l.txt'}:2" in res.err and "more than the 2 images listed" in res.err
    res = cli("plan", recipe, "--data", f"filelist:{tmp_path / 'l.txt'}", "--set", "model.num_classes=6")
    assert res.code == 0, res


def test_fgvc_labels_are_bounded_at_their_line(tmp_path, shapes):
    from surgeon.data import build_splits

    _images(tmp_path / "images", ["a.png", "b.png"])
    (tmp_path / "train.json").write_text('{\n "a.png": 0,\n "b.png": 4000000000\n}')
    (tmp_path / "test.json").write_text('{"a.png": 0}')
    with pytest.raises(UserError) as exc:
        build_splits(_data(f"fgvc:{tmp_path}"), shapes, seed=0)
    assert exc.value.where == f"{tmp_path / 'train.json'}:3" and "4,000,000,001 classes" in exc.value.message


def test_symlink_loops_neither_hang_nor_count_twice(tmp_path, shapes):
    """Two self-referencing links in a class folder (os.walk followed them forever), and a link
    that makes every image reachable many times (they were counted and split into train and val)."""
    from surgeon.data import build_splits

    _images(tmp_path, [f"tree/{c}/{i}.png" for c in ("a", "b") for i in range(4)])
    (tmp_path / "tree" / "a" / "loop1").symlink_to(".")
    (tmp_path / "tree" / "a" / "loop2").symlink_to("..")
    (tmp_path / "tree" / "b" / "again").symlink_to(tmp_path / "tree" / "b")
    splits = _within(30, lambda: build_splits(_data(f"imagefolder:{tmp_path / 'tree'}"), shapes, seed=0))
    paths = [p for ds in (splits.train, splits.val) for p, _ in ds.samples]
    assert len(paths) == 8 and len({os.path.realpath(p) for p in paths}) == 8
    assert splits.class_names == ["a", "b"]


def test_a_class_that_only_links_to_another_is_named(tmp_path, shapes):
    from surgeon.data import build_splits

    _images(tmp_path, [f"tree/a/{i}.png" for i in range(3)])
    (tmp_path / "tree" / "b").symlink_to(tmp_path / "tree" / "a")
    with pytest.raises(UserError, match="holds only images already counted") as exc:
        build_splits(_data(f"imagefolder:{tmp_path / 'tree'}"), shapes, seed=0)
    assert exc.value.where == str(tmp_path / "tree" / "b")


def test_data_fingerprint_says_what_changed(tmp_path, shapes):
    from surgeon.data import build_splits
    from surgeon.data.sources import data_changes

    _images(tmp_path, [f"tree/{c}/{i}.png" for c in ("a", "b") for i in range(4)])
    cfg = _data(f"imagefolder:{tmp_path / 'tree'}")
    before = build_splits(cfg, shapes, seed=0).fingerprint
    assert data_changes(before, build_splits(cfg, shapes, seed=0).fingerprint) == []  # deterministic
    _images(tmp_path, ["tree/a/9.png", "tree/b/9.png"])
    after = build_splits(cfg, shapes, seed=0).fingerprint
    assert data_changes(before, after)[0] == "train: 8 images (was 6)"  # (the held-out val is drawn anew too)
    (tmp_path / "tree" / "a" / "9.png").write_bytes((tmp_path / "tree" / "a" / "9.png").read_bytes() + b"\0")
    assert data_changes(after, build_splits(cfg, shapes, seed=0).fingerprint) == ["train: the same number of images, +1 bytes"]
    digits = build_splits(_data("builtin:digits"), shapes, seed=0).fingerprint
    assert data_changes(digits, build_splits(_data("builtin:digits"), shapes, seed=1).fingerprint)
    assert data_changes(digits, build_splits(_data("builtin:digits"), shapes, seed=0).fingerprint) == []
    assert data_changes(None, after) == []  # a checkpoint from before fingerprints: nothing to compare


@pytest.mark.parametrize("kind", ["filelist", "fgvc"])
def test_a_list_that_is_not_utf8_names_the_line(tmp_path, shapes, kind):
    from surgeon.data import build_splits

    if kind == "filelist":
        _images(tmp_path, ["a.png"])
        (tmp_path / "l.txt").write_bytes(b"a.png 0\ncaf\xe9.png 0\n")
        source, where = f"filelist:{tmp_path / 'l.txt'}", f"{tmp_path / 'l.txt'}:2"
    else:
        (tmp_path / "train.json").write_bytes(b'{\n "a.png": 0,\n "caf\xe9.png": 0\n}')
        source, where = f"fgvc:{tmp_path}", f"{tmp_path / 'train.json'}:3"
    with pytest.raises(UserError) as exc:
        build_splits(_data(source), shapes, seed=0)
    assert exc.value.where == where and "not UTF-8 text: byte 0xe9" in exc.value.message
    assert "UTF-8" in exc.value.hint


def test_patch_size_zero_is_a_user_error():
    from surgeon.backbone import create_backbone
    from surgeon.recipe import section

    cfg = section("model", {"name": "vit_tiny_patch16_224", "pretrained": False,
                            "kwargs": {"img_size": 32, "patch_size": 0}})
    with pytest.raises(UserError, match="model.kwargs"):
        create_backbone(cfg, weights=False, device="meta")


def test_image_size_that_does_not_fit_the_model_fails_before_a_run_directory(tmp_path, write):
    from surgeon.apply import prepare

    path = write("r.yaml", TINY.replace("num_workers: 0}", "num_workers: 0, image_size: 64}"))
    with pytest.raises(UserError) as exc:
        prepare(str(path))
    assert "cannot take the data's 64x64 images" in exc.value.message and "r.yaml:6:" in exc.value.where
    assert "image_size" in exc.value.hint


# ------------------------------------------------------------------------ 3. concurrent use of one run

# Holds a run's lock in another process until killed (as `surgeon apply` would while training).
HOLD = ("import sys, time\nfrom surgeon.rundir import RunLock\n"
        "RunLock(sys.argv[1], 'surgeon apply').__enter__()\nprint('LOCKED', flush=True)\ntime.sleep(120)\n")


@pytest.fixture
def holder():
    """``holder(run_dir)`` starts a process holding the run's lock; it is killed afterwards."""
    from .helpers import ROOT

    procs = []

    def start(run_dir) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True,
                                cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)})
        procs.append(proc)
        assert proc.stdout.readline().strip() == "LOCKED"
        return proc

    yield start
    for proc in procs:
        proc.kill()
        proc.wait()


def _fake_run(root, write) -> "Path":
    """A run directory with a valid recipe (enough for `apply --resume`, `merge`, `report` to
    reach their lock)."""
    from .fake_runs import make_run

    run = make_run(root)
    (run / "recipe.yaml").write_text(write("r.yaml", TINY).read_text())
    return run


def test_a_second_process_is_refused_naming_the_holder(tmp_path, write, cli, holder):
    run = _fake_run(tmp_path, write)
    proc = holder(run)
    before = (run / "metrics.jsonl").read_bytes()
    for args in (["apply", "--resume", run], ["merge", run], ["report", run]):
        res = cli(*args)
        assert res.code == 2, (args, res)
        assert f"the run is in use: process {proc.pid} (surgeon apply) is writing to it" in res.err, res.err
        assert "Traceback" not in res.err
    assert (run / "metrics.jsonl").read_bytes() == before  # nothing interleaved
    assert cli("eval", run, "--split", "nope").code == 2  # eval writes nothing: it takes no lock


def test_the_lock_dies_with_its_holder_even_after_kill_9(tmp_path, holder):
    from surgeon.rundir import RunLock

    proc = holder(tmp_path)
    with pytest.raises(UserError, match=f"process {proc.pid}"):
        RunLock(tmp_path, "surgeon apply --resume").__enter__()
    proc.kill()  # SIGKILL: no chance to clean up; the kernel drops the flock
    proc.wait()
    with RunLock(tmp_path, "surgeon apply --resume"):
        assert (tmp_path / ".lock").read_text().startswith(f"{os.getpid()} surgeon apply --resume")


def test_the_lock_is_reentrant_and_per_directory(tmp_path, holder):
    """`apply` holds its run's lock and merges under it; sweep workers lock their own trial dirs."""
    from surgeon.rundir import RunLock

    (tmp_path / "trial-a").mkdir()
    (tmp_path / "trial-b").mkdir()
    holder(tmp_path / "trial-a")  # another worker's trial
    with RunLock(tmp_path / "trial-b", "surgeon sweep"):
        with RunLock(tmp_path / "trial-b", "surgeon merge"):  # the same process: re-entrant
            pass
        with RunLock(tmp_path / "trial-b", "surgeon merge"):
            pass
    with pytest.raises(UserError):
        with RunLock(tmp_path / "trial-a", "surgeon sweep"):
            pass


# ------------------------------------------------------------------------------- 7. unwritable outputs

@pytest.fixture
def read_only():
    """``read_only(dir)``: make a folder unwritable (chmod, or for root `chattr +i`); undone after."""
    done = []

    def make(path):
        path.mkdir(parents=True, exist_ok=True)
        if os.geteuid() == 0:
            if subprocess.run(["chattr", "+i", str(path)], capture_output=True).returncode != 0:
                pytest.skip("root ignores permissions and this file system has no immutable flag")
            done.append(lambda: subprocess.run(["chattr", "-i", str(path)], check=True))
        else:
            path.chmod(0o555)
            done.append(lambda: path.chmod(0o755))
        return path

    yield make
    for undo in done:
        undo()


def test_unwritable_out_is_refused_before_training(tmp_path, write, cli, read_only, monkeypatch):
    recipe = write("r.yaml", TINY)
    (tmp_path / "a-file").write_text("keep me")
    cases = [
        (["--out", tmp_path / "a-file" / "run"], "is a file, not a folder"),
        (["--out", "/proc/surgeon-reliability-test/run"], "cannot write the run directory"),
        (["--out", read_only(tmp_path / "ro") / "run"], "cannot write the run directory"),
    ]
    for args, needle in cases:
        res = cli("apply", recipe, *args)
        assert res.code == 2 and needle in res.err and "Traceback" not in res.err, (args, res)
        assert "\nrun directory:" not in "\n" + res.err  # nothing started
    assert (tmp_path / "a-file").read_text() == "keep me"
    monkeypatch.chdir(read_only(tmp_path / "ro-cwd"))  # the default runs/ below a read-only folder
    res = cli("apply", recipe)
    assert res.code == 2 and "runs/" in res.err and "cannot write" in res.err, res


def test_merge_and_report_on_a_read_only_run(tmp_path, write, cli, read_only):
    run = _fake_run(tmp_path, write)
    read_only(run)
    for args, needle in ((["merge", run], "cannot write the merged model"), (["report", run], "cannot write the report")):
        res = cli(*args)
        assert res.code == 2 and needle in res.err and str(run) in res.err and "Traceback" not in res.err, res


def test_an_unwritable_place_anywhere_is_a_user_error(cli, monkeypatch):
    """The last line of defence: a write that fails for want of permission, space or a writable
    file system exits 2 with the path and the reason, not as a bug."""
    import errno

    def fail(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", "/data/out/x.json")
    monkeypatch.setattr("surgeon.resources.builtin_recipes", fail)
    res = cli("ls")
    assert res.code == 2 and "/data/out/x.json: cannot write: No space left on device" in res.err
    assert "internal error" not in res.err


# ---------------------------------------------------------------- 9. a failed start leaves no dead run

def test_a_run_that_fails_before_its_first_step_is_removed(tmp_path, write, monkeypatch, capsys):
    from rich.console import Console

    from surgeon.apply import apply_recipe
    from surgeon.train.trainer import Trainer

    def fail(self):
        raise UserError("simulated failure at the first batch")
    monkeypatch.setattr(Trainer, "train", fail)
    recipe = write("r.yaml", TINY)
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    with pytest.raises(UserError, match="simulated"):
        apply_recipe(str(recipe), out=str(tmp_path / "new"), console=console)
    assert not (tmp_path / "new").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("the user's")
    with pytest.raises(UserError, match="simulated"):
        apply_recipe(str(recipe), out=str(tmp_path / "mine"), console=console)
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    assert "nothing was trained: removed" in capsys.readouterr().err


def test_resume_of_a_run_without_checkpoint_under_another_recipe_says_how_to_restart(tmp_path, write, cli):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(write("old.yaml", TINY).read_text())
    (run / "metrics.jsonl").write_text('{"event": "start"}\n')
    res = cli("apply", write("new.yaml", TINY.replace("bottleneck: 8", "bottleneck: 4")), "--resume", run)
    assert res.code == 2 and "recipe differs" in res.err
    assert f"nothing is lost by starting it again with this recipe: surgeon apply RECIPE --out {run}" in res.err


# ------------------------------------------------------------------- 10. checkpoints: garbage, verified writes

class _Foreign:
    """Not a checkpoint: torch.save pickles it by reference, so weights_only cannot load it."""


@pytest.mark.parametrize("make", [
    lambda p: p.write_bytes(b"\x00" * 100),
    lambda p: p.write_bytes(b"PK\x03\x04 truncated zip"),
    lambda p: torch.save({"version": 1, "x": _Foreign()}, p),
], ids=["zeros", "truncated", "foreign-pickle"])
def test_a_garbage_checkpoint_is_never_unpickled_nor_suggested_to_be(tmp_path, make):
    from surgeon.train.checkpoint import load_checkpoint

    path = tmp_path / "last.pt"
    make(path)
    with pytest.raises(UserError) as exc:
        load_checkpoint(path)
    text = str(exc.value)
    assert "not a surgeon checkpoint" in text and exc.value.where == str(path)
    assert "weights_only" not in text and "unpickl" not in text.lower()


def test_a_checkpoint_that_does_not_read_back_never_replaces_the_old_one(tmp_path, monkeypatch):
    import surgeon.train.checkpoint as ckpt

    path = tmp_path / "last.pt"
    ckpt.save_checkpoint(path, {"trainer": {"step": 1}})
    good = path.read_bytes()
    monkeypatch.setattr(ckpt.torch, "save", lambda obj, f: open(f, "wb").write(b"torn"))
    with pytest.raises(UserError, match="not a surgeon checkpoint"):
        ckpt.save_checkpoint(path, {"trainer": {"step": 2}})
    assert path.read_bytes() == good and sorted(p.name for p in tmp_path.iterdir()) == ["last.pt"]


def test_surgery_tensors_are_verified_when_written(tmp_path, monkeypatch):
    import safetensors.torch

    from surgeon.train.checkpoint import check_surgery_tensors, save_surgery_tensors

    path = tmp_path / "best.safetensors"
    save_surgery_tensors(path, {"a": torch.ones(3)})
    good = path.read_bytes()
    real = safetensors.torch.save_file
    monkeypatch.setattr(safetensors.torch, "save_file",
                        lambda t, f, metadata=None: real({k: v * 0 for k, v in t.items()}, f, metadata=metadata))
    with pytest.raises(OSError, match="do not read back as written"):
        save_surgery_tensors(path, {"a": torch.ones(3)})
    assert path.read_bytes() == good
    with pytest.raises(UserError, match="does not fit"):
        check_surgery_tensors(path, {"a": torch.ones(4)})
    path.write_bytes(b"garbage")
    with pytest.raises(UserError, match="cannot read tensors") as exc:
        check_surgery_tensors(path, {"a": torch.ones(3)})
    assert "delete it to resume" in exc.value.hint


# ------------------------------------------------------------- end to end: a trained run (slow)

@pytest.fixture(scope="module")
def img(tmp_path_factory):
    from .helpers import write_imagefolder

    return write_imagefolder(tmp_path_factory.mktemp("data") / "img", per_split={"train": 6, "val": 3, "test": 3})


@pytest.fixture(scope="module")
def trained(tmp_path_factory, img):
    """One finished tiny run (2 epochs of 3 steps, checkpoints every 2 steps, val every step)."""
    from surgeon.apply import apply_recipe

    from .helpers import write_recipe

    tmp = tmp_path_factory.mktemp("trained")
    recipe = write_recipe(tmp / "r.yaml", img, surgery=[{"target": "blocks.*.mlp", "adapter": {"bottleneck": 8}}],
                          train={"epochs": 2, "batch_size": 6, "checkpoint_every": 2, "eval_every": 1})
    return apply_recipe(str(recipe), out=str(tmp / "run"))


def _copy(run, tmp_path):
    import shutil

    return Path(shutil.copytree(run, tmp_path / "run"))


@pytest.mark.slow
def test_resume_after_the_data_changed_is_refused(trained, img, tmp_path, cli):
    run = _copy(trained, tmp_path)
    last, metrics = (run / "checkpoints" / "last.pt").read_bytes(), (run / "metrics.jsonl").read_bytes()
    extra = img / "train" / "class0" / "extra.png"
    extra.write_bytes((img / "train" / "class0" / "0.png").read_bytes())
    try:
        res = cli("apply", "--resume", run)
    finally:
        extra.unlink()
    assert res.code == 2 and "cannot resume: the data changed since the checkpoint (train: 19 images (was 18)" in res.err
    assert "Traceback" not in res.err
    assert (run / "checkpoints" / "last.pt").read_bytes() == last and (run / "metrics.jsonl").read_bytes() == metrics


@pytest.mark.slow
def test_eval_on_other_class_names_is_refused(trained, img, tmp_path, cli):
    import shutil

    other = tmp_path / "other"
    for split in ("train", "val", "test"):
        for k, name in enumerate(["cat", "dog", "eel"]):
            shutil.copytree(img / split / f"class{k}", other / split / name)
    res = cli("eval", trained, "--data", f"imagefolder:{other}")
    assert res.code == 2 and "class 0 is 'cat' in the data but 'class0' in the run (3 of 3 names differ)" in res.err
    assert "--allow-class-mismatch" in res.err
    res = cli("eval", trained, "--data", f"imagefolder:{other}", "--allow-class-mismatch", "--json")
    assert res.code == 0 and json.loads(res.out)["n"] == 9


@pytest.mark.slow
def test_eval_of_a_run_with_non_finite_weights_says_so(trained, tmp_path, cli):
    import shutil

    from safetensors.torch import load_file, save_file

    run = _copy(trained, tmp_path)
    shutil.rmtree(run / "merged")
    tensors = load_file(str(run / "adapter.safetensors"))
    key = next(k for k in tensors if k.endswith("weight") and "up" in k)
    tensors[key][0, 0] = float("nan")
    save_file(tensors, str(run / "adapter.safetensors"))
    res = cli("eval", run)
    assert res.code == 2 and "non-finite (NaN or infinite) weights" in res.err and "diverged" in res.err


def _nan_after(monkeypatch, step: int):
    """Poison the trained tensors at the end of optimizer step ``step`` (a divergence the loss
    check does not see: the update itself overflowed)."""
    from surgeon.train.trainer import Trainer

    original = Trainer.train_step

    def train_step(self, images, labels):
        out = original(self, images, labels)
        if self.step == step:
            with torch.no_grad():
                for p in self.params:
                    p.fill_(float("nan"))
        return out

    monkeypatch.setattr(Trainer, "train_step", train_step)


@pytest.mark.slow
def test_a_nan_state_is_never_best_and_never_finished(img, tmp_path, monkeypatch, cli):
    from .helpers import read_events, write_recipe

    def recipe(checkpoint):
        return write_recipe(tmp_path / f"{checkpoint}.yaml", img,
                            surgery=[{"target": "blocks.*.mlp", "adapter": {"bottleneck": 8}}],
                            train={"epochs": 2, "batch_size": 6, "eval_every": 1, "max_bad_steps": 100,
                                   "base_lr": 1e-9},
                            eval_={"checkpoint": checkpoint})
    _nan_after(monkeypatch, 2)
    # Selecting the best state: the step-1 state, never one of the NaN ones after it.
    res = cli("apply", recipe("best"), "--out", tmp_path / "best")
    assert res.code == 0, res
    events = read_events(tmp_path / "best")
    evals = [e for e in events if e["event"] == "eval" and e["split"] == "val"]
    assert [e.get("nonfinite", False) for e in evals] == [False] + [True] * 5  # steps 2..6 are NaN
    # A NaN model predicts one class: it scores as well as (here better than) the step-1 state,
    # so the old rule (top-1 >= best) picked it.
    assert max(e["top1"] for e in evals[1:]) >= evals[0]["top1"]
    summary = json.loads((tmp_path / "best" / "summary.json").read_text())
    assert summary["best_step"] == 1 and summary["reported_step"] == 1
    assert all(torch.isfinite(t).all() for t in load_file(str(tmp_path / "best" / "adapter.safetensors")).values())
    # Reporting the last state, which is NaN: the run does not finish.
    res = cli("apply", recipe("last"), "--out", tmp_path / "last")
    assert res.code == 2 and "the last state has non-finite" in res.err and "has no result" in res.err, res
    assert read_events(tmp_path / "last")[-1]["reason"] == "nonfinite_model"
    assert not (tmp_path / "last" / "summary.json").exists() and not (tmp_path / "last" / "adapter.safetensors").exists()
    res = cli("eval", tmp_path / "last")
    assert res.code == 2 and "the run diverged at step 6 (non-finite values) and has no result" in res.err


@pytest.mark.slow
def test_a_diverged_run_names_only_files_that_exist(img, tmp_path, monkeypatch, cli):
    from surgeon.train.regularizers import Objective

    from .helpers import write_recipe

    original = Objective.__call__

    def nan(self, model, x, y):
        parts = original(self, model, x, y)
        parts["loss"] = parts["loss"] * float("nan")
        return parts
    monkeypatch.setattr(Objective, "__call__", nan)
    recipe = write_recipe(tmp_path / "r.yaml", img, surgery=[],
                          train={"epochs": 5, "batch_size": 6, "max_bad_steps": 2, "checkpoint_every": 100})
    res = cli("apply", recipe, "--out", tmp_path / "run")
    assert res.code == 2 and "2 non-finite losses in a row" in res.err
    assert "no checkpoint was written" in res.err and "last.pt" not in res.err


@pytest.mark.slow
def test_a_corrupt_best_state_is_found_before_a_resume_starts(trained, tmp_path, cli):
    run = _copy(trained, tmp_path)
    (run / "checkpoints" / "best.safetensors").write_bytes(b"\x00" * 64)
    res = cli("apply", "--resume", run)
    assert res.code == 2 and "best.safetensors" in res.err and "delete it to resume" in res.err
    assert "resuming at step" not in res.err


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_is_started_over(trained, tmp_path, write, cli):
    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text("name: something else\n")
    (run / "metrics.jsonl").write_text('{"event": "start"}\n')
    recipe = write("r.yaml", (trained / "recipe.yaml").read_text())
    res = cli("apply", recipe, "--out", run, "--set", "train.max_steps=1", "--set", "train.merge=false")
    assert res.code == 0, res
    assert "holds a run that stopped before its first checkpoint: starting it over" in res.err
    assert (run / "summary.json").is_file()
    res = cli("apply", recipe, "--out", run)
    assert res.code == 2 and "already holds a run" in res.err  # a run with results is never taken over


# ----------------------------------------------------------------------- Ctrl-C (issue 12, item 12)

# Runs the CLI; with SURGEON_TEST_SLOW_SAVE set, a checkpoint written after the first Ctrl-C (the
# default handler is back then) stalls once written to its temporary file, so the test can
# interrupt the write itself.
DRIVER = r"""
import faulthandler, os, signal, sys, time
# A foreground command in a terminal starts with SIGINT at its default; a test run launched in the
# background inherits it ignored (POSIX shells do that to background jobs) and would lose the Ctrl-C.
signal.signal(signal.SIGINT, signal.default_int_handler)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})  # a blocked mask is inherited likewise
faulthandler.register(signal.SIGUSR1, all_threads=True)  # the test asks for stacks before killing a hung run
import torch
real = torch.save
def save(obj, f, *args, **kwargs):
    real(obj, f, *args, **kwargs)
    if (os.environ.get("SURGEON_TEST_SLOW_SAVE") and isinstance(obj, dict) and "trainer" in obj
            and signal.getsignal(signal.SIGINT) is signal.default_int_handler):
        print("SLOW-SAVE", file=sys.stderr, flush=True)
        time.sleep(120)
torch.save = save
from surgeon.cli import main
main(sys.argv[1:])
"""


class _Cli:
    """The CLI in a new session (Ctrl-C reaches its whole process group, workers included)."""

    def __init__(self, *args, env=None):
        import queue
        import threading

        from .helpers import ROOT

        self.proc = subprocess.Popen([sys.executable, "-c", DRIVER, *map(str, args)], cwd=ROOT, text=True,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
                                     env={**os.environ, "PYTHONPATH": str(ROOT), "CI": "1", "OMP_NUM_THREADS": "1",
                                          **(env or {})})
        self.lines: queue.Queue = queue.Queue()
        self.err: list[str] = []
        self.out: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()
        # stdout is drained too: a full pipe would block the run's prints and look like a hang
        threading.Thread(target=lambda: self.out.extend(self.proc.stdout), daemon=True).start()

    def _read(self):
        for line in self.proc.stderr:
            self.err.append(line)
            self.lines.put(line)

    def seen(self, text: str, timeout: float = 120) -> bool:
        """Wait for a stderr line holding ``text``; False if the process ended without one."""
        import queue
        import time

        deadline = time.time() + timeout
        while time.time() < deadline:
            try:
                if text in self.lines.get(timeout=1):
                    return True
            except queue.Empty:
                if self.proc.poll() is not None:
                    return False
        raise AssertionError(f"{text!r} not seen in {timeout} s; stderr: {''.join(self.err)[-3000:]}")

    def wait_for(self, text: str, timeout: float = 120) -> None:
        if not self.seen(text, timeout):
            raise AssertionError(f"{text!r} not seen; stderr: {''.join(self.err)[-3000:]}")

    def ctrl_c(self) -> None:
        os.killpg(self.proc.pid, signal.SIGINT)

    def finish(self, timeout: float = 120) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            # A run that does not stop is a failure to diagnose, not a pytest timeout: take every
            # thread's Python stack (faulthandler, in the driver), then kill the whole group.
            os.kill(self.proc.pid, signal.SIGUSR1)
            time.sleep(2)
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError(f"still running {timeout} s after Ctrl-C; its stacks and stderr:\n"
                                 f"{''.join(self.err)[-6000:]}") from None
        return code


def _long_recipe(tmp_path, img, **train):
    from .helpers import write_recipe

    return write_recipe(tmp_path / "r.yaml", img, surgery=[{"target": "blocks.*.mlp", "adapter": {"bottleneck": 8}}],
                        data={"num_workers": 1},
                        train={"epochs": 2000, "batch_size": 6, "eval_every": 10_000, "merge": False, **train})


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_prints_how_to_resume(img, tmp_path):
    from surgeon.train.checkpoint import load_checkpoint

    recipe, run = _long_recipe(tmp_path, img, checkpoint_every=1000), tmp_path / "run"
    cli = _Cli("apply", recipe, "--out", run)
    cli.wait_for("step 1/")
    cli.ctrl_c()
    assert cli.finish() == 130, "".join(cli.err)
    last = cli.err[-1].strip()
    assert re.fullmatch(rf"interrupted at step (\d+) of 6000, checkpoint saved: resume with "
                        rf"`surgeon apply --resume {re.escape(str(run))}`", last), cli.err[-3:]
    step = int(re.search(r"step (\d+)", last).group(1))
    assert load_checkpoint(run / "checkpoints" / "last.pt")["trainer"]["step"] == step  # the step under way
    assert "Traceback" not in "".join(cli.err)
    again = _Cli("apply", "--resume", run)
    again.wait_for(f"resuming at step {step} of 6000")
    again.wait_for("step ")
    again.ctrl_c()
    assert again.finish() == 130 and "checkpoint saved" in again.err[-1]
    assert load_checkpoint(run / "checkpoints" / "last.pt")["trainer"]["step"] > step


@pytest.mark.slow
def test_a_second_ctrl_c_during_the_checkpoint_write_leaves_the_previous_one(img, tmp_path):
    from surgeon.train.checkpoint import load_checkpoint

    recipe, run = _long_recipe(tmp_path, img, checkpoint_every=3), tmp_path / "run"
    slow = {"SURGEON_TEST_SLOW_SAVE": "1"}
    cli = _Cli("apply", recipe, "--out", run, env=slow)
    cli.wait_for("step 1/")
    while not (run / "checkpoints" / "last.pt").exists():
        time.sleep(0.05)
    for attempt in range(3):
        cli.ctrl_c()
        if cli.seen("SLOW-SAVE"):  # the interrupt's checkpoint is half done: in its temporary file
            break
        # The Ctrl-C came just after a scheduled checkpoint: the run stopped with nothing more to
        # write (correctly). Resume and interrupt again, at another moment of the step.
        assert cli.finish() == 130 and "checkpoint saved" in cli.err[-1], "".join(cli.err)
        cli = _Cli("apply", "--resume", run, env=slow)
        cli.wait_for("resuming at step")
        time.sleep(0.3 * (attempt + 1))
    else:
        raise AssertionError("three Ctrl-Cs in a row landed just after a scheduled checkpoint")
    before = (run / "checkpoints" / "last.pt").read_bytes()
    saved = load_checkpoint(run / "checkpoints" / "last.pt")["trainer"]["step"]
    cli.ctrl_c()
    assert cli.finish() == 130, "".join(cli.err)
    assert (run / "checkpoints" / "last.pt").read_bytes() == before  # intact, and still the previous one
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["last.pt"]  # no temporary file left
    assert re.fullmatch(rf"interrupted at step \d+: resume with `surgeon apply --resume {re.escape(str(run))}` "
                        rf"\(from the checkpoint of step {saved}\)", cli.err[-1].strip()), cli.err[-3:]
    again = _Cli("apply", "--resume", run)
    again.wait_for(f"resuming at step {saved} of 6000")
    again.ctrl_c()
    assert again.finish() == 130


@pytest.mark.slow
def test_ctrl_c_before_the_first_step_leaves_nothing(img, tmp_path):
    recipe, run = _long_recipe(tmp_path, img), tmp_path / "run"
    cli = _Cli("apply", recipe, "--out", run)
    cli.wait_for("run directory:")
    cli.ctrl_c()
    assert cli.finish() == 130
    last = cli.err[-1].strip()
    if last.startswith("interrupted before training started"):  # the usual case
        assert last == f"interrupted before training started: nothing was trained, {run} was removed"
        assert not run.exists()
    else:  # the first step was quicker than the signal
        assert "checkpoint saved" in last


def test_an_op_the_meta_device_cannot_run_is_not_blamed_on_the_image_size():
    """The pre-flight forward runs on the meta device; an op without a meta kernel (or one that
    reads a value, `.item()`) says nothing about the image size, so it is not reported as one."""
    from surgeon.model import check_input_size

    class ReadsAValue(torch.nn.Module):
        def forward(self, x):
            return x * x.sum().item()

    check_input_size(ReadsAValue().to("meta"), (3, 8, 8), "data.image_size")  # no error

    class TooSmall(torch.nn.Module):
        def forward(self, x):
            assert x.shape[-1] == 16, f"Input width ({x.shape[-1]}) doesn't match model (16)."
            return x

    with pytest.raises(UserError, match="cannot take the data's 8x8 images"):
        check_input_size(TooSmall(), (3, 8, 8), "data.image_size")


@pytest.mark.slow
def test_ctrl_c_under_nproc_2_stops_every_rank_with_one_checkpoint(img, tmp_path):
    """`apply --nproc 2`: torch's launcher passes the SIGINT to the ranks (their own sessions);
    they stop after the same step, rank 0 writes the checkpoint and the resume line, exit 130
    (not the launcher's SignalException traceback)."""
    from surgeon.train.checkpoint import load_checkpoint

    recipe, run = _long_recipe(tmp_path, img, checkpoint_every=1000), tmp_path / "run"
    cli = _Cli("apply", recipe, "--out", run, "--nproc", "2")
    cli.wait_for("step 1/", timeout=240)
    cli.ctrl_c()
    assert cli.finish() == 130, "".join(cli.err)
    text = "".join(cli.err)
    assert "Traceback" not in text and "internal error" not in text, text[-3000:]
    match = re.fullmatch(rf"interrupted at step (\d+) of 6000, checkpoint saved: resume with "
                         rf"`surgeon apply --resume {re.escape(str(run))}`", cli.err[-1].strip())
    assert match, cli.err[-3:]
    assert text.count("interrupted at step") == 1  # rank 0 alone speaks
    assert load_checkpoint(run / "checkpoints" / "last.pt")["trainer"]["step"] == int(match.group(1))


def test_weights_with_nan_are_refused_before_training(tmp_path, write, cli):
    """A weights file holding NaN is refused before the first step (it would pass for a run that
    diverged), and the run directory it started is removed: nothing was trained."""
    import timm
    from safetensors.torch import save_file

    source = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    state["blocks.1.attn.qkv.weight"][0, 0] = float("nan")
    save_file(state, str(tmp_path / "w.safetensors"))
    recipe = write("r.yaml", TINY.replace("pretrained: false", f"pretrained: {tmp_path / 'w.safetensors'}"))
    res = cli("apply", recipe, "--out", tmp_path / "run")
    assert res.code == 2, res
    assert "non-finite (NaN or infinite) values before training: blocks.1.attn.qkv.weight" in res.err
    assert "r.yaml:4" in res.err and not (tmp_path / "run").exists()


def test_a_refused_apply_never_touches_the_run_of_the_lock_holder(tmp_path, write, cli, holder, monkeypatch):
    """Two `apply --out SAME` racing: the one refused by the lock must not clean up what it takes
    for its own unstarted run (here it believes it created the folder, as the loser of a race on
    `mkdir` does): the files are the holder's."""
    import surgeon.apply as ap

    run = tmp_path / "run"
    run.mkdir()
    (run / "recipe.yaml").write_text(write("r.yaml", TINY).read_text())
    (run / "metrics.jsonl").write_text('{"event": "start"}\n')
    proc = holder(run)
    monkeypatch.setattr(ap, "_choose_run_directory", lambda recipe, out, resume: (run, True))
    res = cli("apply", write("r.yaml", TINY), "--out", run)
    assert res.code == 2 and f"process {proc.pid}" in res.err
    assert sorted(p.name for p in run.iterdir()) == [".lock", "metrics.jsonl", "recipe.yaml"]


def test_figures_are_written_atomically(tmp_path, monkeypatch):
    """An interrupt while a report figure is saved leaves the previous figure, and no temporary file."""
    from matplotlib.figure import Figure

    from surgeon.report.plots import save_figure
    path = tmp_path / "plot.png"
    fig = Figure()
    fig.add_subplot().plot([0, 1])
    save_figure(fig, path)
    good = path.read_bytes()
    assert good.startswith(b"\x89PNG\r\n\x1a\n")

    def torn(self, fname, **kwargs):
        Path(fname).write_bytes(b"\x89PNG torn")
        raise KeyboardInterrupt

    monkeypatch.setattr(Figure, "savefig", torn)
    with pytest.raises(KeyboardInterrupt):
        save_figure(fig, path)
    assert path.read_bytes() == good
    assert [p.name for p in tmp_path.iterdir()] == ["plot.png"]


def test_no_module_writes_a_file_in_place():
    """Every file surgeon writes goes through surgeon.io's atomic writers (logs are appended, never
    rewritten): a `.write_text`/`.write_bytes` or an `open(..., "w")` anywhere else is a torn file
    waiting for a kill."""
    import ast
    package = Path(surgeon.__file__).parent
    offenders = []
    for py in sorted(package.rglob("*.py")):
        if py == package / "io.py":
            continue
        for node in ast.walk(ast.parse(py.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.Call):
                continue
            func = node.func
            if isinstance(func, ast.Attribute) and func.attr in ("write_text", "write_bytes"):
                offenders.append(f"{py.relative_to(package)}:{node.lineno}")
            elif isinstance(func, ast.Name) and func.id == "open":
                modes = [a for a in node.args[1:2]] + [k.value for k in node.keywords if k.arg == "mode"]
                if any(isinstance(m, ast.Constant) and "w" in str(m.value) for m in modes):
                    offenders.append(f"{py.relative_to(package)}:{node.lineno}")
    assert offenders == []


def test_a_torn_inference_cache_is_recomputed(tmp_path):
    from surgeon.suite_runner import _read_cache
    cache = tmp_path / "inference_ablation.json"
    assert _read_cache(cache) == {}
    cache.write_text('{"merge": 91.')
    assert _read_cache(cache) == {}
    cache.write_text('{"merge": 91.5}')
    assert _read_cache(cache) == {"merge": 91.5}


def test_an_ignored_sigint_stays_ignored_during_training():
    """A shell starts background jobs with SIGINT ignored, so that a Ctrl-C meant for the foreground
    job spares them; training must not re-arm it (and must restore whatever it found)."""
    from surgeon.train.trainer import _graceful_sigint
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        with _graceful_sigint() as flag:
            assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN and flag == {"stop": False}
        assert signal.getsignal(signal.SIGINT) is signal.SIG_IGN
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with _graceful_sigint():  # the usual case: the first Ctrl-C is caught
            assert signal.getsignal(signal.SIGINT) not in (signal.SIG_IGN, signal.default_int_handler)
        assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    finally:
        signal.signal(signal.SIGINT, previous)
