# The two commands of the README. Both create .venv and install on first use.
# make demo: the paper's Table 1 in miniature (about 6 minutes on 2 CPU cores), see demo/run.py.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
# A fresh Inductor cache per checkout keeps flex_attention compiles reproducible.
export TORCHINDUCTOR_CACHE_DIR ?= $(CURDIR)/.cache/inductor
export HF_HUB_OFFLINE ?= 1

.PHONY: demo test lint clean

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt "torch==2.13.0"
	DS_BUILD_OPS=0 $(PY) -m pip install --quiet --disable-pip-version-check -c constraints.txt -e ".[dev,demo,train,lora,serve]"
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m aki_demo

test: $(STAMP)
	$(PY) -m pytest

lint: $(STAMP)
	$(VENV)/bin/ruff check aki training eval demo benchmarks tests
	$(VENV)/bin/ruff format --check aki training eval demo benchmarks tests

clean:
	rm -rf $(VENV) .cache outputs
