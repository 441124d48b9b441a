"""The paper's comparison on Fashion-MNIST: dense backbone, AdaViT, Random and Random+ at AdaViT's cost.

    python benchmarks/fashion_mnist_table.py            # the shipped checkpoints, the full test set

Random is the backbone run with random decisions (no training); Random+ is the backbone fine-tuned under random
decisions. Both draw heads and sub-blocks at AdaViT's measured eval keep-rates, and patches at the rate that gives
AdaViT's mean MACs (``random_patch_keep_for_cost``). Prints a markdown table, writes JSON.
"""
import argparse
import os

import numpy as np
import torch

from adavit.data.datasets import build_datasets
from adavit.files import write_json
from adavit.gates.budget import random_patch_keep_for_cost
from adavit.model.adavit import AdaViT
from adavit.training.checkpoint import load_model, read_checkpoint
from adavit.training.distributed import DistEnv
from adavit.training.evaluation import eval_loader, evaluate, evaluate_checkpoint, gated_keep_rates


def _row(name: str, result: dict) -> dict:
    gmacs = np.asarray(result['macs'], dtype=np.float64) / 1e9
    return {'model': name, 'top1': result['top1'], 'gmacs_mean': float(gmacs.mean()), 'keep_mean': result['keep_mean']}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--adavit', default='checkpoints/fashion_mnist_adavit.pt')
    parser.add_argument('--backbone', default='checkpoints/fashion_mnist_backbone.pt')
    parser.add_argument('--random-plus', default='checkpoints/fashion_mnist_random_plus.pt')
    parser.add_argument('--stage2', default='checkpoints/fashion_mnist_adavit_stage2.pt',
                        help='AdaViT before the policy-frozen adaptation (a row of its own, if the file exists)')
    parser.add_argument('--val-subset', type=int, default=None, help='evaluate on the first N test images')
    parser.add_argument('--batch-size', type=int, default=500)
    parser.add_argument('--json', default='benchmarks/results/fashion_mnist_table.json')
    args = parser.parse_args()

    ada = evaluate_checkpoint(args.adavit, data={'val_subset': args.val_subset}, batch_size=args.batch_size,
                              compare_dense=args.backbone)
    model = load_model(args.adavit)
    keep = gated_keep_rates(ada['keep'], model)
    rows = [
        {'model': 'dense backbone', 'top1': ada['dense_top1'], 'gmacs_mean': ada['dense_gmacs_mean']},
        {'model': 'AdaViT', 'top1': ada['top1'], 'gmacs_mean': ada['gmacs_mean'], 'keep_mean': ada['keep_mean']},
    ]
    if args.stage2 and os.path.isfile(args.stage2):
        stage2 = evaluate_checkpoint(args.stage2, data={'val_subset': args.val_subset}, batch_size=args.batch_size)
        rows.append({'model': 'AdaViT, stage 2 only', 'top1': stage2['top1'], 'gmacs_mean': stage2['gmacs_mean'],
                     'keep_mean': stage2['keep_mean']})
    data_cfg = dict(read_checkpoint(args.adavit)['config']['data'])
    if args.val_subset:
        data_cfg['val_subset'] = args.val_subset
    env = DistEnv(device=torch.device('cpu'))

    def run(net: AdaViT) -> dict:
        datasets, _ = build_datasets(data_cfg, net, splits=('val',))
        return evaluate(net, eval_loader(datasets['val'], env, args.batch_size), env, with_macs=True)

    # Random: the backbone's weights under random decisions at AdaViT's cost.
    random_model = load_model(args.adavit)
    backbone = load_model(args.backbone)
    random_model.load_state_dict({**random_model.state_dict(), **backbone.state_dict()})
    random_model.policy, random_model.random_keep = 'random', (keep['patch'], keep['head'], keep['block'])
    random_patch_keep_for_cost(random_model, ada['gmacs_mean'] * 1e9)
    rows.append(_row('Random', run(random_model)))
    if os.path.isfile(args.random_plus):
        plus = load_model(args.random_plus)
        plus.policy, plus.random_keep = 'random', random_model.random_keep
        rows.append(_row('Random+', run(plus)))

    dense_gmacs = rows[0]['gmacs_mean']
    random_keep = dict(zip(('patch', 'head', 'block'), random_model.random_keep))
    print(f'Fashion-MNIST test set ({ada["count"]} images). AdaViT keeps patch {keep["patch"]:.3f}, head '
          f'{keep["head"]:.3f}, block {keep["block"]:.3f}; the random policies draw at patch '
          f'{random_keep["patch"]:.3f} (its cost), head {random_keep["head"]:.3f}, block {random_keep["block"]:.3f}\n')
    print('| model | top-1 (%) | mean GMACs | MACs vs dense |')
    print('|---|---|---|---|')
    for row in rows:
        share = row['gmacs_mean'] / dense_gmacs
        print(f'| {row["model"]} | {row["top1"]:.2f} | {row["gmacs_mean"]:.5f} | {share:.1%} |')
    write_json(args.json, {'count': ada['count'], 'adavit_keep': keep, 'random_keep': random_keep, 'rows': rows})
    print(f'\nwrote {args.json}')


if __name__ == '__main__':
    main()
