# Two commands do all set-up on a fresh machine:
#   make demo   -- create .venv, install genunc, run the main job on the shipped reference model
#   make test   -- same set-up, then run the test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch 2.14.1 + torchvision 0.29.1 are the newest pair this kind of machine holds on disk
# (laplace-torch needs torchvision).  Override for other machines: make test TORCH_SPEC="torch torchvision"
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
STAMP  := $(VENV)/.installed

.PHONY: venv demo lint test bench clean

venv: $(STAMP)

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q $(TORCH_SPEC)
	$(PY) -m pip install -q -e ".[dev,text]"
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/genunc demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) benchmarks/bench_apply.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis outputs
