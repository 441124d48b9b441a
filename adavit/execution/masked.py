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
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout_p)  # (B, H, N, dh)
    if partial_heads:
        # A dropped head passes its values through: its attention map becomes the identity, after patch masking.
        # (h A + (1 - h) I) v = h (A v) + (1 - h) v, so the fused kernel still does the work and no (N, N) map is
        # materialised; values and gradients (to h as well) are those of the explicit form.
        h = head_keep[:, :, None, None]
        o = h * o + (1.0 - h) * v
    o = attn.norm(o.transpose(1, 2).reshape(B, N, H * dh))  # (B, N, H*dh)
    if full_heads:
        o = o * channel_keep
    o = block.ls1(attn.proj_drop(attn.proj(o)))
    x = _add_scaled(x, o, token_scale, None if block_keep is None else block_keep[:, 0], block.drop_path1)

    h2 = block.norm2(x)
    if full_heads:
        h2 = h2 * channel_keep
    f = block.ls2(block.mlp(h2))
    return _add_scaled(x, f, token_scale, None if block_keep is None else block_keep[:, 1], block.drop_path2)


def _add_scaled(
        x: torch.Tensor,
        out: torch.Tensor,
        token_scale: Optional[torch.Tensor],
        sub_block_keep: Optional[torch.Tensor],
        drop_path: torch.nn.Module,
) -> torch.Tensor:
    """``x + sub_block_keep * (out * token_scale)``, the residual update of one sub-block.

    The two decisions are multiplied together first, on a (B, N, 1) tensor, and applied in one fused ``addcmul``: one
    pass over the (B, N, D) output instead of three, in the backward pass too. Decisions are exactly 0 or 1, so the
    values are bitwise those of the separate products, and the gradients are the same sums.

    Args:
        x: Residual stream, (B, N, D).
        out: Sub-block output (after layer scale), (B, N, D).
        token_scale: Patch decisions (B, N, 1), or None.
        sub_block_keep: This sub-block's decisions (B,), or None: then stochastic depth applies (no gate decides).
        drop_path: The block's stochastic depth for this sub-block.
    """
    if sub_block_keep is None:
        return x + drop_path(out if token_scale is None else out * token_scale)
    scale = sub_block_keep[:, None, None]  # (B, 1, 1)
    if token_scale is not None:
        scale = token_scale * scale  # (B, N, 1)
    return torch.addcmul(x, out, scale)
