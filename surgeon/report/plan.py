"""The plan table (``surgeon plan``): what each selector matched, per module its method and
parameters, totals."""
from __future__ import annotations

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .tables import collapse_targets


def millions(n: int) -> str:
    """Parameter count in millions with the papers' two decimals (e.g. ``1.19M``)."""
    return f"{n / 1e6:.2f}M"


def plan_tables(plan, *, title: str = "") -> list[Table]:
    """Rich tables of a :class:`~surgeon.surgery.SurgeryPlan`: one row per selector, one per group
    of modules patched alike, and the totals."""
    matches = Table(title=f"{title} — selectors" if title else "selectors", title_justify="left")
    semantic = any("resolved" in m for m in plan.matches)  # a semantic target: show what it found
    for col in ("rule", "selector", "method", "matched") + (("resolved to",) if semantic else ()):
        matches.add_column(col, justify="right" if col in ("rule", "matched") else "left")
    for m in plan.matches:
        matches.add_row(str(m["rule"]), escape(m["selector"]), m["method"], str(m["count"]),
                        *((escape(m.get("resolved", "")),) if semantic else ()))

    # Modules patched alike differ only in their block index: one row each (blocks.*.mlp × 12).
    targets = Table(title="patched modules", title_justify="left")
    for col in ("module", "count", "method", "params each", "params", "detail"):
        targets.add_column(col, justify="right" if col in ("count", "params each", "params") else "left")
    for row in collapse_targets([vars(t) for t in plan.targets]):
        targets.add_row(escape(row["module"]), str(row["count"]), row["method"], f"{row['params']:,}",
                        f"{row['total']:,}", escape(row["detail"]))

    totals = Table(title="totals", title_justify="left")
    totals.add_column("what")
    totals.add_column("params", justify="right")
    totals.add_column("M", justify="right")
    rows = [("backbone (no head)", plan.backbone_params), ("extra = Params (M), head excluded", plan.extra_params),
            ("head", plan.head_params), ("trainable (optimizer)", plan.trainable_params)]
    for label, n in rows:
        totals.add_row(label, f"{n:,}", millions(n))
    totals.add_row("extra, % of backbone", f"{100 * plan.extra_params / max(plan.backbone_params, 1):.3f}%", "")
    return [matches, targets, totals] if plan.targets else [matches, totals]


def print_plan(plan, console: Console, *, title: str = "") -> None:
    """Print :func:`plan_tables` to ``console``."""
    for table in plan_tables(plan, title=title):
        console.print(table)
