"""Conformance of the shipped recipes over timm's architecture families: docs/backbones.md.

For the smallest model of every timm architecture family (``timm.list_models()`` grouped by the
``timm.models`` module that registers it) and every shipped recipe, one cell records:

1. **resolves** — the recipe's targets resolve on the model, or surgeon refuses with its reason;
2. **meta** — ``surgeon.build_model(recipe, device="meta")`` builds and probes it on the meta
   device (what ``surgeon plan`` does);
3. **trains** — on CPU, at a tiny input size, two optimizer steps (the recipe's optimizer and
   peak learning rate) on random data change the model's eval output (backbone buffers such as
   BatchNorm statistics are restored first, so only the trained tensors can change it);
4. **merge** — the merged model computes what the unmerged one does (max |Δ| / max |y| < 1e-4);
5. **plain timm** — for folding methods (LoRA family, unfreeze), the merged state dict loads
   *strictly* into a plain timm model of the architecture, which then computes the same output.

A cell *works* when every check passes, *refuses* when surgeon declines with a reason (a
:class:`~surgeon.errors.UserError`: "no attention in ConvNeXt: ..."), and *fails* otherwise.
Backbones are random (``pretrained: false``); as in the tests, zero-initialised branch gates
(SwinV2's post-norm weights, ConvNeXt-style layer scales of 1e-6) get a pretrained-like value, so
a change inside a gated branch can show in the output.

Usage::

    python benchmarks/backbones.py                       # every family, every recipe: docs/backbones.md
    python benchmarks/backbones.py --families resnet,levit   # re-run these rows of the recorded table
    python benchmarks/backbones.py --families resnet,pvt_v2 --recipes lora,mosa_hier --no-write
    python benchmarks/backbones.py --json results.json --workers 2

The smallest model per family is cached in ``benchmarks/backbones_smallest.json`` (recomputed
for another timm version, or with ``--refresh``: it creates all ~1,400 models on the meta device).
"""
from __future__ import annotations

import argparse
import copy
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
import warnings
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import timm  # noqa: E402
import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
import torch.nn.functional as F  # noqa: E402

import surgeon  # noqa: E402
from surgeon.backbone import create_backbone, set_dropout  # noqa: E402
from surgeon.errors import UserError  # noqa: E402
from surgeon.methods.base import get_method  # noqa: E402
from surgeon.recipe import section  # noqa: E402
from surgeon.surgery import apply_surgery, merge  # noqa: E402
from surgeon.anatomy.conventions import FAMILIES  # noqa: E402
from surgeon.train.schedule import build_optimizer  # noqa: E402

CACHE = ROOT / "benchmarks" / "backbones_smallest.json"
RESULTS = ROOT / "benchmarks" / "backbones_results.json"  # the raw cells docs/backbones.md is rendered from
DOC = ROOT / "docs" / "backbones.md"
RECIPES = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
NUM_CLASSES = 5
BATCH = 2
SIZES = (28, 32, 42, 56, 64, 96, 112, 128, 160, 192, 224, 256, 299, 320, 384)  # 28, 42, 56, 112: patch 14
CHECKS = ("resolves", "meta", "trains", "merge", "plain_timm")


# --------------------------------------------------------------------------- the families

def family_models() -> dict[str, list[str]]:
    """timm family (the module that registers the model) -> its model names."""
    from timm.models import _registry

    families: dict[str, list[str]] = defaultdict(list)
    for name in timm.list_models():
        if _registry._model_entrypoints[name].__module__.startswith("timm."):  # not models others register
            families[_registry._model_to_module[name]].append(name)
    return dict(sorted(families.items()))


def _param_count(name: str) -> int | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                model = timm.create_model(name)
        except Exception:  # a model timm cannot build without weights or extras: skip it
            return None
    return sum(p.numel() for p in model.parameters())


def _smallest_of(names: list[str]) -> tuple[str, int]:
    sizes = [(n, _param_count(n)) for n in names]
    sizes = [(n, s) for n, s in sizes if s is not None]
    name, size = min(sizes, key=lambda ns: (ns[1], ns[0]))
    return name, size


def smallest_models(workers: int, refresh: bool = False) -> dict[str, dict]:
    """``{family: {"model", "params"}}``: the model with the fewest parameters per family (cached)."""
    if CACHE.is_file() and not refresh:
        cached = json.loads(CACHE.read_text())
        if cached.get("timm") == timm.__version__:
            return cached["families"]
    families = family_models()
    with mp.get_context("spawn").Pool(workers) as pool:
        found = pool.map(_smallest_of, list(families.values()))
    out = {f: {"model": n, "params": s} for f, (n, s) in zip(families, found)}
    CACHE.write_text(json.dumps({"timm": timm.__version__, "families": out}, indent=1) + "\n")
    return out


# --------------------------------------------------------------------------- tiny inputs

def _accepts_img_size(name: str) -> bool:
    try:
        with torch.device("meta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            timm.create_model(name, img_size=64)
        return True
    except Exception:  # TypeError for models without the argument; others cannot take 64 px
        return False


def tiny_kwargs(name: str) -> tuple[dict, int]:
    """``(model kwargs, input size)``: the smallest square input the model runs at (tried on the
    meta device), with ``img_size`` where the model takes it and the input size in its config."""
    takes = _accepts_img_size(name)
    default = timm.models.get_pretrained_cfg(name)
    default = getattr(default, "input_size", (3, 224, 224)) if default is not None else (3, 224, 224)
    sizes = sorted({s for s in SIZES if s <= max(default[1:])} | {max(default[1:])})
    last = None
    for size in sizes:
        kwargs = {"pretrained_cfg_overlay": {"input_size": [default[0], size, size]}}
        if takes:
            kwargs["img_size"] = size
        try:
            with torch.device("meta"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                model = timm.create_model(name, num_classes=NUM_CLASSES, **kwargs).eval()
                model(torch.empty(BATCH, default[0], size, size))
            return kwargs, size
        except Exception as exc:  # too small for the model: try the next size
            last = exc
    raise RuntimeError(f"{name} runs at none of the sizes {sizes} on the meta device: {last}")


# --------------------------------------------------------------------------- one cell

@dataclass
class Cell:
    """One (family, recipe) result."""

    recipe: str
    status: str = "fails"                  # works | refuses | fails
    reason: str = ""                       # the refusal's message, or what failed
    checks: dict = field(default_factory=dict)
    resolved: list = field(default_factory=list)
    extra_params: int | None = None
    seconds: float = 0.0


def load(recipe: str, model: str, kwargs: dict):
    return surgeon.load_recipe(ROOT / "recipes" / f"{recipe}.yaml", overrides={
        "model.name": model, "model.pretrained": False, "model.kwargs": kwargs, "model.num_classes": NUM_CLASSES})


def wake(model: nn.Module) -> None:
    """Pretrained-like values for branch gates a random init closes (tests/methods/families.py)."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 1 and "norm" in name and name.endswith("weight") and not p.any():
                p.fill_(1.0)
            elif p.dim() == 1 and (name.endswith("gamma") or name.rsplit(".", 1)[-1].startswith("ls")
                                   or "layer_scale" in name) and 0 < p.abs().max() <= 1e-4:
                p.fill_(0.5)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(((a - b).abs().max() / b.abs().max().clamp_min(1e-12)).detach())


def _first_line(exc: BaseException) -> str:
    if isinstance(exc, UserError):
        problems = getattr(exc, "problems", None)
        if problems:
            return "; ".join(sorted({p[2] for p in problems}))
        return exc.message
    return f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]


def check_cell(recipe_name: str, model_name: str, kwargs: dict, pristine: nn.Module, x: torch.Tensor,
               y: torch.Tensor, plain: nn.Module | None = None) -> Cell:
    """Run the checks of one (family, recipe) cell. ``plain`` is a spare copy of the pristine
    model for the strict-load check (every tensor of it is overwritten by that load, so one
    copy serves every cell of a family); None: a copy is made."""
    cell = Cell(recipe_name)
    start = time.perf_counter()
    try:
        _run_checks(cell, recipe_name, model_name, kwargs, pristine, x, y, plain)
    except UserError as exc:
        cell.status, cell.reason = ("refuses" if not cell.checks else "fails"), _first_line(exc)
    except Exception as exc:  # a bug: the table reports it
        cell.status, cell.reason = "fails", _first_line(exc)
        cell.checks["traceback"] = traceback.format_exc(limit=4)[-1500:]
    cell.seconds = round(time.perf_counter() - start, 2)
    return cell


def _run_checks(cell: Cell, recipe_name: str, model_name: str, kwargs: dict, pristine: nn.Module,
                x: torch.Tensor, y: torch.Tensor, plain: nn.Module | None) -> None:
    recipe = load(recipe_name, model_name, kwargs)
    # 1-2: resolve and build on meta (what `surgeon plan` does); a UserError here is a refusal
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        meta = surgeon.build_model(recipe, weights=False, device="meta")
    plan = meta.surgeon_plan
    cell.extra_params = plan.extra_params
    cell.resolved = [m.get("resolved") or f"{m['count']} × {m['selector']}" for m in plan.matches]
    cell.checks["resolves"] = cell.checks["meta"] = True
    del meta

    # 3: the same surgery on a CPU copy of the family's backbone (build_model = create + surgery)
    model = copy.deepcopy(pristine)
    set_dropout(model, recipe.model.dropout)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.surgeon_plan = apply_surgery(model, recipe.surgery, seed=recipe.train.seed, locate=recipe.where)
    model.eval()
    with torch.no_grad():
        before = model(x)
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    optimizer = build_optimizer(model, recipe.train)
    model.train()
    for _ in range(2):
        optimizer.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(x), y)
        if not torch.isfinite(loss):
            raise RuntimeError(f"non-finite training loss {loss.item()}")
        loss.backward()
        optimizer.step()
    with torch.no_grad():  # only the trained tensors may change the output: restore BN statistics etc.
        for n, b in model.named_buffers():
            if n in buffers:
                b.copy_(buffers[n])
    model.eval()
    with torch.no_grad():
        after = model(x)
    cell.checks["trains"] = bool(not torch.equal(after, before) and torch.isfinite(after).all())
    if not cell.checks["trains"]:
        cell.reason = "two training steps left the output unchanged"
        return

    # 4: merged == unmerged
    with torch.no_grad():
        merge(model, recipe.eval.merge_mode)
        merged = model(x)
    cell.checks["merge"] = rel(merged, after) < 1e-4
    if not cell.checks["merge"]:
        cell.reason = f"merged output differs by {rel(merged, after):.2e} (relative)"
        return

    # 5: folding methods leave plain timm: strict load into the architecture, same output
    if all(get_method(rule.method).folds for rule in recipe.surgery):
        plain = (plain if plain is not None else copy.deepcopy(pristine)).eval()
        plain.load_state_dict(model.state_dict(), strict=True)  # overwrites every tensor of `plain`
        with torch.no_grad():
            cell.checks["plain_timm"] = rel(plain(x), merged) < 1e-5
        if not cell.checks["plain_timm"]:
            cell.reason = "plain timm with the merged weights computes another output"
            return
    cell.status = "works"


# --------------------------------------------------------------------------- one family

def check_family(args: tuple[str, str, list[str]]) -> dict:
    family, model_name, recipes = args
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")  # timm's and surgeon's notices about random weights, dropout roles
    start, cpu = time.perf_counter(), time.process_time()
    out = {"family": family, "model": model_name, "cells": []}
    try:
        kwargs, size = tiny_kwargs(model_name)
        out["input"] = size
        torch.manual_seed(0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pristine = create_backbone(section("model", {"name": model_name, "pretrained": False, "kwargs": kwargs,
                                                         "num_classes": NUM_CLASSES}), weights=False)
        wake(pristine)
        out["params"] = sum(p.numel() for p in pristine.parameters())
        gen = torch.Generator().manual_seed(0)
        x = torch.randn(BATCH, 3, size, size, generator=gen)
        y = torch.randint(NUM_CLASSES, (BATCH,), generator=gen)
        plain = copy.deepcopy(pristine)
        for recipe in recipes:
            out["cells"].append(asdict(check_cell(recipe, model_name, kwargs, pristine, x, y, plain)))
    except Exception as exc:  # the backbone itself could not be set up
        out["error"] = _first_line(exc)
        out["cells"] += [asdict(Cell(r, "fails", f"setup: {out['error']}")) for r in recipes
                         if r not in {c["recipe"] for c in out["cells"]}]
    out["seconds"] = round(time.perf_counter() - start, 1)
    out["cpu_seconds"] = round(time.process_time() - cpu, 1)  # this process's CPU time (the machine is shared)
    print(f"{family:28s} {model_name:36s} {out['seconds']:7.1f}s  "
          + " ".join(f"{c['recipe']}:{c['status'][0]}" for c in out["cells"]), flush=True)
    return out


# --------------------------------------------------------------------------- the document

SYMBOL = {"works": "✓", "refuses": "–", "fails": "✗"}


def totals(results: list[dict]) -> Counter:
    return Counter(c["status"] for r in results for c in r["cells"])


def family_totals(results: list[dict]) -> Counter:
    """Per family: works (every recipe works or refuses with a reason, at least one works),
    refuses (every recipe refuses with a reason), fails (some recipe fails)."""
    out = Counter()
    for r in results:
        statuses = {c["status"] for c in r["cells"]}
        out["fails" if "fails" in statuses else "works" if "works" in statuses else "refuses"] += 1
    return out


def render(results: list[dict], recipes: list[str], seconds: float, workers: int, updated: list[str] = ()) -> str:
    """docs/backbones.md from the results: totals, the table, refusals, failures, what resolved.
    ``seconds``: the whole table's wall time; ``updated``: families re-run since (``--families``)."""
    t, ft = totals(results), family_totals(results)
    cells = sum(t.values())
    lines = [
        "# Backbones: the shipped recipes on every timm architecture family",
        "",
        "Written by `python benchmarks/backbones.py` (do not edit by hand). For the smallest model of every",
        f"architecture family timm {timm.__version__} registers ({len(results)} families: `timm.list_models()` "
        "grouped by the `timm.models` module of each model) and every shipped recipe, a cell is **✓ works** when",
        "all of these hold, **– refuses** when surgeon declines with a reason (below), **✗ fails** otherwise:",
        "",
        "1. *resolves*: the recipe's targets resolve on the model (semantic targets such as `{attention: [q, v]}`",
        "   through the family conventions and the structural fallback, `surgeon/anatomy/structure.py`);",
        "2. *meta*: `surgeon.build_model(recipe, device=\"meta\")` builds and probes it (what `surgeon plan` does);",
        "3. *trains*: on CPU at a tiny input size (column `px`), two steps of the recipe's optimizer at its peak",
        "   learning rate on a random batch of 2 change the eval output (BatchNorm statistics restored first);",
        "4. *merge*: the merged model computes what the unmerged one does (relative max difference < 1e-4);",
        "5. *plain timm*: for the folding methods (LoRA family, BitFit, full) the merged state dict loads with",
        "   `strict=True` into a plain timm model, which computes the same output (adapters merge into dense",
        "   adapter layers by design: not applicable).",
        "",
        "Backbones are randomly initialised; zero-initialised branch gates get a pretrained-like value, as",
        "in the tests. Models are timm's own, unchanged, except the input size (`img_size` where the model",
        "takes one).",
        "",
        "## Totals",
        "",
        f"- cells: **{t['works']} work, {t['refuses']} refuse with a reason, {t['fails']} fail** "
        f"({cells} = {len(results)} families × {len(recipes)} recipes)",
        f"- families: **{ft['works']} work** (every recipe works or refuses with a reason, at least one works), "
        f"**{ft['refuses']} refuse everything with a reason**, **{ft['fails']} have a failing cell**",
        f"- run time: {seconds / 60:.1f} min wall for the whole table on {workers} worker process(es), one thread "
        f"each (`python benchmarks/backbones.py --workers {workers}`), on a shared 2-core machine; the families "
        f"took {sum(r.get('cpu_seconds', 0) for r in results) / 60:.1f} CPU-minutes in all (the five largest: "
        + ", ".join(f"`{r['model']}` {r.get('cpu_seconds', 0):.0f} s" for r in
                    sorted(results, key=lambda r: -r.get("cpu_seconds", 0))[:5]) + ")"
        + (f"; re-run since for {', '.join(f'`{f}`' for f in updated)}" if updated else ""),
        "",
        "## Table",
        "",
    ]
    short = {r: r.replace("sparse_", "s_").replace("adaptformer", "adaptf").replace("mosa_", "mosa_")
             for r in recipes}
    lines.append("| family | model | params | px | " + " | ".join(short[r] for r in recipes) + " |")
    lines.append("|---|---|---:|---:|" + "---|" * len(recipes))
    for r in results:
        by = {c["recipe"]: c for c in r["cells"]}
        name = FAMILIES[r["family"]].name if r["family"] in FAMILIES else r["family"]
        row = [f"{name} (`{r['family']}`)", f"`{r['model']}`", f"{r.get('params', 0) / 1e6:.1f}M",
               str(r.get("input", "—"))]
        row += [SYMBOL[by[rc]["status"]] if rc in by else " " for rc in recipes]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "## Refusals and their reasons", "",
              "One line per family and reason; the recipes it applies to in brackets.", ""]
    for r in results:
        reasons: dict[str, list[str]] = defaultdict(list)
        for c in r["cells"]:
            if c["status"] == "refuses":
                reasons[c["reason"]].append(c["recipe"])
        for reason, which in reasons.items():
            lines.append(f"- **{r['family']}** ({', '.join(which)}): {reason}")
    failing = [(r, c) for r in results for c in r["cells"] if c["status"] == "fails"]
    lines += ["", "## Failures", ""]
    if failing:
        lines += [f"- **{r['family']}** `{r['model']}` {c['recipe']}: {c['reason']}" for r, c in failing]
    else:
        lines.append("None.")
    lines += ["", "## What the semantic targets resolved to", "",
              "Per family, the modules of `lora` (`{attention: [q, v]}`), `mlae` (`{attention: qkv}`) and "
              "`mosa_hier` (`{mlp: block}`).", ""]
    for r in results:
        by = {c["recipe"]: c for c in r["cells"]}
        parts = [f"{rc}: {'; '.join(by[rc]['resolved'])}" for rc in ("lora", "mlae", "mosa_hier")
                 if rc in by and by[rc]["resolved"]]
        if parts:
            lines.append(f"- **{r['family']}** — " + " · ".join(parts))
    return "\n".join(lines) + "\n"


def dump_record(record: dict) -> str:
    """The recorded table as JSON, one family per line (diffs show which rows changed)."""
    head = {k: v for k, v in record.items() if k != "results"}
    rows = ",\n".join(json.dumps(r, separators=(",", ":")) for r in record["results"])
    return json.dumps(head)[:-1] + ', "results": [\n' + rows + "\n]}\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--families", help="comma-separated family keys (default: all)")
    parser.add_argument("--recipes", help="comma-separated recipe names (default: all shipped)")
    parser.add_argument("--workers", type=int, default=2, help="processes, one thread each (default 2)")
    parser.add_argument("--json", type=Path, help="also write the raw results here")
    parser.add_argument("--refresh", action="store_true", help="recompute the smallest model per family")
    parser.add_argument("--no-write", action="store_true",
                        help="do not write docs/backbones.md and benchmarks/backbones_results.json")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.filterwarnings("ignore")

    start = time.perf_counter()
    smallest = smallest_models(args.workers, args.refresh)
    families = args.families.split(",") if args.families else list(smallest)
    unknown = [f for f in families if f not in smallest]
    if unknown:
        parser.error(f"unknown families {unknown}; known: {', '.join(smallest)}")
    recipes = args.recipes.split(",") if args.recipes else RECIPES
    # Largest first, so the long ones start early and the pool's tail is short.
    jobs = sorted(((f, smallest[f]["model"], recipes) for f in families), key=lambda j: -smallest[j[0]]["params"])
    if args.workers > 1:
        with mp.get_context("spawn").Pool(args.workers, maxtasksperchild=4) as pool:
            results = list(pool.imap_unordered(check_family, jobs))
    else:
        results = [check_family(job) for job in jobs]
    results.sort(key=lambda r: r["family"])
    seconds = time.perf_counter() - start
    t = totals(results)
    print(f"\n{t['works']} work, {t['refuses']} refuse, {t['fails']} fail; {seconds / 60:.1f} min")
    if args.json:
        args.json.write_text(json.dumps({"timm": timm.__version__, "seconds": seconds, "results": results}, indent=1))
    if args.no_write:
        return 1 if t["fails"] else 0
    whole = not args.families and not args.recipes
    if whole:
        record = {"timm": timm.__version__, "seconds": round(seconds, 1), "workers": args.workers, "updated": [],
                  "recipes": recipes, "results": results}
    elif args.recipes or not RESULTS.is_file():
        print("a partial run (--recipes, or no full run recorded yet) does not rewrite docs/backbones.md")
        return 1 if t["fails"] else 0
    else:  # --families: replace those rows of the recorded full run and re-render
        record = json.loads(RESULTS.read_text())
        if record.get("timm") != timm.__version__:
            parser.error(f"{RESULTS.name} was recorded with timm {record.get('timm')}: run the whole table")
        rows = {r["family"]: r for r in record["results"]}
        rows.update({r["family"]: r for r in results})
        record["results"] = [rows[f] for f in sorted(rows)]
        record["updated"] = sorted(set(record["updated"]) | set(families))
    RESULTS.write_text(dump_record(record))
    DOC.write_text(render(record["results"], record["recipes"], record["seconds"], record["workers"], record["updated"]))
    print(f"wrote {DOC.relative_to(ROOT)} and {RESULTS.relative_to(ROOT)}")
    t = totals(record["results"])
    return 1 if t["fails"] else 0


if __name__ == "__main__":
    sys.exit(main())
