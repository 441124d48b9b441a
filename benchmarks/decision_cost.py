"""What AdaViT's decision networks cost at run time, apart from the sparse executor that carries their decisions out.

Three contenders take turns in changing order after a warm-up, as in ``adavit benchmark`` (``interleaved_times``; by
default a turn is an untimed call and then every input of the round in a row):

* ``dense``: the dense timm twin, same weights, timm's default attention;
* ``deciding``: AdaViT with its decision networks deciding (as ``adavit benchmark --policy gates``: the networks at
  their initial weights, thresholds set on noise images to keep ``--keep``, so each image gets decisions of its own);
* ``given``: the same AdaViT handed, for each input, the decisions it took on it (``model(x, decisions=...)``). It runs
  no decision network, and norms only the tokens each block keeps instead of every token the patch gate reads.

``deciding`` minus ``given`` is what making the decisions costs; ``given``'s efficiency (speedup over dense / MAC ratio,
its MACs without the networks') is what the executor alone delivers on those decisions. Prints a table, writes JSON.

    python benchmarks/decision_cost.py --batch-sizes 1,64 --threads 2
    python benchmarks/decision_cost.py --device cuda --dtype bf16 --batch-sizes 1,256
"""
import argparse
import os
import statistics
import sys
from typing import Dict, List

import torch

import adavit  # noqa: F401 (registers the AdaViT models)
from adavit.cli.benchmark import build_model
from adavit.cost.benchmark import (DTYPES, INTERLEAVES, batches_per_round, interleaved_times, machine_info,
                                   missing_device, pin_allocator, timer, warmup_rounds)
from adavit.cost.macs import decision_macs, dense_macs
from adavit.files import write_json


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='adavit_deit_small_patch16_224')
    parser.add_argument('--keep', default='0.7,0.7,0.9', help='keep-rates patch,head,block the gates are set to')
    parser.add_argument('--batch-sizes', default='1,64')
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s choice)')
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--dtype', choices=sorted(DTYPES), default='fp32')
    parser.add_argument('--images-per-round', type=int, default=64,
                        help='a round covers about this many images (at least one batch, at most 32 batches)')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--interleave', choices=INTERLEAVES, default='turn', help='as `adavit benchmark` takes it')
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--json', default=os.path.join(os.path.dirname(__file__), 'results', 'decision_cost.json'))
    return parser.parse_args(argv)


def main(argv: List[str]) -> Dict[str, object]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    problem = missing_device(args.device)
    if problem:
        raise SystemExit(problem)
    allocator = pin_allocator() if device.type == 'cpu' else 'default'
    keep = [float(k) for k in args.keep.split(',')]
    # The thresholds are set in fp32 on the CPU, as `adavit benchmark --policy gates` sets them.
    model = build_model(argparse.Namespace(checkpoint=None, model=args.model, policy='gates', keep=keep))
    model = model.eval().to(device, dtype)
    dense = model.dense_twin().eval().to(device, dtype)
    height, width = model.patch_embed.img_size
    channels = model.patch_embed.proj.in_channels
    dense_total = dense_macs(dense)
    generator = torch.Generator().manual_seed(0)
    rows = []
    for batch_size in (int(b) for b in args.batch_sizes.split(',')):
        count = batches_per_round(batch_size, args.images_per_round)
        inputs = [torch.randn(batch_size, channels, height, width, generator=generator).to(device, dtype)
                  for _ in range(count)]
        with torch.inference_mode():
            decisions = [model(x, return_decisions=True)[1] for x in inputs]
        # given: the same decisions without the networks' MACs, which it does not run
        mac_ratio = {kind: dense_total / torch.cat([decision_macs(model, d, ran) for d in decisions]).mean().item()
                     for kind, ran in (('deciding', True), ('given', False))}
        runs = {'dense': timer(dense, inputs, False, device), 'deciding': timer(model, inputs, False, device),
                'given': timer(lambda pair: model(pair[0], decisions=pair[1]), list(zip(inputs, decisions)), False,
                               device)}
        with torch.inference_mode():
            times = interleaved_times(runs, count, warmup_rounds(args.warmup, count, device), args.repeats,
                                      args.interleave)
        ms = {name: statistics.median(values) * 1e3 for name, values in times.items()}
        rows.append({
            'batch_size': batch_size, 'inputs': count, 'dense_ms': ms['dense'], 'deciding_ms': ms['deciding'],
            'given_ms': ms['given'], 'decision_ms': ms['deciding'] - ms['given'],
            'decision_share': (ms['deciding'] - ms['given']) / ms['deciding'],
            **{f'mac_ratio_{kind}': ratio for kind, ratio in mac_ratio.items()},
            **{f'efficiency_{kind}': ms['dense'] / ms[kind] / ratio for kind, ratio in mac_ratio.items()},
            # Round by round, paired: how far the difference moves on this machine's noise.
            'decision_ms_by_round': [(d - g) * 1e3 for d, g in zip(times['deciding'], times['given'])],
        })
    result = {'benchmark': 'decision_cost', 'model': args.model, 'keep': keep, 'threads': torch.get_num_threads(),
              'device': str(device), 'dtype': args.dtype, 'machine': machine_info(str(device)), 'allocator': allocator,
              'warmup': args.warmup, 'repeats': args.repeats, 'interleave': args.interleave, 'rows': rows}
    print(f'# {args.model}, gates set to keep {args.keep}, {result["threads"]} threads, {device} {args.dtype}, '
          f'medians of {args.repeats} rounds, turns by {args.interleave}; machine: {result["machine"]["cpu"]}')
    print(f'{"batch":>5}{"dense ms":>10}{"deciding ms":>13}{"given ms":>10}{"decisions ms":>14}{"share":>7}'
          f'{"MAC ratio":>11}{"eff. deciding":>15}{"eff. given":>12}   decisions ms by round')
    for r in rows:
        by_round = ' '.join(f'{d:.1f}' for d in r['decision_ms_by_round'])
        print(f'{r["batch_size"]:>5}{r["dense_ms"]:>10.1f}{r["deciding_ms"]:>13.1f}{r["given_ms"]:>10.1f}'
              f'{r["decision_ms"]:>14.2f}{r["decision_share"]:>7.1%}{r["mac_ratio_deciding"]:>11.2f}'
              f'{r["efficiency_deciding"]:>15.3f}{r["efficiency_given"]:>12.3f}   {by_round}')
    write_json(args.json, result)
    print(f'wrote {args.json}')
    return result


if __name__ == '__main__':
    main(sys.argv[1:])
