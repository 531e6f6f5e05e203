# Two commands on a fresh machine: `make quickstart` and `make test`. Targets are idempotent:
# the install step is skipped while .venv/.stamp-install is newer than pyproject.toml.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp-install
PYTEST_ARGS ?=
# Tests skipped on a complete install (README.md, "Tests and benchmarks"): every dependency a test
# needs is installed here, so a skip means a broken install, and the run fails on any other count.
EXPECTED_SKIPS := 0

.PHONY: install quickstart test test-fast lint bench clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -e '.[test,tpu]'
	touch $(STAMP)

install: $(STAMP)

quickstart: install
	$(PY) -m pretrainx train --gin_file=gin_configs/quickstart.gin --run_dir=runs/quickstart --restart

lint: install
	$(VENV)/bin/lint-imports

# The whole suite on 8 fake CPU devices; `make test-fast` skips tests marked slow.
test: lint
	$(PY) -m pytest -n 2 --dist loadgroup --expected-skips=$(EXPECTED_SKIPS) $(PYTEST_ARGS)

test-fast: lint
	$(PY) -m pytest -n 2 --dist loadgroup -m "not slow" --expected-skips=$(EXPECTED_SKIPS) $(PYTEST_ARGS)

bench: install
	$(PY) bench/train_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
