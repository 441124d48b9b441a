"""The sparse executor: eval-time execution that skips what the decisions drop, instead of multiplying it by zero.

Per block, for each sub-block (MSA, FFN):

* only the images that run it are processed, and of those only their kept tokens, packed across the batch, so that
  token-wise layers (norms, linears, MLP) run once on a (T, D) matrix of real tokens;
* images are grouped by their head pattern; a group's q, k, v, proj and (full deactivation) fc1 use only its kept
  heads' weight slices, so a dropped head costs nothing;
* attention runs per image over its kept tokens only: images of a group with equal token counts form a batch, others
  are padded to the group's longest and masked (the only wasted work, and only in the small T x T products).

The output equals the masked reference (``masked.py``) up to float rounding: a dropped token's MSA and FFN outputs are
multiplied by 0 there, so it passes through unchanged, and a kept query only ever sees kept keys.
"""
from dataclasses import dataclass
from typing import List, Optional

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block


@dataclass
class HeadGroup:
    """Images that share a head pattern, and their packed token rows ``start:end``."""
    start: int
    end: int
    counts: List[int]  # kept tokens per image, in packed order
    heads: Optional[torch.Tensor]  # kept head indices, or None for all heads


@dataclass
class Packing:
    """Which rows of the flattened (B * N, D) tokens a sub-block processes, grouped by head pattern."""
    rows: Optional[torch.Tensor]  # (T,) row indices, or None when every row of the batch is processed in order
    groups: List[HeadGroup]


def pack_tokens(
        run: Optional[torch.Tensor],
        tokens: Optional[torch.Tensor],
        heads: Optional[torch.Tensor],
        num_tokens: int,
        batch_size: int,
) -> Optional[Packing]:
    """Plan one sub-block: its images, their kept tokens, and the head groups.

    Args:
        run: (B,) bool, images that run the sub-block, or None for all.
        tokens: (B, N) bool, kept tokens, or None for all.
        heads: (B, H) bool, kept heads, or None when heads are not grouped on.
        num_tokens: N.
        batch_size: B.

    Returns:
        The packing, or None when no image runs the sub-block.
    """
    device = run.device if run is not None else tokens.device if tokens is not None else None
    if run is None and tokens is None and (heads is None or bool(heads.all())):
        return Packing(None, [HeadGroup(0, batch_size * num_tokens, [num_tokens] * batch_size, None)])

    images = torch.arange(batch_size, device=device) if run is None else run.nonzero().squeeze(1)  # (n,)
    if images.numel() == 0:
        return None
    if heads is not None:
        head_bits = 1 << torch.arange(heads.shape[1], device=heads.device)
        codes = (heads[images].long() * head_bits).sum(1)  # (n,) one integer per head pattern
        order = torch.argsort(codes, stable=True)
        images, codes = images[order], codes[order]
        patterns, sizes = torch.unique_consecutive(codes, return_counts=True)
    else:
        patterns = sizes = None

    if tokens is None:
        counts = torch.full_like(images, num_tokens)
        rows = (images[:, None] * num_tokens + torch.arange(num_tokens, device=images.device)).flatten()
    else:
        kept = tokens[images]  # (n, N)
        counts = kept.sum(1)
        image_pos, token_pos = kept.nonzero().unbind(1)  # row-major: images in order, tokens ascending
        rows = images[image_pos] * num_tokens + token_pos  # (T,)

    counts_list = counts.tolist()
    if patterns is None:
        return Packing(rows, [HeadGroup(0, rows.numel(), counts_list, None)])
    groups, image_start, row_start = [], 0, 0
    num_heads = heads.shape[1]
    all_heads = (1 << num_heads) - 1
    for pattern, size in zip(patterns.tolist(), sizes.tolist()):
        group_counts = counts_list[image_start:image_start + size]
        row_end = row_start + sum(group_counts)
        kept_heads = None if pattern == all_heads else \
            torch.tensor([h for h in range(num_heads) if pattern >> h & 1], dtype=torch.long, device=rows.device)
        groups.append(HeadGroup(row_start, row_end, group_counts, kept_heads))
        image_start, row_start = image_start + size, row_end
    return Packing(rows, groups)


def _channels(kept_heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """Channel indices (h * head_dim,) of the kept heads."""
    return (kept_heads[:, None] * head_dim + torch.arange(head_dim, device=kept_heads.device)).flatten()


def _transposed(linear: torch.nn.Linear) -> torch.Tensor:
    """``linear.weight.t()`` as a contiguous (in, out) matrix, cached while the weight is unchanged.

    Selecting input channels is then a row gather, which copies contiguous memory.
    """
    w = linear.weight
    key = (w.data_ptr(), w._version, w.dtype, w.device)
    cache = getattr(linear, '_adavit_transposed', None)
    if cache is None or cache[0] != key:
        cache = (key, w.detach().t().contiguous())
        linear._adavit_transposed = cache
    return cache[1]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, counts: List[int]) -> torch.Tensor:
    """Attention of each image over its own tokens.

    Args:
        q, k, v: (T, h, dh) packed rows of the images, ``counts[i]`` rows each.
        counts: Tokens per image.

    Returns:
        (T, h * dh) attention outputs, packed like the inputs.
    """
    T, h, dh = q.shape
    n, longest = len(counts), max(counts)
    if longest * n == T:  # equal counts: a plain batch
        q, k, v = (t.view(n, longest, h, dh).transpose(1, 2) for t in (q, k, v))  # (n, h, L, dh)
        return F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(T, h * dh)
    counts_t = torch.tensor(counts, device=q.device)
    starts = torch.cumsum(counts_t, 0) - counts_t
    image = torch.repeat_interleave(torch.arange(n, device=q.device), counts_t, output_size=T)
    slot = image * longest + torch.arange(T, device=q.device) - starts[image]  # (T,) row in the padded layout
    padded = q.new_zeros(3, n * longest, h, dh)
    padded[:, slot] = torch.stack([q, k, v])
    q, k, v = padded.view(3, n, longest, h, dh).transpose(2, 3).unbind(0)  # 3 x (n, h, L, dh)
    valid = torch.arange(longest, device=q.device)[None, :] < counts_t[:, None]  # (n, L) real keys
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])  # (n, h, L, dh)
    return out.transpose(1, 2).reshape(n * longest, h * dh)[slot]


def _msa(block: Block, x_normed: torch.Tensor, packing: Packing, head_mode: str) -> torch.Tensor:
    """MSA outputs (before ``ls1``) of the packed rows, (T, D)."""
    attn = block.attn
    D = x_normed.shape[-1]
    H, dh = attn.num_heads, attn.head_dim
    tokens = x_normed.reshape(-1, D)
    if packing.rows is not None:
        tokens = tokens[packing.rows]  # (T, D)
    outs = []
    for g in packing.groups:
        x_g = tokens[g.start:g.end]  # (Tg, D)
        if g.heads is None:
            qkv = attn.qkv(x_g).view(-1, 3, H, dh)
            q, k, v = qkv.unbind(1)  # 3 x (Tg, H, dh)
            o = _attend(attn.q_norm(q), attn.k_norm(k), v, g.counts)  # (Tg, H*dh)
            outs.append(attn.proj(o))
            continue
        channels = _channels(g.heads, dh)  # (w,)
        h = g.heads.numel()
        if head_mode == 'full':
            if h == 0:  # no head: only the proj bias survives
                outs.append(attn.proj.bias.expand(x_g.shape[0], -1) if attn.proj.bias is not None
                            else x_g.new_zeros(x_g.shape[0], D))
                continue
            select = torch.cat([channels, channels + H * dh, channels + 2 * H * dh])  # q, k, v rows of kept heads
            qkv = F.linear(x_g, attn.qkv.weight[select], attn.qkv.bias[select] if attn.qkv.bias is not None else None)
            q, k, v = qkv.view(-1, 3, h, dh).unbind(1)  # 3 x (Tg, h, dh)
            o = _attend(attn.q_norm(q), attn.k_norm(k), v, g.counts)  # (Tg, h*dh)
            weight_t = _transposed(attn.proj)[channels]  # (w, D)
            outs.append(torch.addmm(attn.proj.bias, o, weight_t) if attn.proj.bias is not None else o @ weight_t)
        else:  # partial: a dropped head passes its values through, so v is needed at full width
            select = torch.cat([channels, channels + H * dh, torch.arange(2 * H * dh, 3 * H * dh, device=x_g.device)])
            qkv = F.linear(x_g, attn.qkv.weight[select], attn.qkv.bias[select] if attn.qkv.bias is not None else None)
            q, k = qkv[:, :2 * h * dh].view(-1, 2, h, dh).unbind(1)  # 2 x (Tg, h, dh)
            o = qkv[:, 2 * h * dh:].clone()  # (Tg, H*dh) values of every head
            if h > 0:
                v = o.view(-1, H, dh)[:, g.heads]  # (Tg, h, dh)
                o[:, channels] = _attend(attn.q_norm(q), attn.k_norm(k), v, g.counts)
            outs.append(attn.proj(o))
    return outs[0] if len(outs) == 1 else torch.cat(outs)


def _ffn(block: Block, x_ffn: torch.Tensor, packing: Packing, head_dim: int) -> torch.Tensor:
    """FFN outputs (before ``ls2``) of packed, not yet normed rows (T, D); fc1 reads only kept heads' channels."""
    mlp = block.mlp
    h2 = block.norm2(x_ffn)  # (T, D)
    if len(packing.groups) == 1 and packing.groups[0].heads is None:
        return mlp(h2)
    hidden = []
    for g in packing.groups:
        h_g = h2[g.start:g.end]
        if g.heads is None:
            hidden.append(mlp.fc1(h_g))
        elif g.heads.numel() == 0:  # every input channel masked: only the fc1 bias survives
            hidden.append(mlp.fc1.bias.expand(h_g.shape[0], -1) if mlp.fc1.bias is not None
                          else h_g.new_zeros(h_g.shape[0], mlp.fc1.out_features))
        else:
            channels = _channels(g.heads, head_dim)
            weight_t = _transposed(mlp.fc1)[channels]  # (w, R)
            inputs = h_g[:, channels]  # (Tg, w)
            hidden.append(torch.addmm(mlp.fc1.bias, inputs, weight_t) if mlp.fc1.bias is not None
                          else inputs @ weight_t)
    hid = hidden[0] if len(hidden) == 1 else torch.cat(hidden)  # (T, R)
    return mlp.drop2(mlp.fc2(mlp.norm(mlp.drop1(mlp.act(hid)))))


def _add_rows(x: torch.Tensor, rows: Optional[torch.Tensor], update: torch.Tensor) -> torch.Tensor:
    """``x`` (B, N, D) with ``update`` (T, D) added at flattened ``rows`` (all rows when None); in place without grad."""
    B, N, D = x.shape
    in_place = not torch.is_grad_enabled()
    if rows is None:
        return x.add_(update.view(B, N, D)) if in_place else x + update.view(B, N, D)
    flat = x.view(B * N, D)
    flat = flat.index_add_(0, rows, update) if in_place else flat.index_add(0, rows, update)
    return flat.view(B, N, D)


def sparse_block_forward(
        block: Block,
        x: torch.Tensor,
        x_normed: torch.Tensor,
        patch_keep: Optional[torch.Tensor],
        head_keep: Optional[torch.Tensor],
        block_keep: Optional[torch.Tensor],
        head_mode: str = 'full',
) -> torch.Tensor:
    """One timm ``Block`` under AdaViT decisions, computing only what they keep (same arguments as the masked one).

    Args:
        block: The timm block, in eval mode.
        x: Block input, (B, N, D); updated in place when gradients are off.
        x_normed: ``block.norm1(x)``.
        patch_keep: (B, N) token decisions, or None.
        head_keep: (B, H) head decisions, or None.
        block_keep: (B, 2) [MSA, FFN] decisions, or None.
        head_mode: ``"full"`` or ``"partial"``.

    Returns:
        Block output, (B, N, D).
    """
    B, N, _ = x.shape
    tokens = None if patch_keep is None or bool((patch_keep > 0.5).all()) else patch_keep > 0.5
    heads = None if head_keep is None else head_keep > 0.5
    run_msa, run_ffn = (None, None) if block_keep is None else (block_keep > 0.5).unbind(1)
    run_msa = None if run_msa is None or bool(run_msa.all()) else run_msa
    run_ffn = None if run_ffn is None or bool(run_ffn.all()) else run_ffn

    packing = pack_tokens(run_msa, tokens, heads, N, B)
    if packing is not None:
        x = _add_rows(x, packing.rows, block.ls1(_msa(block, x_normed, packing, head_mode)))

    # Partial deactivation leaves the FFN whole, so its tokens need no head grouping.
    packing = pack_tokens(run_ffn, tokens, heads if head_mode == 'full' else None, N, B)
    if packing is not None:
        x_ffn = x.reshape(B * N, -1) if packing.rows is None else x.reshape(B * N, -1)[packing.rows]
        x = _add_rows(x, packing.rows, block.ls2(_ffn(block, x_ffn, packing, block.attn.head_dim)))
    return x

