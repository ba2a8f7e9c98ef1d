"""The conformance table (benchmarks/backbones.py, docs/backbones.md) on a representative subset of
timm's families: every check of every cell is run, as the full table does, on one family per kind
of backbone — a ViT (fused qkv), PVTv2 (q + fused kv), LeViT (per-head qkv in Linear + BatchNorm),
CoAtNet (convolutions and attention), ResNet and ConvNeXt (no attention: the low-rank recipes
refuse with the reason, the adapters run parallel to the CNN blocks / MLPs). A few minutes of
CPU at most; the whole table is the benchmark, not a test."""
from __future__ import annotations

import importlib.util
import json
import sys

import pytest

from tests.helpers import ROOT

pytestmark = pytest.mark.slow

ALL = sorted(p.stem for p in (ROOT / "recipes").glob("*.yaml"))
LOW_RANK = ["dora", "lora", "lora_r8", "mlae", "mlae_fixed", "mlae_mixed", "mosl", "sparse_lora"]
SUBSET = {  # family: recipes (every recipe where it is quick; the three of issue 13 elsewhere)
    "vision_transformer": ALL,
    "resnet": ALL,
    "convnext": ALL,
    "maxxvit": ["lora", "mlae", "mosa_hier", "houlsby"],
    "pvt_v2": ["lora", "mlae", "mosa_hier"],
    "levit": ["lora", "mlae", "mosa_hier"],
}


@pytest.fixture(scope="module")
def table():
    spec = importlib.util.spec_from_file_location("backbones_bench", ROOT / "benchmarks" / "backbones.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    smallest = json.loads((ROOT / "benchmarks" / "backbones_smallest.json").read_text())["families"]
    return module, {f: module.check_family((f, smallest[f]["model"], recipes)) for f, recipes in SUBSET.items()}


def cells(results: dict, family: str) -> dict[str, dict]:
    return {c["recipe"]: c for c in results[family]["cells"]}


def test_no_cell_fails(table):
    _, results = table
    failing = [(f, c["recipe"], c["reason"]) for f, r in results.items() for c in r["cells"] if c["status"] == "fails"]
    assert not failing


@pytest.mark.parametrize("family", ["vision_transformer", "maxxvit", "pvt_v2", "levit"])
def test_attention_backbones_work_with_every_recipe_asked(table, family):
    _, results = table
    assert results[family].get("error") is None
    for recipe, cell in cells(results, family).items():
        assert cell["status"] == "works", (recipe, cell["reason"])
        assert cell["checks"]["trains"] and cell["checks"]["merge"]
        if recipe in LOW_RANK:
            assert cell["checks"]["plain_timm"]


@pytest.mark.parametrize("family,name", [("resnet", "ResNet"), ("convnext", "ConvNeXt")])
def test_cnns_refuse_the_low_rank_recipes_with_the_reason_and_take_adapters(table, family, name):
    _, results = table
    by = cells(results, family)
    for recipe in LOW_RANK:
        assert by[recipe]["status"] == "refuses" and f"no attention in {name}" in by[recipe]["reason"], recipe
    for recipe in ("mosa_hier", "adaptformer", "pfeiffer", "bitfit", "full", "linear"):
        assert by[recipe]["status"] == "works", (recipe, by[recipe]["reason"])


def test_the_document_renders_totals_and_reasons(table):
    module, results = table
    text = module.render(list(results.values()), ALL, seconds=60.0, workers=1)
    totals = module.totals(list(results.values()))
    assert f"**{totals['works']} work, {totals['refuses']} refuse with a reason, 0 fail**" in text
    assert "no attention in ConvNeXt" in text and "| ViT (`vision_transformer`) | `test_vit` |" in text

