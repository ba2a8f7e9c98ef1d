"""Official replay: the published MoSA training step, re-implemented from the paper and the authors'
code (repository Theia-4869/MoSA), against surgeon's trainer on the shipped recipes.

The replay is written the way the published code works, not the way surgeon does:

- N deep copies of every split matrix (``adapter_up[i]``, and ``adapter_down[i]`` when flat), each
  with its own full bias (``MODEL.ADAPTER.BIAS=True``: all-ones bias masks); after ``backward`` each
  copy's gradient is multiplied by its mask (``--sparse-train``); merging averages the copies
  (``MERGE "add"``). The SparseAdapter baseline is one adapter whose every trainable tensor,
  the adapter LayerNorm included, has a 25% gradient mask.
- AdamW is the Hugging Face class the published ``src/solver/optimizer.py`` uses: eps 1e-6 added
  to the uncorrected ``sqrt(v)``, decay ``p -= lr·wd·p`` after the update, weight decay 0.01 on
  parameters whose name has no ``bias``, every copy stepped every step (torch 1.11's
  ``zero_grad()`` keeps zero gradients; see below).
- ``WarmupCosineSchedule`` stepped once per epoch (epoch ``e < W`` trains at ``lr·e/W``).
- The block (``vit_mosa.py``, style AdaptFormer): ``h = x + attn(norm1 x)``;
  ``x = h + mlp(norm2 h) + 0.1 · up(dropout_0.1(gelu(down(adapter_norm(h)))))``, with the ViT's own
  dropout 0.1 in the MLP and after the position embedding (``transformer.dropout_rate``).
- Loss: ``CE(out1) + REG_WEIGHT · symmetric_KL(out1, out2)`` over two separate forward passes,
  plus ``REG_WEIGHT · 0.01 · Σ_{l<6} MSE(h1_l, h2_l) / L`` with ``DEEPREG``.
- The lr is ``SOLVER.BASE_LR`` itself (no batch scaling).

What the replay takes from surgeon, so that the two runs can be compared number for number: the
initial tensors (backbone, ``W0``, masks, head), the data batches, the expert draws surgeon's
sampler made, and each step's torch seed (the dropout masks). The published code draws experts
with Python's ``random`` and dropout from one global torch stream; those are the same
distributions, not the same numbers. One documented simplification: torch 1.11 leaves a copy's
gradient ``None`` until the copy is first drawn, so its AdamW step count starts later; the replay
materialises every gradient from step 1 (docs/fidelity.md measures the difference).

Each broken setting in ``MUTATIONS`` (the items of the fidelity audit) must make the runs differ.
"""
from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
import torch.nn.functional as F
from torch.utils.data import TensorDataset

import surgeon
from surgeon.data import DataSplits, build_loader
from surgeon.methods.adapter.layer import AdapterLayer, MergedAdapter, PrunedLayerNorm
from surgeon.methods.base import ExpertSampler
from surgeon.methods.matrices import DenseMatrix, ExpertSplitMatrix, PrunedMatrix
from surgeon.rundir import MetricsLog, RunPaths
from surgeon.seeding import step_seed
from surgeon.train.trainer import Trainer

from .helpers import ROOT

warnings.filterwarnings("ignore", message=".*pretrained is false.*")

BACKBONE = {"name": "vit_tiny_patch16_224", "pretrained": False,
            "kwargs": {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 2}}
SEED, EPOCHS, BATCH, IMAGES, CLASSES, LR = 0, 3, 4, 12, 3, 0.05
PUBLISHED_DROPOUT = {"mlp": 0.1, "pos": 0.1, "attn_proj": 0.0, "attn": 0.0}


# ------------------------------------------------------------------------------------- surgeon's run

def surgeon_run(recipe_name: str, overrides: dict, tmp_path):
    """Train the shipped recipe with surgeon's Trainer; returns (initial model, trained model, draws, batches)."""
    recipe = surgeon.load_recipe(ROOT / "recipes" / f"{recipe_name}.yaml", overrides={
        "model": {**BACKBONE, "tag": None},
        "model.num_classes": CLASSES, "surgery.0.adapter.bottleneck": 8, "data.num_workers": 0,
        "train.epochs": EPOCHS, "train.batch_size": BATCH, "train.base_lr": LR, "train.warmup_epochs": 1,
        "train.seed": SEED, "train.precision": "fp32", "train.device": "cpu", "train.checkpoint_every": 1000,
        "model.dropout": PUBLISHED_DROPOUT, **overrides})
    torch.manual_seed(SEED)
    model = surgeon.build_model(recipe, weights=False)
    initial = copy.deepcopy(model)
    gen = torch.Generator().manual_seed(1)
    data = TensorDataset(torch.randn(IMAGES, 3, 32, 32, generator=gen), torch.randint(0, CLASSES, (IMAGES,), generator=gen))
    splits = DataSplits(train=data, val=None, test=None, num_classes=CLASSES, class_names=["a", "b", "c"],
                        provenance="replay", source="replay")
    draws: list[int] = []
    original = ExpertSampler.randint

    def recording(self, high, size=1):
        out = original(self, high, size)
        draws.extend(out.tolist())
        return out

    ExpertSampler.randint = recording
    try:
        paths = RunPaths(tmp_path)
        log = MetricsLog(paths.metrics)
        trainer = Trainer(recipe, model, splits, paths, log, device=torch.device("cpu"))
        trainer.train()
        log.close()
    finally:
        ExpertSampler.randint = original
    return initial, model, draws, data, trainer.budget


# ------------------------------------------------------------------------------ the published replay

class PublishedAdapter:
    """One block's adapter as the published code holds it: copies, masks, full per-copy biases."""

    def __init__(self, layer: AdapterLayer):
        self.copies, self.masks = {}, {}  # role -> list of (weight, bias) copies / masks
        for role in ("down", "up"):
            m = getattr(layer, role)
            if isinstance(m, ExpertSplitMatrix):  # N deep copies of the initial weight and bias
                n = m.num_experts
                b0 = (m.bias0 if hasattr(m, "bias0") else m.bias).detach()
                self.copies[role] = [(m.weight0.clone().requires_grad_(), b0.clone().requires_grad_())
                                     for _ in range(n)]
                self.masks[role] = [((m.expert_index == i).float(), torch.ones_like(b0)) for i in range(n)]
            elif isinstance(m, PrunedMatrix):  # the non-MoE sparse adapter: one copy, 25% gradient masks
                self.copies[role] = [(m.weight.detach().clone().requires_grad_(), m.bias.detach().clone().requires_grad_())]
                self.masks[role] = [(m.mask.float(), m.bias_mask.float())]
            else:
                assert isinstance(m, DenseMatrix)
                self.copies[role] = [(m.weight.detach().clone().requires_grad_(), m.bias.detach().clone().requires_grad_())]
                self.masks[role] = [None]
        norm = layer.norm
        self.norm = (norm.weight.detach().clone().requires_grad_(), norm.bias.detach().clone().requires_grad_())
        self.norm_masks = ((norm.weight_mask.float(), norm.bias_mask.float()) if isinstance(norm, PrunedLayerNorm)
                           else None)
        self.scale = layer.scale

    def named_params(self, b: int):
        for role, copies in self.copies.items():
            for i, (w, bias) in enumerate(copies):
                yield f"blocks.{b}.adapter_{role}.{i}.weight", w, self.masks[role][i] and self.masks[role][i][0]
                yield f"blocks.{b}.adapter_{role}.{i}.bias", bias, self.masks[role][i] and self.masks[role][i][1]
        yield f"blocks.{b}.adapter_norm.weight", self.norm[0], self.norm_masks and self.norm_masks[0]
        yield f"blocks.{b}.adapter_norm.bias", self.norm[1], self.norm_masks and self.norm_masks[1]

    def pick(self, role: str, draws) -> tuple[torch.Tensor, torch.Tensor]:
        copies = self.copies[role]
        return copies[next(draws)] if len(copies) > 1 else copies[0]

    def merged(self, role: str) -> tuple[torch.Tensor, torch.Tensor]:
        copies = self.copies[role]  # MERGE "add": the sum of the copies divided by N
        return (sum(w for w, _ in copies) / len(copies), sum(b for _, b in copies) / len(copies))


class PublishedMoSA:
    """The backbone (frozen, shared) plus the published adapters and head, trained the published way."""

    def __init__(self, initial: torch.nn.Module, deepreg: float = 0.0, reg_weight: float = 0.0):
        self.vit = initial
        for name, module in self.vit.named_modules():  # transformer.dropout_rate 0.1 (MLP, embeddings), no attention dropout
            if isinstance(module, torch.nn.Dropout):
                module.p = 0.1 if (".mlp." in f".{name}." or name == "pos_drop") else 0.0
        self.adapters = [PublishedAdapter(blk.mlp) for blk in self.vit.blocks]
        self.head = (self.vit.head.weight.detach().clone().requires_grad_(),
                     self.vit.head.bias.detach().clone().requires_grad_())
        self.deepreg, self.reg_weight = deepreg, reg_weight
        self.state: dict = {}

    def named_params(self):
        for b, adapter in enumerate(self.adapters):
            yield from adapter.named_params(b)
        yield "head.last_layer.weight", self.head[0], None
        yield "head.last_layer.bias", self.head[1], None

    def forward(self, x, draws=None, train=True):
        vit = self.vit
        vit.train(train)
        x = vit.norm_pre(vit.patch_drop(vit._pos_embed(vit.patch_embed(x))))
        hidden = []
        for blk, adapter in zip(vit.blocks, self.adapters):
            h = x + blk.attn(blk.norm1(x))
            x = blk.mlp.base_layer(blk.norm2(h))                        # ffn(ffn_norm(h)): its dropouts first
            adpt = F.layer_norm(h, h.shape[-1:], *adapter.norm, eps=1e-6)
            down = adapter.pick("down", draws) if train else adapter.merged("down")
            adpt = F.gelu(F.linear(adpt, *down))
            adpt = F.dropout(adpt, p=0.1, training=train)              # MODEL.ADAPTER.DROPOUT
            up = adapter.pick("up", draws) if train else adapter.merged("up")
            x = F.linear(adpt, *up) * adapter.scale + x + h
            hidden.append(x)
        x = vit.forward_head(vit.norm(x), pre_logits=True)
        return F.linear(x, *self.head), hidden

    def loss(self, x, y, draws):
        out, hid = self.forward(x, draws)
        loss = F.cross_entropy(out, y)
        if self.reg_weight > 0:  # MODEL.ADAPTER.ADDITIONAL: a second pass with other draws
            out2, hid2 = self.forward(x, draws)
            kl = F.kl_div(F.log_softmax(out, -1), F.softmax(out2.detach(), -1), reduction="batchmean") + \
                F.kl_div(F.log_softmax(out2, -1), F.softmax(out.detach(), -1), reduction="batchmean")
            loss = loss + 0.5 * kl * self.reg_weight
            if self.deepreg:
                deep = sum(F.mse_loss(a, b) for a, b in zip(hid[:6], hid2[:6])) / len(hid) * 0.01
                loss = loss + deep * self.reg_weight
        return loss

    def hf_adamw_step(self, lr: float, wd: float = 0.01, eps: float = 1e-6, betas=(0.9, 0.999)):
        with torch.no_grad():
            for name, p, _ in self.named_params():
                st = self.state.setdefault(name, {"step": 0, "m": torch.zeros_like(p), "v": torch.zeros_like(p)})
                st["step"] += 1
                st["m"].mul_(betas[0]).add_(p.grad, alpha=1 - betas[0])
                st["v"].mul_(betas[1]).addcmul_(p.grad, p.grad, value=1 - betas[1])
                step_size = lr * math.sqrt(1 - betas[1] ** st["step"]) / (1 - betas[0] ** st["step"])
                p.addcdiv_(st["m"], st["v"].sqrt().add_(eps), value=-step_size)
                if "bias" not in name:  # no_decay = ['bias', 'LayerNorm.bias', 'LayerNorm.weight']
                    p.add_(p, alpha=-lr * wd)

    def train(self, data, budget, draws: list[int]):
        draws = iter(draws)
        step = 0
        for epoch in range(EPOCHS):
            warmup = 1  # SOLVER.WARMUP_EPOCH scaled to this run
            factor = epoch / warmup if epoch < warmup else \
                0.5 * (1 + math.cos(math.pi * (epoch - warmup) / (EPOCHS - warmup)))
            lr = LR * factor
            for x, y in build_loader(data, batch_size=BATCH, shuffle=True, seed=SEED, num_workers=0,
                                     drop_last=budget.drop_last, epoch=epoch):
                torch.manual_seed(step_seed(SEED, step))
                for _, p, _ in self.named_params():
                    p.grad = torch.zeros_like(p)  # torch 1.11 zero_grad(): zeros, not None
                self.loss(x, y, draws).backward()
                for _, p, mask in self.named_params():  # --sparse-train: p.grad *= p.mask
                    if mask is not None:
                        p.grad.mul_(mask)
                self.hf_adamw_step(lr)
                step += 1
        assert next(draws, None) is None, "the replay used fewer expert draws than surgeon made"


def published_replay(recipe_name: str, initial, data, budget, draws, deepreg: float = 0.0):
    reg = 1.0 if recipe_name in ("mosa_hier", "mosa_flat") else 0.0
    replay = PublishedMoSA(initial, deepreg=deepreg, reg_weight=reg)
    replay.train(data, budget, draws)
    return replay


def compare(replay: PublishedMoSA, model, data) -> float:
    """Largest difference between the two merged models, relative to the tensor's size: merged
    adapter tensors, head and eval logits."""
    surgeon.merge(model)
    worst = 0.0

    def rel(a, b):
        return ((a.detach() - b.detach()).abs().max() / b.detach().abs().max().clamp_min(1e-12)).item()

    for blk, adapter in zip(model.blocks, replay.adapters):
        merged = blk.mlp
        assert isinstance(merged, MergedAdapter)
        down_w, down_b = adapter.merged("down")
        up_w, up_b = adapter.merged("up")
        worst = max(worst, rel(merged.down.weight, down_w), rel(merged.down.bias, down_b),
                    rel(merged.up.weight, up_w * adapter.scale), rel(merged.up.bias, up_b * adapter.scale),
                    rel(merged.norm.weight, adapter.norm[0]), rel(merged.norm.bias, adapter.norm[1]))
    worst = max(worst, rel(model.head.weight, replay.head[0]), rel(model.head.bias, replay.head[1]))
    x = data.tensors[0]
    model.eval()
    with torch.no_grad():
        ours = model(x)
        theirs, _ = replay.forward(x, train=False)
    return max(worst, rel(ours, theirs))


CASES = [("mosa_hier", {}, 0.0), ("mosa_flat", {}, 0.0), ("sparse_adapter", {}, 0.0),
         ("mosa_hier", {"regularizers.feature_alignment.weight": 0.01, "regularizers.feature_alignment.blocks": "0:6"},
          1.0)]


@pytest.mark.parametrize("recipe,overrides,deepreg", CASES, ids=["mosa_hier", "mosa_flat", "sparse_adapter",
                                                                 "mosa_hier+alignment"])
def test_surgeon_trains_what_the_published_code_trains(recipe, overrides, deepreg, tmp_path):
    initial, model, draws, data, budget = surgeon_run(recipe, overrides, tmp_path)
    replay = published_replay(recipe, initial, data, budget, draws, deepreg=deepreg)
    assert compare(replay, model, data) < 5e-5  # measured: 1e-6 .. 9e-6 (fp32 rounding over 6 steps)


MUTATIONS = [  # (recipe, a setting the audit found wrong or missing, restored to its old value or broken)
    ("mosa_hier", {"train.lr_scaling": "linear"}),                        # 1. lr scaled by batch/256
    ("mosa_hier", {"surgery.0.adapter.dropout": 0.0}),                    # 3. adapter dropout
    ("mosa_hier", {"model.dropout.mlp": 0.0}),                            # 3. backbone dropout
    ("mosa_hier", {"surgery.0.experts.bias": "split"}),                   # 4. biases split, not per expert
    ("mosa_hier", {"surgery.0.experts.bias": "dense"}),                   # 4. one shared bias
    ("mosa_hier", {"train.optimizer": "adamw"}),                          # 7. torch AdamW
    ("mosa_hier", {"train.eps": 1.0e-8}),                                 # 7. eps
    ("mosa_hier", {"train.lr_step": "step"}),                             # 7. schedule per step
    ("mosa_flat", {"surgery.0.experts.decay": "toward_init"}),            # 7. decay toward W0
    ("mosa_hier", {"surgery.0.adapter.input_from": None}),                # adapter reads norm2's output
    ("sparse_adapter", {"surgery.0.prune.pruned": "zero"}),               # 8. pruned entries zeroed
    ("sparse_adapter", {"surgery.0.prune.norm": False}),                  # 8. LayerNorm left dense
]


@pytest.mark.parametrize("recipe,overrides", MUTATIONS, ids=[f"{r}-{next(iter(o))}={next(iter(o.values()))}"
                                                             for r, o in MUTATIONS])
def test_replay_catches_each_broken_setting(recipe, overrides, tmp_path):
    initial, model, draws, data, budget = surgeon_run(recipe, overrides, tmp_path)
    replay = published_replay(recipe, initial, data, budget, draws)
    assert compare(replay, model, data) > 1e-3


def test_alignment_weight_is_the_published_one(tmp_path):
    initial, model, draws, data, budget = surgeon_run(
        "mosa_hier", {"regularizers.feature_alignment.weight": 0.005, "regularizers.feature_alignment.blocks": "0:6"},
        tmp_path)  # β = 0.005 was "right" under the old mean-over-blocks definition
    replay = published_replay("mosa_hier", initial, data, budget, draws, deepreg=1.0)
    assert compare(replay, model, data) > 1e-3
