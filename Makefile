# Two commands do all the set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(shell cat pyproject.toml | cksum | cut -d' ' -f1)

.PHONY: test test-kernels lint demo bench fixtures onnx-fixtures clean

# The determinism tests (pytest -m determinism) again on the code paths of a CPU with AVX2 but
# no AVX-512 (AMD EPYC, older Intel), whatever this machine's CPU: OpenBLAS's Haswell kernel,
# oneMKL's AVX2 path and numba's kernels built for Haswell; once with the products on oneMKL,
# once on NumPy's BLAS. Skipped on a CPU without AVX2 (those kernels would not run there).
AVX2_RUNS := "OPENBLAS_CORETYPE=Haswell MKL_ENABLE_INSTRUCTIONS=AVX2 NUMBA_CPU_NAME=haswell CLASSIC_CNN_BLAS=mkl" \
	"OPENBLAS_CORETYPE=Haswell NUMBA_CPU_NAME=haswell CLASSIC_CNN_BLAS=numpy"

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[test,mkl,ray]'
	rm -f $(VENV)/.installed-*
	touch $@

test: $(STAMP)
	$(PY) -m ruff check src tests benchmarks scripts
	$(PY) -m pytest -q
	$(MAKE) --no-print-directory test-kernels

test-kernels: $(STAMP)
	@if grep -qw avx2 /proc/cpuinfo 2>/dev/null; then \
	  for run in $(AVX2_RUNS); do \
	    echo "== determinism tests with $$run"; \
	    env $$run $(PY) -m pytest -q -m determinism -p no:cacheprovider || exit 1; \
	  done; \
	else echo "== no AVX2 on this CPU: the AVX2 determinism runs are skipped"; fi

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

# the PyTorch-made ONNX files the importer is tested on (tests/fixtures/onnx/, committed)
onnx-fixtures: $(VENV)/.bench
	$(PY) scripts/make_onnx_fixtures.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache .hypothesis
