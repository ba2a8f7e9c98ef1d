"""Self-contained HTML for a report: inline CSS, PNGs embedded as base64 data URIs, no scripts
and no remote resources, so the single file can be mailed, archived or opened offline."""
from __future__ import annotations

import base64
import html as _html

from .document import Block, Bullets, Figure, Heading, Paragraph
from .tables import Table, inline_html, render_html

# Kept small and neutral: the page must read well printed and in dark-mode-less viewers.
_CSS = """
body { font-family: -apple-system, "Segoe UI", Helvetica, Arial, sans-serif; max-width: 1100px;
       margin: 2em auto; padding: 0 1em; color: #1f2328; line-height: 1.45; }
h1 { border-bottom: 2px solid #d0d7de; padding-bottom: .3em; }
h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; margin-top: 1.6em; }
code { background: #f3f4f6; padding: .1em .3em; border-radius: 3px; font-size: 90%; }
table { border-collapse: collapse; margin: .8em 0; font-size: 92%; }
caption { text-align: left; font-weight: 600; padding-bottom: .3em; }
th, td { border: 1px solid #d0d7de; padding: .3em .6em; vertical-align: top; }
th { background: #f6f8fa; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
p.notes { font-size: 85%; color: #57606a; margin-top: -.4em; }
figure { margin: 1em 0; }
figure img { max-width: 100%; height: auto; border: 1px solid #eaeef2; }
figcaption { font-size: 90%; color: #57606a; }
.warning { background: #fff8c5; border: 1px solid #d4a72c; padding: .5em .8em; border-radius: 4px; }
"""


def _data_uri(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def to_html(blocks: list[Block], title: str) -> str:
    """The whole page as one string."""
    body = []
    for block in blocks:
        if isinstance(block, Heading):
            level = min(max(block.level, 1), 6)
            body.append(f"<h{level}>{inline_html(block.text)}</h{level}>")
        elif isinstance(block, Paragraph):
            # Paragraphs that open with a bold "Warning" are the run-did-not-finish notes.
            cls = ' class="warning"' if block.text.startswith("**Warning") else ""
            body.append(f"<p{cls}>{inline_html(block.text)}</p>")
        elif isinstance(block, Bullets):
            body.append("<ul>" + "".join(f"<li>{inline_html(i)}</li>" for i in block.items) + "</ul>")
        elif isinstance(block, Figure):
            alt = _html.escape(block.caption or block.path.stem)
            cap = f"<figcaption>{inline_html(block.caption)}</figcaption>" if block.caption else ""
            body.append(f'<figure><img alt="{alt}" src="{_data_uri(block.path)}">{cap}</figure>')
        elif isinstance(block, Table):
            body.append(render_html(block))
        else:  # pragma: no cover
            raise TypeError(f"unknown report block {type(block).__name__}")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{_html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            + "\n".join(body) + "\n</body>\n</html>\n")
