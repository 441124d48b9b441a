"""The accelerator plan's attention: packed, or padded on each SDPA backend, with decisions fixed per input or new.

The sparse executor's accelerator plan (``adavit/execution/sparse_accelerator.py``) runs each block's attention over
each image's packed rows in one flash-attention call where the kernel runs (a GPU, bf16 or fp16: backend ``packed``),
and elsewhere as one padded, masked ``scaled_dot_product_attention`` call whose shape (problems, longest image) follows
the decisions; the other backends force that padded call. A backend that builds a plan per shape is fast when the same
decisions come back (as in ``adavit benchmark``, which reseeds the random policy per input) and slow when every batch
brings new ones, as learned gates on real images do.
Each (backend, decisions) pair is one contender, and the dense timm model another; they take turns on every input in
changing order after a warm-up (``interleaved_medians``). Prints medians and writes JSON.

    python benchmarks/padded_attention.py --device cuda --dtype bf16 --batch-size 256
"""
import argparse
import itertools
import os
import sys
from typing import Dict, List, Optional

import timm
import torch
from torch.nn.attention import SDPBackend

import adavit  # noqa: F401 (registers the AdaViT models)
from adavit.cost.benchmark import DTYPES, ExecutorView, interleaved_medians, machine_info, missing_device, timer
from adavit.execution import sparse, sparse_accelerator
from adavit.files import write_json

BACKENDS = {
    'packed': None,  # packed attention where it runs (else padded on the default backends)
    'efficient': [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH],  # the default
    'cudnn': [SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH],
    'math': [SDPBackend.MATH],
}


class _Contender(ExecutorView):
    """The sparse executor on the accelerator plan with ``backends`` for its padded attention (None: packed attention
    where it runs); with ``fresh``, the random policy is reseeded to a seed never used before on every call, so that no
    two calls share decisions."""

    _fresh_seeds = itertools.count(1_000_000)

    def __init__(self, model: torch.nn.Module, backends: Optional[List[SDPBackend]], fresh: bool) -> None:
        super().__init__(model, 'sparse')
        self.backends, self.fresh = backends, fresh

    def reset_random_policy(self, seed: int) -> None:
        self.model.reset_random_policy(next(self._fresh_seeds) if self.fresh else seed)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.backends is None:
            return super().__call__(x)
        default, packed = sparse_accelerator.PADDED_ATTENTION_BACKENDS, sparse_accelerator._runs_packed_attention
        sparse_accelerator.PADDED_ATTENTION_BACKENDS = self.backends
        sparse_accelerator._runs_packed_attention = lambda block, x: False
        try:
            return super().__call__(x)
        finally:
            sparse_accelerator.PADDED_ATTENTION_BACKENDS, sparse_accelerator._runs_packed_attention = default, packed


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='adavit_deit_small_patch16_224')
    parser.add_argument('--keep', default='0.7,0.7,0.9', help='random keep probabilities patch,head,block')
    parser.add_argument('--batch-size', type=int, default=256)
    parser.add_argument('--device', default='cuda')
    parser.add_argument('--dtype', choices=sorted(DTYPES), default='bf16')
    parser.add_argument('--backends', default='packed,efficient,cudnn', help=f'comma-separated, of {sorted(BACKENDS)}')
    parser.add_argument('--inputs', type=int, default=4, help='distinct input batches per round')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--json', default=os.path.join(os.path.dirname(__file__), 'results', 'padded_attention.json'))
    return parser.parse_args(argv)


def main(argv: List[str]) -> Dict[str, object]:
    args = parse_args(argv)
    problem = missing_device(args.device)
    if problem:
        raise SystemExit(problem)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    model = timm.create_model(args.model, policy='random', random_keep=[float(k) for k in args.keep.split(',')])
    model = model.eval().to(device, dtype)
    dense = model.dense_twin().eval().to(device, dtype)
    generator = torch.Generator().manual_seed(0)
    height, width = model.patch_embed.img_size
    channels = model.patch_embed.proj.in_channels
    inputs = [torch.randn(args.batch_size, channels, height, width, generator=generator).to(device, dtype)
              for _ in range(args.inputs)]
    runs = {'dense': timer(dense, inputs, False, device)}
    for backend, fresh in itertools.product(args.backends.split(','), (False, True)):
        runs[f'{backend}, {"new" if fresh else "same"}'] = timer(_Contender(model, BACKENDS[backend], fresh), inputs,
                                                                 True, device)
    grouped = sparse.HEAD_GROUPED_DEVICES
    sparse.HEAD_GROUPED_DEVICES = set()  # the accelerator plan on every device, the CPU too
    try:
        with torch.inference_mode():
            medians = interleaved_medians(runs, len(inputs), args.warmup, args.repeats)
    finally:
        sparse.HEAD_GROUPED_DEVICES = grouped
    rows = [{'backend': name.split(', ')[0],
             'decisions': 'new every call' if name.endswith('new') else 'same per input', 'ms': seconds * 1e3,
             'images_per_s': args.batch_size / seconds, 'speedup': medians['dense'] / seconds}
            for name, seconds in medians.items() if name != 'dense']
    machine = machine_info(args.device)
    where = machine['cuda'] or f"{machine['cpu']}, {machine['threads']} threads"
    result = {'benchmark': 'padded_attention', 'model': args.model, 'keep': args.keep, 'batch_size': args.batch_size,
              'machine': machine, 'dtype': args.dtype, 'inputs': args.inputs,
              'repeats': args.repeats, 'dense_ms': medians['dense'] * 1e3, 'rows': rows}
    print(f'# {args.model}, keep {args.keep}, batch {args.batch_size}, {where}, {args.dtype}, '
          f'{args.inputs} inputs x {args.repeats} rounds (medians); dense {result["dense_ms"]:.2f} ms')
    print(f'{"backend":>10}{"decisions":>16}{"sparse ms":>11}{"img/s":>9}{"speedup":>9}')
    for r in rows:
        print(f'{r["backend"]:>10}{r["decisions"]:>16}{r["ms"]:>11.2f}{r["images_per_s"]:>9.1f}{r["speedup"]:>9.2f}')
    write_json(args.json, result)
    print(f'wrote {args.json}')
    return result


if __name__ == '__main__':
    main(sys.argv[1:])
