"""surgeon.data: every source, transforms, deterministic loaders, and each user error.

Each test writes its own tiny images (8x8 / 16x16) with PIL into tmp_path; the model is a
32-px vit_tiny with 8-px patches so a forward pass is instant.
"""
from __future__ import annotations

import json
import pickle
import sys
import types
import zlib

import numpy as np
import pytest
import timm
import torch
from PIL import Image

from surgeon.data import (ArrayDataset, DataSplits, ImageFileDataset, build_loader, build_splits,
                          build_transforms, stratified_split)
from surgeon.errors import UserError
from surgeon.recipe import section

COLORS = [(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0)]


@pytest.fixture(scope="module")
def model():
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8,
                             num_classes=3)


def cfg(source: str, **kw):
    """A typed recipe `data` section (schema defaults) for `source`."""
    base = dict(source=source, protocol="final", image_size=None, augment="rrc_flip",
                val_fraction=0.2, num_workers=0, bad_images="error", mean=None, std=None)
    base.update(kw)
    return section("data", base)


def write_img(path, color=(128, 64, 32), size=8, mode="RGB", fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(zlib.crc32(str(path.name).encode()))  # not hash(): salted
    noise = rng.integers(0, 70, (size, size, 3))
    arr = (np.asarray(color, np.float32) * 0.7 + noise).astype(np.uint8)
    img = Image.fromarray(arr, "RGB")
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, format=fmt)
    return path


def make_tree(root, classes=("ant", "bee", "cat"), per_class=5, size=8):
    for c, name in enumerate(classes):
        for i in range(per_class):
            write_img(root / name / f"{i}.png", COLORS[c], size=size)


def labels_of(ds) -> list[int]:
    return [lbl for _, lbl in ds.samples] if hasattr(ds, "samples") else list(ds.targets)


# ---------------------------------------------------------------------------------- sources

def test_imagefolder_train_val_test(tmp_path, model):
    make_tree(tmp_path / "train", per_class=4)
    make_tree(tmp_path / "val", classes=("ant", "cat"), per_class=2)  # a class may miss in val
    make_tree(tmp_path / "test", per_class=1)
    s = build_splits(cfg(f"imagefolder:{tmp_path}"), model, seed=0)
    assert isinstance(s, DataSplits)
    assert s.class_names == ["ant", "bee", "cat"] and s.num_classes == 3
    assert (len(s.train), len(s.val), len(s.test)) == (12, 4, 3)
    # same name -> same index in every split
    assert sorted(set(labels_of(s.val))) == [0, 2] and labels_of(s.test) == [0, 1, 2]
    x, y = s.train[0]
    assert x.dtype == torch.float32 and x.shape == (3, 32, 32) and isinstance(y, int)
    assert "train 12" in s.provenance and "test 3" in s.provenance
    tune = build_splits(cfg(f"imagefolder:{tmp_path}", protocol="tune"), model, seed=0)
    assert tune.test is None and len(tune.train) == 12


def test_imagefolder_single_tree_stratified_seeded(tmp_path, model):
    make_tree(tmp_path, per_class=5)
    a = build_splits(cfg(f"imagefolder:{tmp_path}"), model, seed=1)
    b = build_splits(cfg(f"imagefolder:{tmp_path}"), model, seed=1)
    assert (len(a.train), len(a.val), a.test) == (12, 3, None)
    assert np.bincount(labels_of(a.val)).tolist() == [1, 1, 1]  # stratified
    assert a.val.samples == b.val.samples  # seeded
    assert not set(p for p, _ in a.val.samples) & set(p for p, _ in a.train.samples)
    others = [build_splits(cfg(f"imagefolder:{tmp_path}"), model, seed=s).val.samples
              for s in range(2, 6)]
    assert any(o != a.val.samples for o in others)


def test_imagefolder_train_only_is_split(tmp_path, model):
    make_tree(tmp_path / "train", per_class=10)
    s = build_splits(cfg(f"imagefolder:{tmp_path}", val_fraction=0.1), model, seed=0)
    assert (len(s.train), len(s.val)) == (27, 3)


def test_stratified_split_edges():
    tr, va = stratified_split([0, 1, 1, 2, 2, 2, 2, 2, 2, 2, 2, 2, 2], 0.1, seed=0)
    assert sorted(tr + va) == list(range(13))
    assert 0 in tr  # singleton class stays in train
    assert len(va) == 2  # one of class 1, round(10 * .1) = 1 of class 2


def write_vtab(task, n_train=8, n_val=4, n_test=6, k=3, size=8):
    lines = {}
    for split, n in (("train800", n_train), ("val200", n_val), ("test", n_test)):
        rows = []
        for i in range(n):
            rel = f"images/{split}_{i}.jpg"
            write_img(task / rel, COLORS[i % k], size=size, fmt="JPEG")
            rows.append(f"{rel} {i % k}")
        lines[split] = rows
    (task / "train800.txt").write_text("\n".join(lines["train800"]) + "\n")
    (task / "val200.txt").write_text("\n".join(lines["val200"]) + "\n")
    (task / "train800val200.txt").write_text("\n".join(lines["train800"] + lines["val200"]))
    (task / "test.txt").write_text("\n".join(lines["test"]) + "\n")


def test_vtab1k_protocols(tmp_path, model):
    task = tmp_path / "vtab-1k" / "dtd"
    write_vtab(task)
    final = build_splits(cfg(f"vtab1k:{task}", augment="resize"), model, seed=0)
    assert (len(final.train), len(final.val), len(final.test)) == (12, 4, 6)
    assert final.num_classes == 3 and final.class_names == ["0", "1", "2"]
    assert labels_of(final.test) == [0, 1, 2, 0, 1, 2]
    tune = build_splits(cfg(f"vtab1k:{task}", protocol="tune"), model, seed=0)
    assert (len(tune.train), len(tune.val), tune.test) == (8, 4, None)
    assert "VTAB-1k task 'dtd'" in final.provenance
    # train800val200.txt is just train800 + val200: accepted when absent
    (task / "train800val200.txt").unlink()
    again = build_splits(cfg(f"vtab1k:{task}"), model, seed=0)
    assert again.train.samples == final.train.samples


def test_filelist_comments_split_and_names(tmp_path, model):
    rows = ["# a comment", ""]
    for c, name in enumerate(["cat", "dog"]):
        for i in range(5):
            write_img(tmp_path / "imgs" / name / f"{i} x.png", COLORS[c])  # space in the name
            rows.append(f"imgs/{name}/{i} x.png {c}")
    rows.insert(4, "   # indented comment")
    (tmp_path / "list.txt").write_text("\n".join(rows) + "\n\n")
    s = build_splits(cfg(f"filelist:{tmp_path / 'list.txt'}", val_fraction=0.2), model, seed=0)
    assert s.num_classes == 2 and s.class_names == ["cat", "dog"]  # from parent folders
    assert (len(s.train), len(s.val), s.test) == (8, 2, None)
    assert np.bincount(labels_of(s.val)).tolist() == [1, 1]


@pytest.mark.parametrize("under", ["images", ""])
def test_fgvc_json(tmp_path, model, under):
    base = tmp_path / under if under else tmp_path
    data = {}
    for split, n in (("train", 6), ("val", 3), ("test", 3)):
        data[split] = {}
        for i in range(n):
            rel = f"{['001.Albatross', '002.Gull', '003.Tern'][i % 3]}/{split}{i}.jpg"
            write_img(base / rel, COLORS[i % 3], fmt="JPEG")
            data[split][rel] = i % 3
        (tmp_path / f"{split}.json").write_text(json.dumps(data[split], indent=1))
    final = build_splits(cfg(f"fgvc:{tmp_path}"), model, seed=0)
    assert (len(final.train), len(final.val), len(final.test)) == (9, 3, 3)  # train+val
    assert final.class_names == ["001.Albatross", "002.Gull", "003.Tern"]
    tune = build_splits(cfg(f"fgvc:{tmp_path}", protocol="tune"), model, seed=0)
    assert (len(tune.train), len(tune.val), tune.test) == (6, 3, None)
    assert ("under images/" if under else "under the root folder") in final.provenance


def install_fake_builtin(monkeypatch, calls):
    """A stand-in for surgeon.builtin.datasets with the agreed API."""
    def builtin_info(name):
        if name != "digits":
            raise KeyError(name)
        return dict(num_classes=3, class_names=["zero", "one", "two"],
                    provenance="procedural digits.", image_size=16)

    def builtin_split(name, split, seed=0):
        calls.append((split, seed))
        n = {"train": 9, "val": 3, "trainval": 12, "test": 6}[split]
        rng = np.random.default_rng(seed)
        return (rng.integers(0, 255, (n, 16, 16, 3), dtype=np.uint8),
                np.arange(n, dtype=np.int64) % 3)

    mod = types.ModuleType("surgeon.builtin.datasets")
    mod.builtin_info, mod.builtin_split = builtin_info, builtin_split
    pkg = types.ModuleType("surgeon.builtin")
    pkg.datasets = mod
    monkeypatch.setitem(sys.modules, "surgeon.builtin", pkg)
    monkeypatch.setitem(sys.modules, "surgeon.builtin.datasets", mod)


def test_builtin_hook(monkeypatch, model):
    calls = []
    install_fake_builtin(monkeypatch, calls)
    s = build_splits(cfg("builtin:digits"), model, seed=7)
    assert isinstance(s.train, ArrayDataset) and s.class_names == ["zero", "one", "two"]
    assert (len(s.train), len(s.val), len(s.test)) == (12, 3, 6)
    assert calls == [("trainval", 7), ("val", 7), ("test", 7)]
    x, y = s.test[4]
    assert x.shape == (3, 32, 32) and y == 1
    tune = build_splits(cfg("builtin:digits", protocol="tune"), model, seed=0)
    assert (len(tune.train), tune.test) == (9, None)
    with pytest.raises(UserError, match="unknown built-in data set 'nope'"):
        build_splits(cfg("builtin:nope"), model, seed=0)


def test_builtin_module_absent_is_a_user_error(monkeypatch, model):
    monkeypatch.setitem(sys.modules, "surgeon.builtin", None)  # import now fails
    raises_naming("data.source", lambda: build_splits(cfg("builtin:digits"), model, seed=0),
                  "built-in data sets are not available")


def test_builtin_real_digits(model):
    pytest.importorskip("surgeon.builtin.datasets")
    s = build_splits(cfg("builtin:digits", protocol="tune", augment="resize"), model, seed=0)
    assert s.num_classes == 10 and (len(s.train), len(s.val), s.test) == (800, 200, None)
    x, y = s.train[0]
    assert x.shape == (3, 32, 32) and 0 <= y < 10 and "scikit-learn" in s.provenance


# ------------------------------------------------------------------------------- transforms

@pytest.mark.parametrize("augment", ["rrc_flip", "flip", "resize"])
def test_transforms_shape_and_forward(tmp_path, model, augment):
    make_tree(tmp_path / "train", per_class=2, size=16)
    make_tree(tmp_path / "val", per_class=1, size=16)
    s = build_splits(cfg(f"imagefolder:{tmp_path}", augment=augment), model, seed=0)
    batch = next(iter(build_loader(s.train, batch_size=6, shuffle=True, seed=0, num_workers=0)))
    assert batch[0].shape == (6, 3, 32, 32) and batch[0].dtype == torch.float32
    assert batch[1].dtype == torch.int64
    if augment == "rrc_flip":  # one forward pass is enough (they are slow on a shared CPU)
        with torch.no_grad():
            assert model(batch[0]).shape == (6, 3)
    assert s.val[0][0].shape == (3, 32, 32)


def test_transform_overrides(model):
    tf = build_transforms(cfg("x", image_size=48, mean=[0, 0, 0], std=[1, 1, 1],
                              augment="resize"), model)
    white = Image.new("RGB", (10, 20), (255, 255, 255))
    out = tf.eval(white)
    assert out.shape == (3, 48, 48) and torch.allclose(out, torch.ones_like(out))
    # default: the model's *actual* input size (32), not the pretrained config's 224
    d = build_transforms(cfg("x"), model)
    assert d.input_size == (3, 32, 32) and d.train(white).shape == (3, 32, 32)
    assert "centre crop 32x32" in d.describe()
    pickle.dumps(d.train), pickle.dumps(d.eval)  # no lambdas: workers can receive them


def test_non_rgb_modes_become_rgb(tmp_path, model):
    write_img(tmp_path / "train/a/gray.png", mode="L")
    write_img(tmp_path / "train/a/pal.png", mode="P")
    write_img(tmp_path / "train/b/rgba.png", mode="RGBA")
    write_img(tmp_path / "train/b/cmyk.jpg", mode="CMYK", fmt="JPEG")
    Image.fromarray(np.full((8, 8), 40000, np.uint16)).save(tmp_path / "train/b/deep.png")
    s = build_splits(cfg(f"imagefolder:{tmp_path}", augment="resize", mean=[0, 0, 0],
                         std=[1, 1, 1], val_fraction=0.01), model, seed=0)
    ds = ImageFileDataset(s.train.samples + s.val.samples, s.val.transform, classes=s.class_names)
    assert len(ds) == 5
    for i in range(len(ds)):
        assert ds[i][0].shape == (3, 32, 32)
    deep = next(i for i, (p, _) in enumerate(ds.samples) if p.endswith("deep.png"))
    assert 0.5 < float(ds[deep][0].mean()) < 0.7  # 40000/65535, not clipped to white


# ---------------------------------------------------------------------------------- loaders

def test_loader_deterministic_order_augmentation_and_resume(tmp_path, model):
    make_tree(tmp_path / "train", per_class=4, size=16)
    make_tree(tmp_path / "val", per_class=1)
    s = build_splits(cfg(f"imagefolder:{tmp_path}"), model, seed=0)  # rrc_flip: random

    def run(**kw):
        args = dict(batch_size=4, shuffle=True, seed=3, num_workers=0, epoch=1)
        args.update(kw)
        return list(build_loader(s.train, **args))

    a, b = run(), run()
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))
    assert len(a) == 3
    other = run(epoch=2)
    assert not all(torch.equal(x[1], y[1]) for x, y in zip(a, other))
    # resume mid-epoch: batches 1.. equal the uninterrupted run's, without reading batch 0
    resumed = run(start_batch=1)
    assert len(resumed) == 2
    assert all(torch.equal(x[0], y[0]) for x, y in zip(a[1:], resumed))
    # workers do not change the numbers (per-item augmentation seeds)
    workers = run(num_workers=2)
    assert all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, workers))
    # the caller's RNG streams are untouched by data loading in-process
    torch.manual_seed(0)
    expect = torch.rand(3)
    torch.manual_seed(0)
    run()
    assert torch.equal(torch.rand(3), expect)
    # eval order is the dataset order
    ev = list(build_loader(s.val, batch_size=2, shuffle=False, seed=0, num_workers=0))
    assert torch.cat([y for _, y in ev]).tolist() == labels_of(s.val)
    # picklable datasets
    clone = pickle.loads(pickle.dumps(s.train))
    assert clone.samples == s.train.samples


# ------------------------------------------------------------------------------ user errors

def raises_naming(path, fn, match=None):
    with pytest.raises(UserError, match=match) as e:
        fn()
    assert str(path) in str(e.value), str(e.value)
    return e.value


def test_unknown_scheme_lists_known(model, tmp_path):
    err = raises_naming("data.source", lambda: build_splits(cfg("s3:bucket"), model, seed=0))
    for scheme in ("builtin", "imagefolder", "vtab1k", "filelist", "fgvc"):
        assert scheme in str(err)
    err = raises_naming("data.source", lambda: build_splits(cfg(str(tmp_path)), model, seed=0))
    assert f"imagefolder:{tmp_path}" in err.hint


def test_missing_paths(model, tmp_path):
    gone = tmp_path / "nope"
    for spec in (f"imagefolder:{gone}", f"vtab1k:{gone}", f"filelist:{gone}.txt", f"fgvc:{gone}"):
        raises_naming(gone, lambda: build_splits(cfg(spec), model, seed=0), "not found")
    write_vtab(tmp_path / "vtab" / "dtd")
    err = raises_naming(tmp_path / "vtab", lambda: build_splits(cfg(f"vtab1k:{tmp_path / 'vtab'}"),
                                                                model, seed=0), "VTAB-1k root")
    assert "vtab1k:" + str(tmp_path / "vtab" / "dtd") in err.hint
    (tmp_path / "task").mkdir()
    raises_naming(tmp_path / "task" / "val200.txt",
                  lambda: build_splits(cfg(f"vtab1k:{tmp_path / 'task'}"), model, seed=0))
    (tmp_path / "fg").mkdir()
    raises_naming(tmp_path / "fg" / "train.json",
                  lambda: build_splits(cfg(f"fgvc:{tmp_path / 'fg'}"), model, seed=0))


def test_empty_class_folder_and_empty_split(model, tmp_path):
    make_tree(tmp_path / "a", per_class=2)
    (tmp_path / "a" / "dog").mkdir()
    (tmp_path / "a" / "dog" / "notes.txt").write_text("not an image")
    raises_naming(tmp_path / "a" / "dog",
                  lambda: build_splits(cfg(f"imagefolder:{tmp_path / 'a'}"), model, seed=0),
                  "class folder 'dog' contains no images")
    (tmp_path / "b" / "train").mkdir(parents=True)
    raises_naming(tmp_path / "b" / "train",
                  lambda: build_splits(cfg(f"imagefolder:{tmp_path / 'b'}"), model, seed=0),
                  "no class sub-folders")
    task = tmp_path / "task"
    write_vtab(task)
    (task / "test.txt").write_text("# nothing here\n")
    raises_naming(task / "test.txt", lambda: build_splits(cfg(f"vtab1k:{task}"), model, seed=0),
                  "no images")
    (tmp_path / "empty.json").write_text("{}")
    (tmp_path / "fg").mkdir()
    (tmp_path / "fg" / "train.json").write_text("{}")
    raises_naming(tmp_path / "fg" / "train.json",
                  lambda: build_splits(cfg(f"fgvc:{tmp_path / 'fg'}"), model, seed=0), "no images")


def test_split_folders_without_train(model, tmp_path):
    make_tree(tmp_path / "val", per_class=1)
    raises_naming(tmp_path, lambda: build_splits(cfg(f"imagefolder:{tmp_path}"), model, seed=0),
                  "no train/ folder")


def test_class_in_val_not_in_train(model, tmp_path):
    make_tree(tmp_path / "train", classes=("ant", "bee"), per_class=2)
    make_tree(tmp_path / "val", classes=("ant", "wasp"), per_class=1)
    raises_naming(tmp_path / "val" / "wasp",
                  lambda: build_splits(cfg(f"imagefolder:{tmp_path}"), model, seed=0),
                  "'wasp' is in val/ but not in train/")


@pytest.mark.parametrize("label,match", [("-1", "out of range"), ("two", "not an integer"),
                                         ("1.5", "not an integer"), ("", "expected `path label`")])
def test_bad_labels_name_file_and_line(model, tmp_path, label, match):
    write_img(tmp_path / "a.png")
    (tmp_path / "l.txt").write_text(f"# header\na.png 0\na.png {label}\n")
    raises_naming(f"{tmp_path / 'l.txt'}:3",
                  lambda: build_splits(cfg(f"filelist:{tmp_path / 'l.txt'}"), model, seed=0), match)


def test_fgvc_bad_label_names_line(model, tmp_path):
    write_img(tmp_path / "images" / "x.jpg")
    (tmp_path / "train.json").write_text('{\n "x.jpg": 0,\n "y.jpg": "bird"\n}')
    raises_naming(f"{tmp_path / 'train.json'}:3",
                  lambda: build_splits(cfg(f"fgvc:{tmp_path}"), model, seed=0), "not an integer")


def test_missing_listed_image_named_up_front(model, tmp_path):
    task = tmp_path / "task"
    write_vtab(task)
    (task / "images" / "test_4.jpg").unlink()
    err = raises_naming(f"{task / 'test.txt'}:5",
                        lambda: build_splits(cfg(f"vtab1k:{task}"), model, seed=0),
                        "image file not found")
    assert "test_4.jpg" in str(err)
    s = build_splits(cfg(f"vtab1k:{task}", bad_images="skip"), model, seed=0)
    assert len(s.test) == 5 and s.test.skipped == 1 and "missing and skipped" in s.provenance


def corrupt_tree(tmp_path):
    make_tree(tmp_path / "train", per_class=3)
    make_tree(tmp_path / "val", per_class=1)
    bad = tmp_path / "train" / "bee" / "1.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n garbage, not an image")
    trunc = tmp_path / "train" / "cat" / "2.jpg"
    write_img(trunc, size=16, fmt="JPEG")
    trunc.write_bytes(trunc.read_bytes()[:60])
    return bad, trunc


def test_unreadable_image_error_names_file(model, tmp_path):
    bad, _ = corrupt_tree(tmp_path)
    s = build_splits(cfg(f"imagefolder:{tmp_path}"), model, seed=0)
    i = next(i for i, (p, _) in enumerate(s.train.samples) if p == str(bad))
    err = raises_naming(bad, lambda: s.train[i], "cannot read image")
    assert "bad_images: skip" in err.hint
    # from a worker process: the same clean, located error (not a wrapped worker traceback)
    loader = build_loader(s.train, batch_size=4, shuffle=False, seed=0, num_workers=2)
    err = raises_naming(bad, lambda: list(loader), "cannot read image")
    assert "Traceback" not in str(err)


def test_bad_images_skip_counts_across_workers(model, tmp_path):
    bad, trunc = corrupt_tree(tmp_path)
    s = build_splits(cfg(f"imagefolder:{tmp_path}", bad_images="skip"), model, seed=0)
    assert s.train.skipped == 0
    batches = list(build_loader(s.train, batch_size=3, shuffle=True, seed=0, num_workers=2))
    assert sum(len(y) for _, y in batches) == len(s.train) == 10  # bad items replaced, not dropped
    assert s.train.skipped == 2 and sorted(s.train.skipped_files) == sorted([str(bad), str(trunc)])
    # a second epoch does not count them again
    list(build_loader(s.train, batch_size=3, shuffle=True, seed=0, num_workers=0, epoch=1))
    assert s.train.skipped == 2
    assert isinstance(s.train, ImageFileDataset)
