# Quick start on a fresh machine: `make train` (main job) and `make test` (test suite).
# Each target builds its own virtual environment in .venv first.
# TORCH picks the PyTorch build; on a GPU machine use e.g. TORCH="torch==2.11.*".
PYTHON ?= python3
VENV ?= .venv
TORCH ?= torch==2.13.0
PY := $(VENV)/bin/python

.PHONY: train test bench clean

# torch goes in first, then the package without build isolation, so that setup.py can compile the C++
# extension in csrc/ against that torch (with ninja, when a C++ compiler is present).
$(VENV)/.installed: setup.py $(wildcard csrc/*.cpp csrc/*.cu csrc/*.h)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel ninja
	$(PY) -m pip install -q "$(TORCH)"
	PATH="$(abspath $(VENV))/bin:$$PATH" $(PY) -m pip install -q --no-build-isolation -e ".[test]"
	touch $@

train: $(VENV)/.installed
	$(VENV)/bin/imbsam-fast train

test: $(VENV)/.installed
	$(VENV)/bin/ruff check .
	IMBSAM_FAST_REQUIRE_EXT=$$(command -v c++ >/dev/null && echo 1 || echo 0) $(PY) -m pytest -q

bench: $(VENV)/.installed
	$(PY) benchmarks/optimizer_overhead.py
	$(PY) benchmarks/step_time.py
	$(PY) benchmarks/fidelity.py
	$(PY) benchmarks/digits_accuracy.py

clean:
	rm -rf $(VENV) build *.egg-info
