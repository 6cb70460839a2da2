# Convenience targets; each is the README's plain command.
PYTHON ?= python3

.PHONY: demo test lint docs
demo:
	$(PYTHON) -m pip install -q . && $(PYTHON) -m numbattn bench
test:
	$(PYTHON) -m pip install -q -e ".[test]" && $(PYTHON) run_tests.py
lint:
	ruff check . && ruff format --check .

# the documentation site (needs the docs extra); warnings are errors, as in CI
docs:
	$(PYTHON) -m sphinx -W --keep-going -n -b html docs /tmp/docs-html
