"""Suites (grid, resumable, one report) and the demo main job."""
from __future__ import annotations

import json

import pytest

from surgeon.errors import UserError
from surgeon.resources import builtin_suite
from surgeon.suite import cell_finished, load_suite, suite_cells


def test_builtin_suites_load_and_expand(tmp_path):
    suite = load_suite(builtin_suite("cpu_repro"))
    cells = suite_cells(suite, tmp_path)
    assert len(cells) == len(suite["recipes"]) * len(suite["datasets"]) * len(suite["seeds"])
    # seed-major order: the first seed's grid is complete before the next seed starts
    first = cells[: len(suite["recipes"]) * len(suite["datasets"])]
    assert {c.seed for c in first} == {suite["seeds"][0]}
    assert len({c.run_dir for c in cells}) == len(cells)
    assert any(o.startswith("model.pretrained=") for o in cells[0].overrides)
    vtab = suite_cells(load_suite(builtin_suite("vtab1k"), ["data_root=/data/v"]), tmp_path)
    assert 'data.source="vtab1k:/data/v/cifar"' in vtab[0].overrides


def test_every_cell_recipe_is_valid(tmp_path):
    from surgeon.recipe import load_recipe

    for name in ("demo", "cpu_repro"):
        for cell in suite_cells(load_suite(builtin_suite(name)), tmp_path):
            load_recipe(cell.recipe, cell.overrides)


def _resolved(suite_name: str, tmp_path, overrides=()) -> dict:
    from surgeon.recipe import load_recipe

    cells = suite_cells(load_suite(builtin_suite(suite_name), list(overrides)), tmp_path)
    return {(c.recipe, c.dataset): load_recipe(c.recipe, c.overrides).to_dict() for c in cells}


def test_vtab1k_suite_carries_the_published_settings(tmp_path):
    cells = _resolved("vtab1k", tmp_path, ["data_root=/data/v"])
    assert len(cells) == 11 * 19
    for (recipe, task), r in cells.items():
        assert r["data"]["augment"] == "resize" and r["data"]["protocol"] == "final"
        assert r["data"]["source"] == f"vtab1k:/data/v/{task}"
        assert r["train"]["lr_scaling"] == "none"
        expected_lr = {"mlae": 5e-4, "lora_r8": 5e-4, "full": 1e-4}.get(recipe, 5e-3)
        assert r["train"]["base_lr"] == expected_lr, (recipe, task)
        if recipe in ("adaptformer", "mosa_hier", "mosa_flat", "sparse_adapter"):
            assert r["surgery"][0]["adapter"]["bottleneck"] == 16
    mlae = cells[("mlae", "cifar")]["surgery"][0]["mlae"]  # MLAE Table 10
    assert (mlae["masking"]["p"], mlae["coefficient_init"]) == (0.7, 2.0)
    mlae = cells[("mlae", "smallnorb_ele")]["surgery"][0]["mlae"]
    assert (mlae["masking"]["p"], mlae["coefficient_init"]) == (0.0, 0.25)


def test_fgvc_suite_carries_the_published_per_dataset_settings(tmp_path):
    cells = _resolved("fgvc", tmp_path, ["data_root=/data/fgvc"])
    lrs = {"CUB_200_2011": 1e-3, "nabirds": 5e-4, "OxfordFlowers": 5e-3, "StanfordDogs": 5e-4, "StanfordCars": 5e-3}
    for dataset, lr in lrs.items():
        for recipe in ("adaptformer", "mosa_hier", "lora", "sparse_adapter"):
            r = cells[(recipe, dataset)]
            assert r["train"]["base_lr"] == lr and r["data"]["source"] == f"fgvc:/data/fgvc/{dataset}"
            assert r["data"]["augment"] == "resize_crop_flip" and r["train"]["batch_size"] == 128
        mlae = cells[("mlae", dataset)]
        assert (mlae["train"]["base_lr"], mlae["train"]["epochs"], mlae["data"]["augment"]) == (5e-4, 300, "rrc_flip")
    cars = cells[("mosa_hier", "StanfordCars")]
    assert (cars["surgery"][0]["experts"]["count"], cars["surgery"][0]["experts"]["sparse"]) == (2, ["down"])
    assert cars["regularizers"]["feature_alignment"] == {"weight": 0.01, "blocks": "0:6"}
    assert cells[("mosa_hier", "CUB_200_2011")]["surgery"][0]["experts"]["count"] == 4


def test_bad_suite_is_a_user_error(write):
    with pytest.raises(UserError, match="recipes"):
        load_suite(write("s.yaml", "name: s\ndatasets: [builtin:digits]\n"))
    with pytest.raises(UserError, match="data_root"):
        suite_cells(load_suite(write("t.yaml", "name: s\nrecipes: [linear]\ndatasets: [cifar]\n")), write("x", "").parent)


@pytest.mark.slow
def test_demo_quick_end_to_end(cli, tmp_path):
    """`surgeon demo --quick`: both runs finish, merge, report, the summary is printed; a rerun reuses them."""
    out = tmp_path / "demo"
    res = cli("demo", "--quick", "--out", out)
    assert res.code == 0, res
    assert "mosa_hier" in res.out and "adaptformer" in res.out and "Params (M)" in res.out
    cells = suite_cells(load_suite(builtin_suite("demo"), ["set.train.epochs=1"]), out)
    for cell in cells:
        assert cell_finished(cell.run_dir)
        assert (cell.run_dir / "report.md").is_file() and (cell.run_dir / "merged").is_dir()
        summary = json.loads((cell.run_dir / "summary.json").read_text())
        assert summary["steps"] == 3
    assert (out / "report" / "comparison.md").is_file()
    mtime = (cells[0].run_dir / "summary.json").stat().st_mtime
    res = cli("demo", "--quick", "--out", out)
    assert res.code == 0 and (cells[0].run_dir / "summary.json").stat().st_mtime == mtime


def test_demo_trains_the_tuned_reproduction_cells(tmp_path):
    """The demo's two runs are cpu_tuned's seed-0 digits cells at each method's chosen lr: same
    schedule and settings, only the lr pinned (docs/reproduction.md)."""
    demo = load_suite(builtin_suite("demo"))
    tuned = load_suite(builtin_suite("cpu_tuned"))
    assert demo["set"] == tuned["set"]
    assert demo["model"] == tuned["model"]
    for recipe in demo["recipes"]:
        pinned = dict(demo["recipe_set"][recipe])
        assert "train.base_lr" in pinned
        pinned.pop("train.base_lr")
        assert pinned == dict(tuned["recipe_set"][recipe])
