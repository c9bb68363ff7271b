# The README's two commands: `make demo` and `make test`. Only python3 (3.11+) and make needed.
PYTHON ?= python3
VENV   := .venv
BIN    := $(VENV)/bin

.PHONY: setup setup-test demo test lint format clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

$(VENV)/.installed: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml | $(BIN)/python
	$(BIN)/pip install --quiet -e '.[test,lint]'
	touch $@ $(VENV)/.installed

setup: $(VENV)/.installed            ## make .venv and install the project

setup-test: $(VENV)/.installed-test  ## make .venv with the test and lint extras

demo: setup                          ## run the whole flow once on embedded defaults
	$(BIN)/newsletter demo

test: setup-test                     ## run the whole test suite
	$(BIN)/python -m pytest

lint: setup-test                     ## ruff lint and format check, mypy
	$(BIN)/ruff check newsletter tests benchmarks
	$(BIN)/ruff format --check newsletter tests benchmarks
	$(BIN)/mypy newsletter

format: setup-test
	$(BIN)/ruff format newsletter tests benchmarks
	$(BIN)/ruff check --fix newsletter tests benchmarks

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache .mypy_cache preview
