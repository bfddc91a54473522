# Quick start on a fresh machine: `make train` (main job) and `make test` (test suite).
# Each target builds its own virtual environment in .venv first.
# TORCH picks the PyTorch build; on a GPU machine use e.g. TORCH="torch==2.11.*".
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: train test bench clean

$(VENV)/.installed: setup.py
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[test]"
	touch $@

train: $(VENV)/.installed
	$(VENV)/bin/imbsam-fast train

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) benchmarks/optimizer_overhead.py
	$(PY) benchmarks/step_time.py
	$(PY) benchmarks/fidelity.py
	$(PY) benchmarks/digits_accuracy.py

clean:
	rm -rf $(VENV) build *.egg-info
