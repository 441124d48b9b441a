"""Dense timm vs AdaViT sparse vs AdaViT masked, same weights and inputs, interleaved: `adavit benchmark` as a script.

    python benchmarks/speed.py --batch-sizes 1,64 --threads 2            # DeiT-S, random decisions at ~half cost
    python benchmarks/speed.py --policy keep-all --batch-sizes 1,64      # overhead when nothing is dropped
    python benchmarks/speed.py --device cuda --dtype bf16 --batch-sizes 256
"""
import sys

from adavit.cli.main import main

if __name__ == '__main__':
    sys.exit(main(['benchmark'] + sys.argv[1:]))
