# s3_localserver: one script, no build step.  `make test` sets itself up from scratch.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
MARKER := $(VENV)/.installed-$(shell cat requirements-test.txt | cksum | cut -d' ' -f1)

.PHONY: test lint demo bench clean

$(MARKER): requirements-test.txt
	rm -rf $(VENV)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --disable-pip-version-check -r requirements-test.txt
	touch $@

test: $(MARKER)
	$(BIN)/python -m pytest tests

lint: $(MARKER)
	$(BIN)/ruff check s3_localserver.py tests bench

demo: $(MARKER)
	PATH="$(abspath $(BIN)):$$PATH" bash tests/demo.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache tests/__pycache__ __pycache__

bench: $(MARKER)
	$(BIN)/python bench/run.py
