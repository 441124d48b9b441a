"""The masked reference execution: every token, head and sub-block is computed, and the decisions multiply.

This is what the released AdaViT code does, and the only execution that trains (the decisions need gradients). In
eval it is the reference the sparse executor is checked against.
"""
from typing import Optional

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block


def attention_mask_from_patches(patch_keep: torch.Tensor) -> torch.Tensor:
    """Which query may attend to which key: kept queries see kept keys, a dropped query sees only itself.

    Args:
        patch_keep: (B, N) decisions in {0, 1}, prefix tokens included.

    Returns:
        (B, 1, N, N) boolean mask, True where attention is allowed; built from detached decisions.
    """
    keep = patch_keep.detach() > 0.5
    allowed = keep[:, :, None] & keep[:, None, :]  # (B, N, N)
    allowed |= torch.eye(keep.shape[1], dtype=torch.bool, device=keep.device)
    return allowed[:, None]


def masked_block_forward(
        block: Block,
        x: torch.Tensor,
        x_normed: torch.Tensor,
        patch_keep: Optional[torch.Tensor],
        head_keep: Optional[torch.Tensor],
        block_keep: Optional[torch.Tensor],
        head_mode: str = 'full',
) -> torch.Tensor:
    """One timm ``Block`` under AdaViT decisions, by masking (SPEC: "the masked reference execution").

    Args:
        block: The timm block.
        x: Block input, (B, N, D).
        x_normed: ``block.norm1(x)``, already computed for the patch gate.
        patch_keep: (B, N) token decisions (prefix tokens 1), or None to keep every token.
        head_keep: (B, H) head decisions, or None to keep every head.
        block_keep: (B, 2) [MSA, FFN] decisions, or None to run both.
        head_mode: ``"full"`` zeroes dropped heads' q, k, v, proj input and FFN input channels; ``"partial"`` replaces
            a dropped head's attention map by the identity.

    Returns:
        Block output, (B, N, D).
    """
    attn = block.attn
    B, N, D = x.shape
    H, dh = attn.num_heads, attn.head_dim
    full_heads = head_keep is not None and head_mode == 'full'
    partial_heads = head_keep is not None and head_mode == 'partial'
    token_scale = patch_keep[:, :, None] if patch_keep is not None else None  # (B, N, 1)
    channel_keep = head_keep.repeat_interleave(dh, dim=1)[:, None, :] if full_heads else None  # (B, 1, H*dh)

    qkv = attn.qkv(x_normed)  # (B, N, 3*H*dh)
    if full_heads:
        qkv = qkv * channel_keep.repeat(1, 1, 3)
    q, k, v = qkv.reshape(B, N, 3, H, dh).permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, H, N, dh)
    q, k = attn.q_norm(q), attn.k_norm(k)
    mask = attention_mask_from_patches(patch_keep) if patch_keep is not None else None  # (B, 1, N, N)
    dropout_p = attn.attn_drop.p if block.training else 0.0
    if partial_heads:
        logits = (q * attn.scale) @ k.transpose(-2, -1)  # (B, H, N, N)
        if mask is not None:
            logits = logits.masked_fill(~mask, float('-inf'))
        probs = attn.attn_drop(logits.softmax(dim=-1))
        # A dropped head passes its values through: its attention map becomes the identity, after patch masking.
        eye = torch.eye(N, dtype=probs.dtype, device=probs.device)
        h = head_keep[:, :, None, None]
        o = (h * probs + (1.0 - h) * eye) @ v
    else:
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)
    o = attn.norm(o.transpose(1, 2).reshape(B, N, H * dh))  # (B, N, H*dh)
    if full_heads:
        o = o * channel_keep
    o = attn.proj_drop(attn.proj(o))
    if token_scale is not None:
        o = o * token_scale
    o = block.ls1(o)
    # Stochastic depth only where no block gate decides: a gated sub-block already has its own stochastic skip.
    x = x + (block.drop_path1(o) if block_keep is None else block_keep[:, 0, None, None] * o)

    h2 = block.norm2(x)
    if full_heads:
        h2 = h2 * channel_keep
    f = block.mlp(h2)
    if token_scale is not None:
        f = f * token_scale
    f = block.ls2(f)
    return x + (block.drop_path2(f) if block_keep is None else block_keep[:, 1, None, None] * f)
