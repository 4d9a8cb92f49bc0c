# Two commands do all the set-up on a fresh clone:
#   make demo   -- create .venv, install, run the main job
#   make test   -- create .venv, install, run the test suite
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: demo test test-slow bench install clean

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

test-slow: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -m slow

bench: $(STAMP)
	$(BIN)/python benchmarks/polar.py
	$(BIN)/python benchmarks/optim_step.py
	$(BIN)/python benchmarks/probe_overhead.py

clean:
	rm -rf $(VENV) build src/*.egg-info
