# Two set-up commands that work on a fresh machine with only Python 3.11+ and pip:
#   make run    create .venv if missing, install dgemma, run `dgemma run` on the bundled default model
#   make test   create .venv if missing, install dgemma with its test dependencies, run the whole suite
#   make serve  create .venv if missing, install dgemma with the server extra, run `dgemma serve` (playground at /)
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PROMPT ?= Why is the sky blue?
# Pinned torch first: an unpinned requirement with no torch installed would pull a multi-GB CUDA build.
TORCH ?= torch==2.13.0

.PHONY: run serve test install install-test chromium lint clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip

$(VENV)/.torch: | $(PY)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	touch $@

$(VENV)/.installed: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -q -e ".[serve]"
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.torch
	$(PY) -m pip install -q -e ".[test]"
	touch $@ $(VENV)/.installed

install: $(VENV)/.installed

install-test: $(VENV)/.installed-test

run: install
	$(VENV)/bin/dgemma run "$(PROMPT)"

serve: install
	$(VENV)/bin/dgemma serve

# The playground test drives Debian's chromium with playwright (no browser download); install it when missing.
chromium:
	@command -v chromium >/dev/null 2>&1 || { [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 && \
		apt-get update -q && DEBIAN_FRONTEND=noninteractive apt-get install -y -q chromium; } || \
		echo "make: chromium is not installed and could not be (apt-get install chromium as root): the playground test will be skipped"

test: install-test chromium
	$(VENV)/bin/ruff check dgemma tests scripts
	$(PY) -m pytest -q

lint: install-test
	$(VENV)/bin/ruff check dgemma tests scripts

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
