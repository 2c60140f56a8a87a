# The two commands of the README. Each does all of its own set-up.
VENV ?= .venv
BIN := $(VENV)/bin
export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1

.PHONY: setup demo test lint format bench clean

setup:
	@bash scripts/setup.sh

# Build the default domain mix (cached after the first time), run the quick study, write its report.
demo: setup
	$(BIN)/moe-testbed data build --preset default
	$(BIN)/moe-testbed study quick --workers 2

# Lint, format check and the whole test suite on CPU.
test: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/python -m pytest -x

format: setup
	$(BIN)/ruff format src tests benchmarks
	$(BIN)/ruff check --fix src tests benchmarks

bench: setup
	$(BIN)/moe-testbed bench

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
