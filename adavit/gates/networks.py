"""The decision networks: tiny linear layers that score patches, heads and sub-blocks of one transformer block."""
import torch
from torch import nn
from timm.layers import trunc_normal_


class DecisionGate(nn.Linear):
    """A linear decision network, initialised as in the released models (weights ``trunc_normal(0.02)``, bias 0).

    A plain ``nn.Linear`` subclass so that its state dict is ``weight`` and ``bias``, like the official ``mlp_head``.
    """

    def reset_parameters(self) -> None:
        trunc_normal_(self.weight, std=0.02)
        if self.bias is not None:
            nn.init.zeros_(self.bias)


class PatchGate(DecisionGate):
    """Scores patches of one block.

    ``policy="token"`` (the released models): ``Linear(D, 1)`` applied to each LayerNormed token.
    ``policy="cls"`` (the paper's description): ``Linear(D, N)`` applied to the raw class token, one logit per patch.
    """

    def __init__(self, dim: int, num_patches: int, policy: str = 'token') -> None:
        super().__init__(dim, 1 if policy == 'token' else num_patches)
        self.policy = policy

    def forward(self, x_normed: torch.Tensor, cls_token: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
        """Logits for the patch tokens.

        Args:
            x_normed: ``norm1`` of the block input, (B, N + P, D) with P prefix tokens.
            cls_token: The raw class token of the block input, (B, D).
            num_prefix_tokens: P, the tokens that are never dropped.

        Returns:
            (B, N) logits, one per patch token.
        """
        if self.policy == 'token':
            # Scoring every token and slicing the (B, N + P) scores avoids copying the (B, N, D) slice (and, in the
            # backward pass, scattering its gradient back); the P prefix scores are ignored.
            return super().forward(x_normed).squeeze(-1)[:, num_prefix_tokens:]  # (B, N + P, 1) -> (B, N)
        return super().forward(cls_token)  # (B, D) -> (B, N)
