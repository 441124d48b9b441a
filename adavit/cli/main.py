"""``adavit`` command line: one subcommand per module of this package (``adavit.cli.<name>``).

Each subcommand module defines ``add_arguments(parser)`` and ``run(args) -> int``. Errors a user can fix
(``AdaViTError``) print as one line on stderr and exit with status 2, never as a traceback.
"""
import argparse
import importlib
import sys
from typing import List, Optional

from ..errors import AdaViTError

SUBCOMMANDS = {
    'train': 'fine-tune AdaViT (or train a dense backbone) from a YAML config',
    'eval': 'accuracy and cost of a checkpoint on a dataset',
    'benchmark': 'dense timm vs AdaViT sparse vs AdaViT masked, interleaved timing',
    'predict': 'top-5 classes and the cost of each image',
    'visualize': 'kept-patch overlays and usage heatmaps for images',
    'demo': 'the Fashion-MNIST demo: fine-tune, evaluate, benchmark and write a report',
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog='adavit', description='Adaptive Vision Transformers that really skip work.')
    sub = parser.add_subparsers(dest='command', metavar='COMMAND')
    sub.required = True
    for name, help_text in SUBCOMMANDS.items():
        try:
            module = importlib.import_module(f'adavit.cli.{name}')
        except ModuleNotFoundError as e:
            if e.name != f'adavit.cli.{name}':
                raise
            continue  # not built yet
        p = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except AdaViTError as e:
        print(f'adavit {args.command}: error: {e}', file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f'adavit {args.command}: interrupted', file=sys.stderr)
        return 130


if __name__ == '__main__':
    sys.exit(main())
