# Everything a fresh clone needs: `make demo` runs the main job, `make test` the whole suite.
# Both build the virtual environment in .venv first (Python 3.11); the local Kafka and
# PostgreSQL are started by the commands themselves.

PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed-stamp

.PHONY: demo test unit up down env clean bench

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/reconciler demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest

unit: $(STAMP)
	$(VENV)/bin/python -m pytest tests/unit

up: $(STAMP)
	$(VENV)/bin/reconciler dev up

down: $(STAMP)
	$(VENV)/bin/reconciler dev down

env: $(STAMP)
	$(VENV)/bin/reconciler dev env

# The churn test, longer: 5000 random changes with three instances killed and restarted on
# the way; prints what it did (operations, kills, events by kind, overlaps, convergence).
.PHONY: chaos
chaos: $(STAMP)
	CHAOS_OPERATIONS=5000 CHAOS_ROUNDS=3 $(VENV)/bin/python -m pytest \
		tests/integration/test_churn.py -k churn_over -s

# The benchmark on a Kafka and PostgreSQL of its own ports (.stack-bench/), stopped at the
# end; `make bench BENCH_ARGS=--quick` for a smoke run. Prints a table, writes
# bench/results/<timestamp>.json.
BENCH_STAMP := $(VENV)/.bench-stamp
BENCH_ARGS ?=

$(BENCH_STAMP): $(STAMP) bench/requirements.txt
	$(VENV)/bin/pip install --quiet --disable-pip-version-check -r bench/requirements.txt
	touch $(BENCH_STAMP)

bench: $(BENCH_STAMP)
	$(VENV)/bin/python -m bench $(BENCH_ARGS)

clean: down
	rm -rf $(VENV) .stack .stack-secure-* .stack-bench
