# The two commands of README.md: `make demo` and `make test`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.xrdscale-installed
DEMO_DIR ?= demo-beamtime
PYTEST_ARGS ?=

.PHONY: demo test lint install bench clean

$(PY):
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip

$(STAMP): $(PY) pyproject.toml constraints.txt
	$(PY) -m pip install torch==2.13.0
	$(PY) -m pip install -c constraints.txt -e ".[dev]"
	touch $(STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/xrdscale demo $(DEMO_DIR)

test: $(STAMP) lint
	$(PY) -m pytest $(PYTEST_ARGS)

# ruff (style, import order, absolute imports) and mypy (types) on the package
lint: $(STAMP)
	$(VENV)/bin/ruff check xrdscale
	$(VENV)/bin/mypy

bench: $(STAMP)
	$(PY) -m pip install -c constraints.txt -e ".[bench]"
	for b in benchmarks/*.py; do $(PY) $$b --quick || exit 1; done

clean:
	rm -rf $(VENV) $(DEMO_DIR) .pytest_cache
