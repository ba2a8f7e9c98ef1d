"""Accuracy against schedule length, MoSA (hierarchical) and AdaptFormer: how long the CPU-scale
reproduction (suites/cpu_tuned.yaml) must train (README "Reproduction").

Each cell is an ordinary run (the shipped recipe on the built-in backbone and task, VTAB protocol
``tune``: train800 -> val200, the recipe's published settings, bottleneck 16, lr 5e-3, warm-up 10%
of the epochs) whose score is the val top-1 at the end of its schedule. Resumable: finished cells
are skipped, interrupted ones resumed. Several processes split the cells with ``--worker i/n``.

    python benchmarks/epoch_curve.py --out runs/epoch_curve --batch 32 --epochs 5,10,20,40 [--worker 0/2]
    python benchmarks/epoch_curve.py --out runs/epoch_curve --plot docs/images/epoch_curve.png

Measured 2026-11-28 on the 2-core machine: README "Reproduction".
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

RECIPES = ("adaptformer", "mosa_hier")
TASKS = ("digits", "dsprites_loc")


def cell_dir(out: Path, batch: int, epochs: int, recipe: str, task: str) -> Path:
    return out / f"b{batch}" / f"e{epochs}" / recipe / task


def run_cells(out: Path, batch: int, epochs: list[int], worker: int, workers: int) -> None:
    import torch
    from rich.console import Console

    from surgeon.apply import apply_recipe

    torch.set_num_threads(1)
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    cells = [(e, r, t) for e in sorted(epochs) for t in TASKS for r in RECIPES]
    for i, (e, recipe, task) in enumerate(cells):
        run = cell_dir(out, batch, e, recipe, task)
        if i % workers != worker or (run / "summary.json").is_file():
            continue
        overrides = [
            "model.name=vit_tiny_patch16_224", "model.pretrained=builtin:fractal_vit_tiny",
            "model.kwargs={img_size: 32, patch_size: 8, depth: 6}",
            f"data.source=builtin:{task}", "data.protocol=tune", "data.augment=resize",
            "data.mean=null", "data.std=null", "data.interpolation=null", "data.num_workers=0",
            f"train.epochs={e}", f"train.warmup_epochs={max(1, e // 10)}", "train.base_lr=5.0e-3",
            f"train.batch_size={batch}", "train.precision=fp32", "train.seed=0", "train.merge=false",
            "surgery.0.adapter.bottleneck=16", "eval.checkpoint=last",
        ]
        resume = str(run) if (run / "recipe.yaml").is_file() else None
        apply_recipe(recipe, overrides=overrides, out=None if resume else str(run), resume=resume, console=console)


def collect(out: Path) -> list[dict]:
    """One row per finished cell: batch, epochs, recipe, task, steps, final val top-1, train seconds."""
    rows = []
    for summary in sorted(out.glob("b*/e*/*/*/summary.json")):
        data = json.loads(summary.read_text())
        task, recipe, e, b = summary.parts[-2], summary.parts[-3], summary.parts[-4], summary.parts[-5]
        rows.append({"batch": int(b[1:]), "epochs": int(e[1:]), "recipe": recipe, "task": task,
                     "steps": data["steps"], "val_top1": data["final_top1"], "train_seconds": data["train_seconds"]})
    return sorted(rows, key=lambda r: (r["batch"], r["task"], r["recipe"], r["epochs"]))


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    batches = sorted({r["batch"] for r in rows})
    fig, axes = plt.subplots(1, len(TASKS), figsize=(5 * len(TASKS), 3.6), squeeze=False)
    for ax, task in zip(axes[0], TASKS):
        for recipe, colour in zip(RECIPES, ("tab:blue", "tab:orange")):
            for batch, style in zip(batches, ("-o", "--s")):
                pts = [(r["epochs"], r["val_top1"]) for r in rows
                       if r["task"] == task and r["recipe"] == recipe and r["batch"] == batch]
                if pts:
                    ax.plot(*zip(*pts), style, color=colour, label=f"{recipe}, batch {batch}")
        ax.set_xscale("log", base=2)
        ticks = sorted({r["epochs"] for r in rows})
        ax.set_xticks(ticks, [str(t) for t in ticks])
        ax.minorticks_off()
        ax.set_xlabel("epochs (schedule length)")
        ax.set_ylabel("val top-1 (%) at the end")
        ax.set_title(f"builtin:{task}")
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--epochs", default="5,10,20,40")
    parser.add_argument("--worker", default="0/1", help="i/n: run every n-th cell starting at i")
    parser.add_argument("--plot", type=Path, help="only draw the figure (and print the table) from finished cells")
    args = parser.parse_args()
    if args.plot:
        rows = collect(args.out)
        plot(rows, args.plot)
        print("| batch | task | recipe | " + " | ".join(f"e{e}" for e in sorted({r["epochs"] for r in rows})) + " |")
        for key in sorted({(r["batch"], r["task"], r["recipe"]) for r in rows}):
            by_e = {r["epochs"]: r["val_top1"] for r in rows if (r["batch"], r["task"], r["recipe"]) == key}
            print(f"| {key[0]} | {key[1]} | {key[2]} | "
                  + " | ".join(f"{by_e[e]:.1f}" if e in by_e else "—" for e in sorted({r["epochs"] for r in rows})) + " |")
        return
    worker, workers = (int(x) for x in args.worker.split("/"))
    run_cells(args.out, args.batch, [int(e) for e in args.epochs.split(",")], worker, workers)


if __name__ == "__main__":
    main()
