PYTHON ?= python3
PIP ?= $(PYTHON) -m pip

.PHONY: install test demo bench

install:
	$(PIP) install -q -e ".[test]"

test: install
	$(PYTHON) -m pytest -q tests

bench: install
	$(PYTHON) benchmarks/speed.py
