"""``adavit benchmark``: dense timm vs AdaViT sparse vs AdaViT masked, interleaved; prints a table, writes JSON."""
import argparse
from typing import Dict, List, Optional

import timm
import torch

from ..cost.benchmark import (ACCELERATOR_WARMUP_CALLS, INTERLEAVES, batches_per_round, format_rows, machine_info,
                              measure_speed, missing_device, rows_as_dicts)
from ..errors import ConfigError
from ..files import write_json
from ..gates.budget import calibrate_thresholds
from ..model.adavit import AdaViT


def _floats(text: str) -> List[float]:
    return [float(v) for v in text.split(',')]


def _ints(text: str) -> List[int]:
    return [int(v) for v in text.split(',')]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--model', default='adavit_deit_small_patch16_224', help='registered AdaViT name')
    parser.add_argument('--checkpoint', default=None, help='time a trained checkpoint with its own learned decisions')
    parser.add_argument('--policy', choices=('random', 'gates', 'keep-all'), default='random',
                        help='decisions for --model: random at --keep (frozen per input); gates: the decision '
                             'networks at their initial weights, thresholds set to keep --keep on noise images, so '
                             'that each image gets its own decisions from its content, as with trained gates; or '
                             'keep everything')
    parser.add_argument('--keep', type=_floats, default=[0.7, 0.7, 0.9],
                        help='keep-rates patch,head,block of the random policy or the gates (default about half the '
                             'dense MACs)')
    parser.add_argument('--batch-sizes', type=_ints, default=[1, 64])
    parser.add_argument('--threads', type=int, default=None, help='torch threads (default: as torch starts)')
    parser.add_argument('--device', default='cpu', help='cpu or cuda')
    parser.add_argument('--dtype', choices=('fp32', 'bf16', 'fp16'), default='fp32')
    parser.add_argument('--warmup', type=int, default=2)
    parser.add_argument('--repeats', type=int, default=5)
    parser.add_argument('--images-per-round', type=int, default=64)
    parser.add_argument('--interleave', choices=INTERLEAVES, default='turn',
                        help='turn (default): each model runs all of a round\'s inputs in a row, after an untimed '
                             'call, as a deployed model follows itself; input: the models take turns on every input, '
                             'so each call follows another model\'s')
    parser.add_argument('--data', default=None,
                        help='time on real validation images of this dataset (fashion-mnist or an ImageFolder root); '
                             'default with --checkpoint: the dataset it was trained on (learned gates decide from '
                             'the content, so noise would time decisions real images never get); else Gaussian noise')
    parser.add_argument('--data-dir', default=None, help='Fashion-MNIST folder (default: the Debian package path)')
    parser.add_argument('--json', default='benchmarks/results/speed.json', help='where to write the results')


def _keep_rates(args: argparse.Namespace) -> List[float]:
    """The keep-rates (patch, head, block) that ``--policy`` and ``--keep`` ask for."""
    return [1.0, 1.0, 1.0] if args.policy == 'keep-all' else list(args.keep)


def build_model(args: argparse.Namespace) -> AdaViT:
    if args.checkpoint:
        from ..training.checkpoint import load_model
        model = load_model(args.checkpoint)
        if not isinstance(model, AdaViT):
            raise ConfigError(f'{args.checkpoint} holds a dense model: benchmark needs an AdaViT checkpoint')
        return model
    if args.model not in timm.list_models('ada*'):
        raise ConfigError(f'unknown model {args.model!r}: choose from {timm.list_models("ada*")}')
    keep = _keep_rates(args)
    if len(keep) != 3 or not all(0.0 <= k <= 1.0 for k in keep):
        raise ConfigError(f'--keep takes three keep-rates patch,head,block in [0, 1], got {args.keep}')
    if args.policy != 'gates':
        return timm.create_model(args.model, policy='random', random_keep=keep)
    with torch.random.fork_rng():  # the gates' initial weights, the same in every run
        torch.manual_seed(0)
        model = timm.create_model(args.model, policy='learned')
    reached = calibrate_gates(model, keep)
    print(f'# gates: thresholds set on {GATE_CALIBRATION_IMAGES} noise images to keep patch {reached["patch"]:.3f}, '
          f'head {reached["head"]:.3f}, block {reached["block"]:.3f}', flush=True)
    return model


# The gates' thresholds are set on this many Gaussian-noise images (their own seed: not the timed inputs).
GATE_CALIBRATION_IMAGES = 16


def calibrate_gates(model: AdaViT, keep: List[float]) -> Dict[str, float]:
    """Set ``model``'s thresholds so that its decision networks keep the fractions ``keep`` (patch, head, block) of
    noise images, and return the keep-rates reached. At their initial weights the networks' logits vary with the
    input, so each image gets decisions of its own, at the cost of the networks themselves."""
    channels, (height, width) = model.patch_embed.proj.in_channels, model.patch_embed.img_size
    generator = torch.Generator().manual_seed(1)
    images = torch.randn(GATE_CALIBRATION_IMAGES, channels, height, width, generator=generator)
    with torch.inference_mode():
        return calibrate_thresholds(model, images, patch=keep[0], head=keep[1], block=keep[2], steps=10)


def validation_images(model: AdaViT, args: argparse.Namespace, count: int) -> Optional[torch.Tensor]:
    """The first ``count`` validation images of ``--data`` (or of the checkpoint's dataset), preprocessed for
    ``model``."""
    data = {'name': args.data} if args.data else None
    if data is None and args.checkpoint:
        from ..training.checkpoint import read_checkpoint
        data = dict(read_checkpoint(args.checkpoint)['config'].get('data') or {})
    if data is None:
        return None
    from ..data.datasets import build_datasets
    data.update(val_subset=count, dir=args.data_dir or data.get('dir'))
    dataset = build_datasets(data, model, splits=('val',))[0]['val']
    return torch.stack([dataset[i][0] for i in range(len(dataset))])  # (count, C, H, W)


def run(args: argparse.Namespace) -> int:
    problem = missing_device(args.device)
    if problem:
        raise ConfigError(problem)
    model = build_model(args)
    keep = None if args.checkpoint else _keep_rates(args)
    decisions = 'learned' if args.checkpoint else args.policy
    print(f'# {args.checkpoint or args.model}, decisions: {decisions}{"" if keep is None else f" keep={tuple(keep)}"}',
          flush=True)
    needed = max(b * batches_per_round(b, args.images_per_round) for b in args.batch_sizes)  # the largest round
    images = validation_images(model, args, needed)
    print(f'# inputs: {f"{len(images)} validation images" if images is not None else "Gaussian noise"}', flush=True)
    machine = machine_info(args.device)
    where = machine['cuda'] or f"{machine['cpu']}, {machine['cores']} cores"
    print(f'# machine: {where}, torch {machine["torch"]}; the models take turns by {args.interleave}', flush=True)
    rows = measure_speed(model, args.batch_sizes, args.threads, args.device, args.dtype, args.warmup, args.repeats,
                         args.images_per_round, log=None, images=images, interleave=args.interleave)
    print(format_rows(rows))
    if args.json:
        result = {
            'model': args.checkpoint or args.model,
            'decisions': decisions,
            'keep': keep,
            'thresholds': None if model.policy == 'random' else
            {k: getattr(model, f'{k}_threshold') for k in ('patch', 'head', 'block')},
            'inputs': 'validation images' if images is not None else 'gaussian noise',
            'machine': machine,
            # rounds as asked; on an accelerator each model also has ACCELERATOR_WARMUP_CALLS untimed calls at least
            'settings': {'warmup_rounds': args.warmup, 'timed_rounds': args.repeats,
                         'images_per_round': args.images_per_round, 'interleave': args.interleave,
                         'accelerator_warmup_calls': ACCELERATOR_WARMUP_CALLS},
            'rows': rows_as_dicts(rows),
        }
        write_json(args.json, result)
        print(f'wrote {args.json}')
    return 0
