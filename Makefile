# Two set-up commands that work on a fresh machine with only Python 3.11+ and pip:
#   make run    create .venv if missing, install dgemma, run `dgemma run` on the bundled default model
#   make test   create .venv if missing, install dgemma with its test dependencies, run the whole suite
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= Why is the sky blue?
# Pinned torch first: an unpinned requirement with no torch installed would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: run test install install-test lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -q -e ".[test]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

run: install
	$(VENV)/bin/dgemma run "$(PROMPT)"

test: install-test
	$(VENV)/bin/ruff check dgemma tests scripts
	$(PY) -m pytest -q

lint: install-test
	$(VENV)/bin/ruff check dgemma tests scripts

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
