# celery-mutex-bootstep: install, test, demo, benchmarks.
# Everything runs from a virtualenv in .venv, (re)built only when setup.py changes.

PYTHON3 ?= python3
VENV    := .venv
PY      := $(VENV)/bin/python
STAMP   := $(VENV)/.installed
# The demo extra (matplotlib...) on top: only `make demo` needs it.
DEMO_STAMP := $(VENV)/.installed-demo

.PHONY: all install zookeeper venv test faults unit compat demo bench bench-trace chaos clean

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

# After $(STAMP), which may have just rebuilt the virtualenv; setup.py may change the extra.
$(DEMO_STAMP): $(STAMP) setup.py
	$(VENV)/bin/pip install -q -e '.[test,demo]'
	touch $@

# Everything but the fault-injection modules (marked faults), which `make faults` runs:
# each stays under about 15 minutes; CI (.ci/run) runs both.
test: install
	$(PY) -m pytest -q --durations=15 -m 'not faults' tests integration

faults: install
	$(PY) -m pytest -q --durations=10 -m faults integration

# The oldest and a middle supported Celery/kombu/kazoo (the newest is `make test`'s).
COMPAT ?= 5.3.6:5.3.7:2.9.0 5.5.3:5.5.4:2.10.0

compat: install
	sh scripts/compat.sh $(COMPAT)

unit: venv
	$(PY) -m pytest -q tests

# The local RabbitMQ and Redis are started first when they do not run (and left running).
demo: install $(DEMO_STAMP)
	$(PY) -c 'from integration import brokers; brokers.ensure_rabbitmq(); brokers.ensure_redis()'
	$(PY) -m examples.demo

# `make bench CELERY=5.5.3` runs them on that compat virtualenv (`make compat` builds it);
# BENCH_ARGS=--quick for the smoke run.
bench: install
	$(if $(CELERY),.venv-compat/celery-$(CELERY)/bin/python,$(PY)) -m bench.run $(BENCH_ARGS)

# Rows 2c/2d with the hand-over path timestamped (bench/tracing/), then where each
# handover's milliseconds go (bench/handover_trace.py); the trace stays in bench-trace/.
bench-trace: install
	rm -rf bench-trace && mkdir bench-trace
	MUTEX_TRACE=$(CURDIR)/bench-trace PYTHONPATH=$(CURDIR)/bench/tracing $(PY) -m bench.run --rows 2c --out bench-trace/results.md
	$(PY) -m bench.handover_trace bench-trace

# Long chaos scenarios (tests marked chaos_full, skipped by `make test`).
chaos: install
	$(PY) -m pytest -q integration -m chaos_full --run-chaos-full

clean:
	rm -rf $(VENV) .venv-compat build dist .pytest_cache .hypothesis *.egg-info
	find . -name __pycache__ -type d -prune -exec rm -rf {} +
