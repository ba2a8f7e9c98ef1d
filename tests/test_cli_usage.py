"""The first hour of a new user at the command line: usage mistakes, --version, shell
completion, start-up without torch, `surgeon show`, plan's --json errors / --data / grouped
rows, the --set glob hint, `report` on a suite folder, and the built-in backbone by name."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tomllib

import pytest
import yaml

import surgeon
from surgeon.recipe import load_recipe

from .helpers import ROOT

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def run_surgeon(*args: str, env: dict | None = None, cwd=ROOT) -> subprocess.CompletedProcess:
    """The console entry point in a fresh interpreter: real exit code, real stdout/stderr."""
    return subprocess.run([sys.executable, "-m", "surgeon.cli", *args], capture_output=True, text=True,
                          env=env or ENV, cwd=cwd, timeout=120)


# ------------------------------------------------------------------ usage mistakes (item 1)

@pytest.mark.parametrize("args,needle,usage", [
    (["foo"], "No such command 'foo'", "Usage: surgeon [OPTIONS] COMMAND"),
    (["ls", "--bogus"], "--bogus", "Usage: surgeon ls"),  # "No such option: --bogus" (typer 0.29) / "'--bogus'" (0.18)
    (["cp", "lora"], "Missing argument", "Usage: surgeon cp"),
    (["plan"], "Missing argument", "Usage: surgeon plan"),
    (["plan", "bitfit", "--model"], "requires an argument", ""),  # click prints no usage line for this one
])
def test_usage_mistakes_exit_2_with_typer_usage_and_no_traceback(cli, args, needle, usage):
    res = cli(*args)
    assert res.code == 2, res
    assert usage in res.err and needle in res.err
    assert "Traceback" not in res.text and "bug in surgeon" not in res.text


def test_no_command_shows_usage_and_exits_2(cli):
    res = cli()
    assert res.code == 2, res
    assert "Usage: surgeon" in res.text and "plan" in res.text and "show" in res.text
    assert "Traceback" not in res.text and "bug in surgeon" not in res.text


def test_usage_mistake_through_the_console_script():
    proc = run_surgeon("foo")
    assert proc.returncode == 2
    assert "No such command 'foo'" in proc.stderr and "Traceback" not in proc.stderr
    assert proc.stdout == ""


def test_version(cli):
    res = cli("--version")
    assert res.code == 0, res
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert res.out == f"surgeon {project}\n" and surgeon.__version__ == project


def test_show_completion_prints_a_bash_script():
    proc = run_surgeon("--show-completion", "bash")
    assert proc.returncode == 0, proc.stderr
    assert "_SURGEON_COMPLETE=complete_bash" in proc.stdout and "complete " in proc.stdout


def test_completion_completes_commands_and_options():
    env = {**ENV, "_SURGEON_COMPLETE": "complete_bash", "COMP_WORDS": "surgeon pl", "COMP_CWORD": "1"}
    proc = run_surgeon(env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["plan"]
    env.update(COMP_WORDS="surgeon show --", COMP_CWORD="2")
    assert {"--model", "--data", "--set", "--json"} <= set(run_surgeon(env=env).stdout.split())


def test_install_completion_writes_into_home(tmp_path):
    proc = run_surgeon("--install-completion", "bash", env={**ENV, "HOME": str(tmp_path), "SHELL": "/bin/bash"})
    assert proc.returncode == 0, proc.stderr
    script = tmp_path / ".bash_completions" / "surgeon.sh"
    assert "_SURGEON_COMPLETE" in script.read_text()
    assert str(script) in (tmp_path / ".bashrc").read_text()


def test_internal_error_names_no_address(cli, monkeypatch):
    import surgeon.model  # noqa: F401 - imported before the patch: its own reference stays the real one
    import surgeon.recipe

    def boom(*a, **k):
        raise RuntimeError("kaboom")
    monkeypatch.setattr(surgeon.recipe, "load_recipe", boom)
    res = cli("plan", "bitfit")
    assert res.code == 1
    assert "Traceback" in res.err and "kaboom" in res.err
    assert "report it to the surgeon maintainers" in res.err
    assert "http" not in res.err


# ------------------------------------------------------------------ start-up (item 3)

NO_TORCH = """
import json, sys
from surgeon.cli import main
try:
    main(sys.argv[1:])
except SystemExit as exc:
    code = exc.code
print(json.dumps({"code": code, "torch": "torch" in sys.modules, "timm": "timm" in sys.modules}), file=sys.stderr)
"""


@pytest.mark.parametrize("args,code", [
    (["--help"], 0),
    (["ls"], 0),
    (["cp", "bitfit", "{tmp}/mine.yaml"], 0),
    (["schema"], 0),
    (["show", "lora"], 0),
    (["show", "lora", "--json", "--model", "fractal_vit_tiny", "--data", "builtin:digits"], 0),
    (["show", "cpu_repro"], 0),
    (["show", "demo", "--json"], 0),
    (["validate", "{tmp}/bad.yaml"], 2),
    (["validate", "--schema-only", "{tmp}/bad.yaml"], 2),
    (["show", "{tmp}/bad.yaml"], 2),
], ids=lambda v: " ".join(v) if isinstance(v, list) else None)
def test_commands_without_a_model_never_import_torch_or_timm(tmp_path, args, code):
    (tmp_path / "bad.yaml").write_text("name: x\nmodel: {name: vit_tiny_patch16_224}\ntrain: {epochs: -1}\n")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in args]
    proc = subprocess.run([sys.executable, "-c", NO_TORCH, *argv], capture_output=True, text=True, env=ENV,
                          cwd=ROOT, timeout=120)
    seen = json.loads(proc.stderr.strip().splitlines()[-1])
    assert seen == {"code": code, "torch": False, "timm": False}, proc.stderr[-2000:]


def test_import_surgeon_is_light_and_the_api_still_resolves():
    check = ("import sys, surgeon; light = 'torch' not in sys.modules and 'timm' not in sys.modules; "
             "f = (surgeon.load_recipe, surgeon.build_model, surgeon.merge, surgeon.load_run, surgeon.SurgeryPlan, "
             "surgeon.apply_surgery); print(light, 'merge' in dir(surgeon))")
    proc = subprocess.run([sys.executable, "-c", check], capture_output=True, text=True, env=ENV, cwd=ROOT,
                          timeout=120)
    assert proc.stdout.split() == ["True", "True"], proc.stderr
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        surgeon.nope  # noqa: B018


# ------------------------------------------------------------------ surgeon show (item 4)

def test_show_recipe_yaml_and_json_are_the_resolved_recipe(cli):
    args = ["lora", "--model", "fractal_vit_tiny", "--data", "builtin:count", "--set", "train.epochs=3"]
    expected = load_recipe("lora", ["train.epochs=3"], model="fractal_vit_tiny", data="builtin:count").to_dict()
    res = cli("show", *args)
    assert res.code == 0, res
    assert yaml.safe_load(res.out) == expected
    assert expected["train"]["epochs"] == 3 and expected["model"]["name"] == "fractal_vit_tiny"
    assert expected["train"]["warmup_epochs"] == 10  # a default the file does not write is filled in
    res = cli("show", *args, "--json")
    assert res.code == 0, res
    assert json.loads(res.out) == expected


def test_show_suite_lists_every_cell(cli):
    res = cli("show", "demo", "--json", "--set", "seeds=[0,1]", "--model", "fractal_vit_tiny")
    assert res.code == 0, res
    cells = json.loads(res.out)
    assert [c["cell"] for c in cells] == ["mosa_hier/digits/seed0", "adaptformer/digits/seed0",
                                          "mosa_hier/digits/seed1", "adaptformer/digits/seed1"]
    assert [c["recipe"]["train"]["seed"] for c in cells] == [0, 0, 1, 1]
    assert {c["recipe"]["model"]["name"] for c in cells} == {"fractal_vit_tiny"}
    assert {c["recipe"]["data"]["source"] for c in cells} == {"builtin:digits"}
    res = cli("show", "demo", "--set", "seeds=[0,1]", "--model", "fractal_vit_tiny")
    assert res.code == 0, res
    docs = list(yaml.safe_load_all(res.out))
    assert docs == [c["recipe"] for c in cells]
    assert [line for line in res.out.splitlines() if line.startswith("---")] == \
        [f"--- # cell {c['cell']} (suite demo)" for c in cells]


def test_show_suite_file_by_content_and_data_override(cli, write):
    suite = write("grid.yaml", "name: g\nrecipes: [lora, bitfit]\ndatasets: [builtin:digits, builtin:count]\n"
                               "model: {name: vit_tiny_patch16_224, kwargs: {img_size: 32, patch_size: 8}}\n")
    res = cli("show", suite, "--json", "--data", "builtin:dsprites_loc")
    assert res.code == 0, res
    cells = json.loads(res.out)
    assert [c["cell"] for c in cells] == ["lora/dsprites_loc/seed0", "bitfit/dsprites_loc/seed0"]
    assert cells[0]["recipe"]["model"]["kwargs"] == {"img_size": 32, "patch_size": 8}


def test_show_runs_no_model_checks_but_the_recipe_checks(cli, write):
    # An unknown timm name is validate/plan's to find (it needs timm); show prints the recipe.
    res = cli("show", "bitfit", "--model", "no_such_model_xyz")
    assert res.code == 0 and "no_such_model_xyz" in res.out
    res = cli("show", "bitfit", "--set", "train.epochs=-1")
    assert res.code == 2 and "minimum" in res.err and "Traceback" not in res.text
    bad = write("bad_suite.yaml", "name: g\nrecipes: [lora]\ndatasets: [builtin:digits]\nset: {train.epochs: -1}\n")
    res = cli("show", bad)
    assert res.code == 2 and "cell lora/digits/seed0" in res.err and "Traceback" not in res.text
    res = cli("show", "no_such_recipe")
    assert res.code == 2 and "no_such_recipe" in res.err


def test_show_help_points_to_validate_and_plan(cli):
    res = cli("show", "--help")
    assert res.code == 0
    text = " ".join(res.out.split())
    assert "`surgeon validate` and `surgeon plan` run them" in text


# ------------------------------------------------------------------ plan (item 7)

def test_plan_json_error_object(cli, write):
    bad = write("bad.yaml", "name: x\nmodel: {name: vit_tiny_patch16_224}\ntrain: {epochs: -1, batch_size: 0}\n")
    res = cli("plan", bad, "--json")
    assert res.code == 2, res
    payload = json.loads(res.out)
    assert payload["error"] == "the recipe has 2 problem(s)"
    assert {p["field"] for p in payload["problems"]} == {"train.epochs", "train.batch_size"}
    assert all(p["where"].startswith(f"{bad}:3:") for p in payload["problems"])
    res = cli("plan", "no_such_recipe.yaml", "--json")
    assert res.code == 2
    payload = json.loads(res.out)
    assert "not found" in payload["error"] and payload["problems"][0]["message"] == payload["error"]
    res = cli("plan", "bitfit", "--model", "vit_tiny_patch16_224", "--set", "surgery.0.target=nothing.here", "--json")
    assert res.code == 2
    assert "matches no module" in json.loads(res.out)["problems"][0]["message"]


def test_plan_groups_modules_patched_alike(cli):
    res = cli("plan", "adaptformer", "--model", "deit_tiny_patch16_224")
    assert res.code == 0, res
    cells = [[c.strip() for c in line.split("│")[1:-1]] for line in res.out.splitlines() if "│" in line]
    grouped = [c for c in cells if c and c[0] == "blocks.*.mlp"]
    assert len(grouped) == 1 and grouped[0][1:3] == ["12", "adapter"]
    assert grouped[0][4].replace(",", "") == str(12 * int(grouped[0][3].replace(",", "")))
    assert "blocks.0.mlp" not in res.out and "blocks.11.mlp" not in res.out


def test_plan_data_sizes_the_head_without_opening_images(cli, tmp_path):
    res = cli("plan", "linear", "--model", "fractal_vit_tiny", "--data", "builtin:digits", "--json")
    assert res.code == 0, res
    payload = json.loads(res.out)
    assert payload["num_classes"] == 10 and payload["head_params"] == 192 * 10 + 10
    # An image folder whose "images" are not images: only the class folders are read.
    for c in ("cat", "dog", "emu"):
        (tmp_path / "img" / c).mkdir(parents=True)
        (tmp_path / "img" / c / "0.png").write_bytes(b"not a png")
    res = cli("plan", "linear", "--model", "fractal_vit_tiny", "--data", f"imagefolder:{tmp_path / 'img'}", "--json")
    assert res.code == 0, res
    assert json.loads(res.out)["head_params"] == 192 * 3 + 3
    res = cli("plan", "linear", "--model", "fractal_vit_tiny", "--data", "builtin:digits", "--set", "model.num_classes=7")
    assert res.code == 2 and "data has 10 classes" in res.err
    res = cli("plan", "linear", "--data", f"imagefolder:{tmp_path / 'missing'}")
    assert res.code == 2 and "missing" in res.err


def test_set_glob_hint_names_the_quoting(cli):
    res = cli("plan", "adaptformer", "--set", "surgery.0.target=**.blocks.*.mlp")
    assert res.code == 2, res
    assert "alias" in res.err and "single quotes" in res.err
    assert """--set 'surgery.0.target="**.blocks.*.mlp"'""" in res.err
    # ... and the spelling the hint gives works.
    res = cli("show", "adaptformer", "--set", 'surgery.0.target="**.blocks.*.mlp"', "--json")
    assert res.code == 0 and json.loads(res.out)["surgery"][0]["target"] == "**.blocks.*.mlp"


# ------------------------------------------------------------------ report on a suite folder (item 7)

def test_report_accepts_a_suite_folder(cli, tmp_path):
    from .fake_runs import make_run

    root = tmp_path / "suites" / "grid"
    runs = [make_run(root / recipe / "digits", name=recipe, seed=seed, steps=20)
            for recipe in ("mosa", "lora") for seed in (1, 2)]
    (root / "report").mkdir()
    (root / "report" / "comparison.md").write_text("# an earlier suite report\n")
    res = cli("report", root)
    assert res.code == 0, res
    assert "| mosa " in res.out and "| lora " in res.out
    out_dir = root / "comparison"
    assert res.out.strip().endswith(str(out_dir / "comparison.md"))
    rows = (out_dir / "runs.csv").read_text().splitlines()
    assert len(rows) == 1 + len(runs)
