"""Helpers shared by the tests (not tests themselves): paths, tiny data and recipes."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]

TINY_VIT = {"name": "vit_tiny_patch16_224", "pretrained": False,
            "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2}}
TINY_MODEL = TINY_VIT
COLORS = [(220, 40, 40), (40, 200, 40), (40, 40, 220), (200, 200, 40)]


def write_imagefolder(root: Path, *, classes: int = 3, per_split: dict | None = None, size: int = 16,
                      seed: int = 0) -> Path:
    """``root/{train,val,test}/class<k>/<i>.png``: noisy images of one colour per class."""
    per_split = per_split or {"train": 8, "val": 3, "test": 3}
    rng = np.random.default_rng(seed)
    for split, n in per_split.items():
        for k in range(classes):
            folder = root / split / f"class{k}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                pixels = rng.random((size, size, 3)) * 80 + np.array(COLORS[k % len(COLORS)]) * 0.6
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")
    return root


def write_recipe(path: Path, data_root: Path | str, *, surgery: list | None = None, train: dict | None = None,
                 regularizers: dict | None = None, model: dict | None = None, data: dict | None = None,
                 name: str = "tiny", eval_: dict | None = None) -> Path:
    """A tiny recipe: 2-block ViT at 32 px, no workers, short schedule (overridable)."""
    recipe = {
        "name": name,
        "model": {**TINY_MODEL, **(model or {})},
        "data": {"source": f"imagefolder:{data_root}", "num_workers": 0, "augment": "flip", **(data or {})},
        "surgery": surgery if surgery is not None else [
            {"target": "blocks.*.mlp", "adapter": {"bottleneck": 8}, "experts": {"count": 4}}],
        "train": {"epochs": 2, "batch_size": 6, "base_lr": 0.01, "warmup_epochs": 1, "checkpoint_every": 3,
                  **(train or {})},
    }
    if regularizers is not None:
        recipe["regularizers"] = regularizers
    if eval_ is not None:
        recipe["eval"] = eval_
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def read_events(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines() if line.strip()]


#: Run in a fresh interpreter: load RUN/merged with plain timm (argv[1]), compare with saved
#: (input, expected logits) (argv[2]), and prove surgeon was never imported.
PLAIN_TIMM_CHECK = r"""
import sys, torch, timm
model = timm.create_model("local-dir:" + sys.argv[1], pretrained=True).eval()
x, expected = torch.load(sys.argv[2])
with torch.no_grad():
    diff = (model(x) - expected).abs().max().item()
assert not any(m == "surgeon" or m.startswith("surgeon.") for m in sys.modules), "surgeon was imported"
print(diff, model.num_classes, len(model.blocks))
"""
