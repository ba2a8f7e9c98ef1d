"""Smoke test of benchmarks/bench.py: the quick mode runs end to end and prints its ratio tables.

Benchmarks are not unit tests: no timing is asserted here, only that the script cannot rot
(every method still builds, trains a step, merges and reports). peft is a benchmark-only
dependency: without it the quick mode still runs and the PEFT rows say they were skipped.
"""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow

BENCH = ROOT / "benchmarks" / "bench.py"


def run_bench(*args: str, pythonpath: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONWARNINGS="ignore", OMP_NUM_THREADS="1")
    if pythonpath:
        env["PYTHONPATH"] = pythonpath + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run([sys.executable, str(BENCH), "--quick", *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)


def row(out: str, start: str) -> str | None:
    return next((line for line in out.splitlines() if line.startswith(start)), None)


@pytest.fixture(scope="module")
def quick_run():
    return run_bench()


def test_quick_mode_prints_ratio_tables(quick_run):
    assert quick_run.returncode == 0, quick_run.stderr[-3000:]
    out = quick_run.stdout
    for heading in ("## Train step (forward + backward + AdamW)", "## Target duels", "## Consistency regulariser",
                    "## MoSA (hierarchical, no regulariser) vs the number of experts N", "## One adapted module",
                    "## Inference, batch 1 ", "## Targets"):
        assert heading in out, heading
    assert "| case | trainable | cpu ms |" in out or "| case | trainable | wall ms |" in out
    # every surgeon method was measured (none skipped: the methods and recipes exist)
    for case in ("| lora_qkv8:", "| mlae_qkv8:", "| lora_qv16:", "| mosl_qv16:", "| adaptformer:", "| mosa_hier:",
                 "| mosa_flat:", "| mosa_hier_cons2:", "| mosa_hier_consB:", "| mosa_flat_consB:", "| 16 |",
                 "| mlae_qkv8 / lora_qkv8 |", "| mosa_hier / adaptformer |", "| mosa_flat / adaptformer |",
                 "| lora_qkv8_merged:", "| mosa_hier_merged:", "| mosa_hier_ensemble:"):
        line = row(out, case)
        assert line is not None, f"no row for {case}"
        assert "skipped" not in line, line
    assert "× timm" in out and "× adaptformer" in out
    assert "same modules & shapes as timm: yes" in out


def test_quick_mode_compares_with_peft(quick_run):
    pytest.importorskip("peft")
    assert quick_run.returncode == 0, quick_run.stderr[-3000:]
    duel = row(quick_run.stdout, "| lora_qkv8 / peft_lora_qkv8 |")
    assert duel is not None and "skipped" not in duel, duel
    assert "| saved for backward |" in quick_run.stdout  # the LoRA-vs-PEFT memory comparison
    assert "skipped" not in row(quick_run.stdout, "| peft_lora_qkv8:")


def test_quick_mode_runs_without_peft(tmp_path):
    """A peft that cannot be imported (here: shadowed by a stub that raises) only skips the PEFT rows."""
    stub = tmp_path / "peft"
    stub.mkdir()
    (stub / "__init__.py").write_text("raise ImportError('peft hidden by test_bench_smoke')\n")
    proc = run_bench("--sections", "lora,layers", pythonpath=str(tmp_path))
    assert proc.returncode == 0, proc.stderr[-3000:]
    duel = row(proc.stdout, "| lora_qkv8 / peft_lora_qkv8 |")
    assert duel is not None and "skipped" in duel, duel
    assert "peft_lora_qkv8: peft is not installed" in proc.stdout
    assert row(proc.stdout, "| mlae_qkv8 / lora_qkv8 |") is not None
