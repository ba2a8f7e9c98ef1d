"""Formula-driven images: random iterated function systems rendered by the chaos game.

This is the data of the built-in backbone's pretraining, in the spirit of FractalDB
(Kataoka et al., ACCV 2020): a *class* is one random iterated function system (IFS) of
2-4 affine maps ``x -> A_i x + b_i``; an *instance* of the class is that system, slightly
perturbed, rendered with a random placement (scale, rotation, flip, shift) and colours.

The maps are sampled with the singular-value ("sigma-factor") rule of Anderson & Farrell,
"Improving Fractal Pre-training" (WACV 2022): each map is ``R(theta) diag(s1, d*s2) R(phi)``
with ``1 >= s1 >= s2 >= 0`` and the sum over maps of ``s1 + 2*s2`` drawn in
``[(5 + n)/2, (6 + n)/2]`` for ``n`` maps. Every map is then a contraction (so the attractor
exists and the chaos game converges), and the systems are neither dust nor a blob. Systems
whose rendered attractor covers too little of the frame are rejected, as FractalDB rejects
systems by their "filling rate".

Everything here is vectorised over *instances*: one chaos game runs for thousands of images
at once, a numpy step per point, and the points are binned with ``np.bincount``.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MAX_MAPS = 4
# Rejection threshold on the fraction of a 32x32 frame covered by a class's attractor (fitted
# to the frame, no augmentation). Lower than FractalDB's 0.2 because at 32 px thin
# filaments cover few pixels yet are perfectly recognisable.
MIN_FILL = 0.08
# Instance variation. Mild on purpose: in short CPU pretraining runs (30 classes, 250 steps,
# the same seed) early held-out accuracy roughly doubled when the placement went from
# scale U(0.65, 1), +-30 deg, +-15% shift to the values below, and improved less when the
# parameter jitter went from 0.08 to 0.03. Strong geometric invariance is also what the
# structured downstream tasks (positions, orientations) do not want.
JITTER = 0.05  # relative std of each map's linear-part entries, and std of its offset
SCALE = 0.85  # instance scale ~ U(SCALE, 1) of the fitted frame
ROTATE = np.pi / 18  # rotation ~ U(-10, 10) degrees
SHIFT = 0.05  # shift ~ U(-5%, 5%) of the frame, per axis


@dataclass(frozen=True)
class IFSBank:
    """A set of iterated function systems, one per class.

    Attributes:
        A: ``[C, MAX_MAPS, 2, 2]`` float64 linear parts (unused maps are zero).
        b: ``[C, MAX_MAPS, 2]`` float64 offsets.
        p: ``[C, MAX_MAPS]`` float64 probabilities of picking each map (0 for unused maps),
           proportional to ``|det A_i|`` as in the usual chaos-game rule.
        n_maps: ``[C]`` int64 number of maps of each system (2-4).
        seed: the class seed the bank was sampled from.
    """

    A: np.ndarray
    b: np.ndarray
    p: np.ndarray
    n_maps: np.ndarray
    seed: int

    @property
    def num_classes(self) -> int:
        return int(self.A.shape[0])


def _sample_singular_values(rng: np.random.Generator, n: int, count: int) -> np.ndarray:
    """``count`` draws of ``n`` (s1, s2) pairs meeting the sigma-factor rule, ``[count, n, 2]``."""
    out = np.empty((0, n, 2))
    while len(out) < count:
        # Rejection sampling in blocks: simple and exact; about 10-30% of draws are accepted.
        m = 4 * count + 64
        s1 = rng.uniform(0.0, 1.0, size=(m, n))
        s2 = rng.uniform(0.0, 1.0, size=(m, n)) * s1
        target = rng.uniform((5 + n) / 2, (6 + n) / 2, size=m)
        sigma = (s1 + 2 * s2).sum(1)
        # The rule fixes the sum exactly; accept draws close to the drawn target.
        ok = np.abs(sigma - target) < 0.25
        out = np.concatenate([out, np.stack([s1, s2], -1)[ok]])
    return out[:count]


def _rotation(theta: np.ndarray) -> np.ndarray:
    """Rotation matrices ``[..., 2, 2]`` for angles ``theta`` (radians)."""
    c, s = np.cos(theta), np.sin(theta)
    return np.stack([np.stack([c, -s], -1), np.stack([s, c], -1)], -2)


def _sample_candidates(rng: np.random.Generator, count: int) -> IFSBank:
    n_maps = rng.integers(2, MAX_MAPS + 1, size=count)
    A = np.zeros((count, MAX_MAPS, 2, 2))
    b = np.zeros((count, MAX_MAPS, 2))
    for n in range(2, MAX_MAPS + 1):
        idx = np.flatnonzero(n_maps == n)
        if len(idx) == 0:
            continue
        sv = _sample_singular_values(rng, n, len(idx))  # [k, n, 2]
        theta = rng.uniform(0, 2 * np.pi, size=(len(idx), n))
        phi = rng.uniform(0, 2 * np.pi, size=(len(idx), n))
        d = rng.choice([-1.0, 1.0], size=(len(idx), n))
        diag = np.zeros((len(idx), n, 2, 2))
        diag[..., 0, 0] = sv[..., 0]
        diag[..., 1, 1] = sv[..., 1] * d
        A[idx, :n] = _rotation(theta) @ diag @ _rotation(phi)
        b[idx, :n] = rng.uniform(-1, 1, size=(len(idx), n, 2))
    det = np.abs(np.linalg.det(A))
    used = np.arange(MAX_MAPS)[None, :] < n_maps[:, None]
    # Floor so that a nearly singular map is still visited now and then.
    w = np.where(used, np.maximum(det, 0.02), 0.0)
    p = w / w.sum(1, keepdims=True)
    return IFSBank(A=A, b=b, p=p, n_maps=n_maps, seed=-1)


def sample_ifs(num_classes: int, seed: int = 0) -> IFSBank:
    """Sample ``num_classes`` iterated function systems, deterministically from ``seed``.

    Candidates whose attractor fills less than ``MIN_FILL`` of a 32x32 frame are rejected
    and replaced by the next candidates of the same random stream, so class ``k`` of a bank
    depends only on ``seed`` (not on ``num_classes``: a 50-class bank is the first 50
    classes of the 100-class bank with the same seed).

    Args:
        num_classes: number of systems (classes), >= 1.
        seed: the class seed.

    Returns:
        an :class:`IFSBank` of ``num_classes`` systems.
    """
    if num_classes < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    rng = np.random.default_rng(np.random.SeedSequence([seed, 0x1F5]))
    keep: list[IFSBank] = []
    kept = 0
    while kept < num_classes:
        # Fixed block size so the stream (hence class k) does not depend on num_classes.
        cand = _sample_candidates(rng, 64)
        cand = IFSBank(cand.A, cand.b, cand.p, cand.n_maps, seed)
        fill = _fill_rate(cand, rng_seed=seed)
        ok = np.flatnonzero(fill >= MIN_FILL)
        keep.append(_take(cand, ok))
        kept += len(ok)
    bank = _concat(keep)
    return _take(bank, np.arange(num_classes))


def _take(bank: IFSBank, idx: np.ndarray) -> IFSBank:
    return IFSBank(bank.A[idx], bank.b[idx], bank.p[idx], bank.n_maps[idx], bank.seed)


def _concat(banks: list[IFSBank]) -> IFSBank:
    return IFSBank(
        np.concatenate([k.A for k in banks]),
        np.concatenate([k.b for k in banks]),
        np.concatenate([k.p for k in banks]),
        np.concatenate([k.n_maps for k in banks]),
        banks[0].seed,
    )


def _fill_rate(bank: IFSBank, rng_seed: int) -> np.ndarray:
    """Fraction of a 32x32 frame covered by each system's attractor, fitted to the frame."""
    C = bank.num_classes
    rng = np.random.default_rng(np.random.SeedSequence([rng_seed, 0xF111]))
    T = _fit_transforms(bank.A, bank.b, bank.p, rng)
    counts = _chaos_game(bank.A, bank.b, bank.p, T, rng, size=32, n_points=2000)
    return (counts > 0).reshape(C, -1).mean(1)


def _fit_transforms(A, b, p, rng, aug=None):
    """Per-instance ``[n, 2, 3]`` maps from attractor coordinates to image coordinates in [0, 1].

    The attractor's bounding box (1st-99th percentile of a short chaos-game run, so stray
    early points do not count) is centred and scaled to fit the frame with its aspect ratio
    kept; ``aug`` (scale, angle, flip, shift per instance) is then applied around the centre.
    """
    n = len(A)
    pts = _run_points(A, b, p, rng, n_points=256)  # [T, n, 2]
    lo = np.percentile(pts, 1, axis=0)
    hi = np.percentile(pts, 99, axis=0)
    centre = (lo + hi) / 2
    half = np.maximum((hi - lo).max(1) / 2, 1e-6)  # [n]
    # Map to [-1, 1] (times 0.9 so the edge points stay inside), then augment, then to [0, 1].
    M = np.zeros((n, 2, 2))
    M[:, 0, 0] = M[:, 1, 1] = 0.9 / half
    t = -(M @ centre[:, :, None])[:, :, 0]
    if aug is not None:
        R = _rotation(aug["angle"]) * aug["scale"][:, None, None]
        R[:, :, 0] *= aug["flip"][:, None]
        M = R @ M
        t = (R @ t[:, :, None])[:, :, 0] + aug["shift"]
    out = np.empty((n, 2, 3))
    out[:, :, :2] = M / 2
    out[:, :, 2] = t / 2 + 0.5
    return out


def _run_points(A, b, p, rng, n_points, burn_in=20):
    """Chaos-game points ``[n_points, N, 2]`` after ``burn_in`` discarded steps."""
    N = len(A)
    cum = np.cumsum(p, 1)
    x = np.zeros((N, 2))
    rows = np.arange(N)
    out = np.empty((n_points, N, 2))
    for t in range(burn_in + n_points):
        k = (rng.random(N)[:, None] > cum[:, :-1]).sum(1)
        x = np.einsum("nij,nj->ni", A[rows, k], x) + b[rows, k]
        if t >= burn_in:
            out[t - burn_in] = x
    return out


def _chaos_game(A, b, p, T, rng, size, n_points, burn_in=20, chunk=128):
    """Hit counts ``[N, size, size]`` of ``n_points`` chaos-game points per instance.

    ``A, b, p`` are per-instance systems (``[N, MAX_MAPS, ...]``), ``T`` ``[N, 2, 3]`` maps
    attractor coordinates to the unit square of the image.
    """
    N = len(A)
    cum = np.cumsum(p, 1)
    rows = np.arange(N)
    # Per-instance map parameters as flat arrays so each step is a few 1-D gathers.
    a00, a01, a10, a11 = (A[:, :, i, j] for i, j in ((0, 0), (0, 1), (1, 0), (1, 1)))
    b0, b1 = b[:, :, 0], b[:, :, 1]
    x = np.zeros(N)
    y = np.zeros(N)
    counts = np.zeros(N * size * size, dtype=np.int64)
    base = rows * (size * size)
    buf_x = np.empty((chunk, N))
    buf_y = np.empty((chunk, N))
    done = 0
    for t in range(burn_in + n_points):
        k = (rng.random(N)[:, None] > cum[:, :-1]).sum(1)
        x, y = (a00[rows, k] * x + a01[rows, k] * y + b0[rows, k],
                a10[rows, k] * x + a11[rows, k] * y + b1[rows, k])
        if t < burn_in:
            continue
        buf_x[done % chunk] = x
        buf_y[done % chunk] = y
        done += 1
        if done % chunk == 0 or t == burn_in + n_points - 1:
            m = (done - 1) % chunk + 1
            bx, by = buf_x[:m], buf_y[:m]
            u = T[:, 0, 0] * bx + T[:, 0, 1] * by + T[:, 0, 2]
            v = T[:, 1, 0] * bx + T[:, 1, 1] * by + T[:, 1, 2]
            col = np.floor(u * size).astype(np.int64)
            row = np.floor(v * size).astype(np.int64)
            inside = (col >= 0) & (col < size) & (row >= 0) & (row < size)
            flat = (base[None, :] + row * size + col)[inside]
            counts += np.bincount(flat, minlength=N * size * size)
    return counts.reshape(N, size, size)


def render_instances(
    bank: IFSBank,
    labels: np.ndarray,
    seed: int,
    *,
    image_size: int = 32,
    n_points: int = 3000,
    batch: int = 2048,
) -> np.ndarray:
    """Render one augmented instance of class ``labels[i]`` per entry, deterministically.

    Per instance: each map's linear part is jittered (x(1 + JITTER N(0,1)) entrywise,
    rescaled to stay a contraction) and its offset shifted (+JITTER N(0,1)); the attractor is
    fitted to the frame, then scaled by U(SCALE, 1), rotated by U(-ROTATE, ROTATE), mirrored
    with p=0.5 and shifted by U(-SHIFT, SHIFT) of the frame per axis; intensity is the log
    hit density, coloured with a random bright foreground on a random dark background.

    Args:
        bank: the class systems.
        labels: ``[N]`` int class indices into ``bank``.
        seed: instance seed (use different seeds for train and held-out instances).
        image_size: side in pixels.
        n_points: chaos-game points per image (more = smoother density).
        batch: instances rendered together (memory ~ batch * image_size^2 * 8 bytes).
            Each batch has its own random stream, so the images depend on ``batch`` too:
            keep the default to reproduce the shipped backbone's data.

    Returns:
        ``[N, image_size, image_size, 3]`` uint8 RGB images.
    """
    labels = np.asarray(labels, dtype=np.int64)
    out = np.empty((len(labels), image_size, image_size, 3), dtype=np.uint8)
    ss = np.random.SeedSequence([seed, bank.seed, 0x12E])
    for lo, child in zip(range(0, len(labels), batch), ss.spawn((len(labels) + batch - 1) // batch)):
        rng = np.random.default_rng(child)
        out[lo:lo + batch] = _render_batch(bank, labels[lo:lo + batch], rng, image_size, n_points)
    return out


def _render_batch(bank, labels, rng, size, n_points):
    n = len(labels)
    A = bank.A[labels].copy()
    b = bank.b[labels].copy()
    p = bank.p[labels]
    used = (p > 0)[:, :, None]
    # Intra-class variation, as FractalDB's parameter jitter: small, so the class stays one shape.
    A *= 1 + JITTER * rng.standard_normal(A.shape)
    norm = np.linalg.norm(A, ord=2, axis=(2, 3))
    A /= np.maximum(norm / 0.98, 1.0)[:, :, None, None]
    b += JITTER * rng.standard_normal(b.shape) * used
    aug = dict(
        scale=rng.uniform(SCALE, 1.0, n),
        angle=rng.uniform(-ROTATE, ROTATE, n),
        flip=rng.choice([-1.0, 1.0], n),
        shift=rng.uniform(-SHIFT, SHIFT, (n, 2)),
    )
    T = _fit_transforms(A, b, p, rng, aug=aug)
    counts = _chaos_game(A, b, p, T, rng, size=size, n_points=n_points).astype(np.float64)
    dens = np.log1p(counts) / np.log1p(counts.reshape(n, -1).max(1).clip(min=1))[:, None, None]
    fg = rng.uniform(0.0, 1.0, (n, 3))
    fg = 0.35 + 0.65 * fg / fg.max(1, keepdims=True)  # bright, any hue
    bg = rng.uniform(0.0, 0.25, (n, 3))
    img = bg[:, None, None, :] + (fg - bg)[:, None, None, :] * dens[..., None]
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


def fractal_split(
    num_classes: int, per_class: int, *, class_seed: int = 0, instance_seed: int = 0, image_size: int = 32,
) -> tuple[np.ndarray, np.ndarray]:
    """A fractal classification set: ``per_class`` instances of each of ``num_classes`` systems.

    Args:
        num_classes: number of classes (systems sampled from ``class_seed``).
        per_class: instances per class.
        class_seed: seed of the systems (the *task*).
        instance_seed: seed of the instances; use another one for held-out data.
        image_size: side in pixels.

    Returns:
        ``(images [N, S, S, 3] uint8, labels [N] int64)`` with ``N = num_classes * per_class``,
        in a seeded shuffled order.
    """
    bank = sample_ifs(num_classes, class_seed)
    rng = np.random.default_rng(np.random.SeedSequence([instance_seed, class_seed, 0x5A]))
    labels = rng.permutation(np.repeat(np.arange(num_classes), per_class))
    return render_instances(bank, labels, instance_seed, image_size=image_size), labels
