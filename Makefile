# One-command entry points.  The first target that needs Python creates .venv and installs
# the project into it (torch and torchvision pinned together, then the package with the
# `hf` and `dev` extras); later calls reuse it.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
OUT     ?= demo_out

.PHONY: install test test-fast lint demo bench clean-venv

# The stamp's name carries a checksum of the pins, and it depends on this Makefile: a new
# TORCH_PIN (edited here or given on the command line) or install recipe reinstalls.
STAMP   := $(BIN)/.mlcd-installed-$(shell printf '%s' '$(TORCH_PIN)' | cksum | cut -d' ' -f1)

$(STAMP): setup.py Makefile
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade "pip>=23.1" "setuptools>=64" wheel
	$(BIN)/python -m pip install $(TORCH_PIN)
	$(BIN)/python -m pip install -e '.[hf,dev]'
	rm -f $(BIN)/.mlcd-installed*
	touch $@

install: $(STAMP)

# The whole test suite (CPU only, no network).  .ci/run calls exactly this.
test: install
	$(BIN)/python -m pytest tests -q -p no:cacheprovider --durations=15

# The unit tier for the edit-test loop (under a minute on 2 cores): every test not marked
# `slow` in pytest.ini's sense (torchrun or spawned ranks, subprocesses, the demo).
test-fast: install
	$(BIN)/python -m pytest tests -q -p no:cacheprovider -m "not slow" --durations=5

# ruff with ruff.toml's rules; .ci/run runs it after the tests.
lint: install
	$(BIN)/python -m ruff check .

# The main job: the whole pipeline end to end on the shipped Fashion-MNIST sample.
demo: install
	$(BIN)/mlcd demo --out "$(OUT)"

# Every benchmark, one table of measured ratios against their references.
bench: install
	$(BIN)/python -m bench.run_all

clean-venv:
	rm -rf $(VENV)
