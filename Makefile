# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: test lint demo bench fixtures clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,mkl,ray]'
	rm -f $(VENV)/.installed-*
	touch $@

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks scripts
	$(PY) -m pytest -q

lint: $(STAMP)
	$(PY) -m ruff check src tests benchmarks scripts
	$(PY) -m ruff format --check src tests benchmarks scripts

demo: $(STAMP)
	$(VENV)/bin/cnn demo

$(VENV)/.bench: $(STAMP)
	$(PY) -m pip install --quiet -e '.[test,mkl,ray,bench]'
	touch $@

bench: $(VENV)/.bench
	$(PY) benchmarks/bench_engine.py $(BENCH_ARGS)

fixtures: $(VENV)/.bench
	$(PY) scripts/make_torch_fixtures.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache .hypothesis
