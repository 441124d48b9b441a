"""Training-step cost of AdaViT (masked execution + usage loss) against the dense timm ViT with the same weights.

One process, one batch, the two models interleaved (alternating which runs first) after a warm-up, so that both see
the same machine state; the medians and their ratio are printed as a table and written as JSON. A step is forward,
loss, backward and clearing the gradients (the optimizer update is the same for both and left out).

    python benchmarks/train_step.py --model deit_small --batch-size 16 --threads 2 --iters 5
"""
import argparse
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Tuple

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

import adavit
from adavit.cost.benchmark import machine_info
from adavit.files import write_json
from adavit.model import gate_keys

CONFIGS: Dict[str, Dict[str, int]] = {
    'deit_tiny': dict(embed_dim=192, depth=12, num_heads=3),
    'deit_small': dict(embed_dim=384, depth=12, num_heads=6),
    'deit_base': dict(embed_dim=768, depth=12, num_heads=12),
}


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='deit_small', choices=sorted(CONFIGS), help='backbone configuration')
    parser.add_argument('--img-size', type=int, default=224)
    parser.add_argument('--batch-size', type=int, default=32)
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s choice)')
    parser.add_argument('--iters', type=int, default=10, help='timed steps per model')
    parser.add_argument('--warmup', type=int, default=2, help='untimed steps per model first')
    parser.add_argument('--head-mode', default='full', choices=['full', 'partial'])
    parser.add_argument('--patch-keep', type=float, default=0.5,
                        help='set the patch gates so that about this fraction of patches is kept in training')
    parser.add_argument('--output', default=os.path.join(os.path.dirname(__file__), 'results', 'train_step.json'))
    return parser.parse_args(argv)


def build(args: argparse.Namespace) -> Tuple[adavit.AdaViT, VisionTransformer]:
    """AdaViT with fresh gates and a dense ViT holding the same backbone weights."""
    arch = dict(CONFIGS[args.model], img_size=args.img_size, patch_size=16, num_classes=1000)
    torch.manual_seed(0)
    model = adavit.AdaViT(**arch, head_mode=args.head_mode, executor='masked')
    if 0.0 < args.patch_keep < 1.0:
        # Training keeps a patch iff logit + Logistic noise > tau * logit(0.6): a bias there plus the noise's
        # quantile gives the wanted keep-rate, so the attention mask is really used.
        shift = model.tau * torch.log(torch.tensor(model.patch_threshold / (1 - model.patch_threshold)))
        quantile = torch.log(torch.tensor(args.patch_keep / (1 - args.patch_keep)))
        with torch.no_grad():
            for blk in model.blocks:
                blk.patch_gate.bias.fill_(float(shift + quantile))
    dense = VisionTransformer(**arch)
    gates = set(gate_keys(model))
    dense.load_state_dict({k: v for k, v in model.state_dict().items() if k not in gates})
    return model.train(), dense.train()


def time_step(step: Callable[[], None]) -> float:
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


def main(argv: List[str]) -> Dict[str, object]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    model, dense = build(args)
    x = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    target = torch.randint(0, 1000, (args.batch_size,))
    criterion = adavit.AdaViTLoss()
    rates: Dict[str, List[float]] = {}

    def adavit_step() -> None:
        logits, decisions = model(x, return_decisions=True)
        loss, parts = criterion(logits, target, decisions)
        loss.backward()
        model.zero_grad(set_to_none=True)
        for k, v in parts.items():
            rates.setdefault(k, []).append(float(v))

    def dense_step() -> None:
        F.cross_entropy(dense(x), target).backward()
        dense.zero_grad(set_to_none=True)

    for _ in range(args.warmup):
        adavit_step()
        dense_step()
    times: Dict[str, List[float]] = {'adavit': [], 'dense': []}
    for i in range(args.iters):
        order = (('adavit', adavit_step), ('dense', dense_step))
        for name, step in (order if i % 2 == 0 else order[::-1]):
            times[name].append(time_step(step))

    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        'benchmark': 'train_step', 'model': args.model, 'img_size': args.img_size, 'batch_size': args.batch_size,
        'threads': torch.get_num_threads(), 'iters': args.iters, 'warmup': args.warmup, 'head_mode': args.head_mode,
        'median_s': med, 'times_s': times, 'ratio_adavit_over_dense': med['adavit'] / med['dense'],
        'images_per_s': {k: args.batch_size / v for k, v in med.items()},
        'keep_rates': {k: statistics.mean(v) for k, v in rates.items() if k.startswith('keep_')},
        'machine': machine_info(),
    }
    print(f'{args.model} img {args.img_size} batch {args.batch_size}, {result["threads"]} threads, '
          f'{args.iters} steps (median), forward + backward')
    print(f'{"model":<10}{"median s":>10}{"img/s":>10}')
    for name in ('dense', 'adavit'):
        print(f'{name:<10}{med[name]:>10.3f}{result["images_per_s"][name]:>10.1f}')
    print(f'ratio adavit/dense: {result["ratio_adavit_over_dense"]:.3f}   keep-rates in training: '
          + ', '.join(f'{k[5:]} {v:.2f}' for k, v in result['keep_rates'].items()))
    write_json(args.output, result)
    return result


if __name__ == '__main__':
    main(sys.argv[1:])
