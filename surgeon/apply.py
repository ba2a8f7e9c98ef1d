"""``surgeon apply``: recipe → data → model → run directory → training → merge → report.

The one module that drives the whole pipeline; every step it calls lives in a layer below it
(docs/ARCHITECTURE.md).

Order matters and is part of the contract:

1. the recipe is loaded, validated and its local paths made absolute;
2. the data splits are built (with a shape-only backbone on the meta device, whose timm data
   config gives the transforms) — bad data fails here, before any run directory exists;
3. ``model.num_classes`` is set from the data (a recipe that says otherwise is refused);
4. the whole model is built on the meta device: the surgery resolves and takes effect, its size
   is sane, the data's image size fits the model; the pretrained weights are found — all still
   before a run directory exists;
5. the run directory is created (it must be writable) and locked (:class:`~surgeon.rundir.RunLock`:
   a second process writing to it is refused), ``RUN/recipe.yaml`` is written;
6. the model is built with its pretrained weights, the trainer runs, the best state is tested;
7. the run is merged (``train.merge``) and the report written; the run directory is returned
   (the CLI prints it as its last line).

``--resume RUN`` repeats 1-4, refuses a recipe that differs from ``RUN/recipe.yaml``, a
checkpoint that does not read, data that changed since the checkpoint (its fingerprint) and a
best state that does not fit, and continues from ``RUN/checkpoints/last.pt`` (or from the start
if the run died before its first checkpoint).

A run that fails or is interrupted before its first step leaves nothing behind: the files it
wrote are removed (and the directory, if this run created it). One killed before its first
checkpoint can be resumed (from the start) or simply started again with the same ``--out``.
Ctrl-C during training writes a checkpoint of the step under way (see
:class:`~surgeon.train.trainer.TrainingInterrupted`); every interrupt ends in :class:`Interrupted`,
whose message is the one line saying how to resume.

Under ``torchrun`` (:mod:`surgeon.train.distributed`) every process runs steps 1-4 and builds
the model; rank 0 alone chooses, checks, locks and writes the run directory, reads the
checkpoint (sent to the others), writes metrics, summary, merge and report, and prints. The
other ranks train, help evaluate, and return the run directory. A resumed run may use another
number of processes: the checkpoint holds the global step and data position.
"""
from __future__ import annotations

import datetime as _dt
import shutil
import time
import warnings
from contextlib import contextmanager, nullcontext
from pathlib import Path

import torch
from rich.console import Console

from surgeon.backbone import create_backbone, resolve_model_name
from surgeon.data import build_splits, resolve_data_config
from surgeon.data.sources import data_changes
from surgeon.errors import SurgeonWarning, UserError
from surgeon.io import read_json, writable_dir, write_json, write_text
from surgeon.merge_run import merge_run
from surgeon.methods.adapter.similarity import adapter_expert_similarity
from surgeon.methods.mlae.similarity import expert_similarity
from surgeon.model import build_checked_model, build_model, check_input_size
from surgeon.recipe import load_recipe
from surgeon.report import write_report
from surgeon.rundir import (MetricsLog, RunLock, RunPaths, default_run_dir, read_run_recipe, recipe_differences,
                            with_added_keys)
from surgeon.seeding import seed_everything
from surgeon.surgery import surgery_state
from surgeon.train.checkpoint import check_surgery_tensors, load_checkpoint
from surgeon.train.distributed import NullMetricsLog, World, broadcast_object, init_world, shutdown
from surgeon.train.loggers import attach, check_loggers
from surgeon.train.provenance import environment
from surgeon.train.trainer import Trainer, TrainingInterrupted, resolve_device, write_summary
from surgeon.weights import pretrained_kwargs


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during ``surgeon apply``; ``line`` (already printed on the console) says how to resume.

    Attributes:
        run_dir: the run directory (None if it was removed: nothing was trained).
    """

    def __init__(self, line: str, run_dir: Path | None):
        super().__init__(line)
        self.line, self.run_dir = line, run_dir


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


def _same_recipe_or_fail(old: dict, new: dict, where: str, paths: RunPaths | None = None) -> None:
    diffs = recipe_differences(with_added_keys(old), new)  # a run written before train.log resumes
    if diffs:
        shown = "; ".join(diffs[:5]) + (f"; and {len(diffs) - 5} more" if len(diffs) > 5 else "")
        hint = ("resume with the run's own recipe (omit RECIPE, or pass RUN/recipe.yaml) "
                "or start a new run without --resume")
        if paths is not None and paths.never_started():
            hint = (f"the run has no checkpoint yet, so nothing is lost by starting it again with this recipe: "
                    f"surgeon apply RECIPE --out {paths.root}")
        raise UserError(f"cannot resume: the recipe differs from the run's ({shown})", where=where, hint=hint)


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
    splits = build_splits(recipe.data, shapes, seed=recipe.data.seed, num_classes=recipe.model.num_classes)
    given = recipe.model.num_classes
    if given is not None and given != splits.num_classes:
        raise UserError(f"model.num_classes is {given} but the data has {splits.num_classes} classes "
                        f"({', '.join(splits.class_names[:5])}{', ...' if splits.num_classes > 5 else ''})",
                        where=recipe.where(("model", "num_classes")),
                        hint="remove model.num_classes (it defaults to the data's class count) or fix the data")
    recipe = recipe.with_values({("model", "num_classes"): splits.num_classes})
    # Pre-flight on the meta device (nothing allocated): every rule resolves and takes effect,
    # the sizes are sane (SurgeonWarnings shown), the data's images fit the model.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        warnings.simplefilter("always", SurgeonWarning)
        meta = build_model(recipe, weights=False, device="meta", num_classes=splits.num_classes)
    size = resolve_data_config(recipe.data, shapes)["input_size"]
    check_input_size(meta, size, recipe.where(("data", "image_size")) if recipe.data.image_size
                     else recipe.where(("model", "kwargs")))
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


def _choose_run_directory(recipe, out: str | None, resume: str | None) -> tuple[Path, bool]:
    """The run directory (made, and proven writable, before anything trains: read-only, below a
    file, /proc... are refused) and whether this call created it (rank 0)."""
    root = Path(resume) if resume else Path(out) if out else default_run_dir(recipe)
    created = not root.exists()
    writable_dir(root, "run directory")
    return root, created


def _take(lock) -> None:
    """Enter ``lock`` (a :class:`RunLock` on rank 0, a ``nullcontext`` elsewhere)."""
    lock.__enter__()


def _apply(recipe, splits, world: World, device, *, out, resume, console: Console, on_validate,
           t_setup: float) -> Path:
    """Steps 5-7 of :func:`apply_recipe` in this process (one of ``world``)."""
    check_loggers(recipe)  # a missing optional logger fails here, before a run directory exists
    root, created = _on_main(world, lambda: _choose_run_directory(recipe, out, resume))
    paths = RunPaths(root)
    run = _Run(paths, resume=bool(resume), created=created, world=world)
    lock = RunLock(paths.root, "surgeon apply" + (" --resume" if resume else "")) if world.is_main else nullcontext()
    _on_main(world, lambda: _take(lock))  # a run in use is refused on every rank (and left alone)
    try:
        _on_main(world, lambda: run.start(recipe, console))
        _train(run, recipe, splits, world, device, console, on_validate, t_setup)
        if world.is_main:
            _report(paths, console)
    except BaseException as exc:
        run.failed(exc, console)  # still under the lock: no other process writes to the run now
        raise
    finally:
        lock.__exit__(None, None, None)
    return paths.root


class _Run:
    """What one ``apply`` did to its run directory, to clean up after a failed start and to say
    how to resume after an interrupt."""

    def __init__(self, paths: RunPaths, *, resume: bool, created: bool, world: World | None = None):
        self.paths, self.resume, self.created = paths, resume, created
        self.world = world or World()
        self.trainer: Trainer | None = None
        self.wrote = False       # this process wrote RUN/recipe.yaml (a new or taken-over run)
        self.trained = False     # training is complete (finish, merge and report remain)

    def start(self, recipe, console: Console) -> None:
        """Check or write ``RUN/recipe.yaml`` (under the lock)."""
        paths = self.paths
        if self.resume:
            _same_recipe_or_fail(read_run_recipe(paths.root), recipe.to_dict(), str(paths.recipe), paths)
        else:
            if any(p.exists() for p in (paths.recipe, paths.metrics)):
                if not paths.never_started():
                    raise UserError(f"{paths.root} already holds a run",
                                    hint=f"continue it with --resume {paths.root}, or choose another --out")
                console.print(f"{paths.root} holds a run that stopped before its first checkpoint: starting it over",
                              markup=False)
                paths.metrics.unlink(missing_ok=True)
                paths.summary_csv.unlink(missing_ok=True)
                shutil.rmtree(paths.tensorboard, ignore_errors=True)
            write_text(paths.recipe, recipe.to_yaml())
            self.wrote = True
        console.print(f"run directory: {paths.root}", markup=False)

    def untouched(self) -> bool:
        """Nothing trained: no step done and no checkpoint."""
        return (self.trainer is None or self.trainer.step == 0) and not self.paths.last.exists()

    def failed(self, exc: BaseException, console: Console) -> None:
        """After an error or interrupt: remove a new run that never trained, say what is left,
        and turn an interrupt into :class:`Interrupted` (the line saying how to resume)."""
        if not self.world.is_main:
            if isinstance(exc, TrainingInterrupted):
                broadcast_object(None, self.world)  # wait for rank 0's checkpoint and line (see below)
            return  # rank 0 cleans up and speaks; the others end with the same exception
        paths, root, t = self.paths, self.paths.root, self.trainer
        removed = ((self.wrote or self.created) and not self.resume and self.untouched()
                   and _remove_unstarted(paths, self.created))
        resume = f"surgeon apply --resume {root}"
        if not isinstance(exc, KeyboardInterrupt):
            if removed:
                console.print(f"nothing was trained: removed {root if self.created else 'the run files in ' + str(root)}",
                              markup=False)
            elif (self.wrote or self.resume) and t is not None and t.saved_step is None and not paths.last.exists():
                console.print(f"the run stopped before its first checkpoint: `{resume}` starts it over", markup=False)
            return
        if removed:
            line = f"interrupted before training started: nothing was trained, {root} was removed"
        elif isinstance(exc, TrainingInterrupted):
            line = f"interrupted at step {exc.step} of {t.budget.total_steps}, checkpoint saved: resume with `{resume}`"
        elif self.trained:
            line = f"interrupted after training: resume with `{resume}` to finish the run"
        elif t is not None and t.step > 0:
            since = (f"from the checkpoint of step {t.saved_step}" if t.saved_step is not None
                     else "from the beginning: no checkpoint was written yet")
            line = f"interrupted at step {t.step}: resume with `{resume}` ({since})"
        else:
            line = f"interrupted before training started: resume with `{resume}`"
        console.print(line, markup=False)
        if isinstance(exc, TrainingInterrupted):
            # The ranks stopped after the same step; the others exit once this one has written
            # its checkpoint and said how to resume (torchrun ends the rest when one exits).
            broadcast_object(None, self.world)
        raise Interrupted(line, None if removed else root) from None


def _remove_unstarted(paths: RunPaths, created: bool) -> bool:
    """Remove what a run that never trained wrote (and its directory if this run created it)."""
    try:
        for p in (paths.recipe, paths.metrics, paths.summary_csv, paths.lock):
            p.unlink(missing_ok=True)
        shutil.rmtree(paths.tensorboard, ignore_errors=True)  # side logs of the events just removed
        if paths.checkpoints.is_dir() and not any(paths.checkpoints.iterdir()):
            paths.checkpoints.rmdir()
        if created:
            leftover = list(paths.root.iterdir())
            if leftover and all(p.name.startswith(".") for p in leftover):  # temporary files
                for p in leftover:
                    shutil.rmtree(p) if p.is_dir() else p.unlink()
            paths.root.rmdir()
        return True
    except OSError:
        return False


def _resume_state(recipe, paths: RunPaths, resume: bool, splits, net) -> dict | None:
    """The checkpoint to continue from (rank 0 reads it), or None; refused when the recipe or the
    data changed since it was written, or when the saved best state does not fit the model."""
    if not (resume and paths.last.is_file()):
        return None
    state = load_checkpoint(paths.last)
    _same_recipe_or_fail(state["recipe"], recipe.to_dict(), str(paths.last))
    changes = data_changes(state.get("data"), splits.fingerprint)
    if changes:
        raise UserError(f"cannot resume: the data changed since the checkpoint ({'; '.join(changes)})",
                        where=str(paths.last),
                        hint="resume with the data the run was trained on, or start a new run (without --resume): "
                             "the schedule and the best state were chosen for the old data")
    if paths.best.is_file():
        check_surgery_tensors(paths.best, surgery_state(net))
    return state


def _train(run: _Run, recipe, splits, world: World, device, console: Console, on_validate, t_setup: float) -> None:
    """Steps 6-7 under the run's lock: build, (resume,) train, test, summarise, merge."""
    paths = run.paths
    seed_everything(recipe.train.seed)  # the head's initialisation
    net = build_checked_model(recipe, num_classes=splits.num_classes, device=device, check_sizes=False)
    _finite_or_fail(net, recipe)
    state = _on_main(world, lambda: _resume_state(recipe, paths, run.resume, splits, net))
    log = MetricsLog(paths.metrics) if world.is_main else NullMetricsLog()
    try:
        trainer = run.trainer = Trainer(recipe, net, splits, paths, log, device=device, progress_console=console,
                                        on_validate=on_validate, world=world)
        if state is not None:
            trainer.load_checkpoint(state)
            console.print(f"resuming at step {trainer.step} of {trainer.budget.total_steps} "
                          f"(epoch {trainer.epoch + 1}, batch {trainer.batch})", markup=False)
        elif run.resume:
            log.truncate(0)  # died before its first checkpoint: start over in the same folder
            console.print("no checkpoint yet: starting the run from the beginning", markup=False)
        # After the cut-back above: summary.csv is rebuilt from what metrics.jsonl still holds.
        if world.is_main:
            attach(log, recipe, paths, resumed_step=trainer.step if run.resume else None)
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
        run.trained = True
        summary = trainer.finish()
        if not world.is_main:
            return  # rank 0 writes the rest
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


def _finite_or_fail(model, recipe) -> None:
    """A model with NaN/inf weights before training (a corrupt weights file) is refused here,
    not reported later as a diverged run. Buffers may hold -inf (attention masks): only NaN is
    refused there."""
    for name, t, ok in [*((n, t, torch.isfinite) for n, t in model.named_parameters()),
                        *((n, t, lambda x: ~torch.isnan(x)) for n, t in model.named_buffers())]:
        if t.is_floating_point() and not bool(ok(t).all()):
            raise UserError(f"the model has non-finite (NaN or infinite) values before training: {name}",
                            where=recipe.where(("model", "pretrained")),
                            hint="the pretrained weights hold NaN/inf values: use an intact weights file")


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
