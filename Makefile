# Convenience targets; each is the README's plain command.
PYTHON ?= python3

.PHONY: demo test lint
demo:
	$(PYTHON) -m pip install -q . && $(PYTHON) -m numbattn bench
test:
	$(PYTHON) -m pip install -q -e ".[test]" && $(PYTHON) run_tests.py
lint:
	ruff check . && ruff format --check .
