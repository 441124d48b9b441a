"""``adavit visualize --checkpoint PATH --images FILES... [--output DIR]``: kept-patch overlays and usage heatmaps.

Writes ``patches.png`` (rows = images, columns = layers; dropped patches faded to grey) and ``usage.png`` (heads and
[MSA, FFN] kept per layer, patch keep-rate per layer, averaged over the given images) into the output directory.
"""
import argparse
import os

import torch

from ._checkpoint import load_for_inference


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--checkpoint', required=True, help='a checkpoint written by `adavit train`')
    parser.add_argument('--images', nargs='+', required=True, metavar='FILE', help='image files (anything PIL reads)')
    parser.add_argument('--output', default='runs/visualize', help='directory for the PNGs (default runs/visualize)')
    parser.add_argument('--max-rows', type=int, default=8,
                        help='images shown in the overlay grid (the first ones; usage averages over all; default 8)')
    parser.add_argument('--classes', default=None,
                        help='class names: comma-separated, a file with one per line, or "fashion-mnist" '
                             '(default: from the checkpoint, else indices)')


@torch.no_grad()
def run(args: argparse.Namespace) -> int:
    from ..visualize.collect import collect
    from ..visualize.inputs import load_images
    from ..visualize.patches import plot_patch_overlays
    from ..visualize.usage import plot_usage

    loaded = load_for_inference(args.checkpoint, args.classes)
    model, names, cfg = loaded.model, loaded.class_names, loaded.data_config
    images = load_images(args.images, model, cfg)
    os.makedirs(args.output, exist_ok=True)
    # The images carry no labels: -1 stands in; only the predictions and the decisions' means are used.
    stats = collect(model, [(images, torch.full((images.shape[0],), -1))])
    # Rows are titled "file: prediction" so that each row can be traced back to its image.
    titles = [f'{os.path.basename(p)[:18]}: {names[int(k)]}' for p, k in zip(args.images, stats.preds)]
    rows = max(1, args.max_rows)
    patches = plot_patch_overlays(model, images[:rows], os.path.join(args.output, 'patches.png'), titles=titles[:rows],
                                  mean=cfg['mean'], std=cfg['std'])
    usage = plot_usage(stats, os.path.join(args.output, 'usage.png'))
    print(f'wrote {patches}')
    print(f'wrote {usage}')
    return 0
