"""``surgeon sweep``: hyper-parameter search on Optuna under the VTAB-1k protocol.

1. Every ``--grid`` value (and every combination) is checked against the recipe schema before
   anything trains.
2. Each trial is an ordinary run directory (``OUT/trials/<n>-<values>``, made by
   :func:`surgeon.apply.apply_recipe`) trained with ``data.protocol: tune`` (train800,
   scored on val200, no test split touched) and ``train.merge: false``. Its objective is the
   val top-1 of the **last** evaluation (the end of the schedule); the best-epoch val top-1 is
   recorded too. Diverged trials and trials a :class:`~surgeon.errors.UserError` stops are
   failed trials with their reason, not the end of the sweep.
3. With ``--extend-edges``, a numeric key whose best value is the smallest/largest of its grid
   gets the next value beyond (same ratio), up to :data:`~surgeon.sweep.space.MAX_EXTENSIONS`
   times per side.
4. The best configuration is retrained with ``data.protocol: final`` (train800val200) for each
   seed (``OUT/final/seed<k>``, merged as the recipe says) and reported on test.

All state lives in the Optuna storage (default ``OUT/study.journal``), so the same command run
again continues, and several workers (``--workers K`` here, or the same command with a shared
``--storage`` on other machines) share the work. See :mod:`surgeon.sweep.study` for how a
trial is owned, found abandoned and resumed.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import math
import multiprocessing
import os
import shutil
import statistics
import sys
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.markup import escape

from surgeon.apply import apply_recipe, prepare
from surgeon.errors import UserError
from surgeon.gpus import parse_gpus, pinned_env
from surgeon.io import read_json, write_json
from surgeon.merge_run import merge_run
from surgeon.recipe import load_recipe
from surgeon.rundir import (dataset_short_name, merged_kind, read_run_recipe, recipe_differences, with_added_keys,
                            without_added_defaults)
from surgeon.runload import load_run_recipe
from surgeon.sweep import space
from surgeon.sweep import study as st
from surgeon.sweep.report import write_sweep_report
from surgeon.sweep.results import EdgeNote, FinalResult, SweepResult, SweepSpec, TrialResult
from surgeon.train import TrainingDiverged, TrainingStopped

#: Pruning (``--prune``): no pruning before this many trials are complete ...
PRUNE_STARTUP_TRIALS = 3
#: ... nor in the first third of a trial's schedule (a warm-up that has barely started says little).
PRUNE_WARMUP_FRACTION = 1 / 3
SAMPLERS = ("grid", "tpe")
# TPE: consecutive re-proposals of finished configurations before the next untried grid point is queued.
TPE_MAX_DUPLICATES = 5


# ------------------------------------------------------------------------------- helpers

def _fmt_seconds(s: float | None) -> str:
    if s is None or s != s:
        return "?"
    s = int(round(s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}%"


def _read_events(run_dir: Path) -> list[dict]:
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            events.append(json.loads(line))
        except ValueError:
            continue  # a torn last line of a killed run
    return events


def _total_steps(run_dir: Path) -> int | None:
    for e in _read_events(run_dir):
        if e.get("event") == "start" and isinstance(e.get("total_steps"), int):
            return e["total_steps"]
    return None


def tune_overrides(spec: SweepSpec, config: dict) -> list[str]:
    """A trial's overrides: the sweep's ``--set``, the configuration, the tune protocol, no merge."""
    return list(spec.overrides) + space.config_overrides(config) + ["data.protocol=tune", "train.merge=false"]


def final_overrides(spec: SweepSpec, config: dict) -> list[str]:
    """A final run's overrides (``config`` includes ``train.seed``)."""
    return list(spec.overrides) + space.config_overrides(config) + ["data.protocol=final"]


def _distribution(values: list, sampler: str):
    """The Optuna distribution recording a key's value. Numeric keys of a grid sweep are
    int/float ranges (their range may grow with --extend-edges; Optuna refuses categorical
    choices that change), everything else categorical over labels."""
    # optuna: the optional `sweep` extra, imported once a sweep runs (import_optuna names the extra)
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    nums = [v for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]
    if sampler == "grid" and len(nums) == len(values) and all(math.isfinite(v) for v in nums):
        if all(isinstance(v, int) for v in nums):
            return IntDistribution(min(nums), max(nums))
        return FloatDistribution(float(min(nums)), float(max(nums)))
    return CategoricalDistribution([_label(v) for v in values])


def _label(v: Any):
    """An Optuna categorical choice for a value (Optuna takes None/bool/int/float/str)."""
    return v if v is None or isinstance(v, (bool, int, float, str)) else json.dumps(v, sort_keys=True)


def _param(v: Any, dist) -> Any:
    # optuna: the optional `sweep` extra, imported once a sweep runs (import_optuna names the extra)
    from optuna.distributions import CategoricalDistribution

    return _label(v) if isinstance(dist, CategoricalDistribution) else v


# -------------------------------------------------------------------------------- worker

class _Worker:
    """One worker: runs trials until the sweep (and its final runs) are done.

    Every worker runs the same procedure; the storage decides who trains what. Decisions that
    need a complete round (the best configuration, edge extensions) are taken only when no
    trial of the round is pending, from the storage's results, so all workers take the same.
    """

    def __init__(self, spec: SweepSpec, *, index: int = 0, console: Console | None = None,
                 train_console: Console | None = None):
        self.spec = spec
        self.index = index
        self.optuna = st.import_optuna()
        self.out = Path(spec.out)
        self.console = console or Console(stderr=True, highlight=False, soft_wrap=True)
        self.train_console = train_console or self.console
        self.storage, self.storage_text = st.open_storage(spec.storage, self.out / "study.journal")
        self.tune = self._create_study(spec.study, tune=True)
        self.final = self._create_study(f"{spec.study}-final", tune=False)
        self.owner = st.new_owner()
        self.values = {k: list(v) for k, v in spec.grid.items()}
        # The configurations in trial order: the grid, then each extension's new ones.
        self.plan = space.configurations(self.values)
        self.edge_notes: dict[tuple[str, str], str] = {}
        self.tag = f"[w{index}] " if spec.workers > 1 else ""
        self.mtag = escape(self.tag)  # for lines printed with rich markup

    def _create_study(self, name: str, *, tune: bool):
        o = self.optuna
        if tune and self.spec.sampler == "tpe":
            n = self.spec.trials or 10
            sampler = o.samplers.TPESampler(seed=self.spec.sampler_seed, n_startup_trials=max(1, min(10, n // 3)),
                                            constant_liar=True)
        else:
            sampler = o.samplers.RandomSampler(seed=self.spec.sampler_seed)  # never samples: trials are queued
        pruner = (o.pruners.MedianPruner(n_startup_trials=PRUNE_STARTUP_TRIALS, n_warmup_steps=0)
                  if tune and self.spec.prune else o.pruners.NopPruner())
        try:
            return o.create_study(study_name=name, storage=self.storage, direction="maximize", sampler=sampler,
                                  pruner=pruner, load_if_exists=True)
        except Exception as exc:  # noqa: BLE001 - a storage that refuses (permissions, schema)
            raise UserError(f"cannot create or open study {name!r} in {self.storage_text}: {exc}",
                            where="--storage") from None

    # ----------------------------------------------------------------------- the procedure
    def run(self) -> None:
        st.activate(self.owner)
        try:
            while True:
                if self.spec.sampler == "grid":
                    self._work(self.tune, "tune", self.plan)
                else:
                    self._work_tpe()
                if not (self.spec.extend_edges and self._extend()):
                    break
            if self.spec.seeds:
                best = best_trial(self.tune, self.plan_keys())
                if best is None:
                    self.console.print(f"{self.tag}no trial finished with a val score: no final runs", markup=False)
                    return
                self._work(self.final, "final", [{**best[1], "train.seed": s} for s in self.spec.seeds])
        finally:
            st.deactivate(self.owner)

    def _trials(self, study) -> list:
        return study.get_trials(deepcopy=False)

    def plan_keys(self) -> set[str]:
        """The configurations this command searches (TPE: the whole grid)."""
        return {space.config_key(c) for c in self.plan}

    def _reap(self, study, trials) -> bool:
        """Mark RUNNING trials whose worker is gone as interrupted (their configuration runs again)."""
        reaped = False
        for t in trials:
            if st.state_name(t) == "RUNNING" and not st.is_alive(t, stale_after_s=self.spec.stale_after_s):
                owner = t.user_attrs.get("owner") or {}
                who = f"{owner.get('host', '?')}:{owner.get('pid', '?')}"
                st.mark_failed(study, self.storage, t, "interrupted", f"its worker ({who}) stopped during the trial")
                self.console.print(f"{self.tag}trial #{t.number} was interrupted (worker {who} is gone): "
                                   "its configuration runs again, resuming its run directory", markup=False)
                reaped = True
        return reaped

    @staticmethod
    def _status(trials) -> dict[str, str]:
        """config_key -> "done" / "live" for the configurations that need no new trial."""
        status: dict[str, str] = {}
        for t in trials:
            if st.is_ignored(t):
                continue
            key = t.user_attrs["config_key"]
            if st.is_done(t):
                status[key] = "done"
            elif st.state_name(t) in ("WAITING", "RUNNING") and status.get(key) != "done":
                status[key] = "live"
        return status

    def _dist(self, phase: str, key: str, value: Any):
        # optuna: the optional `sweep` extra, imported once a sweep runs (import_optuna names the extra)
        from optuna.distributions import IntDistribution

        if phase == "final" and key == "train.seed":
            return IntDistribution(0, max([value, *self.spec.seeds]))
        values = list(self.values.get(key, []))
        if value not in values:
            values.append(value)
        return _distribution(values, self.spec.sampler if phase == "tune" else "final")

    def _enqueue(self, study, phase: str, config: dict, index: int, total: int) -> None:
        params = {key: _param(value, self._dist(phase, key, value)) for key, value in config.items()}
        study.enqueue_trial(params, user_attrs={"config": json.dumps(config), "config_key": space.config_key(config),
                                                "index": index, "total": total, "phase": phase})

    def _work(self, study, phase: str, configs: list[dict]) -> None:
        """Run trials until every configuration of ``configs`` is done (by any worker)."""
        keys = {space.config_key(c): i for i, c in enumerate(configs)}
        waited_for = None
        while True:
            trials = self._trials(study)
            if self._reap(study, trials):
                continue
            status = self._status(trials)
            missing = [c for c in configs if space.config_key(c) not in status]
            for c in missing:
                self._enqueue(study, phase, c, keys[space.config_key(c)], len(configs))
            if missing:
                continue
            pending = [k for k in keys if status[k] != "done"]
            if not pending:
                return
            if any(st.state_name(t) == "WAITING" for t in trials):
                trial = self._claim(study, wanted=set(keys))
                if trial is not None:
                    self._run(study, trial, phase)
                continue
            if waited_for != len(pending):
                self.console.print(f"{self.tag}waiting for {len(pending)} {phase} trial(s) other workers are running",
                                   markup=False)
                waited_for = len(pending)
            time.sleep(self.spec.poll_s)

    def _work_tpe(self) -> None:
        """TPE: ``spec.trials`` distinct configurations, each proposed by the sampler."""
        study, target = self.tune, self.spec.trials
        index = {space.config_key(c): i for i, c in enumerate(self.plan)}
        dists = {k: _distribution(v, "tpe") for k, v in self.values.items()}
        decode = {k: {json.dumps(_label(v)): v for v in vals} for k, vals in self.values.items()}
        duplicates, waited = 0, False
        while True:
            trials = self._trials(study)
            if self._reap(study, trials):
                continue
            status = self._status(trials)
            # Interrupted configurations run again first (they resume their run directories).
            tried = {t.user_attrs["config_key"]: t for t in trials if not st.is_ignored(t)}
            again = [k for k, t in tried.items() if k not in status]
            for k in again:
                self._enqueue(study, "tune", st.trial_config(tried[k]), index[k], target)
            if again:
                continue
            waiting = any(st.state_name(t) == "WAITING" for t in trials)
            if len(status) >= target and not waiting:
                if all(s == "done" for s in status.values()):
                    return
                if not waited:
                    self.console.print(f"{self.tag}waiting for the trials other workers are running", markup=False)
                    waited = True
                time.sleep(self.spec.poll_s)
                continue
            if waiting:
                trial = self._claim(study, wanted=set(index))
                if trial is not None:
                    self._run(study, trial, "tune")
                continue
            if duplicates >= TPE_MAX_DUPLICATES:
                # The sampler keeps proposing finished configurations: take the next untried one.
                untried = [c for c in self.plan if space.config_key(c) not in status]
                if not untried:
                    return
                self._enqueue(study, "tune", untried[0], index[space.config_key(untried[0])], target)
                duplicates = 0
                continue
            trial = study.ask()
            if "config_key" in trial.user_attrs:  # popped a queued trial another worker just added
                claimed = self._claim(study, wanted=set(index), trial=trial)
            else:
                config = {k: decode[k][json.dumps(st.suggest(trial, k, dists[k]))] for k in self.values}
                key = space.config_key(config)
                for name, value in (("config", json.dumps(config)), ("config_key", key), ("index", index[key]),
                                    ("total", target), ("phase", "tune")):
                    trial.set_user_attr(name, value)
                if key in status:
                    duplicates += 1
                    self._retell_duplicate(study, trial, key, trials)
                    continue
                duplicates = 0
                claimed = self._claim(study, wanted=set(index), trial=trial)
            if claimed is not None:
                self._run(study, claimed, "tune")

    def _retell_duplicate(self, study, trial, key: str, trials) -> None:
        """TPE proposed a configuration again: tell it the known result (nothing trains)."""
        done = [t for t in trials if not st.is_ignored(t) and t.user_attrs.get("config_key") == key and st.is_done(t)]
        trial.set_user_attr("duplicate_of", done[0].number if done else -1)
        if done and st.state_name(done[0]) == "COMPLETE":
            study.tell(trial, done[0].value)
        else:
            study.tell(trial, state=st.trial_state("FAIL"))

    def _claim(self, study, *, wanted: set[str], trial=None):
        """Pop a queued trial and make it ours; None if there was none, if it is not part of the
        current plan (left queued by an earlier run with other seeds), or if another worker holds
        its configuration (two workers may queue the same configuration at the same moment)."""
        if trial is None:
            trial = study.ask()
            if "config_key" not in trial.user_attrs:
                self._drop(study, trial, "empty", "the queue was emptied by another worker")
                return None
        trial.set_user_attr("owner", self.owner)
        trial.set_user_attr("heartbeat", time.time())
        key = trial.user_attrs["config_key"]
        if key not in wanted:
            self._drop(study, trial, "superseded", "not part of the current plan (queued by an earlier run)")
            return None
        for t in self._trials(study):
            if t.number == trial.number or st.is_ignored(t) or t.user_attrs.get("config_key") != key:
                continue
            if st.is_done(t) or (st.state_name(t) == "RUNNING" and t.number < trial.number
                                 and st.is_alive(t, stale_after_s=self.spec.stale_after_s)):
                self._drop(study, trial, "superseded", f"trial #{t.number} holds this configuration")
                return None
        return trial

    @staticmethod
    def _drop(study, trial, failure: str, reason: str) -> None:
        trial.set_user_attr("failure", failure)
        trial.set_user_attr("reason", reason)
        study.tell(trial, state=st.trial_state("FAIL"))

    # ------------------------------------------------------------------------ one trial
    def _run_dir(self, study, trial, phase: str, config: dict) -> str:
        """The configuration's run directory: the one an earlier trial of it used, else a new name."""
        key = trial.user_attrs["config_key"]
        for t in self._trials(study):
            if t.user_attrs.get("config_key") == key and isinstance(t.user_attrs.get("run_dir"), str):
                return t.user_attrs["run_dir"]
        if phase == "final":
            return f"final/seed{config['train.seed']}"
        return f"trials/{trial.user_attrs.get('index', trial.number) + 1:03d}-{space.short_name(config)}"

    def _run(self, study, trial, phase: str) -> None:
        spec = self.spec
        config = json.loads(trial.user_attrs["config"])
        for key, value in config.items():
            st.suggest(trial, key, self._dist(phase, key, value))  # records the params (queued values)
        rel = self._run_dir(study, trial, phase, config)
        trial.set_user_attr("run_dir", rel)
        run_dir = self.out / rel
        overrides = tune_overrides(spec, config) if phase == "tune" else final_overrides(spec, config)
        i, total = trial.user_attrs.get("index", -1), trial.user_attrs.get("total", "?")
        if phase == "tune":
            label = f"trial {i + 1}/{total}"
            what = space.config_text(config)
        else:
            label = f"final {i + 1}/{total}"
            what = f"train.seed={config['train.seed']} " + space.config_text(
                {k: v for k, v in config.items() if k != "train.seed"})
        self.console.print(f"{self.mtag}[bold]{label}[/] {escape(what)}  -> {escape(str(run_dir))}", highlight=False)
        t0 = time.perf_counter()
        on_validate = self._on_validate(trial, run_dir) if phase == "tune" else None
        try:
            with st.Heartbeat(self.storage, st.trial_id(trial), spec.heartbeat_s):
                summary, events = self._train(run_dir, overrides, on_validate, final=phase == "final")
        except Exception as exc:  # noqa: BLE001 - sorted in _failed; bugs are re-raised there
            self._failed(study, trial, exc, label, time.perf_counter() - t0)
            return
        except BaseException:
            self._abandon(study, trial)
            raise
        seconds = time.perf_counter() - t0
        if phase == "tune":
            self._tell_tune(study, trial, summary, events, label, seconds)
        else:
            self._tell_final(study, trial, summary, label, seconds)

    def _on_validate(self, trial, run_dir: Path):
        """The trainer's hook: report each val top-1 to Optuna; with --prune, stop a trial the
        median rule condemns (after the warm-up)."""
        spec, total = self.spec, []

        def on_validate(step: int, epoch: int, top1: float) -> str | None:
            if top1 is None or not math.isfinite(top1):
                return None
            trial.report(float(top1), step)
            if not spec.prune:
                return None
            if not total:
                total.append(_total_steps(run_dir) or 0)
            # Not in the warm-up, and not at the last evaluation: the run is complete there, and
            # pruning would only throw its result away.
            if step < PRUNE_WARMUP_FRACTION * total[0] or step >= total[0]:
                return None
            if trial.should_prune():
                return (f"pruned: val top-1 {top1:.2f}% at step {step} (epoch {epoch}) is below the median of the "
                        "earlier trials at this step")
            return None

        return on_validate

    def _train(self, run_dir: Path, overrides: list[str], on_validate, *, final: bool) -> tuple[dict, list[dict]]:
        """Train (or resume, or only read) the run in ``run_dir``; returns its summary and events."""
        spec = self.spec
        self._set_aside_if_foreign(run_dir, overrides)
        summary_path = run_dir / "summary.json"
        if not summary_path.is_file():
            resume = (run_dir / "recipe.yaml").is_file()
            if resume:
                self.console.print(f"{self.tag}  resuming {run_dir}", markup=False)
            _apply(spec.recipe, model=spec.model, data=spec.data, overrides=overrides,
                   out=None if resume else str(run_dir), resume=str(run_dir) if resume else None,
                   console=self.train_console, on_validate=on_validate)
        elif final:
            self._merge_if_missing(run_dir)  # killed between training and merging
        return read_json(summary_path), _read_events(run_dir)

    def _set_aside_if_foreign(self, run_dir: Path, overrides: list[str]) -> None:
        """A run directory left by another configuration (a deleted study, a new best
        configuration for the final runs) is moved to ``OUT/replaced/``, not mixed in."""
        if not (run_dir / "recipe.yaml").is_file():
            return
        expected = load_recipe(self.spec.recipe, overrides, model=self.spec.model,
                               data=self.spec.data).with_absolute_paths()
        try:
            old = read_run_recipe(run_dir)
        except UserError:
            old = None
        diffs = [] if old is None else [d for d in recipe_differences(with_added_keys(old), expected.to_dict())
                                        if not d.startswith("model.num_classes")]
        if old is not None and not diffs:
            return
        target = self.out / "replaced" / f"{run_dir.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(run_dir), str(target))
        self.console.print(f"{self.tag}  {run_dir} held another configuration "
                           f"({'; '.join(diffs[:2]) or 'unreadable recipe'}): moved to {target}", markup=False)

    def _merge_if_missing(self, run_dir: Path) -> None:
        recipe = load_run_recipe(run_dir)
        if recipe.train.merge and merged_kind(run_dir) is None:
            merge_run(run_dir, mode=recipe.eval.merge_mode)

    def _failed(self, study, trial, exc: Exception, label: str, seconds: float) -> None:
        """A trial that ended without a result: pruned, diverged, refused (UserError, out of
        memory) are recorded; anything else is a bug: recorded as crashed (run again next time)
        and re-raised."""
        if isinstance(exc, TrainingStopped):
            trial.set_user_attr("reason", exc.reason)
            trial.set_user_attr("seconds", seconds)
            trial.set_user_attr("steps", exc.step)
            study.tell(trial, state=st.trial_state("PRUNED"))
            self.console.print(f"{self.tag}{label}: {exc.reason} ({_fmt_seconds(seconds)})", markup=False)
            self._eta(study)
            return
        if isinstance(exc, TrainingDiverged):
            failure = "diverged"
        elif isinstance(exc, UserError) or type(exc).__name__ == "OutOfMemoryError":
            failure = "error"
        else:
            failure = "crashed"
        if isinstance(exc, UserError):  # the run directory is known; the hint is worth keeping
            reason = exc.message + (f"\n  hint: {exc.hint}" if exc.hint else "")
        else:
            reason = f"{type(exc).__name__}: {exc}".strip()
        trial.set_user_attr("seconds", seconds)
        st.mark_failed(study, self.storage, trial, failure, reason)
        self.console.print(f"{self.tag}{label}: failed ({failure}) after {_fmt_seconds(seconds)}: "
                           f"{reason.splitlines()[0]}", markup=False)
        if failure == "crashed":
            raise exc
        self._eta(study)

    def _abandon(self, study, trial) -> None:
        """An interrupt (Ctrl-C): the trial is marked interrupted; the next run resumes it."""
        st.mark_failed(study, self.storage, trial, "interrupted", "the sweep was interrupted during this trial")

    def _tell_tune(self, study, trial, summary: dict, events: list[dict], label: str, seconds: float) -> None:
        vals = [e for e in events if e.get("event") == "eval" and e.get("split") == "val"]
        last = vals[-1].get("top1") if vals else None
        best = summary.get("best_val_top1")
        total = summary.get("wall_seconds", seconds)
        trial.set_user_attr("val_best", best)
        trial.set_user_attr("seconds", total)
        trial.set_user_attr("steps", summary.get("steps"))
        if last is None:
            st.mark_failed(study, self.storage, trial, "error",
                           "the run logged no finite val top-1 (does the data have a validation split?)")
            self.console.print(f"{self.tag}{label}: failed: no val score", markup=False)
            return
        study.tell(trial, float(last))
        top = best_trial(study, self.plan_keys())
        lead = f"  · best so far {top[0].value:.2f}% ({space.config_text(top[1])})" if top else ""
        self.console.print(f"{self.mtag}{label}: val top-1 [bold]{last:.2f}%[/] at the end (best epoch {_pct(best)}) "
                           f"in {_fmt_seconds(total)}{escape(lead)}", highlight=False)
        self._eta(study)

    def _tell_final(self, study, trial, summary: dict, label: str, seconds: float) -> None:
        test = summary.get("test_top1")
        value = test if test is not None else summary.get("final_top1")
        trial.set_user_attr("test_top1", test)
        trial.set_user_attr("val_best", summary.get("best_val_top1"))
        trial.set_user_attr("split", summary.get("final_split"))
        trial.set_user_attr("seconds", summary.get("wall_seconds", seconds))
        if value is None:
            st.mark_failed(study, self.storage, trial, "error", "the final run has neither a test nor a val score")
            return
        study.tell(trial, float(value))
        self.console.print(f"{self.mtag}{label}: {summary.get('final_split') or 'test'} top-1 [bold]{value:.2f}%[/] "
                           f"in {_fmt_seconds(summary.get('wall_seconds', seconds))}", highlight=False)

    def _eta(self, study) -> None:
        trials = [t for t in self._trials(study) if not st.is_ignored(t)]
        secs = [t.user_attrs["seconds"] for t in trials
                if st.is_done(t) and isinstance(t.user_attrs.get("seconds"), (int, float))]
        total = len(self.plan) if self.spec.sampler == "grid" else (self.spec.trials or 0)
        done = len({t.user_attrs["config_key"] for t in trials if st.is_done(t)})
        left = max(0, total - done)
        if secs and left:
            eta = statistics.fmean(secs) * left / max(1, self.spec.workers)
            later = ("any edge extension and " if self.spec.extend_edges else "") + "the final runs"
            self.console.print(f"{self.tag}  {done}/{total} trials done, ~{_fmt_seconds(eta)} left before {later}",
                               markup=False)

    # ------------------------------------------------------------------- edge extension
    def _extend(self) -> bool:
        """After a complete round: add the next value beyond each edge the best value sits on.
        True when new configurations were added to the plan. Only the plan's trials count, so a
        rerun replays the same decisions whatever else the study holds."""
        best = best_trial(self.tune, self.plan_keys())
        if best is None:
            return False
        config = best[1]
        added = False
        for key, values in self.values.items():
            side = space.edge_side(values, config.get(key))
            if side is None:
                continue
            if space.extension_count(values, self.spec.grid[key], side) >= space.MAX_EXTENSIONS:
                self.edge_notes[(key, side)] = f"extended {space.MAX_EXTENSIONS} times (the limit)"
                continue
            new = space.next_edge_value(values, side)
            if new is None:
                self.edge_notes[(key, side)] = "no further value (integer grid)"
                continue
            problems = space.value_problems(self.spec.recipe, key, new, model=self.spec.model, data=self.spec.data,
                                            overrides=self.spec.overrides)
            if problems:
                self.edge_notes[(key, side)] = f"the next value, {space.value_text(new)}, is invalid: {problems[0]}"
                continue
            values.append(new)
            self.edge_notes.pop((key, side), None)
            self.console.print(f"{self.tag}best {key}={space.value_text(config[key])} is the "
                               f"{'smallest' if side == 'low' else 'largest'} value searched: adding "
                               f"{space.value_text(new)}", markup=False)
            added = True
        if added:
            known = {space.config_key(c) for c in self.plan}
            self.plan += [c for c in space.configurations(self.values) if space.config_key(c) not in known]
        return added


def _apply(*args, **kwargs):
    """:func:`surgeon.apply.apply_recipe` (one name to patch in tests)."""
    return apply_recipe(*args, **kwargs)


def best_trial(study, keys: set[str] | None = None) -> tuple[Any, dict] | None:
    """The best complete trial of a tune study (among configurations ``keys``, default all) and
    its configuration: the highest val top-1 at the end of the schedule; ties go to the higher
    best-epoch val top-1, then the earlier trial."""
    done = [t for t in study.get_trials(deepcopy=False)
            if st.state_name(t) == "COMPLETE" and not st.is_ignored(t) and t.value is not None
            and (keys is None or t.user_attrs["config_key"] in keys)]
    if not done:
        return None

    def rank(t):
        best = t.user_attrs.get("val_best")
        return (-t.value, -(best if isinstance(best, (int, float)) else -1.0), t.user_attrs.get("index", 0), t.number)

    top = min(done, key=rank)
    return top, st.trial_config(top)


# ---------------------------------------------------------------------------- collection

def _row_state(t) -> str:
    s = st.state_name(t)
    if s == "FAIL":
        return "interrupted" if t.user_attrs.get("failure") in ("interrupted", "crashed") else "failed"
    return s.lower()


def _deciding(trials: list):
    """The trial that speaks for a configuration: its result if it has one, else its latest attempt."""
    done = [t for t in trials if st.is_done(t)]
    return done[0] if done else max(trials, key=lambda t: t.number)


def collect(study_tune, study_final, seeds: list[int], keys: set[str]) -> tuple[list[TrialResult],
                                                                                TrialResult | None, list[FinalResult]]:
    """The report's rows, from the storage: one per configuration of ``keys`` (the search), in
    trial order, the best configuration, and one row per final seed."""
    by_key: dict[str, list] = {}
    for t in study_tune.get_trials(deepcopy=False):
        if not st.is_ignored(t) and t.user_attrs["config_key"] in keys:
            by_key.setdefault(t.user_attrs["config_key"], []).append(t)
    rows = []
    for key, ts in by_key.items():
        t = _deciding(ts)
        a = t.user_attrs
        val_best = a.get("val_best")
        if val_best is None and t.intermediate_values:  # pruned: the best evaluation before it stopped
            val_best = max(t.intermediate_values.values())
        rows.append(TrialResult(number=min(x.number for x in ts), index=a.get("index", -1), config=st.trial_config(t),
                                state=_row_state(t), val_last=t.value if st.state_name(t) == "COMPLETE" else None,
                                val_best=val_best, seconds=a.get("seconds"), steps=a.get("steps"),
                                run_dir=a.get("run_dir"), reason=a.get("reason"), attempts=len(ts),
                                failure=a.get("failure") if st.state_name(t) == "FAIL" else None))
    rows.sort(key=lambda r: (r.index, r.number))
    best = best_trial(study_tune, keys)
    best_row = None
    if best is not None:
        best_row = next(r for r in rows if space.config_key(r.config) == best[0].user_attrs["config_key"])
    finals = []
    if best is not None and study_final is not None:
        by_seed: dict[int, list] = {}
        wanted = {space.config_key({**best[1], "train.seed": s}): s for s in seeds}
        for t in study_final.get_trials(deepcopy=False):
            if not st.is_ignored(t) and t.user_attrs.get("config_key") in wanted:
                by_seed.setdefault(wanted[t.user_attrs["config_key"]], []).append(t)
        for s in seeds:
            if s not in by_seed:
                finals.append(FinalResult(seed=s, state="not run"))
                continue
            t = _deciding(by_seed[s])
            a = t.user_attrs
            test = a.get("test_top1")
            finals.append(FinalResult(seed=s, state=_row_state(t),
                                      test_top1=test if test is not None or st.state_name(t) != "COMPLETE" else t.value,
                                      val_top1=a.get("val_best"), split=a.get("split"), seconds=a.get("seconds"),
                                      run_dir=a.get("run_dir"), reason=a.get("reason")))
    return rows, best_row, finals


def searched_values(grid: dict, rows: list[TrialResult]) -> dict:
    """Each key's values: the grid's, then those only trials have (edge extensions)."""
    values = {k: list(v) for k, v in grid.items()}
    for r in rows:
        for k, v in (r.config or {}).items():
            if k in values and v not in values[k]:
                values[k].append(v)
    return values


def edge_notes(values: dict, best: TrialResult | None, notes: dict, extend: bool) -> list[EdgeNote]:
    """The numeric keys whose best value is the smallest/largest value searched."""
    out = []
    if best is None:
        return out
    for key, vals in values.items():
        side = space.edge_side(vals, best.config.get(key))
        if side is None:
            continue
        if (key, side) in notes:
            note = notes[(key, side)]
        elif extend:
            note = "not extended"
        else:
            note = "not extended (rerun with --extend-edges, or widen the grid)"
        out.append(EdgeNote(key, best.config[key], side, note))
    return out


# ------------------------------------------------------------------------------ entry point

def _hash(obj) -> str:
    return hashlib.sha1(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:8]


def parse_seeds(seeds) -> list[int] | None:
    """``"0,1,2"`` or ``[0, 1, 2]`` -> ``[0, 1, 2]``; None stays None; empty: no final runs."""
    if seeds is None:
        return None
    if isinstance(seeds, str):
        try:
            seeds = [int(p) for p in seeds.split(",") if p.strip()]
        except ValueError:
            raise UserError(f"--seeds {seeds!r}: expected comma-separated integers, e.g. 0,1,2",
                            where="--seeds") from None
    seeds = list(seeds)
    if any(not isinstance(s, int) or isinstance(s, bool) or s < 0 for s in seeds):
        raise UserError(f"--seeds {seeds!r}: expected integers >= 0, e.g. 0,1,2", where="--seeds")
    if len(set(seeds)) != len(seeds):
        raise UserError(f"--seeds {seeds!r}: a seed is listed twice", where="--seeds")
    return seeds


def prepare_spec(recipe: str, *, grid, data: str | None = None, model: str | None = None,
                 overrides: list[str] | None = None, sampler: str | None = None, trials: int | None = None,
                 seeds=None, workers: int = 1, storage: str | None = None, study: str | None = None,
                 prune: bool = False, extend_edges: bool = False, out: str | Path | None = None,
                 gpus: str | list | None = None, **timing) -> SweepSpec:
    """Check everything a sweep is given and build its :class:`SweepSpec`; nothing trains.

    Raises:
        UserError: Optuna missing, a bad grid (every problem listed), a recipe that does not
            load, inconsistent options (``gpus``: see :func:`surgeon.gpus.parse_gpus`), or an
            output directory that holds another sweep.
    """
    st.import_optuna()
    grid, grid_problems = space.parse_grid_problems(grid)
    overrides = list(overrides or [])
    if sampler is None:
        sampler = "tpe" if trials is not None else "grid"
    if sampler not in SAMPLERS:
        raise UserError(f"--sampler {sampler!r}: expected grid or tpe", where="--sampler")
    n_grid = math.prod(len(v) for v in grid.values()) if grid else 0
    if trials is not None and sampler == "grid":
        raise UserError(f"--trials is for --sampler tpe: the grid sampler runs every combination ({n_grid} here)",
                        where="--trials")
    if sampler == "tpe" and extend_edges:
        raise UserError("--extend-edges needs the grid sampler (TPE chooses among the grid's values, and Optuna "
                        "cannot grow that list during a study)", where="--extend-edges",
                        hint="use --sampler grid, or widen the grid")
    if sampler == "tpe":
        if trials is None or trials < 1:
            raise UserError("--sampler tpe needs --trials N (N >= 1)", where="--trials")
        if trials > n_grid:
            raise UserError(f"--trials {trials}: the grid has only {n_grid} configurations", where="--trials",
                            hint=f"use --trials {n_grid} or fewer (or the grid sampler to run them all)")
    if workers < 1:
        raise UserError(f"--workers {workers}: expected 1 or more", where="--workers")
    gpu_values = None
    if gpus is not None:
        gpu_values = parse_gpus(gpus if isinstance(gpus, str) else ",".join(str(g) for g in gpus), workers=workers)
        workers = len(gpu_values)
    base = load_recipe(recipe, overrides, model=model, data=data)  # the recipe itself must load first
    space.validate_grid(recipe, grid, model=model, data=data, overrides=overrides, problems=grid_problems)
    parsed = parse_seeds(seeds)
    seed_list = parsed if parsed is not None else [base.train.seed]
    # The sweep's identity: the resolved recipe (as written: relative paths stay relative, so
    # the same command on several machines names the same study), the grid and the sampler.
    # (Keys added to recipes since, at their old value, are left out: the same sweep keeps its name.)
    digest = _hash({"recipe": without_added_defaults(base.to_dict()), "grid": grid, "sampler": sampler})
    name = f"{base.name}-{dataset_short_name(base.data.source)}-{digest}"
    spec = SweepSpec(recipe=recipe, grid=grid, out=str(Path(out) if out else Path("runs") / "sweeps" / name),
                     study=study or name, digest=digest, model=model, data=data, overrides=overrides,
                     sampler=sampler, trials=trials, seeds=seed_list, prune=prune, extend_edges=extend_edges,
                     storage=storage, workers=workers, gpus=gpu_values, sampler_seed=base.train.seed, **timing)
    _check_sweep_dir(spec)
    return spec


def _check_sweep_dir(spec: SweepSpec) -> None:
    """``OUT/sweep.json`` names the sweep a directory holds; another sweep is refused there."""
    root = Path(spec.out)
    info = root / "sweep.json"
    if root.exists() and not root.is_dir():
        raise UserError(f"{root} exists and is not a directory", where="--out")
    if not info.is_file():
        return
    try:
        old = json.loads(info.read_text(encoding="utf-8"))
    except ValueError:
        old = {}
    if old.get("digest") not in (None, spec.digest):
        changed = [k for k in ("recipe", "model", "data", "overrides", "grid", "sampler")
                   if json.dumps(old.get(k), sort_keys=True) != json.dumps(getattr(spec, k), sort_keys=True)]
        raise UserError(f"{root} holds another sweep ({', '.join(changed) or 'the resolved recipe'} differ"
                        f"{'s' if len(changed) == 1 else ''})", where=str(info),
                        hint="continue it with its own command, or pass another --out")
    stored = old.get("storage_arg")
    if spec.storage is None and stored:
        # A rerun without --storage keeps the storage the sweep used (a URL with a password is
        # not written to disk: it must be given again).
        if "***@" in stored:
            raise UserError(f"this sweep keeps its state in {stored}: pass --storage again", where=str(info))
        spec.storage = stored


def _write_sweep_json(spec: SweepSpec, storage_text: str) -> None:
    root = Path(spec.out)
    root.mkdir(parents=True, exist_ok=True)
    write_json(root / "sweep.json", {
        "digest": spec.digest, "study": spec.study, "storage": storage_text, "storage_arg": st.masked(spec.storage),
        "recipe": spec.recipe, "model": spec.model, "data": spec.data, "overrides": spec.overrides,
        "grid": spec.grid, "sampler": spec.sampler, "trials": spec.trials, "seeds": spec.seeds,
        "prune": spec.prune, "extend_edges": spec.extend_edges,
    })


def _preflight(spec: SweepSpec) -> int:
    """Build the first trial's data and check its weights (what ``surgeon apply`` checks before
    a run directory exists), so a bad data source or weights file stops the sweep in seconds
    instead of failing every trial. Returns the training images of a trial."""
    config = space.configurations(spec.grid)[0]
    _, splits = prepare(spec.recipe, model=spec.model, data=spec.data, overrides=tune_overrides(spec, config))
    if splits.val is None or len(splits.val) == 0:
        raise UserError("the tune protocol needs a validation split and the data has none",
                        where="data.source", hint="set data.val_fraction (e.g. --set data.val_fraction=0.2)")
    return len(splits.train)


def _worker_process(spec_dict: dict, index: int, log_path: str) -> None:
    """Entry point of a ``--workers`` process (spawned: a fresh interpreter)."""
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, spec_dict["workers"])))
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    with open(log_path, "a", encoding="utf-8") as log:
        train_console = Console(file=log, highlight=False, soft_wrap=True, width=160)
        try:
            _Worker(SweepSpec(**spec_dict), index=index, console=console, train_console=train_console).run()
        except UserError as exc:
            console.print(f"[w{index}] error: {exc}", markup=False)
            sys.exit(2)
        except KeyboardInterrupt:
            sys.exit(130)


def run_sweep(recipe: str, *, grid, data: str | None = None, model: str | None = None,
              overrides: list[str] | None = None, sampler: str | None = None, trials: int | None = None,
              seeds=None, workers: int = 1, storage: str | None = None, study: str | None = None,
              prune: bool = False, extend_edges: bool = False, out: str | Path | None = None,
              console: Console | None = None, report: bool = True, gpus: str | list | None = None,
              **timing) -> SweepResult:
    """Run (or continue) a sweep and its final runs; write ``OUT/report.md``/``.html`` and ``result.json``.

    Args:
        recipe: recipe file or built-in name.
        grid: ``["train.base_lr=[1e-2,1e-3]", ...]`` or ``{"train.base_lr": [1e-2, 1e-3]}``.
        data / model / overrides: as ``surgeon apply``'s ``--data`` / ``--model`` / ``--set``.
        sampler: ``grid`` (default: every combination) or ``tpe`` (the default when ``trials``
            is given: ``trials`` configurations among the grid's, chosen by Optuna's TPE).
        seeds: ``train.seed`` of the final runs (``[0, 1, 2]`` or ``"0,1,2"``); default the
            recipe's ``train.seed``; ``[]``: tune only (a suite trains its own final cells).
        workers: worker processes on this machine, sharing the storage.
        storage: Optuna storage (default: the journal file ``OUT/study.journal``); the same URL
            on several machines makes them share one study (see :func:`.study.open_storage`).
        study: study name (default ``<recipe>-<data>-<hash of the search>``; final runs go to
            ``<study>-final``).
        prune: stop hopeless trials early (median rule on the val top-1 of each evaluation,
            after :data:`PRUNE_STARTUP_TRIALS` complete trials and the first third of a schedule).
        extend_edges: extend numeric keys whose best value is on the edge of their grid.
        out: the sweep directory (default ``runs/sweeps/<recipe>-<data>-<hash>``).
        report: write the report (md, html, plot, result.json).
        gpus: ``"0,1,2,3"`` (or ``[0, 1, 2, 3]``): one worker process per GPU, each seeing only
            its GPU (``CUDA_VISIBLE_DEVICES``); replaces ``workers``. This process only waits.
        timing: ``poll_s`` / ``heartbeat_s`` / ``stale_after_s`` of :class:`SweepSpec` (seconds).

    Returns:
        a :class:`SweepResult` (``.best_config``, ``.test_mean``, ``.trials`` ...).
    """
    console = console or Console(stderr=True, highlight=False, soft_wrap=True)
    spec = prepare_spec(recipe, grid=grid, data=data, model=model, overrides=overrides, sampler=sampler,
                        trials=trials, seeds=seeds, workers=workers, storage=storage, study=study, prune=prune,
                        extend_edges=extend_edges, out=out, gpus=gpus, **timing)
    root = Path(spec.out)
    worker = _Worker(spec, index=0, console=console)
    if not _finished(worker):
        _preflight(spec)
    _write_sweep_json(spec, worker.storage_text)
    n = len(worker.plan) if spec.sampler == "grid" else spec.trials
    what = "grid configurations" if spec.sampler == "grid" else "TPE trials"
    console.print(f"sweep {spec.study}: {n} {what} (protocol tune), then {len(spec.seeds)} final run(s) "
                  f"(protocol final); storage {worker.storage_text}; "
                  f"{spec.workers} worker(s)"
                  + (f" on GPU {','.join(spec.gpus)}" if spec.gpus else "") + f" -> {root}", markup=False)
    procs = []
    log_file = None
    if spec.workers > 1 or spec.gpus:
        ctx = multiprocessing.get_context("spawn")
        logs = root / "logs"
        logs.mkdir(parents=True, exist_ok=True)
        if not spec.gpus:
            log_file = open(logs / "worker0.log", "a", encoding="utf-8")
            worker.train_console = Console(file=log_file, highlight=False, soft_wrap=True, width=160)
        # With --gpus every worker is spawned, each seeing one GPU (this process may already
        # have initialised CUDA, whose device list is then fixed); without, worker 0 is this process.
        for k in range(0 if spec.gpus else 1, spec.workers):
            with pinned_env(spec.gpus[k]) if spec.gpus else contextlib.nullcontext():
                p = ctx.Process(target=_worker_process, args=(asdict(spec), k, str(logs / f"worker{k}.log")),
                                name=f"surgeon-sweep-w{k}")
                p.start()
            procs.append(p)
        console.print(f"training logs: {logs}/worker<k>.log"
                      + (" (worker k on GPU " + ", ".join(f"{k}:{g}" for k, g in enumerate(spec.gpus)) + ")"
                         if spec.gpus else ""), markup=False)
    try:
        if not spec.gpus:
            worker.run()
    except BaseException:
        for p in procs:
            if p.is_alive():
                p.terminate()
        raise
    finally:
        for p in procs:
            p.join()
        if log_file is not None:
            log_file.close()
    for p in procs:
        if p.exitcode not in (0, None):
            console.print(f"warning: worker {p.name} exited with code {p.exitcode} (its trials were taken over)",
                          markup=False)
    if spec.gpus and all(p.exitcode != 0 for p in procs):
        # A worker returns only once every trial is done: none did, so the sweep is not finished.
        raise UserError(f"every GPU worker of the sweep stopped before it finished (exit codes "
                        f"{', '.join(str(p.exitcode) for p in procs)})", where=str(root / "logs"),
                        hint="see the errors above and the logs; run the same command again to continue")
    result = build_result(spec, worker)
    if report:
        result.report = write_sweep_report(result)
    return result


def _finished(worker: _Worker) -> bool:
    """Whether the tune study already has every grid configuration done (a rerun to report)."""
    status = worker._status(worker._trials(worker.tune))
    return bool(status) and all(status.get(space.config_key(c)) == "done" for c in worker.plan)


def build_result(spec: SweepSpec, worker: _Worker) -> SweepResult:
    """The :class:`SweepResult` of a sweep, read from its storage."""
    rows, best, finals = collect(worker.tune, worker.final if spec.seeds else None, spec.seeds, worker.plan_keys())
    values = searched_values(worker.values, rows)
    return SweepResult(out=Path(spec.out), study=spec.study, storage=worker.storage_text, recipe=spec.recipe,
                       data=spec.data, model=spec.model, sampler=spec.sampler, base_grid=spec.grid, grid=values,
                       trials=rows, best=best, edges=edge_notes(values, best, worker.edge_notes, spec.extend_edges),
                       finals=finals, seeds=list(spec.seeds), overrides=list(spec.overrides),
                       extend_edges=spec.extend_edges)
