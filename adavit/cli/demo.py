"""``adavit demo``: the Fashion-MNIST demo (what ``make demo`` runs): fine-tune AdaViT from the shipped dense backbone,
evaluate it against the backbone and the Random / Random+ baselines, time the sparse executor, and write
``runs/demo/report.md`` (with pictures) and ``runs/demo/summary.json``.

Examples::

    adavit demo                                           # 6-9 minutes on 2 CPU cores
    adavit demo --max-steps 50 --eval-subset 2000         # a quick look
    adavit demo --backbone /tmp/tiny.pt --output /tmp/demo --subset 256 --eval-subset 200

The backbone comes from ``adavit train --config configs/fashion_mnist_backbone.yaml``. See ``adavit.demo``.
"""
import argparse
import shlex
from typing import Any, List, Optional, Sequence

from .. import demo as _demo
from ..errors import ConfigError


def _numbers(text: str, kind: type, flag: str) -> List[Any]:
    try:
        return [kind(part) for part in text.split(',') if part.strip()]
    except ValueError as e:
        raise ConfigError(f'{flag} takes comma-separated numbers, got {text!r}') from e


def _optional_int(text: str) -> Optional[int]:
    """``all`` (or 0) for no limit, else a positive integer."""
    if text.strip().lower() in ('all', 'none', '0'):
        return None
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f'expected a positive integer or "all", got {text}')
    return value


def add_arguments(parser: argparse.ArgumentParser) -> None:
    d = _demo.DemoSettings()
    parser.add_argument('--config', '-c', default=d.config, help=f'AdaViT fine-tuning config (default {d.config})')
    parser.add_argument('--backbone', default=d.backbone,
                        help=f'dense backbone to fine-tune from (default {d.backbone}; made by '
                             f'`{_demo.BACKBONE_COMMAND}`)')
    parser.add_argument('--output', '-o', default=d.output, help=f'demo folder, rewritten on each run (default '
                                                                  f'{d.output})')
    parser.add_argument('--epochs', type=int, default=d.epochs, help=f'fine-tuning epochs (default {d.epochs})')
    parser.add_argument('--max-steps', type=int, default=d.max_steps, help='stop fine-tuning after N optimizer steps')
    parser.add_argument('--subset', type=_optional_int, default=d.subset,
                        help='fine-tune on the first N training images (default all 60000)')
    parser.add_argument('--eval-subset', type=_optional_int, default=d.eval_subset,
                        help='evaluate on the first N test images (default all 10000)')
    parser.add_argument('--curve-subset', type=_optional_int, default=d.curve_subset,
                        help=f'test images per point of the budget-knob sweep, or "all" (default {d.curve_subset})')
    parser.add_argument('--thresholds', default=','.join(f'{t:g}' for t in d.thresholds),
                        help='patch thresholds of the budget-knob sweep (default %(default)s)')
    parser.add_argument('--batch-sizes', default=','.join(str(b) for b in d.batch_sizes),
                        help='batch sizes of the throughput measurement (default %(default)s)')
    parser.add_argument('--warmup', type=int, default=d.warmup, help=f'untimed rounds (default {d.warmup})')
    parser.add_argument('--repeats', type=int, default=d.repeats, help=f'timed rounds, median (default {d.repeats})')
    parser.add_argument('--threads', type=int, default=d.threads, help='torch threads (default: one per core)')
    parser.add_argument('--data-dir', default=d.data_dir, help='folder of the Fashion-MNIST IDX files')
    parser.add_argument('--shipped', default=d.shipped,
                        help=f'shipped AdaViT checkpoint, reported when it exists (default {d.shipped})')
    parser.add_argument('--random-plus', default=d.random_plus,
                        help=f'Random+ checkpoint, reported when it exists (default {d.random_plus})')
    parser.add_argument('--overlay-images', type=int, default=d.overlay_images,
                        help=f'test images in the kept-patch figure, one per class (default {d.overlay_images})')
    parser.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE',
                        help='override an entry of the fine-tuning config, e.g. --set train.batch_size=64')
    parser.add_argument('--no-progress', action='store_true', help='no progress bars')


def command_line(args: argparse.Namespace) -> str:
    """``adavit demo`` with the options that differ from the defaults, for the report."""
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    parts = ['adavit', 'demo']
    for action in parser._actions:
        if not action.option_strings or action.dest == 'help':
            continue
        value = getattr(args, action.dest, action.default)
        if value == action.default:
            continue
        flag = action.option_strings[-1] if action.option_strings[-1].startswith('--') else action.option_strings[0]
        if isinstance(value, bool):
            parts.append(flag)
        elif isinstance(value, list):
            for item in value:
                parts += [flag, shlex.quote(str(item))]
        else:
            parts += [flag, shlex.quote('all' if value is None else str(value))]
    return ' '.join(parts)


def settings_from(args: argparse.Namespace) -> _demo.DemoSettings:
    from ..training.config import parse_override
    thresholds: Sequence[float] = _numbers(args.thresholds, float, '--thresholds')
    batch_sizes: Sequence[int] = _numbers(args.batch_sizes, int, '--batch-sizes')
    return _demo.DemoSettings(
        config=args.config, backbone=args.backbone, output=args.output, epochs=args.epochs, max_steps=args.max_steps,
        subset=args.subset, eval_subset=args.eval_subset, curve_subset=args.curve_subset, thresholds=thresholds,
        batch_sizes=batch_sizes, warmup=args.warmup, repeats=args.repeats, threads=args.threads,
        data_dir=args.data_dir, shipped=args.shipped, random_plus=args.random_plus,
        overlay_images=args.overlay_images, overrides=[parse_override(item) for item in args.overrides],
        override_items=list(args.overrides),
        progress=not args.no_progress, command=command_line(args))


def run(args: argparse.Namespace) -> int:
    _demo.run_demo(settings_from(args))
    return 0
