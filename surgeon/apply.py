"""``surgeon apply``: recipe → data → model → run directory → training → merge → report.

The one module that drives the whole pipeline; every step it calls lives in a layer below it
(docs/ARCHITECTURE.md).

Order matters and is part of the contract:

1. the recipe is loaded, validated and its local paths made absolute;
2. the data splits are built (with a shape-only backbone on the meta device, whose timm data
   config gives the transforms) — bad data fails here, before any run directory exists;
3. ``model.num_classes`` is set from the data (a recipe that says otherwise is refused);
4. ``RUN/recipe.yaml`` is written, before the model is built or anything trains;
5. the model is built with its pretrained weights, the trainer runs, the best state is tested;
6. the run is merged (``train.merge``) and the report written; the run directory is returned
   (the CLI prints it as its last line).

``--resume RUN`` repeats 1-3, refuses a recipe that differs from ``RUN/recipe.yaml``, and
continues from ``RUN/checkpoints/last.pt`` (or from the start if the run died before its
first checkpoint).

Under ``torchrun`` (:mod:`surgeon.train.distributed`) every process runs steps 1-3 and builds
the model; rank 0 alone chooses and writes the run directory, reads the checkpoint (sent to the
others), writes metrics, summary, merge and report, and prints. The other ranks train, help
evaluate, and return the run directory. A resumed run may use another number of processes: the
checkpoint holds the global step and data position.
"""
from __future__ import annotations

import datetime as _dt
import time
import warnings
from contextlib import contextmanager
from pathlib import Path

from rich.console import Console

from surgeon.backbone import create_backbone, resolve_model_name
from surgeon.data import build_splits
from surgeon.errors import UserError
from surgeon.io import read_json, write_json, write_text
from surgeon.merge_run import merge_run
from surgeon.methods.adapter.similarity import adapter_expert_similarity
from surgeon.methods.mlae.similarity import expert_similarity
from surgeon.model import build_checked_model
from surgeon.recipe import load_recipe
from surgeon.report import write_report
from surgeon.rundir import (MetricsLog, RunPaths, default_run_dir, read_run_recipe, recipe_differences,
                            with_added_keys)
from surgeon.seeding import seed_everything
from surgeon.train.checkpoint import load_checkpoint
from surgeon.train.distributed import NullMetricsLog, World, broadcast_object, init_world, shutdown
from surgeon.train.loggers import attach, check_loggers
from surgeon.train.provenance import environment
from surgeon.train.trainer import Trainer, resolve_device, write_summary
from surgeon.weights import pretrained_kwargs


@contextmanager
def _warnings_to(console: Console):
    """Show Python warnings as one ``warning: ...`` line each (no file/line noise)."""
    old = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        console.print(f"warning: {message}", markup=False)

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = old


def _same_recipe_or_fail(old: dict, new: dict, where: str) -> None:
    diffs = recipe_differences(with_added_keys(old), new)  # a run written before train.log resumes
    if diffs:
        shown = "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
        raise UserError(f"cannot resume: the recipe differs from the run's ({shown})", where=where,
                        hint="resume with the run's own recipe (omit RECIPE, or pass RUN/recipe.yaml) "
                             "or start a new run without --resume")


def prepare(recipe_ref: str | None, *, model: str | None = None, data: str | None = None,
            overrides: list[str] | None = None, resume: str | None = None):
    """Steps 1-3: the resolved recipe (local paths absolute, the pretrained tag and num_classes
    resolved: a new :class:`~surgeon.recipe.Recipe`) and the data splits."""
    if recipe_ref is None:
        if resume is None:
            raise UserError("no recipe given", hint="surgeon apply RECIPE (or --resume RUN to continue a run)")
        read_run_recipe(Path(resume))
        recipe_ref = str(RunPaths(Path(resume)).recipe)
    recipe = load_recipe(recipe_ref, overrides or [], model=model, data=data).with_absolute_paths()
    # The pretrained tag (model.tag) resolved once, so the run records the exact timm name.
    recipe = recipe.with_values({("model", "name"): resolve_model_name(recipe.model)[0]})
    seed_everything(recipe.train.seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        shapes = create_backbone(recipe.model, weights=False, device="meta")
    splits = build_splits(recipe.data, shapes, seed=recipe.data.seed)
    given = recipe.model.num_classes
    if given is not None and given != splits.num_classes:
        raise UserError(f"model.num_classes is {given} but the data has {splits.num_classes} classes "
                        f"({', '.join(splits.class_names[:5])}{', ...' if splits.num_classes > 5 else ''})",
                        where=recipe.where(("model", "num_classes")),
                        hint="remove model.num_classes (it defaults to the data's class count) or fix the data")
    recipe = recipe.with_values({("model", "num_classes"): splits.num_classes})
    if recipe.model.pretrained is not False:
        # Pre-flight: no network / a missing or corrupt file fails here, in seconds, before a
        # run directory is created (the real load happens when the model is built).
        pretrained_kwargs(recipe.model.name, recipe.model.pretrained)
    return recipe, splits


def apply_recipe(recipe_ref: str | None, *, model: str | None = None, data: str | None = None,
                 overrides: list[str] | None = None, out: str | None = None, resume: str | None = None,
                 console: Console | None = None, on_validate=None) -> Path:
    """Run ``surgeon apply``; returns the run directory.

    ``on_validate(step, epoch, top1) -> str | None`` is passed to the
    :class:`~surgeon.train.trainer.Trainer`: called after each validation, a non-empty return
    value stops the run with :class:`~surgeon.train.trainer.TrainingStopped` (no summary, merge
    or report; ``metrics.jsonl`` ends with a ``stopped`` event giving the reason).
    """
    console = console or Console(stderr=True, highlight=False, soft_wrap=True)
    if resume and out and Path(out).resolve() != Path(resume).resolve():
        raise UserError(f"--out {out} and --resume {resume} name different run directories",
                        hint="--resume continues the run in its own directory; drop --out")
    t_setup = time.perf_counter()
    world = World()
    try:
        with _warnings_to(console):
            recipe, splits = prepare(recipe_ref, model=model, data=data, overrides=overrides, resume=resume)
            world, device = init_world(resolve_device(recipe.train.device))
            if not world.is_main:  # rank 0 speaks for the run
                console = Console(stderr=True, quiet=True)
            with _warnings_to(console):
                return _apply(recipe, splits, world, device, out=out, resume=resume, console=console,
                              on_validate=on_validate, t_setup=t_setup)
    finally:
        shutdown(world)


def _on_main(world: World, action):
    """``action()`` on rank 0, its result (or its user error) on every rank."""
    result = error = None
    if world.is_main:
        try:
            result = action()
        except UserError as exc:
            error = exc
    failed = broadcast_object(str(error) if error is not None else None, world)
    if error is not None:
        raise error
    if failed is not None:
        raise UserError(f"rank 0 stopped: {failed}")
    return broadcast_object(result, world)


def _run_directory(recipe, out: str | None, resume: str | None) -> RunPaths:
    """The run directory and its recipe, before anything is trained (rank 0)."""
    if resume:
        paths = RunPaths(Path(resume))
        _same_recipe_or_fail(read_run_recipe(paths.root), recipe.to_dict(), str(paths.recipe))
        return paths
    root = Path(out) if out else default_run_dir(recipe)
    if root.exists() and any((root / f).exists() for f in ("recipe.yaml", "metrics.jsonl")):
        raise UserError(f"{root} already holds a run", hint=f"continue it with --resume {root}, or choose another --out")
    root.mkdir(parents=True, exist_ok=True)
    paths = RunPaths(root)
    write_text(paths.recipe, recipe.to_yaml())
    return paths


def _resume_state(recipe, paths: RunPaths, resume: str | None) -> dict | None:
    """The checkpoint to continue from (rank 0 reads it), or None."""
    if not (resume and paths.last.is_file()):
        return None
    state = load_checkpoint(paths.last)
    _same_recipe_or_fail(state["recipe"], recipe.to_dict(), str(paths.last))
    return state


def _apply(recipe, splits, world: World, device, *, out, resume, console: Console, on_validate, t_setup: float) -> Path:
    """Steps 4-6 of :func:`apply_recipe` in this process (one of ``world``)."""
    check_loggers(recipe)  # a missing optional logger fails here, before a run directory exists
    paths = _on_main(world, lambda: _run_directory(recipe, out, resume))
    console.print(f"run directory: {paths.root}", markup=False)

    seed_everything(recipe.train.seed)  # the head's initialisation
    net = build_checked_model(recipe, num_classes=splits.num_classes, device=device)
    state = _on_main(world, lambda: _resume_state(recipe, paths, resume))
    log = MetricsLog(paths.metrics) if world.is_main else NullMetricsLog()
    try:
        trainer = Trainer(recipe, net, splits, paths, log, device=device, progress_console=console,
                          on_validate=on_validate, world=world)
        if state is not None:
            trainer.load_checkpoint(state)
            console.print(f"resuming at step {trainer.step} of {trainer.budget.total_steps} "
                          f"(epoch {trainer.epoch + 1}, batch {trainer.batch})", markup=False)
        elif resume:
            log.truncate(0)  # died before its first checkpoint: start over in the same folder
            console.print("no checkpoint yet: starting the run from the beginning", markup=False)
        # After the cut-back above: summary.csv is rebuilt from what metrics.jsonl still holds.
        if world.is_main:
            attach(log, recipe, paths, resumed_step=trainer.step if resume else None)
        env = environment(device, recipe.source, world=world.to_dict())
        plan = net.surgeon_plan
        log.log("start", time=_dt.datetime.now().astimezone().isoformat(timespec="seconds"), recipe=recipe.name,
                model=recipe.model.name, data=splits.source, num_classes=splits.num_classes,
                warmup_steps=trainer.budget.warmup_steps, batch_size=recipe.train.batch_size,
                class_names=list(splits.class_names), plan=plan.to_dict(), device=str(device),
                precision=trainer.precision, seed=recipe.train.seed, provenance=splits.provenance,
                lr=trainer.optimizer.param_groups[0]["initial_lr"], total_steps=trainer.budget.total_steps,
                steps_per_epoch=trainer.budget.steps_per_epoch, resumed_from_step=trainer.step if state else None,
                environment=env)
        budget = trainer.budget
        console.print(f"{recipe.name} on {recipe.model.name}: {plan.extra_params / 1e6:.4f}M extra params, "
                      f"{plan.trainable_params:,} trainable; {len(splits.train)} train images, "
                      f"{splits.num_classes} classes; peak lr {trainer.optimizer.param_groups[0]['initial_lr']:.3g} "
                      f"({recipe.train.optimizer}), batch {recipe.train.batch_size}, "
                      f"{budget.warmup_steps} warm-up + {budget.total_steps - budget.warmup_steps} decay = "
                      f"{budget.total_steps} steps ({budget.epochs} epochs of {budget.steps_per_epoch}) on {device} "
                      f"({trainer.precision})", markup=False)
        if budget.warmup_clamped:
            console.print(f"warning: the warm-up ({budget.warmup_requested} steps) covered more than half of the "
                          f"run ({budget.total_steps} steps); shortened to {budget.warmup_steps} steps "
                          f"(set train.warmup_epochs or train.warmup_steps to choose)", markup=False)
        setup_seconds = time.perf_counter() - t_setup

        trainer.train()
        summary = trainer.finish()
        if not world.is_main:
            return paths.root  # rank 0 writes the rest
        summary["timings"] = {"setup_seconds": setup_seconds, "train_seconds": summary["train_seconds"]}
        summary["environment"] = env
        write_summary(paths, summary)
        _write_analysis(net, paths, console)
        if summary["val_in_train"]:
            line = (f"done: val top-1 {_pct(summary['best_val_top1'])} at best (val images are training images: "
                    f"not a held-out score); reported: the {summary['checkpoint']} state, step {summary['reported_step']}")
        else:
            line = (f"done: best val top-1 {_pct(summary['best_val_top1'])} at step {summary['best_step']}; "
                    f"reported: the {summary['checkpoint']} state, step {summary['reported_step']}")
        if summary["test_top1"] is not None:
            line += f", test top-1 {_pct(summary['test_top1'])}"
        console.print(line + f"; {summary['img_per_s']:.1f} img/s", markup=False)

        if recipe.train.merge:
            t = time.perf_counter()
            info = merge_run(paths.root, mode=recipe.eval.merge_mode, model=net, log=log)
            summary = _timing(paths, "merge_seconds", time.perf_counter() - t)
            console.print(f"merged ({info['format']}, {info['mode']}) -> {info['path']}: max |Δlogit| "
                          f"{info['max_abs_diff']:.3g} (relative {info['max_rel_diff']:.3g})", markup=False)
    finally:
        log.close()
    _report(paths, console)
    return paths.root


def _pct(x) -> str:
    return "n/a" if x is None else f"{x:.2f}%"


def _timing(paths: RunPaths, key: str, seconds: float) -> dict:
    summary = read_json(paths.summary)
    summary.setdefault("timings", {})[key] = seconds
    write_json(paths.summary, summary)
    return summary


def _write_analysis(model, paths: RunPaths, console: Console) -> None:
    """``analysis.json``: the experts' mean pairwise cosine similarity (MLAE paper Figs. 4-5) —
    of the low-rank experts' ``ΔW_j`` (LoRA family) and of the MoSA experts' deltas from the
    dense init (per adapter); nothing for methods without experts."""
    try:
        parts = {"low-rank": expert_similarity(model), "adapter": adapter_expert_similarity(model)}
    except Exception as exc:  # noqa: BLE001 - an analysis must not cost the run its results
        console.print(f"warning: expert similarity not computed ({type(exc).__name__}: {exc})", markup=False)
        return
    per_layer = [{"module": name, "mean": value, "kind": kind}
                 for kind, sim in parts.items() for name, value in sim["layers"].items()]
    if not per_layer:
        return
    keys = [k for sim in parts.values() for k in sim["matrices"]]
    matrices = [m.tolist() for sim in parts.values() for m in sim["matrices"].values()]
    same = all(len(m) == len(matrices[0]) for m in matrices)
    write_json(paths.analysis, {"expert_similarity": {
        "mean": sum(e["mean"] for e in per_layer) / len(per_layer),
        "per_layer": per_layer,
        # one experts x experts matrix per module (per slice of a fused qkv); the first only when
        # their sizes differ (the report plots their mean)
        "matrix": matrices if same else matrices[:1],
        "matrix_keys": keys if same else keys[:1],
    }})


def _report(paths: RunPaths, console: Console) -> None:
    try:
        report = write_report(paths.root)
    except UserError as exc:
        console.print(f"report not written: {exc}", markup=False)
        return
    except Exception as exc:  # noqa: BLE001 - the trained run is safe; say so and how to retry
        console.print(f"report failed ({type(exc).__name__}: {exc}); the run is complete — retry with "
                      f"`surgeon report {paths.root}`", markup=False)
        return
    console.print(f"report: {report} and {report.with_suffix('.html')}", markup=False)
