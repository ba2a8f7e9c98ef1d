"""PNG plots for reports (matplotlib, Agg canvas, no pyplot global state).

Figures are built with :class:`matplotlib.figure.Figure` and drawn on an explicit Agg canvas:
reports are written at the end of training, possibly inside another program's process, and
must neither need a display nor change the process-wide pyplot backend.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from surgeon.io import atomic_write

from .runs import RunData

DPI = 100
#: Confusion matrices print per-cell percentages up to this many classes; beyond, cells are too small.
ANNOTATE_MAX_CLASSES = 20
#: Class names as tick labels up to this many classes; beyond, every k-th index only.
NAMED_TICKS_MAX_CLASSES = 40


def save_figure(fig: Figure, path: Path) -> Path:
    path = Path(path)  # atomic_write creates the folder
    FigureCanvasAgg(fig)
    # Every figure uses the constrained layout, so no bbox_inches="tight" (a second full draw).
    # No software metadata: the same run gives byte-identical plots. Written atomically, so an
    # interrupted report leaves the previous figure; the format is named because the temporary
    # file's name does not end in the path's suffix.
    fmt = path.suffix.lstrip(".") or "png"
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=DPI, metadata={"Software": None}))
    return path


def _smooth(y: np.ndarray) -> np.ndarray | None:
    """Bias-corrected exponential moving average for noisy per-step losses (None if few points).

    The window grows with the number of points so a 50-step and a 50,000-step run both show a
    readable trend; NaNs (skipped non-finite steps) do not poison the average.
    """
    n = len(y)
    if n < 40:
        return None
    beta = 1.0 - 1.0 / max(2.0, n / 25.0)
    out = np.empty(n)
    avg, weight = 0.0, 0.0
    for i, v in enumerate(y):
        if np.isfinite(v):
            avg = beta * avg + (1 - beta) * v
            weight = beta * weight + (1 - beta)
        out[i] = avg / weight if weight > 0 else np.nan
    return out


def _series(events: list[dict], key: str, scale: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    pts = [(e["step"], e[key]) for e in events
           if isinstance(e.get("step"), (int, float)) and isinstance(e.get(key), (int, float))
           and not isinstance(e.get(key), bool)]
    if not pts:
        return np.array([]), np.array([])
    steps, values = zip(*pts)
    return np.asarray(steps, float), np.asarray(values, float) * scale


def training_curves(run: RunData, path: Path) -> Path | None:
    """Loss, val top-1 and learning rate against the optimizer step, side by side.

    Returns:
        the PNG path, or None when the run logged neither train nor eval events.
    """
    if not run.train and not run.evals:
        return None
    fig = Figure(figsize=(14, 4.0), layout="constrained")
    ax_loss, ax_acc, ax_lr = fig.subplots(1, 3)

    steps, loss = _series(run.train, "loss")
    smooth = _smooth(loss)
    if len(steps):
        ax_loss.plot(steps, loss, color="C0", lw=0.8, alpha=0.35 if smooth is not None else 1.0,
                     label="train loss")
        if smooth is not None:
            ax_loss.plot(steps, smooth, color="C0", lw=1.6, label="train loss (EMA)")
    for key, color in (("ce", "C2"), ("consistency", "C3"), ("alignment", "C4")):
        s, v = _series(run.train, key)
        # The components only add information when a regulariser is on (else ce == loss).
        if len(s) and key != "ce" and np.nanmax(np.abs(v)) > 0:
            ax_loss.plot(s, _smooth(v) if _smooth(v) is not None else v, color=color, lw=1.0, label=key)
    val_events = [e for e in run.evals if e.get("split") == "val"]
    s, v = _series(val_events, "loss")
    if len(s):
        ax_loss.plot(s, v, "o-", color="C1", ms=3, lw=1.0, label="val loss")
    bad = [e["step"] for e in run.nonfinite if isinstance(e.get("step"), (int, float))][:200]
    for i, step in enumerate(bad):
        ax_loss.axvline(step, color="red", lw=0.6, alpha=0.5, label="non-finite step" if i == 0 else None)
    ax_loss.set_title("loss")

    s, v = _series(val_events, "top1", run.top1_scale)
    if len(s):
        ax_acc.plot(s, v, "o-", color="C1", ms=3, lw=1.2, label="val top-1")
    best, best_step = run.best_val
    if best is not None and isinstance(best_step, (int, float)):
        ax_acc.plot([best_step], [best], "*", color="C3", ms=12, label=f"best val {best:.2f}")
    s, v = _series([e for e in run.evals if e.get("split") == "test"], "top1", run.top1_scale)
    if len(s):
        ax_acc.plot(s, v, "s", color="C2", ms=5, label="test top-1")
    ax_acc.set_title("top-1 (%)")

    s, v = _series(run.train, "lr")
    if len(s):
        ax_lr.plot(s, v, color="C5", lw=1.2)
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))
    ax_lr.set_title("learning rate")

    for ax in (ax_loss, ax_acc, ax_lr):
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        if not ax.has_data():
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes, color="gray")
    fig.suptitle(f"{run.name}: training" + ("" if run.finished else " (run did not finish)"), fontsize=11)
    return save_figure(fig, path)


def confusion_counts(labels: list[int], preds: list[int], num_classes: int) -> np.ndarray:
    """Counts ``C[true, predicted]``."""
    cm = np.zeros((num_classes, num_classes), dtype=np.int64)
    np.add.at(cm, (np.asarray(labels, int), np.asarray(preds, int)), 1)
    return cm


def confusion_figure(labels: list[int], preds: list[int], class_names: list[str] | None,
                     title: str = "") -> Figure:
    """Row-normalised confusion matrix (each true class sums to 1), readable up to ~100 classes.

    Per-cell percentages are printed up to :data:`ANNOTATE_MAX_CLASSES` classes and class
    names used as ticks up to :data:`NAMED_TICKS_MAX_CLASSES`; past that the colour carries the
    information and ticks show every k-th class index.
    """
    names = list(class_names or [])
    k = max(len(names), max(labels + preds, default=-1) + 1, 1)
    names += [str(i) for i in range(len(names), k)]
    cm = confusion_counts(labels, preds, k).astype(float)
    support = cm.sum(axis=1, keepdims=True)
    with np.errstate(invalid="ignore", divide="ignore"):
        norm = np.where(support > 0, cm / np.maximum(support, 1), np.nan)  # NaN row: class absent

    side = min(4.0 + 0.32 * k, 14.0)
    fig = Figure(figsize=(side + 1.2, side), layout="constrained")
    ax = fig.subplots()
    im = ax.imshow(norm, cmap="Blues", vmin=0.0, vmax=1.0, interpolation="nearest")
    fig.colorbar(im, ax=ax, shrink=0.8, label="fraction of the true class")
    if k <= ANNOTATE_MAX_CLASSES:
        for i in range(k):
            for j in range(k):
                if np.isfinite(norm[i, j]) and cm[i, j] > 0:
                    ax.text(j, i, f"{100 * norm[i, j]:.0f}", ha="center", va="center", fontsize=8,
                            color="white" if norm[i, j] > 0.5 else "black")
    if k <= NAMED_TICKS_MAX_CLASSES:
        ticks = np.arange(k)
        # Elide the middle: class names often share a prefix and differ at the end.
        short = [n if len(n) <= 16 else n[:7] + "…" + n[-8:] for n in names]
        ax.set_xticks(ticks, short, rotation=90, fontsize=8)
        ax.set_yticks(ticks, short, fontsize=8)
    else:
        every = math.ceil(k / 20)
        ticks = np.arange(0, k, every)
        ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=8)
        ax.set_yticks(ticks, [str(t) for t in ticks], fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    acc = np.trace(cm) / max(cm.sum(), 1)
    ax.set_title((title + "\n" if title else "") + f"top-1 {100 * acc:.2f}% on {int(cm.sum())} images",
                 fontsize=10)
    return fig


def confusion_matrix(labels: list[int], preds: list[int], class_names: list[str] | None, path: Path,
                     title: str = "") -> Path:
    """:func:`confusion_figure` saved as a PNG at ``path``."""
    return save_figure(confusion_figure(labels, preds, class_names, title), path)


def short_labels(names: list[str]) -> tuple[list[str], str]:
    """Tick labels that keep only what differs between dotted module names, and the pattern
    they fill in: ``blocks.0.attn.qkv`` … ``blocks.11.attn.qkv`` → ``0`` … ``11`` and
    ``blocks.*.attn.qkv``. Names with nothing in common are returned as they are (pattern "")."""
    split = [n.split(".") for n in names]
    if len(split) < 2:
        return list(names), ""
    head = 0
    while all(len(p) > head + 1 for p in split) and len({p[head] for p in split}) == 1:
        head += 1
    tail = 0
    while all(len(p) > head + tail + 1 for p in split) and len({p[-1 - tail] for p in split}) == 1:
        tail += 1
    if not head and not tail:
        return list(names), ""
    labels = [".".join(p[head:len(p) - tail]) for p in split]
    pattern = ".".join(split[0][:head] + ["*"] + (split[0][len(split[0]) - tail:] if tail else []))
    return labels, pattern


def similarity_plot(per_layer: list[tuple[str, float]], matrix: np.ndarray | None, path: Path,
                    title: str = "", matrix_title: str = "") -> Path | None:
    """Expert similarity (MLAE paper Figs. 4-5): per-layer mean cosine similarity as bars and the
    expert × expert similarity matrix as a heatmap. None when there is nothing to draw."""
    panels = int(bool(per_layer)) + int(matrix is not None)
    if not panels:
        return None
    fig = Figure(figsize=(6.0 * panels, 4.6), layout="constrained")
    axes = list(np.atleast_1d(fig.subplots(1, panels)))
    if per_layer:
        ax = axes.pop(0)
        names, values = zip(*per_layer)
        labels, pattern = short_labels(list(names))
        ax.bar(range(len(values)), values, color="C0")
        # At most ~24 labels; turned upright when they would collide lying down.
        every = max(1, math.ceil(len(values) / 24))
        ticks = list(range(0, len(values), every))
        upright = len(ticks) * max(len(labels[t]) for t in ticks) > 48
        ax.set_xticks(ticks, [labels[t] for t in ticks], rotation=90 if upright else 0, fontsize=8)
        if pattern:
            ax.set_xlabel(pattern, fontsize=8)
        ax.axhline(float(np.mean(values)), color="C3", lw=1, ls="--", label=f"mean {np.mean(values):.3f}")
        ax.set_ylabel("mean pairwise cosine similarity")
        ax.set_title("per layer")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3, axis="y")
    if matrix is not None:
        ax = axes.pop(0)
        im = ax.imshow(matrix, cmap="coolwarm", vmin=-1.0, vmax=1.0, interpolation="nearest")
        fig.colorbar(im, ax=ax, shrink=0.8, label="cosine similarity")
        n = matrix.shape[0]
        ticks = np.arange(0, n, 1 if n <= 16 else math.ceil(n / 16))
        ax.set_xticks(ticks, [str(t) for t in ticks], fontsize=8)
        ax.set_yticks(ticks, [str(t) for t in ticks], fontsize=8)
        if n <= 16:
            for i in range(n):
                for j in range(n):
                    ax.text(j, i, f"{matrix[i, j]:.2f}", ha="center", va="center", fontsize=7,
                            color="white" if abs(matrix[i, j]) > 0.6 else "black")
        ax.set_xlabel("expert")
        ax.set_ylabel("expert")
        ax.set_title(matrix_title or "similarity matrix")
    if title:
        fig.suptitle(title, fontsize=11)
    return save_figure(fig, path)
