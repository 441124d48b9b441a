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

# The Fashion-MNIST demo: fine-tunes AdaViT from checkpoints/fashion_mnist_backbone.pt, evaluates and times it against
# the backbone and the Random / Random+ baselines, and writes runs/demo/report.md. DEMO_ARGS: more `adavit demo` flags.
DEMO_ARGS ?=
demo: data
	$(PIP) install -q -e .
	$(PYTHON) -m adavit demo $(DEMO_ARGS)

bench: install
	$(PYTHON) benchmarks/speed.py --batch-sizes 1,64
