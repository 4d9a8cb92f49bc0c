# Two commands do all the set-up on a fresh clone:
#   make demo   -- create .venv, install, run the main job
#   make test   -- create .venv, install, run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test test-slow claims-table bench install clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	# the CPU build of torch first, so the package's torch>=2.6 range installs nothing more
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e '.[dev]'
	touch $(STAMP)

# the test suite also runs the Hugging Face and Lightning integrations; `make demo` does not need them
$(TEST_STAMP): $(STAMP)
	$(BIN)/python -m pip install -q -e '.[dev,hf,lightning]' torch==2.13.0
	touch $(TEST_STAMP)

install: $(STAMP)

demo: $(STAMP)
	$(BIN)/specscope demo

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q

# three seeds per claim; the runs stay in runs/slow for `make claims-table`
test-slow: $(TEST_STAMP)
	SPECSCOPE_SLOW_ROOT=runs/slow $(BIN)/python -m pytest -q -m slow

# the README's claims table, regenerated from the recorded runs (no re-running)
claims-table: $(STAMP)
	$(BIN)/specscope claims --root runs --format markdown --into README.md

bench: $(STAMP)
	$(BIN)/python benchmarks/polar.py
	$(BIN)/python benchmarks/optim_step.py
	$(BIN)/python benchmarks/probe_overhead.py

clean:
	rm -rf $(VENV) build src/*.egg-info
