"""``adavit predict IMAGE... --checkpoint PATH``: top-5 classes of each image, and what the image cost.

The cost is what the decisions taken for that image make the model run: GMACs (and the share of the dense
backbone's), image patches kept per layer, heads kept per layer, and the MSA and FFN sub-blocks run.
"""
import argparse
import json
from typing import Any, Dict, List

import torch

from ._checkpoint import load_for_inference

BATCH = 64


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('images', nargs='+', metavar='IMAGE', help='image files (anything PIL reads)')
    parser.add_argument('--checkpoint', required=True, help='a checkpoint written by `adavit train`')
    parser.add_argument('--classes', default=None,
                        help='class names: comma-separated, a file with one per line, or "fashion-mnist" '
                             '(default: from the checkpoint, else indices)')
    parser.add_argument('--topk', type=int, default=5, help='classes to show per image (default 5)')
    parser.add_argument('--json', action='store_true', help='print one JSON list instead of text')


@torch.no_grad()
def predict(model: torch.nn.Module, images: torch.Tensor, names: List[str], topk: int = 5) -> List[Dict[str, Any]]:
    """Per-image top-k and cost.

    Args:
        model: An AdaViT (or a dense timm ViT) in eval mode.
        images: (B, C, H, W), preprocessed.
        names: Class names, one per output.
        topk: How many classes to list.

    Returns:
        One dict per image: ``top`` (list of {class, index, prob}), ``gmacs``, ``dense_gmacs``,
        ``patches_kept`` (per layer), ``num_patches``, ``heads_kept`` (per layer), ``num_heads``,
        ``msa`` and ``ffn`` (per layer, 0/1).
    """
    from ..cost.macs import dense_macs, macs
    from ..visualize.collect import run_with_decisions

    dense = dense_macs(model) / 1e9
    prefix = int(getattr(model, 'num_prefix_tokens', 1))
    num_heads = int(model.blocks[0].attn.num_heads)
    k = max(1, min(topk, len(names)))
    out: List[Dict[str, Any]] = []
    for start in range(0, images.shape[0], BATCH):
        x = images[start:start + BATCH]
        logits, dec = run_with_decisions(model, x)
        probs = logits.float().softmax(-1)
        top_p, top_i = probs.topk(k, dim=-1)
        gmacs = macs(model, x, decisions=dec).double() / 1e9
        patch = dec.patch[:, :, prefix:]
        for b in range(x.shape[0]):
            out.append({
                'top': [{'class': names[int(i)], 'index': int(i), 'prob': float(p)}
                        for p, i in zip(top_p[b].tolist(), top_i[b].tolist())],
                'gmacs': float(gmacs[b]),
                'dense_gmacs': float(dense),
                'patches_kept': [int(v) for v in patch[b].sum(-1).round().long().tolist()],
                'num_patches': int(patch.shape[-1]),
                'heads_kept': [int(v) for v in dec.head[b].sum(-1).round().long().tolist()],
                'num_heads': num_heads,
                'msa': [int(v) for v in dec.block[b, :, 0].round().long().tolist()],
                'ffn': [int(v) for v in dec.block[b, :, 1].round().long().tolist()],
            })
    return out


def format_prediction(path: str, result: Dict[str, Any]) -> str:
    """The text ``adavit predict`` prints for one image."""
    width = max(len(t['class']) for t in result['top'])
    lines = [path]
    lines += [f'  {r}. {t["class"]:<{width}}  {t["prob"]:.4f}' for r, t in enumerate(result['top'], 1)]
    depth = len(result['patches_kept'])
    share = 100.0 * result['gmacs'] / result['dense_gmacs'] if result['dense_gmacs'] else float('nan')
    mean_patches = sum(result['patches_kept']) / max(depth, 1)
    lines += [
        f'  cost: {result["gmacs"]:.6g} GMACs ({share:.1f}% of the dense {result["dense_gmacs"]:.6g})',
        f'  patches kept per layer (of {result["num_patches"]}): '
        + ' '.join(str(v) for v in result['patches_kept']) + f' (mean {mean_patches:.1f})',
        f'  heads kept per layer (of {result["num_heads"]}): ' + ' '.join(str(v) for v in result['heads_kept']),
        f'  MSA run: {sum(result["msa"])}/{depth} layers, FFN run: {sum(result["ffn"])}/{depth} layers',
    ]
    return '\n'.join(lines)


def run(args: argparse.Namespace) -> int:
    from ..visualize.inputs import load_images

    loaded = load_for_inference(args.checkpoint, args.classes)
    images = load_images(args.images, loaded.model, loaded.data_config)
    results = predict(loaded.model, images, loaded.class_names, args.topk)
    if args.json:
        print(json.dumps([dict(image=p, **r) for p, r in zip(args.images, results)], indent=1))
    else:
        print('\n\n'.join(format_prediction(p, r) for p, r in zip(args.images, results)))
    return 0
