"""The ``surgeon`` command line. Each command is a thin call into the library.

Exit codes: 0 success, 2 a user's mistake (message, no traceback), 1 a bug in surgeon.

Start-up stays cheap: this module imports neither torch nor timm, and the commands that never
build a model (``--help``, ``ls``, ``cp``, ``schema``, ``show``, a recipe that fails its schema)
never import them (tests/test_cli_usage.py checks it). Commands import what they need inside
their function, which is why most imports below are local.
"""
from __future__ import annotations

import json
import os
import shutil
import sys
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional

import typer
from rich.console import Console

from surgeon.errors import REPORT_REQUEST, RecipeError, SurgeonWarning, UserError
from surgeon.methods.modes import INFERENCE_MODES, MERGE_MODES

app = typer.Typer(no_args_is_help=True, pretty_exceptions_enable=False,
                  help="Declarative parameter-efficient surgery for timm backbones.")
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

ModelOpt = typer.Option(None, "--model", "-m", help="Override model.name (any timm model).")
SetOpt = typer.Option(None, "--set", "-s", help="Override a field: a.b=VALUE (YAML-typed) or ~a.b to remove it.")
GpusOpt = typer.Option(None, "--gpus", metavar="0,1,2,3",
                       help="One worker process per listed GPU, each seeing only its GPU (CUDA_VISIBLE_DEVICES); "
                            "indices count the GPUs this process sees. Replaces --workers.")


def _print_version(value: bool) -> None:
    if value:
        from surgeon import __version__

        out.print(f"surgeon {__version__}", markup=False)
        raise typer.Exit()


@app.callback()
def _root(version: bool = typer.Option(False, "--version", callback=_print_version, is_eager=True,
                                       help="Print the version and exit.")):
    """Declarative parameter-efficient surgery for timm backbones."""


@contextmanager
def _quiet():
    """Silence the library's warnings (a shapes-only build warns that it has no weights), but show
    each :class:`SurgeonWarning` about the user's input as one ``warning:`` line."""
    with warnings.catch_warnings():  # restores the filters and showwarning afterwards
        warnings.simplefilter("ignore")
        warnings.simplefilter("always", SurgeonWarning)
        warnings.showwarning = lambda message, *args, **kwargs: err.print(f"warning: {message}", markup=False)
        yield


def _load(recipe: str, model: Optional[str], overrides: Optional[List[str]], data: Optional[str] = None):
    from surgeon.recipe import load_recipe

    return load_recipe(recipe, overrides or [], model=model, data=data)


@app.command()
def validate(recipes: List[str] = typer.Argument(..., help="Recipe files (or built-in names)."),
             model: Optional[str] = ModelOpt, set_: Optional[List[str]] = SetOpt,
             schema_only: bool = typer.Option(False, "--schema-only", help="Skip the checks against the real model.")):
    """Check recipes: schema, then against the real timm model (selectors, effects). Exit 2 if any is invalid.

    `surgeon show` prints a recipe as resolved (defaults, extends, overrides) without these model checks.
    """
    bad = 0
    for path in recipes:
        try:
            recipe = _load(path, model, set_)
            if not schema_only:
                from surgeon.model import build_model  # torch + timm: only past the schema

                with _quiet():
                    build_model(recipe, weights=False, device="meta")
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


def _error_json(exc: UserError) -> dict:
    """``{"error": summary, "problems": [{"where", "field", "message", "hint"}]}`` for ``--json``."""
    if isinstance(exc, RecipeError):
        problems = [{"where": w, "field": f or None, "message": m, "hint": h} for w, f, m, h in exc.problems]
        return {"error": f"the recipe has {len(problems)} problem(s)", "problems": problems}
    return {"error": exc.message,
            "problems": [{"where": exc.where, "field": None, "message": exc.message, "hint": exc.hint}]}


@app.command()
def plan(recipe: str = typer.Argument(..., help="Recipe file or built-in name."),
         model: Optional[str] = ModelOpt, set_: Optional[List[str]] = SetOpt,
         data: Optional[str] = typer.Option(
             None, "--data", "-d",
             help="Size the head for this data source (e.g. builtin:digits, imagefolder:PATH). Only the class list "
                  "is read: folder names, list or json files, never an image; an imagefolder tree is listed "
                  "file by file, which takes a while for millions of images."),
         as_json: bool = typer.Option(False, "--json", help="Print one JSON object instead of tables; on failure "
                                                            '{"error": ..., "problems": [...]} (exit 2).')):
    """Build the model with random weights (never downloads), apply the surgery, count parameters.

    Modules patched alike (e.g. blocks.{0..11}.mlp) are one row with their count.
    """
    from surgeon.model import build_model
    from surgeon.report.plan import print_plan

    try:
        r = _load(recipe, model, set_, data)
        num_classes = None
        if data is not None:
            from surgeon.data.sources import source_classes

            names = source_classes(r.data, seed=r.data.seed, num_classes=r.model.num_classes)
            given = r.model.num_classes
            if given is not None and given != len(names):
                raise UserError(f"model.num_classes is {given} but the data has {len(names)} classes",
                                where=r.where(("model", "num_classes")),
                                hint="remove model.num_classes (it defaults to the data's class count) or fix the data")
            num_classes = len(names)
        with _quiet():
            m = build_model(r, weights=False, device="meta", num_classes=num_classes)
    except UserError as exc:
        if not as_json:
            raise
        sys.stdout.write(json.dumps(_error_json(exc), indent=2) + "\n")
        err.print(str(exc) if isinstance(exc, RecipeError) else f"error: {exc}", markup=False)
        raise typer.Exit(2)
    p = m.surgeon_plan
    from surgeon.backbone import resolve_model_name

    resolved = resolve_model_name(r.model)[0]
    if as_json:
        from surgeon.train.schedule import peak_lr

        payload = {"recipe": r.name, "model": resolved, "peak_lr": peak_lr(r.train),
                   "num_classes": getattr(m, "num_classes", None),
                   **p.to_dict()}
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    print_plan(p, out, title=f"{r.name} on {resolved}")


def _suite_file(ref: str) -> Optional[Path]:
    """The suite file ``ref`` names (a file whose top level has ``recipes:`` and ``datasets:``, or
    a built-in suite name that is not also a recipe name), else None: it is a recipe."""
    from surgeon.recipe.loader import parse_yaml_text
    from surgeon.resources import builtin_recipes, builtin_suite

    path = Path(ref)
    if not path.is_file():
        if ref.removesuffix(".yaml") in builtin_recipes():
            return None
        path = builtin_suite(ref)
        if not path.is_file():
            return None  # load_recipe says what is wrong with it
    try:
        data, _ = parse_yaml_text(path.read_text(), str(path))
    except (OSError, UnicodeDecodeError, UserError):
        return None  # a recipe's errors are load_recipe's to report
    return path if isinstance(data, dict) and "recipes" in data and "datasets" in data else None


@app.command()
def show(target: str = typer.Argument(..., metavar="RECIPE|SUITE",
                                      help="Recipe or suite file, or a built-in name (`surgeon ls`; suites: demo, "
                                           "cpu_repro, vtab1k). A file with recipes: and datasets: is a suite."),
         model: Optional[str] = typer.Option(None, "--model", "-m",
                                             help="Override model.name (for a suite: every cell's)."),
         data: Optional[str] = typer.Option(None, "--data", "-d",
                                            help="Override data.source (for a suite: its datasets become this one)."),
         set_: Optional[List[str]] = typer.Option(None, "--set", "-s",
                                                  help="Override a field: a recipe's (a.b=VALUE, ~a.b), or for a "
                                                       "suite a suite field, as `surgeon suite --set` "
                                                       "(seeds=[0], set.train.epochs=2)."),
         as_json: bool = typer.Option(False, "--json", help='JSON: the recipe object; for a suite a list of '
                                                            '{"cell": "<recipe>/<dataset>/seed<k>", "recipe": {...}}.')):
    """Print the fully resolved recipe (a suite: every cell's recipe) without running anything.

    Defaults filled in, extends and overrides applied, schema and consistency checks run.
    The checks against the real model (does model.name exist in timm, what the selectors
    match, does every patch take effect) need torch and timm and are not run here: `surgeon
    validate` and `surgeon plan` run them.
    """
    from surgeon.recipe import load_recipe

    suite_path = _suite_file(target)
    if suite_path is None:
        recipe = load_recipe(target, set_ or [], model=model, data=data, check_model=False)
        sys.stdout.write(json.dumps(recipe.to_dict(), indent=2) + "\n" if as_json else recipe.to_yaml())
        return
    from surgeon.suite import load_suite, suite_cells

    overrides = list(set_ or [])
    if model:
        overrides.append(f"model.name={json.dumps(model)}")
    if data:
        overrides.append(f"datasets={json.dumps([data])}")
    suite = load_suite(suite_path, overrides)
    resolved = []
    for cell in suite_cells(suite, Path()):
        name = cell.run_dir.as_posix()
        try:
            resolved.append((name, load_recipe(cell.recipe, cell.overrides, check_model=False)))
        except UserError:
            err.print(f"suite {suite['name']}, cell {name}:", markup=False)
            raise
    if as_json:
        sys.stdout.write(json.dumps([{"cell": n, "recipe": r.to_dict()} for n, r in resolved], indent=2) + "\n")
        return
    for name, recipe in resolved:
        sys.stdout.write(f"--- # cell {name} (suite {suite['name']})\n{recipe.to_yaml()}")


@app.command()
def apply(recipe: Optional[str] = typer.Argument(None, help="Recipe file or built-in name (optional with --resume)."),
          model: Optional[str] = ModelOpt, set_: Optional[List[str]] = SetOpt,
          data: Optional[str] = typer.Option(None, "--data", "-d", help="Override data.source, e.g. imagefolder:PATH."),
          out_dir: Optional[str] = typer.Option(None, "--out", "-o", help="Run directory (default runs/<recipe>-<model>-<data>-<time>)."),
          resume: Optional[str] = typer.Option(None, "--resume", help="Continue the run in this directory."),
          nproc: int = typer.Option(1, "--nproc", min=1, help="Train on N processes of this machine (one per GPU; gloo "
                                                             "on CPU) through torchrun; train.batch_size stays the "
                                                             "global batch. Several machines: run torchrun yourself.")):
    """Train: surgery + training + merge + report. Prints the run directory last.

    Ctrl-C finishes the step under way, saves a checkpoint and prints how to resume (exit 130); a
    second Ctrl-C stops at once (the last checkpoint stays intact).
    """
    if nproc > 1:
        if os.environ.get("WORLD_SIZE"):
            raise UserError("--nproc inside a torchrun launch", hint="torchrun already starts the processes: drop --nproc")
        from surgeon.train.distributed import launch_local

        argv = ["apply", *([recipe] if recipe else []), *(["--model", model] if model else []),
                *[a for value in (set_ or []) for a in ("--set", value)], *(["--data", data] if data else []),
                *(["--out", out_dir] if out_dir else []), *(["--resume", resume] if resume else [])]
        code = launch_local(nproc, argv)
        if code:
            sys.exit(code)
        return
    from surgeon.apply import Interrupted, apply_recipe

    main_rank = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone speaks for the run
    try:
        run_dir = apply_recipe(recipe, model=model, data=data, overrides=set_, out=out_dir, resume=resume,
                               console=err)
    except Interrupted:  # its line (how to resume) is printed
        raise typer.Exit(130)
    except KeyboardInterrupt:
        if main_rank:
            err.print("interrupted before a run directory was created: nothing was written", markup=False)
        raise typer.Exit(130)
    if main_rank:
        out.print(str(run_dir), markup=False)


@app.command("merge")
def merge_cmd(run_dir: Path = typer.Argument(..., help="Run directory."),
              mode: Optional[str] = typer.Option(None, "--mode", help=f"{' | '.join(MERGE_MODES)} (default: the recipe's "
                                                                      "eval.merge_mode).")):
    """Merge a run and record the merged-vs-unmerged output difference: RUN/merged/ for the
    recipe's eval.merge_mode (the run's figures), RUN/merged-<mode>/ for another mode."""
    from surgeon.merge_run import merge_run

    info = merge_run(run_dir, mode=mode)
    out.print(f"merged ({info['format']}, {info['mode']}) -> {info['path']}\n"
              f"max |merged - unmerged| logit: {info['max_abs_diff']:.3g} (relative {info['max_rel_diff']:.3g})", markup=False)


@app.command("eval")
def eval_cmd(run_dir: Path = typer.Argument(..., help="Run directory."),
             data: Optional[str] = typer.Option(None, "--data", "-d", help="Evaluate on this data source instead."),
             inference: Optional[str] = typer.Option(None, "--inference", help=f"{' | '.join(INFERENCE_MODES)}."),
             split: Optional[str] = typer.Option(None, "--split", help="test | val | train (default test, else val)."),
             merge_mode: Optional[str] = typer.Option(None, "--merge-mode", help=f"{' | '.join(MERGE_MODES)}: how merge "
                                                      "inference merges experts (default: the recipe's eval.merge_mode)."),
             per_class: bool = typer.Option(False, "--per-class", help="Also print top-1 per class."),
             allow_class_mismatch: bool = typer.Option(
                 False, "--allow-class-mismatch",
                 help="Score --data whose class names differ from the run's (labels matched by index)."),
             as_json: bool = typer.Option(False, "--json", help="Print one JSON object.")):
    """Top-1 of a trained run (merged model by default). Data with other class names than the
    run's is refused unless --allow-class-mismatch; a diverged run (non-finite weights) has no score (exit 2)."""
    from surgeon.evaluate import eval_run

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        res, split_name, info = eval_run(run_dir, data=data, mode=inference, split=split, merge_mode=merge_mode,
                                         allow_class_mismatch=allow_class_mismatch)
    merged_by = info["merge_mode"] if res.inference == "merge" else None
    if as_json:
        payload = {"run": str(run_dir), "split": split_name, "source": info["source"], "inference": res.inference,
                   "merge_mode": merged_by, "top1": res.top1, "loss": res.loss, "n": res.n, "per_class": res.per_class}
        sys.stdout.write(json.dumps(payload, indent=2) + "\n")
        return
    how = f"{res.inference} inference" + (f", {merged_by} merge" if merged_by else "")
    out.print(f"{info['recipe']} on {info['model']}, {split_name} of {info['source']} ({res.n} images, "
              f"{how}): top-1 {res.top1:.2f}%  loss {res.loss:.4f}", markup=False)
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
                                           help="Run directories, or one folder holding run directories at any depth "
                                                "(e.g. a suite's runs/suites/NAME)."),
           out_dir: Optional[Path] = typer.Option(None, "--out", "-o",
                                                  help="Where a comparison goes (default: the runs' common "
                                                       "parent's comparison/).")):
    """One run: write RUN/report.md and report.html. Several (or --out): one comparison (md, html, csv, plot).

    A run that another process is writing to (training, merging) is refused: report it when it is done.
    """
    from surgeon import report as rp
    from surgeon.io import writable_dir
    from surgeon.rundir import RunLock

    dirs = rp.expand_run_dirs(runs)
    if len(dirs) == 1 and out_dir is None:
        writable_dir(dirs[0], "report (in the run directory)")
        with RunLock(dirs[0], "surgeon report"):
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
                                      help="Worker processes for each sweep of a `sweep:` section."),
          gpus: Optional[str] = GpusOpt):
    """Run a grid of recipes × datasets × seeds (resumable) and write one comparison report.
    With a `sweep:` section, each recipe × dataset is tuned first (see `surgeon sweep`).
    `--gpus 0,1,2,3` trains four cells at a time, one per GPU (sweeps first, on the same GPUs)."""
    from surgeon.resources import builtin_suite
    from surgeon.suite_runner import run_suite

    md = run_suite(builtin_suite(suite_file), overrides=set_ or [], out=out_dir, only_report=report_only,
                   workers=workers, gpus=gpus)
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
          gpus: Optional[str] = GpusOpt,
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
                       extend_edges=extend_edges, out=out_dir, console=err, gpus=gpus)
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


def _internal_error(exc: BaseException) -> None:
    import traceback

    traceback.print_exception(exc)
    err.print(f"[red]internal error[/] ({type(exc).__name__}): this is a bug in surgeon, not in your input; "
              f"{REPORT_REQUEST}.")
    sys.exit(1)


def main(argv: Optional[List[str]] = None) -> None:
    """Console entry point: usage mistakes and user errors exit 2 with a message, bugs exit 1.

    typer/click run in standalone mode: they print usage errors (exit 2), ``--help``,
    ``--version`` and shell completion themselves and leave by ``sys.exit``. That keeps this
    function independent of where click's exception classes live (typer 0.29 vendors its own).
    What reaches the handlers below comes from surgeon's own code.
    """
    try:
        # prog_name: completion scripts and usage lines say `surgeon` even under `python -m`.
        app(args=argv, prog_name="surgeon")
    except (UserError, RecipeError) as exc:
        err.print(str(exc) if isinstance(exc, RecipeError) else f"error: {exc}", markup=False)
        sys.exit(2)
    except KeyboardInterrupt:
        err.print("interrupted")
        sys.exit(130)
    except OSError as exc:
        from surgeon.io import UNWRITABLE

        if exc.errno not in UNWRITABLE:
            _internal_error(exc)
        # A place that cannot be written (read-only, no permission, disk full): the user's to fix.
        err.print(f"error: {exc.filename or 'a file'}: cannot write: {exc.strerror}", markup=False)
        sys.exit(2)
    except Exception as exc:  # noqa: BLE001 - the last line of defence
        _internal_error(exc)
    sys.exit(0)


if __name__ == "__main__":
    main()
