"""Time per epoch of `surgeon apply` on 1 and N processes (torchrun; gloo on CPU, NCCL on GPUs).

Trains the demo's MoSA-hierarchical cell (built-in formula-pretrained ViT, depth 6 at 32 px,
builtin:digits) for a few epochs at each process count, same recipe and global batch, and
prints the trainer's own figures from each run's summary.json: train seconds per epoch (rank
0's time inside training steps, evaluation excluded), img/s, and the fp32 gradient bytes of the
trainable parameters that DDP all-reduces per step. Measured figures only; see benchmarks/README.md for the cost model.

    python benchmarks/ddp_scaling.py                 # 1 and 2 processes, 3 epochs each
    python benchmarks/ddp_scaling.py --nproc 1,2,4 --epochs 4
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SET = ["model.name=vit_tiny_patch16_224", "model.pretrained=builtin:fractal_vit_tiny",
       "model.kwargs={img_size: 32, patch_size: 8, depth: 6}", "data.source=builtin:digits",
       "train.batch_size=32", "train.base_lr=5.0e-3", "train.lr_scaling=none", "train.warmup_epochs=1",
       "train.precision=fp32", "data.augment=flip", "data.num_workers=0", "surgery.0.adapter.bottleneck=16",
       "train.merge=false", "model.dropout.mlp=0", "model.dropout.pos=0", "surgery.0.adapter.dropout=0"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nproc", default="1,2", help="process counts, comma-separated")
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--recipe", default="mosa_hier")
    args = ap.parse_args()
    env = {**os.environ, "CI": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for n in [int(x) for x in args.nproc.split(",")]:
            run = Path(tmp) / f"n{n}"
            sets = [a for s in SET + [f"train.epochs={args.epochs}"] for a in ("--set", s)]
            cmd = [sys.executable, "-m", "surgeon", "apply", args.recipe, *sets, "--out", str(run), "--nproc", str(n)]
            subprocess.run(cmd, env=env, cwd=str(ROOT), check=True, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            summary = json.loads((run / "summary.json").read_text())
            trainable = summary["params"]["trainable_params"]
            per_epoch = summary["train_seconds"] / summary["epochs"]  # rank 0's clock inside train steps
            rows.append((n, summary["steps"], per_epoch, summary["img_per_s"], summary["test_top1"], trainable * 4))
    print("| processes | steps | train s/epoch | img/s | test top-1 | all-reduced bytes/step |")
    print("|---|---|---|---|---|---|")
    for n, steps, per_epoch, ips, top1, nbytes in rows:
        print(f"| {n} | {steps} | {per_epoch:.2f} | {ips:.1f} | {top1:.2f} | {nbytes:,} |")


if __name__ == "__main__":
    main()
