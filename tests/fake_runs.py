"""Fake run directories for the report tests (not tests themselves): the files the trainer
writes (recipe.yaml, metrics.jsonl, summary.json, predictions_<split>.json, analysis.json), with
numbers chosen so that every figure a report should show can be looked for verbatim."""
from __future__ import annotations

import json
import math
from pathlib import Path

import yaml

# A ViT-B/16-sized plan: AdaptFormer-64-like adapters on 12 blocks, 24,832 params each
# = 297,984 extra parameters → the papers' "Params (M)" 0.30.
BACKBONE, PER_BLOCK, BLOCKS, HEAD = 85_798_656, 24_832, 12, 7_690
EXTRA = PER_BLOCK * BLOCKS


def fake_plan() -> dict:
    targets = [{"rule": 0, "selector": "blocks.*.mlp", "module": f"blocks.{i}.mlp", "method": "mosa",
                "params": PER_BLOCK, "detail": "4 experts, sparse [up]"} for i in range(BLOCKS)]
    return {"backbone_params": BACKBONE, "extra_params": EXTRA, "head_params": HEAD,
            "trainable_params": EXTRA + HEAD,
            "matches": [{"rule": 0, "selector": "blocks.*.mlp", "method": "mosa", "count": BLOCKS}],
            "targets": targets, "extra_params_m": round(EXTRA / 1e6, 4),
            "extra_percent_of_backbone": 100 * EXTRA / BACKBONE}


def fake_recipe(name: str, data: str, seed: int, k: int) -> dict:
    return {"name": name,
            "model": {"name": "vit_tiny_patch16_224", "pretrained": "builtin:fractal", "num_classes": k,
                      "kwargs": {"img_size": 32, "patch_size": 8}},
            "data": {"source": data, "protocol": "final", "image_size": 32, "augment": "rrc_flip"},
            "surgery": [{"target": "blocks.*.mlp",
                         "adapter": {"placement": "parallel", "bottleneck": 64, "activation": "gelu",
                                     "layernorm": False, "scale": 0.1, "learnable_scale": False},
                         "experts": {"count": 4, "split": "random_quantile", "granularity": "all",
                                     "sparse": ["up"], "bias": "dense"}}],
            "regularizers": {"consistency": {"weight": 1.0, "batched": False},
                             "feature_alignment": {"weight": 0.0, "blocks": ":"}},
            "train": {"epochs": 3, "max_steps": None, "batch_size": 64, "grad_accum": 1, "optimizer": "adamw",
                      "base_lr": 1e-3, "lr_scaling": "linear", "weight_decay": 0.01, "schedule": "cosine",
                      "warmup_epochs": 1, "warmup_steps": None, "min_lr": 0.0, "grad_clip": None,
                      "precision": "auto", "seed": seed},
            "eval": {"inference": "merge", "expert": 0, "merge_mode": "average"}}


def make_run(root: Path, name: str = "mosa-hier", data: str = "builtin:digits", seed: int = 3407, *,
             steps: int = 60, best_val: float = 0.9012, test: float | None = 0.8731, finished: bool = True,
             percent: bool = False, truncate: bool = False, merge_rel: float = 3e-7, k: int = 10,
             analysis: bool = False, nonfinite: tuple[int, ...] = (), train_seconds: float = 123.0,
             predictions: bool = True) -> Path:
    """Write a fake run directory; accuracies are fractions unless ``percent``."""
    run = root / f"{name}-{data.rsplit('/', 1)[-1].split(':')[-1]}-{seed}"
    run.mkdir(parents=True)
    (run / "recipe.yaml").write_text(yaml.safe_dump(fake_recipe(name, data, seed, k), sort_keys=False))
    unit = 100.0 if percent else 1.0
    events = [{"event": "start", "time": "2025-01-01T10:00:00", "recipe": name, "model": "vit_tiny_patch16_224", "lr": 5e-4,
               "data": data, "num_classes": k, "plan": fake_plan(), "device": "cpu", "seed": seed,
               "provenance": "Built-in data set 'digits': scikit-learn's bundled handwritten digits."}]
    for s in range(1, steps + 1):
        loss = 2.3 * math.exp(-s / 20) + 0.1
        events.append({"event": "train", "step": s, "epoch": (s - 1) // 20, "loss": loss, "ce": loss,
                       "consistency": 0.01, "alignment": 0.0, "lr": 2.5e-4 * min(1.0, s / 20),
                       "img_per_s": 500.0 + s, "time": s * 2.0})
        if s % 20 == 0:  # val accuracy rises to best_val at the last evaluation
            events.append({"event": "eval", "split": "val", "step": s, "epoch": s // 20 - 1,
                           "top1": unit * best_val * s / steps, "loss": 20 / s, "inference": "merge"})
            events.append({"event": "checkpoint", "step": s, "epoch": s // 20, "time": s * 2.0})
    # Like the trainer: `count` is the running total of skipped steps.
    events += [{"event": "nonfinite", "step": s, "count": i + 1, "in_a_row": 1} for i, s in enumerate(nonfinite)]
    if finished:
        if test is not None:
            events.append({"event": "eval", "split": "test", "step": steps, "epoch": 2, "top1": unit * test,
                           "loss": 0.4, "inference": "merge"})
        events.append({"event": "end", "best_val_top1": unit * best_val, "best_step": steps,
                       "test_top1": None if test is None else unit * test, "train_seconds": train_seconds,
                       "img_per_s": 512.5, "steps": steps})
        events.append({"event": "merge", "mode": "average", "max_abs_diff": 2e-6, "max_rel_diff": merge_rel})
        (run / "summary.json").write_text(json.dumps({"best_val_top1": unit * best_val, "peak_memory_mb": 812.0}))
    if finished and predictions:
        labels = [i % k for i in range(10 * k)]
        preds = [y if i % 10 < 8 else (y + 1) % k for i, y in enumerate(labels)]  # 80% correct
        (run / f"predictions_{'test' if test is not None else 'val'}.json").write_text(
            json.dumps({"labels": labels, "preds": preds, "class_names": [f"class{i}" for i in range(k)]}))
    text = "\n".join(json.dumps(e) for e in events) + "\n"
    if truncate:  # what SIGKILL in the middle of a write leaves behind
        text += '{"event": "train", "step": 61, "lo'
    (run / "metrics.jsonl").write_text(text)
    if analysis:
        (run / "analysis.json").write_text(json.dumps({"expert_similarity": {
            "mean": 0.1234, "per_layer": [0.1, 0.15, 0.11, 0.1336],
            "matrix": [[1, .1, .2, 0], [.1, 1, .1, .3], [.2, .1, 1, .1], [0, .3, .1, 1]]}}))
    return run
