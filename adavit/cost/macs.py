"""MACs per image (one multiply-add = 1, what papers call FLOPs) under the decisions each image got.

The count is what the sparse executor runs on a CPU (``execution/sparse.py``), proven against ``FlopCounterMode`` in
the tests. (On other devices its accelerator plan computes dropped heads' share of q, k, v, proj and fc1 too, and
zeroes it: ``execution/sparse_accelerator.py``.) For one block with ``t`` kept tokens (class token included),
``w = kept_heads * head_dim`` and MLP width ``R``:

* MSA on, full deactivation: ``3 t D w`` (q, k, v) + ``2 t^2 w`` (QK^T, AV) + ``t w D`` (proj);
* MSA on, partial deactivation: ``t D (2 w + A)`` (q, k of kept heads, v of all ``A`` channels) + ``2 t^2 w`` +
  ``t A D`` (proj);
* FFN on: ``t w_f R + t R D``, with ``w_f = w`` under full deactivation, else ``D``;
* decision networks: ``N_p D`` (per-token patch gate) or ``D N_p`` (class-token patch gate), ``D H`` and ``2 D``;
* plus the patch embedding and the classifier head. Norms, activations, softmax and gathers are not MACs.
"""
from typing import Optional

import torch
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from ..model.adavit import AdaViT, Decisions


def _embed_and_head_macs(model: VisionTransformer) -> int:
    proj = model.patch_embed.proj
    kh, kw = proj.kernel_size
    patch_embed = model.patch_embed.num_patches * proj.in_channels * kh * kw * proj.out_channels
    head = model.head.in_features * model.head.out_features if isinstance(model.head, nn.Linear) else 0
    return patch_embed + head


def decision_macs(model: AdaViT, decisions: Decisions, gates_ran: bool = True) -> torch.Tensor:
    """MACs of each image under ``decisions`` (as returned by ``model(x, return_decisions=True)`` in eval).

    Args:
        model: The AdaViT that took the decisions.
        decisions: Its decisions.
        gates_ran: Whether the decision networks ran (not when the decisions were handed to the model).

    Returns:
        (B,) float64 tensor.
    """
    blocks = model.blocks
    attn = blocks[0].attn
    D = model.embed_dim
    A = attn.num_heads * attn.head_dim
    R = blocks[0].mlp.fc1.out_features
    num_patches = model.patch_embed.num_patches
    full = model.head_mode == 'full'

    t = decisions.patch.double().sum(-1)  # (B, L) kept tokens per block, class token included
    w = decisions.head.double().sum(-1) * attn.head_dim  # (B, L) kept attention channels
    if not full:  # partial: every channel enters v, proj and the FFN
        msa = t * D * (2 * w + A) + 2 * t * t * w + t * A * D
        ffn = t * D * R + t * R * D
    else:
        msa = 3 * t * D * w + 2 * t * t * w + t * w * D
        ffn = t * w * R + t * R * D
    total = (msa * decisions.block[..., 0].double() + ffn * decisions.block[..., 1].double()).sum(-1)  # (B,)

    if gates_ran and model.policy == 'learned':  # the random policy evaluates no decision network
        gates = 0
        for blk in blocks:
            if blk.patch_gate is not None:
                gates += blk.patch_gate.in_features * blk.patch_gate.out_features * \
                    (num_patches if blk.patch_gate.policy == 'token' else 1)
            for gate in (blk.head_gate, blk.block_gate):
                if gate is not None:
                    gates += gate.in_features * gate.out_features
        total = total + gates
    return total + _embed_and_head_macs(model)


@torch.no_grad()
def macs(model: AdaViT, x: torch.Tensor, decisions: Optional[Decisions] = None) -> torch.Tensor:
    """MACs each image of ``x`` costs under the decisions the model (in its current mode) takes, (B,) float64.

    Args:
        model: An AdaViT (for a plain timm ViT every image costs ``dense_macs``).
        x: Images, (B, C, H, W).
        decisions: The decisions the model already took on ``x`` (saves a forward pass). For decisions handed to the
            model instead of its own, use ``decision_macs(model, decisions, gates_ran=False)``.
    """
    if not isinstance(model, AdaViT):
        return torch.full((x.shape[0],), float(dense_macs(model)), dtype=torch.float64)
    if decisions is None:
        _, decisions = model(x, return_decisions=True)
    return decision_macs(model, decisions)


def dense_macs(model: VisionTransformer) -> int:
    """MACs of the dense backbone for one image: every token, head and sub-block, no decision network."""
    blk = model.blocks[0]
    D = model.embed_dim
    A = blk.attn.num_heads * blk.attn.head_dim
    R = blk.mlp.fc1.out_features
    t = model.patch_embed.num_patches + model.num_prefix_tokens
    per_block = 3 * t * D * A + 2 * t * t * A + t * A * D + t * D * R + t * R * D
    return int(len(model.blocks) * per_block + _embed_and_head_macs(model))
