# The README's two commands: `make demo` (the main job end to end on the default corpus) and
# `make test` (the test suite). Both create or refresh the virtualenv in $(VENV) by themselves.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.lmforge-installed
# The CPU wheel on these machines; on a GPU box keep the torch you have: make TORCH_SPEC=torch
TORCH_SPEC ?= torch==2.13.0
PYTEST_ARGS ?=

.PHONY: demo test env

env: $(STAMP)

$(STAMP): setup.py
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -c 'import torch' 2>/dev/null || $(PY) -m pip install -q '$(TORCH_SPEC)'
	DS_BUILD_OPS=0 $(PY) -m pip install -q --no-build-isolation -e '.[test,eval,fp8]'
	if command -v mpicc >/dev/null; then $(PY) -m pip install -q mpi4py; fi
	touch $(STAMP)

# DeepSpeed JIT-builds its ops (CPU Adam: minutes) into TORCH_EXTENSIONS_DIR, by default one folder in
# the home directory for every virtualenv, so two checkouts with different torch builds rebuild each
# other's ops. The op cache goes with the virtualenv instead (set it yourself to share one).
TORCH_EXTENSIONS_DIR ?= $(abspath $(VENV))/torch_extensions
export TORCH_EXTENSIONS_DIR

demo: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" bash launch/demo.sh

test: $(STAMP)
	PATH="$(CURDIR)/$(VENV)/bin:$$PATH" $(PY) -m pytest -q $(PYTEST_ARGS)
