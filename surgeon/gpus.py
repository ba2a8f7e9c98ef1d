"""``--gpus 0,1,2,3`` of ``surgeon suite`` / ``surgeon sweep``: one worker process per GPU.

Each worker is a fresh (spawned) interpreter whose environment carries exactly one GPU in
``CUDA_VISIBLE_DEVICES``, so inside it that GPU is ``cuda:0`` and the run it trains is an
ordinary single-process run (``train.device: auto`` picks it). The GPU a run used is recorded in
its ``summary.json`` (``environment.cuda_visible_devices``).

:func:`parse_gpus` checks the flag; :func:`run_on_gpus` runs a list of independent tasks (a
suite's cells) on such workers, each task exactly once. A sweep's workers share its Optuna
study instead (:func:`surgeon.sweep.runner.run_sweep`), started with :func:`pinned_env`.

This module does not import torch at import time (the spawned workers and ``--help`` stay light).
"""
from __future__ import annotations

import contextlib
import multiprocessing
import os
import sys
import time
import traceback
from dataclasses import dataclass, field
from multiprocessing.connection import wait
from pathlib import Path
from typing import Any, Callable

from surgeon.errors import UserError

#: Seconds between looks at the workers while waiting for a task to finish.
POLL_S = 1.0


def cuda_device_count() -> int:
    """CUDA devices this process sees (0 without CUDA). Tests replace this function."""
    import torch  # deferred: the spawned workers and `--help` need no torch (seconds)

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def parse_gpus(text: str, *, workers: int = 1, where: str = "--gpus") -> list[str]:
    """``"0,2"`` -> the ``CUDA_VISIBLE_DEVICES`` value of each worker, e.g. ``["0", "2"]``.

    Indices count the devices this process sees: under ``CUDA_VISIBLE_DEVICES=4,5,6,7`` the
    index ``1`` is GPU ``5`` (the value given to that worker).

    Args:
        text: comma-separated distinct GPU indices (>= 0).
        workers: the ``--workers`` also given; more than 1 is refused (with ``--gpus`` a worker
            is a GPU: ``--gpus 0,1,2,3`` means 4 workers).

    Raises:
        UserError: a malformed list, a repeated index, ``--workers`` > 1, no CUDA, or an index
            beyond the devices this machine has.
    """
    if workers > 1:
        raise UserError(f"--gpus {text} and --workers {workers}: with --gpus each GPU is one worker",
                        where=where, hint=f"drop --workers (--gpus {text} runs {len(text.split(','))} workers)")
    parts = [p.strip() for p in str(text).split(",")]
    if not parts or any(not p.isdigit() for p in parts):
        raise UserError(f"--gpus {text!r}: expected comma-separated GPU indices, e.g. 0,1,2,3", where=where)
    indices = [int(p) for p in parts]
    repeated = sorted({i for i in indices if indices.count(i) > 1})
    if repeated:
        raise UserError(f"--gpus {text!r}: GPU {repeated[0]} is listed twice (one worker per GPU)", where=where)
    count = cuda_device_count()
    if count == 0:
        raise UserError(f"--gpus {text}: torch sees no CUDA device on this machine", where=where,
                        hint="drop --gpus (cells run one at a time on the CPU; sweeps take --workers K)")
    beyond = [i for i in indices if i >= count]
    if beyond:
        raise UserError(f"--gpus {text}: GPU {beyond[0]} does not exist (this machine has {count} CUDA "
                        f"device{'s' if count != 1 else ''}: 0-{count - 1})", where=where)
    visible = [v.strip() for v in os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",") if v.strip()]
    return [visible[i] if len(visible) == count else str(i) for i in indices]


@contextlib.contextmanager
def pinned_env(gpu: str):
    """``CUDA_VISIBLE_DEVICES=gpu`` in this process's environment for the duration (a process
    spawned meanwhile inherits it); the previous value is restored after."""
    old = os.environ.get("CUDA_VISIBLE_DEVICES")
    os.environ["CUDA_VISIBLE_DEVICES"] = gpu
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("CUDA_VISIBLE_DEVICES", None)
        else:
            os.environ["CUDA_VISIBLE_DEVICES"] = old


@dataclass
class PoolResult:
    """What :func:`run_on_gpus` reports.

    Attributes:
        worker_env: each worker's ``CUDA_VISIBLE_DEVICES`` as the worker itself read it at start.
        done: task index -> ``(gpu, seconds)`` of the tasks that finished.
        failed: task index -> ``(gpu, kind, message)``; kind ``user`` (a UserError), ``bug``
            (any other exception; traceback in the worker's log) or ``lost`` (the worker died).
    """

    worker_env: dict[int, str | None] = field(default_factory=dict)
    done: dict[int, tuple[str, float]] = field(default_factory=dict)
    failed: dict[int, tuple[str, str, str]] = field(default_factory=dict)


def _gpu_worker(fn: Callable, k: int, tasks, conn, log_path: str) -> None:
    """A ``run_on_gpus`` worker: ``fn(task, log)`` for each task it takes until the sentinel.

    Reports go through ``conn`` (a pipe: each ``send`` is written before it returns, so a
    worker that dies right after a task has still reported it)."""
    conn.send(("ready", k, None, os.environ.get("CUDA_VISIBLE_DEVICES")))
    with open(log_path, "a", encoding="utf-8") as log:
        while True:
            item = tasks.get()
            if item is None:
                return
            i, task = item
            conn.send(("start", k, i, None))
            t0 = time.perf_counter()
            try:
                fn(task, log)
            except UserError as exc:
                conn.send(("failed", k, i, ("user", str(exc))))
            except KeyboardInterrupt:
                sys.exit(130)
            except Exception as exc:  # noqa: BLE001 - one task's bug does not stop the others
                log.write(traceback.format_exc())
                log.flush()
                conn.send(("failed", k, i, ("bug", f"{type(exc).__name__}: {exc}")))
            else:
                conn.send(("done", k, i, time.perf_counter() - t0))


def run_on_gpus(fn: Callable[[Any, Any], None], tasks: list, gpus: list[str], *, logs: Path,
                on_event: Callable[[str, int, str, Any], None] | None = None) -> PoolResult:
    """Run every task exactly once on ``len(gpus)`` spawned workers, worker ``k`` seeing only ``gpus[k]``.

    Args:
        fn: a module-level function (it is sent to the workers) called as ``fn(task, log)``,
            ``log`` the worker's open log file; it raises to fail its task.
        tasks: picklable, independent tasks; a free worker takes the next one.
        gpus: ``CUDA_VISIBLE_DEVICES`` value of each worker (:func:`parse_gpus`).
        logs: folder of the workers' logs (``gpu<value>.log``).
        on_event: called in this process as ``on_event(kind, task_index, gpu, info)`` with
            kind ``start`` / ``done`` (info: seconds) / ``failed`` (info: ``(kind, message)``).

    Returns:
        a :class:`PoolResult`. A worker that dies fails its current task (``lost``); the others
        take the remaining tasks; tasks left when every worker is gone are ``lost`` too.
    """
    logs = Path(logs)
    logs.mkdir(parents=True, exist_ok=True)
    ctx = multiprocessing.get_context("spawn")
    task_q = ctx.Queue()
    for i, task in enumerate(tasks):
        task_q.put((i, task))
    for _ in gpus:
        task_q.put(None)
    result = PoolResult()
    procs, readers = [], {}
    for k, gpu in enumerate(gpus):
        reader, writer = ctx.Pipe(duplex=False)
        with pinned_env(gpu):  # the spawned interpreter starts with exactly this GPU visible
            p = ctx.Process(target=_gpu_worker, args=(fn, k, task_q, writer, str(logs / f"gpu{gpu}.log")),
                            name=f"surgeon-gpu{gpu}")
            p.start()
        writer.close()  # the worker holds the only writer: its end of life is EOF here
        procs.append(p)
        readers[reader] = k
    running: dict[int, int] = {}  # worker -> task index

    def note(kind: str, k: int, i: int, info: Any) -> None:
        if kind == "ready":
            result.worker_env[k] = info
            return
        if kind == "start":
            running[k] = i
        elif kind == "done":
            running.pop(k, None)
            result.done[i] = (gpus[k], info)
        else:
            running.pop(k, None)
            result.failed[i] = (gpus[k], *info)
        if on_event is not None:
            on_event(kind, i, gpus[k], info)

    try:
        while readers:
            for reader in wait(list(readers), timeout=POLL_S):
                k = readers[reader]
                try:
                    note(*reader.recv())
                except EOFError:  # the worker is gone (sentinel, or died): all it sent has been read
                    del readers[reader]
                    reader.close()
                    procs[k].join()
                    if k in running:
                        note("failed", k, running[k], ("lost", f"its worker stopped (exit code {procs[k].exitcode})"))
    except BaseException:
        for p in procs:
            if p.is_alive():
                p.terminate()
        raise
    finally:
        for p in procs:
            p.join()
    for i in range(len(tasks)):
        if i not in result.done and i not in result.failed:
            result.failed[i] = ("-", "lost", "not run: every worker stopped")
    return result
