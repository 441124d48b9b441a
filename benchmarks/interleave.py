"""How the benchmark's turn-taking moves its figures: the whole benchmark by turns and by inputs, alternating.

``adavit benchmark`` times its contenders in turns (``interleave="turn"``: each model runs every input of a round in a
row, after an untimed call), as a deployed model follows itself call after call. Taking turns on every input instead
(``"input"``) starts each call right after another model's. This runs the whole benchmark both ways, one after the
other, ``--repeats`` times over, with the same model, inputs and decisions, and prints each run's row and the median
efficiency per design; writes JSON.

    python benchmarks/interleave.py --batch-size 1 --threads 2
"""
import argparse
import os
import statistics
import sys
from typing import Dict, List

import timm

import adavit  # noqa: F401 (registers the AdaViT models)
from adavit.cost.benchmark import INTERLEAVES, format_rows, machine_info, measure_speed, rows_as_dicts
from adavit.files import write_json


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='adavit_deit_small_patch16_224')
    parser.add_argument('--keep', default='0.7,0.7,0.9', help='random keep probabilities patch,head,block')
    parser.add_argument('--batch-size', type=int, default=1)
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s choice)')
    parser.add_argument('--images-per-round', type=int, default=16)
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--rounds', type=int, default=5, help='timed rounds of each benchmark run')
    parser.add_argument('--repeats', type=int, default=2, help='benchmark runs per design, alternating')
    parser.add_argument('--json', default=os.path.join(os.path.dirname(__file__), 'results', 'interleave.json'))
    return parser.parse_args(argv)


def main(argv: List[str]) -> Dict[str, object]:
    args = parse_args(argv)
    model = timm.create_model(args.model, policy='random', random_keep=[float(k) for k in args.keep.split(',')])
    runs = []
    for _ in range(args.repeats):
        for interleave in INTERLEAVES:
            row, = measure_speed(model, [args.batch_size], args.threads, warmup=args.warmup, repeats=args.rounds,
                                 images_per_round=args.images_per_round, interleave=interleave)
            lines = format_rows([row]).split('\n')  # header, row
            print('\n'.join(([f'{"turns by":>8}  {lines[0]}'] if not runs else []) + [f'{interleave:>8}  {lines[1]}']),
                  flush=True)
            runs.append(row)
    medians = {interleave: statistics.median(r.efficiency for r in runs if r.interleave == interleave)
               for interleave in INTERLEAVES}
    result = {'benchmark': 'interleave', 'model': args.model, 'keep': args.keep, 'batch_size': args.batch_size,
              'machine': machine_info(), 'median_efficiency': medians, 'runs': rows_as_dicts(runs)}
    print(f'# median efficiency over {args.repeats} runs each: '
          + ', '.join(f'by {k} {v:.3f}' for k, v in medians.items()) + f' ({result["machine"]["cpu"]})')
    write_json(args.json, result)
    print(f'wrote {args.json}')
    return result


if __name__ == '__main__':
    main(sys.argv[1:])
