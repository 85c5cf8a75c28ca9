# Two commands from a fresh clone: `make demo` and `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: setup demo test lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml setup.py $(wildcard src/tritium/kernels/csrc/*)
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q torch==2.13.0 || $(PY) -m pip install -q "torch>=2.4"
	$(PY) -m pip install -q -e ".[all,dev]"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/tritium demo

lint: setup
	$(VENV)/bin/ruff check src tests

test: lint
	$(VENV)/bin/pytest

clean:
	rm -rf $(VENV) build src/*.egg-info src/tritium/kernels/*.so
