"""One run's report: ``RUN/report.md``, a self-contained ``RUN/report.html`` and ``RUN/plots/*.png``.

Sections: summary, recipe (model, data + provenance, surgery rules in words, training),
parameters (the ``plan`` tables), results (curves, confusion matrix), merge check, timings,
numerical health, expert similarity (when ``analysis.json`` has it), and what could not be read.
"""
from __future__ import annotations

import json
import math
from datetime import datetime
from pathlib import Path

import numpy as np

from surgeon.errors import UserError
from surgeon.io import write_text
from surgeon.methods import registry
from surgeon.recipe import rule as typed_rule
from surgeon.recipe.schema import valid_at

from . import plots
from .document import Block, Bullets, Figure, Heading, Paragraph, to_markdown
from .html import to_html
from .runs import RunData, _is_number, load_run_data
from .tables import Table, count, duration, index_ranges, parameter_tables, percent

#: A merge is exact when the merged model's outputs match the unmerged ones to this relative error.
MERGE_REL_TOL = 1e-5
#: summary.json keys the report shows elsewhere (or that repeat metrics.jsonl); the rest is listed
#: under "Other values" so nothing the trainer records is hidden.
_SHOWN_SUMMARY_KEYS = {"best_val_top1", "best_step", "test_top1", "train_seconds", "img_per_s", "steps", "status",
                       "recipe", "model", "data", "num_classes", "final_split", "final_top1", "inference",
                       "nonfinite_steps", "wall_seconds", "precision", "device", "lr", "epochs", "steps_per_epoch",
                       "train_images", "val_images", "test_images"}
_SHOWN_SUMMARY_SECTIONS = {"params", "timings", "merge", "merges", "class_names", "per_class", "environment"}


# ---- recipe in words -------------------------------------------------------------------

def _fmt(x) -> str:
    return f"{x:g}" if isinstance(x, float) else str(x)


def describe_rule(rule: dict, merge_mode: str = "average") -> str:
    """One surgery rule of a run's recipe as a sentence, e.g. "`blocks.*.mlp`: parallel bottleneck
    adapter (...)": its method's description (:func:`surgeon.methods.registry.describe_rule`),
    with the schema's defaults for what the mapping leaves out. A rule that is not valid (a run
    written by another version) is named as such instead."""
    if isinstance(rule, dict) and valid_at(("surgery", 0), rule):
        return registry.describe_rule(typed_rule(rule), merge_mode)
    target = rule.get("target", "?") if isinstance(rule, dict) else "?"
    selector = ", ".join(f"`{t}`" for t in target) if isinstance(target, (list, tuple)) else f"`{target}`"
    return f"{selector}: no method (malformed rule)"


def training_bullets(recipe: dict, run: RunData) -> list[str]:
    """Optimisation, regularisers and evaluation settings as short lines."""
    t = recipe.get("train") or {}
    items = []
    if t:
        steps = f" (capped at {t['max_steps']} steps)" if t.get("max_steps") else ""
        batch = f"batch {t.get('batch_size', '?')}" + (f" in {t['grad_accum']} micro-batches"
                                                       if (t.get("grad_accum") or 1) > 1 else "")
        optimizer = {"adamw": "AdamW", "sgd": "SGD"}.get(t.get("optimizer", "adamw"), str(t.get("optimizer")))
        items.append(f"{t.get('epochs', '?')} epoch(s){steps}, {batch}, {optimizer}")
        base = t.get("base_lr")
        if _is_number(base) and t.get("lr_scaling") == "linear" and _is_number(t.get("batch_size")):
            lr = f"base_lr {base:g} × {t['batch_size']}/256 = {base * t['batch_size'] / 256:.3g} (linear scaling)"
        else:
            lr = f"lr {base:g}" if _is_number(base) else "lr ?"
        peak = run.summary_number("lr")
        if peak is None and _is_number(run.start.get("lr")):
            peak = float(run.start["lr"])
        if peak is not None and not lr.endswith(f"{peak:.3g} (linear scaling)") and lr != f"lr {peak:g}":
            lr += f" (peak lr as run: {peak:.3g})"
        warm = (f"warm-up {t['warmup_steps']} step(s)" if t.get("warmup_steps") is not None
                else f"warm-up {_fmt(t.get('warmup_epochs', 0))} epoch(s)")
        items.append(f"{lr}, {t.get('schedule', 'cosine')} schedule, {warm}, min lr {_fmt(t.get('min_lr', 0.0))}, "
                     f"weight decay {_fmt(t.get('weight_decay', '?'))}")
        used = run.summary.get("precision") or run.start.get("precision")
        extra = [f"precision {t.get('precision', 'auto')}" + (f" (ran as {used})" if used and used != t.get("precision")
                                                              else "")]
        if t.get("grad_clip"):
            extra.append(f"gradient clipping at {_fmt(t['grad_clip'])}")
        extra.append(f"seed {t.get('seed', run.start.get('seed', '?'))}")
        items.append(", ".join(extra))
    reg = recipe.get("regularizers") or {}
    c, f = reg.get("consistency") or {}, reg.get("feature_alignment") or {}
    regs = []
    if c.get("weight"):
        regs.append(f"consistency α = {_fmt(c['weight'])} (symmetric KL between two stochastic passes"
                    + (", batched)" if c.get("batched") else ")"))
    if f.get("weight"):
        regs.append(f"feature alignment β = {_fmt(f['weight'])} over blocks `{f.get('blocks', ':')}`")
    items.append("regularisers: " + ("; ".join(regs) if regs else "none"))
    e = recipe.get("eval") or {}
    inference = e.get("inference", run.inference)
    if inference == "fixed":
        inference += f" (expert {e.get('expert', 0)})"
    items.append(f"evaluation: `{inference}` inference, experts merged by `{e.get('merge_mode', 'average')}`")
    return items


# ---- sections --------------------------------------------------------------------------

def _test_text(run: RunData) -> str:
    if run.test_top1 is not None:
        return percent(run.test_top1)
    return "— (no test split)" if run.finished else "— (not measured yet)"


def _summary_table(run: RunData) -> Table:
    best, step = run.best_val
    rows = [["best val top-1 (%)", percent(best) + (f" at step {step}" if step is not None else "")],
            ["test top-1 (%)", _test_text(run)],
            ["Params (M)", "—" if run.params_m is None else f"{run.params_m:.2f}"],
            ["train time", duration(run.train_seconds)],
            ["throughput (img/s)", "—" if run.img_per_s is None else f"{run.img_per_s:.1f}"]]
    return Table(["", "value"], rows, ["l", "r"])


def _recipe_blocks(run: RunData) -> list[Block]:
    r = run.recipe
    model = r.get("model") or {}
    k = model.get("num_classes") or run.start.get("num_classes")
    kwargs = model.get("kwargs") or {}
    kwargs_text = ", ".join(f"{key}={value}" for key, value in kwargs.items()) if isinstance(kwargs, dict) else kwargs
    model_line = (f"**Model:** `{run.model}`, weights `{model.get('pretrained', '?')}`"
                  + (f", `{kwargs_text}`" if kwargs else "") + (f", {k} classes" if k else ""))
    data = r.get("data") or {}
    data_bits = [f"**Data:** `{run.data_source}`"]
    for key, label in (("protocol", "protocol"), ("image_size", "image size"), ("augment", "augmentation")):
        if data.get(key) is not None:
            data_bits.append(f"{label} {data[key]}")
    sizes = [(run.summary_number(f"{split}_images"), split) for split in ("train", "val", "test")]
    if any(n for n, _ in sizes):
        data_bits.append(" / ".join(f"{int(n):,} {split}" for n, split in sizes if n) + " images")
    blocks: list[Block] = [Heading("Recipe"), Paragraph(model_line), Paragraph(", ".join(data_bits))]
    provenance = run.start.get("provenance")
    if provenance:
        blocks.append(Paragraph(str(provenance)))
    surgery = r.get("surgery")
    merge_mode = (r.get("eval") or {}).get("merge_mode", "average")
    if surgery:
        blocks += [Paragraph("**Surgery** (rules applied in order):"),
                   Bullets([describe_rule(rule, merge_mode) for rule in surgery if isinstance(rule, dict)])]
    elif surgery is not None:
        blocks.append(Paragraph("**Surgery:** none — linear probing, only the classifier head trains."))
    blocks += [Paragraph("**Training:**"), Bullets(training_bullets(r, run))]
    return blocks


def _results_blocks(run: RunData, plots_dir: Path) -> list[Block]:
    blocks: list[Block] = [Heading("Results")]
    best, step = run.best_val
    vals = [e for e in run.evals if e.get("split") == "val" and _is_number(e.get("top1"))]
    rows = [["best val top-1 (%)", percent(best), "—" if step is None else str(step)]]
    if vals:
        rows.append(["last val top-1 (%)", percent(run.pct(vals[-1]["top1"])), str(vals[-1].get("step", "—"))])
    tests = [e for e in run.evals if e.get("split") == "test" and _is_number(e.get("top1"))]
    rows.append(["test top-1 (%)", _test_text(run), str(tests[-1].get("step", "—")) if tests else "—"])
    notes = [f"Inference: `{run.inference}`; {len(vals)} validation evaluation(s)."]
    blocks.append(Table(["metric", "value", "step"], rows, ["l", "r", "r"], notes=notes))
    if run.later_evals:
        later = [[str(e.get("split", "?")), f"`{e.get('inference', '?')}`", percent(run.pct(e.get("top1"))),
                  "—" if not _is_number(e.get("loss")) else f"{e['loss']:.4f}"] for e in run.later_evals]
        blocks.append(Table(["split", "inference", "top-1 (%)", "loss"], later, ["l", "l", "r", "r"],
                            title="Evaluations after training (`surgeon eval`)"))
    curves = plots.training_curves(run, plots_dir / "training_curves.png")
    if curves:
        blocks.append(Figure(curves, "Training loss, validation top-1 and learning rate per optimizer step."))
    else:
        blocks.append(Paragraph("No training or evaluation events were logged, so there are no curves."))

    split = "test" if "test" in run.predictions else ("val" if "val" in run.predictions else None)
    if split is None and run.predictions:
        split = sorted(run.predictions)[0]
    if split:
        pred = run.predictions[split]
        names = [str(n) for n in (pred.get("class_names") or [])]
        cm_path = plots.confusion_matrix(pred["labels"], pred["preds"], names,
                                         plots_dir / f"confusion_{split}.png", title=f"{run.name} — {split}")
        blocks.append(Figure(cm_path, f"Confusion matrix on {split} ({len(pred['labels'])} images), "
                                      "rows normalised to the true class."))
        worst = _worst_classes(pred["labels"], pred["preds"], names)
        if worst:
            blocks.append(Paragraph(f"Lowest per-class top-1 on {split}: " + ", ".join(worst) + "."))
    return blocks


def _worst_classes(labels: list[int], preds: list[int], names: list[str], n: int = 5) -> list[str]:
    k = max(len(names), max(labels + preds, default=-1) + 1)
    if k <= 2:
        return []  # with two classes the confusion matrix already says it all
    cm = plots.confusion_counts(labels, preds, k)
    support = cm.sum(axis=1)
    # Only classes with mistakes: a list of perfect classes says nothing.
    acc = sorted((cm[i, i] / support[i], i) for i in range(k) if support[i] > 0 and cm[i, i] < support[i])
    label = (lambda i: names[i] if i < len(names) else str(i))
    return [f"`{label(i)}` {100 * a:.1f}% (of {support[i]})" for a, i in acc[:n]]


def _merged_folders(run: RunData) -> list[tuple[Path, dict]]:
    """The run's merged folders (``merged/``, ``merged-<mode>/``) with their ``surgeon.json``."""
    found = []
    for folder in sorted(run.path.glob("merged*")):
        info = folder / "surgeon.json"
        if folder.is_dir() and info.is_file():
            try:
                data = json.loads(info.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                run.problems.append(f"{folder.name}/surgeon.json: unreadable")
                continue
            found.append((folder, data if isinstance(data, dict) else {}))
    return found


def _merge_blocks(run: RunData) -> list[Block]:
    blocks: list[Block] = [Heading("Merge check")]
    if not run.merges:
        why = ("the run did not reach its merge step" if not run.finished
               else "no merge was recorded (`train.merge: false`, or run `surgeon merge RUN`)")
        blocks.append(Paragraph(f"Not available: {why}."))
        return blocks
    rows = []
    for m in run.merges:
        rel, ab = m.get("max_rel_diff"), m.get("max_abs_diff")
        verdict = "—" if not _is_number(rel) else ("**pass**" if rel <= MERGE_REL_TOL else "**FAIL**")
        folder = f"`{Path(str(m['path'])).name}/`" if m.get("path") else "—"
        rows.append([str(m.get("mode", "?")), folder, str(m.get("format", "—")),
                     "—" if not _is_number(ab) else f"{ab:.2e}", "—" if not _is_number(rel) else f"{rel:.2e}", verdict])
    blocks.append(Table(["mode", "folder", "format", "max abs diff", "max rel diff", f"exact (rel ≤ {MERGE_REL_TOL:g})"],
                        rows, ["l", "l", "l", "r", "r", "l"],
                        notes=["Largest difference between the merged and the unmerged model's outputs on a "
                               "fixed batch."]))
    own = str((run.recipe.get("eval") or {}).get("merge_mode", "average"))
    root = run.path.resolve()
    lines = []
    for folder, info in _merged_folders(run):
        mode, fmt = str(info.get("merge_mode", "average")), str(info.get("format", ""))
        arg = "" if folder.name == "merged" else f", merge_mode='{mode}'"
        how = {"timm": f"a plain timm model: `timm.create_model('local-dir:{root / folder.name}', pretrained=True)`",
               "dense-adapter": f"a dense adapter: `surgeon.load_run('{root}'{arg})`"}.get(fmt, "")
        line = f"`{folder.name}/`: the `{mode}` merge" + (f", {how}" if how else "")
        if folder.name == "merged" and mode != own:
            line += (f". **Warning: it is not the `{own}` merge the figures above were measured with** (an earlier "
                     f"surgeon kept every mode in `merged/`); `surgeon merge {root}` rewrites it")
        elif mode != own:
            line += (f". The figures above are the `{own}` merge's; this one's top-1: "
                     f"`surgeon eval {root} --merge-mode {mode}`")
        lines.append(line + ".")
    if lines:
        blocks += [Paragraph("Merged models in the run directory:"), Bullets(lines)]
    return blocks


def _timing_blocks(run: RunData) -> list[Block]:
    rows = []
    if run.start.get("time"):
        rows.append(["started", str(run.starts[0].get("time"))])
    if run.start.get("device"):
        precision = run.summary.get("precision") or run.start.get("precision")
        rows.append(["device", str(run.start["device"]) + (f", {precision}" if precision else "")])
    seconds = run.train_seconds
    label = "train time" if run.finished else "train time until the last logged step"
    rows.append([label, duration(seconds)])
    steps = run.steps
    planned = run.total_steps
    rows.append(["optimizer steps", count(steps) + (f" of {planned:,}" if planned and planned != steps else "")])
    if seconds and steps:
        rows.append(["seconds per step", f"{seconds / steps:.3f}"])
    if run.img_per_s is not None:
        rows.append(["throughput (img/s)", f"{run.img_per_s:.1f}"])
    for label, value in (("setup time", run.summary_number("timings", "setup_seconds")),
                         ("merge time", run.summary_number("timings", "merge_seconds")),
                         ("wall time (incl. evaluation)", run.summary_number("wall_seconds"))):
        if value is not None:
            rows.append([label, duration(value)])
    rates = [e["img_per_s"] for e in run.train if _is_number(e.get("img_per_s"))]
    if rates:
        rows.append(["logged train img/s (min / median / max)",
                     f"{min(rates):.1f} / {float(np.median(rates)):.1f} / {max(rates):.1f}"])
    if len(run.starts) > 1:
        rows.append(["resumed", f"{len(run.starts) - 1} time(s)"])
    return [Heading("Timings and throughput"), Table(["", "value"], rows, ["l", "r"])]


def _environment_blocks(run: RunData) -> list[Block]:
    """The reproducibility record of ``summary.json`` (``environment``), when there is one."""
    env = run.summary.get("environment")
    if not isinstance(env, dict):
        return []
    versions = ", ".join(f"{k} {env[k]}" for k in ("surgeon", "torch", "timm", "torchvision", "numpy", "python")
                         if env.get(k))
    rows = [["versions", versions]]
    if env.get("device"):
        rows.append(["device", f"{env['device']} ({env.get('device_name') or '?'}), {env.get('threads', '?')} torch "
                               f"thread(s) of {env.get('cpus', '?')} CPUs"])
    if env.get("command"):
        rows.append(["command", f"`{env['command']}`"])
    recipe = env.get("recipe") if isinstance(env.get("recipe"), dict) else None
    if recipe:
        git = recipe.get("git") if isinstance(recipe.get("git"), dict) else None
        where = f"`{recipe.get('path')}`"
        if git and git.get("commit"):
            where += (f" at commit `{str(git['commit'])[:12]}`" + (" (work tree dirty)" if git.get("dirty") else "")
                      + (f", file {git['file']}" if git.get("file") and git["file"] != "committed" else ""))
        elif git is None:
            where += " (not in a git work tree)"
        rows.append(["recipe", where])
    return [Heading("Environment", 3), Table(["", "value"], rows, ["l", "l"])]


def _health_blocks(run: RunData) -> list[Block]:
    blocks: list[Block] = [Heading("Non-finite losses")]
    if not run.nonfinite:
        blocks.append(Paragraph("None: every logged step had a finite loss."))
        return blocks
    steps = sorted({int(e["step"]) for e in run.nonfinite if _is_number(e.get("step"))})
    counts = [e["count"] for e in run.nonfinite if _is_number(e.get("count"))]
    text = (f"**{len(steps)}** optimizer step(s) had a non-finite loss and were skipped: steps "
            f"{index_ranges(steps[:50])}" + (" …" if len(steps) > 50 else "") + ".")
    # `count` is the trainer's own tally; shown as logged since it may be per step or running.
    if counts and max(counts) != len(steps):
        text += f" Largest `count` logged by the trainer: {max(counts):g}."
    blocks.append(Paragraph(text))
    return blocks


def block_of(module: str) -> str | None:
    """The block a module belongs to: its name up to its last numeric part (``blocks.3.attn.qkv``
    → ``blocks.3``, ``layers.0.blocks.1.mlp`` → ``layers.0.blocks.1``); None without one."""
    parts = module.split(".")
    last = max((i for i, part in enumerate(parts) if part.isdigit()), default=None)
    return None if last is None else ".".join(parts[:last + 1])


def _matrices_title(count: int, modules: list[str]) -> str:
    """``mean over 12 blocks`` / ``mean of 24 matrices over 12 blocks`` (q, v slices: one
    matrix each), counting the blocks the modules are in; layers when they name no block."""
    blocks = {block_of(m) for m in modules}
    if modules and None not in blocks:
        n = len(blocks)
        return f"mean over {n} block{'s' * (n != 1)}" if n == count else f"mean of {count} matrices over {n} blocks"
    n = len(set(modules)) or count
    return f"mean over {n} layer{'s' * (n != 1)}" if n == count else f"mean of {count} matrices over {n} layers"


def expert_similarity(analysis: dict | None) -> tuple[float | None, list[tuple[str, float]], np.ndarray | None, str,
                                                     list[str]]:
    """Normalise ``analysis.json``'s ``expert_similarity``.

    ``per_layer`` may be numbers or objects ``{"module"|"layer"|"name": ..., "mean"|"similarity": x}``;
    ``matrix`` one experts × experts matrix or one per layer (shown as their mean, titled with
    the number of blocks they cover: :func:`block_of`).

    Returns:
        (mean, [(layer label, value)], matrix or None, matrix title, problems)
    """
    sim = (analysis or {}).get("expert_similarity")
    if not isinstance(sim, dict):
        return None, [], None, "", []
    problems = []
    per_layer = []
    for i, item in enumerate(sim.get("per_layer") or []):
        if _is_number(item):
            per_layer.append((str(i), float(item)))
        elif isinstance(item, dict):
            label = next((str(item[k]) for k in ("module", "layer", "name", "block") if k in item), str(i))
            value = next((item[k] for k in ("mean", "similarity", "value") if _is_number(item.get(k))), None)
            if value is not None:
                per_layer.append((label, float(value)))
    mean = sim.get("mean")
    if not _is_number(mean):
        mean = float(np.mean([v for _, v in per_layer])) if per_layer else None
    matrix, title = None, "expert similarity"
    raw = sim.get("matrix")
    if raw is not None:
        try:
            arr = np.asarray(raw, dtype=float)
        except (ValueError, TypeError):
            arr = None
        if arr is not None and arr.ndim == 3 and arr.shape[1] == arr.shape[2] and arr.shape[0] > 0:
            keys = sim.get("matrix_keys")
            modules = [label for label, _ in per_layer if not label.isdigit()]
            if isinstance(keys, list) and len(keys) == arr.shape[0]:
                # a key is a module or module.<slice>: the module is the per-layer label it starts with
                modules = [next((m for m in modules if str(k) == m or str(k).startswith(m + ".")), str(k))
                           for k in keys]
            matrix, title = arr.mean(axis=0), _matrices_title(arr.shape[0], modules)
        elif arr is not None and arr.ndim == 2 and arr.shape[0] == arr.shape[1] and arr.size:
            matrix = arr
        else:
            problems.append("analysis.json: expert_similarity.matrix is not a square matrix; not plotted")
    return mean, per_layer, matrix, title, problems


#: What the similarity compares, by the kind of layer (``per_layer[].kind`` in analysis.json),
#: and what to keep in mind reading it.
_SIMILARITY_TEXT = {
    "low-rank": ("the experts' flattened weight updates ΔW_j (LoRA family: the rank-k terms of BA; MLAE paper "
                 "Figs. 4-5)", ""),
    "adapter": ("the MoSA experts' deltas from the dense init, D ⊙ M_i per adapter (with their own bias deltas)",
                "The masks M_i are disjoint, so the weight parts of two experts share no entry: a similarity "
                "above 0 comes from their biases and, under `decay: toward_zero`, from the decayed init on the "
                "entries an expert holds but does not train. An expert that never trained scores 0, itself "
                "included."),
}


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("s" if n != 1 else "")


def _similarity_blocks(run: RunData, plots_dir: Path) -> list[Block]:
    mean, per_layer, matrix, title, problems = expert_similarity(run.analysis)
    run.problems += problems
    if mean is None and not per_layer and matrix is None:
        return []
    items = ((run.analysis or {}).get("expert_similarity") or {}).get("per_layer") or []
    kinds = [k for k in _SIMILARITY_TEXT if any(isinstance(i, dict) and i.get("kind") == k for i in items)]
    kinds = kinds or ["low-rank"]  # analysis.json of an older surgeon: LoRA-family layers only
    what = " and of ".join(_SIMILARITY_TEXT[k][0] for k in kinds)
    notes = " ".join(_SIMILARITY_TEXT[k][1] for k in kinds if _SIMILARITY_TEXT[k][1])
    modules = [label for label, _ in per_layer]
    blocks = {block_of(m) for m in modules}
    over = (f"the {_plural(len(modules), 'adapted module')} in {_plural(len(blocks), 'block')}"
            if modules and None not in blocks else "layers")
    text = f"Mean pairwise cosine similarity of {what}; lower means more diverse experts."
    if mean is not None:
        text += f" Mean over {over}: **{mean:.4f}**."
    blocks_out: list[Block] = [Heading("Expert similarity"), Paragraph(text + (f" {notes}" if notes else ""))]
    if per_layer and len(per_layer) <= 48:
        blocks_out.append(Table(["layer", "mean cosine similarity"], [[f"`{a}`", f"{b:.4f}"] for a, b in per_layer],
                                ["l", "r"]))
    path = plots.similarity_plot(per_layer, matrix, plots_dir / "expert_similarity.png",
                                 title=f"{run.name}: expert similarity", matrix_title=title)
    if path:
        blocks_out.append(Figure(path, "Expert similarity per layer and as an expert × expert matrix."))
    return blocks_out


def _other_summary(run: RunData) -> list[Block]:
    """summary.json values the sections above do not show, so nothing the trainer wrote is hidden."""
    rows = []

    def walk(prefix: str, obj):
        for key, value in obj.items():
            name = f"{prefix}{key}"
            if not prefix and key in _SHOWN_SUMMARY_SECTIONS:
                continue
            if isinstance(value, dict) and not prefix:
                walk(name + ".", value)
            elif name not in _SHOWN_SUMMARY_KEYS and isinstance(value, (str, int, float, bool)):
                text = f"{value:.6g}" if isinstance(value, float) and math.isfinite(value) else str(value)
                rows.append([f"`{name}`", text])

    walk("", run.summary)
    if not rows:
        return []
    return [Heading("Other values in summary.json", 3), Table(["key", "value"], rows[:40], ["l", "r"])]


def _header_blocks(run: RunData) -> list[Block]:
    """Title, one status line, and a warning when the run did not finish."""
    planned = f" of {run.total_steps:,}" if run.total_steps else ""
    status = ("finished" if run.finished else
              f"did not finish (last logged step {run.steps if run.steps is not None else '—'}{planned})")
    blocks: list[Block] = [
        Heading(f"Run report: {run.name}", 1),
        Paragraph(f"`{run.model}` on `{run.dataset}` · run `{run.path.name}` · {status} · report written "
                  f"{datetime.now().strftime('%Y-%m-%d %H:%M')}"),
    ]
    if run.stopped is not None:
        reason = run.stopped.get("reason", "unknown reason")
        detail = f", {run.stopped['in_a_row']} in a row" if _is_number(run.stopped.get("in_a_row")) else ""
        blocks.append(Paragraph(f"**Warning: the trainer stopped this run** at step {run.stopped.get('step', '?')} "
                                f"({reason}{detail}). See the non-finite losses below; the last good checkpoint "
                                "is kept."))
    elif not run.finished:
        last_ckpt = next((c.get("step") for c in reversed(run.checkpoints) if _is_number(c.get("step"))), None)
        command = f"`surgeon apply --resume {run.path.resolve()}`"
        resume = (f" Its last checkpoint is at step {last_ckpt}; {command} continues from there."
                  if last_ckpt is not None else f" If it was stopped, {command} continues it.")
        blocks.append(Paragraph("**Warning: this run did not finish** (no `end` event in metrics.jsonl). "
                                "The figures below are what it logged so far; best-so-far values are not final."
                                + resume))
    return blocks


def report_blocks(run: RunData, plots_dir: Path) -> list[Block]:
    """All sections of a run's report (writes its plots into ``plots_dir``)."""
    blocks = _header_blocks(run)
    blocks.append(_summary_table(run))
    blocks += _recipe_blocks(run)
    blocks += [Heading("Parameters"), Paragraph("What the surgery trains, counted the papers' way: **Params (M)** "
                                                "= parameters added or unfrozen by the surgery, head excluded.")]
    if run.plan:
        blocks += parameter_tables(run.plan)
    else:
        blocks.append(Paragraph("No plan was logged (no `start` event); run `surgeon plan RECIPE` to see it."))
    blocks += _results_blocks(run, plots_dir)
    blocks += _merge_blocks(run)
    blocks += _timing_blocks(run)
    blocks += _environment_blocks(run)
    blocks += _health_blocks(run)
    blocks += _similarity_blocks(run, plots_dir)
    blocks += _other_summary(run)
    if run.problems:
        blocks += [Heading("Problems reading the run"), Bullets(run.problems)]
    return blocks


def write_report(run_dir: str | Path) -> Path:
    """Write ``report.md``, ``report.html`` and ``plots/*.png`` into the run directory.

    Returns:
        the path of ``report.md``.

    Raises:
        UserError: ``run_dir`` is missing or not a run directory.
    """
    run = load_run_data(run_dir)
    plots_dir = run.path / "plots"
    try:
        plots_dir.mkdir(exist_ok=True)
    except OSError as exc:
        raise UserError(f"cannot write the report into {str(run.path)!r}: {exc.strerror}") from None
    blocks = report_blocks(run, plots_dir)
    md = run.path / "report.md"
    write_text(md, to_markdown(blocks, run.path))
    write_text(run.path / "report.html", to_html(blocks, f"surgeon report: {run.name}"))
    return md
