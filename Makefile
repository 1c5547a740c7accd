# One-command entry points.  The first target that needs Python creates .venv and installs
# the project into it (torch and torchvision pinned together, then the package with the
# `hf` and `dev` extras); later calls reuse it.
PY      ?= python3
VENV    ?= .venv
BIN     := $(VENV)/bin
TORCH_PIN ?= torch==2.14.1 torchvision==0.29.1
OUT     ?= demo_out

.PHONY: install tf4-venv test test-fast lint demo bench clean-venv

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

# A second, small environment with transformers 4.x (what LLaVA-style code pins), for
# tests/test_hf_versions.py: Hugging Face folders written under the main venv's transformers 5
# must load identically under 4.x and the reverse.  Only transformers and its hub/tokenizers
# live here; torch, numpy and the rest come from the main venv through a .pth file (its
# site-packages appended to sys.path, after this venv's own).  `make test` builds it first; if
# it cannot be built (no index), those tests skip and say why.
TF4_VENV ?= .venv-tf4
TF4_PIN  ?= transformers==4.57.*
TF4_STAMP := $(TF4_VENV)/.mlcd-tf4-$(shell printf '%s' '$(TF4_PIN)' | cksum | cut -d' ' -f1)

$(TF4_STAMP): $(STAMP)
	rm -rf $(TF4_VENV)
	$(BIN)/python -m venv --without-pip $(TF4_VENV) 2>/dev/null || $(BIN)/python -m venv $(TF4_VENV)
	$(BIN)/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])" \
	  > "$$($(TF4_VENV)/bin/python -c "import sysconfig; print(sysconfig.get_paths()['purelib'])")/mlcd-main-venv.pth"
	$(BIN)/python -m pip --python $(TF4_VENV)/bin/python install -q --no-warn-conflicts "$(TF4_PIN)"
	touch $@

tf4-venv:
	-@$(MAKE) --no-print-directory $(TF4_STAMP) || echo "make: $(TF4_VENV) (transformers 4.x) could not be built; tests/test_hf_versions.py will skip its 4.x checks"

# The whole test suite (CPU only, no network).  .ci/run calls exactly this.
test: install tf4-venv
	$(BIN)/python -m pytest tests -q -p no:cacheprovider --durations=15

# The unit tier for the edit-test loop (under a minute on 2 cores): every test not marked
# `slow` in pytest.ini's sense (torchrun or spawned ranks, subprocesses, the demo), on
# FAST_WORKERS pytest-xdist workers.  --dist loadfile keeps a file's tests on one worker, so
# a module-scoped fixture (shards, a trained source run) is built once, not once per worker.
FAST_WORKERS ?= 2
test-fast: install
	$(BIN)/python -m pytest tests -q -p no:cacheprovider -m "not slow" -n $(FAST_WORKERS) --dist loadfile --durations=5

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
	rm -rf $(VENV) $(TF4_VENV)
