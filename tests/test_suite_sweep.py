"""Suites: overrides merge into the suite's mappings; the `sweep:` section (tune, then seed cells)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from surgeon.errors import UserError
from surgeon.recipe import load_recipe
from surgeon.resources import builtin_suite
from surgeon.suite import load_suite, suite_cells, suite_sweeps


def test_suite_set_override_changes_one_key_only(tmp_path):
    """`surgeon suite cpu_repro --set set.train.epochs=2` (the --help example) keeps the rest of `set`."""
    suite = load_suite(builtin_suite("cpu_repro"), ["set.train.epochs=2", "recipe_set.full.train.base_lr=1e-4",
                                                    "~set.train.warmup_epochs", "seeds=[0]"])
    assert suite["set"]["train.epochs"] == 2 and suite["set"]["train.batch_size"] == 32
    assert "train" not in suite["set"] and "train.warmup_epochs" not in suite["set"]
    assert suite["recipe_set"]["full"] == {"train.base_lr": 1e-4}
    cells = {c.recipe: c for c in suite_cells(suite, tmp_path) if c.dataset == "builtin:digits"}
    lora = load_recipe(cells["lora"].recipe, cells["lora"].overrides).train
    assert (lora.epochs, lora.batch_size, lora.base_lr, lora.precision) == (2, 32, 5e-3, "fp32")
    full = load_recipe(cells["full"].recipe, cells["full"].overrides).train
    assert (full.epochs, full.batch_size, full.base_lr) == (2, 32, 1e-4)
    # what the demo's --quick passes
    demo = load_suite(builtin_suite("demo"), ["set.train.epochs=1", "set.train.max_steps=3"])
    cell = suite_cells(demo, tmp_path)[0]
    train = load_recipe(cell.recipe, cell.overrides).train
    assert (train.epochs, train.max_steps, train.batch_size, train.base_lr) == (1, 3, 32, 1e-2)  # recipe_set kept


def _suite(tmp_path: Path, **sweep) -> Path:
    data = {
        "name": "tiny",
        "model": {"name": "vit_tiny_patch16_224", "pretrained": False,
                  "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2}},
        "recipes": ["lora"],
        "datasets": ["builtin:digits"],
        "seeds": [0, 1],
        "set": {"train.max_steps": 4, "train.batch_size": 16, "train.eval_every": 2, "train.warmup_steps": 0,
                "data.num_workers": 0},
        "sweep": {"grid": {"train.base_lr": [1.0e-2, 1.0e-3]}, **sweep},
    }
    path = tmp_path / "suite.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def test_suite_sweeps_merge_grid_and_recipe_grid(tmp_path):
    suite = load_suite(_suite(tmp_path, recipe_grid={"lora": {"surgery.0.lora.rank": [2, 4]}}),
                       ["recipes=[lora, linear]", "sweep.grid.train.base_lr=[1e-3, 1e-4]"])
    jobs = suite_sweeps(suite, tmp_path / "out")
    assert jobs[("lora", "builtin:digits")].grid == {"train.base_lr": [1e-3, 1e-4], "surgery.0.lora.rank": [2, 4]}
    assert jobs[("linear", "builtin:digits")].grid == {"train.base_lr": [1e-3, 1e-4]}
    job = jobs[("lora", "builtin:digits")]
    assert job.out == tmp_path / "out" / "lora" / "digits" / "sweep"
    assert "train.seed=0" in job.overrides and "train.max_steps=4" in job.overrides


def test_suite_sweep_grid_problems_stop_before_training(tmp_path):
    from surgeon.suite_runner import run_suite

    path = _suite(tmp_path, recipe_grid={"lora": {"surgery.0.lora.rnak": [2]}})
    with pytest.raises(UserError) as exc:
        run_suite(path, out=tmp_path / "out")
    assert "sweep lora × builtin:digits" in str(exc.value) and "surgery.0.lora.rnak" in str(exc.value)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_suite_with_sweep_tunes_then_trains_seed_cells(tmp_path):
    from surgeon.suite_runner import run_suite

    out = tmp_path / "out"
    md = run_suite(_suite(tmp_path), out=out)
    result = json.loads((out / "lora" / "digits" / "sweep" / "result.json").read_text())
    assert [t["state"] for t in result["trials"]] == ["complete", "complete"] and result["finals"] == []
    chosen = result["best_config"]["train.base_lr"]
    for t in result["trials"]:
        recipe = yaml.safe_load((out / "lora" / "digits" / "sweep" / t["run_dir"] / "recipe.yaml").read_text())
        assert recipe["data"]["protocol"] == "tune" and recipe["train"]["seed"] == 0
    for seed in (0, 1):
        cell = out / "lora" / "digits" / f"seed{seed}"
        recipe = yaml.safe_load((cell / "recipe.yaml").read_text())
        assert recipe["data"]["protocol"] == "final" and recipe["train"]["seed"] == seed
        assert recipe["train"]["base_lr"] == chosen
        assert json.loads((cell / "summary.json").read_text())["test_top1"] is not None
    text = md.read_text()
    assert "Hyper-parameters chosen by the sweeps" in text and f"train.base_lr={chosen:g} ◂edge" in text
    # Run again: everything is reused.
    mtimes = {p: p.stat().st_mtime for p in out.rglob("summary.json")}
    run_suite(_suite(tmp_path), out=out)
    assert {p: p.stat().st_mtime for p in out.rglob("summary.json")} == mtimes
