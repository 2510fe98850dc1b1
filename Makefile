# `make demo`: install everything and run the demo. `make test`: install everything and run the tests.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin

.PHONY: install demo test docs bench chaos clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	./scripts/install-system-deps
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e ".[test,bench,http,docs]"
	touch $@

demo: install
	$(BIN)/charging demo

# pytest exits 5 when it collects no tests; that is a failure here, never a pass.
test: install
	$(BIN)/pytest -q

# The reference site from docs/ into site/ (tests/test_docs.py builds it too, strict);
# NO_MKDOCS_2_WARNING silences mkdocs-material's banner about its successor.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The benchmark (docs/benchmark.md); BENCH_ARGS=--quick for the short one.
bench: install
	$(BIN)/charging bench $(BENCH_ARGS)

# The fault-injection run (docs/chaos.md); CHAOS_ARGS=--quick for the short one.
chaos: install
	$(BIN)/charging chaos $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache site
