# `make demo`: Redis, a virtualenv with the project, then the demo. `make test`: the same plus
# what only the tests use, then the tests. Each target installs the system packages it needs
# and no others (scripts/install-system-deps TARGET --list shows which); the virtualenv gets
# the project with every extra, at the versions of constraints.txt.
VENV ?= .venv
PYTHON ?= python3
BIN := $(VENV)/bin
SYSTEM_DEPS := ./scripts/install-system-deps

.PHONY: install demo test docs bench chaos clean

install: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -c constraints.txt -e ".[test,bench,http,docs]"
	touch $@

demo: install
	$(SYSTEM_DEPS) demo
	$(BIN)/charging demo

# pytest exits 5 when it collects no tests; that is a failure here, never a pass.
test: install
	$(SYSTEM_DEPS) test
	$(BIN)/pytest -q

# The reference site from docs/ into site/ (tests/test_docs.py builds it too, strict);
# NO_MKDOCS_2_WARNING silences mkdocs-material's banner about its successor.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

# The benchmark (docs/benchmark.md); BENCH_ARGS=--quick for the short one.
bench: install
	$(SYSTEM_DEPS) bench
	$(BIN)/charging bench $(BENCH_ARGS)

# The fault-injection run (docs/chaos.md); CHAOS_ARGS=--quick for the short one.
chaos: install
	$(SYSTEM_DEPS) chaos
	$(BIN)/charging chaos $(CHAOS_ARGS)

clean:
	rm -rf $(VENV) .pytest_cache site
