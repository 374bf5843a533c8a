# Two entry points (see README): `make demo` runs the main job on bundled data, `make test` the tests.
# Both create ./.venv on first use (CPU JAX from PyPI; nothing else is downloaded at run time).
PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	test -x $(BIN)/python || $(PY) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q -e '.[test]'
	touch $(STAMP)

.PHONY: install demo test
install: $(STAMP)

demo: $(STAMP)
	$(BIN)/python -m jaxee.demo --out runs/demo

test: $(STAMP)
	$(BIN)/python -m pytest -q -rs -n auto --dist loadfile tests
