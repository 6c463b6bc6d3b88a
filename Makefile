# The two commands of the README: `make demo` runs one build on a throwaway
# local Djinn database, `make test` prepares the machine and runs the suite.
VENV ?= .venv
PYTEST_ARGS ?=

.PHONY: demo test bench

demo:
	scripts/setup demo
	$(VENV)/bin/python scripts/demo.py

test:
	scripts/setup test
	$(VENV)/bin/pytest $(PYTEST_ARGS)

bench:
	scripts/setup demo
	$(VENV)/bin/python bench/dispatch.py
