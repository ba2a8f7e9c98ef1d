"""Tasks for the ``--gpus`` worker tests (a light module: spawned workers import it)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from surgeon.errors import UserError


def record(task: tuple, log) -> None:
    """``task = (folder, name, behaviour)``: write ``folder/name.json`` with the worker's pid and
    ``CUDA_VISIBLE_DEVICES``; behaviour ``user`` raises a UserError, ``bug`` a ValueError,
    ``die`` ends the worker (exit code 3), ``slow`` sleeps 0.3 s first."""
    folder, name, behaviour = task
    if behaviour == "slow":
        time.sleep(0.3)
    if behaviour == "die":
        os._exit(3)
    log.write(f"task {name}\n")
    path = Path(folder) / f"{name}.json"
    runs = json.loads(path.read_text())["runs"] if path.exists() else 0
    path.write_text(json.dumps({"pid": os.getpid(), "gpu": os.environ.get("CUDA_VISIBLE_DEVICES"), "runs": runs + 1}))
    if behaviour == "user":
        raise UserError(f"task {name} refused")
    if behaviour == "bug":
        raise ValueError(f"task {name} broke")
