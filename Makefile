# MedServe: `make run` and `make test` are the two commands a fresh clone needs.
SHELL := /bin/bash
PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
STAMP := $(VENV)/.installed
# torch/torchvision are pinned here (pyproject keeps a range): this pair is known to import together.
TORCH_PINS := torch==2.14.1 torchvision==0.29.1
MODEL_DIR ?= checkpoints
HOST ?= 0.0.0.0
PORT ?= 8000

.PHONY: install run demo test lint typecheck docs unit bench clean docker docker-cpu

install: $(STAMP)

$(STAMP): pyproject.toml
	@command -v $(PYTHON) >/dev/null || { echo "error: $(PYTHON) not found; set PYTHON=/path/to/python3.11"; exit 1; }
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	$(PIP) install -q $(TORCH_PINS)
	$(PIP) install -q -e '.[dev]' $(TORCH_PINS)
	touch $(STAMP)

# Builds demo checkpoints on synthetic data when none exist, then serves on port 8000.
demo: $(STAMP)
	$(VENV)/bin/medserve demo --model-dir $(MODEL_DIR)

run: demo
	$(VENV)/bin/medserve serve --model-dir $(MODEL_DIR) --host $(HOST) --port $(PORT)

lint: $(STAMP)
	$(VENV)/bin/ruff check app models training tests benchmarks
	$(VENV)/bin/ruff format --check app models training tests benchmarks

typecheck: $(STAMP)
	$(VENV)/bin/mypy

# The documentation site (mkdocs.yml, docs/): strict, so a broken link, anchor or nav entry fails the build.
docs: $(STAMP)
	NO_MKDOCS_2_WARNING=1 $(VENV)/bin/mkdocs build --strict --site-dir site

unit: $(STAMP)
	$(VENV)/bin/pytest -q

test: lint typecheck docs unit

bench: $(STAMP)
	$(PY) benchmarks/bench_service.py

clean:
	rm -rf $(VENV) .mypy_cache .ruff_cache .pytest_cache site

# Container images (needs a Docker engine; CI has none and checks the files with hadolint and structural tests).
docker:
	docker build -t medserve:gpu .

docker-cpu:
	docker build --build-arg VARIANT=cpu -t medserve:cpu .
