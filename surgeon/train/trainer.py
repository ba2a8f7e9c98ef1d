"""The training loop: one class, read top to bottom — setup, train, finish.

One *step* is one loader batch of ``train.batch_size`` images, split into ``train.grad_accum``
micro-batches whose gradients add up (each weighted by its share of the batch), then clipped,
then one optimizer update and one scheduler tick. The data position ``(epoch, batch)`` advances
with every step, so a checkpoint names exactly the next batch to read.

Per step: optional bf16/fp16 autocast (fp32 master weights), the recipe's objective
(:class:`~surgeon.train.regularizers.Objective`), a non-finite loss or gradient norm skips the
update (counted; ``train.max_bad_steps`` in a row stop the run). Validation runs every
``train.eval_every`` steps, or at each epoch end, and always after the last step; the best
validation top-1 (ties: the later step) keeps its surgery tensors in ``checkpoints/best``.
Checkpoints are written every ``train.checkpoint_every`` steps, at epoch ends and after the last
step. Events go to ``metrics.jsonl`` (see :mod:`surgeon.rundir`); ``epoch`` there is 1-based.

An optional ``on_validate(step, epoch, top1)`` callback (used by ``surgeon sweep`` for pruning)
is called after each validation; returning a non-empty reason stops the run: a ``stopped``
event with that reason is logged and :class:`TrainingStopped` is raised.

Several processes (``torchrun``; :mod:`surgeon.train.distributed`): the model runs in
DistributedDataParallel, each rank trains on its share of the global batch (the recipe's
``train.batch_size``), weighted so that the averaged gradient is the one-process gradient; the
micro-batches of gradient accumulation skip the gradient all-reduce (``no_sync``) but the last.
A non-finite loss on any rank skips the step on every rank. Validation and test split the data
between the ranks and gather the predictions (each image counted once). Rank 0 alone writes.

Non-finite states: a validation of a state whose trained tensors or val loss are not finite
never becomes the best (its ``eval`` event says ``nonfinite: true``), and a run whose reported
state is not finite does not finish (:class:`TrainingDiverged`, no summary).

Ctrl-C (SIGINT, in the main thread): the step under way completes, a checkpoint of it is
written and :class:`TrainingInterrupted` is raised; a second Ctrl-C stops at once, and the
atomic checkpoint write leaves the previous checkpoint intact if it was under way.
"""
from __future__ import annotations

import math
import signal
import threading
import time
from contextlib import contextmanager, nullcontext

import torch
import torch.nn as nn

from surgeon.data import build_loader
from surgeon.data.loaders import batch_shares
from surgeon.errors import UserError
from surgeon.io import finite_or_none, load_tensors, write_json
from surgeon.rundir import MetricsLog, RunPaths
from surgeon.seeding import rng_state, set_rng_state, step_seed
from surgeon.surgery import backbone_fingerprint, load_surgery_state, surgery_state

from .checkpoint import save_checkpoint, save_surgery_tensors
from .distributed import (World, all_agree, all_gather_object, all_reduce_sum, broadcast_object, broadcast_tensors,
                          sampler_digest, wrap)
from .evaluation import EvalResult, autocast_context, evaluate, predictions, summarize
from .progress import TrainProgress
from .regularizers import Objective
from .schedule import build_optimizer, build_scheduler, peak_lr, step_budget

LOSS_TERMS = ("loss", "ce", "consistency", "alignment")


class TrainingDiverged(UserError):
    """Too many non-finite steps in a row; the last checkpoint is left as it was."""


class TrainingStopped(Exception):
    """The ``on_validate`` callback asked to stop (e.g. a sweep pruned the trial); not a user error.

    Attributes:
        reason: the callback's reason (also logged as the ``stopped`` event's ``reason``).
        step: optimizer steps done when it stopped.
    """

    def __init__(self, reason: str, step: int):
        super().__init__(f"training stopped at step {step}: {reason}")
        self.reason, self.step = reason, step


class TrainingInterrupted(KeyboardInterrupt):
    """Ctrl-C during training; a checkpoint of the last completed step was written.

    Attributes:
        step: optimizer steps done (the checkpoint's step).
    """

    def __init__(self, step: int):
        super().__init__(f"interrupted at step {step}")
        self.step = step


@contextmanager
def _graceful_sigint():
    """While active (main thread only), the first SIGINT only sets ``flag["stop"]``; the
    default handler is back for the next one, which raises KeyboardInterrupt at once."""
    flag = {"stop": False}
    if threading.current_thread() is not threading.main_thread() or signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        # Not ours to catch: off the main thread, or SIGINT is ignored on purpose (a shell starts
        # background jobs that way, so that a Ctrl-C meant for the foreground job spares them).
        yield flag
        return

    def first(signum, frame):
        flag["stop"] = True
        signal.signal(signal.SIGINT, signal.default_int_handler)

    previous = signal.signal(signal.SIGINT, first)
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


def finite_state(model: nn.Module) -> bool:
    """Whether every trained tensor of ``model`` (its surgery state) is finite."""
    return all(bool(torch.isfinite(t).all()) for t in surgery_state(model).values() if t.is_floating_point())


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"unknown device '{name}'", where="train.device", hint="auto, cpu, cuda, cuda:1, ...") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"train.device is {name} but CUDA is not available", where="train.device",
                        hint="use device auto or cpu")
    return device


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` → bf16 on CUDA with bf16 support, else fp32 (bf16 on CPU is opt-in: it is only
    faster on CPUs with native bf16 instructions)."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
    return precision


class Trainer:
    """Trains a patched model on a run's data and writes the run directory's training artefacts.

    Args:
        recipe: the resolved :class:`~surgeon.recipe.Recipe`.
        model: the patched model (``surgeon.build_model``), on ``device``.
        splits: :class:`surgeon.data.DataSplits`.
        paths: the run's :class:`~surgeon.rundir.RunPaths`.
        log: the run's :class:`~surgeon.rundir.MetricsLog`.
        device: where training runs.
        on_validate: optional ``f(step, epoch, top1) -> str | None`` called after each validation
            (``step``: optimizer steps done; ``epoch``: 1-based; ``top1``: val top-1 in percent).
            A non-empty return value is a reason to stop: see :class:`TrainingStopped`. Called on
            rank 0 only; its answer is sent to the other ranks.
        world: this process's :class:`~surgeon.train.distributed.World` (one process by default).
    """

    def __init__(self, recipe, model: nn.Module, splits, paths: RunPaths, log: MetricsLog, *,
                 device: torch.device, progress_console=None, on_validate=None, world: World | None = None):
        self.recipe, self.model, self.splits, self.paths, self.log = recipe, model, splits, paths, log
        self.on_validate = on_validate
        self.world = world or World()
        self.cfg = recipe.train
        self.device = device
        self.console = progress_console
        self.budget = step_budget(self.cfg, len(splits.train))
        self.precision = resolve_precision(self.cfg.precision, device)
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.optimizer = build_optimizer(model, self.cfg)
        self.scheduler = build_scheduler(self.optimizer, self.cfg, self.budget)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.objective = Objective(model, recipe.regularizers)
        self.sampler = getattr(model, "surgeon_sampler", None)
        # What the training forward passes run: DDP around the model on several processes.
        self.forward_model = wrap(model, self.world, device)
        # Images of every global batch (all ranks): the last batch is short only when the whole
        # split is smaller than one batch (step_budget's drop_last).
        self.global_batch = self.cfg.batch_size if self.budget.drop_last else len(splits.train)
        # Train events average this many steps (at most ~1000 events per run).
        self.log_every = max(1, round(self.budget.total_steps / 1000))
        # Counters: everything a resumed run needs to continue as if never stopped.
        self.step = 0                 # optimizer steps done
        self.epoch = 0                # 0-based epoch of the next batch
        self.batch = 0                # index of the next batch within that epoch
        self.best_top1: float | None = None
        self.best_step: int | None = None
        self.last_eval_step = -1
        self.bad_total = 0
        self.bad_in_row = 0
        self.images = 0               # images trained on (for img/s)
        self.train_seconds = 0.0      # time inside train steps
        self.elapsed_before = 0.0     # wall time of earlier sessions (resume)
        self.window = self._empty_window()
        self._t0 = time.perf_counter()
        self.saved_step: int | None = None  # the step of checkpoints/last.pt (None: none yet)

    # ---------------------------------------------------------------- state for checkpoints
    @staticmethod
    def _empty_window() -> dict:
        return {"steps": 0, "finite": 0, "images": 0, "seconds": 0.0, **{k: 0.0 for k in LOSS_TERMS}}

    def elapsed(self) -> float:
        """Seconds since the run started, across resumed sessions."""
        return self.elapsed_before + time.perf_counter() - self._t0

    def counters(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch": self.batch, "best_top1": self.best_top1,
                "best_step": self.best_step, "last_eval_step": self.last_eval_step, "bad_total": self.bad_total,
                "bad_in_row": self.bad_in_row, "images": self.images, "train_seconds": self.train_seconds,
                "elapsed": self.elapsed(), "window": dict(self.window)}

    def save_checkpoint(self) -> None:
        # Every rank must have made the same expert draws (same model, same forward passes):
        # checked here, where it costs one tiny gather per checkpoint.
        digests = all_gather_object(sampler_digest(self.sampler), self.world)
        assert len(set(digests)) == 1, f"the ranks' expert samplers diverged: {digests}"
        if not self.world.is_main:
            self.saved_step = self.step
            return
        # The event goes first so the offset stored in the checkpoint includes it; a run killed
        # between the two lines resumes from the previous checkpoint, whose offset drops it.
        self.log.log("checkpoint", step=self.step, epoch=self.epoch + 1, batch=self.batch, time=self.elapsed())
        save_checkpoint(self.paths.last, {
            "recipe": self.recipe.to_dict(),
            "model": surgery_state(self.model),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict(),
            "rng": rng_state(self.sampler),
            "trainer": self.counters(),
            "metrics_offset": self.log.offset(),
            "data": getattr(self.splits, "fingerprint", None),
        })
        self.saved_step = self.step

    def load_checkpoint(self, state: dict) -> None:
        """Continue from a checkpoint (the metrics log is cut back to the checkpoint's offset)."""
        load_surgery_state(self.model, state["model"], str(self.paths.last))
        self.optimizer.load_state_dict(state["optimizer"])
        self.scheduler.load_state_dict(state["scheduler"])
        self.scaler.load_state_dict(state["scaler"])
        set_rng_state(state["rng"], self.sampler)
        c = state["trainer"]
        self.step, self.epoch, self.batch = c["step"], c["epoch"], c["batch"]
        self.best_top1, self.best_step, self.last_eval_step = c["best_top1"], c["best_step"], c["last_eval_step"]
        self.bad_total, self.bad_in_row = c["bad_total"], c["bad_in_row"]
        self.images, self.train_seconds = c["images"], c["train_seconds"]
        self.elapsed_before, self._t0 = c["elapsed"], time.perf_counter()
        self.window = dict(c["window"])
        self.log.truncate(state["metrics_offset"])
        self.saved_step = self.step

    # ---------------------------------------------------------------------------- training
    def train(self) -> None:
        """Run the remaining steps."""
        budget, cfg = self.budget, self.cfg
        progress = (TrainProgress(budget.total_steps, self.step, console=self.console) if self.world.is_main
                    else _SilentProgress())
        try:
            with _graceful_sigint() as interrupt:
                self._train_loop(progress, interrupt)
        finally:
            progress.close()

    def _train_loop(self, progress: TrainProgress, interrupt: dict) -> None:
        budget, cfg = self.budget, self.cfg
        while self.step < budget.total_steps:
            loader = build_loader(self.splits.train, batch_size=cfg.batch_size, shuffle=True, seed=cfg.seed,
                                  num_workers=self.recipe.data.num_workers, drop_last=budget.drop_last,
                                  epoch=self.epoch, start_batch=self.batch,
                                  shard=(self.world.rank, self.world.size), grad_accum=cfg.grad_accum)
            self.model.train()
            position = (self.epoch, self.batch)
            for images, labels in loader:
                epoch = self.epoch
                loss = self.train_step(images, labels)
                if loss is None:
                    progress.print(f"step {self.step}: non-finite loss, update skipped "
                                   f"({self.bad_in_row} in a row, {self.bad_total} in total)")
                self.batch += 1
                end_of_epoch = self.batch == budget.steps_per_epoch
                if end_of_epoch:
                    self.epoch, self.batch = self.epoch + 1, 0
                last = self.step == budget.total_steps
                progress.update(step=self.step, epoch=epoch, epochs=budget.epochs, loss=loss,
                                lr=self.scheduler.get_last_lr()[0], img_per_s=self.images / max(self.train_seconds, 1e-9))
                every = cfg.eval_every
                if (every and self.step % every == 0) or (not every and end_of_epoch) or last:
                    result = self.validate(epoch)
                    if result is not None:
                        progress.print(f"step {self.step}: val top-1 {result.top1:.2f}% (loss {result.loss:.4f})"
                                       f"{'  best' if self.best_step == self.step else ''}")
                    self.model.train()
                saved = self.step % cfg.checkpoint_every == 0 or end_of_epoch or last
                if saved:
                    self.save_checkpoint()
                if self._interrupted(interrupt):
                    if not saved:
                        self.save_checkpoint()
                    raise TrainingInterrupted(self.step)
                if last:
                    break
            # Every pass must move (a loader that yields nothing would loop forever).
            assert (self.epoch, self.batch) != position, f"the train loader yielded no batch at {position}"

    def _interrupted(self, interrupt: dict) -> bool:
        """Whether a Ctrl-C asked to stop. On several processes a Ctrl-C on any rank stops every
        rank after the same step (one that stopped alone would leave the others waiting in their
        next collective)."""
        return not all_agree(not interrupt["stop"], self.world, self.device)

    def micro_batches(self, images: torch.Tensor, labels: torch.Tensor, n: int) -> list[tuple]:
        """This rank's micro-batches of a step: ``[(x [b, C, H, W], y [b], weight)]``.

        ``weight`` is the micro-batch's share of the global batch of ``n`` images times the world
        size (0 for a padding item): DDP averages the ranks' gradients, so the sum over ranks and
        micro-batches of ``weight · mean loss`` gradients is the gradient of the global batch mean.
        With one process these are ``tensor_split(grad_accum)``'s pieces, weighted ``len / n``.
        """
        out, i = [], 0
        for start, stop, _ in batch_shares(n, self.cfg.grad_accum, self.world.size, self.world.rank):
            size = max(stop - start, 1)  # an empty share came with one padding item
            out.append((images[i:i + size], labels[i:i + size], (stop - start) * self.world.size / n))
            i += size
        assert i == len(labels), (i, len(labels))
        return out

    def train_step(self, images: torch.Tensor, labels: torch.Tensor) -> float | None:
        """One optimizer step on a batch ``[B, C, H, W]`` / ``[B]`` (this rank's share of the
        global batch); returns the global batch's loss (None if the update was skipped)."""
        t0 = time.perf_counter()
        epoch = self.epoch
        world = self.world
        images = images.to(self.device, non_blocking=True)
        labels = labels.to(self.device, non_blocking=True)
        n = self.global_batch if world.distributed else len(labels)
        torch.manual_seed(step_seed(self.cfg.seed, self.step, world.rank))  # this step's dropout masks
        self.optimizer.zero_grad(set_to_none=True)
        terms = torch.zeros(len(LOSS_TERMS), device=self.device)  # batch-weighted sums of the loss terms
        finite = True
        micro = self.micro_batches(images, labels, n)
        for i, (x, y, weight) in enumerate(micro):
            # Gradients are all-reduced once per step, in the last micro-batch's backward.
            no_sync = world.distributed and i < len(micro) - 1
            with self.forward_model.no_sync() if no_sync else nullcontext():
                with autocast_context(self.device, self.precision):
                    parts = self.objective(self.forward_model, x, y)
                # All ranks skip together, else the others would wait for this one's gradients.
                if not all_agree(bool(torch.isfinite(parts["loss"])), world, self.device):
                    finite = False
                    break
                # Weight each micro-batch by its share so the summed gradient is the batch mean's.
                self.scaler.scale(parts["loss"] * weight).backward()
            terms += torch.stack([parts[k].detach().float() for k in LOSS_TERMS]) * weight / world.size
        all_reduce_sum(terms, world)
        terms = dict(zip(LOSS_TERMS, terms.tolist()))  # one device sync per step
        if finite:
            self.scaler.unscale_(self.optimizer)
            norm = torch.nn.utils.clip_grad_norm_(self.params, self.cfg.grad_clip or math.inf)
            # With fp16 an inf gradient is the scaler's business (it skips and lowers the scale).
            finite = bool(torch.isfinite(norm)) or self.scaler.is_enabled()
        lr = self.optimizer.param_groups[0]["lr"]
        if finite:
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.bad_in_row = 0
        else:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_total += 1
            self.bad_in_row += 1
        self.scheduler.step()
        self.step += 1
        seconds = time.perf_counter() - t0
        self.images += n
        self.train_seconds += seconds
        if not finite:
            self.log.log("nonfinite", step=self.step, epoch=epoch + 1, count=self.bad_total, in_a_row=self.bad_in_row)
            if self.bad_in_row >= self.cfg.max_bad_steps:
                self.log.log("stopped", step=self.step, reason="nonfinite", in_a_row=self.bad_in_row)
                raise TrainingDiverged(
                    f"training stopped at step {self.step}: {self.bad_in_row} non-finite losses in a row "
                    f"({self.bad_total} in total)", where=str(self.paths.root),
                    hint="lower train.base_lr, set train.grad_clip (e.g. 1.0) or use train.precision fp32; "
                         + self._kept())
        w = self.window
        w["steps"] += 1
        w["images"] += n
        w["seconds"] += seconds
        if finite:
            for k in LOSS_TERMS:
                w[k] += terms[k]
            w["finite"] += 1
        if w["steps"] >= self.log_every or self.step == self.budget.total_steps:
            # Loss terms average the window's finite steps (null if it had none).
            self.log.log("train", step=self.step, epoch=epoch + 1,
                         **{k: finite_or_none(w[k] / w["finite"]) if w["finite"] else None for k in LOSS_TERMS},
                         lr=lr, img_per_s=w["images"] / max(w["seconds"], 1e-9), time=self.elapsed())
            self.window = self._empty_window()
        return terms["loss"] if finite else None

    def _kept(self) -> str:
        """What the run directory still holds, naming only files that exist."""
        if self.paths.last.is_file():
            return f"the last good checkpoint is {self.paths.last}"
        return "no checkpoint was written (the run stopped before its first one)"

    # -------------------------------------------------------------------------- evaluation
    def evaluate(self, dataset, split: str) -> EvalResult:
        """Top-1 on ``dataset`` under the recipe's inference mode; on several processes each rank
        predicts items ``rank, rank + W, ...`` and every rank gets the whole split's result."""
        ev, world = self.recipe.eval, self.world
        loader = build_loader(dataset, batch_size=self.cfg.batch_size, shuffle=False, seed=self.cfg.seed,
                              num_workers=self.recipe.data.num_workers, shard=(world.rank, world.size))
        if not world.distributed:
            return evaluate(self.model, loader, mode=ev.inference, expert=ev.expert, merge_mode=ev.merge_mode,
                            num_classes=self.splits.num_classes,
                            class_names=self.splits.class_names, precision=self.precision)
        local = predictions(self.model, loader, mode=ev.inference, expert=ev.expert, merge_mode=ev.merge_mode,
                            precision=self.precision)
        parts = all_gather_object(local, world)
        labels, preds = [0] * len(dataset), [0] * len(dataset)
        for rank, (rank_labels, rank_preds, _) in enumerate(parts):  # back to dataset order
            labels[rank::world.size], preds[rank::world.size] = rank_labels, rank_preds
        return summarize(labels, preds, sum(part[2] for part in parts), num_classes=self.splits.num_classes,
                         class_names=self.splits.class_names, inference=ev.inference)

    def validate(self, epoch: int) -> EvalResult | None:
        """Evaluate on val; keep the surgery tensors of the best top-1 (ties: the later step)."""
        if self.splits.val is None or self.last_eval_step == self.step:
            return None
        result = self.evaluate(self.splits.val, "val")
        self.last_eval_step = self.step
        # A non-finite state is never the best, even on a tie (a NaN model predicts one class).
        finite = math.isfinite(result.loss) and finite_state(self.model)
        self.log.log("eval", split="val", step=self.step, epoch=epoch + 1, top1=finite_or_none(result.top1),
                     loss=finite_or_none(result.loss), inference=result.inference, n=result.n, time=self.elapsed(),
                     **({} if finite else {"nonfinite": True}))
        if result.n and finite and (self.best_top1 is None or result.top1 >= self.best_top1):
            self.best_top1, self.best_step = result.top1, self.step
            if self.world.is_main:
                save_surgery_tensors(self.paths.best, surgery_state(self.model))
        if self.on_validate is not None:
            reason = self.on_validate(self.step, epoch + 1, result.top1) if self.world.is_main else None
            reason = broadcast_object(reason, self.world)
            if reason:
                self.log.log("stopped", step=self.step, epoch=epoch + 1, reason=str(reason), time=self.elapsed())
                raise TrainingStopped(str(reason), self.step)
        return result

    # ------------------------------------------------------------------------------ finish
    def reported_step(self, checkpoint: str) -> int:
        """The step whose state is tested and saved: the best val step, or the last step."""
        return (self.best_step or self.step) if checkpoint == "best" else self.step

    def selected_checkpoint(self) -> str:
        """``best`` (the best val state) or ``last`` (the end of the schedule), per
        ``eval.checkpoint``; ``auto`` is ``last`` when the val images are training images (the
        final protocol of VTAB-style data: a best-val choice there is a choice on training
        data) or there is no val split, else ``best``."""
        choice = self.recipe.eval.checkpoint
        if choice == "auto":
            choice = "last" if self.splits.val is None or self.splits.val_in_train else "best"
        return choice

    def finish(self) -> dict:
        """Select the reported state (best val or last), test it, write adapter, predictions,
        end event and summary."""
        checkpoint = self.selected_checkpoint()
        main = self.world.is_main
        if checkpoint == "best" and self.splits.val is not None:
            if main and self.paths.best.is_file():
                load_surgery_state(self.model, load_tensors(self.paths.best), str(self.paths.best))
            broadcast_tensors(surgery_state(self.model).values(), self.world)  # rank 0 has the file
        if not finite_state(self.model):  # the same on every rank (the same tensors)
            self.log.log("stopped", step=self.step, reason="nonfinite_model", checkpoint=checkpoint, time=self.elapsed())
            raise TrainingDiverged(
                f"training ended at step {self.step} but the {checkpoint} state has non-finite (NaN or infinite) "
                "tensors: the run diverged and has no result", where=str(self.paths.root),
                hint="lower train.base_lr, set train.grad_clip (e.g. 1.0) or use train.precision fp32")
        if main:
            save_surgery_tensors(self.paths.adapter, surgery_state(self.model),
                                 metadata={"format": "surgeon-adapter", "recipe": self.recipe.name,
                                           "model": self.recipe.model.name, "step": str(self.reported_step(checkpoint)),
                                           "backbone_fingerprint": backbone_fingerprint(self.model)})
        test_top1 = None
        final_split, final = None, None
        if self.splits.test is not None:
            final_split, final = "test", self.evaluate(self.splits.test, "test")
            test_top1 = final.top1
            self.log.log("eval", split="test", step=self.reported_step(checkpoint), epoch=self.epoch,
                         top1=finite_or_none(final.top1),
                         loss=finite_or_none(final.loss), inference=final.inference, n=final.n, time=self.elapsed())
        elif self.splits.val is not None:
            final_split, final = "val", self.evaluate(self.splits.val, "val")
        if final is not None and main:
            write_json(self.paths.predictions(final_split),
                       {"split": final_split, "labels": final.labels, "preds": final.preds,
                        "class_names": list(self.splits.class_names), "top1": final.top1,
                        "inference": final.inference})
        img_per_s = self.images / max(self.train_seconds, 1e-9)
        self.log.log("end", best_val_top1=self.best_top1, best_step=self.best_step, test_top1=test_top1,
                     train_seconds=self.train_seconds, img_per_s=img_per_s, steps=self.step,
                     nonfinite_steps=self.bad_total, time=self.elapsed())
        plan = self.model.surgeon_plan
        return {
            "status": "finished",
            "recipe": self.recipe.name,
            "model": self.recipe.model.name,
            "data": self.splits.source,
            "num_classes": self.splits.num_classes,
            "class_names": list(self.splits.class_names),
            "best_val_top1": self.best_top1,
            "best_step": self.best_step,
            "checkpoint": checkpoint,
            "reported_step": self.reported_step(checkpoint),
            "val_in_train": self.splits.val_in_train,
            "test_top1": test_top1,
            "final_split": final_split,
            "final_top1": final.top1 if final else None,
            "per_class": final.per_class if final else [],
            "inference": self.recipe.eval.inference,
            "steps": self.step,
            "epochs": self.budget.epochs,
            "steps_per_epoch": self.budget.steps_per_epoch,
            "nonfinite_steps": self.bad_total,
            "train_seconds": self.train_seconds,
            "wall_seconds": self.elapsed(),
            "img_per_s": img_per_s,
            "precision": self.precision,
            "device": str(self.device),
            "distributed": self.world.to_dict(),
            "lr": peak_lr(self.cfg),
            "params": {k: getattr(plan, k) for k in ("backbone_params", "extra_params", "head_params",
                                                     "trainable_params")} | {"extra_params_m": plan.extra_params / 1e6},
            "train_images": len(self.splits.train),
            "val_images": len(self.splits.val) if self.splits.val is not None else 0,
            "test_images": len(self.splits.test) if self.splits.test is not None else 0,
        }


def write_summary(paths: RunPaths, summary: dict) -> None:
    write_json(paths.summary, summary)


class _SilentProgress:
    """The progress display of ranks other than 0 (rank 0 shows the run's progress)."""

    def update(self, **fields) -> None:
        pass

    def print(self, text: str) -> None:
        pass

    def close(self) -> None:
        pass
