# The two commands of the README: `make demo` and `make test`.
# Both create (or reuse) .venv and install surgeon into it; nothing is downloaded but packages.
# `make test-latest` / `make test-oldest` run the tests against the newest releases pip resolves
# and against the lower bounds of pyproject.toml (.ci/run runs both after `make test`).
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

# torch/torchvision: the pair these machines carry on local disk (the only one installable here)
TORCH  := "torch==2.14.1" "torchvision==0.29.1"

.PHONY: demo test test-latest test-oldest install bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	# torch/torchvision first, pinned to the pair these machines carry on local disk
	$(PY) -m pip install -q $(TORCH) || $(PY) -m pip install -q torch torchvision
	$(PY) -m pip install -q -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/surgeon demo

test: $(STAMP)
	$(PY) -m pytest -q

# The newest release of every dependency (torch/torchvision stay on the local pair), upgraded on
# every call: a release that breaks surgeon fails here, in CI, before a user meets it.
test-latest:
	test -x .venv-latest/bin/python || $(PYTHON) -m venv .venv-latest
	.venv-latest/bin/python -m pip install -q --upgrade pip
	.venv-latest/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[dev]" $(TORCH)
	.venv-latest/bin/python -m pip list --format=freeze | grep -iE '^(timm|typer|click|rich|jsonschema|pyyaml|safetensors|numpy|pillow|matplotlib|scikit-learn|pytest|optuna|tensorboard)=='
	.venv-latest/bin/python -m pytest -q

# Exactly the lower bounds of pyproject.toml (.ci/oldest-constraints.txt): they are tested, not guessed.
test-oldest:
	test -x .venv-oldest/bin/python || $(PYTHON) -m venv .venv-oldest
	.venv-oldest/bin/python -m pip install -q --upgrade pip
	.venv-oldest/bin/python -m pip install -q -c .ci/oldest-constraints.txt -e ".[dev]"
	.venv-oldest/bin/python -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench.py

clean:
	rm -rf $(VENV) .venv-latest .venv-oldest runs .pytest_cache
