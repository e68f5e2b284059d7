# The two commands of the README: `make demo` and `make test`. Both create ./.venv on first use.
PYTHON ?= python3
VENV ?= .venv
# The CPU build of torch. Where no torch is installed yet, install this first, so that the
# package's torch requirement (pyproject.toml) does not pull a multi-GB CUDA build. Override for a GPU:
#   make TORCH_SPEC='torch==2.13.0' PIP_TORCH_ARGS='--index-url https://.../cu124' venv
TORCH_SPEC ?= torch==2.13.0
PIP_TORCH_ARGS ?=
PY := $(VENV)/bin/python

.PHONY: venv test lint demo clean-venv

$(VENV)/.installed: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -c 'import torch' 2>/dev/null || $(PY) -m pip install $(PIP_TORCH_ARGS) '$(TORCH_SPEC)'
	$(PY) -m pip install -e '.[test]'
	touch $@

venv: $(VENV)/.installed

# Style (ruff), the package boundaries (lint-imports: gmic imports no DICOM library,
# dicomnode or storage; storage no dicomnode, torch or gmic; dicomnode only storage's public
# API; [tool.importlinter], docs/architecture.md) and types
# (mypy: [tool.mypy] in pyproject.toml).
lint: venv
	$(VENV)/bin/ruff check dicomnode gmic storage tests
	$(VENV)/bin/lint-imports
	$(VENV)/bin/mypy

# Runs every test; tests needing dcmtk, dicom3tools, PixelMed, Orthanc or PostgreSQL are marked
# and run where those are installed (.ci/run installs them and requires them).
test: venv lint
	$(VENV)/bin/pytest $(PYTEST_ARGS)

# The node end to end on 127.0.0.1: a synthetic study in over DICOM, SR/SEG/Parametric Maps
# back, a summary and PNG overlays in ./demo-out. Other weights: make demo DEMO_ARGS='--model-dir DIR'
demo: venv
	$(VENV)/bin/dicomnode demo --out ./demo-out $(DEMO_ARGS)
