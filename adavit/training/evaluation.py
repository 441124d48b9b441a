"""Validation: top-1/top-5, loss, per-layer keep-rates and (optionally) per-image MACs, exact under DDP.

Each rank evaluates a disjoint shard (``rank::world_size``, no padding, so no image counts twice) and the sums are
all-reduced. The model runs in eval mode with its default executor (sparse for AdaViT).
"""
import contextlib
import os
from typing import Any, Dict, Iterator, List, Mapping, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, Subset

from ..errors import CheckpointError, ConfigError
from ..model.adavit import AdaViT
from .distributed import DistEnv, all_gather_objects, all_reduce_sum

KEEP_KINDS = ('patch', 'head', 'msa', 'ffn')


def shard(dataset: Dataset, env: DistEnv) -> Dataset:
    """This rank's share of an evaluation set."""
    if not env.distributed:
        return dataset
    return Subset(dataset, range(env.rank, len(dataset), env.world_size))  # type: ignore[arg-type]


def eval_loader(dataset: Dataset, env: DistEnv, batch_size: int, workers: int = 0) -> DataLoader:
    return DataLoader(shard(dataset, env), batch_size=batch_size, shuffle=False, num_workers=workers,
                      generator=torch.Generator().manual_seed(0), persistent_workers=False)


@contextlib.contextmanager
def fixed_random_policy(model: nn.Module, seed: Optional[int] = None) -> Iterator[None]:
    """Evaluate a random-policy AdaViT with decisions drawn from its seed, then give training its generator back."""
    if getattr(model, 'policy', None) != 'random':
        yield
        return
    saved = model._generator.get_state() if model._generator is not None else None
    model.reset_random_policy(seed)
    try:
        yield
    finally:
        if saved is None:
            model._generator = None
        else:
            model._generator.set_state(saved)


@torch.no_grad()
def evaluate(
        model: nn.Module,
        loader: DataLoader,
        env: DistEnv,
        amp_dtype: Optional[torch.dtype] = None,
        with_macs: bool = False,
        progress: Any = None,
) -> Dict[str, Any]:
    """Accuracy, loss and keep-rates of ``model`` on ``loader`` (this rank's shard), reduced over ranks.

    Args:
        model: The model (not DDP-wrapped); it is put in eval mode.
        loader: Batches of (images, labels).
        env: The distributed environment.
        amp_dtype: Autocast dtype, or None for full precision.
        with_macs: Also count each image's MACs under its decisions (``adavit.cost.macs.macs``).
        progress: Wraps the batch iterator (a progress bar), or None.

    Returns:
        ``top1``, ``top5`` (percent), ``loss``, ``count``, ``keep`` (per kind, a list over layers), ``keep_mean`` (per
        kind), and with ``with_macs`` the per-image ``macs`` list (all ranks, in no particular order).
    """
    model.eval()
    adaptive = isinstance(model, AdaViT)
    depth = len(getattr(model, 'blocks', []))
    sums = torch.zeros(4 + len(KEEP_KINDS) * max(depth, 1), dtype=torch.float64)
    per_image_macs: List[float] = []
    num_classes = int(getattr(model, 'num_classes', 0) or 0)
    k5 = min(5, num_classes) if num_classes else 5
    if with_macs:
        from adavit.cost.macs import macs as count_macs
    batches = progress(loader) if progress is not None else loader
    with fixed_random_policy(model):
        for images, target in batches:
            images, target = images.to(env.device), target.to(env.device)
            with torch.autocast(env.device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
                if adaptive:
                    logits, decisions = model(images, return_decisions=True)
                else:
                    logits, decisions = model(images), None
            logits = logits.float()
            top = logits.topk(k5, dim=1).indices
            hits = top.eq(target[:, None])
            sums[0] += hits[:, :1].any(dim=1).sum().item()
            sums[1] += hits.any(dim=1).sum().item()
            sums[2] += F.cross_entropy(logits, target, reduction='sum').item()
            sums[3] += len(target)
            if decisions is not None:
                prefix = model.num_prefix_tokens
                rates = [decisions.patch[:, :, prefix:].float().mean(dim=2), decisions.head.float().mean(dim=2),
                         decisions.block[:, :, 0].float(), decisions.block[:, :, 1].float()]  # each (B, depth)
                for i, rate in enumerate(rates):
                    sums[4 + i * depth:4 + (i + 1) * depth] += rate.sum(dim=0).double().cpu()
            else:
                sums[4:] += len(target)
            if with_macs:
                # Cost the decisions this pass took (a second pass of a random policy would draw others).
                per_image_macs.extend(count_macs(model, images, decisions).double().cpu().tolist() if decisions
                                      is not None else count_macs(model, images).double().cpu().tolist())
            if progress is not None and hasattr(batches, 'set_postfix'):
                batches.set_postfix(top1=f'{100 * sums[0].item() / sums[3].item():.2f}')
    sums = all_reduce_sum(env, sums)
    count = max(sums[3].item(), 1.0)
    keep = {kind: [round(v / count, 6) for v in sums[4 + i * depth:4 + (i + 1) * depth].tolist()]
            for i, kind in enumerate(KEEP_KINDS)} if depth else {}
    out: Dict[str, Any] = {
        'top1': 100.0 * sums[0].item() / count,
        'top5': 100.0 * sums[1].item() / count,
        'loss': sums[2].item() / count,
        'count': int(sums[3].item()),
        'keep': keep,
        'keep_mean': {kind: sum(v) / len(v) for kind, v in keep.items() if v},
    }
    if with_macs:
        out['macs'] = [m for part in all_gather_objects(env, per_image_macs) for m in part]
    return out



def evaluate_checkpoint(
        checkpoint: str,
        data: Optional[Dict[str, Any]] = None,
        batch_size: int = 256,
        compare_dense: Optional[str] = None,
        device: str = 'cpu',
        ema: Optional[bool] = None,
        executor: Optional[str] = None,
        progress: Any = None,
) -> Dict[str, Any]:
    """Everything ``adavit eval`` reports for ``checkpoint`` on the validation split.

    Args:
        checkpoint: One of our checkpoints (AdaViT or dense).
        data: Overrides of the checkpoint's ``data`` section (``name``, ``dir``, ``val_subset``, ``workers``).
        batch_size: Eval batch size.
        compare_dense: ``""``: also evaluate the dense backbone recorded in the checkpoint; a path: that backbone;
            None: no comparison.
        device: Where to run.
        ema: Use the EMA weights (None: when present).
        executor: Override the AdaViT executor (``"sparse"`` default, ``"masked"``).
        progress: Wraps batch iterators (progress bars), or None.

    Returns:
        ``top1``, ``top5``, ``loss``, ``count``, ``gmacs_mean``, ``gmacs_p50``, ``gmacs_p95``, ``dense_gmacs``,
        ``keep`` (per kind, per layer), ``keep_mean``, and with ``compare_dense`` ``dense_top1``, ``dense_top5``,
        ``dense_gmacs_mean`` and ``dense_checkpoint``.
    """
    import numpy as np
    from ..cost.macs import dense_macs
    from ..data.datasets import build_datasets
    from .builder import load_dense, model_section
    from .checkpoint import load_model, read_checkpoint
    from .distributed import DistEnv

    env = DistEnv(device=torch.device(device))
    saved = read_checkpoint(checkpoint)
    config = saved['config'] if isinstance(saved['config'].get('data'), dict) else {}
    data_cfg = dict(config.get('data') or {})
    data_cfg.update({k: v for k, v in (data or {}).items() if v is not None})
    model = load_model(checkpoint, ema=ema, device=env.device)
    if executor is not None and isinstance(model, AdaViT):
        model.executor = executor

    def run(net: nn.Module) -> Dict[str, Any]:
        datasets, classes = build_datasets(data_cfg, net, splits=('val',))
        num_classes = getattr(net, 'num_classes', None)
        if num_classes != len(classes):
            raise ConfigError(f'the dataset has {len(classes)} classes but the checkpoint\'s model has {num_classes}: '
                              f'evaluate it on the data it was trained for')
        return evaluate(net, eval_loader(datasets['val'], env, batch_size, int(data_cfg.get('workers') or 0)), env,
                        with_macs=True, progress=progress)

    result = run(model)
    gmacs = np.asarray(result.pop('macs'), dtype=np.float64) / 1e9
    out: Dict[str, Any] = {
        'checkpoint': checkpoint, 'data': str(data_cfg.get('name')), 'count': result['count'],
        'top1': result['top1'], 'top5': result['top5'], 'loss': result['loss'],
        'gmacs_mean': float(gmacs.mean()) if gmacs.size else 0.0,
        'gmacs_p50': float(np.percentile(gmacs, 50)) if gmacs.size else 0.0,
        'gmacs_p95': float(np.percentile(gmacs, 95)) if gmacs.size else 0.0,
        'dense_gmacs': dense_macs(model) / 1e9,
        'keep': result['keep'], 'keep_mean': result['keep_mean'],
    }
    if compare_dense is not None:
        path = compare_dense or saved.get('backbone')
        if not path:
            if isinstance(model, AdaViT) and any(model.patch_gated.tolist() + model.head_gated.tolist()
                                                  + model.block_gated.tolist()):
                raise ConfigError(f'{checkpoint} records no dense backbone: pass --compare-dense BACKBONE.pt')
            path = checkpoint  # a dense checkpoint is its own backbone
        if not os.path.isfile(path):
            raise CheckpointError(f'dense backbone {path} does not exist: pass --compare-dense BACKBONE.pt')
        dense = load_dense(path, dict(model_section(saved['config'])), check=False).to(env.device)
        dense_result = run(dense)
        dense_gmacs = np.asarray(dense_result.pop('macs'), dtype=np.float64) / 1e9
        out.update({'dense_checkpoint': path, 'dense_top1': dense_result['top1'], 'dense_top5': dense_result['top5'],
                    'dense_gmacs_mean': float(dense_gmacs.mean()) if dense_gmacs.size else 0.0})
        out['macs_reduction'] = out['dense_gmacs_mean'] / out['gmacs_mean'] if out['gmacs_mean'] else None
    return out



def gated_keep_rates(keep: Mapping[str, List[float]], model: nn.Module) -> Dict[str, float]:
    """Mean keep-rates (patch, head, block) over the layers where each decision is made.

    These are the rates a random policy must draw at to cost what ``model``'s own decisions cost (the paper's Random
    and Random+ baselines "at the same budget"). Layers without a decision network keep everything by construction;
    averaging them in would inflate the rates. Block averages MSA and FFN, which the random policy draws at one rate.

    Args:
        keep: Per-layer keep-rates by kind (``patch``, ``head``, ``msa``, ``ffn``), as ``evaluate`` reports them.
        model: The AdaViT they were measured on (its ``*_gated`` buffers say which layers decide).
    """
    per_layer = {'patch': keep['patch'], 'head': keep['head'],
                 'block': [(a + b) / 2 for a, b in zip(keep['msa'], keep['ffn'])]}
    out: Dict[str, float] = {}
    for kind in ('patch', 'head', 'block'):
        chosen = [v for v, g in zip(per_layer[kind], getattr(model, f'{kind}_gated').tolist()) if g]
        out[kind] = sum(chosen) / len(chosen) if chosen else 1.0
    return out
