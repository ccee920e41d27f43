# Two set-up commands that work on a fresh machine; each creates .venv when missing.
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: test demo lint bench clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch/torchvision pinned to the releases that lie on this machine's disk (CUDA builds, CPU ok).
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q "torch==2.14.1" "torchvision==0.29.1" || $(BIN)/pip install -q "torch<=2.14.1" "torchvision<=0.29.1"
	$(BIN)/pip install -q -e ".[dev]"
	touch $(STAMP)

test: $(STAMP)
	$(BIN)/ruff check lightning_anomaly tests benchmarks examples experiments
	$(BIN)/ruff format --check lightning_anomaly tests benchmarks examples experiments
	$(BIN)/mypy
	$(BIN)/python -m pytest -q

demo: $(STAMP)
	$(BIN)/lightning-anomaly demo

lint: $(STAMP)
	$(BIN)/ruff check lightning_anomaly tests benchmarks examples experiments
	$(BIN)/mypy

bench: $(STAMP)
	$(BIN)/python benchmarks/bench_engine.py

clean:
	rm -rf $(VENV) build *.egg-info
