# Two entry points: `make demo` (the main job on the embedded default) and `make test`.
# Both create .venv/ (Python 3.11, torch 2.14.1, torchvision 0.29.1) on first use.
PYTHON ?= python3.11
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: demo test lint venv clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

demo: $(STAMP)
	$(BIN)/cellseg demo --out demo-out

test: $(STAMP)
	$(BIN)/python -m pytest -q -n 2 --durations=15

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks kernel tools
	$(BIN)/ruff format --check src tests benchmarks kernel tools
	$(BIN)/mypy  # files and settings: [tool.mypy] in pyproject.toml

clean:
	rm -rf demo-out build dist src/*.egg-info .pytest_cache
