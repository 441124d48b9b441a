"""Where a forward's time goes, part by part: dense timm against the sparse executor, inside the running models (CPU).

The efficiency ``adavit benchmark`` reports is the dense model's time over the MAC ratio, divided by the sparse model's
time. This splits that gap into parts. Every aten op a forward runs is timed as it returns (a ``TorchDispatchMode``;
on a CPU ops run synchronously) and put in a part:

* ``qkv``, ``proj``, ``fc1``, ``fc2``: matmuls by the weight they read (timm's, or the executor's re-laid-out copy);
* ``other matmuls``: the rest (decision networks, classifier head);
* ``attention``: ``scaled_dot_product_attention``, and the executor's matmul path (``baddbmm``, ``softmax``, ``bmm``);
* ``gathers``: ``index_select``, ``index_copy_``, ``index_put_`` (kept rows in, results out, the padded attention
  layout), which the dense model does not run;
* ``norms``, ``activation``, ``patch embedding``, and ``other ops``;
* ``between ops``: the forward's wall time less its ops' time: Python, the planning in NumPy, the dispatcher. In each
  round a model runs its inputs without the mode, timed whole, and then again under it, op by op (after an untimed
  call, as ``adavit benchmark`` takes turns); the parts add up to the mean wall time without the mode. It comes out
  negative where the ops ran slower under the mode than the same forwards did just before it (the host's drift, or
  the mode's own work between ops): at large batches, where Python takes a few percent, it measures that, not Python.

Per part it prints milliseconds per forward, GMACs and GMAC/s for both models, and the part's *excess*: its sparse time
less its dense time over the MAC ratio. At an efficiency of 1 every part would take its MAC-ratio share of its dense
time; the excesses add up to what the sparse forward takes beyond that (a part that saves more than the ratio, as
attention does, has a negative one; one that saves less, as fc2, which dropped heads do not shrink, a positive one).
A matmul part's *rate loss* sets its MACs aside: its sparse time less the dense time of as many MACs at the dense
model's rate. Writes JSON.

    python benchmarks/time_breakdown.py --batch-size 64 --threads 2
    python benchmarks/time_breakdown.py --batch-size 1 --policy gates --threads 2
"""
import argparse
import os
import statistics
import sys
import time
from collections import defaultdict
from typing import Any, Dict, List, Tuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode

import adavit  # noqa: F401 (registers the AdaViT models)
from adavit.cli.benchmark import build_model
from adavit.cost.benchmark import (balanced_orders, batches_per_round, machine_info, mean_adaptive_macs,
                                   pin_allocator, timer)
from adavit.cost.macs import dense_macs
from adavit.files import write_json

aten = torch.ops.aten
LINEARS = {'attn.qkv': 'qkv', 'attn.proj': 'proj', 'mlp.fc1': 'fc1', 'mlp.fc2': 'fc2'}
PARTS = ('qkv', 'proj', 'fc1', 'fc2', 'other matmuls', 'attention', 'gathers', 'norms', 'activation',
         'patch embedding', 'other ops', 'between ops')
_ATTENTION = {aten.bmm, aten.baddbmm, aten._softmax, aten.softmax, aten._scaled_dot_product_flash_attention_for_cpu,
              aten.scaled_dot_product_attention}
_GATHERS = {aten.index_select, aten.index_copy_, aten.index_copy, aten.index_put_, aten.index_put}
_NORMS = {aten.native_layer_norm, aten.layer_norm}
_ACTIVATIONS = {aten.gelu, aten.gelu_}
_CONVOLUTIONS = {aten.conv2d, aten.convolution, aten._convolution, aten.mkldnn_convolution}


def weight_parts(*models: torch.nn.Module) -> Dict[int, str]:
    """Storage address -> part, for the weights of every block linear of ``models``: timm's own, and every tensor the
    sparse executor keeps on the module (its re-laid-out copies; run a sparse forward first, which makes them)."""
    parts = {}
    for model in models:
        for name, module in model.named_modules():
            part = next((p for suffix, p in LINEARS.items() if name.endswith(suffix)), None)
            if part is None:
                continue
            pending: List[Any] = [module.weight] + list(module.__dict__.values())
            while pending:  # the caches hold tensors inside tuples
                value = pending.pop()
                if isinstance(value, torch.Tensor):
                    parts[value.untyped_storage().data_ptr()] = part
                elif isinstance(value, (tuple, list)):
                    pending.extend(value)
    return parts


def classify(func, args: Tuple[Any, ...], weights: Dict[int, str]) -> Tuple[str, int]:
    """The part an aten call belongs to, and its multiply-adds (matmuls and attention only; else 0)."""
    packet = func.overloadpacket
    if packet is aten.matmul and args[0].dim() > 2 and args[1].dim() > 2:  # timm's attention with fused_attn off
        a, b = args[:2]
        return 'attention', a.numel() * b.shape[-1]
    if packet in (aten.mm, aten.addmm, aten.linear, aten.matmul):
        # Under a mode an inference-mode forward reaches aten.linear whole (x, weight (out, in)); the executor's own
        # matmuls are addmm and mm (x, weight^T (in, out)).
        x, w = (args[1], args[2]) if packet is aten.addmm else args[:2]
        out_features = w.shape[0] if packet is aten.linear else w.shape[-1]
        part = weights.get(w.untyped_storage().data_ptr(), 'other matmuls')
        return part, x.numel() * out_features
    if packet in _ATTENTION:
        if packet in (aten.bmm, aten.baddbmm):
            a, b = args[:2] if packet is aten.bmm else args[1:3]
            return 'attention', a.shape[0] * a.shape[1] * a.shape[2] * b.shape[2]
        if packet in (aten._softmax, aten.softmax):
            return 'attention', 0
        q, k = args[:2]  # (..., L, E) and (..., S, E): q k^T and the weighted sum of v
        return 'attention', 2 * q.numel() * k.shape[-2]
    for part, packets in (('gathers', _GATHERS), ('norms', _NORMS), ('activation', _ACTIVATIONS),
                          ('patch embedding', _CONVOLUTIONS)):
        if packet in packets:
            return part, 0
    return 'other ops', 0


class PartTimer(TorchDispatchMode):
    """Times every aten op run under it, by part (``classify``): seconds, multiply-adds and calls."""

    def __init__(self, weights: Dict[int, str]) -> None:
        super().__init__()
        self.weights = weights
        self.seconds: Dict[str, float] = defaultdict(float)
        self.macs: Dict[str, int] = defaultdict(int)
        self.calls: Dict[str, int] = defaultdict(int)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        start = time.perf_counter()
        out = func(*args, **(kwargs or {}))
        elapsed = time.perf_counter() - start
        part, macs = classify(func, args, self.weights)
        self.seconds[part] += elapsed
        self.macs[part] += macs
        self.calls[part] += 1
        return out


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--model', default='adavit_deit_small_patch16_224')
    parser.add_argument('--policy', choices=('random', 'gates', 'keep-all'), default='random',
                        help='as `adavit benchmark` takes it')
    parser.add_argument('--keep', default='0.7,0.7,0.9', help='keep-rates patch,head,block')
    parser.add_argument('--batch-size', type=int, default=64)
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: torch\'s choice)')
    parser.add_argument('--images-per-round', type=int, default=64,
                        help='a round covers about this many images (at least one batch)')
    parser.add_argument('--warmup', type=int, default=1)
    parser.add_argument('--repeats', type=int, default=3, help='rounds, timed without the mode, then with it')
    parser.add_argument('--json', default=os.path.join(os.path.dirname(__file__), 'results', 'time_breakdown.json'))
    return parser.parse_args(argv)


def main(argv: List[str]) -> Dict[str, object]:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    allocator = pin_allocator()
    keep = [float(k) for k in args.keep.split(',')]
    model = build_model(argparse.Namespace(checkpoint=None, model=args.model, policy=args.policy, keep=keep)).eval()
    dense = model.dense_twin().eval()
    count = batches_per_round(args.batch_size, args.images_per_round)
    generator = torch.Generator().manual_seed(0)
    height, width = model.patch_embed.img_size
    inputs = [torch.randn(args.batch_size, model.patch_embed.proj.in_channels, height, width, generator=generator)
              for _ in range(count)]
    reseed = model.policy == 'random'
    runs = {'dense': timer(dense, inputs, False, torch.device('cpu')),
            'sparse': timer(model, inputs, reseed, torch.device('cpu'))}
    # Its sparse forwards also make the executor's weight copies, which ``weight_parts`` maps.
    mac_ratio = dense_macs(dense) / mean_adaptive_macs(model, inputs, reseed)
    names = list(runs)
    orders = balanced_orders(len(names))
    with torch.inference_mode():
        weights = weight_parts(model, dense)
        timers = {name: PartTimer(weights) for name in runs}
        walls: Dict[str, List[float]] = {name: [] for name in runs}  # seconds a round, without the mode
        for round_index in range(args.warmup + args.repeats):
            for name in (names[j] for j in orders[round_index % len(orders)]):
                runs[name](count - 1)  # untimed: the turn starts from this model's own state
                seconds = sum(runs[name](i) for i in range(count))
                if round_index < args.warmup:
                    continue
                walls[name].append(seconds)
                with timers[name]:
                    for i in range(count):
                        runs[name](i)
    forwards = args.repeats * count
    parts: Dict[str, Dict[str, Dict[str, float]]] = {}
    for name, part_timer in timers.items():
        ms = {part: part_timer.seconds[part] / forwards * 1e3 for part in PARTS[:-1]}
        ms['between ops'] = sum(walls[name]) / forwards * 1e3 - sum(ms.values())
        parts[name] = {part: {'ms': ms[part], 'gmacs': part_timer.macs[part] / forwards / 1e9,
                              'calls': part_timer.calls[part] / forwards} for part in PARTS}
    rows = []
    for part in PARTS:
        d, s = parts['dense'][part], parts['sparse'][part]
        rows.append({'part': part, 'dense_ms': d['ms'], 'sparse_ms': s['ms'],
                     'excess_ms': s['ms'] - d['ms'] / mac_ratio,
                     # the sparse time less the dense time of as many MACs at the dense rate: a slower matmul's loss
                     'rate_loss_ms': s['ms'] - d['ms'] * s['gmacs'] / d['gmacs'] if d['gmacs'] else None,
                     'dense_gmacs': d['gmacs'], 'sparse_gmacs': s['gmacs'],
                     'dense_gmac_per_s': d['gmacs'] / d['ms'] * 1e3 if d['gmacs'] and d['ms'] > 0 else None,
                     'sparse_gmac_per_s': s['gmacs'] / s['ms'] * 1e3 if s['gmacs'] and s['ms'] > 0 else None,
                     'dense_calls': d['calls'], 'sparse_calls': s['calls']})
    wall = {name: statistics.median(seconds) / count for name, seconds in walls.items()}
    efficiency = wall['dense'] / wall['sparse'] / mac_ratio
    result = {'benchmark': 'time_breakdown', 'model': args.model, 'policy': args.policy, 'keep': keep,
              'batch_size': args.batch_size, 'inputs': count, 'threads': torch.get_num_threads(),
              'machine': machine_info('cpu'), 'allocator': allocator, 'warmup': args.warmup, 'repeats': args.repeats,
              'dense_ms': wall['dense'] * 1e3, 'sparse_ms': wall['sparse'] * 1e3, 'mac_ratio': mac_ratio,
              **{f'{name}_ms_mean': sum(seconds) / forwards * 1e3 for name, seconds in walls.items()},
              'efficiency': efficiency, 'rows': rows}
    print(f'# {args.model}, {args.policy} keep {args.keep}, batch {args.batch_size}, {result["threads"]} threads, cpu '
          f'fp32; machine: {result["machine"]["cpu"]}')
    print(f'# per forward, medians of {args.repeats} rounds: dense {result["dense_ms"]:.1f} ms, sparse '
          f'{result["sparse_ms"]:.1f} ms, MAC ratio {mac_ratio:.2f}, efficiency {efficiency:.3f}; the parts add up to '
          f'the means: dense {result["dense_ms_mean"]:.1f} ms, sparse {result["sparse_ms_mean"]:.1f} ms')
    print('# excess = sparse ms - dense ms / MAC ratio: what a part takes beyond its share at an efficiency of 1; '
          'rate loss = sparse ms - dense ms x sparse MACs / dense MACs: what a matmul loses to a slower rate')
    print(f'{"part":<16}{"dense ms":>10}{"sparse ms":>11}{"excess ms":>11}{"rate loss":>11}{"dense GMAC/s":>14}'
          f'{"sparse GMAC/s":>15}{"dense ops":>11}{"sparse ops":>12}')
    for r in rows:
        optional = ''.join(f'{value:>{width}.1f}' if value is not None else f'{"-":>{width}}' for value, width in
                           ((r['rate_loss_ms'], 11), (r['dense_gmac_per_s'], 14), (r['sparse_gmac_per_s'], 15)))
        print(f'{r["part"]:<16}{r["dense_ms"]:>10.1f}{r["sparse_ms"]:>11.1f}{r["excess_ms"]:>11.1f}{optional}'
              f'{r["dense_calls"]:>11.0f}{r["sparse_calls"]:>12.0f}')
    write_json(args.json, result)
    print(f'wrote {args.json}')
    return result


if __name__ == '__main__':
    main(sys.argv[1:])
