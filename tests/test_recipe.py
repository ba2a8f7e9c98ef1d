"""Recipe language: reading, extends, overrides, schema errors at their YAML lines."""
from __future__ import annotations

import json

import pytest

import surgeon
from surgeon.errors import RecipeError, UserError
from surgeon.recipe.loader import parse_override
from surgeon.resources import builtin_recipes, recipe_schema, schema_path

from .conftest import ROOT

GOOD = """\
name: ok
model:
  name: vit_tiny_patch16_224
  pretrained: false
  kwargs: {img_size: 32, patch_size: 8, depth: 2}
surgery:
  - target: "**"
    unfreeze: bias
train:
  epochs: 2
"""


def test_defaults_are_filled_and_stated_in_schema(write):
    r = surgeon.load_recipe(write("r.yaml", GOOD))
    assert r["train"]["batch_size"] == recipe_schema()["properties"]["train"]["properties"]["batch_size"]["default"]
    assert r["train"]["epochs"] == 2
    assert r["eval"]["inference"] == "merge"
    assert r["data"]["source"] == "builtin:digits"


def test_every_schema_field_is_documented():
    missing = []

    def walk(node, path):
        if isinstance(node, dict):
            for key, sub in node.get("properties", {}).items():
                if isinstance(sub, dict) and "description" not in sub and "$ref" not in sub:
                    missing.append(".".join(path + [key]))
                walk(sub, path + [key])
            for key, sub in node.get("$defs", {}).items():
                walk(sub, path + [key])
    walk(recipe_schema(), [])
    assert missing == []


def test_schema_file_is_the_packaged_one():
    assert schema_path().resolve() == (ROOT / "schemas" / "recipe.schema.json").resolve()
    json.loads(schema_path().read_text())


@pytest.mark.parametrize("text,needle", [
    ("name: x\nmodel: {name: vit_tiny_patch16_224, pretraind: false}\n", "did you mean 'pretrained'"),
    ("name: x\nmodel: {name: vit_tiny_patch16_224}\ntrain: {batch_size: -4}\n", "train.batch_size"),
    ("name: x\nmodel: {name: vit_tiny_patch16_224}\ntrain: {epochs: many}\n", "'many' is not of type 'integer'"),
    ("name: x\nmodel: {name: vit_tiny_patch16_224}\neval: {inference: merged}\n", "choose one of"),
    ("name: x\nmodel: {name: vit_tny_patch16_224}\n", "did you mean 'vit_tiny_patch16_224'"),
    ("model: {name: vit_tiny_patch16_224}\n", "'name' is a required property"),
])
def test_schema_errors_are_located(write, text, needle):
    path = write("bad.yaml", text)
    with pytest.raises(RecipeError) as exc:
        surgeon.load_recipe(path)
    assert needle in str(exc.value)
    assert str(path) + ":" in str(exc.value)


def test_all_errors_reported_at_once_with_lines(write):
    path = write("bad.yaml", "name: x\nmodel:\n  name: vit_tiny_patch16_224\n  foo: 1\ntrain:\n  epochs: 0\n  batch_size: x\n")
    with pytest.raises(RecipeError) as exc:
        surgeon.load_recipe(path)
    lines = [w for w, *_ in exc.value.problems]
    assert lines == [f"{path}:4:8", f"{path}:6:11", f"{path}:7:15"]


@pytest.mark.parametrize("content,needle", [
    (b"", "empty"),
    (b"# only a comment\n", "empty"),
    (b"- a\n- b\n", "must be a mapping"),
    (b"name: [unclosed\n", "not valid YAML"),
    (b"\xff\xfe\x00binary", "not a text file"),
    (b"a: &a [1,1,1,1,1,1,1,1,1]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]\nc: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]\n"
     b"d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]\ne: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]\n", "alias bomb"),
    (b"name: a\nname: b\n", "duplicate key"),
])
def test_unreadable_recipes(write, content, needle):
    with pytest.raises(UserError) as exc:
        surgeon.load_recipe(write("r.yaml", content))
    assert needle in str(exc.value)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(UserError, match="not found"):
        surgeon.load_recipe(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match="is a directory"):
        surgeon.load_recipe(tmp_path)


def test_extends_deep_merges_child_wins(write):
    write("base.yaml", GOOD)
    child = write("child.yaml", "extends: base.yaml\nname: child\ntrain: {batch_size: 8}\n")
    r = surgeon.load_recipe(child)
    assert r.name == "child" and r["train"]["batch_size"] == 8 and r["train"]["epochs"] == 2
    assert r["surgery"][0]["unfreeze"] == "bias"


def test_extends_builtin_by_name(write):
    r = surgeon.load_recipe(write("c.yaml", "extends: bitfit\nname: mine\n"))
    assert r["surgery"][0]["unfreeze"] == "bias" and r.name == "mine"


def test_extends_errors(write):
    with pytest.raises(UserError, match="no such file"):
        surgeon.load_recipe(write("c.yaml", "extends: missing.yaml\nname: c\n"))
    write("a.yaml", "extends: b.yaml\nname: a\n")
    b = write("b.yaml", "extends: a.yaml\nname: b\n")
    with pytest.raises(UserError, match="cycle"):
        surgeon.load_recipe(b)


def test_child_error_located_in_child_file(write):
    write("base.yaml", GOOD)
    child = write("child.yaml", "extends: base.yaml\nname: child\ntrain:\n  seed: -1\n")
    with pytest.raises(RecipeError) as exc:
        surgeon.load_recipe(child)
    assert exc.value.problems[0][0] == f"{child}:4:9"


def test_overrides(write):
    path = write("r.yaml", GOOD)
    r = surgeon.load_recipe(path, ["train.epochs=5", "model.kwargs.depth=1", "~surgery.0", "train.base_lr=1e-4"])
    assert r["train"]["epochs"] == 5 and r["model"]["kwargs"]["depth"] == 1 and r["surgery"] == []
    assert r["train"]["base_lr"] == pytest.approx(1e-4)
    r = surgeon.load_recipe(path, {"train.epochs": 7, "~model.kwargs": None}, model="deit_tiny_patch16_224")
    assert r["train"]["epochs"] == 7 and r["model"]["kwargs"] == {} and r["model"]["name"] == "deit_tiny_patch16_224"


def test_override_errors_name_the_override(write):
    path = write("r.yaml", GOOD)
    with pytest.raises(RecipeError) as exc:
        surgeon.load_recipe(path, ["train.epochs=zero"])
    assert exc.value.problems[0][0] == "--set train.epochs=zero"
    for bad in ["train.epochs", "=3", "a..b=1", "~a=1", "x=[unclosed"]:
        with pytest.raises(UserError):
            parse_override(bad)
    with pytest.raises(UserError, match="item"):
        surgeon.load_recipe(path, ["surgery.5.target=x"])


@pytest.mark.parametrize("text,needle", [
    ("eval: {inference: ensemble}", "needs a rule with experts"),
    ("eval: {merge_mode: jigsaw}", "needs a rule with experts"),
    ("regularizers: {consistency: {weight: 1.0}}", "consistency needs a stochastic module"),
    ("train: {batch_size: 10, grad_accum: 3}", "not divisible"),
])
def test_contradictions(write, text, needle):
    with pytest.raises(RecipeError, match=needle):
        surgeon.load_recipe(write("r.yaml", GOOD.replace("train:\n  epochs: 2\n", "") + text + "\n"))


def test_builtin_recipes_are_valid_and_headed():
    recipes = builtin_recipes()
    assert {"linear", "full", "bitfit"} <= set(recipes)
    for name, path in recipes.items():
        text = path.read_text()
        assert text.startswith("#"), f"{name}: header comment missing"
        assert "surgeon apply" in text.split("\nname:")[0], f"{name}: header lacks the command"
        r = surgeon.load_recipe(path)
        assert r.get("description") if hasattr(r, "get") else r.data.get("description"), name
