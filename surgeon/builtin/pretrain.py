"""Pretrain the built-in backbone on formula-driven fractal classes (FractalDB-style).

``pretrain_builtin`` is the whole recipe: it samples ``classes`` random iterated function
systems from ``seed`` (see :mod:`surgeon.builtin.fractal`), renders ``per_class`` training
instances and ``val_per_class`` held-out instances of each, trains a small timm ViT to
classify them, and writes the backbone (without its head) as fp16 safetensors plus a json
card. The CLI command ``surgeon pretrain-builtin`` is a thin wrapper around it.
"""
from __future__ import annotations

import datetime as _dt
import json
import math
import platform
import sys
import time
from pathlib import Path

import numpy as np
import timm
import torch
import torch.nn.functional as F
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from safetensors.torch import save_file

from surgeon.builtin.datasets import builtin_info, builtin_split
from surgeon.builtin.fractal import fractal_split
from surgeon.io import write_text

MODEL_NAME = "vit_tiny_patch16_224"
MODEL_KWARGS = {"img_size": 32, "patch_size": 8, "depth": 6}
# Instance seeds of the training and held-out renders. Fixed (the class seed picks the task):
# the held-out set is other instances of the same classes, never downstream test data.
_TRAIN_INSTANCES, _VAL_INSTANCES = 1, 2


def _to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 ``[N, H, W, 3]`` -> float ``[N, 3, H, W]`` normalised as the model's data config.

    The ViT's pretrained_cfg uses mean = std = 0.5, and downstream loaders resolve the same
    config from the model, so pretraining and fine-tuning see the same input range [-1, 1].
    """
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float()
    return x.div_(127.5).sub_(1.0)


def _random_shift(x: torch.Tensor, pad: int, gen: torch.Generator) -> torch.Tensor:
    """Shift each image of ``[B, C, H, W]`` by up to ``pad`` px (edge-replicated), per sample.

    Cheap online augmentation on top of the rendered instances' own placement jitter, so
    the 8-px patch grid does not line up with the same structures every epoch.
    """
    B, _, H, W = x.shape
    xp = F.pad(x, (pad, pad, pad, pad), mode="replicate")
    oy = torch.randint(0, 2 * pad + 1, (B,), generator=gen)
    ox = torch.randint(0, 2 * pad + 1, (B,), generator=gen)
    rows = (oy[:, None] + torch.arange(H))[:, None, :, None].expand(B, x.shape[1], H, W)
    cols = (ox[:, None] + torch.arange(W))[:, None, None, :].expand(B, x.shape[1], H, W)
    return _gather2d(xp, rows, cols)


def _gather2d(xp: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
    """``out[b, c, i, j] = xp[b, c, rows[b, c, i, j], cols[b, c, i, j]]``."""
    B, C, H, W = rows.shape
    Wp = xp.shape[-1]
    flat = xp.flatten(2)  # [B, C, Hp*Wp]
    idx = (rows * Wp + cols).flatten(2)
    return flat.gather(2, idx).view(B, C, H, W)


@torch.no_grad()
def _accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 500) -> float:
    model.eval()
    correct = 0
    for lo in range(0, len(x), batch):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            pred = model(x[lo:lo + batch]).argmax(1)
        correct += int((pred == y[lo:lo + batch]).sum())
    model.train()
    return correct / len(x)


class _Progress:
    """A rich progress bar on a terminal, one plain line per epoch otherwise (logs, CI)."""

    def __init__(self, enabled: bool, total: int):
        self.enabled = enabled
        self.bar = None
        if enabled and sys.stdout.isatty():
            self.bar = Progress(TextColumn("pretrain"), BarColumn(), MofNCompleteColumn(),
                                TextColumn("{task.fields[info]}"), TimeRemainingColumn())
            self.bar.start()
            self.task = self.bar.add_task("steps", total=total, info="")

    def step(self, n: int, info: str) -> None:
        if self.bar is not None:
            self.bar.update(self.task, completed=n, info=info)

    def set_total(self, total: int) -> None:
        if self.bar is not None:
            self.bar.update(self.task, total=total)

    def line(self, text: str) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.console.print(text)
        else:
            print(text, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()


def pretrain_builtin(
    out_path: str | Path,
    *,
    classes: int = 100,
    per_class: int = 200,
    val_per_class: int = 20,
    seed: int = 0,
    epochs: float = 6.0,
    minutes: float | None = None,
    batch_size: int = 64,
    lr: float = 3e-4,
    weight_decay: float = 0.05,
    warmup_epochs: float = 0.25,
    label_smoothing: float = 0.1,
    threads: int | None = None,
    progress: bool = True,
) -> dict:
    """Pretrain the built-in ViT on fractal classes and write its backbone weights.

    The model is ``timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8,
    depth=6)`` (embed dim 192, 2.7M parameters), trained from scratch with AdamW, linear
    warm-up then cosine decay to 0, label smoothing, bf16 autocast on CPU (fp32 master
    weights), and per-sample random shifts of up to 2 px.

    The defaults are the recipe of the shipped ``fractal_vit_tiny`` (made with
    ``threads=1``: 95% held-out accuracy, about 12 minutes on a shared 2-core CPU; see
    docs/builtin.md). Deterministic from ``seed`` when ``minutes`` is None: the same seed,
    arguments and thread count give the same weights on the same machine. ``seed`` picks the fractal classes (the
    *class seed*), the rendered instances, the initialisation and the batch order.

    Args:
        out_path: the ``.safetensors`` file to write; the card goes next to it as ``.json``.
        classes: number of fractal classes (random IFS systems).
        per_class: training instances per class.
        val_per_class: held-out instances per class (same classes, other renders); the
            reported upstream accuracy is measured on these, never on downstream data.
        seed: class / instance / init / order seed.
        epochs: passes over the training instances (may be fractional).
        minutes: if set, a wall-clock budget for training instead of ``epochs``: the number
            of steps is re-estimated from the recent speed every 10 steps, so the schedule
            still decays to 0 at the deadline. The result then depends on the machine's
            speed; the card records the steps, and ``epochs=card["pretraining"]["epochs"]``
            replays the same number of steps (the schedule differs slightly while it was
            being re-estimated).
        batch_size: images per step.
        lr: peak AdamW learning rate.
        weight_decay: AdamW weight decay (not applied to biases, norms, tokens, pos_embed).
        warmup_epochs: linear warm-up length.
        label_smoothing: cross-entropy label smoothing.
        threads: ``torch.set_num_threads`` value (None: leave torch's default). On a CPU
            shared with other jobs use 1: two threads that keep waiting for each other
            ran 5-30x slower than one thread on the machine the weights were made on.
        progress: print progress (a rich bar on a terminal, plain lines otherwise).

    Returns:
        the card as a dict: ``upstream_val_acc`` (held-out top-1, 0-1), ``upstream_train_acc``
        (on the last 2,000 training images, eval mode), ``history`` (per-epoch loss and
        held-out accuracy), ``images_per_s`` (training throughput), ``data_seconds``,
        ``train_seconds``, ``wall_seconds``, ``pretraining`` (every argument, plus the
        ``steps`` and ``epochs`` actually run), the model name and kwargs, date and file name.

    The weights file holds the backbone only (every ``head.*`` key dropped) in float16:
    load it with ``timm.create_model(MODEL_NAME, pretrained=True, num_classes=K,
    pretrained_cfg_overlay=dict(file=path, num_classes=0), **MODEL_KWARGS)``, which
    re-initialises the head for any ``K``.
    """
    t_start = time.time()
    out_path = Path(out_path)
    if out_path.suffix != ".safetensors":
        out_path = out_path.with_suffix(".safetensors")
    out_path.parent.mkdir(parents=True, exist_ok=True)
    card_path = out_path.with_suffix(".json")
    if threads is not None:
        torch.set_num_threads(threads)
    say = _Progress(progress, 1)
    say.line(f"rendering {classes} fractal classes x {per_class} (+{val_per_class} held-out), seed {seed}")

    xtr, ytr = fractal_split(classes, per_class, class_seed=seed, instance_seed=_TRAIN_INSTANCES)
    xva, yva = fractal_split(classes, val_per_class, class_seed=seed, instance_seed=_VAL_INSTANCES)
    xtr, xva = _to_tensor(xtr), _to_tensor(xva)
    ytr, yva = torch.from_numpy(ytr), torch.from_numpy(yva)
    data_seconds = time.time() - t_start
    say.line(f"rendered {len(xtr) + len(xva)} images in {data_seconds:.1f} s")

    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = timm.create_model(MODEL_NAME, pretrained=False, num_classes=classes, **MODEL_KWARGS)
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        (no_decay if p.ndim <= 1 or name in ("cls_token", "pos_embed") else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=lr)

    steps_per_epoch = math.ceil(len(xtr) / batch_size)
    total = max(1, round(epochs * steps_per_epoch))
    warm = max(1, round(warmup_epochs * steps_per_epoch))

    def lr_at(step: int) -> float:
        if step < warm:
            return lr * (step + 1) / warm
        return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))

    say.close()
    say = _Progress(progress, total)
    model.train()
    step, t_train, seen, losses = 0, time.time(), 0, []
    stamps = [t_train]
    order = torch.randperm(len(xtr), generator=gen)
    pos = 0
    history = []
    while step < total:
        if pos + batch_size > len(order):  # drop the ragged tail, reshuffle
            order, pos = torch.randperm(len(xtr), generator=gen), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        xb = _random_shift(xtr[idx], 2, gen)
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(xb), ytr[idx], label_smoothing=label_smoothing)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        step += 1
        seen += len(idx)
        losses.append(loss.item())
        stamps.append(time.time())
        if minutes is not None and step >= 20 and step % 10 == 0:
            # Re-fit the schedule length to the remaining time every 10 steps from the speed
            # of the last 100, so the cosine still reaches 0 at the deadline even when the
            # machine gets busier or quieter (CPU shared with other jobs).
            recent = stamps[-101:]
            per_step = (recent[-1] - recent[0]) / (len(recent) - 1)
            left = minutes * 60 - (stamps[-1] - t_train)
            total = step + max(1, int(left / per_step / 1.03))  # 3% for the held-out evals
            say.set_total(total)
        ips = seen / (time.time() - t_train)
        say.step(step, f"loss {np.mean(losses[-50:]):.3f}  {ips:.0f} img/s")
        if step % steps_per_epoch == 0 or step == total:
            val = _accuracy(model, xva, yva)
            history.append({"step": step, "epoch": round(step / steps_per_epoch, 3),
                            "loss": round(float(np.mean(losses[-steps_per_epoch:])), 4), "val_acc": round(val, 4)})
            say.line(f"epoch {step / steps_per_epoch:5.2f}  step {step}/{total}  "
                     f"loss {history[-1]['loss']:.3f}  held-out acc {val:.3f}  {ips:.0f} img/s")
    train_seconds = time.time() - t_train
    say.close()

    val_acc = history[-1]["val_acc"]
    train_acc = _accuracy(model, xtr[-2000:], ytr[-2000:])
    state = {k: v.detach().to(torch.float16).contiguous() for k, v in model.state_dict().items()
             if not k.startswith("head.")}
    card = {
        "name": "fractal_vit_tiny",
        "model_name": MODEL_NAME,
        "kwargs": dict(MODEL_KWARGS),
        "weights": out_path.name,
        "dtype": "float16",
        "head": "not included (backbone only); load with pretrained_cfg_overlay num_classes=0",
        "pretraining": {
            "data": "FractalDB-style formula-driven classes (surgeon.builtin.fractal)",
            "seed": seed, "classes": classes, "per_class": per_class, "val_per_class": val_per_class,
            "image_size": 32, "epochs": round(step / steps_per_epoch, 4), "steps": step,
            "batch_size": batch_size, "lr": lr, "weight_decay": weight_decay, "warmup_epochs": warmup_epochs,
            "label_smoothing": label_smoothing, "optimizer": "adamw, cosine", "autocast": "bfloat16 (cpu)",
            "time_budget_minutes": minutes,
        },
        "upstream_val_acc": val_acc,
        "upstream_train_acc": round(train_acc, 4),
        "history": history,
        "images_per_s": round(seen / train_seconds, 1),
        "data_seconds": round(data_seconds, 1),
        "train_seconds": round(train_seconds, 1),
        "wall_seconds": round(time.time() - t_start, 1),
        "threads": torch.get_num_threads(),
        "machine": f"{platform.machine()} {platform.processor() or ''}".strip(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
    }
    save_file(state, str(out_path), metadata={"surgeon_card": json.dumps(card)})
    out_path.chmod(0o644)  # safetensors writes 0600; a shipped package file must be world-readable
    card["wall_seconds"] = round(time.time() - t_start, 1)
    write_text(card_path, json.dumps(card, indent=2) + "\n")
    say.line(f"wrote {out_path} ({out_path.stat().st_size / 1e6:.1f} MB) and {card_path.name}: "
             f"held-out upstream acc {val_acc:.3f} after {card['pretraining']['epochs']} epochs, "
             f"{card['wall_seconds']:.0f} s")
    return card


def _features(model: torch.nn.Module, x: torch.Tensor, batch: int = 500) -> np.ndarray:
    """Pre-logits features (the class token after the final norm), ``[N, embed_dim]`` float32."""
    model.eval()
    out = []
    with torch.no_grad():
        for lo in range(0, len(x), batch):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                f = model.forward_head(model.forward_features(x[lo:lo + batch]), pre_logits=True)
            out.append(f.float().numpy())
    return np.concatenate(out)


def _make_model(weights: Path | None, num_classes: int, seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)  # the head (and, without weights, everything) is drawn from this
    if weights is None:
        return timm.create_model(MODEL_NAME, pretrained=False, num_classes=num_classes, **MODEL_KWARGS)
    return timm.create_model(MODEL_NAME, pretrained=True, num_classes=num_classes,
                             pretrained_cfg_overlay=dict(file=str(weights), num_classes=0), **MODEL_KWARGS)


def _finetune(model, xtr, ytr, xte, yte, *, steps, batch_size, lr, seed) -> float:
    """Full fine-tuning (every parameter), AdamW + warm-up + cosine; returns test top-1."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    warm = max(1, steps // 10)
    model.train()
    order, pos = torch.randperm(len(xtr), generator=gen), 0
    for step in range(steps):
        if pos + batch_size > len(order):
            order, pos = torch.randperm(len(xtr), generator=gen), 0
        idx = order[pos:pos + batch_size]
        pos += batch_size
        scale = (step + 1) / warm if step < warm else 0.5 * (1 + math.cos(math.pi * (step - warm) / max(1, steps - warm)))
        for g in opt.param_groups:
            g["lr"] = lr * scale
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(_random_shift(xtr[idx], 2, gen)), ytr[idx])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return _accuracy(model, xte, yte)


def transfer_check(
    weights: str | Path,
    *,
    tasks: tuple[str, ...] = ("digits", "count"),
    seeds: tuple[int, ...] = (0, 1, 2),
    protocols: tuple[str, ...] = ("linear", "finetune"),
    inits: tuple[str, ...] = ("pretrained", "random"),
    steps: int = 300,
    batch_size: int = 64,
    lr: float = 5e-4,
    data_seed: int = 0,
    train_split: str = "trainval",
    eval_split: str = "test",
    update_card: bool = False,
    progress: bool = True,
) -> dict:
    """Compare the pretrained backbone with random initialisation on built-in tasks.

    Fixed protocols, set before looking at any result (nothing is tuned on the eval split):

    - ``linear``: frozen backbone, class-token features, standardised, scikit-learn
      ``LogisticRegression(C=1, max_iter=3000)`` fitted on ``train_split``;
    - ``finetune``: every parameter trained for ``steps`` AdamW steps (``lr``, weight decay
      0.05, 10% warm-up, cosine, batch ``batch_size``, random 2-px shifts, bf16 autocast).

    The training seed sets the head / random init and the batch order; the data is the
    canonical ``data_seed`` split for every seed, as in VTAB-1k.

    Args:
        weights: the backbone ``.safetensors`` (as written by :func:`pretrain_builtin`).
        tasks: built-in dataset names.
        seeds: training seeds; the figures are reported per seed and as a mean.
        protocols: subset of ``("linear", "finetune")``.
        inits: subset of ``("pretrained", "random")`` (the random baseline does not depend on
            ``weights``, so it can be computed separately).
        steps, batch_size, lr: the fine-tuning budget.
        data_seed: seed of the built-in datasets.
        train_split, eval_split: splits to train on and to report (``trainval``/``test``
            for VTAB-1k's final protocol; ``train``/``val`` for anything you tune).
        update_card: also store the result as ``"transfer"`` in the weights' json card
            (``weights`` with suffix ``.json``), replacing an earlier one.
        progress: print one line per result.

    Returns:
        ``{task: {protocol: {"pretrained": [acc per seed], "random": [...],
        "pretrained_mean": float, "random_mean": float}}}``, accuracies in [0, 1], plus
        ``"settings"`` (the arguments) and ``"seconds"`` (wall time).
    """
    # scikit-learn (about a second to import) only for this check, not for pretraining.
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    from threadpoolctl import threadpool_limits

    t0 = time.time()
    weights = Path(weights)
    results: dict = {"settings": dict(tasks=list(tasks), seeds=list(seeds), protocols=list(protocols),
                                      inits=list(inits), steps=steps,
                                      batch_size=batch_size, lr=lr, data_seed=data_seed,
                                      train_split=train_split, eval_split=eval_split)}
    for task in tasks:
        k = builtin_info(task)["num_classes"]
        xtr, ytr = builtin_split(task, train_split, data_seed)
        xte, yte = builtin_split(task, eval_split, data_seed)
        xtr, xte = _to_tensor(xtr), _to_tensor(xte)
        ytr_t, yte_t = torch.from_numpy(ytr), torch.from_numpy(yte)
        results[task] = {}
        for protocol in protocols:
            row: dict = {init: [] for init in inits}
            for seed in seeds:
                for init in inits:
                    w = weights if init == "pretrained" else None
                    model = _make_model(w, k, seed)
                    if protocol == "linear":
                        ftr, fte = _features(model, xtr), _features(model, xte)
                        sc = StandardScaler().fit(ftr)
                        # BLAS threads capped like torch's: on a shared CPU, oversubscribed
                        # threads spin at barriers and a 1-second fit takes 30.
                        with threadpool_limits(limits=torch.get_num_threads()):
                            clf = LogisticRegression(C=1.0, max_iter=3000).fit(sc.transform(ftr), ytr)
                        acc = float((clf.predict(sc.transform(fte)) == yte).mean())
                    elif protocol == "finetune":
                        acc = _finetune(model, xtr, ytr_t, xte, yte_t, steps=steps, batch_size=batch_size,
                                        lr=lr, seed=seed)
                    else:
                        raise ValueError(f"unknown protocol {protocol!r}")
                    row[init].append(round(acc, 4))
                    if progress:
                        print(f"transfer {task:>12s} {protocol:8s} seed {seed} {init:10s} {acc:.3f}"
                              f"  ({time.time() - t0:.0f} s)", flush=True)
            for init in inits:
                row[f"{init}_mean"] = round(float(np.mean(row[init])), 4)
            results[task][protocol] = row
    results["seconds"] = round(time.time() - t0, 1)
    results["date"] = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    results["threads"] = torch.get_num_threads()
    card_path = weights.with_suffix(".json")
    if update_card and card_path.is_file():
        card = json.loads(card_path.read_text())
        card["transfer"] = results
        write_text(card_path, json.dumps(card, indent=2) + "\n")
    return results
