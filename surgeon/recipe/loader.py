"""Reading recipes: YAML with source locations, ``extends``, and ``--set`` overrides.

Every value keeps where it came from (``file:line:col`` or ``--set key=value``) so that a
later check can point the user at the exact line. Nothing here knows the schema.
"""
from __future__ import annotations

import copy
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from surgeon.errors import UserError
from surgeon.resources import builtin_recipes

# A recipe is a few hundred nodes; anything past this is an alias bomb ("billion laughs").
MAX_NODES = 20_000
MAX_EXTENDS_DEPTH = 16
# A recipe nests a handful of levels (surgery.0.experts.sparse); anything deeper is not a recipe,
# and refusing it here keeps everything downstream (validation, merging, copying) from recursing
# without bound.
MAX_DEPTH = 64

_MERGE_TAG = "tag:yaml.org,2002:merge"
_VALUE_TAG = "tag:yaml.org,2002:value"

Path_ = tuple  # a field path such as ("surgery", 0, "adapter", "bottleneck")


class RecipeLoader(yaml.SafeLoader):
    """SafeLoader that also reads ``1e-4`` as a float (YAML 1.2), as users write learning rates."""


RecipeLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


@dataclass
class RawRecipe:
    """A recipe before schema validation.

    Attributes:
        data: the merged mapping (after extends and overrides).
        origin: field path -> where it was written (``file:line:col`` or ``--set ...``).
        source: the file the user named (or ``<dict>``).
    """

    data: dict
    origin: dict[Path_, str] = field(default_factory=dict)
    source: str = "<dict>"

    def where(self, path: Path_) -> str:
        """Location of ``path`` or of its closest ancestor that has one."""
        path = tuple(path)
        while path:
            if path in self.origin:
                return self.origin[path]
            path = path[:-1]
        return self.origin.get((), self.source)


def _mark(file: str, node: yaml.Node) -> str:
    return f"{file}:{node.start_mark.line + 1}:{node.start_mark.column + 1}"


class _Builder:
    """Turns a composed YAML node graph into Python objects, recording each node's location."""

    def __init__(self, file: str):
        self.file = file
        self.count = 0
        self.origin: dict[Path_, str] = {}
        self._scalar = RecipeLoader("")  # only its scalar constructors are used
        self._resolved: dict[int, list | None] = {}  # id(mapping node) -> its resolved pairs

    def build(self, node: yaml.Node, path: Path_ = ()) -> Any:
        self.count += 1
        if self.count > MAX_NODES:
            raise UserError(
                f"the YAML expands to more than {MAX_NODES} values (alias bomb?)",
                where=self.file,
                hint="recipes are small; remove recursive or repeated anchors (&a / *a)",
            )
        if len(path) > MAX_DEPTH:
            raise UserError(f"the YAML nests deeper than {MAX_DEPTH} levels", where=_mark(self.file, node),
                            hint="a recipe nests a few levels; remove the runaway brackets or indentation")
        self.origin[path] = _mark(self.file, node)
        if isinstance(node, yaml.MappingNode):
            out: dict = {}
            for key, value_node in self._mapping_pairs(node):
                out[key] = self.build(value_node, path + (key,))
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(item, path + (i,)) for i, item in enumerate(node.value)]
        return self._scalar.construct_object(node)

    def _key(self, key_node: yaml.Node) -> str:
        if isinstance(key_node, yaml.ScalarNode) and key_node.tag == _VALUE_TAG:
            return "="  # the `=` key, which PyYAML would otherwise refuse to construct
        key = self._scalar.construct_object(key_node) if isinstance(key_node, yaml.ScalarNode) else None
        if not isinstance(key, (str, int, float, bool)) or key is None:
            raise UserError("mapping keys must be plain scalars", where=_mark(self.file, key_node))
        return str(key)

    def _mapping_pairs(self, node: yaml.MappingNode) -> list[tuple[str, yaml.Node]]:
        """(key, value node) pairs of a mapping with its ``<<`` merge keys resolved.

        YAML's merge-key rule, written here because PyYAML's ``flatten_mapping`` orders
        ``<<: [*a, *b]`` differently across releases (6.0.1 vs 6.0.4): an own key overrides a
        merged one, of several merged mappings the first wins, and an own key written twice is
        a mistake. Merged pairs come first, as PyYAML puts them. Each node is resolved once
        (memoised), so nested merges cannot blow up, and a mapping merging itself is refused.
        """
        if id(node) in self._resolved:
            pairs = self._resolved[id(node)]
            if pairs is None:
                raise UserError("a mapping merges itself (<<: through its own anchor)",
                                where=_mark(self.file, node), hint="merge another anchor, not the enclosing one")
            return pairs
        self._resolved[id(node)] = None  # in progress: a cycle meets this marker
        own: list[tuple[str, yaml.Node]] = []
        merged: list[tuple[str, yaml.Node]] = []
        own_keys: set[str] = set()
        for key_node, value_node in node.value:
            if key_node.tag != _MERGE_TAG:
                key = self._key(key_node)
                if key in own_keys:
                    raise UserError(f"duplicate key '{key}'", where=_mark(self.file, key_node),
                                    hint="each key may appear once per mapping")
                own_keys.add(key)
                own.append((key, value_node))
                continue
            sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
            for source in sources:
                if not isinstance(source, yaml.MappingNode):
                    raise UserError("a merge key (<<) takes a mapping or a list of mappings",
                                    where=_mark(self.file, source), hint="write `<<: *anchor` or `<<: [*a, *b]`")
                merged.extend(self._mapping_pairs(source))
        taken = set(own_keys)
        pairs = []
        for key, value_node in merged:
            if key not in taken:
                taken.add(key)
                pairs.append((key, value_node))
        pairs.extend(own)
        self._resolved[id(node)] = pairs
        return pairs


def parse_yaml_text(text: str, file: str) -> tuple[Any, dict[Path_, str]]:
    """Parse one YAML document into Python data plus a path -> location map.

    Raises:
        UserError: not YAML, several documents, or too large an expansion.
    """
    try:
        node = yaml.compose(text, Loader=RecipeLoader)
    except RecursionError:
        raise UserError("the YAML nests too deeply to be read", where=file,
                        hint="a recipe nests a few levels; remove the runaway brackets or indentation") from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark
        where = f"{file}:{mark.line + 1}:{mark.column + 1}" if mark else file
        raise UserError(f"not valid YAML: {exc.problem}", where=where,
                        hint="check indentation and quoting around this line") from None
    except yaml.YAMLError as exc:
        raise UserError(f"not valid YAML: {exc}", where=file) from None
    if node is None:
        return None, {}
    builder = _Builder(file)
    try:
        data = builder.build(node)
    except yaml.YAMLError as exc:
        raise UserError(f"not valid YAML: {exc}", where=file) from None
    except RecursionError:
        raise UserError("the YAML nests too deeply (recursive alias?)", where=file) from None
    return data, builder.origin


def _read_recipe_file(path: Path) -> tuple[dict, dict[Path_, str]]:
    shown = str(path)
    if not path.exists():
        raise UserError(f"recipe file not found: {shown}",
                        hint="check the path; `surgeon ls` lists the built-in recipes")
    if path.is_dir():
        raise UserError(f"{shown} is a directory, not a recipe file")
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"cannot read {shown}: {exc.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise UserError("not a text file (UTF-8 expected)", where=shown,
                        hint="a recipe is a YAML text file") from None
    data, origin = parse_yaml_text(text, shown)
    if data is None:
        raise UserError("the recipe is empty", where=shown,
                        hint="start from a built-in one: `surgeon cp mosa_hier my.yaml`")
    if not isinstance(data, dict):
        raise UserError(f"a recipe must be a mapping of fields, got a {type(data).__name__}",
                        where=origin.get((), shown),
                        hint="top-level keys are name, model, data, surgery, regularizers, train, eval")
    return data, origin


def resolve_recipe_path(ref: str, base_dir: Path | None = None) -> Path:
    """A recipe reference -> path: a file (relative to ``base_dir``) or a built-in name."""
    candidate = Path(ref).expanduser()
    if base_dir is not None and not candidate.is_absolute():
        candidate = base_dir / candidate
    if candidate.exists():
        return candidate
    builtins = builtin_recipes()
    name = Path(ref).stem if ref.endswith((".yaml", ".yml")) and "/" not in ref else ref
    if name in builtins:
        return builtins[name]
    return candidate


def deep_merge(base: dict, child: dict) -> dict:
    """Child wins; mappings merge recursively; lists and scalars are replaced."""
    out = copy.deepcopy(base)
    for key, value in child.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def _prefix_origin(origin: dict, prefix: Path_) -> dict:
    return {prefix + k: v for k, v in origin.items()}


def read_recipe(path: str | Path, *, _chain: tuple[Path, ...] = ()) -> RawRecipe:
    """Read a recipe file and everything it ``extends``.

    Raises:
        UserError: missing/unreadable/non-YAML file, a non-mapping recipe, a missing parent,
            or an ``extends`` cycle.
    """
    path = Path(path)
    data, origin = _read_recipe_file(path)
    parent_ref = data.pop("extends", None)
    if parent_ref is None:
        return RawRecipe(data, origin, str(path))
    where = origin.get(("extends",), str(path))
    if not isinstance(parent_ref, str) or not parent_ref:
        raise UserError("extends must be a recipe path or built-in name", where=where)
    parent_path = resolve_recipe_path(parent_ref, path.parent)
    if not parent_path.exists():
        raise UserError(f"extends '{parent_ref}': no such file ({parent_path}) and no built-in recipe of that name",
                        where=where, hint="paths are relative to the recipe that extends; `surgeon ls` lists built-ins")
    chain = _chain + (path.resolve(),)
    if parent_path.resolve() in chain:
        cycle = " -> ".join(str(p) for p in chain + (parent_path.resolve(),))
        raise UserError(f"extends cycle: {cycle}", where=where, hint="a recipe cannot extend itself, even indirectly")
    if len(chain) > MAX_EXTENDS_DEPTH:
        raise UserError(f"extends chain deeper than {MAX_EXTENDS_DEPTH}", where=where)
    parent = read_recipe(parent_path, _chain=chain)
    merged = deep_merge(parent.data, data)
    # Locations: the parent's, replaced by the child's for every path the child wrote.
    merged_origin = dict(parent.origin)
    for key in data:
        for p in [p for p in merged_origin if p[:1] == (key,)]:
            if not isinstance(data[key], dict):
                del merged_origin[p]
    merged_origin.update(origin)
    return RawRecipe(merged, merged_origin, str(path))


# ----------------------------------------------------------------------------- overrides

def parse_override(text: str) -> tuple[str, Path_, Any]:
    """``a.b=value`` -> ("set", path, yaml value); ``~a.b`` -> ("del", path, None).

    List items are addressed by index: ``surgery.0.adapter.bottleneck=32``.
    """
    text = text.strip()
    if text.startswith("~"):
        key, op, value = text[1:], "del", None
        if "=" in key:
            raise UserError(f"bad --set '{text}': '~KEY' removes a key and takes no value",
                            hint="use --set KEY=VALUE to set, --set ~KEY to remove")
    else:
        if "=" not in text:
            raise UserError(f"bad --set '{text}': expected KEY=VALUE", hint="e.g. --set train.epochs=10")
        key, raw = text.split("=", 1)
        op = "set"
        try:
            value = yaml.load(raw, Loader=RecipeLoader) if raw.strip() else ""
        except RecursionError:
            raise UserError(f"bad --set '{text[:80]}{'...' if len(text) > 80 else ''}': the value nests too deeply",
                            hint="a recipe value nests a few levels") from None
        except yaml.YAMLError as exc:
            value = raw.strip()
            if value[:1] in ("*", "&"):
                # A glob such as **.blocks.*.mlp: YAML reads a leading * as an alias (& as an
                # anchor). Quotes typed without outer single quotes are eaten by the shell.
                hint = (f"YAML reads a value starting with '{value[0]}' as an alias/anchor, so a glob must be a "
                        f"quoted YAML string, and the shell removes quotes (and may expand the glob) unless the "
                        f"whole option is in single quotes: --set '{key.strip()}=\"{value}\"'")
            else:
                hint = "quote strings that contain ':' or '#', e.g. --set name='\"a: b\"'"
            raise UserError(f"bad --set '{text}': the value is not valid YAML ({getattr(exc, 'problem', exc)})",
                            hint=hint) from None
    key = key.strip()
    parts = key.split(".")
    if not key or any(not p for p in parts):
        raise UserError(f"bad --set '{text}': empty key segment", hint="keys look like train.batch_size")
    if len(parts) + _depth(value) > MAX_DEPTH:
        raise UserError(f"bad --set '{text[:80]}{'...' if len(text) > 80 else ''}': it nests deeper than "
                        f"{MAX_DEPTH} levels", hint="a recipe value nests a few levels")
    path = tuple(int(p) if p.isdigit() else p for p in parts)
    return op, path, value


def _depth(value) -> int:
    """Nesting depth of plain data (0 for a scalar), without recursion."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        node, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth <= MAX_DEPTH:
            children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
            stack.extend((child, depth + 1) for child in children)
    return deepest


def apply_overrides(recipe: RawRecipe, overrides: dict[str, Any] | list[str] | None) -> RawRecipe:
    """Apply ``--set`` style overrides (a list of strings) or a ``{"a.b": value}`` dict."""
    if not overrides:
        return recipe
    if isinstance(overrides, dict):
        items = []
        for key, value in overrides.items():
            if key.startswith("~"):
                items.append(("del", parse_override(key)[1], None, key))
            else:
                items.append(("set", parse_override(f"{key}=x")[1], value, f"{key}={value!r}"))
    else:
        items = [(*parse_override(t), t) for t in overrides]
    data = copy.deepcopy(recipe.data)
    origin = dict(recipe.origin)
    for op, path, value, text in items:
        label = f"--set {text}"
        node = data
        for i, part in enumerate(path[:-1]):
            if isinstance(node, list):
                if not isinstance(part, int) or part >= len(node):
                    raise UserError(f"bad --set '{text}': {'.'.join(map(str, path[:i + 1]))} is not an item of the list "
                                    f"(it has {len(node)} items)", where=label)
                node = node[part]
            else:
                if isinstance(part, int):
                    part = str(part)
                if part not in node or not isinstance(node[part], (dict, list)):
                    if op == "del":
                        break
                    if node.get(part) is not None:
                        # `--set name.x=1` where name is a string: the mistake is the override's,
                        # not the recipe's (a schema error would point at the recipe's line).
                        dotted = ".".join(map(str, path[:i + 1]))
                        raise UserError(f"bad --set '{text}': {dotted} is {node[part]!r}, not a mapping, so it has "
                                        f"no field {path[i + 1]!r}", where=label,
                                        hint=f"set {dotted} itself (--set {dotted}=VALUE), or check the key's spelling")
                    node[part] = {}
                    origin[tuple(path[:i + 1])] = label
                node = node[part]
        else:
            last = path[-1]
            if isinstance(node, list):
                if not isinstance(last, int) or last > len(node) or (op == "del" and last >= len(node)):
                    raise UserError(f"bad --set '{text}': no list item {last} (the list has {len(node)} items)")
                if op == "del":
                    node.pop(last)
                elif last == len(node):
                    node.append(value)
                else:
                    node[last] = value
            elif isinstance(node, dict):
                key = str(last)
                if op == "del":
                    node.pop(key, None)
                else:
                    node[key] = value
            else:
                raise UserError(f"bad --set '{text}': the parent is a {type(node).__name__}, not a mapping",
                                where=label)
            for p in [p for p in origin if p[:len(path)] == tuple(path)]:
                del origin[p]
            if op == "set":
                origin[tuple(path)] = label
    return RawRecipe(data, origin, recipe.source)
