"""The AdaViT objective: task loss + usage loss pulling keep-rates toward budgets (+ opt-in distillation)."""
from typing import Callable, Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import ConfigError
from ..model.adavit import Decisions

USAGE_FORMS = ('released', 'squared')


def keep_rates(decisions: Decisions) -> Dict[str, torch.Tensor]:
    """The keep-rates the usage loss pulls on (scalars, differentiable through the straight-through decisions).

    * ``patch``: mean over batch x patch-gated blocks x tokens, class tokens included (as released);
    * ``head``: mean over batch x head-gated blocks x heads, leaving out (image, block) pairs where both MSA and FFN
      are off (their heads do nothing);
    * ``block``: mean over batch x block-gated blocks x [MSA, FFN].

    A kind with no gated block is absent from the result.
    """
    rates: Dict[str, torch.Tensor] = {}
    if decisions.patch_gated.any():
        rates['patch'] = decisions.patch[:, decisions.patch_gated].mean()
    if decisions.block_gated.any():
        rates['block'] = decisions.block[:, decisions.block_gated].mean()
    if decisions.head_gated.any():
        heads = decisions.head[:, decisions.head_gated]  # (B, L_h, H)
        active = (decisions.block[:, decisions.head_gated].detach() > 0.5).any(dim=-1)  # (B, L_h)
        weight = active.to(heads.dtype)[:, :, None].expand_as(heads)
        rates['head'] = (heads * weight).sum() / weight.sum().clamp_min(1.0)
    return rates


def usage_loss(
        decisions: Decisions,
        budgets: Sequence[float] = (0.5, 0.5, 0.5),
        weights: Sequence[float] = (2.0, 2.0, 2.0),
        form: str = 'released',
) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
    """The usage loss.

    ``released`` (default): ``w_h |r_h - g_h| + w_b |r_b - g_b| + w_p (r_p - g_p)^2``; ``squared`` (the paper's text):
    every term squared.

    Args:
        decisions: The decisions of a training forward pass.
        budgets: Target keep-rates (patch, head, block).
        weights: Loss weights (patch, head, block).
        form: ``"released"`` or ``"squared"``.

    Returns:
        The loss (scalar) and the keep-rates it saw.
    """
    if form not in USAGE_FORMS:
        raise ConfigError(f'usage loss form must be one of {list(USAGE_FORMS)}, got {form!r}')
    rates = keep_rates(decisions)
    loss = decisions.patch.new_zeros(())
    for i, kind in enumerate(('patch', 'head', 'block')):
        if kind not in rates:
            continue
        gap = rates[kind] - budgets[i]
        squared = form == 'squared' or kind == 'patch'
        loss = loss + weights[i] * (gap * gap if squared else gap.abs())
    return loss, rates


def distillation_loss(student_logits: torch.Tensor, teacher_logits: torch.Tensor, temperature: float = 1.0):
    """KL divergence from the dense teacher's softened distribution to the student's, scaled by ``T^2``."""
    t = temperature
    return F.kl_div(
        F.log_softmax(student_logits / t, dim=-1),
        F.log_softmax(teacher_logits.detach() / t, dim=-1),
        reduction='batchmean',
        log_target=True,
    ) * (t * t)


class AdaViTLoss(nn.Module):
    """Task loss + usage loss (+ distillation toward a dense teacher's logits, opt-in).

    Args:
        task_loss: Loss on (logits, target); default cross-entropy (pass timm's ``SoftTargetCrossEntropy`` for mixup).
        budgets: Target keep-rates (patch, head, block); released: 0.5 each.
        weights: Usage-loss weights (patch, head, block); released: 2 each.
        form: ``"released"`` or ``"squared"``.
        distill_weight: Weight of the distillation term; 0 turns it off (released).
        distill_temperature: Softening temperature of the distillation term.
    """

    def __init__(
            self,
            task_loss: Optional[Callable[[torch.Tensor, torch.Tensor], torch.Tensor]] = None,
            budgets: Sequence[float] = (0.5, 0.5, 0.5),
            weights: Sequence[float] = (2.0, 2.0, 2.0),
            form: str = 'released',
            distill_weight: float = 0.0,
            distill_temperature: float = 1.0,
    ) -> None:
        super().__init__()
        if form not in USAGE_FORMS:
            raise ConfigError(f'usage loss form must be one of {list(USAGE_FORMS)}, got {form!r}')
        self.task_loss = task_loss if task_loss is not None else nn.CrossEntropyLoss()
        self.budgets = tuple(budgets)
        self.weights = tuple(weights)
        self.form = form
        self.distill_weight = distill_weight
        self.distill_temperature = distill_temperature

    def forward(
            self,
            logits: torch.Tensor,
            target: torch.Tensor,
            decisions: Decisions,
            teacher_logits: Optional[torch.Tensor] = None,
    ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:
        """Total loss and its parts (``task``, ``usage``, ``distill``, and ``keep_*`` rates), parts detached."""
        task = self.task_loss(logits, target)
        usage, rates = usage_loss(decisions, self.budgets, self.weights, self.form)
        total = task + usage
        parts = {'task': task.detach(), 'usage': usage.detach()}
        if self.distill_weight > 0:
            if teacher_logits is None:
                raise ConfigError('distillation is on (distill_weight > 0) but no teacher logits were given')
            distill = distillation_loss(logits, teacher_logits, self.distill_temperature)
            total = total + self.distill_weight * distill
            parts['distill'] = distill.detach()
        parts.update({f'keep_{k}': v.detach() for k, v in rates.items()})
        return total, parts
