"""The sparse executor's FFN chunk size (``FFN_CHUNK_BYTES``), side by side in one process against the dense twin.

Each setting of the chunk size is one contender, and the dense timm model another; they take turns on every input in
changing order (``interleaved_medians``), after a warm-up, with the random policy reseeded per input so that every
setting runs the same decisions. Prints the medians, each setting's speed against unchunked, and its efficiency
(speedup over dense / MAC ratio); writes JSON.

    python benchmarks/ffn_chunks.py --batch-size 64 --threads 2
    python benchmarks/ffn_chunks.py --batch-size 64 --chunk-mib 0,6 --with-masked   # as `adavit benchmark` rotates
"""
import argparse
import os
import sys
from typing import Dict, List

import timm
import torch

import adavit  # noqa: F401 (registers the AdaViT models)
from adavit.cost.benchmark import ExecutorView, interleaved_medians, machine_info, pin_allocator, timer
from adavit.cost.macs import decision_macs, dense_macs
from adavit.execution import sparse
from adavit.files import write_json


class _ChunkedSparse(ExecutorView):
    """The sparse executor with ``FFN_CHUNK_BYTES['cpu']`` set to ``mib`` MiB (0: one pass) while it runs."""

    def __init__(self, model: torch.nn.Module, mib: float) -> None:
        super().__init__(model, 'sparse')
        self.chunk_bytes = int(mib * 2 ** 20) if mib > 0 else 1 << 62

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        default = dict(sparse.FFN_CHUNK_BYTES)
        sparse.FFN_CHUNK_BYTES['cpu'] = self.chunk_bytes
        try:
            return super().__call__(x)
        finally:
            sparse.FFN_CHUNK_BYTES.clear()
            sparse.FFN_CHUNK_BYTES.update(default)


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='adavit_deit_small_patch16_224')
    parser.add_argument('--keep', default='0.7,0.7,0.9', help='random keep probabilities patch,head,block')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s choice)')
    parser.add_argument('--chunk-mib', default='0,3,6,12',
                        help='FFN_CHUNK_BYTES settings in MiB of hidden activations; 0: one pass (no chunks)')
    parser.add_argument('--inputs', type=int, default=4, help='distinct input batches (decision patterns) per round')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--with-masked', action='store_true',
                        help='also rotate the masked executor in, as `adavit benchmark` does (it evicts the caches)')
    parser.add_argument('--json', default=os.path.join(os.path.dirname(__file__), 'results', 'ffn_chunks.json'))
    return parser.parse_args(argv)


def main(argv: List[str]) -> Dict[str, object]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = pin_allocator()
    model = timm.create_model(args.model, policy='random', random_keep=[float(k) for k in args.keep.split(',')])
    model.eval()
    dense = model.dense_twin().eval()
    generator = torch.Generator().manual_seed(0)
    height, width = model.patch_embed.img_size
    channels = model.patch_embed.proj.in_channels
    inputs = [torch.randn(args.batch_size, channels, height, width, generator=generator) for _ in range(args.inputs)]
    with torch.inference_mode():
        adaptive = []
        for i, x in enumerate(inputs):
            model.reset_random_policy(i)
            adaptive.append(decision_macs(model, model(x, return_decisions=True)[1]))
    mac_ratio = dense_macs(dense) / torch.cat(adaptive).mean().item()

    cpu = torch.device('cpu')
    runs = {'dense': timer(dense, inputs, False, cpu)}
    for mib in (float(m) for m in args.chunk_mib.split(',')):
        runs[f'{mib:g} MiB' if mib > 0 else 'one pass'] = timer(_ChunkedSparse(model, mib), inputs, True, cpu)
    if args.with_masked:
        runs['masked'] = timer(ExecutorView(model, 'masked'), inputs, True, cpu)
    with torch.inference_mode():
        medians = interleaved_medians(runs, len(inputs), args.warmup, args.repeats)
    baseline = medians.get('one pass')
    rows = []
    for name, seconds in medians.items():
        if name in ('dense', 'masked'):
            continue
        rows.append({'setting': name, 'ms': seconds * 1e3, 'images_per_s': args.batch_size / seconds,
                     'speed_vs_one_pass': baseline / seconds if baseline else None,
                     'efficiency': medians['dense'] / seconds / mac_ratio})
    result = {'benchmark': 'ffn_chunks', 'model': args.model, 'keep': args.keep, 'batch_size': args.batch_size,
              'threads': torch.get_num_threads(), 'machine': machine_info(), 'allocator': allocator,
              'inputs': args.inputs, 'repeats': args.repeats, 'with_masked': args.with_masked,
              'mac_ratio': mac_ratio, 'dense_ms': medians['dense'] * 1e3, 'rows': rows}
    print(f'# {args.model}, keep {args.keep}, batch {args.batch_size}, {result["threads"]} threads, cpu fp32, '
          f'{args.inputs} inputs x {args.repeats} rounds (medians){", masked in rotation" if args.with_masked else ""}')
    print(f'# machine: {result["machine"]["cpu"]}; dense {result["dense_ms"]:.1f} ms, MAC ratio {mac_ratio:.2f}')
    print(f'{"FFN chunks":>12}{"sparse ms":>11}{"img/s":>8}{"vs one pass":>13}{"efficiency":>12}')
    for r in rows:
        vs = f'{r["speed_vs_one_pass"]:.3f}' if r['speed_vs_one_pass'] else '-'
        print(f'{r["setting"]:>12}{r["ms"]:>11.1f}{r["images_per_s"]:>8.1f}{vs:>13}{r["efficiency"]:>12.3f}')
    write_json(args.json, result)
    print(f'wrote {args.json}')
    return result


if __name__ == '__main__':
    main(sys.argv[1:])
