# Two set-up-and-run commands, both idempotent: `make train` and `make test`.
# Each creates/updates .venv/, installs torch first (CPU build here, GPU users get their build),
# then the project in editable mode. A second run skips installs whose inputs did not change.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TORCH_VERSION ?= 2.13.0

.PHONY: setup train single-turn evaluate test lint bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

setup: $(STAMP)

train: setup
	$(PY) train/multi_turn.py $(ARGS)

single-turn: setup
	$(PY) train/single_turn.py $(ARGS)

evaluate: setup
	$(PY) train/evaluate.py $(ARGS)

test: setup
	$(PY) -m pytest -q $(ARGS)

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

bench: setup
	for b in bench/*.py; do $(PY) $$b || exit 1; done

clean:
	rm -rf $(VENV) .pytest_cache
