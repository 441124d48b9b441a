"""Turning decision logits into {0, 1} decisions.

Training uses a binary Gumbel-softmax ("Gumbel-sigmoid") with a hard straight-through estimator; eval thresholds the
sigmoid without noise. The random policy (the paper's Random baseline) draws Bernoulli decisions at fixed budgets.
"""
import math
from typing import Optional

import torch


def gumbel_sigmoid_hard(logits: torch.Tensor, tau: float, threshold: float) -> torch.Tensor:
    """Sample hard binary decisions whose gradient is that of the relaxed sample.

    ``s = sigmoid((logits + g1 - g2) / tau)`` with ``g1, g2 ~ Gumbel(0, 1)``; the forward value is ``1[s > threshold]``.
    The difference of two independent Gumbel(0, 1) variables is Logistic(0, 1), drawn here as ``log(u) - log(1 - u)``
    with one uniform draw instead of two.

    Args:
        logits: Decision logits, any shape.
        tau: Temperature of the relaxation.
        threshold: Keep a unit when its relaxed sample exceeds this.

    Returns:
        Tensor of the logits' shape and dtype, values in {0, 1}, differentiable through the relaxed sample.
    """
    u = torch.rand_like(logits, dtype=torch.float32).clamp_(1e-6, 1.0 - 1e-6)
    noise = (torch.log(u) - torch.log1p(-u)).to(logits.dtype)
    soft = torch.sigmoid((logits + noise) / tau)
    hard = (soft > threshold).to(logits.dtype)
    # soft - soft.detach() is exactly 0, so the forward value is exactly hard; (hard + soft) - soft would round.
    return hard + (soft - soft.detach())


def threshold_mask(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """Deterministic eval decisions ``sigmoid(logits) > threshold``, as a bool tensor."""
    # sigmoid(z) > p  <=>  z > logit(p): comparing logits avoids the sigmoid and its rounding near 0 and 1.
    if threshold <= 0.0:
        return torch.ones_like(logits, dtype=torch.bool)
    if threshold >= 1.0:
        return torch.zeros_like(logits, dtype=torch.bool)
    return logits > math.log(threshold / (1.0 - threshold))


def threshold_decisions(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """``threshold_mask`` as floats in the logits' dtype, the form the masked executor multiplies by."""
    return threshold_mask(logits, threshold).to(logits.dtype)


def bernoulli_decisions(
        shape: torch.Size,
        keep_prob: float,
        like: torch.Tensor,
        generator: Optional[torch.Generator] = None,
) -> torch.Tensor:
    """Random decisions, each unit kept with probability ``keep_prob``, on ``like``'s device and dtype.

    Drawn on the CPU from ``generator`` so that a seed gives the same decisions on every device.
    """
    draw = torch.rand(shape, generator=generator, dtype=torch.float32) < keep_prob
    return draw.to(device=like.device, dtype=like.dtype)
