"""A report as a list of blocks, rendered once to markdown and once to self-contained HTML.

Building the content once keeps ``report.md`` and ``report.html`` saying the same thing;
text uses a small markdown subset (`code`, **bold**, [text](relative-link)) that
:func:`surgeon.report.tables.inline_html` understands.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Union

from .tables import Table, render_markdown


@dataclass
class Heading:
    text: str
    level: int = 2


@dataclass
class Paragraph:
    text: str


@dataclass
class Bullets:
    items: list[str] = field(default_factory=list)


@dataclass
class Figure:
    """A PNG written under the report's directory; markdown links it, HTML embeds it."""

    path: Path
    caption: str = ""


Block = Union[Heading, Paragraph, Bullets, Figure, Table]


def to_markdown(blocks: list[Block], base_dir: Path) -> str:
    """Markdown text; figure links are relative to ``base_dir`` (where the .md file goes)."""
    out: list[str] = []
    for block in blocks:
        if isinstance(block, Heading):
            out.append("#" * block.level + " " + block.text)
        elif isinstance(block, Paragraph):
            out.append(block.text)
        elif isinstance(block, Bullets):
            out.append("\n".join(f"- {item}" for item in block.items))
        elif isinstance(block, Figure):
            rel = Path(os.path.relpath(block.path, base_dir)).as_posix()
            out.append(f"![{block.caption}]({rel})" + (f"\n\n*{block.caption}*" if block.caption else ""))
        elif isinstance(block, Table):
            out.append(render_markdown(block))
        else:  # pragma: no cover - a new block type without a renderer is a bug
            raise TypeError(f"unknown report block {type(block).__name__}")
    return "\n\n".join(out) + "\n"
