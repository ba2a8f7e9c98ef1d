"""surgeon.report: run reports, comparisons, and the `report` command.

Each test writes its own fake run directories (the files the trainer writes: recipe.yaml,
metrics.jsonl, summary.json, predictions_<split>.json, analysis.json) with numbers chosen so
that every figure the report should show can be looked for verbatim.
"""
from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import yaml
from PIL import Image

from surgeon.cli import main as cli_main
from surgeon.errors import UserError
from surgeon.report import (Heading, RunResult, Table, collapse_targets, collect_runs, compare_runs, comparison,
                            comparison_table, dataset_short_name, expand_run_dirs, load_run_data, read_metrics,
                            render_markdown, write_report)
from surgeon.report.plots import confusion_figure
from surgeon.report.document import to_markdown
from surgeon.report.run_report import _header_blocks as header_blocks
from surgeon.report.run_report import _health_blocks as health_blocks
from surgeon.report.run_report import _merge_blocks as merge_blocks
from surgeon.report.plots import short_labels
from surgeon.report.run_report import block_of, describe_rule, expert_similarity

from .fake_runs import fake_plan, fake_recipe, make_run

def squash(md: str) -> str:
    """Markdown with table padding removed, so a cell reads ``| 0.30 |`` however wide its column is."""
    return re.sub(r" {2,}", " ", md)




@pytest.fixture(scope="module")
def finished_report(tmp_path_factory):
    """A finished run with every optional input, reported once for the tests that read it."""
    run = make_run(tmp_path_factory.mktemp("runs"), analysis=True, nonfinite=(7, 8, 30))
    md = write_report(run)
    return run, squash(md.read_text())


# ---- one run ---------------------------------------------------------------------------

def test_report_has_every_section_and_the_numbers_written(finished_report):
    run, md = finished_report
    for heading in ("# Run report: mosa-hier", "## Recipe", "## Parameters", "## Results", "## Merge check",
                    "## Timings and throughput", "## Non-finite losses", "## Expert similarity"):
        assert heading in md, heading
    assert "| 0.30 |" in md                               # Params (M): 297,984 / 1e6, two decimals
    assert "12 × `blocks.*.mlp`" in md and "24,832 each" in md and "297,984" in md
    assert "85,798,656" in md and "85.80" in md            # backbone
    assert "0.347%" in md                                  # extra as % of backbone
    assert "90.12 at step 60" in md                        # best val (fraction 0.9012 → percent)
    assert "| test top-1 (%) | 87.31 |" in md
    assert "`merge`" in md and "**pass**" in md and "3.00e-07" in md
    assert "2 min 03 s" in md and "512.5" in md            # train_seconds=123, img/s
    assert "**3** optimizer step(s) had a non-finite loss" in md and "steps 7–8, 30." in md
    assert "0.1234" in md
    assert "parallel bottleneck adapter (hidden 64, GELU, scale 0.1)" in md
    assert "split into 4 sparse experts (hierarchical" in md
    assert "scikit-learn's bundled handwritten digits" in md   # provenance paragraph
    assert "Lowest per-class top-1 on test: `class8` 0.0% (of 10), `class9` 0.0% (of 10)." in md
    assert "base_lr 0.001 × 64/256 = 0.00025" in md
    assert "`peak_memory_mb`" in md                        # unknown summary keys are not hidden
    assert "did not finish" not in md


def test_report_plots_exist_are_pngs_and_are_linked(finished_report):
    run, md = finished_report
    linked = re.findall(r"\]\((plots/[^)]+)\)", md)
    assert sorted(linked) == ["plots/confusion_test.png", "plots/expert_similarity.png",
                              "plots/training_curves.png"]
    for rel in linked:
        path = run / rel
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        with Image.open(path) as im:
            im.verify()
        with Image.open(path) as im:
            assert im.size[0] > 300 and im.size[1] > 200


def test_html_is_self_contained(finished_report):
    run, _ = finished_report
    html = (run / "report.html").read_text()
    assert html.count("data:image/png;base64,") == 3
    refs = re.findall(r'(?:src|href)="([^"]*)"', html)
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs), refs
    assert "<script" not in html and "<link" not in html and "@import" not in html
    assert "<table>" in html and "12 × <code>blocks.*.mlp</code>" in html


def test_unfinished_run_with_truncated_metrics(tmp_path):
    run = make_run(tmp_path, finished=False, truncate=True)
    md = squash(write_report(run).read_text())
    assert "**Warning: this run did not finish**" in md
    assert f"last checkpoint is at step 60; `surgeon apply --resume {run.resolve()}`" in md
    assert "last line of metrics.jsonl (line" in md and "incomplete" in md
    assert "90.12 at step 60" in md                        # best val from the logged evals
    assert "not measured yet" in md
    assert "did not reach its merge step" in md
    assert "train time until the last logged step" in md and "2 min 00 s" in md   # last train time 120 s
    assert (run / "plots" / "training_curves.png").is_file()
    assert (run / "report.html").is_file()


def test_run_stopped_by_the_trainer(tmp_path):
    run_dir = make_run(tmp_path, finished=False, steps=20, nonfinite=(18, 19, 20))
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"event": "stopped", "step": 20, "reason": "nonfinite", "in_a_row": 3}) + "\n")
    run = load_run_data(run_dir)
    md = to_markdown(header_blocks(run) + health_blocks(run), tmp_path)  # the text sections, no plots
    assert "**Warning: the trainer stopped this run** at step 20 (nonfinite, 3 in a row)" in md
    assert "**3** optimizer step(s) had a non-finite loss and were skipped: steps 18–20." in md


def test_run_with_only_a_recipe(tmp_path):
    run = tmp_path / "fresh"
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump(fake_recipe("lora", "builtin:digits", 1, 10)))
    md = write_report(run).read_text()
    assert "metrics.jsonl is missing" in md and "No plan was logged" in md
    assert "No training or evaluation events were logged" in md


def test_merge_failure_is_flagged(tmp_path):
    run = load_run_data(make_run(tmp_path, merge_rel=2e-3, steps=20))
    md = to_markdown(merge_blocks(run), tmp_path)
    assert "**FAIL**" in md and "2.00e-03" in md


def test_merge_section_names_each_modes_folder(tmp_path):
    """merged/ is the recipe's mode (the figures'); merged-jigsaw/ another mode, with the command
    for its own top-1; a merged/ of another mode (an older surgeon) is flagged."""
    run_dir = make_run(tmp_path, steps=20)
    for folder, mode in (("merged", "average"), ("merged-jigsaw", "jigsaw")):
        (run_dir / folder).mkdir()
        (run_dir / folder / "surgeon.json").write_text(json.dumps({"format": "dense-adapter", "merge_mode": mode}))
    with (run_dir / "metrics.jsonl").open("a") as f:
        f.write(json.dumps({"event": "merge", "mode": "jigsaw", "format": "dense-adapter", "max_abs_diff": 1e-6,
                            "max_rel_diff": 1e-7, "path": str(run_dir / "merged-jigsaw")}) + "\n")
    md = squash(to_markdown(merge_blocks(load_run_data(run_dir)), tmp_path))
    assert "| jigsaw | `merged-jigsaw/` | dense-adapter |" in md
    assert "`merged/`: the `average` merge" in md and "Warning" not in md
    assert f"`merged-jigsaw/`: the `jigsaw` merge, a dense adapter: `surgeon.load_run('{run_dir.resolve()}', " \
           "merge_mode='jigsaw')`. The figures above are the `average` merge's" in md
    assert f"`surgeon eval {run_dir.resolve()} --merge-mode jigsaw`" in md
    (run_dir / "merged" / "surgeon.json").write_text(json.dumps({"format": "timm", "merge_mode": "jigsaw"}))
    md = squash(to_markdown(merge_blocks(load_run_data(run_dir)), tmp_path))
    assert "**Warning: it is not the `average` merge the figures above were measured with**" in md


def test_read_metrics_skips_broken_lines(tmp_path):
    f = tmp_path / "metrics.jsonl"
    f.write_text('{"event": "start"}\nnot json\n[1, 2]\n{"event": "train", "step": 1, "loss": 1.0}\n{"event": "tr')
    events, problems = read_metrics(f)
    assert [e["event"] for e in events] == ["start", "train"]
    assert len(problems) == 3
    assert "line 2 is not valid JSON" in problems[0] and "line 3 is not an event" in problems[1]
    assert "last line" in problems[2] and "incomplete" in problems[2]


def test_finished_run_with_garbage_tail_keeps_final_numbers(tmp_path):
    run = load_run_data(make_run(tmp_path, truncate=True, steps=20))
    assert run.finished and run.test_top1 == pytest.approx(87.31)
    assert any("incomplete" in p for p in run.problems)


def test_resumed_run_keeps_the_last_record_of_a_repeated_step(tmp_path):
    run_dir = make_run(tmp_path, steps=20)
    with (run_dir / "metrics.jsonl").open("a") as f:  # a resume logs start again and re-logs step 20
        f.write(json.dumps({"event": "start", "plan": fake_plan(), "time": "2025-01-01T11:00:00"}) + "\n")
        f.write(json.dumps({"event": "train", "step": 20, "loss": 0.123, "lr": 1e-4, "time": 40.0}) + "\n")
    run = load_run_data(run_dir)
    assert len(run.starts) == 2
    assert [e["step"] for e in run.train] == list(range(1, 21))
    assert run.train[-1]["loss"] == 0.123


@pytest.mark.parametrize("percent", [False, True])
def test_top1_unit_fraction_or_percent(tmp_path, percent):
    run = load_run_data(make_run(tmp_path, percent=percent, steps=20))
    assert run.test_top1 == pytest.approx(87.31)
    assert run.best_val == (pytest.approx(90.12), 20)


def test_top1_unit_decided_by_predictions_when_values_are_small(tmp_path):
    # A percent-logging run with 0.5% accuracy looks like a fraction; the predictions say otherwise.
    run_dir = make_run(tmp_path, steps=20, test=0.005, best_val=0.006, percent=True)
    labels = [i % 100 for i in range(200)]
    preds = [y if i == 0 else (y + 1) % 100 for i, y in enumerate(labels)]  # 1 of 200 right = 0.5%
    (run_dir / "predictions_test.json").write_text(json.dumps({"labels": labels, "preds": preds}))
    run = load_run_data(run_dir)
    assert run.test_top1 == pytest.approx(0.5)


def test_missing_and_invalid_run_dirs_raise_user_error_naming_the_path(tmp_path):
    with pytest.raises(UserError, match="nope"):
        load_run_data(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="empty.*not a surgeon run directory"):
        write_report(tmp_path / "empty")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "recipe.yaml").write_text("name: [unclosed\n")
    with pytest.raises(UserError, match="recipe.yaml"):
        load_run_data(bad)


# ---- tables and plots ------------------------------------------------------------------

def test_collapse_targets_groups_identical_blocks_and_keeps_differences_apart():
    targets = [{"module": f"blocks.{i}.attn.qkv", "method": "mlae", "params": 100 if i < 3 else 50, "detail": ""}
               for i in range(6)]
    targets += [{"module": "", "method": "full", "params": 7, "detail": ""},
                {"module": "head", "method": "full", "params": 9, "detail": ""}]
    rows = collapse_targets(targets)
    assert [(r["module"], r["count"], r["params"], r["total"]) for r in rows] == [
        ("blocks.*.attn.qkv [0–2]", 3, 100, 300), ("blocks.*.attn.qkv [3–5]", 3, 50, 150),
        ("(whole model)", 1, 7, 7), ("head", 1, 9, 9)]


def test_markdown_table_escapes_pipes_in_regex_selectors():
    text = render_markdown(Table(["selector"], [["re:blocks\\.(0|1)\\.mlp"]]))
    assert "(0\\|1)" in text and text.count("\n") == 2


def test_confusion_matrix_annotates_only_small_class_counts():
    small = confusion_figure([0, 1, 2, 2], [0, 2, 2, 2], ["a", "b", "c"])
    assert len(small.axes[0].texts) == 3                 # one label per non-empty cell
    k = 100
    labels = list(range(k)) * 2
    big = confusion_figure(labels, labels[::-1], None)
    ax = big.axes[0]
    assert len(ax.texts) == 0
    assert len(ax.get_xticks()) <= 20


def test_expert_similarity_accepts_named_layers_and_per_layer_matrices():
    mean, per_layer, matrix, title, problems = expert_similarity({"expert_similarity": {
        "per_layer": [{"module": "blocks.0.attn.qkv", "mean": 0.2}, {"module": "blocks.1.attn.qkv", "mean": 0.4}],
        "matrix": [[[1, 0], [0, 1]], [[1, 0.5], [0.5, 1]]]}})
    assert mean == pytest.approx(0.3) and per_layer[1] == ("blocks.1.attn.qkv", 0.4)
    assert matrix.tolist() == [[1, 0.25], [0.25, 1]] and title == "mean over 2 blocks" and not problems


def test_expert_similarity_title_counts_blocks_not_slice_matrices():
    """LoRA on the q and v slices of 3 blocks: 6 matrices, titled with the 3 blocks they are in;
    names without a block index are counted as layers."""
    eye = [[1, 0], [0, 1]]
    qv = {"expert_similarity": {
        "per_layer": [{"module": f"blocks.{i}.attn.qkv", "mean": 0.1} for i in range(3)],
        "matrix": [eye] * 6, "matrix_keys": [f"blocks.{i}.attn.qkv.{s}" for i in range(3) for s in "qv"]}}
    assert expert_similarity(qv)[3] == "mean of 6 matrices over 3 blocks"
    swin = {"expert_similarity": {
        "per_layer": [{"module": f"layers.{s}.blocks.{b}.mlp", "mean": 0.1} for s in range(2) for b in range(2)],
        "matrix": [eye] * 4}}
    assert expert_similarity(swin)[3] == "mean over 4 blocks"
    flat = {"expert_similarity": {"per_layer": [{"module": n, "mean": 0.1} for n in ("head", "fc")],
                                  "matrix": [eye] * 2}}
    assert expert_similarity(flat)[3] == "mean over 2 layers"
    assert block_of("layers.0.blocks.11.attn.qkv") == "layers.0.blocks.11" and block_of("head") is None


def test_similarity_plot_ticks_keep_what_differs():
    labels, pattern = short_labels([f"blocks.{i}.attn.qkv" for i in range(12)])
    assert labels == [str(i) for i in range(12)] and pattern == "blocks.*.attn.qkv"
    labels, pattern = short_labels(["blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.1.attn.qkv"])
    assert labels == ["0.attn.qkv", "0.mlp.fc1", "1.attn.qkv"] and pattern == "blocks.*"
    assert short_labels(["head", "fc"]) == (["head", "fc"], "")


def test_describe_rule_for_each_method():
    assert describe_rule({"target": "blocks.*.attn.qkv", "lora": {"rank": 16, "alpha": 32, "slices": ["q", "v"]}}) \
        == "`blocks.*.attn.qkv`: LoRA rank 16, α 32 (scale 2), on the q, v slices of the fused layer"
    text = describe_rule({"target": "blocks.*.attn.qkv", "mlae": {"rank": 8, "expert_rank": 2,
                                                                  "masking": {"strategy": "stochastic", "p": 0.5}}})
    assert "MLAE rank 8 as 4 experts of rank 2" in text and "p = 0.5" in text
    assert describe_rule({"target": "**", "unfreeze": "bias"}) == \
        "`**`: BitFit: the biases of the matched modules train"
    assert "keep 25% of down-projection and up-projection" in describe_rule(
        {"target": "blocks.*.mlp", "adapter": {}, "prune": {"keep": 0.25, "matrices": ["down", "up"]}})
    assert "(hierarchical: dense A, split B;" in describe_rule(
        {"target": "blocks.*.attn.qkv", "lora": {"rank": 16}, "experts": {"count": 4, "sparse": ["up"]}})


@pytest.mark.parametrize("source, short", [("builtin:digits", "digits"), ("vtab1k:/data/vtab-1k/cifar", "cifar"),
                                           ("imagefolder:data/cub/train", "cub"), ("fgvc:/d/fgvc/nabirds/", "nabirds"),
                                           ("filelist:lists/flowers.txt", "flowers")])
def test_dataset_short_name(source, short):
    assert dataset_short_name(source) == short


# ---- comparisons -----------------------------------------------------------------------

def result(method, dataset, seed, top1, *, metric="test", finished=True, params=0.3, seconds=60.0, **kw):
    settings = {"lr": kw.get("lr", "0.005"), "batch": "32", "epochs": "5", "backbone": kw.get("model", "vit_tiny"),
                "precision": "fp32"}
    return RunResult(run_dir=Path(f"/runs/{method}-{dataset}-{seed}-{kw.get('inference', 'merge')}"), method=method,
                     dataset=dataset, data_source=f"builtin:{dataset}", model=kw.get("model", "vit_tiny"), seed=seed,
                     inference=kw.get("inference", "merge"), top1=top1, metric=metric, best_val=top1,
                     test_top1=top1 if metric == "test" else None, params_m=params, train_seconds=seconds,
                     img_per_s=500.0, steps=100, finished=finished, settings=settings)


def test_comparison_mean_and_sample_std_over_seeds():
    results = [result("mosa", "digits", s, v) for s, v in zip((1, 2, 3), (80.0, 85.0, 90.0))]
    results += [result("mosa", "count", s, v) for s, v in zip((1, 2, 3), (60.0, 61.0, 65.0))]
    results += [result("lora", "digits", 1, 70.0, params=0.59, seconds=30.0),
                result("lora", "count", 1, 50.0, metric="val", params=0.59, seconds=90.0)]
    comp = comparison(results)
    cell = comp.cells[("mosa", "digits")]
    assert cell.mean == pytest.approx(85.0) and cell.std == pytest.approx(5.0)  # sample std, n-1
    assert comp.cells[("mosa", "count")].std == pytest.approx(math.sqrt(7.0))
    assert comp.row_mean["mosa"] == pytest.approx((85.0 + 62.0) / 2)
    table = comparison_table(results)
    assert table.columns == ["Method", "digits", "count", "Mean", "Params (M)", "Train time / run"]
    assert table.rows[0] == ["mosa", "85.0 ± 5.0", "62.0 ± 2.6", "73.5", "0.30", "1 min 00 s"]
    assert table.rows[1] == ["lora", "70.0 (n=1)", "50.0 (n=1)†", "60.0", "0.59", "1 min 00 s"]
    assert any("over 3 seeds" in n for n in table.notes) and any(n.startswith("†") for n in table.notes)


def test_comparison_rows_tell_apart_inference_modes_and_leave_incomplete_means_blank():
    results = [result("mosa", "digits", 1, 90.0, inference="merge"),
               result("mosa", "digits", 1, 88.0, inference="stochastic"),
               result("mosa", "count", 1, 60.0, inference="merge"),
               result("lora", "digits", 1, 80.0, finished=False)]
    table = comparison_table(results)
    labels = [r[0] for r in table.rows]
    assert labels == ["mosa (merge inference)", "mosa (stochastic inference)", "lora"]
    assert table.rows[1][3] == "—" and table.rows[2][1].endswith("‡")


def test_compare_runs_writes_md_html_csv_and_plot(tmp_path):
    runs = tmp_path / "runs"
    dirs = [make_run(runs, "mosa", seed=s, test=t, steps=20) for s, t in ((1, 0.80), (2, 0.85), (3, 0.90))]
    dirs.append(make_run(runs, "adaptformer", seed=1, test=0.70, steps=20))
    extra = [Heading("Inference mechanisms"), Table(["recipe", "stochastic"], [["mosa", "84.0"]])]
    md_path = compare_runs(dirs, extra_blocks=extra)
    assert md_path == runs / "comparison" / "comparison.md"
    md = squash(md_path.read_text())
    assert "| mosa | 85.0 ± 5.0 | 85.0 | 0.30 |" in md
    assert "| adaptformer | 70.0 (n=1) | 70.0 | 0.30 |" in md
    csv = (md_path.parent / "comparison.csv").read_text().splitlines()
    assert csv[1].startswith("mosa,digits,85.0000,5.0000,3,test,0,")
    assert len((md_path.parent / "runs.csv").read_text().splitlines()) == 5
    assert "## Inference mechanisms" in md and "| mosa | 84.0 |" in md
    html = (md_path.parent / "comparison.html").read_text()
    assert "<h2>Inference mechanisms</h2>" in html
    assert "data:image/png;base64," in html and not re.findall(r'src="http', html)
    assert (md_path.parent / "plots" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    # The comparison folder is skipped when the runs are globbed again; a suite folder expands.
    assert expand_run_dirs(sorted(runs.iterdir())) == sorted(dirs)
    assert expand_run_dirs([runs]) == sorted(dirs)
    assert [r.top1 for r in collect_runs(dirs)] == pytest.approx([80.0, 85.0, 90.0, 70.0])


def test_comparison_shows_settings_that_differ_between_rows_and_warns():
    results = [result("mosa", "digits", 1, 80.0, lr="0.005"), result("mosa", "count", 1, 60.0, lr="0.01"),
               result("lora", "digits", 1, 70.0, lr="0.001"), result("lora", "count", 1, 50.0, lr="0.001")]
    table = comparison_table(results)
    assert table.columns[-1] == "lr" and "batch" not in table.columns  # only what differs between rows
    assert table.rows[0][-1] == "0.005 / 0.01" and table.rows[1][-1] == "0.001"  # tuned per data set: both shown
    assert any("differ in lr" in n for n in table.notes)
    same = comparison_table([result("mosa", "digits", 1, 80.0), result("lora", "digits", 1, 70.0)])
    assert same.columns[-1] == "Train time / run" and not any("differ in" in n for n in same.notes)


def test_comparison_report_lists_every_rows_resolved_settings(tmp_path):
    runs = tmp_path / "runs"
    dirs = [make_run(runs, "mosa", seed=1), make_run(runs, "lora", seed=1)]
    md = squash(compare_runs(dirs).read_text())
    assert "## Training settings per row" in md
    assert "| Method | lr | batch | epochs | backbone | precision |" in md
    assert "| mosa | 0.0005 | 64 | 3 | vit_tiny_patch16_224 |" in md


# ---- command line ----------------------------------------------------------------------

def run_cli(args: list[str]) -> int:
    with pytest.raises(SystemExit) as exc:
        cli_main(args)
    return exc.value.code


def test_cli_report_one_run(tmp_path, capsys):
    run = make_run(tmp_path, steps=20, predictions=False)
    assert run_cli(["report", str(run)]) == 0
    assert capsys.readouterr().out.strip().endswith("report.md")
    assert (run / "report.md").is_file() and (run / "report.html").is_file()


def test_cli_report_several_runs_prints_the_table(tmp_path, capsys):
    a = make_run(tmp_path, "mosa", seed=1, steps=20)
    b = make_run(tmp_path, "lora", seed=1, steps=20, test=0.5)
    out_dir = tmp_path / "cmp"
    assert run_cli(["report", str(a), str(b), "--out", str(out_dir)]) == 0
    text = capsys.readouterr().out
    assert "| Method |" in squash(text) and "87.3" in text and "50.0" in text
    assert text.strip().endswith(str(out_dir / "comparison.md"))


def test_cli_report_missing_or_invalid_dir_exits_2(tmp_path, capsys):
    assert run_cli(["report", str(tmp_path / "missing-run")]) == 2
    assert "missing-run" in capsys.readouterr().err
    (tmp_path / "not-a-run").mkdir()
    good = make_run(tmp_path, steps=20)
    assert run_cli(["report", str(good), str(tmp_path / "not-a-run")]) == 2
    assert "not-a-run" in capsys.readouterr().err


def test_inline_html_keeps_glob_selectors_literal():
    from surgeon.report.tables import inline_html
    assert inline_html("`**`: BitFit, **bold**, `a<b`") == \
        "<code>**</code>: BitFit, <strong>bold</strong>, <code>a&lt;b</code>"


def test_evaluations_after_the_end_are_shown_apart(tmp_path):
    run_dir = make_run(tmp_path, steps=20)
    with (run_dir / "metrics.jsonl").open("a") as f:  # `surgeon eval RUN --inference stochastic` later
        f.write(json.dumps({"event": "eval", "split": "test", "step": 20, "top1": 0.8512, "loss": 0.5,
                            "inference": "stochastic"}) + "\n")
    run = load_run_data(run_dir)
    assert run.test_top1 == pytest.approx(87.31) and run.inference == "merge"
    assert [e["inference"] for e in run.later_evals] == ["stochastic"]


@pytest.mark.parametrize("times, start, expected", [
    ([2.0, 4.0, 6.0], "2025-01-01T10:00:00", 6.0),                              # elapsed seconds
    ([1.7e9 + 10, 1.7e9 + 20, 1.7e9 + 40], "2025-01-01T10:00:00", 30.0),       # Unix time, naive start
    ([1_735_725_610.0, 1_735_725_640.0], "2025-01-01T10:00:00+00:00", 40.0),  # Unix time, aware start
    (["2025-01-01T10:00:05", "2025-01-01T10:01:05"], "2025-01-01T10:00:00", 65.0)])  # ISO strings
def test_elapsed_time_of_an_unfinished_run(tmp_path, times, start, expected):
    run_dir = tmp_path / "r"
    run_dir.mkdir()
    events = [{"event": "start", "time": start}] + [
        {"event": "train", "step": i + 1, "loss": 1.0, "time": t} for i, t in enumerate(times)]
    (run_dir / "metrics.jsonl").write_text("\n".join(json.dumps(e) for e in events))
    assert load_run_data(run_dir).train_seconds == pytest.approx(expected)
