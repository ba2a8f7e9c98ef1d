"""The package's import graph: one-way layers, no circles, commented deferred imports
(docs/ARCHITECTURE.md). Parsed with ``ast``; nothing is imported."""
from __future__ import annotations

import ast
import fnmatch
from pathlib import Path

from .helpers import ROOT

PACKAGE = ROOT / "surgeon"

#: Bottom to top. A module may import modules of its own layer or of a lower one only.
#: Patterns are fnmatch patterns over dotted module names (a package is its ``__init__``).
LAYERS = [
    ("base", ["surgeon.errors", "surgeon.resources", "surgeon.config", "surgeon.io", "surgeon.seeding",
              "surgeon.rundir", "surgeon.builtin", "surgeon.builtin.models"]),
    ("recipe", ["surgeon.recipe", "surgeon.recipe.*", "surgeon.methods", "surgeon.methods.registry",
                "surgeon.methods.modes", "surgeon.methods.modifiers", "surgeon.methods.targets",
                "surgeon.methods.*.spec"]),
    ("model", ["surgeon.anatomy", "surgeon.anatomy.*", "surgeon.methods.*", "surgeon.backbone", "surgeon.weights", "surgeon.surgery", "surgeon.surgery.*",
               "surgeon.model"]),
    ("data", ["surgeon.data", "surgeon.data.*", "surgeon.builtin.datasets", "surgeon.builtin.fractal"]),
    ("train", ["surgeon.train", "surgeon.train.*", "surgeon.builtin.pretrain"]),
    ("run", ["surgeon.runload"]),
    ("merge", ["surgeon.merge_run"]),
    ("evaluate", ["surgeon.evaluate"]),
    ("report", ["surgeon.report", "surgeon.report.*"]),
    ("apply", ["surgeon.apply"]),
    ("suite and sweep", ["surgeon.sweep", "surgeon.sweep.*", "surgeon.suite", "surgeon.suite_runner", "surgeon.demo",
                         "surgeon.gpus"]),
    ("cli", ["surgeon.cli", "surgeon", "surgeon.__main__"]),
]

#: Modules whose function-local imports are their design, said in their docstring.
DEFERRING_MODULES = {"surgeon.cli": "the CLI's start-up: each command imports what it needs"}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def layer_of(module: str) -> int:
    """The first (lowest) layer with a pattern matching ``module``, method packages included:
    ``surgeon.methods.lora`` (a package face) is the recipe layer, its ``method`` the model layer."""
    if module.startswith("surgeon.methods.") and module.count(".") == 2 and \
            (PACKAGE / "methods" / module.split(".")[2] / "__init__.py").is_file():
        return 1  # a method folder's face: import-light, like its spec
    for i, (_, patterns) in enumerate(LAYERS):
        if any(fnmatch.fnmatchcase(module, p) for p in patterns):
            return i
    raise AssertionError(f"{module} is in no layer: add it to LAYERS (tests/test_architecture.py)")


def resolve(module: str, node: ast.ImportFrom | ast.Import) -> list[str]:
    """The surgeon modules an import statement names (submodules, or the package)."""
    if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
    else:
        base = node.module or ""
        if node.level:
            pkg = module.split(".") if MODULES[module].name == "__init__.py" else module.split(".")[:-1]
            pkg = pkg[:len(pkg) - (node.level - 1)]
            base = ".".join(pkg + ([base] if base else []))
        targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in MODULES else base for a in node.names]
    return [t for t in targets if t == "surgeon" or t.startswith("surgeon.")]


def imports() -> dict[str, list[tuple[str, int, bool]]]:
    """module -> [(imported surgeon module, line, inside a function)]."""
    out: dict[str, list[tuple[str, int, bool]]] = {}
    for module, path in MODULES.items():
        tree = ast.parse(path.read_text(encoding="utf-8"))
        local = {id(n) for f in ast.walk(tree) if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef))
                 for n in ast.walk(f) if isinstance(n, (ast.Import, ast.ImportFrom))}
        found = []
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                found += [(t, node.lineno, id(node) in local) for t in resolve(module, node)]
        out[module] = found
    return out


def test_every_module_is_in_a_layer():
    unplaced = []
    for module in MODULES:
        try:
            layer_of(module)
        except AssertionError:
            unplaced.append(module)
    assert not unplaced


def test_imports_never_run_up_the_layers():
    upward = []
    for module, targets in imports().items():
        for target, line, _ in targets:
            if target != module and layer_of(target) > layer_of(module):
                upward.append(f"{MODULES[module].relative_to(ROOT)}:{line}: {module} ({LAYERS[layer_of(module)][0]}) "
                              f"imports {target} ({LAYERS[layer_of(target)][0]})")
    assert not upward, "\n".join(upward)


def test_no_import_circles():
    graph = {m: sorted({t for t, _, _ in targets if t in MODULES and t != m}) for m, targets in imports().items()}
    index, low, stack, on_stack, circles, counter = {}, {}, [], set(), [], [0]

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in graph:
        if v not in index:
            visit(v)
    assert not circles, circles


def test_function_local_imports_say_why():
    """A function-local import defers a heavy or optional dependency; a comment next to it (or the
    module's declared design) says so. Anything else belongs at the top of the module."""
    silent = []
    for module, path in MODULES.items():
        if module in DEFERRING_MODULES:
            continue
        lines = path.read_text(encoding="utf-8").splitlines()
        tree = ast.parse("\n".join(lines))
        for f in ast.walk(tree):
            if not isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)):
                continue
            for node in ast.walk(f):
                if isinstance(node, (ast.Import, ast.ImportFrom)):
                    window = lines[max(0, node.lineno - 4):node.end_lineno]
                    if not any("#" in line for line in window):
                        silent.append(f"{path.relative_to(ROOT)}:{node.lineno}: {ast.unparse(node)}")
    assert not silent, "\n".join(silent)


def test_the_layer_test_sees_real_edges():
    """The parser finds known edges (a test that found none would pass vacuously)."""
    edges = {(m, t) for m, targets in imports().items() for t, _, _ in targets}
    assert ("surgeon.apply", "surgeon.train.trainer") in edges
    assert ("surgeon.recipe.schema", "surgeon.methods.registry") in edges
    assert ("surgeon.methods.lora.method", "surgeon.methods.lowrank") in edges  # absolute
    assert ("surgeon.recipe.recipe", "surgeon.recipe.checks") in edges           # relative
    assert layer_of("surgeon.methods.lora") < layer_of("surgeon.methods.lora.method")
