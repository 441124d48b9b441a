"""``adavit eval``: accuracy and cost of a checkpoint on a dataset's validation split.

Examples::

    adavit eval --checkpoint runs/fashion_mnist_adavit/best.pt --compare-dense --json eval.json
    adavit eval --checkpoint best.pt --data /data/imagenette --batch-size 64

Reports top-1/top-5, per-image GMACs (mean, p50, p95) under the decisions taken, keep-rates per layer of patches, heads,
MSA and FFN, and with ``--compare-dense`` the dense backbone's top-1 and GMACs beside them. AdaViT runs with its
default (sparse) executor.
"""
import argparse
import sys
from typing import Any, Dict

from ..files import write_json


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--checkpoint', required=True, help='an adavit checkpoint (best.pt, last.pt or exported)')
    parser.add_argument('--data', help="'fashion-mnist' or an ImageFolder with val/ (default: the training data)")
    parser.add_argument('--data-dir', help='folder of the Fashion-MNIST IDX files')
    parser.add_argument('--subset', type=int, help='evaluate on the first N validation images')
    parser.add_argument('--batch-size', type=int, default=256)
    parser.add_argument('--workers', type=int, help='data loader processes')
    parser.add_argument('--device', default='cpu', help="'cpu' or 'cuda'")
    parser.add_argument('--compare-dense', nargs='?', const='', default=None, metavar='BACKBONE',
                        help='also evaluate the dense backbone (the one recorded in the checkpoint, or BACKBONE)')
    parser.add_argument('--ema', action=argparse.BooleanOptionalAction, default=None,
                        help='use the EMA weights (default: when the checkpoint has them)')
    parser.add_argument('--executor', choices=('sparse', 'masked'), help='AdaViT eval executor (default: sparse)')
    parser.add_argument('--json', metavar='OUT', help='write the results as JSON')
    parser.add_argument('--no-progress', action='store_true', help='no progress bars')


def format_report(result: Dict[str, Any]) -> str:
    lines = [f"{result['checkpoint']} on {result['data']} ({result['count']} images)",
             f"top-1 {result['top1']:.2f}  top-5 {result['top5']:.2f}  GMACs mean {result['gmacs_mean']:.4f} "
             f"p50 {result['gmacs_p50']:.4f} p95 {result['gmacs_p95']:.4f}  (dense {result['dense_gmacs']:.4f})"]
    if 'dense_top1' in result:
        lines.append(f"dense backbone {result['dense_checkpoint']}: top-1 {result['dense_top1']:.2f}  GMACs "
                     f"{result['dense_gmacs_mean']:.4f}  (AdaViT runs {result['macs_reduction'] or 0:.2f}x fewer MACs)")
    keep = result.get('keep') or {}
    if keep:
        depth = len(next(iter(keep.values())))
        lines.append('layer  ' + '  '.join(f'{kind:>6}' for kind in keep))
        for layer in range(depth):
            lines.append(f'{layer:>5}  ' + '  '.join(f'{keep[kind][layer]:6.3f}' for kind in keep))
    return '\n'.join(lines)


def run(args: argparse.Namespace) -> int:
    from ..training.evaluation import evaluate_checkpoint
    from ..training.logger import progress
    data = {'name': args.data, 'dir': args.data_dir, 'val_subset': args.subset, 'workers': args.workers}
    show = not args.no_progress
    result = evaluate_checkpoint(
        args.checkpoint, data=data, batch_size=args.batch_size, compare_dense=args.compare_dense,
        device=args.device, ema=args.ema, executor=args.executor,
        progress=(lambda it: progress(it, True, None, 'eval')) if show else None)
    print(format_report(result))
    if args.json:
        write_json(args.json, result)
        print(f'wrote {args.json}', file=sys.stdout)
    return 0
