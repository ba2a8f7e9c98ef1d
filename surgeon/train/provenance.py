"""The reproducibility record of a training session: versions, command line, recipe commit, device.

:func:`environment` is what ``summary.json`` stores under ``environment`` and each ``start``
event of ``metrics.jsonl`` under the same key (a resumed run has one start event per session,
so every session's record is kept).
"""
from __future__ import annotations

import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import numpy
import timm
import torch
import torchvision

from surgeon.resources import VERSION

#: Seconds a ``git`` call may take (a network file system can be slow; a hung one must not hang the run).
GIT_TIMEOUT_S = 10.0


def _git(folder: Path, *args: str) -> str | None:
    """``git -C folder args...``'s stdout, stripped; None if git is missing or fails."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("GIT_")}  # ask about folder, nothing else
    try:
        proc = subprocess.run(["git", "-C", str(folder), *args], capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S, env=env, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def git_state(path: str | Path) -> dict | None:
    """The git state of a recipe file's folder, or None when it is not inside a git work tree.

    Returns:
        ``{"commit": sha of HEAD, "dirty": tracked files differ from HEAD anywhere in the work
        tree, "file": "committed" | "modified" | "untracked" | "ignored" (the recipe file
        itself), "root": the work tree}``; ``commit`` is None in a repository without commits.
    """
    path = Path(path).resolve()
    folder = path if path.is_dir() else path.parent
    if not folder.is_dir():
        return None
    root = _git(folder, "rev-parse", "--show-toplevel")
    if root is None:
        return None
    commit = _git(folder, "rev-parse", "--verify", "--quiet", "HEAD") or None
    status = _git(folder, "status", "--porcelain", "--untracked-files=no")
    state = {"commit": commit, "dirty": None if status is None else bool(status), "root": root}
    if path.is_file():
        line = _git(folder, "status", "--porcelain", "--ignored", "--", path.name)
        state["file"] = (None if line is None else "committed" if not line else "untracked" if line.startswith("??")
                         else "ignored" if line.startswith("!!") else "modified")
    return state


def cpu_name() -> str:
    """The CPU's model name (Linux /proc/cpuinfo), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def numerics() -> dict:
    """The process-wide settings that change CUDA/CPU numerics (recorded, never changed here).

    Returns:
        ``{"cudnn_enabled", "cudnn_benchmark", "cudnn_deterministic": torch.backends.cudnn flags;
        "cudnn_allow_tf32", "matmul_allow_tf32": whether TF32 may replace fp32 in convolutions /
        matrix products on Ampere and later GPUs; "float32_matmul_precision": torch's
        ``highest`` | ``high`` | ``medium``; "deterministic_algorithms"}``.
    """
    return {
        "cudnn_enabled": bool(torch.backends.cudnn.enabled),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "cudnn_allow_tf32": bool(torch.backends.cudnn.allow_tf32),
        "matmul_allow_tf32": bool(torch.backends.cuda.matmul.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "deterministic_algorithms": bool(torch.are_deterministic_algorithms_enabled()),
    }


def environment(device: torch.device, recipe_source: str | None, world: dict | None = None) -> dict:
    """What a run needs to be reproduced: versions, the command line, the recipe's commit, device.

    Args:
        device: the training device.
        recipe_source: the recipe file the session loaded (``Recipe.source``; ``<dict>`` or None
            for a recipe given as a mapping, which has no file to take a commit of).

    Returns:
        ``{"surgeon", "torch", "timm", "torchvision", "numpy", "python": versions; "platform";
        "command": the exact command line of the process (``sys.orig_argv``, shell-quoted);
        "cwd"; "recipe": {"path", "git": :func:`git_state` or None}; "device", "device_name",
        "cuda" (CUDA version or None); "cuda_visible_devices": the environment variable (the GPU
        a ``--gpus`` worker was given), None when unset; "threads": torch's intra-op threads; "cpus": logical
        CPUs; "numerics": :func:`numerics`; "distributed": ``world`` (``{"world_size",
        "backend"}`` of a torchrun launch; one process when not given)}``.
    """
    recipe = None
    if recipe_source and recipe_source != "<dict>":
        recipe = {"path": str(Path(recipe_source).resolve()), "git": git_state(recipe_source)}
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else cpu_name()
    return {
        "surgeon": VERSION,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "torchvision": torchvision.__version__,
        "numpy": numpy.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "command": shlex.join(getattr(sys, "orig_argv", sys.argv)),
        "cwd": os.getcwd(),
        "recipe": recipe,
        "device": str(device),
        "device_name": name,
        "cuda": torch.version.cuda if device.type == "cuda" else None,
        "cuda_visible_devices": os.environ.get("CUDA_VISIBLE_DEVICES"),
        "threads": torch.get_num_threads(),
        "cpus": os.cpu_count(),
        "numerics": numerics(),
        "distributed": world or {"world_size": 1, "backend": None},
    }
