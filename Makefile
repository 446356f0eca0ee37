# Every target installs what it needs first (scripts/bootstrap.sh is idempotent).
VENV ?= .venv
PY := $(VENV)/bin/python
export VENV
# Tools installed in the venv (ansible-inventory for the inventory tests) must be on PATH.
export PATH := $(CURDIR)/$(VENV)/bin:$(PATH)

.PHONY: help deps test test-runtime test-faults test-molecule lint demo cluster-demo cluster-down \
        bench bench-smoke

help:
	@echo "make test          every test: lint, unit, integration, faults, bench smoke, Molecule"
	@echo "make test-runtime  the runtime's unit and integration tests only (fast)"
	@echo "make demo          local demo: redis-server, two workers, examples/, live progress"
	@echo "make cluster-demo  three-container cluster: site.yml, submit.yml, progress, results"
	@echo "make bench         full-size benchmarks against GNU parallel and xargs"

deps:
	scripts/bootstrap.sh

lint: deps
	$(PY) -m ruff check distcomp tests bench cloudlab inventory

test-runtime: deps
	$(PY) -m pytest -q tests --ignore=tests/faults --ignore=tests/molecule

test-faults: deps
	$(PY) -m pytest -q tests/faults

test-molecule:
	tests/molecule/run.sh

test: lint
	$(PY) -m pytest -q tests --ignore=tests/molecule
	tests/molecule/run.sh

demo:
	scripts/demo.sh

cluster-demo:
	scripts/cluster-demo.sh

cluster-down:
	tests/cluster/down.sh

bench: deps
	$(PY) bench/run_all.py

bench-smoke: deps
	$(PY) bench/run_all.py --smoke
