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

# two pytest workers (TEST_WORKERS=1 for one): most tests wait on subprocesses, spawned ranks or a browser, so on
# 2 cores the suite takes about 11 min instead of 15 (the AMD EPYC Zen 3); then, alone, the tests marked serial,
# which time jobs against the machine's idle cores; -rs lists each skipped test with its reason
TEST_WORKERS ?= 2

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -rs -n $(TEST_WORKERS) -m 'not slow and not serial'
	$(BIN)/python -m pytest -q -rs -m serial

# three seeds per claim; the runs stay in runs/slow for `make claims-table`
test-slow: $(TEST_STAMP)
	SPECSCOPE_SLOW_ROOT=runs/slow $(BIN)/python -m pytest -q -m slow

# the README's claims table, regenerated from the recorded runs (no re-running)
claims-table: $(STAMP)
	$(BIN)/specscope claims --root runs --format markdown --into README.md

# the commands behind the README's targets table, in its order (about 30 minutes on 2 cores)
bench: $(STAMP)
	$(BIN)/python benchmarks/optim_step.py --rounds 14 --repeats 3 --skip-rf --floor --optimizers \
	    'Muon default (gram_newton_schulz)' 'Muon default, bf16 iterations' 'Muon default, fp32 iterations' \
	    'Muon polar=polar_express' 'Muon polar=gram'
	$(BIN)/python benchmarks/polar.py --dims 256 768 --rounds 8 --repeats 3 --backends 'gram_newton_schulz ×4 (= auto)' \
	    'gram_newton_schulz bf16 ×4' 'gram_newton_schulz fp32 ×4' 'polar_express bf16 ×5' 'gram, six at once (polar_later)' \
	    'gram (= auto tol=1e-4)' 'svd'
	$(BIN)/python benchmarks/probe_overhead.py --rounds 12 --block 10 --threads 2
	$(BIN)/python benchmarks/probe_overhead.py --sparse 10 --rounds 6 --periods 4 --threads 2
	$(BIN)/python benchmarks/probe_overhead.py --floor --rounds 10 --block 10 --threads 2
	$(BIN)/python benchmarks/probe_overhead.py --phases --consecutive --rounds 6 --block 10 --threads 2
	OMP_NUM_THREADS=1 $(BIN)/python benchmarks/probe_accuracy.py --every 1 5 100 --measurements 4

clean:
	rm -rf $(VENV) build src/*.egg-info
