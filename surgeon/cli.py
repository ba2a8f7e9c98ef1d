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
