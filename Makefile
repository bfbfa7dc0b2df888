# Each target sets itself up: a .venv with the package and its test tools.
PYTHON ?= python3.11
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
# Test processes (pytest-xdist): the suite's time is mostly XLA compiling on one thread, so
# two processes use a 2-core machine's second core. JOBS=0 runs the tests in this process.
JOBS   ?= 2

.PHONY: demo test lint clean

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

demo: $(STAMP)
	$(BIN)/jbilevel demo $(ARGS)

test: $(STAMP)
	$(BIN)/python -m pytest -q -n $(JOBS) $(ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .

clean:
	rm -rf $(VENV) .pytest_cache
