"""The dependency policy of pyproject.toml: every dependency has a lower bound, the lower bounds
are exactly what `make test-oldest` installs, and CI runs the newest and the oldest sets."""
from __future__ import annotations

import re
import tomllib

from .helpers import ROOT


def _requirements() -> dict[str, str]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = project["dependencies"] + project["optional-dependencies"]["dev"]
    out = {}
    for req in reqs:
        m = re.fullmatch(r"([A-Za-z0-9_.-]+)>=([0-9][0-9A-Za-z.]*)", req)
        assert m, f"{req!r}: every dependency has a lower bound (and an upper one only with a reason)"
        out[m.group(1).lower()] = m.group(2)
    return out


def test_lower_bounds_are_the_oldest_constraints():
    pins = {}
    for line in (ROOT / ".ci" / "oldest-constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, version = line.split("==")
            pins[name.strip().lower()] = version.strip()
    assert pins == _requirements()


def test_ci_runs_the_readme_tests_then_latest_and_oldest():
    steps = [line.strip() for line in (ROOT / ".ci" / "run").read_text().splitlines()
             if line.strip().startswith("make ")]
    assert steps == ["make test", "make test-latest", "make test-oldest"]
    makefile = (ROOT / "Makefile").read_text()
    assert "--upgrade --upgrade-strategy eager" in makefile and "-c .ci/oldest-constraints.txt" in makefile
