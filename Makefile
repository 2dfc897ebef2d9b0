# celery-mutex-bootstep: install, test, demo, benchmarks.
# Everything runs from a virtualenv in .venv, (re)built only when setup.py changes.

PYTHON3 ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed

.PHONY: all install zookeeper venv test unit demo bench chaos clean

all: test

install: zookeeper venv

zookeeper:
	sh scripts/ensure-zookeeper.sh

venv: $(STAMP)

# A stamp file, not the directory: its mtime only moves when pip install succeeded.
$(STAMP): setup.py
	$(PYTHON3) -m venv $(VENV)
	$(VENV)/bin/pip install -q -e '.[test]'
	touch $@

test: install
	$(PY) -m pytest -q tests integration

unit: venv
	$(PY) -m pytest -q tests

demo: install
	$(PY) -m integration.demo

bench: install
	$(PY) -m bench.run

# Long chaos scenarios (tests marked chaos_full, skipped by `make test`).
chaos: install
	$(PY) -m pytest -q integration -m chaos_full --run-chaos-full

clean:
	rm -rf $(VENV) build dist .pytest_cache .hypothesis *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
