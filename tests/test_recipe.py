"""Recipe language: reading, extends, overrides, schema errors at their YAML lines."""
from __future__ import annotations

import copy
import dataclasses
import json
import pickle

import pytest

import surgeon
from surgeon.errors import RecipeError, UserError
from surgeon.methods.registry import method_specs
from surgeon.recipe import sections
from surgeon.recipe.loader import parse_override
from surgeon.recipe.schema import recipe_schema
from surgeon.recipe.schema_gen import main as schema_gen, schema_text
from surgeon.resources import builtin_recipes, schema_path

from .helpers import ROOT

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
    assert r.train.batch_size == recipe_schema()["properties"]["train"]["properties"]["batch_size"]["default"]
    assert r.train.epochs == 2
    assert r.eval.inference == "merge"
    assert r.data.source == "builtin:digits"
    assert r.to_dict()["train"]["batch_size"] == r.train.batch_size  # the mapping RUN/recipe.yaml holds


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


def test_published_schema_is_what_the_generator_writes():
    """schemas/recipe.schema.json is generated from the sections and the method folders:
    `python -m surgeon.recipe.schema_gen` rewrites it."""
    assert schema_path().read_text(encoding="utf-8") == schema_text(), \
        "schemas/recipe.schema.json is out of date: run `python -m surgeon.recipe.schema_gen`"
    assert schema_gen(["--check"]) == 0


def test_schema_gen_check_fails_on_a_stale_file(tmp_path, monkeypatch, capsys):
    stale = tmp_path / "recipe.schema.json"
    stale.write_text(schema_text().replace('"title": "surgeon recipe"', '"title": "old"'))
    monkeypatch.setattr("surgeon.recipe.schema_gen.schema_path", lambda: stale)
    assert schema_gen(["--check"]) == 1 and "out of date" in capsys.readouterr().err
    assert schema_gen([]) == 0 and stale.read_text() == schema_text()


def test_every_method_is_in_the_schema_and_its_config_matches_its_fragment():
    """The registry is the one list of methods: each has its rule key, its $defs entry (or an inline
    schema) and a config dataclass whose fields are exactly the fragment's properties."""
    schema = recipe_schema()
    rule = schema["$defs"]["rule"]
    keys = list(method_specs())
    assert {"adapter", "dora", "lora", "mlae", "unfreeze"} <= set(keys)
    assert [o["required"] for o in rule["oneOf"]] == [[k] for k in keys]
    for key, spec in method_specs().items():
        assert key in rule["properties"]
        if spec.config_type is not None:
            assert rule["properties"][key] == {"$ref": f"#/$defs/{key}"}
            fields = [f.name for f in dataclasses.fields(spec.config_type)]
            assert fields == list(spec.schema["properties"]), key
    for name, cls in sections.SECTIONS.items():
        fields = {f.name for f in dataclasses.fields(cls)}
        assert fields == set(schema["properties"][name]["properties"]), name


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
    assert r.name == "child" and r.train.batch_size == 8 and r.train.epochs == 2
    assert r.surgery[0].method == "unfreeze" and r.surgery[0].config == "bias"


def test_extends_builtin_by_name(write):
    r = surgeon.load_recipe(write("c.yaml", "extends: bitfit\nname: mine\n"))
    assert r.surgery[0].config == "bias" and r.name == "mine"


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
    assert r.train.epochs == 5 and r.model.kwargs["depth"] == 1 and r.surgery == ()
    assert r.train.base_lr == pytest.approx(1e-4)
    r = surgeon.load_recipe(path, {"train.epochs": 7, "~model.kwargs": None}, model="deit_tiny_patch16_224")
    assert r.train.epochs == 7 and r.model.kwargs == {} and r.model.name == "deit_tiny_patch16_224"


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
        assert r.description, name


def test_recipe_is_frozen_and_resolution_returns_a_new_one(write):
    path = write("r.yaml", GOOD)
    r = surgeon.load_recipe(path)
    with pytest.raises(dataclasses.FrozenInstanceError):
        r.train.epochs = 3
    with pytest.raises(TypeError):
        r.model.kwargs["depth"] = 1  # read-only mapping
    # ... that still travels: a loaded model holds its recipe (deepcopy, pickle, JSON)
    assert copy.deepcopy(r) == r == pickle.loads(pickle.dumps(r))
    assert json.loads(json.dumps(r.model.kwargs)) == {"img_size": 32, "patch_size": 8, "depth": 2}
    resolved = r.with_values({("model", "num_classes"): 7})
    assert resolved.model.num_classes == 7 and r.model.num_classes is None
    assert "num_classes" not in r.to_dict()["model"] and resolved.to_dict()["model"]["num_classes"] == 7
    assert resolved.where(("train", "epochs")) == r.where(("train", "epochs")) == f"{path}:10:11"


def test_to_yaml_keeps_the_order_as_written_then_defaults(write):
    r = surgeon.load_recipe(write("r.yaml", GOOD))
    text = r.to_yaml()
    assert text.index("name: ok") < text.index("model:") < text.index("surgery:") < text.index("data:")
    assert list(r.to_dict()["train"])[:2] == ["epochs", "max_steps"]  # as written, then the schema's order
