"""Built-in datasets: small, offline, VTAB-1k-style tasks (``--data builtin:NAME``).

Five tasks, all 32x32 RGB uint8 with VTAB-1k splits (train 800, val 200, test 1000):

- ``digits``: scikit-learn's bundled handwritten digits (real data, 8x8 upsampled);
- ``count``, ``dsprites_loc``, ``dsprites_ori``, ``clevr_dist``: procedurally generated
  mirrors of VTAB's Structured group (CLEVR/count, dSprites/location, dSprites/orientation,
  CLEVR/closest-object-distance).

Every split is a pure function of ``(name, split, seed)``: the images are drawn on the fly
(vectorised numpy, one to a few seconds per split) and cached as ``.npz`` under
``cache_dir()/datasets`` (``$SURGEON_CACHE``, else ``$XDG_CACHE_HOME/surgeon``, else
``~/.cache/surgeon``; a few MB per split), so the many runs of a suite do not redraw them.
The cache is only an accelerator: deleting it changes nothing, and an unwritable cache
directory is silently skipped. Nothing is ever committed or shipped.
``seed=0`` is the canonical dataset, the analogue of VTAB's fixed splits; keep it fixed
when comparing methods over training seeds. Each split has its own random stream, so
``train`` does not change when ``test`` is regenerated and vice versa.

Shapes are drawn from signed distances with a one-pixel linear ramp at the edge (cheap
anti-aliasing), so positions and angles are resolved below the pixel grid.
"""
from __future__ import annotations

import os
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable

import numpy as np

from surgeon.builtin import cache_dir
from surgeon.errors import UserError

SPLITS = ("train", "val", "trainval", "test")
SPLIT_SIZES = {"train": 800, "val": 200, "test": 1000}
IMAGE_SIZE = 32
# Part of every random stream and cache key: bump it when a generator's output changes on
# purpose, so runs can tell old data from new (the cache also keys on this file's checksum).
GENERATOR_VERSION = 1


# --------------------------------------------------------------------------- rendering helpers

def _grid(size: int = IMAGE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Pixel-centre coordinates ``(x, y)``, each ``[size, size]`` float32, in pixels."""
    c = np.arange(size, dtype=np.float32) + 0.5
    return c[None, :].repeat(size, 0), c[:, None].repeat(size, 1)


def _coverage(sdf: np.ndarray) -> np.ndarray:
    """Anti-aliased coverage in [0, 1] from a signed distance in pixels (negative inside)."""
    return np.clip(0.5 - sdf, 0.0, 1.0)


def _local(cx, cy, angle):
    """Pixel coordinates in each object's frame: ``[..., S, S]`` arrays ``(u, v)``.

    ``cx, cy, angle`` are ``[...]`` arrays (pixels, radians). ``v`` points "up" on screen
    (towards smaller image rows) in the object's frame, rotated counter-clockwise by angle.
    """
    X, Y = _grid()
    dx = X - cx[..., None, None]
    dy = -(Y - cy[..., None, None])  # image rows grow downwards; make v point up
    c = np.cos(angle)[..., None, None].astype(np.float32)
    s = np.sin(angle)[..., None, None].astype(np.float32)
    return c * dx + s * dy, -s * dx + c * dy


def _sdf_box(u, v, half_w, half_h):
    """Exact signed distance to an axis-aligned box of half sizes ``half_w, half_h``."""
    qx = np.abs(u) - half_w[..., None, None]
    qy = np.abs(v) - half_h[..., None, None]
    outside = np.sqrt(np.maximum(qx, 0) ** 2 + np.maximum(qy, 0) ** 2)
    return outside + np.minimum(np.maximum(qx, qy), 0)


def _sdf_circle(u, v, r):
    return np.sqrt(u * u + v * v) - r[..., None, None]


def _sdf_ellipse(u, v, a, b):
    """Approximate signed distance to an ellipse of semi-axes ``a`` (u) and ``b`` (v).

    Exact on the axes, within ~10% elsewhere for the aspect ratios used here: enough for a
    one-pixel anti-aliasing ramp.
    """
    a = a[..., None, None]
    b = b[..., None, None]
    k = np.sqrt((u / a) ** 2 + (v / b) ** 2)
    return (k - 1) * np.minimum(a, b)


def _sdf_polygon(u, v, verts):
    """Signed distance (exact inside, a lower bound outside) to a convex polygon.

    ``verts``: ``[..., n, 2]`` counter-clockwise vertices in the object frame.
    """
    d = None
    n = verts.shape[-2]
    for i in range(n):
        p0 = verts[..., i, :]
        p1 = verts[..., (i + 1) % n, :]
        e = p1 - p0
        # Outward normal of a counter-clockwise edge is (e_y, -e_x).
        nx, ny = e[..., 1], -e[..., 0]
        ln = np.sqrt(nx * nx + ny * ny)
        nx, ny = (nx / ln)[..., None, None], (ny / ln)[..., None, None]
        di = (u - p0[..., 0, None, None]) * nx + (v - p0[..., 1, None, None]) * ny
        d = di if d is None else np.maximum(d, di)
    return d


def _triangle(r, apex=1.0, base=0.8, down=0.6):
    """Vertices ``[..., 3, 2]`` of an isosceles triangle of size ``r`` pointing up (+v)."""
    r = np.asarray(r, dtype=np.float32)
    return np.stack([
        np.stack([np.zeros_like(r), apex * r], -1),
        np.stack([-base * r, -down * r], -1),
        np.stack([base * r, -down * r], -1),
    ], -2)


def _sdf_heart(u, v, r):
    """A heart of size ``r`` pointing down (two lobes + a triangle), as dSprites' third shape."""
    r3 = r[..., None, None]
    lobe = 0.45 * r3
    left = np.sqrt((u + 0.42 * r3) ** 2 + (v - 0.3 * r3) ** 2) - lobe
    right = np.sqrt((u - 0.42 * r3) ** 2 + (v - 0.3 * r3) ** 2) - lobe
    tip = np.stack([
        np.stack([-0.84 * r, 0.28 * r], -1),
        np.stack([0.0 * r, -0.95 * r], -1),
        np.stack([0.84 * r, 0.28 * r], -1),
    ], -2)
    tri = _sdf_polygon(u, v, tip)  # counter-clockwise, as _sdf_polygon wants
    return np.minimum(np.minimum(left, right), tri)


def _sdf_l(u, v, r):
    """An "L" of size ``r``: no rotational or mirror symmetry, so every angle is distinct."""
    t = 0.32 * r
    r3, t3 = r[..., None, None], t[..., None, None]
    stem = _sdf_box(u + 0.5 * r3 - 0.5 * t3, v, 0.5 * t, r)  # vertical bar on the left
    foot = _sdf_box(u, v + r3 - 0.5 * t3, 0.5 * r, 0.5 * t)  # horizontal bar at the bottom
    return np.minimum(stem, foot)


def _balanced_labels(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """``n`` labels in ``[0, k)``, each class ``n // k`` or ``n // k + 1`` times, shuffled."""
    return rng.permutation(np.resize(np.arange(k, dtype=np.int64), n))


def _random_colours(rng: np.random.Generator, shape, lo: float) -> np.ndarray:
    """Saturated random colours ``[*shape, 3]`` in [0, 1] whose brightest channel is >= lo."""
    c = rng.uniform(0.0, 1.0, (*shape, 3))
    c = c / c.max(-1, keepdims=True)
    return c * rng.uniform(lo, 1.0, (*shape, 1))


def _to_uint8(img: np.ndarray) -> np.ndarray:
    return np.clip(img * 255 + 0.5, 0, 255).astype(np.uint8)


def _chunked(fn: Callable, labels: np.ndarray, rng: np.random.Generator, chunk: int = 200) -> np.ndarray:
    """Render ``fn(labels_chunk, rng)`` in chunks, bounding memory at ~chunk * objects * S^2."""
    return np.concatenate([fn(labels[i:i + chunk], rng) for i in range(0, len(labels), chunk)])


# --------------------------------------------------------------------------- procedural tasks

COUNT_MIN, COUNT_MAX = 3, 10
# Bounding radius of the count shapes in units of r (the square's corner is the farthest).
_COUNT_EXTENT = 1.16


def _place_apart(rng: np.random.Generator, counts: np.ndarray, radius: np.ndarray, gap: float) -> tuple:
    """Random centres ``(cx, cy)`` ``[n, K]`` with every pair at least ``gap`` px apart.

    Random sequential placement, vectorised over images: each round proposes one position
    for every image's next object and keeps it if it clears the objects already placed. An
    image that gets stuck (its early objects left no room) starts over. Positions are
    continuous, so objects straddle the ViT's patch borders (a grid of cells would align
    one object per 8-px patch and make counting trivial).
    """
    n, K = radius.shape
    cx = np.zeros((n, K))
    cy = np.zeros((n, K))
    placed = np.zeros(n, dtype=np.int64)
    tries = np.zeros(n, dtype=np.int64)
    slots = np.arange(K)[None, :]
    while True:
        todo = np.flatnonzero(placed < counts)
        if len(todo) == 0:
            return cx, cy
        k = placed[todo]
        rk = radius[todo, k]
        px = rng.uniform(rk + 0.5, IMAGE_SIZE - rk - 0.5)
        py = rng.uniform(rk + 0.5, IMAGE_SIZE - rk - 0.5)
        dist = np.hypot(cx[todo] - px[:, None], cy[todo] - py[:, None])
        clear = (dist >= radius[todo] + rk[:, None] + gap) | (slots >= k[:, None])
        ok = clear.all(1)
        cx[todo[ok], k[ok]] = px[ok]
        cy[todo[ok], k[ok]] = py[ok]
        placed[todo[ok]] += 1
        tries[todo] += 1
        stuck = todo[tries[todo] > 200]
        placed[stuck] = 0
        tries[stuck] = 0


def _render_count(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = len(labels)
    counts = labels + COUNT_MIN
    K = COUNT_MAX
    present = np.arange(K)[None, :] < counts[:, None]
    r = rng.uniform(1.5, 2.6, (n, K)).astype(np.float32)
    # At least 1 px between bounding circles: the anti-aliasing ramps never touch.
    cx, cy = _place_apart(rng, counts, _COUNT_EXTENT * r, gap=1.0)
    angle = rng.uniform(0, 2 * np.pi, (n, K))
    shape = rng.integers(0, 4, (n, K))
    u, v = _local(cx.astype(np.float32), cy.astype(np.float32), angle)
    sdf = np.where(
        (shape == 0)[..., None, None], _sdf_circle(u, v, r),
        np.where((shape == 1)[..., None, None], _sdf_box(u, v, 0.82 * r, 0.82 * r),
                 np.where((shape == 2)[..., None, None], _sdf_polygon(u, v, _triangle(r * 1.1)),
                          _sdf_ellipse(u, v, r, 0.6 * r))))
    cov = _coverage(sdf) * present[..., None, None]  # [n, K, S, S]
    colour = _random_colours(rng, (n, K), 0.7)
    # Background: a tinted grey floor with a vertical gradient, as in a lit CLEVR scene; at
    # most 0.5 bright, so every object (brightest channel >= 0.7) stands out from it.
    base = rng.uniform(0.08, 0.32, (n, 1, 1, 1)) + rng.uniform(-0.04, 0.04, (n, 1, 1, 3))
    grad = rng.uniform(0.0, 0.12, (n, 1, 1, 1)) * (_grid()[1] / IMAGE_SIZE)[None, :, :, None]
    img = base + grad
    fg = (cov[..., None] * colour[:, :, None, None, :]).sum(1)  # objects never overlap
    img = img * (1 - cov.sum(1)[..., None]) + fg
    img += rng.normal(0, 0.015, img.shape)
    return _to_uint8(img)


# dSprites: 32 positions / 40 angles per factor, VTAB bins them into 16 classes. Here every
# class is 2 discrete values of the factor, as in VTAB's binning of dSprites' 32 positions.
DSPRITES_BINS = 16
_POS_LO, _POS_HI = 6.0, 26.0  # centre range in pixels (the shapes stay inside the frame)


def _dsprite_sdf(shape: np.ndarray, u, v, r):
    """Signed distance of a dSprites-like shape: 0 square, 1 ellipse, 2 heart."""
    return np.where(
        (shape == 0)[..., None, None], _sdf_box(u, v, 0.8 * r, 0.8 * r),
        np.where((shape == 1)[..., None, None], _sdf_ellipse(u, v, 1.1 * r, 0.55 * r), _sdf_heart(u, v, r)))


def _render_dsprites_loc(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = len(labels)
    positions = np.linspace(_POS_LO, _POS_HI, 2 * DSPRITES_BINS, dtype=np.float32)
    cx = positions[2 * labels + rng.integers(0, 2, n)]
    cy = rng.choice(positions, n)
    r = rng.uniform(2.5, 4.5, n).astype(np.float32)
    angle = rng.uniform(0, 2 * np.pi, n)
    shape = rng.integers(0, 3, n)
    u, v = _local(cx, cy, angle)
    cov = _coverage(_dsprite_sdf(shape, u, v, r))
    # White sprite on black, as dSprites (binary there; anti-aliased here).
    return _to_uint8(np.repeat(cov[..., None], 3, -1))


def _render_dsprites_ori(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    n = len(labels)
    steps = 2 * DSPRITES_BINS
    angle = (2 * labels + rng.integers(0, 2, n)) * (2 * np.pi / steps)
    cx = rng.uniform(11, 21, n).astype(np.float32)
    cy = rng.uniform(11, 21, n).astype(np.float32)
    r = rng.uniform(4.0, 6.0, n).astype(np.float32)
    shape = rng.integers(0, 3, n)
    u, v = _local(cx, cy, angle)
    # Shapes without rotational symmetry, so the orientation label is always identifiable
    # (dSprites' square and ellipse are 4- and 2-fold symmetric, which caps accuracy there).
    sdf = np.where(
        (shape == 0)[..., None, None], _sdf_heart(u, v, r),
        np.where((shape == 1)[..., None, None], _sdf_polygon(u, v, _triangle(r, 1.0, 0.55, 0.7)),
                 _sdf_l(u, v, r)))
    cov = _coverage(sdf)
    return _to_uint8(np.repeat(cov[..., None], 3, -1))


CLEVR_DIST_BINS = 6
_HORIZON = 9.0  # image row of the horizon
_NEAR_LO, _NEAR_HI = 0.1, 1.0  # "nearness" (inverse depth, 0 = horizon) range of the closest object


def _render_clevr_dist(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """CLEVR-like scenes on a ground plane; the label is the depth band of the closest object.

    Pinhole camera over a flat floor: an object at inverse depth ``w`` (``w = 0`` at the
    horizon) touches the floor at row ``HORIZON + 22 w`` and has radius ``~(1 + 3.5 w) R``.
    Bands are equal steps of ``w`` (equal steps on screen), class 0 = nearest, like VTAB's
    clevr/closest_object_distance where class 0 is the smallest distance.
    """
    n = len(labels)
    K = 6
    width = (_NEAR_HI - _NEAR_LO) / CLEVR_DIST_BINS
    # Class 0 = nearest band = largest w.
    w_near = _NEAR_HI - (labels + rng.uniform(0, 1, n)) * width
    k = rng.integers(3, K + 1, n)
    present = np.arange(K)[None, :] < k[:, None]
    w = rng.uniform(0.0, 1.0, (n, K)) * w_near[:, None] * 0.97  # the others are farther
    w[:, 0] = w_near
    size = rng.uniform(0.8, 1.2, (n, K))
    r = ((1.0 + 3.5 * w) * size).astype(np.float32)
    ground = _HORIZON + 22.0 * w
    shape = rng.integers(0, 3, (n, K))
    cy = (ground - np.where(shape == 0, r, 0.85 * r)).astype(np.float32)
    cx = rng.uniform(3, IMAGE_SIZE - 3, (n, K)).astype(np.float32)
    u, v = _local(cx, cy, np.zeros((n, K)))
    sdf = np.where(
        (shape == 0)[..., None, None], _sdf_circle(u, v, r),  # sphere
        np.where((shape == 1)[..., None, None], _sdf_box(u, v, 0.85 * r, 0.85 * r),  # cube
                 _sdf_box(u, v, 0.6 * r, 0.85 * r)))  # cylinder, seen from the side
    cov = _coverage(sdf) * present[..., None, None]
    colour = _random_colours(rng, (n, K), 0.6)
    # Simple shading: lit from above, darker towards the floor.
    Y = _grid()[1][None, None]
    shade = 1.1 - 0.35 * np.clip((Y - (cy - r)[..., None, None]) / (2 * r[..., None, None]), 0, 1)
    # Sky and a floor that darkens with distance from the camera, tinted per scene.
    tint = rng.uniform(-0.05, 0.05, (n, 1, 1, 3))
    rows = _grid()[1][None, :, :, None]
    floor = 0.25 + 0.3 * np.clip((rows - _HORIZON) / (IMAGE_SIZE - _HORIZON), 0, 1)
    sky = rng.uniform(0.55, 0.75, (n, 1, 1, 1))
    img = np.where(rows < _HORIZON, sky, floor) + tint
    # Painter's algorithm: far (small w) to near, nearer objects occlude farther ones.
    order = np.argsort(np.where(present, w, -1.0), 1)
    idx = np.arange(n)[:, None]
    for j in range(K):
        o = order[:, j:j + 1]
        c = cov[idx, o][:, 0, :, :, None]
        col = colour[idx, o][:, 0, None, None, :] * shade[idx, o][:, 0, :, :, None]
        img = img * (1 - c) + col * c
    img += rng.normal(0, 0.015, img.shape)
    return _to_uint8(img)


# --------------------------------------------------------------------------- digits (real data)

DIGITS_TRAIN_PER_CLASS, DIGITS_VAL_PER_CLASS = 80, 20


@lru_cache(maxsize=1)
def _digits_upsampled() -> tuple[np.ndarray, np.ndarray]:
    """All 1,797 scikit-learn digits as ``[1797, 32, 32, 3]`` uint8 and their labels."""
    # scikit-learn (about a second to import) and PIL only when the digits set is generated:
    # a cached set, the other sets and the CLI's start-up never need them.
    from PIL import Image
    from sklearn.datasets import load_digits

    d = load_digits()
    small = np.round(d.images * (255 / 16)).astype(np.uint8)  # 17 grey levels -> 0..255
    big = np.stack([
        np.asarray(Image.fromarray(im).resize((IMAGE_SIZE, IMAGE_SIZE), Image.BICUBIC)) for im in small
    ])
    return np.repeat(big[..., None], 3, -1), d.target.astype(np.int64)


def _digits_split(split: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = _digits_upsampled()
    rng = np.random.default_rng(np.random.SeedSequence([seed, _name_id("digits"), GENERATOR_VERSION]))
    parts: dict[str, list[np.ndarray]] = {"train": [], "val": [], "test": []}
    # Stratified: 80/20 per class in train/val (balanced like the procedural tasks), the
    # rest of each class (94-103 images) in test.
    for c in range(10):
        idx = rng.permutation(np.flatnonzero(labels == c))
        a, b = DIGITS_TRAIN_PER_CLASS, DIGITS_TRAIN_PER_CLASS + DIGITS_VAL_PER_CLASS
        parts["train"].append(idx[:a])
        parts["val"].append(idx[a:b])
        parts["test"].append(idx[b:])
    sel = {k: rng.permutation(np.concatenate(v)) for k, v in parts.items()}
    return images[sel[split]], labels[sel[split]]


# --------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class _Task:
    num_classes: int
    class_names: tuple[str, ...]
    summary: str
    provenance: str
    render: Callable[[np.ndarray, np.random.Generator], np.ndarray] | None  # None: real data


_TASKS: dict[str, _Task] = {
    "digits": _Task(
        10, tuple(str(i) for i in range(10)),
        "handwritten digits 0-9 (real data, scikit-learn's bundled copy of UCI optdigits)",
        "Real data: the 1,797 handwritten digits bundled with scikit-learn "
        "(sklearn.datasets.load_digits: the test part of the UCI 'Optical Recognition of "
        "Handwritten Digits' set, Alpaydin & Kaynak 1998, written by 13 people; each image is "
        "the 8x8 grid of on-pixel counts, 0-16, of a 32x32 NIST bitmap). Scaled to 0-255, "
        "upsampled bicubically to 32x32 and repeated to RGB (white ink on black). Splits are "
        "stratified and drawn from the seed: 80 train + 20 val images per class (800/200, "
        "balanced) and all remaining 797 images as test (94-103 per class); VTAB-1k uses "
        "1,000 test images, this set is too small for that. All splits share the same 13 "
        "writers, so the test accuracy is not writer-independent.",
        None,
    ),
    "count": _Task(
        COUNT_MAX - COUNT_MIN + 1, tuple(f"{k} objects" for k in range(COUNT_MIN, COUNT_MAX + 1)),
        f"count the objects ({COUNT_MIN}-{COUNT_MAX}), CLEVR/count-like, procedural",
        f"Procedural, mirroring VTAB's CLEVR/count (Johnson et al. 2017): each 32x32 scene holds "
        f"{COUNT_MIN}-{COUNT_MAX} objects (circle, square, triangle or ellipse; radius 1.5-2.6 px, "
        "random rotation and saturated colour) at random positions, at least 1 px apart so none "
        "overlap, on a tinted grey floor with a vertical light gradient and faint pixel noise. "
        "The label is the number of objects minus 3 (8 classes, balanced). Drawn by numpy from "
        "the seed, nothing downloaded; unlike CLEVR there is no 3D rendering, occlusion or "
        "perspective, and object size only partly predicts the count.",
        _render_count,
    ),
    "dsprites_loc": _Task(
        DSPRITES_BINS, tuple(f"x bin {i}" for i in range(DSPRITES_BINS)),
        "horizontal position of a sprite, 16 bins, dSprites/location-like, procedural",
        "Procedural, mirroring VTAB's dSprites/location (Matthey et al. 2017): one white "
        "sprite (square, ellipse or heart, as in dSprites) on black, with random scale "
        "(radius 2.5-4.5 px), rotation and vertical position. The centre's x takes one of 32 "
        "positions evenly spaced over 6-26 px and the label bins them in pairs (16 classes, "
        "balanced), as VTAB bins dSprites' 32 positions. 32x32 native instead of 64x64, with "
        "anti-aliased edges where dSprites is binary.",
        _render_dsprites_loc,
    ),
    "dsprites_ori": _Task(
        DSPRITES_BINS, tuple(f"{i * 360 / DSPRITES_BINS:g} deg" for i in range(DSPRITES_BINS)),
        "orientation of a sprite, 16 bins of 22.5 deg, dSprites/orientation-like, procedural",
        "Procedural, mirroring VTAB's dSprites/orientation (Matthey et al. 2017): one white "
        "sprite on black with random position (centre 11-21 px) and scale (radius 4-6 px). The "
        "angle takes one of 32 values over 360 degrees and the label bins them in pairs (16 "
        "classes of 22.5 degrees, balanced). Departure from dSprites, on purpose: the shapes "
        "(heart, isosceles triangle, 'L') have no rotational symmetry, so every label is "
        "identifiable from the image (dSprites' square and ellipse look the same after 90/180 "
        "degrees, which caps the accuracy reachable on VTAB's version).",
        _render_dsprites_ori,
    ),
    "clevr_dist": _Task(
        CLEVR_DIST_BINS, tuple(f"band {i + 1}" + (" (nearest)" if i == 0 else " (farthest)" if i == CLEVR_DIST_BINS - 1
                                                   else "") for i in range(CLEVR_DIST_BINS)),
        "depth band of the closest object (6 classes), CLEVR/closest-object-distance-like, procedural",
        "Procedural, mirroring VTAB's CLEVR/closest_object_distance (6 classes): 3-6 objects "
        "(spheres, cubes, cylinders seen from the side, random colours and sizes) stand on a "
        "floor seen by a pinhole camera above it, with the horizon at row 9; an object's "
        "contact row and size follow its inverse depth, nearer objects occlude farther ones. "
        "The label is the band of the nearest object's inverse depth, 6 equal bands (equal "
        "steps on screen), class 0 nearest, balanced. Chosen as the fourth task because it "
        "reuses the CLEVR-like scene of `count` but asks for a different structured skill "
        "(depth from the ground-contact cue and size, with occlusion), while smallNORB- or "
        "DMLab-like tasks would need a 3D renderer whose realism at 32 px would be our "
        "invention. Flat-shaded, no shadows or perspective foreshortening of the shapes.",
        _render_clevr_dist,
    ),
}

#: Built-in dataset name -> one-line summary (``--data builtin:NAME``), in a stable order.
BUILTIN_DATASETS: dict[str, str] = {name: task.summary for name, task in _TASKS.items()}


@lru_cache(maxsize=1)
def _code_id() -> str:
    """Checksum of this file: any edit to a generator invalidates the cached splits by itself
    (a forgotten GENERATOR_VERSION bump must not serve stale images)."""
    return f"{zlib.crc32(Path(__file__).read_bytes()):08x}"


def _name_id(name: str) -> int:
    # A stable per-dataset stream id (Python's hash() is salted per process).
    return zlib.crc32(name.encode())


def _check(name: str, split: str | None = None) -> _Task:
    if name not in _TASKS:
        raise UserError(
            f"unknown built-in dataset {name!r}",
            hint=f"use one of: {', '.join(_TASKS)} (e.g. --data builtin:{next(iter(_TASKS))})",
        )
    if split is not None and split not in SPLITS:
        raise UserError(
            f"unknown split {split!r} of built-in dataset {name!r}",
            hint=f"use one of: {', '.join(SPLITS)}",
        )
    return _TASKS[name]


def builtin_info(name: str) -> dict:
    """Facts about a built-in dataset.

    Args:
        name: one of :data:`BUILTIN_DATASETS`.

    Returns:
        ``dict(num_classes=int, class_names=list[str], provenance=str, image_size=int)``:
        ``provenance`` is one paragraph for reports (source, how it is drawn, how it departs
        from the VTAB task it mirrors), ``image_size`` the native side in pixels (32).

    Raises:
        UserError: unknown name (the message lists the known ones).
    """
    task = _check(name)
    provenance = f"{task.provenance} (surgeon built-in `{name}`, generator v{GENERATOR_VERSION}.)"
    return dict(num_classes=task.num_classes, class_names=list(task.class_names),
                provenance=provenance, image_size=IMAGE_SIZE)


def builtin_split(name: str, split: str, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """The images and labels of one split of a built-in dataset, deterministic from the seed.

    Args:
        name: one of :data:`BUILTIN_DATASETS`.
        split: ``"train"`` (800), ``"val"`` (200), ``"trainval"`` (train then val, 1000) or
            ``"test"`` (1000; 797 for ``digits``).
        seed: data seed; 0 is the canonical dataset. The same ``(name, split, seed)`` always
            gives identical arrays.

    Returns:
        ``(images, labels)``: ``images`` ``[N, 32, 32, 3]`` uint8 RGB, ``labels`` ``[N]`` int64
        in ``[0, num_classes)``. Fresh arrays: the caller may modify them.

    Raises:
        UserError: unknown name or split (the message lists the known ones).
    """
    _check(name, split)
    if split == "trainval":
        xa, ya = _cached_split(name, "train", int(seed))
        xb, yb = _cached_split(name, "val", int(seed))
        return np.concatenate([xa, xb]), np.concatenate([ya, yb])
    x, y = _cached_split(name, split, int(seed))
    return x.copy(), y.copy()


@lru_cache(maxsize=16)
def _cached_split(name: str, split: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    # In-process memo in front of the disk cache: a run asks for the same split from several
    # places (data config, eval, report); callers receive copies, so the memo stays pristine.
    path = cache_dir() / "datasets" / f"{name}-v{GENERATOR_VERSION}-{_code_id()}-seed{seed}-{split}.npz"
    try:
        with np.load(path) as z:
            return z["images"], z["labels"]
    except (OSError, KeyError, ValueError, EOFError, zipfile.BadZipFile):
        pass  # not cached yet, or unreadable (half-written by a killed process): regenerate
    images, labels = _generate(name, split, seed)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        # Write-then-rename: concurrent runs (a suite's cells) never read a partial file.
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".npz.tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=images, labels=labels)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only or full cache only costs regeneration time
    return images, labels


def _generate(name: str, split: str, seed: int) -> tuple[np.ndarray, np.ndarray]:
    task = _TASKS[name]
    if task.render is None:
        return _digits_split(split, seed)
    rng = np.random.default_rng(np.random.SeedSequence(
        [seed, _name_id(name), SPLITS.index(split), GENERATOR_VERSION]))
    labels = _balanced_labels(rng, SPLIT_SIZES[split], task.num_classes)
    return _chunked(task.render, labels, rng), labels
