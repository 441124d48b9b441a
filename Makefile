PYTHON ?= python3
PIP ?= $(PYTHON) -m pip
FASHION_MNIST ?= /usr/share/datasets/fashion-mnist

.PHONY: install data test demo bench

install:
	$(PIP) install -q -e ".[test]"

# Fashion-MNIST from Debian's dataset-fashion-mnist (the loader can also download it, or read --data-dir).
data:
	@if [ ! -d $(FASHION_MNIST) ]; then \
	  if command -v apt-get >/dev/null; then \
	    (apt-get update -qq || true) && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq dataset-fashion-mnist; \
	  else echo "Fashion-MNIST not found at $(FASHION_MNIST): tests that need it will fail"; fi; \
	fi

test: install data
	$(PYTHON) -m pytest -q tests

demo:
	@echo "make demo: the Fashion-MNIST demo is not built yet (issue 5); see README.md" >&2; exit 1

bench: install
	$(PYTHON) benchmarks/speed.py --batch-sizes 1,64
