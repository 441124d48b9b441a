"""Running a model over a dataset to gather what the pictures show: predictions, per-image cost, and usage per layer."""
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np
import torch
from torch import nn

from ..errors import ConfigError, InputError


@dataclass
class Collected:
    """What a model did over a dataset; per-image arrays are aligned (index i is the same image everywhere).

    Attributes:
        labels: (n,) int, ground truth.
        preds: (n,) int, top-1 predictions.
        gmacs: (n,) float, GMACs each image cost under the decisions taken.
        patch_keep: (depth,) mean fraction of image patches kept per layer (prefix/class tokens left out).
        head_keep: (depth, heads) mean keep of each head per layer.
        block_keep: (depth, 2) mean keep of [MSA, FFN] per layer.
        patch_gated: (depth,) bool, layers whose patches are decided (the others read 1 by construction).
        head_gated: (depth,) bool.
        block_gated: (depth,) bool.
        patches_kept: (n, depth) int, image patches kept per image and layer.
    """
    labels: np.ndarray
    preds: np.ndarray
    gmacs: np.ndarray
    patch_keep: np.ndarray
    head_keep: np.ndarray
    block_keep: np.ndarray
    patch_gated: np.ndarray
    head_gated: np.ndarray
    block_gated: np.ndarray
    patches_kept: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.int64))

    @property
    def num_images(self) -> int:
        return int(self.labels.shape[0])

    @property
    def top1(self) -> float:
        """Top-1 accuracy in percent."""
        return float(100.0 * np.mean(self.preds == self.labels)) if self.num_images else float('nan')

    @property
    def gmacs_mean(self) -> float:
        return float(np.mean(self.gmacs)) if self.num_images else float('nan')


def _split_batch(batch: Any) -> Any:
    """(images, labels) from a DataLoader batch: a tuple/list or a dict with image/label keys."""
    if isinstance(batch, Mapping):
        images = next(batch[k] for k in ('image', 'images', 'input', 'x') if k in batch)
        labels = next(batch[k] for k in ('label', 'labels', 'target', 'y') if k in batch)
        return images, labels
    return batch[0], batch[1]


def _dense_decisions(model: nn.Module, x: torch.Tensor) -> Any:
    """All-ones decisions for a dense ViT, so that a backbone goes through ``collect`` like an AdaViT."""
    from ..model.adavit import Decisions

    B, depth = x.shape[0], len(model.blocks)
    n = model.patch_embed.num_patches + int(getattr(model, 'num_prefix_tokens', 1))
    ones = x.new_ones(())
    none = torch.zeros(depth, dtype=torch.bool)
    return Decisions(ones.expand(B, depth, n), ones.expand(B, depth, model.blocks[0].attn.num_heads),
                     ones.expand(B, depth, 2), none, none, none)


def run_with_decisions(model: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, Any]:
    """``model(x, return_decisions=True)`` for an AdaViT; logits and all-ones decisions for a dense timm ViT."""
    from ..model.adavit import AdaViT

    if isinstance(model, AdaViT):
        return model(x, return_decisions=True)
    return model(x), _dense_decisions(model, x)


@torch.no_grad()
def collect(model: nn.Module, loader: Iterable[Any], max_batches: Optional[int] = None) -> Collected:
    """Run ``model`` in eval mode over ``loader`` and gather predictions, GMACs and the decisions' keep-rates.

    GMACs come from ``adavit.cost.macs.macs(model, x)``, the cost of each image under the decisions the model takes
    (imported here, lazily, so that pictures that need no cost work without it). The model's train/eval mode is
    restored afterwards.

    Args:
        model: An ``AdaViT``, or a dense timm ViT (keep-rates read 1, the cost is the dense cost).
        loader: Yields ``(images, labels)`` (or dicts with image/label keys).
        max_batches: Stop after this many batches (None: the whole loader).

    Returns:
        A ``Collected``. Keep-rates are means over all images (each image weighs the same).
    """
    from ..cost.macs import macs

    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    labels: List[np.ndarray] = []
    preds: List[np.ndarray] = []
    gmacs: List[np.ndarray] = []
    patches_kept: List[np.ndarray] = []
    sums: Dict[str, torch.Tensor] = {}
    count = 0
    gated: Dict[str, np.ndarray] = {}
    prefix = int(getattr(model, 'num_prefix_tokens', 1))
    try:
        for b, batch in enumerate(loader):
            if max_batches is not None and b >= max_batches:
                break
            x, y = _split_batch(batch)
            x = x.to(device)
            logits, dec = run_with_decisions(model, x)
            cost = macs(model, x, decisions=dec)  # costs the decisions just taken: no second forward
            labels.append(torch.as_tensor(y).reshape(-1).cpu().numpy().astype(np.int64))
            preds.append(logits.argmax(-1).cpu().numpy().astype(np.int64))
            gmacs.append(torch.as_tensor(cost).reshape(-1).double().cpu().numpy() / 1e9)
            patch = dec.patch[:, :, prefix:].float()  # (B, depth, N_patches): the class token is never dropped
            patches_kept.append(patch.sum(-1).round().long().cpu().numpy())
            parts = {'patch': patch.mean(-1).sum(0), 'head': dec.head.float().sum(0), 'block': dec.block.float().sum(0)}
            for k, v in parts.items():
                sums[k] = sums[k] + v.cpu() if k in sums else v.cpu()
            count += x.shape[0]
            gated = {'patch': dec.patch_gated.cpu().numpy(), 'head': dec.head_gated.cpu().numpy(),
                     'block': dec.block_gated.cpu().numpy()}
    finally:
        model.train(was_training)
    if count == 0:
        raise InputError('the data loader yielded no images: nothing to collect')
    return Collected(
        labels=np.concatenate(labels), preds=np.concatenate(preds), gmacs=np.concatenate(gmacs),
        patch_keep=(sums['patch'] / count).double().numpy(), head_keep=(sums['head'] / count).double().numpy(),
        block_keep=(sums['block'] / count).double().numpy(),
        patch_gated=gated['patch'].astype(bool), head_gated=gated['head'].astype(bool),
        block_gated=gated['block'].astype(bool), patches_kept=np.concatenate(patches_kept),
    )


@dataclass
class BudgetPoint:
    """One point of the accuracy-vs-cost curve: the thresholds used and what they gave."""
    thresholds: Dict[str, float]
    gmacs: float
    top1: float


def _as_thresholds(value: Union[float, Mapping[str, float]]) -> Dict[str, float]:
    if isinstance(value, Mapping):
        unknown = sorted(set(value) - {'patch', 'head', 'block'})
        if unknown:
            raise ConfigError(f'unknown threshold names {unknown}: use patch, head, block')
        return {k: float(v) for k, v in value.items()}
    return {'patch': float(value), 'head': float(value), 'block': float(value)}


def budget_curve(
        model: nn.Module,
        loader: Iterable[Any],
        thresholds: Sequence[Union[float, Mapping[str, float]]] = (0.3, 0.4, 0.5, 0.6, 0.7, 0.8),
        max_batches: Optional[int] = None,
) -> List[BudgetPoint]:
    """Sweep the run-time budget knob (``model.set_thresholds``) and measure mean GMACs and top-1 at each setting.

    The model's own thresholds are restored afterwards, also on error.

    Args:
        model: An ``AdaViT``.
        loader: Yields ``(images, labels)``; iterated once per setting, so it must be re-iterable (a DataLoader).
        thresholds: Settings: a float sets the patch, head and block thresholds alike; a mapping sets those named.
        max_batches: Batches per setting (None: all).

    Returns:
        One ``BudgetPoint`` per setting, in the order given.
    """
    original = {'patch': model.patch_threshold, 'head': model.head_threshold, 'block': model.block_threshold}
    points: List[BudgetPoint] = []
    try:
        for setting in thresholds:
            th = _as_thresholds(setting)
            model.set_thresholds(**original)  # a partial setting applies on top of the model's own, not the last one
            model.set_thresholds(**th)
            res = collect(model, loader, max_batches=max_batches)
            points.append(BudgetPoint(thresholds={**original, **th}, gmacs=res.gmacs_mean, top1=res.top1))
    finally:
        model.set_thresholds(**original)
    return points
