# Two commands do all set-up on a fresh machine:
#   make demo   -- create .venv from requirements.lock, install genunc, run the main job
#   make test   -- same set-up, then ruff and the whole test suite (what .ci/run calls)
# Others:
#   make test-fast    the suite without the slow (subprocess, training) tests: the development loop
#   make test-latest  the newest versions pyproject.toml's ranges allow, in .venv-latest, then the suite
#   make lock         regenerate requirements.lock from pyproject.toml (then run make test-latest)
#   make docs         the documentation site into site/ (mkdocs build --strict; CI runs it)
#   make report-screenshots  the report's browser test, saving its screenshots in docs/images/browser-test/
#   make baselines    d3rlpy in .venv-baselines, for benchmarks/rl_baselines.py (opt-in, not in CI)
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
LOCK   := requirements.lock
# torch 2.14.1 + torchvision 0.29.1: the pair this project's machines hold on local disk
LOCK_CONSTRAINTS := .ci/lock-constraints.txt
STAMP  := $(VENV)/.installed
LATEST ?= .venv-latest

.PHONY: venv demo lint test test-fast test-latest lock docs report-screenshots bench clean

venv: $(STAMP)

# The dev/CI environment is exactly the lock (hashes checked), plus genunc itself, editable.
$(STAMP): pyproject.toml $(LOCK)
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --require-hashes --no-deps -r $(LOCK)
	$(PY) -m pip install -q --no-deps --no-build-isolation -e .
	$(PY) .ci/check_lock.py $(LOCK)
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/genunc demo

lint: $(STAMP)
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q --durations=15

test-fast: lint
	$(PY) -m pytest -q -m "not slow"

# Before a release and after `make lock`: does genunc work with what a user's `pip install` gets today?
test-latest:
	rm -rf $(LATEST)
	$(PYTHON) -m venv $(LATEST)
	$(LATEST)/bin/python -m pip install -q --upgrade pip
	$(LATEST)/bin/python -m pip install -q --upgrade --upgrade-strategy eager -e ".[text,clip,parquet,launch,rl,dev]"
	$(LATEST)/bin/python .ci/check_lock.py $(LOCK) --report
	$(LATEST)/bin/python -m pytest -q --durations=15

lock: $(STAMP)
	$(VENV)/bin/pip-compile --quiet --generate-hashes --allow-unsafe --strip-extras --all-extras \
	  --no-emit-index-url --no-emit-find-links --constraint $(LOCK_CONSTRAINTS) \
	  --output-file $(LOCK) pyproject.toml

docs: $(STAMP)
	$(PY) docs/gen_cli.py
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --quiet

# one report per modality, in headless Chromium (needs chromium: apt-get install chromium)
report-screenshots: $(STAMP)
	GENUNC_REPORT_SCREENSHOTS=docs/images/browser-test $(PY) -m pytest -q tests/report/test_browser.py

bench: $(STAMP)
	$(PY) benchmarks/bench_apply.py

# d3rlpy (IQL, Cal-QL) for benchmarks/rl_baselines.py: opt-in, never in CI.  Its own venv, so
# .venv stays equal to the lock (.ci/check_lock.py): .venv-baselines holds only the packages of
# benchmarks/requirements-baselines.txt and sees .venv's (the lock, genunc) through a .pth file.
# --no-deps: d3rlpy pins gymnasium==1.0.0, the lock has 1.4.0 (tested compatible: IQL and CalQL
# fit + fit_online on Pendulum-v1); its other dependencies are in the lock.
BASELINES ?= .venv-baselines
BASELINES_REQ := benchmarks/requirements-baselines.txt
.PHONY: baselines
baselines: $(BASELINES)/.installed

$(BASELINES)/.installed: $(STAMP) $(BASELINES_REQ)
	rm -rf $(BASELINES)
	$(PYTHON) -m venv --without-pip $(BASELINES)
	echo "import site; site.addsitedir('$$($(PY) -c 'import sysconfig; print(sysconfig.get_path("purelib"))')')" \
	  > "$$($(BASELINES)/bin/python -c 'import sysconfig; print(sysconfig.get_path("purelib"))')/genunc_venv.pth"
	$(BASELINES)/bin/python -m pip install -q --require-hashes --no-deps --no-build-isolation -r $(BASELINES_REQ)
	$(BASELINES)/bin/python -c "import d3rlpy, genunc, gymnasium; print('d3rlpy', d3rlpy.__version__, 'gymnasium', gymnasium.__version__)"
	touch $@

clean:
	rm -rf $(VENV) $(LATEST) $(BASELINES) .pytest_cache .hypothesis outputs site
