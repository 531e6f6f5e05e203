# Two commands on a fresh machine: `make quickstart` and `make test`. Targets are idempotent:
# the install step is skipped while .venv/.stamp-install is newer than pyproject.toml and the lock.
#
# jax >= 0.11 needs Python >= 3.12. PYTHON is the first interpreter that is 3.12 or newer among
# python3.12, python3.13, pyenv's installed 3.12/3.13 and python3 (override: make PYTHON=...).
# A pyenv shim of a version that is not selected fails the check, so its versions dir is asked.
PYTHON ?= $(shell for p in python3.12 python3.13 \
  $$(ls -d $$(pyenv root 2>/dev/null || echo $$HOME/.pyenv)/versions/3.1[23]*/bin/python3 2>/dev/null) \
  python3; do $$p -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null && \
  { command -v $$p; break; }; done)
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.stamp-install
# The versions `make` installs and tests (pip freeze of a Python 3.12 venv; README.md, "Versions tested").
LOCK := requirements/lock-py312.txt
PYTEST_ARGS ?=
# Tests skipped on a complete install (README.md, "Tests and benchmarks"): every dependency a test
# needs is installed here, so a skip means a broken install, and the run fails on any other count.
EXPECTED_SKIPS := 0

.PHONY: install quickstart test test-fast lint bench clean

$(STAMP): pyproject.toml $(LOCK)
	@test -n "$(PYTHON)" || { echo "make: pretrainx needs Python >= 3.12 (jax >= 0.11 requires it)" \
	  "and found none: install python3.12, or name one with make PYTHON=/path/to/python3.12"; exit 2; }
	@$(PY) -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null || { \
	  test ! -d $(VENV) || echo "make: $(VENV) is not Python >= 3.12; making it anew"; rm -rf $(VENV); }
	@test -x $(PY) || { echo "make: creating $(VENV) with $(PYTHON) ($$($(PYTHON) --version))"; \
	  $(PYTHON) -m venv $(VENV); }
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c $(LOCK) -e '.[test,tpu]'
	touch $(STAMP)

install: $(STAMP)

quickstart: install
	$(PY) -m pretrainx train --gin_file=gin_configs/quickstart.gin --run_dir=runs/quickstart --restart

lint: install
	$(VENV)/bin/lint-imports

# The whole suite on 8 fake CPU devices; `make test-fast` skips tests marked slow.
test: lint
	$(PY) -m pytest -n 2 --dist loadgroup --durations=40 --expected-skips=$(EXPECTED_SKIPS) $(PYTEST_ARGS)

test-fast: lint
	$(PY) -m pytest -n 2 --dist loadgroup -m "not slow" --expected-skips=$(EXPECTED_SKIPS) $(PYTEST_ARGS)

bench: install
	$(PY) bench/train_throughput.py

clean:
	rm -rf $(VENV) runs .pytest_cache
