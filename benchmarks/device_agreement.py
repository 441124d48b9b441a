"""Sparse against masked on one device: the same decisions, and logits that agree (issue #3's first check, anywhere).

The test suite proves the sparse executor against the masked reference on the CPU. A GPU runs other code (the
accelerator plan, the packed flash attention in bf16/fp16), and is lent for minutes at a time, so this runs the same
comparison there in one short command: a small AdaViT (head size 16, which the packed attention takes) in both head
modes and both patch policies, at each batch size, on random decisions with every edge case (no patch kept, no head
kept, MSA or FFN skipped for some images, all skipped), then on its own decision networks' decisions, then DeiT-S on
the random policy. Per case: the largest logit difference, absolute and relative to the largest logit, and the share of
images whose top-1 class agrees. In fp32 (TF32 off) a case passes with the same decisions and within
``FP32_TOLERANCE``, as in the tests. In bf16 and fp16 the differences are their own rounding, and the decision networks,
reading a residual stream rounded differently by each executor, can flip a unit near its threshold: reported, not
judged. Prints a table, writes JSON, and exits 1 when an fp32 case fails.

    python benchmarks/device_agreement.py --device cuda
    python benchmarks/device_agreement.py --device cuda --dtype bf16
"""
import argparse
import itertools
import os
import sys
from typing import Dict, List, Optional

import timm
import torch

import adavit  # noqa: F401 (registers the AdaViT models)
from adavit import AdaViT, Decisions
from adavit.cost.benchmark import DTYPES, machine_info, missing_device
from adavit.files import write_json

SMALL = dict(img_size=32, patch_size=4, embed_dim=64, depth=4, num_heads=4, num_classes=10)
EDGES = ('', 'mixed', 'all_skipped', 'no_patch', 'no_head')
FP32_TOLERANCE = 1e-4  # largest absolute logit difference, as tests/test_sparse.py asks


def edge_decisions(batch: int, tokens: int, depth: int, heads: int, edge: str, generator: torch.Generator) -> Decisions:
    """Random decisions, each image at its own patch keep-rate, with ``edge`` forced on some or all images."""
    patch = torch.rand(batch, depth, tokens, generator=generator) < torch.rand(batch, 1, 1, generator=generator)
    head = torch.rand(batch, depth, heads, generator=generator) < 0.5
    block = torch.rand(batch, depth, 2, generator=generator) < 0.6
    if edge == 'mixed':  # the first image keeps no patch, the second no head (MSA on), the last runs the FFN alone
        patch[0, :, 1:] = False
        head[min(1, batch - 1)] = False
        block[min(1, batch - 1), :, 0] = True
        block[-1, :, 0], block[-1, :, 1] = False, True
    elif edge == 'all_skipped':
        block[:] = False
    elif edge == 'no_patch':
        patch[:, :, 1:] = False
    elif edge == 'no_head':
        head[:] = False
        block[:] = True
    patch[:, :, 0] = True  # the class token is always kept
    gated = torch.ones(depth, dtype=torch.bool)
    return Decisions(patch.float(), head.float(), block.float(), gated, gated, gated)


def compare(model: AdaViT, x: torch.Tensor, decisions: Optional[Decisions] = None,
            reseed: Optional[int] = None) -> Dict[str, object]:
    """Both executors on ``x``: logit differences, top-1 agreement, and whether they took the same decisions.

    Args:
        decisions: Decisions to hand both executors, or None for the model's own.
        reseed: Reseed the random policy with this before each executor, so that both draw the same decisions.
    """
    outputs = {}
    with torch.inference_mode():
        for executor in ('masked', 'sparse'):
            model.executor = executor
            if reseed is not None:
                model.reset_random_policy(reseed)
            outputs[executor] = model(x, return_decisions=True, decisions=decisions)
    (masked, taken_masked), (sparse, taken_sparse) = outputs['masked'], outputs['sparse']
    masked, sparse = masked.float(), sparse.float()
    difference = (masked - sparse).abs().max().item()
    same = all(torch.equal(getattr(taken_masked, part), getattr(taken_sparse, part))
               for part in ('patch', 'head', 'block'))
    return dict(max_abs=difference, relative=difference / max(masked.abs().max().item(), 1e-12),
                top1_agree=(masked.argmax(-1) == sparse.argmax(-1)).float().mean().item(), same_decisions=same)


def small_cases(batch_sizes: List[int], device: torch.device, dtype: torch.dtype) -> List[Dict[str, object]]:
    """The small model: every head mode, patch policy, batch size and edge case, then its decision networks."""
    rows = []
    generator = torch.Generator().manual_seed(0)
    tokens = (SMALL['img_size'] // SMALL['patch_size']) ** 2 + 1
    for head_mode, patch_policy in itertools.product(('full', 'partial'), ('token', 'cls')):
        torch.manual_seed(0)
        model = AdaViT(head_mode=head_mode, patch_policy=patch_policy, **SMALL).eval()
        with torch.no_grad():  # gates that decide differently for each image
            for gate in (g for blk in model.blocks for g in (blk.patch_gate, blk.head_gate, blk.block_gate)
                         if g is not None):
                gate.weight.normal_(0, 0.3, generator=generator)
                gate.bias.fill_(0.4)
        model = model.to(device, dtype)
        name = f'{head_mode} heads, {patch_policy} patches'
        for batch in batch_sizes:
            x = torch.randn(batch, 3, SMALL['img_size'], SMALL['img_size'], generator=generator).to(device, dtype)
            for edge in EDGES:
                d = edge_decisions(batch, tokens, SMALL['depth'], SMALL['num_heads'], edge, generator)
                d.patch, d.head, d.block = (t.to(device, dtype) for t in (d.patch, d.head, d.block))
                rows.append(dict(case=name, decisions=edge or 'random', batch_size=batch, **compare(model, x, d)))
            rows.append(dict(case=name, decisions='gates', batch_size=batch, **compare(model, x)))
    return rows


def deit_case(batch: int, device: torch.device, dtype: torch.dtype) -> Dict[str, object]:
    """DeiT-S (random weights: nothing is downloaded) on the random policy at keep 0.7/0.7/0.9, which a GPU's sparse
    executor reads from the host."""
    torch.manual_seed(0)
    model = timm.create_model('adavit_deit_small_patch16_224', policy='random', random_keep=(0.7, 0.7, 0.9)).eval()
    model = model.to(device, dtype)
    x = torch.randn(batch, 3, 224, 224, generator=torch.Generator().manual_seed(1)).to(device, dtype)
    return dict(case='DeiT-S', decisions='random 0.7/0.7/0.9', batch_size=batch, **compare(model, x, reseed=0))


def format_table(rows: List[Dict[str, object]]) -> str:
    lines = [f'{"case":34s} {"decisions":18s} {"batch":>5s} {"max abs":>10s} {"relative":>10s} {"top-1":>6s} '
             f'{"same decisions":>14s}']
    for r in rows:
        lines.append(f'{r["case"]:34s} {r["decisions"]:18s} {r["batch_size"]:5d} {r["max_abs"]:10.2e} '
                     f'{r["relative"]:10.2e} {r["top1_agree"]:6.3f} {str(r["same_decisions"]):>14s}')
    return '\n'.join(lines)


def parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('--device', default='cpu')
    parser.add_argument('--dtype', choices=sorted(DTYPES), default='fp32')
    parser.add_argument('--batch-sizes', default='1,9,64')
    parser.add_argument('--deit-batch', type=int, default=64, help='DeiT-S batch size (0: leave DeiT-S out)')
    parser.add_argument('--json', default=os.path.join(os.path.dirname(__file__), 'results', 'device_agreement.json'))
    return parser.parse_args(argv)


def main(argv: List[str]) -> Dict[str, object]:
    args = parse_args(argv)
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    problem = missing_device(args.device)
    if problem:
        raise SystemExit(problem)
    if device.type == 'cuda':  # fp32 means fp32: no TF32 in either executor's matmuls
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
    rows = small_cases([int(b) for b in args.batch_sizes.split(',')], device, dtype)
    if args.deit_batch:
        rows.append(deit_case(args.deit_batch, device, dtype))
    judged = dtype == torch.float32
    failed = [r for r in rows if judged and (not r['same_decisions'] or r['max_abs'] > FP32_TOLERANCE)]
    machine = machine_info(str(device))
    print(f'# sparse against masked on {device}, {args.dtype}; machine: {machine["cuda"] or machine["cpu"]}')
    print(format_table(rows))
    if judged:
        verdict = f'{len(failed)} of {len(rows)} cases FAIL' if failed else f'all {len(rows)} cases pass'
    else:
        flipped = sum(not r['same_decisions'] for r in rows)
        verdict = f'{args.dtype}: reported, not judged ({flipped} cases with decisions flipped by its rounding)'
    worst = max(rows, key=lambda r: r['relative'])
    print(f'# worst: {worst["max_abs"]:.2e} absolute, {worst["relative"]:.2e} relative ({worst["case"]}, '
          f'{worst["decisions"]}, batch {worst["batch_size"]}); lowest top-1 agreement '
          f'{min(r["top1_agree"] for r in rows):.3f}; {verdict}')
    result = dict(device=str(device), dtype=args.dtype, tolerance=FP32_TOLERANCE if judged else None,
                  machine=machine, rows=rows, failed=len(failed))
    write_json(args.json, result)
    print(f'wrote {args.json}')
    return result


if __name__ == '__main__':
    sys.exit(1 if main(sys.argv[1:])['failed'] else 0)
