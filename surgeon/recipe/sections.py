"""The recipe's sections besides ``surgery``: their JSON Schema fragments and the frozen
dataclasses they become after validation.

``surgery`` is assembled from the method registry (:mod:`surgeon.methods.registry`): see
:func:`surgeon.recipe.schema.recipe_schema`, which puts these fragments and the methods' together.
Defaults live in the fragments only; the dataclasses restate none (see :mod:`surgeon.config`).
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from surgeon.methods.modes import INFERENCE_MODES, MERGE_MODES
from surgeon.methods.targets import TARGET_SCHEMA

#: Bounds a recipe cannot exceed: seeds feed numpy (< 2^32); a head of more classes than any data
#: set has is a typo, and lists of that length would exhaust memory; a batch above 2^20 images is
#: not a setting of this tool (torch's batch sampler allocates a list of that length).
MAX_SEED = 2**32 - 1
MAX_CLASSES = 1_000_000
MAX_BATCH = 2**20


@dataclass(frozen=True)
class DropoutConfig:
    """``model.dropout``: backbone dropout rates by role (None = leave timm's value)."""

    mlp: float | None
    attn_proj: float | None
    attn: float | None
    pos: float | None
    head: float | None
    path: float | None


@dataclass(frozen=True)
class ModelConfig:
    """``model``: the timm backbone. ``num_classes`` is None until resolved from the data."""

    name: str
    pretrained: bool | str
    tag: str | tuple[str, ...] | None
    kwargs: Mapping[str, Any]
    dropout: DropoutConfig
    num_classes: int | None = None


@dataclass(frozen=True)
class DataConfig:
    """``data``: where the images come from and how they are split and transformed."""

    source: str
    protocol: str
    image_size: int | None
    augment: str
    val_fraction: float
    seed: int
    num_workers: int
    bad_images: str
    mean: tuple[float, ...] | None
    std: tuple[float, ...] | None
    interpolation: str | None


@dataclass(frozen=True)
class ConsistencyConfig:
    """``regularizers.consistency``."""

    weight: float
    batched: bool


@dataclass(frozen=True)
class FeatureAlignmentConfig:
    """``regularizers.feature_alignment``."""

    weight: float
    blocks: str


@dataclass(frozen=True)
class RegularizersConfig:
    """``regularizers``: MoSA's extra training losses."""

    consistency: ConsistencyConfig
    feature_alignment: FeatureAlignmentConfig


@dataclass(frozen=True)
class TrainConfig:
    """``train``: optimisation, schedule, precision, seeds, checkpoints."""

    epochs: int
    max_steps: int | None
    batch_size: int
    grad_accum: int
    optimizer: str
    eps: float | None
    base_lr: float
    lr_scaling: str
    weight_decay: float
    schedule: str
    lr_step: str
    warmup_epochs: float
    warmup_steps: int | None
    min_lr: float
    grad_clip: float | None
    precision: str
    device: str
    seed: int
    eval_every: int | None
    checkpoint_every: int
    max_bad_steps: int
    merge: bool
    log: tuple[str, ...]


@dataclass(frozen=True)
class EvalConfig:
    """``eval``: how validation and test predictions are made."""

    inference: str
    expert: int
    merge_mode: str
    checkpoint: str


#: section name -> its dataclass (``surgery`` excepted: a tuple of rules).
SECTIONS = {"model": ModelConfig, "data": DataConfig, "regularizers": RegularizersConfig, "train": TrainConfig,
            "eval": EvalConfig}


FRAME = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": "https://surgeon.dev/schemas/recipe.schema.json",
    "title": "surgeon recipe",
    "description": (
        "A surgeon recipe: which backbone, which data, which parameter-efficient surgery on which modules, which "
        "regularisers, how to train and evaluate. Fields not given take the default stated in their description; "
        "`surgeon apply` writes the fully resolved recipe to RUN/recipe.yaml."
    ),
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "model"],
}

NAME_SCHEMA = {
    "type": "string",
    "minLength": 1,
    "description": "Short identifier of the recipe; used in run-directory names and reports.",
}

DESCRIPTION_SCHEMA = {"type": "string", "description": "One line shown by `surgeon ls`."}

EXTENDS_SCHEMA = {
    "type": "string",
    "description": (
        "Another recipe this one builds on: a path relative to this file, or the name of a built-in recipe (see "
        "`surgeon ls`). Mappings are deep-merged, this file wins; lists are replaced."
    ),
}

SELECTOR_SCHEMA = TARGET_SCHEMA  # a rule's target: selectors or a semantic target (surgeon/methods/targets.py)

MODEL_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name"],
    "description": "The timm backbone.",
    "properties": {
        "name": {
            "type": "string",
            "minLength": 1,
            "description": (
                "A timm model name (`timm.list_models()`), e.g. vit_base_patch16_224. `--model` overrides it."
            ),
        },
        "pretrained": {
            "description": (
                "Backbone weights. `true`: timm's pretrained weights (downloads from the hub; cached); `false`: "
                "random init (PEFT on a random backbone is rarely meaningful); a path to a "
                ".safetensors/.pth/.bin/.npz file or a `local-dir:FOLDER`; `builtin:NAME` for a weight file "
                "shipped with surgeon. Default true."
            ),
            "default": True,
            "oneOf": [{"type": "boolean"}, {"type": "string", "minLength": 1}],
        },
        "tag": {
            "description": (
                "Preferred pretrained tags (timm's `architecture.tag`, e.g. orig_in21k), tried in order: the first"
                " one timm has for `name` is used, so `--model vit_base_patch16_224` gets "
                "vit_base_patch16_224.orig_in21k. A tag written in `name` wins; an architecture with none of them "
                "uses timm's default tag (with a one-line notice when the weights are downloaded). Default null: "
                "timm's default tag. The papers' recipes list [orig_in21k, ms_in22k] (ViT-B/L IN-21k, Swin-B "
                "IN-22k)."
            ),
            "default": None,
            "oneOf": [
                {"type": "null"},
                {"type": "string", "minLength": 1},
                {"type": "array", "items": {"type": "string", "minLength": 1}, "minItems": 1},
            ],
        },
        "num_classes": {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_CLASSES,
            "description": (
                "Classes of the new classifier head (always re-initialised and trained). Default: the number of "
                "classes of the data. When given, every label of the data must be below it."
            ),
        },
        "kwargs": {
            "type": "object",
            "default": {},
            "description": (
                "Extra keyword arguments for timm.create_model, e.g. {img_size: 32, patch_size: 8, depth: 6}."
            ),
        },
        "dropout": {
            "type": "object",
            "additionalProperties": False,
            "default": {},
            "description": (
                "Dropout rates of the backbone by role, set on its own nn.Dropout modules after creation (null = "
                "leave timm's value, 0 by default). The published MoSA ViT trains with mlp 0.1 and pos 0.1 "
                "(transformer.dropout_rate) and no attention dropout."
            ),
            "properties": {
                "mlp": {
                    "type": ["number", "null"],
                    "minimum": 0,
                    "exclusiveMaximum": 1,
                    "default": None,
                    "description": "Inside every MLP (timm Mlp drop1/drop2). Default null.",
                },
                "attn_proj": {
                    "type": ["number", "null"],
                    "minimum": 0,
                    "exclusiveMaximum": 1,
                    "default": None,
                    "description": "After the attention output projection (attn.proj_drop). Default null.",
                },
                "attn": {
                    "type": ["number", "null"],
                    "minimum": 0,
                    "exclusiveMaximum": 1,
                    "default": None,
                    "description": "On the attention weights (attn.attn_drop). Default null.",
                },
                "pos": {
                    "type": ["number", "null"],
                    "minimum": 0,
                    "exclusiveMaximum": 1,
                    "default": None,
                    "description": "After adding the position embedding (pos_drop). Default null.",
                },
                "head": {
                    "type": ["number", "null"],
                    "minimum": 0,
                    "exclusiveMaximum": 1,
                    "default": None,
                    "description": "Before the classifier head (head_drop). Default null.",
                },
                "path": {
                    "type": ["number", "null"],
                    "minimum": 0,
                    "exclusiveMaximum": 1,
                    "default": None,
                    "description": (
                        "Stochastic depth (timm's drop_path_rate, passed to create_model). Default null."
                    ),
                },
            },
        },
    },
}

DATA_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "default": {},
    "description": "Where the images come from and how they are transformed.",
    "properties": {
        "source": {
            "type": "string",
            "minLength": 1,
            "description": (
                "`builtin:NAME` (offline sets shipped with surgeon), `imagefolder:PATH`, `vtab1k:ROOT/TASK`, "
                "`filelist:FILE` (lines `path label`), `fgvc:ROOT` (VPT-style json). `--data` overrides it. "
                "Default builtin:digits."
            ),
            "default": "builtin:digits",
        },
        "protocol": {
            "type": "string",
            "enum": ["tune", "final"],
            "default": "final",
            "description": (
                "VTAB-1k-style protocol: `tune` trains on train800 and validates on val200; `final` trains on "
                "train800val200, validates on val200 and tests on test (the papers' numbers)."
            ),
        },
        "image_size": {
            "type": ["integer", "null"],
            "minimum": 8,
            "default": None,
            "description": (
                "Input resolution in pixels. Default (null) = the backbone's data config "
                "(timm.data.resolve_input_data_config)."
            ),
        },
        "augment": {
            "type": "string",
            "enum": ["rrc_flip", "resize_crop_flip", "flip", "resize"],
            "default": "rrc_flip",
            "description": (
                "Train-time augmentation: `rrc_flip` RandomResizedCrop + horizontal flip (what the MoSA/MLAE "
                "papers' text says for FGVC); `resize_crop_flip` resize the shorter side to size*256/224, random "
                "crop, flip (what the published MoSA code runs for FGVC/GICD; eval: same resize + centre crop); "
                "`flip` resize + horizontal flip; `resize` plain resize (the VTAB-1k protocol). Default rrc_flip."
            ),
        },
        "val_fraction": {
            "type": "number",
            "exclusiveMinimum": 0,
            "exclusiveMaximum": 1,
            "default": 0.1,
            "description": (
                "For a single image tree without a validation split, the fraction held out for validation "
                "(seeded)."
            ),
        },
        "seed": {
            "type": "integer",
            "minimum": 0,
            "maximum": MAX_SEED,
            "default": 0,
            "description": (
                "Seeds the data itself: the built-in generated sets and held-out validation splits. Kept apart "
                "from train.seed so that training seeds vary only the training, on the same data (0 = the "
                "canonical built-in sets)."
            ),
        },
        "num_workers": {
            "type": "integer",
            "minimum": 0,
            "maximum": 256,
            "default": 2,
            "description": "DataLoader worker processes (at most 256).",
        },
        "bad_images": {
            "type": "string",
            "enum": ["error", "skip"],
            "default": "error",
            "description": (
                "An unreadable image stops the run with its path (`error`) or is skipped and counted (`skip`)."
            ),
        },
        "mean": {
            "type": ["array", "null"],
            "items": {"type": "number"},
            "minItems": 3,
            "maxItems": 3,
            "default": None,
            "description": "Normalisation mean; default the backbone's data config.",
        },
        "std": {
            "type": ["array", "null"],
            "items": {"type": "number"},
            "minItems": 3,
            "maxItems": 3,
            "default": None,
            "description": "Normalisation std; default the backbone's data config.",
        },
        "interpolation": {
            "type": ["string", "null"],
            "enum": ["bilinear", "bicubic", "nearest", None],
            "default": None,
            "description": (
                "Resize interpolation; default (null) the backbone's data config (bicubic for timm ViTs). The "
                "published MoSA code resizes bilinearly."
            ),
        },
    },
}

REGULARIZERS_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "default": {},
    "description": "Extra training losses (MoSA paper §3.3).",
    "properties": {
        "consistency": {
            "type": "object",
            "additionalProperties": False,
            "default": {},
            "description": (
                "Two stochastic forward passes of each batch; loss += weight * symmetric KL between their "
                "predictions, each side against a stop-gradient copy of the other."
            ),
            "properties": {
                "weight": {
                    "type": "number",
                    "minimum": 0,
                    "default": 0.0,
                    "description": "alpha; 0 disables the second pass. The MoSA recipes use 1.0.",
                },
                "batched": {
                    "type": "boolean",
                    "default": False,
                    "description": (
                        "Run both passes as one forward of 2B samples (each half its own expert draws); faster "
                        "when memory allows."
                    ),
                },
            },
        },
        "feature_alignment": {
            "type": "object",
            "additionalProperties": False,
            "default": {},
            "description": (
                "Deep feature alignment: weight * sum over the chosen blocks of MSE(h1, h2) / (the model's number "
                "of blocks), between the two passes' block outputs (no stop-gradient; needs the consistency "
                "passes). weight 0.01 with blocks 0:6 is the published DEEPREG term (REG_WEIGHT 1)."
            ),
            "properties": {
                "weight": {
                    "type": "number",
                    "minimum": 0,
                    "default": 0.0,
                    "description": (
                        "beta; 0 disables it. 0.01 reproduces the published code (times the consistency weight if "
                        "that is not 1)."
                    ),
                },
                "blocks": {
                    "type": "string",
                    "pattern": "^\\d*:\\d*$",
                    "default": ":",
                    "description": (
                        "Python-style slice of block indices, e.g. \"0:6\" = the first 6 blocks; \":\" = all; the "
                        "paper uses the first half."
                    ),
                },
            },
        },
    },
}

TRAIN_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "default": {},
    "description": "Optimisation.",
    "properties": {
        "epochs": {
            "type": "integer",
            "minimum": 1,
            "default": 100,
            "description": "Passes over the training split.",
        },
        "max_steps": {
            "type": ["integer", "null"],
            "minimum": 1,
            "default": None,
            "description": "Optional cap on optimizer steps (the schedule is shortened to fit).",
        },
        "batch_size": {
            "type": "integer",
            "minimum": 1,
            "maximum": MAX_BATCH,
            "default": 128,
            "description": (
                "Images per optimizer step (before accumulation is split); at most 2^20. A training split smaller "
                "than one batch trains one short batch per epoch."
            ),
        },
        "grad_accum": {
            "type": "integer",
            "minimum": 1,
            "default": 1,
            "description": "Micro-batches per optimizer step; each micro-batch has batch_size / grad_accum images.",
        },
        "optimizer": {
            "type": "string",
            "enum": ["adamw", "adamw_hf", "sgd"],
            "default": "adamw",
            "description": (
                "Only the trainable parameters are optimised. `adamw`: torch's AdamW, decoupled decay before the "
                "update, no decay on biases, norms and 1-d parameters (timm's rule). `adamw_hf`: the Hugging Face "
                "AdamW the published MoSA code uses: eps added to the uncorrected sqrt(v), decay after the update,"
                " no decay on parameters whose name contains `bias`. `sgd`: momentum 0.9. Default adamw."
            ),
        },
        "eps": {
            "type": ["number", "null"],
            "exclusiveMinimum": 0,
            "default": None,
            "description": (
                "Adam epsilon; null = the optimizer's default (adamw 1e-8, adamw_hf 1e-6, the published MoSA "
                "value)."
            ),
        },
        "base_lr": {
            "type": "number",
            "exclusiveMinimum": 0,
            "default": 0.001,
            "description": "Learning rate before scaling.",
        },
        "lr_scaling": {
            "type": "string",
            "enum": ["linear", "none"],
            "default": "none",
            "description": (
                "`none` (default, the published MoSA and MLAE code): lr = base_lr; `linear`: lr = base_lr * "
                "batch_size / 256 (what the MoSA paper's appendix states, but not what its code does)."
            ),
        },
        "weight_decay": {"type": "number", "minimum": 0, "default": 0.01, "description": "AdamW weight decay."},
        "schedule": {
            "type": "string",
            "enum": ["cosine", "constant"],
            "default": "cosine",
            "description": "Learning-rate schedule after warm-up.",
        },
        "lr_step": {
            "type": "string",
            "enum": ["step", "epoch"],
            "default": "step",
            "description": (
                "`step`: warm-up and cosine move every optimizer step (warm-up starts at lr/warmup_steps). "
                "`epoch`: they move once per epoch, as the published MoSA code's WarmupCosineSchedule: epoch e of "
                "W warm-up epochs trains at lr*e/W (the first epoch at 0), then cosine over the remaining epochs. "
                "Default step."
            ),
        },
        "warmup_epochs": {
            "type": "number",
            "minimum": 0,
            "default": 10,
            "description": (
                "Linear warm-up length in epochs (ignored when warmup_steps is set); clamped to half of the run, "
                "with a warning."
            ),
        },
        "warmup_steps": {
            "type": ["integer", "null"],
            "minimum": 0,
            "default": None,
            "description": "Linear warm-up length in optimizer steps; overrides warmup_epochs.",
        },
        "min_lr": {"type": "number", "minimum": 0, "default": 0.0, "description": "Floor of the cosine schedule."},
        "grad_clip": {
            "type": ["number", "null"],
            "exclusiveMinimum": 0,
            "default": None,
            "description": "Clip the global gradient norm to this value; null disables clipping.",
        },
        "precision": {
            "type": "string",
            "enum": ["auto", "fp32", "bf16", "fp16"],
            "default": "auto",
            "description": "`auto`: bf16 autocast on CUDA with bf16 support, else fp32. Master weights stay fp32.",
        },
        "device": {
            "type": "string",
            "default": "auto",
            "description": "`auto` (CUDA when available, else CPU), `cpu`, `cuda`, `cuda:1`, ...",
        },
        "seed": {
            "type": "integer",
            "minimum": 0,
            "maximum": MAX_SEED,
            "default": 3407,
            "description": "Seeds Python, numpy, torch, expert masks and draws, MLAE masks and the data order.",
        },
        "eval_every": {
            "type": ["integer", "null"],
            "minimum": 1,
            "default": None,
            "description": "Evaluate on val every N optimizer steps; null = at each epoch end.",
        },
        "checkpoint_every": {
            "type": "integer",
            "minimum": 1,
            "default": 200,
            "description": "Write a resumable checkpoint every N optimizer steps (and at each epoch end).",
        },
        "max_bad_steps": {
            "type": "integer",
            "minimum": 1,
            "default": 5,
            "description": "Consecutive non-finite losses tolerated (skipped and counted) before the run stops.",
        },
        "merge": {
            "type": "boolean",
            "default": True,
            "description": "Merge and write RUN/merged at the end of training.",
        },
        "log": {
            "type": "array",
            "items": {"enum": ["tensorboard"]},
            "uniqueItems": True,
            "default": [],
            "description": (
                "Extra training logs besides RUN/metrics.jsonl (the source of truth) and RUN/summary.csv: "
                "`tensorboard` writes TensorBoard event files to RUN/tensorboard (loss and its terms, lr, img/s, "
                "val/test top-1; needs `pip install 'surgeon[tensorboard]'`)."
            ),
        },
    },
}

EVAL_SCHEMA = {
    "type": "object",
    "additionalProperties": False,
    "default": {},
    "description": "How validation and test predictions are made.",
    "properties": {
        "inference": {
            "type": "string",
            "enum": list(INFERENCE_MODES),
            "default": "merge",
            "description": (
                "MoSA inference mechanism (paper Table 6): `merge` the experts into one dense adapter (default), "
                "`stochastic` draw experts per forward, `fixed` always expert `expert`, `ensemble` average the "
                "logits of all N experts (N x cost)."
            ),
        },
        "expert": {
            "type": "integer",
            "minimum": 0,
            "default": 0,
            "description": "The expert used by `inference: fixed` (0-based).",
        },
        "merge_mode": {
            "type": "string",
            "enum": list(MERGE_MODES),
            "default": "average",
            "description": (
                "How experts merge: `average` W0 + D/N (default, the published scripts) or `jigsaw` W0 + D (paper "
                "Eq. 7)."
            ),
        },
        "checkpoint": {
            "type": "string",
            "enum": ["auto", "best", "last"],
            "default": "auto",
            "description": (
                "Which state is tested, saved and merged: `best` the best val top-1, `last` the end of the "
                "schedule, `auto` (default) `last` when the val images are also training images (the final "
                "protocol of VTAB-style data, where a best-val choice would be made on training data) or there is "
                "no val split, else `best`."
            ),
        },
    },
}
