"""``adavit train``: train a dense backbone or fine-tune AdaViT from one, as a YAML config says.

Examples::

    adavit train --config configs/fashion_mnist_backbone.yaml
    adavit train --config configs/fashion_mnist_adavit.yaml --set loss.distill_weight=1.0
    adavit train --resume runs/fashion_mnist_adavit            # continue exactly where it stopped
    torchrun --nproc_per_node 2 -m adavit train --config configs/fashion_mnist_adavit.yaml

The resolved config is saved as ``config.yaml`` in the run folder, next to ``last.pt``, ``best.pt``, ``log.csv`` and
``metrics.json``.
"""
import argparse
import os
from typing import Any, Dict, List

from ..errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument('--config', '-c', help='YAML config (see configs/)')
    parser.add_argument('--set', dest='overrides', action='append', default=[], metavar='KEY=VALUE',
                        help='override a config entry, e.g. --set train.lr=3e-4 --set loss.budgets=[0.6,0.8,0.9]')
    parser.add_argument('--output', '-o', help='run folder (config: output)')
    parser.add_argument('--data', help="'fashion-mnist' or an ImageFolder with train/ and val/ (config: data.name)")
    parser.add_argument('--data-dir', help='folder of the Fashion-MNIST IDX files (config: data.dir)')
    parser.add_argument('--init', help='start from: our checkpoint, a timm/DeiT or official AdaViT file, or a timm '
                                       'model name with pretrained weights (config: init)')
    parser.add_argument('--policy', choices=('learned', 'random'),
                        help="'random': the paper's Random+ baseline, fine-tuning under random decisions at the "
                             'budgets (config: model.policy)')
    parser.add_argument('--epochs', type=int, help='config: train.epochs')
    parser.add_argument('--max-steps', type=int, help='stop after N optimizer steps, saving last.pt')
    parser.add_argument('--subset', type=int, help='train on the first N training images (config: data.subset)')
    parser.add_argument('--val-subset', type=int, help='validate on the first N images (config: data.val_subset)')
    parser.add_argument('--batch-size', type=int, help='per process (config: train.batch_size)')
    parser.add_argument('--lr', type=float, help='config: train.lr')
    parser.add_argument('--seed', type=int, help='config: seed')
    parser.add_argument('--save-every', type=int, help='also save last.pt every N steps (config: train.save_every)')
    parser.add_argument('--workers', type=int, help='data loader processes (config: data.workers)')
    parser.add_argument('--device', help="'auto', 'cpu' or 'cuda' (config: train.device)")
    parser.add_argument('--amp', choices=('none', 'bf16', 'fp16'), help='config: train.amp')
    parser.add_argument('--ema', action=argparse.BooleanOptionalAction, default=None, help='config: train.ema')
    parser.add_argument('--compile', action=argparse.BooleanOptionalAction, default=None,
                        help='torch.compile the training forward (config: train.compile)')
    parser.add_argument('--distill', type=float, metavar='WEIGHT',
                        help='distillation weight from the dense --init backbone (config: loss.distill_weight)')
    parser.add_argument('--deterministic', action='store_true', default=None,
                        help='deterministic algorithms (bit-exact resume; slower) (config: train.deterministic)')
    parser.add_argument('--threads', type=int, help='torch threads per process (config: train.threads)')
    parser.add_argument('--no-progress', action='store_true', help='no progress bars')
    parser.add_argument('--resume', help='continue a run: its folder or a checkpoint (last.pt)')
    parser.add_argument('--overwrite', action='store_true', help='start afresh in an output folder holding a run')


_FLAGS = {
    'output': ('output',), 'data': ('data', 'name'), 'data_dir': ('data', 'dir'), 'init': ('init',),
    'policy': ('model', 'policy'), 'epochs': ('train', 'epochs'), 'max_steps': ('train', 'max_steps'),
    'subset': ('data', 'subset'), 'val_subset': ('data', 'val_subset'), 'batch_size': ('train', 'batch_size'),
    'lr': ('train', 'lr'), 'seed': ('seed',), 'save_every': ('train', 'save_every'),
    'workers': ('data', 'workers'), 'device': ('train', 'device'), 'amp': ('train', 'amp'), 'ema': ('train', 'ema'),
    'compile': ('train', 'compile'), 'distill': ('loss', 'distill_weight'),
    'deterministic': ('train', 'deterministic'), 'threads': ('train', 'threads'),
}


def flag_overrides(args: argparse.Namespace) -> List[Dict[str, Any]]:
    """The specific flags as config overrides (applied after ``--set``, so a flag wins)."""
    out: List[Dict[str, Any]] = []
    for flag, path in _FLAGS.items():
        value = getattr(args, flag, None)
        if value is None:
            continue
        layer: Dict[str, Any] = {}
        node = layer
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
        out.append(layer)
    if getattr(args, 'no_progress', False):
        out.append({'train': {'progress': False}})
    return out


def resolve(args: argparse.Namespace) -> Dict[str, Any]:
    """The run's config: the resumed checkpoint's (if any) <- ``--config`` <- ``--set`` <- flags."""
    from ..training.config import build_config, parse_override
    from ..training.checkpoint import read_checkpoint
    from ..training.trainer import resolve_resume
    base = None
    if args.resume:
        base = dict(read_checkpoint(resolve_resume(args.resume))['config'])
        # --max-steps marks where one invocation stops, not where the run ends: a resume goes on unless told again.
        base['train'] = dict(base['train'], max_steps=None)
        if args.output is None:
            base['output'] = os.path.dirname(os.path.abspath(resolve_resume(args.resume)))
    elif args.config is None:
        raise ConfigError('pass --config FILE (see configs/) or --resume RUN')
    overrides = [parse_override(item) for item in args.overrides] + flag_overrides(args)
    config = build_config(args.config, overrides, base=base)
    model = config['model']
    export_overridden = any('export' in (layer.get('train') or {}) for layer in overrides)
    if args.policy == 'random' and args.config and config['train'].get('export') and not export_overridden:
        raise ConfigError(f'--policy random would export the Random+ weights over {config["train"]["export"]}, the '
                          f'learned model of {args.config}: add --set train.export=PATH (or train.export=null)')
    if model.get('policy') == 'random' and 'random_keep' not in model:
        # Random+ runs at the budgets the learned policy is trained toward, unless told otherwise.
        model['random_keep'] = [float(b) for b in config['loss']['budgets']]
    return config


def run(args: argparse.Namespace) -> int:
    from ..training.trainer import train
    config = resolve(args)
    metrics = train(config, resume=args.resume, overwrite=args.overwrite)
    return 0 if metrics is not None else 1
