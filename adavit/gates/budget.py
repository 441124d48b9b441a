"""The run-time budget knob: move the decision thresholds of a trained model to trade accuracy for cost.

``AdaViT.set_thresholds`` shifts thresholds directly; ``calibrate_thresholds`` finds the thresholds that give target
keep-rates on sample images, so one trained model traces a whole accuracy-versus-cost curve without retraining.
``random_patch_keep_for_cost`` does the same for the random policy: the paper's baselines at a given cost.
"""
from typing import Dict, Optional

import torch

from ..cost.macs import decision_macs
from ..errors import ConfigError
from ..model.adavit import AdaViT, Decisions


def eval_keep_rates(decisions: Decisions, num_prefix_tokens: int = 1) -> Dict[str, float]:
    """Mean eval keep-rates over gated blocks: patches (prefix tokens left out), heads, and MSA/FFN sub-blocks."""
    rates = {}
    if decisions.patch_gated.any():
        rates['patch'] = decisions.patch[:, decisions.patch_gated, num_prefix_tokens:].mean().item()
    if decisions.head_gated.any():
        rates['head'] = decisions.head[:, decisions.head_gated].mean().item()
    if decisions.block_gated.any():
        rates['block'] = decisions.block[:, decisions.block_gated].mean().item()
    return rates


@torch.no_grad()
def calibrate_thresholds(
        model: AdaViT,
        images: torch.Tensor,
        patch: Optional[float] = None,
        head: Optional[float] = None,
        block: Optional[float] = None,
        steps: int = 12,
        rounds: int = 2,
        macs: Optional[float] = None,
) -> Dict[str, float]:
    """Set the thresholds so that ``model`` keeps the target fractions of patches, heads and sub-blocks on ``images``.

    Each kind is found by bisection on its threshold (the keep-rate falls as the threshold rises); as the kinds
    influence each other through the features, the search is repeated ``rounds`` times. A cost target (``macs``) is
    then met by the patch threshold alone.

    Args:
        model: A trained AdaViT with the learned policy; it is left in eval mode with the new thresholds.
        images: Calibration images, (B, C, H, W), ideally a few hundred from the target data.
        patch: Target fraction of patch tokens kept (class token left out), or None to leave the threshold.
        head: Target fraction of heads kept, or None.
        block: Target fraction of MSA/FFN sub-blocks run, or None.
        steps: Bisection steps per kind and round.
        rounds: Passes over the kinds.
        macs: Target mean MACs per image (``patch`` must then be None), or None.

    Returns:
        The keep-rates reached, with the thresholds set (``patch_threshold`` ...), and ``macs`` (the mean reached).
    """
    if model.policy != 'learned':
        raise ConfigError('calibrate_thresholds needs the learned policy: the random policy has no thresholds')
    if macs is not None and patch is not None:
        raise ConfigError('calibrate_thresholds: give a patch keep-rate or a MAC target, not both')
    targets = {k: v for k, v in (('patch', patch), ('head', head), ('block', block)) if v is not None}
    for kind, target in targets.items():
        if not 0.0 <= target <= 1.0:
            raise ConfigError(f'target {kind} keep-rate must lie in [0, 1], got {target}')
    model.eval()

    def rates() -> Dict[str, float]:
        _, decisions = model(images, return_decisions=True)
        return dict(eval_keep_rates(decisions, model.num_prefix_tokens),
                    macs=decision_macs(model, decisions).mean().item())

    for _ in range(rounds):
        for kind, target in targets.items():
            low, high = 0.0, 1.0  # keep-rate(low) >= target >= keep-rate(high)
            for _ in range(steps):
                middle = (low + high) / 2
                model.set_thresholds(**{kind: middle})
                if rates().get(kind, target) > target:
                    low = middle
                else:
                    high = middle
            model.set_thresholds(**{kind: (low + high) / 2})
    if macs is not None:
        low, high = 0.0, 1.0  # cost(low) >= target >= cost(high)
        for _ in range(2 * steps):
            model.set_thresholds(patch=(low + high) / 2)
            if rates()['macs'] > macs:
                low = model.patch_threshold
            else:
                high = model.patch_threshold
        model.set_thresholds(patch=high)  # the side that does not exceed the target
    reached = rates()
    reached.update({f'{k}_threshold': getattr(model, f'{k}_threshold') for k in ('patch', 'head', 'block')})
    return reached


@torch.no_grad()
def random_patch_keep_for_cost(model: AdaViT, target_macs: float, images: int = 4000, steps: int = 20) -> float:
    """Set the random policy's patch keep-rate so that ``model`` costs ``target_macs`` per image on average.

    Random and Random+ are compared at the learned model's cost. Drawing patches at its mean patch keep-rate costs less
    than it does, because a learned model keeps more patches where heads and sub-blocks also run; so the patch rate
    is found by bisection, with the head and block rates left as set.

    Args:
        model: An AdaViT with ``policy="random"``; its ``random_keep`` patch entry is set.
        target_macs: Mean MACs per image to reach.
        images: Decisions drawn per step (the draws ignore the images, so blank ones do).
        steps: Bisection steps.

    Returns:
        The patch keep-rate.
    """
    if model.policy != 'random':
        raise ConfigError('random_patch_keep_for_cost needs the random policy')
    height, width = model.patch_embed.img_size
    param = next(model.parameters())
    blank = torch.zeros(images, model.patch_embed.proj.in_channels, height, width,
                        device=param.device, dtype=param.dtype)
    model.eval()

    def mean_macs(patch_keep: float) -> float:
        model.random_keep = (patch_keep, *model.random_keep[1:])
        model.reset_random_policy(0)
        _, decisions = model(blank, return_decisions=True)
        return decision_macs(model, decisions, gates_ran=False).mean().item()

    low, high = 0.0, 1.0  # cost(low) <= target <= cost(high)
    for _ in range(steps):
        middle = (low + high) / 2
        low, high = (middle, high) if mean_macs(middle) < target_macs else (low, middle)
    model.random_keep = ((low + high) / 2, *model.random_keep[1:])
    return model.random_keep[0]
