"""Tables for reports: one plain :class:`Table` type, its markdown/HTML/CSV renderings, and the
parameter tables of a run's surgery plan (METHODS.md §1 "Params (M)").

Everything here works on plain data (the ``plan`` dict the trainer logs), so a suite runner or
a notebook can build the same tables without a run directory.
"""
from __future__ import annotations

import csv
import html
import io
import re
from dataclasses import dataclass, field


@dataclass
class Table:
    """A rectangular table of already formatted cells.

    Attributes:
        columns: header cells.
        rows: one list of cell strings per row (same length as ``columns``).
        align: ``"l"`` or ``"r"`` per column (numbers right-aligned, as papers print them).
        title: shown above the table (markdown: bold line; HTML: caption).
        notes: footnotes shown below the table.
    """

    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)
    align: list[str] | None = None
    title: str = ""
    notes: list[str] = field(default_factory=list)

    def __post_init__(self):
        if self.align is None:
            self.align = ["l"] * len(self.columns)
        assert len(self.align) == len(self.columns), "one alignment per column"
        for row in self.rows:
            assert len(row) == len(self.columns), f"row {row} has {len(row)} cells for {len(self.columns)} columns"


def _md_cell(text: str) -> str:
    # A pipe would end the cell (regex selectors contain them); a newline would end the row.
    return str(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(table: Table) -> str:
    """GitHub-flavoured markdown, columns padded so the text is readable as is in a terminal."""
    cells = [[_md_cell(c) for c in table.columns]] + [[_md_cell(c) for c in row] for row in table.rows]
    widths = [max(3, *(len(row[i]) for row in cells)) for i in range(len(table.columns))]

    def line(row):
        return "| " + " | ".join(c.rjust(w) if a == "r" else c.ljust(w)
                                 for c, w, a in zip(row, widths, table.align)) + " |"

    rule = "| " + " | ".join("-" * (w - 1) + ":" if a == "r" else "-" * w
                             for w, a in zip(widths, table.align)) + " |"
    out = [f"**{table.title}**", ""] if table.title else []
    out += [line(cells[0]), rule] + [line(row) for row in cells[1:]]
    if table.notes:
        out += [""] + [f"{n}  " if i < len(table.notes) - 1 else n for i, n in enumerate(table.notes)]
    return "\n".join(out)


_CODE = re.compile(r"`([^`]+)`")
_MARKUP = [
    (re.compile(r"\*\*([^*]+)\*\*"), r"<strong>\1</strong>"),
    # Links are only ever relative paths the report itself writes (no remote resources).
    (re.compile(r"\[([^\]]+)\]\(([^)\s]+)\)"), r'<a href="\2">\1</a>'),
]


def inline_html(text: str) -> str:
    """HTML for one line of the markdown subset reports use: `code`, **bold**, [text](link).

    Code spans are cut out first so a selector such as ``**`` is never read as bold markup.
    """
    out = []
    for i, part in enumerate(_CODE.split(str(text))):
        part = html.escape(part)
        if i % 2:  # odd pieces are the insides of `code` spans
            out.append(f"<code>{part}</code>")
            continue
        for pattern, repl in _MARKUP:
            part = pattern.sub(repl, part)
        out.append(part)
    return "".join(out)


def render_html(table: Table) -> str:
    """An HTML ``<table>`` (styled by the page's inline CSS, see :mod:`surgeon.report.html`)."""
    parts = ["<table>"]
    if table.title:
        parts.append(f"<caption>{inline_html(table.title)}</caption>")
    cls = ['' if a == "l" else ' class="num"' for a in table.align]
    parts.append("<thead><tr>" + "".join(f"<th{c}>{inline_html(h)}</th>" for h, c in zip(table.columns, cls))
                 + "</tr></thead>")
    parts.append("<tbody>")
    for row in table.rows:
        parts.append("<tr>" + "".join(f"<td{c}>{inline_html(v)}</td>" for v, c in zip(row, cls)) + "</tr>")
    parts.append("</tbody></table>")
    if table.notes:
        parts.append('<p class="notes">' + "<br>".join(inline_html(n) for n in table.notes) + "</p>")
    return "\n".join(parts)


def render_csv(table: Table) -> str:
    """The table as CSV text (header row first; markdown markup stripped from cells)."""
    buf = io.StringIO()
    writer = csv.writer(buf, lineterminator="\n")
    strip = re.compile(r"\*\*|`")
    writer.writerow([strip.sub("", c) for c in table.columns])
    for row in table.rows:
        writer.writerow([strip.sub("", c) for c in row])
    return buf.getvalue()


# ---- formatting ------------------------------------------------------------------------

def millions(n: int | float | None, digits: int = 2) -> str:
    """Parameter count in millions, the papers' two decimals (``1.19``); ``—`` if unknown."""
    return "—" if n is None else f"{n / 1e6:.{digits}f}"


def count(n: int | None) -> str:
    return "—" if n is None else f"{int(n):,}"


def duration(seconds: float | None) -> str:
    """``42.0 s``, ``3 min 12 s``, ``2 h 05 min``: the resolution a reader cares about."""
    if seconds is None:
        return "—"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(int(round(seconds)), 60)
    if minutes < 60:
        return f"{minutes} min {sec:02d} s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min"


def percent(x: float | None, digits: int = 2) -> str:
    return "—" if x is None else f"{x:.{digits}f}"


# ---- the surgery plan ------------------------------------------------------------------

_INDEX = re.compile(r"^\d+$")


def _shape(module: str) -> tuple[str, tuple[int, ...]]:
    """``blocks.3.mlp`` → (``blocks.*.mlp``, (3,)): the name with its indices folded out."""
    parts = module.split(".") if module else []
    indices = tuple(int(p) for p in parts if _INDEX.match(p))
    return ".".join("*" if _INDEX.match(p) else p for p in parts), indices


def index_ranges(values: list[int]) -> str:
    """``[0, 1, 2, 3, 7, 9, 10]`` → ``0–3, 7, 9–10``."""
    values = sorted(set(values))
    spans: list[list[int]] = []
    for v in values:
        if spans and v == spans[-1][1] + 1:
            spans[-1][1] = v
        else:
            spans.append([v, v])
    return ", ".join(str(a) if a == b else f"{a}–{b}" for a, b in spans)


def collapse_targets(targets: list[dict]) -> list[dict]:
    """Group patched modules that differ only in their block indices and have the same method,
    parameter count and detail: a 12-block ViT gives one row ``12 × blocks.*.mlp`` instead of 12.

    Returns:
        rows in first-appearance order: ``{"module", "count", "method", "params" (each),
        "total", "detail", "indices"}``; ``indices`` lists the varying index per module when
        the name has exactly one index (else empty).
    """
    groups: dict[tuple, dict] = {}
    for t in targets:
        module = str(t.get("module", ""))
        shape, idx = _shape(module)
        params = int(t.get("params") or 0)
        key = (shape, str(t.get("method", "?")), params, str(t.get("detail") or ""))
        g = groups.setdefault(key, {"module": module, "shape": shape, "count": 0, "method": key[1],
                                    "params": params, "detail": key[3], "indices": []})
        g["count"] += 1
        if len(idx) == 1:
            g["indices"].append(idx[0])
    rows = []
    shapes_seen: dict[str, int] = {}
    for g in groups.values():
        shapes_seen[g["shape"]] = shapes_seen.get(g["shape"], 0) + 1
    for g in groups.values():
        if g["count"] == 1:
            label = g["module"] or "(whole model)"
        else:
            label = g["shape"]
            # Two groups with the same folded name (say MLAE with per-block expert counts) are
            # told apart by the indices they cover.
            if shapes_seen[g["shape"]] > 1 and g["indices"]:
                label += f" [{index_ranges(g['indices'])}]"
        rows.append({"module": label, "count": g["count"], "method": g["method"], "params": g["params"],
                     "total": g["params"] * g["count"], "detail": g["detail"], "indices": g["indices"]})
    return rows


def parameter_tables(plan: dict) -> list[Table]:
    """The ``surgeon plan`` tables from a logged plan: selectors, patched modules (collapsed),
    totals with the papers' Params (M). Missing keys show as ``—``."""
    tables = []
    matches = plan.get("matches") or []
    if matches:
        semantic = any("resolved" in m for m in matches)  # a semantic target: what it found in this backbone
        tables.append(Table(["rule", "selector", "method", "modules matched"] + (["resolved to"] if semantic else []),
                            [[str(m.get("rule", "")), f"`{m.get('selector', '')}`", str(m.get("method", "")),
                              count(m.get("count"))] + ([m.get("resolved", "")] if semantic else []) for m in matches],
                            ["r", "l", "l", "r"] + (["l"] if semantic else []), title="Selectors"))
    targets = plan.get("targets") or []
    if targets:
        rows = []
        for r in collapse_targets(targets):
            module = f"`{r['module']}`" if r["count"] == 1 else f"{r['count']} × `{r['module']}`"
            each = count(r["params"]) + (" each" if r["count"] > 1 else "")
            rows.append([module, r["method"], each, count(r["total"]), r["detail"]])
        tables.append(Table(["modules", "method", "params", "total", "detail"], rows, ["l", "l", "r", "r", "l"],
                            title="Patched modules"))
    backbone = plan.get("backbone_params")
    extra = plan.get("extra_params")
    pct = plan.get("extra_percent_of_backbone")
    if pct is None and extra is not None and backbone:
        pct = 100.0 * extra / backbone
    totals = [("backbone (no head)", backbone), ("extra = **Params (M)**, head excluded", extra),
              ("head", plan.get("head_params")), ("trainable (optimizer)", plan.get("trainable_params"))]
    rows = [[label, count(n), millions(n)] for label, n in totals]
    rows.append(["extra, % of backbone", "—" if pct is None else f"{pct:.3f}%", ""])
    tables.append(Table(["", "params", "M"], rows, ["l", "r", "r"], title="Totals"))
    return tables
