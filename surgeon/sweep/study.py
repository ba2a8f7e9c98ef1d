"""Optuna glue: the storage, who owns a running trial, and how trials are read.

Optuna is an optional extra (``pip install 'surgeon[sweep]'``) and is imported lazily.

Every trial carries user attributes that make a sweep resumable and safe for several workers:

=============  ===========================================================================
``config``     the configuration, JSON (exact YAML types: ``1`` stays an int)
``config_key`` its identity (:func:`surgeon.sweep.space.config_key`)
``index``      its position in the grid (progress lines, report order)
``owner``      ``{"host", "pid", "start", "token"}`` of the worker process training it
``heartbeat``  seconds since the epoch, refreshed while the trial trains
``run_dir``    the run directory, relative to the sweep directory
``failure``    for failed trials: ``diverged`` / ``error`` (final), ``interrupted`` /
               ``crashed`` (run again by the next worker), ``superseded`` / ``empty``
               (bookkeeping: a duplicate of another trial of the same configuration)
``reason``     why it failed or was pruned, in words
=============  ===========================================================================

A RUNNING trial whose owner is gone (a dead process on this host, or no heartbeat for
``stale_after_s`` from another host) is marked ``interrupted``; its configuration is queued
again and resumes from its run directory's checkpoint.
"""
from __future__ import annotations

import json
import os
import re
import socket
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

from surgeon.errors import UserError

#: Failures that end a configuration (running it again would fail again).
FINAL_FAILURES = ("diverged", "error")
#: Failed trials that are only bookkeeping (another trial holds the configuration).
IGNORED_FAILURES = ("superseded", "empty")
INSTALL_HINT = "pip install 'surgeon[sweep]'  (or: pip install 'optuna>=4')"

# Tokens of the workers running in this process right now: a trial owned by this process under
# another token was left behind by a worker that is gone (an exception that escaped it).
_ACTIVE_TOKENS: set[str] = set()


def import_optuna():
    """The ``optuna`` module, quiet; a :class:`UserError` naming the extra when it is missing."""
    try:
        import optuna  # the optional `sweep` extra: a clear error below when it is missing
    except ImportError:
        raise UserError("surgeon sweep needs Optuna, which is not installed",
                        hint=INSTALL_HINT) from None
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna


def masked(url: str | None) -> str | None:
    """A storage URL fit for reports and files: ``postgresql://user:***@host/db``."""
    return None if url is None else re.sub(r"(://[^/:@]*:)[^@/]*@", r"\1***@", url)


def open_storage(url: str | None, default_file: Path):
    """An Optuna storage and its description.

    ``url``: None -> a journal file ``default_file`` (safe for several processes on one machine
    or a shared file system); a path without ``://`` -> a journal file there; ``redis://...`` ->
    Optuna's Redis journal; anything else -> an SQLAlchemy URL for Optuna's RDB storage
    (``postgresql://user:pw@host/db``, ``mysql+pymysql://...``, ``sqlite:///file.db``).
    """
    optuna = import_optuna()
    # optuna: the optional `sweep` extra, imported once a sweep runs (import_optuna names the extra)
    from optuna.storages import JournalStorage
    from optuna.storages.journal import JournalFileBackend

    if url is None or "://" not in url:
        path = Path(url).expanduser() if url else Path(default_file)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            return JournalStorage(JournalFileBackend(str(path))), str(path)
        except OSError as exc:
            raise UserError(f"cannot open the sweep's journal file {str(path)!r}: {exc.strerror or exc}",
                            where="--storage", hint="pass --storage with a writable file or a database URL") from None
    try:
        if url.startswith(("redis://", "rediss://", "unix://")):
            # optuna's Redis backend imports the redis client: only for a redis:// storage
            from optuna.storages.journal import JournalRedisBackend

            return JournalStorage(JournalRedisBackend(url)), masked(url)
        return optuna.storages.RDBStorage(url), masked(url)
    except ImportError as exc:
        raise UserError(f"the storage {masked(url)!r} needs a package that is not installed ({exc})", where="--storage",
                        hint="install the database driver (e.g. pip install psycopg2-binary / redis)") from None
    except Exception as exc:  # noqa: BLE001 - any connection problem is the user's URL or server
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:300]
        raise UserError(f"cannot open the storage {masked(url)!r}: {first}", where="--storage",
                        hint="check the URL, the server and the credentials") from None


# ------------------------------------------------------------------------------ ownership

def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    try:
        return text.rsplit(")", 1)[1].split()[19]
    except IndexError:
        return None


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    except OSError:
        return False
    return True


def _pid_namespace() -> str | None:
    """Containers on one machine may share a host name but not a pid namespace."""
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def new_owner() -> dict:
    """This worker's identity (one per worker, several may share a process)."""
    token = uuid.uuid4().hex
    return {"host": socket.gethostname(), "ns": _pid_namespace(), "pid": os.getpid(),
            "start": _process_start(os.getpid()), "token": token}


def activate(owner: dict) -> None:
    _ACTIVE_TOKENS.add(owner["token"])


def deactivate(owner: dict) -> None:
    _ACTIVE_TOKENS.discard(owner["token"])


def owner_alive(owner: dict | None, heartbeat: float | None, started: datetime | None, *,
                stale_after_s: float, now: float | None = None) -> bool:
    """Whether the worker that owns a RUNNING trial is still at it.

    On this host (same host name and pid namespace): its process exists (same pid and start
    time) and, if it is this very process, the worker is still running. Elsewhere: a heartbeat
    within ``stale_after_s`` (by this machine's clock).
    A trial popped but not yet owned counts as alive for ``stale_after_s`` after it started.
    """
    now = time.time() if now is None else now
    if not owner:
        return started is not None and now - started.timestamp() < stale_after_s
    if owner.get("host") == socket.gethostname() and owner.get("ns") == _pid_namespace():
        pid = owner.get("pid")
        if not isinstance(pid, int):
            return False
        if pid == os.getpid():
            return owner.get("token") in _ACTIVE_TOKENS
        if not _pid_running(pid):
            return False
        start = owner.get("start")
        return start is None or _process_start(pid) in (None, start)
    beat = heartbeat if heartbeat is not None else (started.timestamp() if started else None)
    return beat is not None and now - beat < stale_after_s


class Heartbeat:
    """Refreshes a trial's ``heartbeat`` attribute every ``interval_s`` seconds while in a ``with``."""

    def __init__(self, storage, trial_id: int, interval_s: float):
        self.storage, self.trial_id, self.interval_s = storage, trial_id, interval_s
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="surgeon-sweep-heartbeat", daemon=True)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.storage.set_trial_user_attr(self.trial_id, "heartbeat", time.time())
            except Exception:  # noqa: BLE001 - a missed beat only makes the trial look older
                pass

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=max(5.0, self.interval_s))


# ------------------------------------------------------------------------ reading trials

def attrs(trial) -> dict[str, Any]:
    return trial.user_attrs


def trial_config(trial) -> dict | None:
    raw = trial.user_attrs.get("config")
    return json.loads(raw) if isinstance(raw, str) else None


def state_name(trial) -> str:
    return trial.state.name  # WAITING, RUNNING, COMPLETE, PRUNED, FAIL


def is_ignored(trial) -> bool:
    """Bookkeeping trials: a duplicate claim, an empty trial, a re-told duplicate (TPE)."""
    a = trial.user_attrs
    return ("config_key" not in a or (state_name(trial) == "FAIL" and a.get("failure") in IGNORED_FAILURES)
            or "duplicate_of" in a)


def is_done(trial) -> bool:
    """The configuration has its result (value, pruned, or a failure that would repeat)."""
    s = state_name(trial)
    return s in ("COMPLETE", "PRUNED") or (s == "FAIL" and trial.user_attrs.get("failure") in FINAL_FAILURES)


def is_alive(trial, *, stale_after_s: float) -> bool:
    """WAITING, or RUNNING under a live owner."""
    s = state_name(trial)
    if s == "WAITING":
        return True
    if s != "RUNNING":
        return False
    a = trial.user_attrs
    return owner_alive(a.get("owner"), a.get("heartbeat"), trial.datetime_start, stale_after_s=stale_after_s)


def trial_id(trial) -> int:
    """The storage id of a trial (``Trial`` and ``FrozenTrial`` carry it; stable since Optuna 2)."""
    return trial._trial_id


def mark_failed(study, storage, trial, failure: str, reason: str) -> None:
    """Record a failure on a trial (of this worker or an abandoned one); quiet if another
    worker finished it first."""
    # optuna: the optional `sweep` extra, imported once a sweep runs (import_optuna names the extra)
    from optuna.exceptions import UpdateFinishedTrialError

    try:
        storage.set_trial_user_attr(trial_id(trial), "failure", failure)
        storage.set_trial_user_attr(trial_id(trial), "reason", reason[:2000])
        study.tell(trial.number, state=trial_state("FAIL"), skip_if_finished=True)
    except (UpdateFinishedTrialError, RuntimeError, ValueError):
        pass


def trial_state(name: str):
    """``optuna.trial.TrialState[name]``."""
    # optuna: the optional `sweep` extra, imported once a sweep runs (import_optuna names the extra)
    from optuna.trial import TrialState

    return TrialState[name]


def suggest(trial, name: str, dist):
    """``trial.suggest_*`` for a distribution (returns a queued trial's fixed value)."""
    # optuna: the optional `sweep` extra, imported once a sweep runs (import_optuna names the extra)
    from optuna.distributions import CategoricalDistribution, IntDistribution

    if isinstance(dist, CategoricalDistribution):
        return trial.suggest_categorical(name, list(dist.choices))
    if isinstance(dist, IntDistribution):
        return trial.suggest_int(name, dist.low, dist.high)
    return trial.suggest_float(name, dist.low, dist.high)
