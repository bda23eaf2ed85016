# The two set-up commands of the README: `make demo` and `make test`.
export HF_HUB_OFFLINE := 1
export GPTQMODEL_CPU_WORKERS ?= 2
export TOKENIZERS_PARALLELISM ?= false
PY := .venv/bin/python

.PHONY: setup demo test test-fast bench-recovery

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) examples/demo.py

# The whole suite, slow tests included (what CI runs). pytest's exit 5 (no tests) fails too.
test: setup
	$(PY) -m pytest -q

test-fast: setup
	$(PY) -m pytest -q -m "not slow"

bench-recovery: setup
	$(PY) benchmarks/recovery.py
