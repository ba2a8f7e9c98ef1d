"""Write the published recipe schema, ``schemas/recipe.schema.json``, from the code.

    python -m surgeon.recipe.schema_gen            # (re)write the file
    python -m surgeon.recipe.schema_gen --check    # exit 1 if the file is out of date

The schema is assembled from the recipe's sections and every method folder's fragment
(:func:`surgeon.recipe.schema.recipe_schema`); the file is what editors and ``surgeon schema``
read. tests/test_recipe.py fails when it differs from what this module writes.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from surgeon.io import write_text
from surgeon.resources import schema_path

from .schema import recipe_schema


def schema_text() -> str:
    """The published schema's exact text: 2-space JSON, ASCII, one trailing newline."""
    return json.dumps(recipe_schema(), indent=2) + "\n"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    path = Path(schema_path()).resolve()
    text = schema_text()
    if args == ["--check"]:
        current = path.read_text(encoding="utf-8") if path.is_file() else ""
        if current != text:
            print(f"{path} is out of date: run `python -m surgeon.recipe.schema_gen`", file=sys.stderr)
            return 1
        return 0
    if args:
        print("usage: python -m surgeon.recipe.schema_gen [--check]", file=sys.stderr)
        return 2
    write_text(path, text)
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
