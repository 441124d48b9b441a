"""What the host pays to launch each op the accelerator plan runs, where the row count is one seen before or new.

On a GPU the sparse executor is host-bound: every block launches its ops on a row count T that follows the decisions,
so it is new in almost every call. This times the host side of each op (the time until the call returns, the device
left to run ahead; synchronised every 20 calls) on T fixed, on T new every call, and on T rounded up to a multiple of
1,024, and prints a table of medians in microseconds. Run it on the device in question; on a CPU the times include the
work itself.

    python benchmarks/op_host_cost.py --device cuda
"""
import argparse
import os
import sys
import time
from typing import Callable, Dict, List

import numpy as np
import torch
import torch.nn.functional as F

from adavit.cost.benchmark import DTYPES, machine_info, missing_device
from adavit.files import write_json


def host_microseconds(fn: Callable[[int], object], calls: int, sync: Callable[[], None]) -> float:
    """Median host time of ``fn(i)`` over ``calls`` calls, after 5 untimed ones."""
    for i in range(5):
        fn(i)
    sync()
    times = []
    for i in range(calls):
        start = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - start)
        if i % 20 == 19:  # so that the queue of launches stays short
            sync()
    sync()
    return float(np.median(times)) * 1e6


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--dtype', choices=sorted(DTYPES), default='bf16')
    parser.add_argument('--rows', type=int, default=35000, help='about the kept tokens of DeiT-S at batch 256')
    parser.add_argument('--calls', type=int, default=200)
    parser.add_argument('--json', default=os.path.join(os.path.dirname(__file__), 'results', 'op_host_cost.json'))
    return parser.parse_args(argv)


def main(argv: List[str]) -> Dict[str, object]:
    args = parse_args(argv)
    problem = missing_device(args.device)
    if problem:
        raise SystemExit(problem)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == 'cuda' else (lambda: None)
    rng = np.random.default_rng(0)
    width, hidden, top = 384, 1536, args.rows + 1024  # DeiT-S
    weight = torch.randn(hidden, width, device=device, dtype=dtype) * 0.02
    bias = torch.zeros(hidden, device=device, dtype=dtype)
    x = torch.randn(top, width, device=device, dtype=dtype)
    low = args.rows - args.rows // 32  # new row counts from the top 3%, as the decisions move them
    counts = {'seen': np.full(2 * args.calls, args.rows),
              'new': rng.integers(low, args.rows + 1, 2 * args.calls),
              'rounded to 1024': -(-rng.integers(low, args.rows + 1, 2 * args.calls) // 1024) * 1024}
    rows = []
    for name, op in (('F.linear', lambda t: F.linear(x[:t], weight, bias)),
                     ('F.linear, no bias', lambda t: F.linear(x[:t], weight)),
                     ('torch.addmm', lambda t: torch.addmm(bias, x[:t], weight.t())),
                     ('torch.mm', lambda t: torch.mm(x[:t], weight.t())),
                     ('F.layer_norm', lambda t: F.layer_norm(x[:t], (width,)))):
        for kind, ts in counts.items():
            rows.append({'op': name, 'rows': kind,
                         'host_us': host_microseconds(lambda i: op(int(ts[i])), args.calls, sync)})
    indices = [torch.from_numpy(rng.permutation(top)[:t]).to(device) for t in counts['new'][:8]]
    source = torch.randn(args.rows, width, device=device, dtype=dtype)
    for name, op in (('index_select', lambda i: x.index_select(0, indices[i % 8])),
                     ('index_copy_', lambda i: x.index_copy_(0, indices[i % 8], source[:indices[i % 8].numel()])),
                     ('add_', lambda i: x[:args.rows].add_(source))):
        rows.append({'op': name, 'rows': 'new', 'host_us': host_microseconds(op, args.calls, sync)})
    machine = machine_info(args.device)
    where = machine['cuda'] or f"{machine['cpu']}, {machine['threads']} threads"
    result = {'benchmark': 'op_host_cost', 'machine': machine, 'dtype': args.dtype,
              'rows': args.rows, 'calls': args.calls, 'results': rows}
    print(f'# host microseconds a call (median of {args.calls}), {where}, {args.dtype}, about {args.rows} rows')
    print(f'{"op":>20}{"row count":>18}{"host us":>10}')
    for r in rows:
        print(f'{r["op"]:>20}{r["rows"]:>18}{r["host_us"]:>10.1f}')
    write_json(args.json, result)
    print(f'wrote {args.json}')
    return result


if __name__ == '__main__':
    main(sys.argv[1:])
