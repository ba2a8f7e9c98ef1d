"""Selectors: which modules a rule targets, by dotted module name.

Globs: ``*`` one name segment, ``**`` any number of segments (none included), ``{a,b}``
alternatives, ``{0..5}`` an inclusive integer range. ``re:PATTERN`` is a full-match regex.
``**.blocks.*.mlp`` finds every transformer block's MLP in ViT/DeiT/EVA/BEiT (``blocks.3.mlp``),
Swin (``layers.1.blocks.0.mlp``) and ConvNeXt (``stages.2.blocks.4.mlp``).
"""
from __future__ import annotations

import re
from functools import lru_cache

import torch.nn as nn

from surgeon.errors import UserError


def _brace(body: str, pattern: str) -> str:
    m = re.fullmatch(r"(\d+)\.\.(\d+)", body)
    if m:
        lo, hi = int(m.group(1)), int(m.group(2))
        if lo > hi:
            raise UserError(f"selector '{pattern}': empty range {{{body}}}", hint="write {low..high}, low <= high")
        return int_range_regex(lo, hi)
    return "(?:" + "|".join(re.escape(alt) for alt in body.split(",")) + ")"


def int_range_regex(lo: int, hi: int) -> str:
    """A regex matching the decimal integers ``lo..hi`` (no leading zeros), of size O(digits):
    ``{0..300000000}`` compiles to a few alternatives, not 300 million of them."""
    parts, digits = [], len(str(lo))
    while lo <= hi:
        top = min(hi, 10 ** digits - 1)  # the largest number with this many digits
        parts += _same_length_range(str(lo), str(top))
        lo, digits = top + 1, digits + 1
    return "(?:" + "|".join(parts) + ")"


def _same_length_range(a: str, b: str) -> list[str]:
    """Regexes for the digit strings ``a..b`` of one length (``a <= b``)."""
    i = 0
    while i < len(a) and a[i] == b[i]:
        i += 1
    prefix, a, b = a[:i], a[i:], b[i:]
    if not a:
        return [prefix]
    if len(a) == 1:
        return [f"{prefix}[{a}-{b}]"]
    rest = len(a) - 1
    out = []
    first = a[0]
    if a[1:] != "0" * rest:  # a's own block is partial: a[0] followed by a[1:]..9...9
        out += [prefix + a[0] + r for r in _same_length_range(a[1:], "9" * rest)]
        first = str(int(a[0]) + 1)
    last = b[0] if b[1:] == "9" * rest else str(int(b[0]) - 1)
    if first <= last:
        out.append(f"{prefix}[{first}-{last}][0-9]{{{rest}}}")
    if b[1:] != "9" * rest:  # b's block is partial: b[0] followed by 0...0..b[1:]
        out += [prefix + b[0] + r for r in _same_length_range("0" * rest, b[1:])]
    return out


@lru_cache(maxsize=256)
def compile_selector(pattern: str) -> re.Pattern:
    """Compile one selector to a full-match regex over dotted module names."""
    if pattern.startswith("re:"):
        try:
            return re.compile(pattern[3:])
        except re.error as exc:
            raise UserError(f"selector '{pattern}': invalid regular expression ({exc})") from None
    out, i = [], 0
    while i < len(pattern):
        if pattern.startswith("**.", i):
            out.append(r"(?:[^.]+\.)*")
            i += 3
        elif pattern.startswith("**", i):
            out.append(r".*")
            i += 2
        elif pattern[i] == "*":
            out.append(r"[^.]*")
            i += 1
        elif pattern[i] == "?":
            out.append(r"[^.]")
            i += 1
        elif pattern[i] == "{":
            end = pattern.find("}", i)
            if end < 0:
                raise UserError(f"selector '{pattern}': unclosed '{{'")
            out.append(_brace(pattern[i + 1:end], pattern))
            i = end + 1
        else:
            out.append(re.escape(pattern[i]))
            i += 1
    return re.compile("".join(out))


def select_modules(model: nn.Module, selector: str | list[str]) -> list[str]:
    """Names of the modules matched by ``selector`` (a pattern or a list of them), in model order."""
    patterns = [selector] if isinstance(selector, str) else list(selector)
    regexes = [compile_selector(p) for p in patterns]
    # The root module ("") is matched only by patterns that match the empty name, i.e. ``**``.
    return [name for name, _ in model.named_modules() if any(r.fullmatch(name) for r in regexes)]
