"""How fast one of a block's linears runs as a function of its row count: why the CPU batch plan's head groups cost.

The batch plan (``adavit.execution.sparse``) runs each linear of a block once per head group: the images that keep the
same heads, about 140-280 rows each at DeiT-S batch 64 under the random policy, where the dense model runs one matmul
over all 12,608 rows. This times a DeiT-S linear restricted to ``--heads`` kept heads (qkv's output columns, proj's and
fc1's input channels), as the executor calls it (``linear_into``: ``addmm`` into a preallocated output), at each row
count, hot in cache: each row count is one contender, and they take turns in changing order after a warm-up
(``interleaved_medians``). Prints GMAC/s per row count and writes JSON.

    python benchmarks/gemm_rows.py --threads 2
    python benchmarks/gemm_rows.py --rows 138,276,1024,12608 --heads 6
"""
import argparse
import os
import sys
import time
from typing import Callable, Dict, List

import torch

from adavit.cost.benchmark import interleaved_medians, machine_info, pin_allocator
from adavit.execution.kernels import linear_into
from adavit.files import write_json


def layer_shapes(embed_dim: int, num_heads: int, mlp_ratio: float, heads: int) -> Dict[str, tuple]:
    """(in features K, out features N) of each linear of a timm block with ``heads`` of ``num_heads`` heads kept."""
    kept = embed_dim // num_heads * heads
    return {'qkv': (embed_dim, 3 * kept), 'proj': (kept, embed_dim), 'fc1': (kept, int(embed_dim * mlp_ratio)),
            'fc2': (int(embed_dim * mlp_ratio), embed_dim)}


def _matmul_run(rows: int, in_features: int, out_features: int, calls: int) -> Callable[[int], float]:
    """A contender for ``interleaved_medians``: ``calls`` matmuls of (rows, K) by (K, N) plus bias; seconds per call."""
    x, weight_t = torch.randn(rows, in_features), torch.randn(out_features, in_features).t()
    bias, out = torch.randn(out_features), torch.empty(rows, out_features)

    def run(_: int) -> float:
        start = time.perf_counter()
        for _ in range(calls):
            linear_into(out, x, weight_t, bias)
        return (time.perf_counter() - start) / calls
    return run


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--rows', default='138,276,512,1024,2048', help='row counts to time')
    parser.add_argument('--heads', type=int, default=4, help='kept heads (of --num-heads)')
    parser.add_argument('--embed-dim', type=int, default=384)
    parser.add_argument('--num-heads', type=int, default=6)
    parser.add_argument('--mlp-ratio', type=float, default=4.0)
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s choice)')
    parser.add_argument('--macs-per-call', type=float, default=1e8,
                        help='each timing repeats a matmul until about this many multiply-adds')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=9)
    parser.add_argument('--json', default=os.path.join(os.path.dirname(__file__), 'results', 'gemm_rows.json'))
    return parser.parse_args(argv)


def main(argv: List[str]) -> Dict[str, object]:
    args = parse_args(argv)
    if not 0 < args.heads <= args.num_heads:
        raise SystemExit(f'--heads must lie in 1..{args.num_heads}, got {args.heads}')
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = pin_allocator()
    row_counts = [int(r) for r in args.rows.split(',')]
    rows = []
    with torch.inference_mode():
        for layer, (k, n) in layer_shapes(args.embed_dim, args.num_heads, args.mlp_ratio, args.heads).items():
            runs = {m: _matmul_run(m, k, n, max(1, round(args.macs_per_call / (m * k * n)))) for m in row_counts}
            seconds = interleaved_medians(runs, 1, args.warmup, args.repeats)
            rates = {m: m * k * n / seconds[m] / 1e9 for m in row_counts}
            rows.append({'layer': layer, 'in_features': k, 'out_features': n,
                         'gmacs_per_s': {str(m): rates[m] for m in row_counts},
                         'ms': {str(m): seconds[m] * 1e3 for m in row_counts},
                         'vs_most_rows': {str(m): rates[m] / rates[row_counts[-1]] for m in row_counts}})
    result = {'benchmark': 'gemm_rows', 'heads': args.heads, 'num_heads': args.num_heads, 'embed_dim': args.embed_dim,
              'mlp_ratio': args.mlp_ratio, 'rows': row_counts, 'threads': torch.get_num_threads(),
              'machine': machine_info(), 'allocator': allocator, 'repeats': args.repeats, 'layers': rows}
    print(f'# {args.heads} of {args.num_heads} heads kept, width {args.embed_dim}, {result["threads"]} threads, cpu '
          f'fp32, medians of {args.repeats} rounds; machine: {result["machine"]["cpu"]}')
    print(f'{"GMAC/s":>8}{"K":>6}{"N":>6}' + ''.join(f'{f"{m} rows":>12}' for m in row_counts))
    for r in rows:
        print(f'{r["layer"]:>8}{r["in_features"]:>6}{r["out_features"]:>6}'
              + ''.join(f'{r["gmacs_per_s"][str(m)]:>12.1f}' for m in row_counts))
    write_json(args.json, result)
    print(f'wrote {args.json}')
    return result


if __name__ == '__main__':
    main(sys.argv[1:])
