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

# In parallel: most tests wait on subprocesses (the script, moto, the AWS CLI), so more
# workers than the 2 cores pay.  Whole files per worker (--dist loadfile): a module's
# fixtures are built once, and a new file spreads by itself.  Tests that share this
# machine's addresses (169.254.170.2:80 and the like) take a file lock (tests/helpers.py).
TEST_WORKERS ?= 4

test: $(MARKER)
	$(BIN)/python -m pytest -n $(TEST_WORKERS) --dist loadfile -m 'not idle' tests
	$(BIN)/python -m pytest -m idle tests

lint: $(MARKER)
	$(BIN)/ruff check s3_localserver.py tests bench

demo: $(MARKER)
	PATH="$(abspath $(BIN)):$$PATH" bash tests/demo.sh

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache tests/__pycache__ __pycache__

bench: $(MARKER)
	$(BIN)/python bench/run.py
