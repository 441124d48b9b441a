"""The sparse executor's plan on the host: which rows each sub-block runs, grouped by head pattern, and how attention
batches its (image, head) problems.

A plan is a few hundred decisions' worth of bookkeeping, so it is made in NumPy: torch's per-op overhead is several
times NumPy's at this size, and in the middle of a forward each op also finds its caches flushed by the matmuls. The
decisions reach it as NumPy bool masks (``batch_masks``); row indices leave it as one tensor (``index_tensor``).
"""
import functools
from dataclasses import dataclass
from typing import List, Optional, Tuple

import numpy as np
import torch


@dataclass
class HeadGroup:
    """Images that share a head pattern, and their packed token rows ``start:end``."""
    start: int
    end: int
    counts: List[int]  # kept tokens per image, in packed order
    head_runs: Optional[Tuple[Tuple[int, int], ...]]  # kept heads as contiguous ranges [a, b), or None for all heads


@dataclass
class Packing:
    """Which rows of the flattened (B * N, D) tokens a sub-block processes, grouped by head pattern."""
    rows: Optional[torch.Tensor]  # (T,) row indices, or None when every row of the batch is processed in order
    groups: List[HeadGroup]

    @property
    def num_rows(self) -> int:
        return self.groups[-1].end


@functools.lru_cache(maxsize=None)  # at most 2^H patterns per head count
def head_runs(pattern: int, num_heads: int) -> Tuple[Tuple[int, int], ...]:
    """The kept heads of a bit pattern as contiguous ranges: 0b1101 -> ((0, 1), (2, 4)).

    A range of heads is a contiguous slice of every weight matrix (in head-major layout), so it needs no gather.
    """
    runs, start = [], None
    for h in range(num_heads + 1):
        kept = h < num_heads and pattern >> h & 1
        if kept and start is None:
            start = h
        elif not kept and start is not None:
            runs.append((start, h))
            start = None
    return tuple(runs)


def pack_tokens(
        run: Optional[np.ndarray],
        tokens: Optional[np.ndarray],
        heads: Optional[np.ndarray],
        num_tokens: int,
        batch_size: int,
        device: Optional[torch.device] = None,
) -> Optional[Packing]:
    """Plan one sub-block: its images, their kept tokens, and the head groups.

    Args:
        run: (B,) bool, images that run the sub-block, or None for all.
        tokens: (B, N) bool, kept tokens, or None for all.
        heads: (B, H) bool, kept heads, or None when heads are not grouped on.
        num_tokens: N.
        batch_size: B.
        device: Where the packed row indices go.

    Returns:
        The packing, or None when no image runs the sub-block.
    """
    if heads is not None and heads.all():
        heads = None
    if run is None and tokens is None and heads is None:
        return Packing(None, [HeadGroup(0, batch_size * num_tokens, [num_tokens] * batch_size, None)])
    # One sub-block is the case of two that run for the same images.
    return pack_sub_blocks(run, run, tokens, heads, num_tokens, batch_size, device)[0]


def _packed_rows(
        images: np.ndarray,
        kept: Optional[np.ndarray],
        num_tokens: int,
        device: Optional[torch.device],
) -> torch.Tensor:
    """The rows of the flattened (B * N, D) batch that ``images`` (in packed order) keep, image by image.

    Args:
        images: (n,) images in packed order.
        kept: (n, N) bool, their kept tokens in that order, or None for all.
    """
    if kept is None:
        rows = (images[:, None] * num_tokens + np.arange(num_tokens)).ravel()
    else:
        # Kept positions of the (n, N) mask, row-major (images in packed order, tokens ascending), shifted from
        # each image's place in the mask to its place in the batch. (One flat index is half the cost of a 2-D nonzero.)
        flat = np.flatnonzero(kept)  # (T,)
        rows = flat + ((images - np.arange(images.size)) * num_tokens)[flat // num_tokens]  # (T,)
    return torch.from_numpy(rows).to(device)


def pack_sub_blocks(
        run_msa: Optional[np.ndarray],
        run_ffn: Optional[np.ndarray],
        tokens: Optional[np.ndarray],
        heads: Optional[np.ndarray],
        num_tokens: int,
        batch_size: int,
        device: Optional[torch.device] = None,
) -> Tuple[Optional[Packing], Optional[Packing]]:
    """Plan both sub-blocks of a block whose MSA and FFN run for different images, over one set of rows.

    Each image keeps the same tokens and heads in both sub-blocks (full head deactivation), so one gather of the
    residual rows of every image that runs either sub-block, and one write-back, serve both, where planning them apart
    (``pack_tokens``) gathers and writes back twice. Within a head pattern the images go MSA-only, then both, then
    FFN-only, so that each sub-block's images of a pattern are one contiguous head group: the MSA's groups leave out
    the FFN-only rows and the FFN's the MSA-only ones. Within a group, images are in ascending token count per kind,
    not overall.

    Args:
        run_msa: (B,) bool, images that run the MSA, or None for all.
        run_ffn: (B,) bool, images that run the FFN, or None for all.
        tokens, heads, num_tokens, batch_size, device: As ``pack_tokens`` takes them.

    Returns:
        (MSA packing, FFN packing) with the same ``rows`` tensor; either is None when no image runs its sub-block.
    """
    same_images = run_msa is run_ffn  # ``pack_tokens``: one sub-block
    every = np.ones(batch_size, dtype=bool)
    run_msa, run_ffn = (every if r is None else r for r in (run_msa, run_ffn))
    images = np.flatnonzero(run_msa if same_images else run_msa | run_ffn)  # (n,)
    if images.size == 0:
        return None, None
    if heads is not None and heads.all():
        heads = None
    kind = np.ones(images.size, dtype=np.int64) if same_images else \
        np.where(run_msa[images], np.where(run_ffn[images], 1, 0), 2)  # (n,) 0: MSA only, 1: both, 2: FFN only
    kept = None if tokens is None else tokens[images]  # (n, N)
    counts = np.full(images.size, num_tokens) if kept is None else np.count_nonzero(kept, axis=1)  # (n,)
    patterns = np.zeros(images.size, dtype=np.int64) if heads is None else \
        heads[images] @ (1 << np.arange(heads.shape[1]))  # (n,) kept heads as bits
    order = np.argsort((patterns * 3 + kind) * (num_tokens + 1) + counts, kind='stable')  # pattern, kind, count
    images, kind, counts, patterns = images[order], kind[order], counts[order], patterns[order]
    rows = _packed_rows(images, None if kept is None else kept[order], num_tokens, device)

    ends = np.cumsum(counts)  # (n,) each image's last row + 1
    starts = ends - counts
    counts_list = counts.tolist()
    num_heads = None if heads is None else heads.shape[1]

    def head_groups(member: np.ndarray) -> List[HeadGroup]:
        """One group per head pattern of the images ``member`` marks, which are contiguous within a pattern."""
        members = np.flatnonzero(member)
        if not members.size:
            return []
        if heads is None:  # one pattern
            found, firsts, sizes = [0], [0], [members.size]
        else:
            found, firsts, sizes = (a.tolist() for a in np.unique(patterns[members], return_index=True,
                                                                  return_counts=True))  # ascending
        groups = []
        for pattern, first, size in zip(found, members[firsts].tolist(), sizes):
            last = first + size - 1
            runs = None if heads is None or pattern == (1 << num_heads) - 1 else head_runs(pattern, num_heads)
            groups.append(HeadGroup(int(starts[first]), int(ends[last]), counts_list[first:last + 1], runs))
        return groups

    msa_groups = head_groups(kind < 2)
    ffn_groups = msa_groups if same_images else head_groups(kind > 0)
    return (Packing(rows, msa_groups) if msa_groups else None, Packing(rows, ffn_groups) if ffn_groups else None)


def attention_buckets(
        counts: List[int],
        heads: List[int],
        macs_per_pair: int,
        split_macs: float,
) -> List[Tuple[int, int, int]]:
    """Split images of ascending token counts into consecutive buckets, each padded to its longest image.

    A bucket closes before the image whose count would make padding all of the bucket's images up to it cost more
    than one more call (the whole bucket's padding, not just the step: a long run of counts one apart would otherwise
    grow a bucket with unbounded padding).

    Args:
        counts: Tokens per image, ascending.
        heads: Attention heads per image (each is one (query, key) problem per pair of its tokens).
        macs_per_pair: Multiply-adds per (query, key) pair and head, 2 * head_dim.
        split_macs: What one more attention call costs, in multiply-adds.

    Returns:
        [(first image, end image, padded length)].
    """
    budget = split_macs / macs_per_pair  # in padded (query, key, head) triples
    buckets, first, length, problems, pairs = [], 0, counts[0], 0, 0
    for i, (count, num_heads) in enumerate(zip(counts, heads)):
        if count != length:
            if problems * count * count - pairs > budget:
                buckets.append((first, i, length))
                first, problems, pairs = i, 0, 0
            length = count
        problems += num_heads
        pairs += num_heads * count * count
    buckets.append((first, len(counts), length))
    return buckets


def index_tensor(pieces: List[np.ndarray], device: torch.device) -> Optional[torch.Tensor]:
    """NumPy int64 index arrays, concatenated, as one tensor on ``device`` (None for none): shared with NumPy on the
    CPU, elsewhere one copy that does not wait for the device."""
    if not pieces:
        return None
    if device.type == 'cpu':
        return torch.from_numpy(pieces[0] if len(pieces) == 1 else np.concatenate(pieces))
    # From pageable memory the copy would wait for the stream to drain; from pinned memory it is queued behind it.
    # torch's caching host allocator keeps the pinned block until the copy has run.
    pinned = device.type == 'cuda'
    host = torch.empty(sum(p.size for p in pieces), dtype=torch.int64, pin_memory=pinned)
    np.concatenate(pieces, out=host.numpy())
    return host.to(device, non_blocking=pinned)


def as_mask(decisions: torch.Tensor) -> np.ndarray:
    """``decisions > 0.5`` of a CPU tensor as a NumPy bool array. NumPy compares fp32 and fp64 tensors in place and
    takes bool ones as they are: at a few hundred decisions a torch op costs several times as much."""
    if decisions.dtype == torch.bool:
        return decisions.numpy()
    if decisions.dtype in (torch.float32, torch.float64):
        return decisions.detach().numpy() > 0.5
    return (decisions > 0.5).numpy()


def _host_masks(*decisions: Optional[torch.Tensor]) -> List[Optional[np.ndarray]]:
    """``t > 0.5`` of each decision tensor (or None) as a NumPy bool array: on a CPU by ``as_mask``, otherwise by one
    device-to-host copy that serves them all (one sync per block on a GPU)."""
    present = [t for t in decisions if t is not None]
    if all(t.device.type == 'cpu' for t in present):
        masks = iter(as_mask(t) for t in present)
    else:
        flat = torch.cat([t.reshape(-1) for t in present]).gt(0.5).cpu().numpy()
        parts = np.split(flat, np.cumsum([t.numel() for t in present])[:-1])
        masks = iter(part.reshape(t.shape) for part, t in zip(parts, present))
    return [None if t is None else next(masks) for t in decisions]


def batch_masks(
        patch_keep: Optional[torch.Tensor],
        head_keep: Optional[torch.Tensor],
        block_keep: Optional[torch.Tensor],
) -> Tuple[Optional[np.ndarray], ...]:
    """A batch's decisions as NumPy bool masks (``_host_masks``), each None where it keeps everything.

    Returns:
        (kept tokens (B, N), kept heads (B, H), images that run the MSA (B,), images that run the FFN (B,)).
    """
    tokens, heads, runs = _host_masks(patch_keep, head_keep, block_keep)
    tokens, heads = (None if m is None or m.all() else m for m in (tokens, heads))
    if runs is None:
        return tokens, heads, None, None
    run_msa, run_ffn = (None if runs[:, i].all() else runs[:, i] for i in range(2))
    return tokens, heads, run_msa, run_ffn


def plan_batch(
        patch_keep: Optional[torch.Tensor],
        head_keep: Optional[torch.Tensor],
        block_keep: Optional[torch.Tensor],
        num_tokens: int,
        batch_size: int,
        head_mode: str,
) -> Tuple[Optional[Packing], Optional[Packing]]:
    """The MSA and FFN packings of a batch of B images, N tokens each (decisions as ``sparse.sparse_block_forward``
    takes them).

    Returns:
        (MSA packing, FFN packing), each None when no image runs the sub-block.
    """
    device = next((t.device for t in (patch_keep, head_keep, block_keep) if t is not None), None)
    tokens, heads, run_msa, run_ffn = batch_masks(patch_keep, head_keep, block_keep)  # then NumPy (``pack_tokens``)
    # Partial deactivation leaves the FFN whole, so its tokens need no head grouping.
    ffn_heads = heads if head_mode == 'full' else None
    if ffn_heads is not heads:  # partial: the FFN runs every head, so the two plans differ in their groups
        return (pack_tokens(run_msa, tokens, heads, num_tokens, batch_size, device),
                pack_tokens(run_ffn, tokens, ffn_heads, num_tokens, batch_size, device))
    if run_msa is None and run_ffn is None:
        msa = pack_tokens(None, tokens, heads, num_tokens, batch_size, device)
        return msa, msa  # the same images, tokens and head groups: plan once
    return pack_sub_blocks(run_msa, run_ffn, tokens, heads, num_tokens, batch_size, device)
