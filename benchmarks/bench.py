#!/usr/bin/env python
"""Training and inference cost of every surgeon method, side by side with plain timm and HF PEFT.

    python benchmarks/bench.py                 # default run (~5-10 min on 2 shared CPU cores)
    python benchmarks/bench.py --quick         # CI smoke: tiny model, one tiny repeat (< 60 s)
    python benchmarks/bench.py --model vit_base_patch16_224 --img-size 224 --batch 16   # paper setting

Everything is measured in this one process, on the same input tensors and the same backbone
weights (every model is created from the same seed), **interleaved**: each section runs round
after round, and in every round each of its cases runs once, in a freshly shuffled order
(A B C, C A B, ...). A case's warm-up steps are excluded. Ratios are the **median of the
per-round paired ratios** (case time / baseline time in the same round, so slow drifts of the
machine's load cancel), printed with their interquartile range (IQR) as the noise. Two A/A
controls (a second, identical LoRA model; a second plain timm model) show the noise floor.

Clock: on CPU with one thread, **process CPU time** (``time.process_time``): the work the step
does, not the time other jobs held the core (wall-clock ratios are printed alongside). On CUDA,
wall clock with ``torch.cuda.synchronize``.

What is measured
- train step: forward + loss + backward + ``torch.optim.AdamW.step`` + ``zero_grad`` on a fixed
  random batch. The loss is the trainer's own ``surgeon.train.regularizers.Objective`` (so the
  consistency cases run exactly the trainer's two passes / batched 2B pass); plain timm and PEFT
  use cross-entropy.
- memory (all devices): bytes of the tensors autograd saves for backward during one step
  (``torch.autograd.graph.saved_tensors_hooks``, unique storages, parameters and buffers
  excluded) = the activation memory; plus parameters, buffers, gradients and AdamW state
  (``exp_avg``, ``exp_avg_sq``, ``step``) measured from the tensors themselves. "est. peak" is their
  sum (transient workspace of single ops is not counted). On CUDA the true
  ``torch.cuda.max_memory_allocated`` of that step is reported as well.
- one adapted module (``layers``): forward + backward of the first wrapped module alone on its
  real input: the method's own overhead, undiluted by the rest of the model.
- inference: eval mode, ``torch.inference_mode``, img/s at batch 1 and 16; merged models come
  from ``surgeon.merge`` and are also checked to have exactly timm's modules and tensor shapes;
  ``ensemble`` is ``surgeon.methods.experts.ensemble_logits`` (N passes).

Threads: on CPU the default is ONE intra-op thread (``--threads``). On a 2-core machine shared
with other jobs, two OpenMP threads make every op wait for a descheduled sibling: steps measured
5-10x slower and far noisier than with one thread. One thread measures the methods' own cost.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import math
import os
import platform
import random
import statistics
import sys
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # runnable from a checkout without installing
    sys.path.insert(0, str(ROOT))

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import surgeon  # noqa: E402
from surgeon.methods.base import SurgeryLayer  # noqa: E402
from surgeon.train.provenance import cpu_name  # noqa: E402

RECIPES = ROOT / "recipes"
NUM_CLASSES = 10
MB = 1024 ** 2


# ----------------------------------------------------------------------------- configuration

def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="CI smoke run: tiny ViT, one tiny repeat")
    p.add_argument("--model", default="vit_small_patch16_224")
    p.add_argument("--img-size", type=int, default=112, help="input resolution (timm resamples the pos. embedding)")
    p.add_argument("--batch", type=int, default=8, help="train batch size")
    p.add_argument("--infer-batches", default="1,16", help="comma-separated inference batch sizes")
    p.add_argument("--rounds", type=int, default=16, help="timed rounds of the target duels (each case once per round)")
    p.add_argument("--overview-rounds", type=int, default=4, help="timed rounds of the other sections and inference")
    p.add_argument("--warmup", type=int, default=2, help="untimed warm-up calls per case (the last one measures memory)")
    p.add_argument("--clock", choices=("auto", "cpu", "wall"), default="auto",
                   help="what ratios are computed on: process CPU time (auto on CPU with 1 thread) or wall clock")
    p.add_argument("--infer-seconds", type=float, default=0.25, help="target duration of one inference sample")
    p.add_argument("--threads", type=int, default=None,
                   help="torch intra-op threads (CPU default 1, see the module docstring; 0 = torch's default)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--sections", default="overview,lora,adapters,consistency,experts,layers,inference",
                   help="comma-separated subset of: overview, lora, adapters, consistency, experts, layers, inference")
    p.add_argument("--no-peft", action="store_true", help="skip the HF PEFT comparison even if peft is installed")
    p.add_argument("--json", type=Path, help="also write every sample and result to this JSON file")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    args.model_kwargs = {"img_size": args.img_size}
    if args.quick:
        args.model = "vit_tiny_patch16_224"
        args.model_kwargs = {"img_size": 32, "patch_size": 8, "depth": 2}
        args.img_size = 32
        args.batch = 4
        args.rounds = args.overview_rounds = 1
        args.warmup = 1
        args.infer_seconds = 0.02
        args.infer_batches = "1,4"
    args.infer_batches = [int(b) for b in str(args.infer_batches).split(",") if b.strip()]
    return args


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------- statistics

def quantile(values: list[float], q: float) -> float:
    """Linear-interpolation quantile (numpy's default) of a non-empty list."""
    xs = sorted(values)
    if len(xs) == 1:
        return xs[0]
    pos = q * (len(xs) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


@dataclass
class Ratio:
    median: float
    p25: float
    p75: float
    best: float  # min(case) / min(baseline): the least-contended estimate
    n: int

    def text(self) -> str:
        if self.n == 1:
            return f"{self.median:.3f}"
        return f"{self.median:.3f} [{self.p25:.2f}–{self.p75:.2f}]"

    def to_dict(self) -> dict:
        return {"median": self.median, "p25": self.p25, "p75": self.p75, "best": self.best, "n": self.n}


def paired_ratio(a: list[float], b: list[float]) -> Ratio:
    """Statistics of ``a[i] / b[i]`` for samples taken in the same round."""
    ratios = [x / y for x, y in zip(a, b)]
    return Ratio(statistics.median(ratios), quantile(ratios, 0.25), quantile(ratios, 0.75), min(a) / min(b),
                 len(ratios))


def spread(values: list[float]) -> float:
    """IQR relative to the median (0.10 = the middle half of the samples spans 10 % of the median)."""
    med = statistics.median(values)
    return (quantile(values, 0.75) - quantile(values, 0.25)) / med if med else float("nan")


# ----------------------------------------------------------------------------- model construction

class Unavailable(Exception):
    """A case that cannot be built here (method missing, peft not installed, ...)."""


def plain_timm(args) -> nn.Module:
    torch.manual_seed(args.seed)  # every case gets the same backbone weights
    return timm.create_model(args.model, pretrained=False, num_classes=NUM_CLASSES, **args.model_kwargs)


def load_bench_recipe(args, recipe: str, edit: Callable[[dict], None] | None = None):
    """A shipped recipe on the bench model (random init: weights do not change the cost)."""
    path = RECIPES / f"{recipe}.yaml"
    if not path.exists():
        raise Unavailable(f"recipes/{recipe}.yaml not found")
    r = surgeon.load_recipe(path, overrides={"model.name": args.model, "model.pretrained": False,
                                             "model.kwargs": dict(args.model_kwargs),
                                             "model.num_classes": NUM_CLASSES})
    if edit is None:
        return r
    data = r.to_dict()
    data.pop("extends", None)
    edit(data)
    return surgeon.load_recipe(data)


def surgeon_model(args, recipe: str, edit=None):
    try:
        r = load_bench_recipe(args, recipe, edit)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            torch.manual_seed(args.seed)  # every case gets the same backbone weights (surgery init has its own seed)
            model = surgeon.build_model(r, weights=False)
    except Unavailable:
        raise
    except (KeyError, ModuleNotFoundError, ImportError, surgeon.UserError) as exc:
        raise Unavailable(f"{recipe}: {type(exc).__name__}: {exc}") from None
    return model, r


def set_rule(**changes):
    """An ``edit`` for :func:`load_bench_recipe`: update fields of surgery rule 0 (``'lora.rank': 8``)."""
    def edit(data: dict) -> None:
        rule = data["surgery"][0]
        for dotted, value in changes.items():
            node = rule
            *parents, leaf = dotted.split(".")
            for key in parents:
                node = node.setdefault(key, {})
            node[leaf] = value
    return edit


def with_regularizer(weight: float, batched: bool = False, rule_edit=None):
    def edit(data: dict) -> None:
        if rule_edit is not None:
            rule_edit(data)
        data.setdefault("regularizers", {}).setdefault("consistency", {})
        data["regularizers"]["consistency"].update({"weight": weight, "batched": batched})
    return edit


def peft_lora_model(args, rank: int, targets: list[str]) -> nn.Module:
    try:
        import peft
    except ImportError:
        raise Unavailable("peft is not installed (pip install peft, or the 'bench' extra)") from None
    model = plain_timm(args)
    config = peft.LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, target_modules=targets, bias="none")
    wrapped = peft.get_peft_model(model, config)
    for p in model.get_classifier().parameters():  # surgeon also trains the new head
        p.requires_grad_(True)
    # Call the injected timm model directly (what PeftModel.forward does for a custom model,
    # minus a hook context manager): the fastest way to run PEFT here.
    inner = wrapped.base_model.model
    inner.peft_version = peft.__version__
    return inner


# ----------------------------------------------------------------------------- cases

@dataclass
class Case:
    name: str
    label: str
    model: nn.Module
    objective: Callable | None  # (model, x, y) -> loss
    baseline: str | None = None  # closest baseline case name
    target: float | None = None  # step-time ratio target vs baseline
    note: str = ""
    optimizer: torch.optim.Optimizer | None = None
    step: Callable[[], None] | None = None
    memory: dict = field(default_factory=dict)

    @property
    def trainable(self) -> int:
        return sum(p.numel() for p in self.model.parameters() if p.requires_grad)


def ce_objective(model, x, y):
    return F.cross_entropy(model(x).float(), y)


def surgeon_objective(model, recipe):
    from surgeon.train.regularizers import Objective

    objective = Objective(model, recipe.regularizers)
    return lambda m, x, y: objective(m, x, y)["loss"]


def make_step(case: Case, x: torch.Tensor, y: torch.Tensor) -> Callable[[], None]:
    model = case.model
    params = [p for p in model.parameters() if p.requires_grad]
    case.optimizer = opt = torch.optim.AdamW(params, lr=1e-5, weight_decay=0.01)
    objective = case.objective

    def step() -> None:
        loss = objective(model, x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    return step


def train_cases(args, device, only: set[str] | None = None) -> tuple[dict[str, Case], dict[str, str]]:
    """The training cases (all, or those named in ``only``) that can be built here, and why others cannot."""
    cases: dict[str, Case] = {}
    skipped: dict[str, str] = {}

    def add(name, label, build, **kw):
        if only is not None and name not in only:
            return
        try:
            out = build()
        except Unavailable as exc:
            skipped[name] = str(exc)
            return
        if isinstance(out, tuple):
            model, recipe = out
            objective = surgeon_objective(model, recipe)
        else:
            model, objective = out, ce_objective
        model.to(device).train()
        cases[name] = Case(name, label, model, objective, **kw)

    def full_timm():
        m = plain_timm(args)
        for p in m.parameters():
            p.requires_grad_(True)
        return m

    no_reg = with_regularizer(0.0)
    lora8 = set_rule(**{"lora.rank": 8, "lora.alpha": 8, "lora.slices": None})
    add("full", "plain timm, full fine-tuning", full_timm)
    add("linear", "linear probe (surgeon)", lambda: surgeon_model(args, "linear"), baseline="full")
    add("bitfit", "BitFit (surgeon)", lambda: surgeon_model(args, "bitfit"), baseline="full")
    add("lora_qkv8", "LoRA r8 on qkv (surgeon)", lambda: surgeon_model(args, "lora", lora8),
        baseline="peft_lora_qkv8", target=1.00)
    add("lora_qkv8_twin", "LoRA r8 on qkv, a second identical model (A/A control)",
        lambda: surgeon_model(args, "lora", lora8), baseline="lora_qkv8")
    if not args.no_peft:
        add("peft_lora_qkv8", "HF PEFT LoRA r8 on qkv", lambda: peft_lora_model(args, 8, ["qkv"]), baseline="full")
    else:
        skipped["peft_lora_qkv8"] = "--no-peft"
    add("mlae_qkv8", "MLAE r8 on qkv, p=0.5 (surgeon)", lambda: surgeon_model(args, "mlae"),
        baseline="lora_qkv8", target=1.05)
    add("lora_qv16", "LoRA r16 on q,v slices (surgeon)", lambda: surgeon_model(args, "lora"), baseline="full",
        note="PEFT cannot slice a fused qkv")
    add("mosl_qv16", "MoSL r16 q,v, B split N=4, no reg.", lambda: surgeon_model(args, "mosl", no_reg),
        baseline="lora_qv16")

    add("adaptformer", "AdaptFormer b64 (surgeon)", lambda: surgeon_model(args, "adaptformer"), baseline="full")
    add("mosa_hier", "MoSA hier N=4, no reg.", lambda: surgeon_model(args, "mosa_hier", no_reg),
        baseline="adaptformer", target=1.05)
    add("mosa_flat", "MoSA flat N=4, no reg.", lambda: surgeon_model(args, "mosa_flat", no_reg),
        baseline="adaptformer", target=1.05)
    for variant in ("hier", "flat"):
        add(f"mosa_{variant}_cons2", f"MoSA {variant} + consistency, 2 passes",
            lambda v=variant: surgeon_model(args, f"mosa_{v}", with_regularizer(1.0, False)), baseline="adaptformer")
        add(f"mosa_{variant}_consB", f"MoSA {variant} + consistency, batched 2B",
            lambda v=variant: surgeon_model(args, f"mosa_{v}", with_regularizer(1.0, True)),
            baseline=f"mosa_{variant}_cons2")
    for n in (2, 8, 16):
        add(f"mosa_hier_n{n}", f"MoSA hier N={n}, no reg.",
            lambda n=n: surgeon_model(args, "mosa_hier", with_regularizer(0.0, rule_edit=set_rule(**{"experts.count": n}))),
            baseline="adaptformer")
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    y = torch.randint(0, NUM_CLASSES, (args.batch,), device=device)
    for case in cases.values():
        case.step = make_step(case, x, y)
    return cases, skipped


# Sections: each is timed on its own, interleaved; "rounds" is a key of the args (see parse_args).
SECTIONS = {
    # every method once, against plain timm full fine-tuning
    "overview": (["full", "linear", "bitfit", "peft_lora_qkv8", "lora_qkv8", "mlae_qkv8", "lora_qv16", "mosl_qv16",
                  "adaptformer", "mosa_hier", "mosa_flat"], "overview_rounds"),
    # the duels with a target: few cases, many rounds, so paired samples are close in time
    "lora": (["peft_lora_qkv8", "lora_qkv8", "mlae_qkv8", "lora_qkv8_twin"], "rounds"),
    "adapters": (["adaptformer", "mosa_hier", "mosa_flat"], "rounds"),
    "consistency": (["adaptformer", "mosa_hier", "mosa_hier_cons2", "mosa_hier_consB", "mosa_flat",
                     "mosa_flat_cons2", "mosa_flat_consB"], "overview_rounds"),
    "experts": (["adaptformer", "mosa_hier_n2", "mosa_hier", "mosa_hier_n8", "mosa_hier_n16"], "overview_rounds"),
}
N_OF = {"mosa_hier_n2": 2, "mosa_hier": 4, "mosa_hier_n8": 8, "mosa_hier_n16": 16}


# ----------------------------------------------------------------------------- timing

@dataclass
class Samples:
    """Per-call seconds of one case in one section: wall clock and process CPU time."""

    wall: list[float] = field(default_factory=list)
    cpu: list[float] = field(default_factory=list)

    def get(self, clock: str) -> list[float]:
        return self.cpu if clock == "cpu" else self.wall


def calibrate(fns: dict, args, device) -> dict:
    """Warm each function up, then pick repeats per sample so one sample lasts ~``args.infer_seconds``."""
    inner = {}
    for key, fn in fns.items():
        for _ in range(max(args.warmup, 1)):
            fn()
        synchronize(device)
        t0 = time.perf_counter()
        fn()
        synchronize(device)
        inner[key] = max(1, round(args.infer_seconds / max(time.perf_counter() - t0, 1e-6)))
    return inner


def interleaved(fns: dict[str, Callable[[], None]], rounds: int, device, rng: random.Random,
                inner: dict[str, int] | None = None, log=None) -> dict[str, Samples]:
    """Time each fn once per round, in a freshly shuffled order every round (A B C, C A B, ...).

    ``inner[name]`` calls make one sample (for fast inference calls). Python's GC is collected
    before and disabled during each sample. Warm-up is the caller's job.
    """
    inner = inner or {}
    samples: dict[str, Samples] = {name: Samples() for name in fns}
    names = list(fns)
    for r in range(rounds):
        rng.shuffle(names)
        for name in names:
            fn, k = fns[name], inner.get(name, 1)
            gc.collect()
            gc.disable()
            try:
                synchronize(device)
                c0, t0 = time.process_time(), time.perf_counter()
                for _ in range(k):
                    fn()
                synchronize(device)
                t1, c1 = time.perf_counter(), time.process_time()
            finally:
                gc.enable()
            samples[name].wall.append((t1 - t0) / k)
            samples[name].cpu.append((c1 - c0) / k)
        if log:
            log(f"  round {r + 1}/{rounds} done")
    return samples


# ----------------------------------------------------------------------------- one adapted layer

LAYER_DUELS = [("lora_qkv8", "peft_lora_qkv8"), ("mlae_qkv8", "lora_qkv8"), ("mosa_hier", "adaptformer"),
               ("mosa_flat", "adaptformer")]


def first_adapted_module(model: nn.Module) -> str | None:
    """Name of the first module a surgery (or PEFT) wrapped: the unit whose own overhead we time."""
    for name, module in model.named_modules():
        if isinstance(module, SurgeryLayer) or type(module).__module__.startswith("peft.tuners"):
            if name:
                return name
    return None


def layer_call(case: Case, name: str, x: torch.Tensor) -> Callable[[], None]:
    """forward + backward of module ``name`` of the case's model on its real input (captured once)."""
    module = case.model.get_submodule(name)
    # An adapter with input_from reads the input of a sibling (the block's norm2), which a lone call
    # of the module does not run: capture that input too and hand it over before every call.
    sibling = module.__dict__.get("_input_module")
    captured = {}

    def grab(key):
        def hook(mod, args, kwargs):
            captured[key] = args[0] if args else kwargs["x"]
        return hook
    handles = [module.register_forward_pre_hook(grab("x"), with_kwargs=True)]
    if sibling is not None:
        handles.append(sibling.register_forward_pre_hook(grab("sibling"), with_kwargs=True))
    with torch.no_grad():
        case.model(x)
    for handle in handles:
        handle.remove()
    xl = captured["x"].detach().clone().requires_grad_(True)
    xs = captured["sibling"].detach() if sibling is not None else None

    def feed() -> None:
        if sibling is not None:
            sibling.__dict__["_surgeon_input"] = xs
    params = [p for p in module.parameters() if p.requires_grad]
    with torch.no_grad():
        feed()
        g = torch.randn_like(module(xl))

    def call() -> None:
        feed()
        module(xl).backward(g)
        xl.grad = None
        for p in params:
            p.grad = None
    return call


def _layer_duels(args, cases, device, rng, results, clock, log) -> list[str]:
    pairs = [(a, b) for a, b in LAYER_DUELS if a in cases and b in cases]
    if not pairs:
        return []
    x = torch.randn(args.batch, 3, args.img_size, args.img_size, device=device)
    fns, where = {}, {}
    for a, b in pairs:
        name = first_adapted_module(cases[a].model)
        if name is None:
            continue
        for case in (a, b):
            key = f"{case}@{name}"
            if key not in fns:
                try:
                    fns[key] = layer_call(cases[case], name, x)
                except (AttributeError, KeyError):
                    continue
        where[(a, b)] = name
    inner = calibrate(fns, args, device)
    log(f"layers: {', '.join(fns)}")
    s = interleaved(fns, args.rounds, device, rng, inner=inner, log=log)
    results["layers"] = {k: {"wall": v.wall, "cpu": v.cpu} for k, v in s.items()}
    other = "wall" if clock == "cpu" else "cpu"
    out = ["", "## One adapted module, forward + backward (the method's own overhead, without the rest of the model)",
           "", f"| module | case / baseline | {clock} µs | ratio ({clock}) [IQR] | ratio ({other}) [IQR] | best |",
           "|---|---|---|---|---|---|"]
    for (a, b), name in where.items():
        ka, kb = f"{a}@{name}", f"{b}@{name}"
        if ka not in s or kb not in s:
            continue
        r = _ratio(s, ka, kb, clock)
        us = lambda k: f"{1e6 * statistics.median(s[k].get(clock)):.0f}"  # noqa: E731
        out.append(f"| {name} | {a} / {b} | {us(ka)} / {us(kb)} | {r.text()} | {_cell(_ratio(s, ka, kb, other))} | "
                   f"{r.best:.3f} |")
    return out


# ----------------------------------------------------------------------------- memory

def tensor_bytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def measure_memory(case: Case, device) -> dict:
    """Saved-for-backward activations of one step, plus static/trainable state (bytes)."""
    model, opt = case.model, case.optimizer
    static_ptrs = {t.untyped_storage().data_ptr() for t in list(model.parameters()) + list(model.buffers())}
    saved: dict[int, int] = {}

    def pack(t: torch.Tensor):
        try:
            storage = t.untyped_storage()
        except (RuntimeError, NotImplementedError):  # e.g. sparse or wrapper subclasses
            return t
        ptr = storage.data_ptr()
        if ptr not in static_ptrs:
            saved[ptr] = max(saved.get(ptr, 0), storage.nbytes())
        return t

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        case.step()
    out = {}
    if device.type == "cuda":
        synchronize(device)
        out["cuda_peak"] = torch.cuda.max_memory_allocated(device)
        out["cuda_peak_over_resident"] = out["cuda_peak"] - base
    trainable = [p for p in model.parameters() if p.requires_grad]
    opt_state = sum(tensor_bytes(v) for s in opt.state.values() for v in s.values() if isinstance(v, torch.Tensor))
    params = sum(tensor_bytes(p) for p in model.parameters())
    buffers = sum(tensor_bytes(b) for b in model.buffers())
    out.update(
        activations=sum(saved.values()),
        params=params,
        buffers=buffers,
        trainable_params=sum(tensor_bytes(p) for p in trainable),
        grads=sum(tensor_bytes(p) for p in trainable),  # set_to_none frees them after the step; peak has them
        optimizer=opt_state,
    )
    out["trainable_state"] = out["trainable_params"] + out["grads"] + out["optimizer"]
    out["est_peak"] = params + buffers + out["grads"] + opt_state + out["activations"]
    return out


# ----------------------------------------------------------------------------- inference

def inference_models(args, device) -> tuple[dict[str, tuple[nn.Module, Callable]], dict[str, str]]:
    """name -> (model, forward(x)); merged models via surgeon.merge."""
    models: dict[str, tuple[nn.Module, Callable]] = {}
    skipped: dict[str, str] = {}

    def plain_forward(m):
        return lambda x: m(x)

    def add(name, build, merged: bool, forward=None):
        try:
            out = build()
        except Unavailable as exc:
            skipped[name] = str(exc)
            return
        model = out[0] if isinstance(out, tuple) else out
        if merged:
            surgeon.merge(model)
        model.to(device).eval()
        models[name] = (model, (forward or plain_forward)(model))

    lora8 = set_rule(**{"lora.rank": 8, "lora.alpha": 8, "lora.slices": None})
    add("timm", lambda: plain_timm(args), False)
    add("lora_qkv8_merged", lambda: surgeon_model(args, "lora", lora8), True)
    add("lora_qv16_merged", lambda: surgeon_model(args, "lora"), True)
    add("mlae_qkv8_merged", lambda: surgeon_model(args, "mlae"), True)
    add("mosl_qv16_merged", lambda: surgeon_model(args, "mosl"), True)
    add("adaptformer", lambda: surgeon_model(args, "adaptformer"), False)
    add("adaptformer_merged", lambda: surgeon_model(args, "adaptformer"), True)
    add("mosa_hier_merged", lambda: surgeon_model(args, "mosa_hier"), True)

    def ensemble_forward(m):
        from surgeon.methods.experts import ensemble_logits
        return lambda x: ensemble_logits(m, x)
    add("mosa_hier_ensemble", lambda: surgeon_model(args, "mosa_hier"), False, forward=ensemble_forward)
    add("timm_twin", lambda: plain_timm(args), False)  # built last: an A/A control for "within noise"
    return models, skipped


INFER_ROWS = [  # (name, label, baseline, check)
    ("timm", "plain timm", None, None),
    ("timm_twin", "plain timm, a second identical instance (A/A control)", "timm", None),
    ("lora_qkv8_merged", "LoRA r8 qkv, merged", "timm", "noise"),
    ("lora_qv16_merged", "LoRA r16 q,v, merged", "timm", "noise"),
    ("mlae_qkv8_merged", "MLAE r8 qkv, merged", "timm", "noise"),
    ("mosl_qv16_merged", "MoSL r16 q,v, merged", "timm", "noise"),
    ("adaptformer", "AdaptFormer b64", "timm", None),
    ("adaptformer_merged", "AdaptFormer b64, merged (scale folded)", "adaptformer", None),
    ("mosa_hier_merged", "MoSA hier N=4, merged", "adaptformer", "noise"),
    ("mosa_hier_ensemble", "MoSA hier N=4, ensemble (N passes)", "mosa_hier_merged", None),
]


STRUCTURE_REFERENCE = {"lora_qkv8_merged": "timm", "lora_qv16_merged": "timm", "mlae_qkv8_merged": "timm",
                       "mosl_qv16_merged": "timm", "mosa_hier_merged": "adaptformer_merged"}


def signature(model: nn.Module) -> list:
    """Module names and types, parameter and buffer names, shapes and dtypes: equal signatures = same compute."""
    return ([(n, type(m).__name__) for n, m in model.named_modules()]
            + [(n, tuple(t.shape), t.dtype) for n, t in model.state_dict().items()])


def within_noise(r: Ratio, control: Ratio | None = None, tolerance: float = 0.02) -> bool:
    """Indistinguishable from 1 at this machine's noise: 1.0 inside the IQR of the paired ratios, or
    |median - 1| <= max(2 %, how far the A/A control (two identical models) strays: |its median - 1|
    + half its IQR)."""
    if r.p25 <= 1.0 <= r.p75:
        return True
    if control is not None:
        tolerance = max(tolerance, abs(control.median - 1) + (control.p75 - control.p25) / 2)
    return abs(r.median - 1) <= tolerance


# ----------------------------------------------------------------------------- reporting

def fmt_mb(b: float | None) -> str:
    return "—" if b is None else f"{b / MB:.1f}"


def fmt_params(n: int) -> str:
    return f"{n / 1e6:.3f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


def verdict(ok: bool) -> str:
    return "**pass**" if ok else "**MISS**"


def main(argv=None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    threads = args.threads if args.threads is not None else (1 if device.type == "cpu" else 0)
    if threads:
        torch.set_num_threads(threads)
    clock = args.clock if args.clock != "auto" else ("cpu" if device.type == "cpu" and torch.get_num_threads() == 1
                                                     else "wall")
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    sections = [s.strip() for s in args.sections.split(",") if s.strip()]
    unknown = [s for s in sections if s not in SECTIONS and s not in ("layers", "inference")]
    if unknown:
        print(f"unknown section(s) {unknown}; choose from {', '.join(SECTIONS)}, layers, inference", file=sys.stderr)
        return 2
    t_start = time.perf_counter()

    def log(msg: str) -> None:
        print(f"[{time.perf_counter() - t_start:6.1f}s] {msg}", file=sys.stderr, flush=True)

    try:  # the version without importing peft (slow: it imports transformers)
        from importlib.metadata import version
        peft_version = version("peft")
    except Exception:  # noqa: BLE001 - not installed
        peft_version = None
    header = {
        "date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
        "machine": f"{platform.machine()}, {os.cpu_count()} logical CPUs, {cpu_name()}",
        "device": str(device) + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else ""),
        "threads": torch.get_num_threads(), "clock": clock,
        "python": platform.python_version(), "torch": torch.__version__, "timm": timm.__version__,
        "peft": peft_version, "surgeon": surgeon.__version__,
        "model": args.model, "model_kwargs": args.model_kwargs, "batch": args.batch,
        "infer_batches": args.infer_batches, "rounds": args.rounds, "overview_rounds": args.overview_rounds,
        "warmup": args.warmup, "load_avg_start": _loadavg(),
    }
    results: dict = {"header": header, "train": {}, "infer": {}, "skipped": {}, "targets": []}
    clock_text = ("process CPU time (1 thread: the work our step does, not the time other jobs held the core)"
                  if clock == "cpu" else "wall clock" + (" with torch.cuda.synchronize" if device.type == "cuda" else ""))
    out: list[str] = [
        f"# surgeon benchmark — {args.model} {args.model_kwargs}, train batch {args.batch}"
        + (" (QUICK smoke run: one tiny repeat, the numbers mean nothing)" if args.quick else ""),
        "",
        f"- date {header['date']}; {header['machine']}; device {header['device']}; torch threads {header['threads']}; "
        f"load average at start {header['load_avg_start']}",
        f"- python {header['python']}, torch {header['torch']}, timm {header['timm']}, "
        f"peft {peft_version or 'not installed'}, surgeon {header['surgeon']}",
        f"- timed by {clock_text}; wall-clock ratios alongside. Rounds: {args.rounds} for the target duels, "
        f"{args.overview_rounds} for the other sections, each case once per round in shuffled order; "
        f"{args.warmup} warm-up steps per case excluded. Ratio = median of the per-round paired ratios, "
        "[IQR] = their interquartile range (the noise).",
    ]

    train_sections = [s for s in sections if s in SECTIONS]
    wanted = {n for s in train_sections for n in SECTIONS[s][0]}
    if "layers" in sections:
        wanted |= {n for duel in LAYER_DUELS for n in duel}
    if wanted:
        log("building training cases")
        cases, skipped = train_cases(args, device, only=wanted)
        results["skipped"].update(skipped)
        needed = list(cases)
        for name in needed:
            for _ in range(max(args.warmup - 1, 0)):
                cases[name].step()
            cases[name].memory = measure_memory(cases[name], device)  # the last warm-up step
        log(f"built and warmed up {len(needed)} cases")
        samples: dict[str, dict[str, Samples]] = {}
        for section in train_sections:
            names, rounds_key = SECTIONS[section]
            names = [n for n in names if n in cases]
            log(f"section {section}: {', '.join(names)}")
            samples[section] = interleaved({n: cases[n].step for n in names}, getattr(args, rounds_key), device, rng,
                                           log=log)
        if "layers" in sections:
            out_layers = _layer_duels(args, cases, device, rng, results, clock, log)
        results["train"] = {section: {n: {"wall": v.wall, "cpu": v.cpu} for n, v in s.items()}
                            for section, s in samples.items()}
        results["cases"] = {n: {"label": c.label, "trainable": c.trainable, "memory": c.memory} for n, c in cases.items()}
        out += _train_report(cases, samples, skipped, results, clock)
        if "layers" in sections:
            out += out_layers
        for c in cases.values():  # free training state before inference
            c.optimizer = c.step = None
        cases.clear()
        gc.collect()

    if "inference" in sections:
        log("building inference models")
        models, skipped = inference_models(args, device)
        results["skipped"].update(skipped)
        same = {name: signature(models[name][0]) == signature(models[ref][0])
                for name, ref in STRUCTURE_REFERENCE.items() if name in models and ref in models}
        results["same_structure"] = same
        for name, ok in same.items():
            results["targets"].append({"what": f"{name} has exactly the modules, tensor names and shapes of "
                                               f"{STRUCTURE_REFERENCE[name]}", "value": ok, "pass": ok})
        for batch in args.infer_batches:
            x = torch.randn(batch, 3, args.img_size, args.img_size, device=device)
            fns = {name: (lambda f=forward: _no_grad_call(f, x)) for name, (_, forward) in models.items()}
            inner = calibrate(fns, args, device)
            log(f"inference batch {batch}: {', '.join(fns)}")
            s = interleaved(fns, args.overview_rounds, device, rng, inner=inner, log=log)
            results["infer"][batch] = {n: {"wall": v.wall, "cpu": v.cpu} for n, v in s.items()}
            out += _infer_table(batch, s, skipped, results, clock, same)

    out += _target_summary(results)
    header["load_avg_end"] = _loadavg()
    header["wall_seconds"] = round(time.perf_counter() - t_start, 1)
    out += ["", f"Total wall time {header['wall_seconds']} s; load average at end {header['load_avg_end']}."]
    print("\n".join(out), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))
    return 0


def _no_grad_call(forward, x):
    with torch.inference_mode():
        return forward(x)


def _loadavg() -> str:
    try:
        return " ".join(f"{v:.2f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def _cell(r: Ratio | None) -> str:
    return "—" if r is None else r.text()


def _ratio(s: dict[str, Samples], a: str, b: str, clock: str) -> Ratio | None:
    return paired_ratio(s[a].get(clock), s[b].get(clock)) if a in s and b in s else None


def _ms(samples: Samples, clock: str) -> str:
    return f"{1000 * statistics.median(samples.get(clock)):.0f}"


DUELS = [  # (section, case, baseline, target); target None = control row
    ("lora", "lora_qkv8_twin", "lora_qkv8", None),
    ("lora", "lora_qkv8", "peft_lora_qkv8", 1.00),
    ("lora", "mlae_qkv8", "lora_qkv8", 1.05),
    ("adapters", "mosa_hier", "adaptformer", 1.05),
    ("adapters", "mosa_flat", "adaptformer", 1.05),
]


def _train_report(cases, samples, skipped, results, clock) -> list[str]:
    out: list[str] = []
    other = "wall" if clock == "cpu" else "cpu"
    cuda = any("cuda_peak" in c.memory for c in cases.values())

    def memory_cells(name: str) -> list[str]:
        m = cases[name].memory
        cells = [fmt_mb(m.get("activations")), fmt_mb(m.get("trainable_state")), fmt_mb(m.get("est_peak"))]
        return cells + ([fmt_mb(m.get("cuda_peak"))] if cuda else [])

    mem_cols = ["act. MB", "trainable-state MB", "est. peak MB"] + (["CUDA peak MB"] if cuda else [])

    def table(cols: list[str]) -> list[str]:
        return ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]

    if "overview" in samples:
        s = samples["overview"]
        out += ["", "## Train step (forward + backward + AdamW): every method vs plain timm full fine-tuning", ""]
        out += table(["case", "trainable", f"{clock} ms", "spread", f"vs full FT ({clock}) [IQR]",
                      f"vs full FT ({other})"] + mem_cols)
        for name in SECTIONS["overview"][0]:
            if name not in s:
                out.append(f"| {name}: skipped ({skipped.get(name, 'n/a')}) |" + " |" * (5 + len(mem_cols)))
                continue
            c = cases[name]
            vs = "1" if name == "full" else _cell(_ratio(s, name, "full", clock))
            vs_other = "1" if name == "full" else _cell(_ratio(s, name, "full", other))
            out.append("| " + " | ".join([f"{name}: {c.label}", fmt_params(c.trainable), _ms(s[name], clock),
                                          f"{100 * spread(s[name].get(clock)):.0f}%", vs, vs_other]
                                         + memory_cells(name)) + " |")
        out.append("")
        out.append("act. = bytes saved for backward (unique storages, parameters/buffers excluded); trainable-state = "
                   "trainable params + grads + AdamW moments; est. peak = all params + buffers + grads + AdamW state "
                   "+ act.")

    duels = [d for d in DUELS if d[0] in samples]
    if duels:
        out += ["", "## Target duels (few cases per section, more rounds: paired samples are close in time)", ""]
        out += table(["case / baseline", f"{clock} ms", f"ratio ({clock}) [IQR]", f"ratio ({other}) [IQR]",
                      "best (min/min)", "target", "verdict"])
        for section, a, b, target in duels:
            s = samples[section]
            r = _ratio(s, a, b, clock)
            if r is None:
                missing = a if a not in s else b
                out.append(f"| {a} / {b} | skipped: {missing}: {skipped.get(missing, 'n/a')} | | | | | |")
                continue
            if target is None:
                out.append(f"| {a} / {b} (A/A: two identical models, the noise floor) | {_ms(s[a], clock)} / "
                           f"{_ms(s[b], clock)} | {r.text()} | {_cell(_ratio(s, a, b, other))} | {r.best:.3f} | — | — |")
                continue
            ok = r.median <= target
            results["targets"].append({"what": f"train step {a} / {b} <= {target:.2f} ({clock} time)",
                                       "value": r.median, "iqr": [r.p25, r.p75], "best": r.best, "pass": ok})
            out.append(f"| {a} / {b} | {_ms(s[a], clock)} / {_ms(s[b], clock)} | {r.text()} | "
                       f"{_cell(_ratio(s, a, b, other))} | {r.best:.3f} | ≤ {target:.2f} | {verdict(ok)} |")
        if "lora_qkv8" in cases and "peft_lora_qkv8" in cases:
            ours, theirs = cases["lora_qkv8"].memory, cases["peft_lora_qkv8"].memory
            out += ["", "| memory, LoRA r8 qkv | surgeon | PEFT | ratio |", "|---|---|---|---|"]
            for key, label in (("activations", "saved for backward"), ("trainable_state", "trainable state"),
                               ("est_peak", "est. peak"), ("cuda_peak", "CUDA max_memory_allocated")):
                if key not in ours:
                    continue
                ok = ours[key] <= theirs[key]
                out.append(f"| {label} | {ours[key] / MB:.2f} MB | {theirs[key] / MB:.2f} MB | "
                           f"{ours[key] / max(theirs[key], 1):.4f} |")
                if key != "trainable_state":
                    results["targets"].append({"what": f"memory ({label}): lora_qkv8 <= peft_lora_qkv8",
                                               "value": ours[key] / MB, "baseline": theirs[key] / MB, "pass": ok})

    if "consistency" in samples:
        s = samples["consistency"]
        out += ["", "## Consistency regulariser: two passes vs one batched pass of 2B (sampler.groups = 2)", ""]
        out += table(["case", f"{clock} ms", "vs AdaptFormer [IQR]", "vs same MoSA without reg. [IQR]",
                      "batched / 2 passes [IQR]"] + mem_cols)
        for name in SECTIONS["consistency"][0]:
            if name not in s:
                out.append(f"| {name}: skipped ({skipped.get(name, 'n/a')}) |" + " |" * (4 + len(mem_cols)))
                continue
            variant = "hier" if "hier" in name else "flat" if "flat" in name else None
            vs_plain = _cell(_ratio(s, name, f"mosa_{variant}", clock)) if variant and "cons" in name else "—"
            vs_two = _cell(_ratio(s, name, f"mosa_{variant}_cons2", clock)) if name.endswith("consB") else "—"
            vs_af = "1" if name == "adaptformer" else _cell(_ratio(s, name, "adaptformer", clock))
            out.append("| " + " | ".join([f"{name}: {cases[name].label}", _ms(s[name], clock), vs_af, vs_plain,
                                          vs_two] + memory_cells(name)) + " |")

    if "experts" in samples:
        s = samples["experts"]
        present = [n for n in N_OF if n in s]
        out += ["", "## MoSA (hierarchical, no regulariser) vs the number of experts N", ""]
        out += table(["N", "trainable", f"{clock} ms", "vs AdaptFormer [IQR]", "buffers MB"] + mem_cols)
        if "adaptformer" in s:
            out.append("| " + " | ".join(["AdaptFormer", fmt_params(cases["adaptformer"].trainable),
                                          _ms(s["adaptformer"], clock), "1",
                                          fmt_mb(cases["adaptformer"].memory["buffers"])]
                                         + memory_cells("adaptformer")) + " |")
        ratios = {}
        for n in present:
            r = _ratio(s, n, "adaptformer", clock)
            ratios[N_OF[n]] = r
            out.append("| " + " | ".join([str(N_OF[n]), fmt_params(cases[n].trainable), _ms(s[n], clock), _cell(r),
                                          fmt_mb(cases[n].memory["buffers"])] + memory_cells(n)) + " |")
        if present:
            state = {N_OF[n]: cases[n].memory["trainable_state"] + cases[n].memory["buffers"] for n in present}
            results["targets"].append({"what": "MoSA trainable state + buffers (bytes) identical for N = "
                                               + ", ".join(map(str, state)),
                                       "value": sorted(set(state.values())), "pass": len(set(state.values())) == 1})
            peaks = [cases[n].memory["est_peak"] for n in present]
            results["targets"].append({"what": "MoSA est. peak memory max/min over N <= 1.001",
                                       "value": max(peaks) / min(peaks), "pass": max(peaks) / min(peaks) <= 1.001})
            if all(r is not None for r in ratios.values()):
                meds = [r.median for r in ratios.values()]
                flat = max(meds) / min(meds) <= 1.05
                overlap = max(r.p25 for r in ratios.values()) <= min(r.p75 for r in ratios.values())
                results["targets"].append({
                    "what": "MoSA step time flat in N (max/min of the medians vs AdaptFormer <= 1.05, "
                            "or all IQRs overlap = within noise)",
                    "value": {k: round(r.median, 3) for k, r in ratios.items()},
                    "pass": flat or overlap, "note": "" if flat else "within noise only" if overlap else ""})
    return out


def _infer_table(batch, s, skipped, results, clock, same) -> list[str]:
    other = "wall" if clock == "cpu" else "cpu"
    out = ["", f"## Inference, batch {batch} (eval, torch.inference_mode)", "",
           f"| model | img/s ({clock}) | img/s (wall) | spread | time ratio ({clock}) [IQR] | ({other}) | check |",
           "|---|---|---|---|---|---|---|"]
    for name, label, base, check in INFER_ROWS:
        if name not in s:
            out.append(f"| {name}: skipped ({skipped.get(name, 'n/a')}) | | | | | | |")
            continue
        t = s[name]
        ips = batch / statistics.median(t.get(clock))
        ips_wall = batch / statistics.median(t.wall)
        chk, vs, vs_other = "", "—", "—"
        if base and base in s:
            r = _ratio(s, name, base, clock)
            vs, vs_other = f"{r.text()} × {base}", _cell(_ratio(s, name, base, other))
            if check == "noise":
                control = _ratio(s, "timm_twin", "timm", clock) if base == "timm" else None
                ok = within_noise(r, control)
                chk = f"= {base} within noise: {verdict(ok)}"
                if name in same:
                    chk += f"; same modules & shapes as {STRUCTURE_REFERENCE[name]}: {'yes' if same[name] else 'NO'}"
                results["targets"].append({"what": f"inference batch {batch}: {name} / {base} within noise "
                                                   "(1 in IQR, or |median-1| <= max(2%, A/A control's deviation))",
                                           "value": r.median, "iqr": [r.p25, r.p75], "best": r.best, "pass": ok})
        out.append(f"| {name}: {label} | {ips:.1f} | {ips_wall:.1f} | {100 * spread(t.get(clock)):.0f}% | {vs} | "
                   f"{vs_other} | {chk} |")
    return out


def _target_summary(results) -> list[str]:
    out = ["", "## Targets", ""]
    if not results["targets"]:
        out.append("(no target could be evaluated in this run)")
    for t in results["targets"]:
        value = t["value"]
        if isinstance(value, float):
            value = f"{value:.3f}"
        extra = ""
        if "iqr" in t:
            extra = f" [IQR {t['iqr'][0]:.3f}–{t['iqr'][1]:.3f}, best {t['best']:.3f}]"
        if "baseline" in t:
            extra = f" MB vs {t['baseline']:.3f} MB"
        if t.get("note"):
            extra += f" ({t['note']})"
        out.append(f"- {verdict(t['pass'])} {t['what']}: {value}{extra}")
    if results["skipped"]:
        out += ["", "Skipped cases:"]
        out += [f"- {k}: {v}" for k, v in sorted(results["skipped"].items())]
    return out


if __name__ == "__main__":
    sys.exit(main())
