"""Built-in datasets: API contract, determinism, VTAB-1k split sizes, balance, label sanity."""
from __future__ import annotations

import numpy as np
import pytest

from surgeon.builtin import cache_dir
from surgeon.builtin import datasets as ds
from surgeon.builtin.datasets import BUILTIN_DATASETS, builtin_info, builtin_split
from surgeon.errors import UserError

NAMES = list(BUILTIN_DATASETS)
PROCEDURAL = [n for n in NAMES if n != "digits"]


@pytest.fixture(autouse=True)
def _empty_memo():
    """Each test starts with an empty in-process memo: a split comes from the session's disk cache
    (tests/conftest.py) or is generated."""
    ds._cached_split.cache_clear()
    yield
    ds._cached_split.cache_clear()


@pytest.fixture
def private_cache(tmp_path, monkeypatch):
    """An empty disk cache of the test's own (for tests that inspect or damage cache files)."""
    monkeypatch.setenv("SURGEON_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


def test_registry_names_the_five_tasks():
    assert set(NAMES) == {"digits", "count", "dsprites_loc", "dsprites_ori", "clevr_dist"}
    assert all(isinstance(s, str) and s for s in BUILTIN_DATASETS.values())


@pytest.mark.parametrize("name", NAMES)
def test_info(name):
    info = builtin_info(name)
    assert set(info) == {"num_classes", "class_names", "provenance", "image_size"}
    assert info["num_classes"] == len(info["class_names"]) >= 2
    assert len(set(info["class_names"])) == info["num_classes"]
    assert isinstance(info["provenance"], str) and len(info["provenance"]) > 200
    assert info["image_size"] == 32


@pytest.mark.parametrize("name", NAMES)
def test_splits_shapes_dtypes_sizes_and_labels(name):
    info = builtin_info(name)
    s = info["image_size"]
    sizes = {}
    for split in ("train", "val", "trainval", "test"):
        x, y = builtin_split(name, split)
        assert x.dtype == np.uint8 and x.ndim == 4 and x.shape[1:] == (s, s, 3)
        assert y.dtype == np.int64 and y.shape == (len(x),)
        assert y.min() >= 0 and y.max() < info["num_classes"]
        assert x.std() > 5  # not blank
        sizes[split] = len(x)
    assert sizes["train"] == 800 and sizes["val"] == 200 and sizes["trainval"] == 1000
    assert sizes["test"] == (1797 - 1000 if name == "digits" else 1000)


@pytest.mark.parametrize("name", NAMES)
def test_trainval_is_train_then_val(name):
    xt, yt = builtin_split(name, "train")
    xv, yv = builtin_split(name, "val")
    x, y = builtin_split(name, "trainval")
    np.testing.assert_array_equal(x, np.concatenate([xt, xv]))
    np.testing.assert_array_equal(y, np.concatenate([yt, yv]))


@pytest.mark.parametrize("name", NAMES)
def test_classes_balanced(name):
    k = builtin_info(name)["num_classes"]
    for split in ("train", "val") + (("test",) if name != "digits" else ()):
        counts = np.bincount(builtin_split(name, split)[1], minlength=k)
        assert counts.max() - counts.min() <= 1, (split, counts)
    if name == "digits":  # test is "the rest": every class present, roughly even
        counts = np.bincount(builtin_split(name, "test")[1], minlength=k)
        assert counts.min() > 0.8 * counts.mean()


@pytest.mark.parametrize("name", NAMES)
def test_deterministic_from_seed(name):
    x1, y1 = builtin_split(name, "train", seed=0)
    ds._cached_split.cache_clear()
    x2, y2 = builtin_split(name, "train", seed=0)
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    x3, _ = builtin_split(name, "train", seed=1)
    assert not np.array_equal(x1, x3)


@pytest.mark.parametrize("name", PROCEDURAL)
def test_splits_are_different_draws(name):
    assert not np.array_equal(builtin_split(name, "train")[0][:200], builtin_split(name, "val")[0])


def test_digits_splits_disjoint():
    # Disjoint up to the few duplicate images the raw set contains.
    def keys(split):
        return {im.tobytes() for im in builtin_split("digits", split)[0]}

    train, val, test = keys("train"), keys("val"), keys("test")
    assert len(train & test) <= 5 and len(val & test) <= 5 and len(train & val) <= 5


def test_returns_fresh_arrays():
    x, y = builtin_split("count", "val")
    x[:] = 0
    y[:] = 0
    x2, y2 = builtin_split("count", "val")
    assert x2.any() and y2.any()


def test_unknown_name_and_split_are_user_errors():
    with pytest.raises(UserError) as e:
        builtin_split("cifar", "train")
    assert "cifar" in str(e.value) and all(n in str(e.value) for n in NAMES)
    with pytest.raises(UserError) as e:
        builtin_info("nope")
    assert "digits" in str(e.value)
    with pytest.raises(UserError) as e:
        builtin_split("digits", "validation")
    assert "validation" in str(e.value) and "trainval" in str(e.value)


def test_cache_dir_env(monkeypatch, tmp_path):
    monkeypatch.delenv("SURGEON_CACHE", raising=False)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "xdg" / "surgeon"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir().parts[-2:] == (".cache", "surgeon")
    monkeypatch.setenv("SURGEON_CACHE", str(tmp_path / "mine"))
    assert cache_dir() == tmp_path / "mine"


def test_disk_cache_roundtrip_and_corruption(private_cache):
    x1, y1 = builtin_split("clevr_dist", "val", seed=3)
    files = list((cache_dir() / "datasets").glob("clevr_dist-*seed3-val.npz"))
    assert len(files) == 1
    ds._cached_split.cache_clear()
    x2, y2 = builtin_split("clevr_dist", "val", seed=3)  # read back from disk
    np.testing.assert_array_equal(x1, x2)
    np.testing.assert_array_equal(y1, y2)
    files[0].write_bytes(b"truncated")
    ds._cached_split.cache_clear()
    x3, _ = builtin_split("clevr_dist", "val", seed=3)  # regenerated, not an error
    np.testing.assert_array_equal(x1, x3)


def test_unwritable_cache_is_skipped(monkeypatch, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    monkeypatch.setenv("SURGEON_CACHE", str(blocker))
    x, _ = builtin_split("dsprites_loc", "val")
    assert x.shape == (200, 32, 32, 3)


# --- the labels mean what they say -------------------------------------------------------


def test_dsprites_loc_label_follows_x_position():
    x, y = builtin_split("dsprites_loc", "train")
    w = x[..., 0].astype(np.float64)
    cx = (w * np.arange(32)[None, None, :]).sum((1, 2)) / w.sum((1, 2))
    # Per-class mean centroid strictly increases with the label.
    means = np.array([cx[y == c].mean() for c in range(16)])
    assert np.all(np.diff(means) > 0)
    assert np.corrcoef(cx, y)[0, 1] > 0.98


def test_count_label_is_number_of_separate_objects():
    from scipy import ndimage

    x, y = builtin_split("count", "val")
    img = x.astype(np.int32)
    # Background = the per-image median colour; objects are far from it in some channel.
    bg = np.median(img.reshape(len(x), -1, 3), 1)[:, None, None, :]
    mask = np.abs(img - bg).max(-1) > 40
    # 8-connectivity: anti-aliased triangle tips may touch their body only diagonally.
    found = np.array([ndimage.label(m, structure=np.ones((3, 3)))[1] for m in mask])
    # Objects never touch, so components == objects, bar a rare object drawn too small or
    # too close to the floor's colour to pass the threshold.
    assert np.mean(found == y + ds.COUNT_MIN) > 0.95


def test_clevr_dist_nearest_object_moves_down_with_nearer_band():
    x, y = builtin_split("clevr_dist", "train")
    img = x.astype(np.int32)
    rows = np.arange(32)
    # Lowest row that differs from the plain floor/sky of the same row (median across x).
    floor = np.median(img, 2, keepdims=True)
    obj = np.abs(img - floor).max(-1) > 40  # [N, 32, 32]
    lowest = np.array([rows[o.any(1)].max() if o.any() else 0 for o in obj])
    means = np.array([lowest[y == c].mean() for c in range(6)])
    assert np.all(np.diff(means) < 0)  # class 0 = nearest = lowest on screen
