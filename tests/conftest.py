"""Shared fixtures: run the CLI in-process and capture exit code and output; one torch thread and
one built-in dataset cache for the whole session."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest
import torch

# Tiny models: intra-op threading costs more than it saves (3x and worse on shared 2-core machines).
torch.set_num_threads(1)
os.environ.setdefault("CI", "1")  # plain progress lines, no live bars, in test output

# One built-in dataset cache for the whole run (each set is generated once, not per test, and the
# user's ~/.cache/surgeon is left alone); tests of the cache itself set their own. Subprocesses
# started by tests inherit it.
_CACHE = tempfile.TemporaryDirectory(prefix="surgeon-test-cache-")
os.environ["SURGEON_CACHE"] = _CACHE.name


class CliResult:
    def __init__(self, code: int, out: str, err: str):
        self.code, self.out, self.err = code, out, err

    @property
    def text(self) -> str:
        return self.out + self.err

    def __repr__(self) -> str:
        return f"CliResult(code={self.code}, out={self.out[-500:]!r}, err={self.err[-1500:]!r})"


@pytest.fixture
def cli(capsys):
    """``cli("plan", "x.yaml")`` runs ``surgeon`` in-process and returns a CliResult."""
    from surgeon.cli import main

    def run(*args: str) -> CliResult:
        with pytest.raises(SystemExit) as exc:
            main([str(a) for a in args])
        captured = capsys.readouterr()
        code = exc.value.code if isinstance(exc.value.code, int) else (0 if exc.value.code is None else 1)
        return CliResult(code, captured.out, captured.err)

    return run


@pytest.fixture
def write(tmp_path):
    """``write("name.yaml", text)`` writes a file under tmp_path and returns its path."""

    def _write(name: str, text: str | bytes) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            path.write_bytes(text)
        else:
            path.write_text(text)
        return path

    return _write
