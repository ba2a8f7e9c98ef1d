"""Paired orderings with bootstrap intervals (surgeon/report/orderings.py)."""
from __future__ import annotations

import statistics

import pytest

from surgeon.report.orderings import bootstrap_interval, ordering, orderings_table


def scores(diffs: dict[str, list[float]]) -> dict:
    """A and B on tasks × seeds, A - B = the given differences."""
    out = {}
    for task, ds in diffs.items():
        for seed, d in enumerate(ds):
            base = 50.0 + 3 * seed + len(task)  # task and seed effects the pairing removes
            out[("B", task, seed)] = base
            out[("A", task, seed)] = base + d
    return out


def test_consistent_gain_holds_and_loss_fails():
    o = ordering(scores({"t1": [1.0, 2.0, 1.5], "t2": [0.5, 1.0, 0.7]}), "A", "B")
    assert o.pairs == 6 and o.mean == pytest.approx(statistics.fmean([1, 2, 1.5, 0.5, 1, 0.7]))
    assert 0 < o.low <= o.mean <= o.high and o.verdict == "holds" and o.signs == "+ +"
    assert ordering(scores({"t1": [1.0, 2.0, 1.5], "t2": [0.5, 1.0, 0.7]}), "B", "A").verdict == "fails"


def test_mixed_signs_are_unresolved_and_missing_pairs_are_skipped():
    s = scores({"t1": [3.0, 2.0, 4.0], "t2": [-3.5, -2.0, -4.0]})
    del s[("A", "t2", 2)]  # an unfinished run: its pair drops out
    o = ordering(s, "A", "B")
    assert o.pairs == 5 and o.verdict == "unresolved" and o.signs == "+ −"
    assert o.low < 0 < o.high
    assert ordering(s, "A", "C").verdict == "no data"


def test_bootstrap_is_reproducible_and_brackets_the_mean():
    values = [0.3, -1.2, 2.5, 0.9, 1.1, -0.4, 0.0, 1.7]
    assert bootstrap_interval(values) == bootstrap_interval(values)
    low, high = bootstrap_interval(values)
    assert low < statistics.fmean(values) < high
    assert bootstrap_interval([2.0] * 5) == (2.0, 2.0)


def test_table_rows():
    table = orderings_table([ordering(scores({"t1": [1.0, 1.0]}), "A", "B")])
    assert table.rows == [["A > B", "2", "+1.00 [+1.00, +1.00]", "+", "holds"]]


def test_suite_report_pairs_cells_by_task_and_seed_and_names_inference_modes(tmp_path):
    from surgeon.suite import Cell
    from surgeon.suite_runner import _ordering_scores

    from .fake_runs import make_run

    cells = []
    for recipe, tests in (("mosa_hier", (0.80, 0.82)), ("adaptformer", (0.78, 0.83))):
        for seed, test in enumerate(tests):
            run = make_run(tmp_path / recipe, recipe, "builtin:digits", seed, test=test)
            cells.append(Cell(recipe, "builtin:digits", seed, run, []))
    cells.append(Cell("adaptformer", "builtin:count", 0, tmp_path / "never-ran", []))  # unfinished: left out
    ablation = {("mosa_hier", "merge", "digits", 0): 80.0, ("mosa_hier", "fixed", "digits", 0): 75.0}
    scores = _ordering_scores(cells, ablation)
    assert scores[("mosa_hier", "digits", 1)] == pytest.approx(82.0)
    assert scores[("mosa_hier:fixed", "digits", 0)] == 75.0
    o = ordering(scores, "mosa_hier", "adaptformer")
    assert o.pairs == 2 and o.mean == pytest.approx(((80 - 78) + (82 - 83)) / 2)
    assert ordering(scores, "mosa_hier:merge", "mosa_hier:fixed").mean == 5.0
