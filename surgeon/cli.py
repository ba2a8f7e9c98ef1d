"""The ``surgeon`` command line. Each command is a thin call into the library.

Exit codes: 0 success, 2 a user's mistake (message, no traceback), 1 a bug in surgeon.
"""
from __future__ import annotations

import json
import shutil
import sys
import warnings
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from surgeon.errors import REPORT_URL, RecipeError, UserError

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Declarative parameter-efficient surgery for timm backbones.")
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ModelOpt = typer.Option(None, "--model", "-m", help="Override model.name (any timm model).")
SetOpt = typer.Option(None, "--set", "-s", help="Override a field: a.b=VALUE (YAML-typed) or ~a.b to remove it.")


def _load(recipe: str, model: Optional[str], overrides: Optional[List[str]], data: Optional[str] = None):
    from surgeon.recipe import load_recipe

    return load_recipe(recipe, overrides or [], model=model, data=data)


@app.command()
def validate(recipes: List[str] = typer.Argument(..., help="Recipe files (or built-in names)."),
             model: Optional[str] = ModelOpt, set_: Optional[List[str]] = SetOpt,
             schema_only: bool = typer.Option(False, "--schema-only", help="Skip the checks against the real model.")):
    """Check recipes: schema, then against the real timm model (selectors, effects). Exit 2 if any is invalid."""
    import surgeon

    bad = 0
    for path in recipes:
        try:
            recipe = _load(path, model, set_)
            if not schema_only:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    surgeon.build_model(recipe, weights=False, device="meta")
        except UserError as exc:
            bad += 1
            err.print(f"[red]✗[/] {path}", highlight=False)
            err.print(str(exc), markup=False)
            continue
        out.print(f"[green]✓[/] {path}")
    if bad:
        err.print(f"{bad} of {len(recipes)} recipe(s) invalid")
        raise typer.Exit(2)


@app.command()
def schema():
    """Print the recipe JSON Schema (schemas/recipe.schema.json)."""
    from surgeon.resources import schema_path

    sys.stdout.write(schema_path().read_text())


@app.command()
def plan(recipe: str = typer.Argument(..., help="Recipe file or built-in name."),
         model: Optional[str] = ModelOpt, set_: Optional[List[str]] = SetOpt,
         as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables.")):
    """Build the model with random weights (never downloads), apply the surgery, count parameters."""
    import surgeon
    from surgeon.surgery.table import print_plan

    r = _load(recipe, model, set_)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        m = surgeon.build_model(r, weights=False, device="meta")
    p = m.surgeon_plan
    if as_json:
        payload = {"recipe": r.name, "model": r["model"]["name"], **p.to_dict()}
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    print_plan(p, out, title=f"{r.name} on {r['model']['name']}")


@app.command()
def apply(recipe: Optional[str] = typer.Argument(None, help="Recipe file or built-in name (optional with --resume)."),
          model: Optional[str] = ModelOpt, set_: Optional[List[str]] = SetOpt,
          data: Optional[str] = typer.Option(None, "--data", "-d", help="Override data.source, e.g. imagefolder:PATH."),
          out_dir: Optional[str] = typer.Option(None, "--out", "-o", help="Run directory (default runs/<recipe>-<model>-<data>-<time>)."),
          resume: Optional[str] = typer.Option(None, "--resume", help="Continue the run in this directory.")):
    """Train: surgery + training + merge + report. Prints the run directory last."""
    from surgeon.train.apply import apply_recipe

    run_dir = apply_recipe(recipe, model=model, data=data, overrides=set_, out=out_dir, resume=resume, console=err)
    out.print(str(run_dir), markup=False)


@app.command("merge")
def merge_cmd(run_dir: Path = typer.Argument(..., help="Run directory."),
              mode: Optional[str] = typer.Option(None, "--mode", help="average | jigsaw (default: the recipe's eval.merge_mode).")):
    """Merge a run into RUN/merged/ and record the merged-vs-unmerged output difference."""
    from surgeon.merge_run import merge_run

    info = merge_run(run_dir, mode=mode)
    out.print(f"merged ({info['format']}, {info['mode']}) -> {info['path']}\n"
              f"max |merged - unmerged| logit: {info['max_abs_diff']:.3g} (relative {info['max_rel_diff']:.3g})", markup=False)


@app.command("eval")
def eval_cmd(run_dir: Path = typer.Argument(..., help="Run directory."),
             data: Optional[str] = typer.Option(None, "--data", "-d", help="Evaluate on this data source instead."),
             inference: Optional[str] = typer.Option(None, "--inference", help="merge | stochastic | fixed | ensemble."),
             split: Optional[str] = typer.Option(None, "--split", help="test | val | train (default test, else val)."),
             per_class: bool = typer.Option(False, "--per-class", help="Also print top-1 per class."),
             as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")):
    """Top-1 of a trained run (merged model by default)."""
    from surgeon.evaluate import eval_run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res, split_name, info = eval_run(run_dir, data=data, mode=inference, split=split)
    if as_json:
        payload = {"run": str(run_dir), "split": split_name, "source": info["source"], "inference": res.inference,
                   "top1": res.top1, "loss": res.loss, "n": res.n, "per_class": res.per_class}
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    out.print(f"{info['recipe']} on {info['model']}, {split_name} of {info['source']} ({res.n} images, "
              f"{res.inference} inference): top-1 {res.top1:.2f}%  loss {res.loss:.4f}", markup=False)
    if per_class:
        from rich.table import Table

        table = Table("class", "images", "top-1 %")
        for row in res.per_class:
            table.add_row(row["class"], str(row["n"]), "-" if row["top1"] is None else f"{row['top1']:.2f}")
        out.print(table)


@app.command("ls")
def list_recipes():
    """List the built-in recipes."""
    from surgeon.recipe.loader import parse_yaml_text
    from surgeon.resources import builtin_recipes

    for name, path in builtin_recipes().items():
        data, _ = parse_yaml_text(path.read_text(), str(path))
        out.print(f"[bold]{name:<16}[/] {(data or {}).get('description', '')}")


@app.command()
def cp(name: str = typer.Argument(..., help="Built-in recipe name (see `surgeon ls`)."),
       dest: Path = typer.Argument(..., help="File or directory to copy to."),
       force: bool = typer.Option(False, "--force", "-f", help="Overwrite an existing file.")):
    """Copy a built-in recipe to edit it."""
    from surgeon.resources import builtin_recipes

    recipes = builtin_recipes()
    key = name.removesuffix(".yaml")
    if key not in recipes:
        raise UserError(f"no built-in recipe '{name}'", hint="known: " + ", ".join(recipes))
    target = dest / f"{key}.yaml" if dest.is_dir() else dest
    if target.exists() and not force:
        raise UserError(f"{target} exists; not overwriting it", hint="pass --force to overwrite")
    if not target.parent.exists():
        raise UserError(f"directory {target.parent} does not exist")
    shutil.copyfile(recipes[key], target)
    out.print(f"copied {key} -> {target}")


@app.command()
def report(runs: List[Path] = typer.Argument(..., metavar="RUN_DIR...",
                                           help="Run directories (or one folder holding run directories)."),
           out_dir: Optional[Path] = typer.Option(None, "--out", "-o",
                                                  help="Where a comparison goes (default: the runs' common "
                                                       "parent's comparison/).")):
    """One run: write RUN/report.md and report.html. Several (or --out): one comparison (md, html, csv, plot)."""
    from surgeon import report as rp

    dirs = rp.expand_run_dirs(runs)
    if len(dirs) == 1 and out_dir is None:
        out.print(str(rp.write_report(dirs[0])))
        return
    results = rp.collect_runs(dirs)
    path = rp.write_comparison(results, out_dir if out_dir is not None else rp.default_out_dir(dirs))
    out.print(rp.render_markdown(rp.comparison_table(results)), markup=False)
    out.print(str(path))


@app.command()
def suite(suite_file: str = typer.Argument(..., help="Suite YAML, or a built-in suite: demo, cpu_repro, vtab1k."),
          set_: Optional[List[str]] = typer.Option(None, "--set", "-s",
                                                   help="Override a suite field, e.g. seeds=[0] or set.train.epochs=2."),
          out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Output root (default runs/suites/NAME)."),
          report_only: bool = typer.Option(False, "--report-only", help="Only rewrite the report from finished cells."),
          workers: int = typer.Option(1, "--workers", "-w",
                                      help="Worker processes for each sweep of a `sweep:` section.")):
    """Run a grid of recipes × datasets × seeds (resumable) and write one comparison report.
    With a `sweep:` section, each recipe × dataset is tuned first (see `surgeon sweep`)."""
    from surgeon.resources import builtin_suite
    from surgeon.suite import run_suite

    md = run_suite(builtin_suite(suite_file), overrides=set_ or [], out=out_dir, only_report=report_only,
                   workers=workers)
    out.print(md.read_text(), markup=False)
    out.print(str(md), markup=False)


@app.command()
def sweep(recipe: str = typer.Argument(..., help="Recipe file or built-in name."),
          grid: Optional[List[str]] = typer.Option(None, "--grid", "-g", metavar="KEY=[V1,V2,...]",
                                                   help="A searched key and its values (YAML, typed like --set); "
                                                        "repeat for more keys, e.g. --grid 'train.base_lr=[1e-2,1e-3]'."),
          data: Optional[str] = typer.Option(None, "--data", "-d", help="Override data.source, e.g. builtin:digits."),
          model: Optional[str] = ModelOpt, set_: Optional[List[str]] = SetOpt,
          trials: Optional[int] = typer.Option(None, "--trials", "-n",
                                               help="With --sampler tpe: how many configurations to train."),
          sampler: Optional[str] = typer.Option(None, "--sampler",
                                                help="grid (every combination; default) or tpe (default with --trials)."),
          seeds: Optional[str] = typer.Option(None, "--seeds",
                                              help="Seeds of the final runs, e.g. 0,1,2 (default: the recipe's train.seed)."),
          workers: int = typer.Option(1, "--workers", "-w", help="Worker processes on this machine (they share the storage)."),
          storage: Optional[str] = typer.Option(None, "--storage",
                                                help="Optuna storage: a journal file (default OUT/study.journal) or a URL "
                                                     "(postgresql://..., mysql://..., redis://...) shared by several machines."),
          study: Optional[str] = typer.Option(None, "--study", help="Study name (default: recipe-data-hash of the search)."),
          prune: bool = typer.Option(False, "--prune", help="Stop hopeless trials early (median rule on val top-1)."),
          extend_edges: bool = typer.Option(False, "--extend-edges",
                                            help="When a numeric key's best value is on the edge of its grid, add the "
                                                 "next value beyond (same ratio), up to 3 times per side."),
          out_dir: Optional[Path] = typer.Option(None, "--out", "-o",
                                                 help="Sweep directory (default runs/sweeps/<recipe>-<data>-<hash>).")):
    """Tune hyper-parameters (VTAB protocol: train800 -> val200), then retrain the best on train800val200
    for each seed and report test. Resumable: run the same command again to continue."""
    from surgeon.sweep import run_sweep
    from surgeon.sweep.report import summary_text

    result = run_sweep(recipe, grid=grid or [], data=data, model=model, overrides=set_ or [], sampler=sampler,
                       trials=trials, seeds=seeds, workers=workers, storage=storage, study=study, prune=prune,
                       extend_edges=extend_edges, out=out_dir, console=err)
    out.print(summary_text(result), markup=False)


@app.command()
def demo(out_dir: Path = typer.Option(Path("runs/demo"), "--out", "-o", help="Where the demo runs go."),
         quick: bool = typer.Option(False, "--quick", help="A few steps only (smoke test; accuracy meaningless).")):
    """The main job, offline: MoSA vs AdaptFormer on the built-in backbone and task, then a comparison."""
    from surgeon.demo import run_demo

    run_demo(out=out_dir, quick=quick, summary_console=out)


@app.command("pretrain-builtin")
def pretrain_builtin_cmd(
        out_path: Optional[Path] = typer.Option(None, "--out", "-o",
                                                help="Weights file to write (default: the packaged built-in)."),
        seed: int = typer.Option(0, help="Class seed of the formula dataset (the shipped weights use 0)."),
        classes: int = typer.Option(100, help="Formula classes."),
        per_class: int = typer.Option(200, help="Rendered images per class."),
        epochs: float = typer.Option(6.0, help="Passes over the rendered set (the shipped weights: 6)."),
        threads: Optional[int] = typer.Option(None, help="torch threads (the shipped weights used 1).")):
    """Re-create the built-in formula-pretrained backbone (FractalDB-style), deterministically."""
    from surgeon.builtin import BUILTIN_BACKBONES
    from surgeon.builtin.pretrain import pretrain_builtin

    target = out_path or Path(BUILTIN_BACKBONES["fractal_vit_tiny"]["file"])
    pretrain_builtin(target, classes=classes, per_class=per_class, seed=seed, epochs=epochs, threads=threads)
    out.print(str(target), markup=False)


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point: user mistakes exit 2 with a message, bugs exit 1 with a report link."""
    try:
        # standalone_mode=False: click returns a command's typer.Exit code instead of exiting
        code = app(args=argv, standalone_mode=False)
    except (UserError, RecipeError) as exc:
        err.print(str(exc) if isinstance(exc, RecipeError) else f"error: {exc}", markup=False)
        sys.exit(2)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except Exception as exc:  # noqa: BLE001 - the last line of defence
        import click

        if isinstance(exc, click.exceptions.Abort):
            sys.exit(130)
        if isinstance(exc, click.ClickException):
            exc.show()
            sys.exit(exc.exit_code)
        import traceback

        traceback.print_exc()
        err.print(f"[red]internal error[/] ({type(exc).__name__}): this is a bug in surgeon, not in your input. "
                  f"Please report it with the command you ran and the traceback above: {REPORT_URL}")
        sys.exit(1)
    sys.exit(code if isinstance(code, int) else 0)


if __name__ == "__main__":
    main()
