"""The sparse executor: eval-time execution that skips what the decisions drop, instead of multiplying it by zero.

Per block, for each sub-block (MSA, FFN):

* only the images that run it are processed, and of those only their kept tokens, packed across the batch, so that
  token-wise layers (norms, linears, MLP) run once on a (T, D) matrix of real tokens; where the MSA and the FFN run for
  different images, both work on one gathered set of rows, each on its own images' (``pack_sub_blocks``);
* images are grouped by their head pattern; a group's q, k, v, proj and (full deactivation) fc1 use only its kept
  heads' weights, so a dropped head costs nothing. Each contiguous range of kept heads is a slice of the (re-laid-out,
  cached) weights with a matmul of its own; only many ranges are gathered into one matrix (``GATHER_FROM_RUNS``);
* attention runs per image and kept head over the image's kept tokens only, for all head groups in one pass: the
  (image, head) problems, sorted by token count, run in buckets padded to the bucket's longest image and masked
  (``attention_buckets``: the only wasted work, and only in the small T x T products);
* on CPU the FFN runs its rows a chunk at a time (``FFN_CHUNK_BYTES``), so that fc1's output is still in cache when
  the activation and fc2 read it;
* at batch 1 a block runs as a dense one does, on the kept tokens and the kept heads' weights, with as little Python
  between the kernels as it takes (``_single_image_block_forward``, the latency path).

The output equals the masked reference (``masked.py``) up to float rounding: a dropped token's MSA and FFN outputs are
multiplied by 0 there, so it passes through unchanged, and a kept query only ever sees kept keys.

This is the plan for CPUs. On other devices (GPUs), where a kernel launch costs the host more than a small matmul's
work, batches run ``sparse_accelerator.py``'s plan of a few launches per block instead (``HEAD_GROUPED_DEVICES``); a
single image takes the latency path there too.
"""
import functools
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm
from timm.models.vision_transformer import Block


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

    The plan is a few hundred decisions' worth of bookkeeping, so it runs in NumPy: torch's per-op overhead is several
    times NumPy's at this size, and in the middle of a forward each op also finds its caches flushed by the matmuls.

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


def _cached(
        module: torch.nn.Module,
        name: str,
        make: Callable[[], Any],
        params: Optional[Sequence[Optional[torch.Tensor]]] = None,
        modules: Tuple[Optional[torch.nn.Module], ...] = (),
) -> Any:
    """What ``make`` returns (re-laid-out weights), kept on ``module`` and remade whenever one of ``params`` (default:
    ``module``'s own) changes (load_state_dict, training, ``.to``) or one of ``modules`` is replaced."""
    # ``_parameters`` directly: ``parameters()`` walks a generator chain that costs more than the key itself, and this
    # runs several times per block at batch 1. No device in the key (making a ``torch.device`` is a good part of a
    # field's cost): a move to another device gives every tensor new storage, and so a new address.
    params = module._parameters.values() if params is None else params
    key = (modules, [(p.data_ptr(), p._version, p.dtype) for p in params if p is not None])
    cache = module.__dict__.get(name)
    if cache is None or cache[0] != key:  # modules compare by identity
        with torch.no_grad():
            cache = (key, make())
        module.__dict__[name] = cache
    return cache[1]


def _head_major_qkv(qkv: torch.nn.Linear, num_heads: int, parts: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The first ``parts`` of q, k, v in head-major row order, [q_0; k_0; v_0; q_1; ...] for parts=3, ((H*parts*dh, D)).

    Then the rows of a contiguous range of heads are one slice.
    """
    def make():
        w = qkv.weight.view(3, num_heads, -1, qkv.in_features)[:parts]  # (parts, H, dh, D)
        b = qkv.bias.view(3, num_heads, -1)[:parts] if qkv.bias is not None else None
        return (w.transpose(0, 1).reshape(-1, qkv.in_features).contiguous(),
                b.transpose(0, 1).reshape(-1).contiguous() if b is not None else None)
    return _cached(qkv, f'_adavit_head_major_{parts}', make)


def _transposed(linear: torch.nn.Linear) -> torch.Tensor:
    """``linear.weight.t()`` as a contiguous (in, out) matrix: a range of input channels is then a row slice."""
    return _cached(linear, '_adavit_transposed', lambda: (linear.weight.t().contiguous(),))[0]


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on (its rules do not reach ``out=`` calls), else ``t``'s."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def _linear_into(
        out: torch.Tensor,
        x: torch.Tensor,
        weight_t: torch.Tensor,
        bias: Optional[torch.Tensor],
        accumulate: bool = False,
) -> None:
    """``out = x @ weight_t + bias`` (or ``out += ...``), written into ``out``: a row slice of a larger buffer, or the
    residual rows themselves, so that no output is concatenated or added afterwards."""
    dtype = out.dtype
    # Casts only where needed: even a no-op ``.to`` is a dispatcher round trip, and a batch-1 forward makes hundreds.
    x = x if x.dtype == dtype else x.to(dtype)
    weight_t = weight_t if weight_t.dtype == dtype else weight_t.to(dtype)
    if bias is not None:
        bias = bias if bias.dtype == dtype else bias.to(dtype)
    if accumulate:  # the out= form, not addmm_, so that FlopCounterMode sees the work
        torch.addmm(out, x, weight_t, out=out)
        if bias is not None:
            out += bias
    elif bias is not None:
        torch.addmm(bias, x, weight_t, out=out)
    else:
        torch.mm(x, weight_t, out=out)


# Kept heads that fall in this many separate ranges or more are gathered into one weight matrix; fewer ranges run one
# matmul per range on weight slices, with no copy. Measured on 2 CPU threads, DeiT-S shapes (138 tokens, 6 heads):
# with 2 ranges, per-range matmuls beat gathering by 15-25% (qkv, proj, fc1); with 3, they tie on fc1 and win on qkv.
GATHER_FROM_RUNS = 4


def _kept_heads_matmul_into(
        out: torch.Tensor,
        x: torch.Tensor,
        weight_t: torch.Tensor,
        bias: Optional[torch.Tensor],
        runs: Sequence[Tuple[int, int]],
        head_dim: int,
        x_is_full_width: bool,
        accumulate: bool = False,
) -> None:
    """``out = x[:, kept channels] @ weight_t[kept channels] + bias`` (see ``GATHER_FROM_RUNS``), or ``out += ...``.

    Args:
        out: (T, O) destination.
        x: (T, D) inputs with every channel (``x_is_full_width``) or (T, w) with only the kept ones, in run order.
        weight_t: (D, O) transposed weight.
        bias: (O,) or None.
        runs: Kept head ranges.
        head_dim: Channels per head.
        accumulate: Add to ``out`` instead of overwriting it.
    """
    if not runs:  # every input channel dropped: only the bias survives
        if accumulate:
            if bias is not None:
                out += bias
        else:
            out.copy_(bias.expand_as(out)) if bias is not None else out.zero_()
    elif len(runs) >= GATHER_FROM_RUNS:
        channels = _run_channels(runs, head_dim, x.device)
        _linear_into(out, x.index_select(1, channels) if x_is_full_width else x, weight_t.index_select(0, channels),
                     bias, accumulate)
    else:  # one matmul per range, accumulated in place
        offset = 0
        for i, (a, b) in enumerate(runs):
            lo, hi = a * head_dim, b * head_dim
            x_run = x[:, lo:hi] if x_is_full_width else x[:, offset:offset + hi - lo]
            offset += hi - lo
            _linear_into(out, x_run, weight_t[lo:hi], bias if i == 0 else None, accumulate or i > 0)


def _run_channels(runs: Sequence[Tuple[int, int]], head_dim: int, device: torch.device) -> torch.Tensor:
    """Channel indices of the heads in ``runs``, in order."""
    return torch.cat([torch.arange(a * head_dim, b * head_dim, device=device) for a, b in runs])


# Splitting a head group's attention into one more call costs about as much as this many multiply-adds of padded work
# (measured on a 2-core CPU: ~40 us per call of matmul, softmax and matmul); on a GPU, launches cost more than
# padding, so a group is padded to its longest image in one call.
SPLIT_COST_MACS = {'cpu': 1.5e6}

# On CPU, attention over at most this many keys runs as matmul + softmax + matmul, which beats the flash kernel on the
# sequences dropped tokens leave: 1.3-1.6x at 20-45 keys (2 threads, 3 heads of 32 channels), and in a DeiT-S batch of
# 64 at keep 0.7/0.7/0.9 (buckets of 12-66 problems of 126-150 keys) the whole forward runs 1.023-1.030x as fast
# (paired, 2 threads, Intel Xeon; 1.012x at batch 8), a tie with all 197 tokens kept. Scores are made for at most
# MATH_ATTENTION_CHUNK (problem, query, key) entries at a time (2 MB of fp32, an L2 cache): with 64 MB chunks the gain
# was 1.005x, and on an AMD EPYC host flash was 5-10% faster with them (2 MB chunks not timed there). A single image
# (``_single_image_block_forward``) goes over to the flash kernel above SINGLE_IMAGE_MATH_ATTENTION_UP_TO keys: on its
# few heads the matmul path measured 0.971-0.988x there. GPUs always use scaled_dot_product_attention.
MATH_ATTENTION_UP_TO = 256
SINGLE_IMAGE_MATH_ATTENTION_UP_TO = 64
MATH_ATTENTION_CHUNK = 1 << 19

# PyTorch's CPU softmax is about 15x slower per element over rows shorter than 16 (2 threads: 6 ns against 0.4 ns),
# and the few tokens deep blocks keep make such rows: the matmul path softmaxes them padded to this width with -inf.
SOFTMAX_MIN_ROW = 16


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


def _qkv_into(
        out: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        runs: Sequence[Tuple[int, int]],
        head_dim: int,
) -> torch.Tensor:
    """q, k, v of the kept heads for the rows ``x`` (T, D), written into ``out`` (T * h * 3, dh) as (T, h, 3, dh).

    ``weight`` is the head-major qkv weight (rows [q_0; k_0; v_0; q_1; ...], ``_head_major_qkv``): each run of kept
    heads is a row slice of it, whose matmul writes straight into its columns of ``out`` (no weight copy), unless there
    are ``GATHER_FROM_RUNS`` runs or more.
    """
    T, per_head = x.shape[0], 3 * head_dim
    kept = sum(b - a for a, b in runs)
    rows = out.view(T, kept * per_head)  # (T, h * 3 * dh)
    if len(runs) >= GATHER_FROM_RUNS:
        channels = _run_channels(runs, per_head, x.device)
        _linear_into(rows, x, weight.index_select(0, channels).t(),
                     bias.index_select(0, channels) if bias is not None else None)
    else:
        offset = 0
        for a, b in runs:
            lo, hi = a * per_head, b * per_head
            _linear_into(rows[:, offset:offset + hi - lo], x, weight[lo:hi].t(),
                         bias[lo:hi] if bias is not None else None)
            offset += hi - lo
    return out.view(T, kept, 3, head_dim)


def _normalize_qk(attn: torch.nn.Module, qkv: torch.Tensor) -> None:
    """timm's optional q/k norms (``qk_norm=True``), in place on a (T, h, 3, dh) block of q, k, v."""
    for part, norm in enumerate((attn.q_norm, attn.k_norm)):
        if not isinstance(norm, torch.nn.Identity):
            qkv[:, :, part] = norm(qkv[:, :, part])


def _attention(
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        bias: Optional[torch.Tensor],
        scale: float,
        out: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """``softmax(scale * q @ k^T + bias) @ v`` for (..., L, dh) inputs, bias (b, 1, L) or None; into ``out``.

    Inputs with more than one leading dimension (``bias`` None) give the matmul path's output as (b, L, dh).
    """
    L, dh = q.shape[-2:]
    if q.device.type != 'cpu' or L > MATH_ATTENTION_UP_TO:
        result = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=scale)
        return result if out is None else out.copy_(result)
    if q.dim() != 3:
        q, k, v = (t.reshape(-1, L, dh) for t in (q, k, v))  # (b, L, dh): copies of the equal-count path's views
    b = q.shape[0]
    out = q.new_empty(q.shape) if out is None else out
    step = max(1, MATH_ATTENTION_CHUNK // (L * L))
    for i in range(0, b, step):
        q_i, k_i, v_i, out_i = (t[i:i + step] for t in (q, k, v, out)) if step < b else (q, k, v, out)
        # One baddbmm scales the scores and adds the padding bias: no scaled copy of q, no separate bias pass.
        if bias is None:
            scores = torch.baddbmm(q_i.new_empty(()), q_i, k_i.transpose(1, 2), beta=0, alpha=scale)
        else:
            scores = torch.baddbmm(bias[i:i + step] if step < b else bias, q_i, k_i.transpose(1, 2), alpha=scale)
        if L < SOFTMAX_MIN_ROW:  # softmax in rows of SOFTMAX_MIN_ROW, the keys past L at -inf: exactly the same
            wide = scores.new_empty(scores.shape[0], L, SOFTMAX_MIN_ROW)  # (b_i, L, SOFTMAX_MIN_ROW)
            wide[:, :, L:] = float('-inf')
            wide[:, :, :L] = scores
            probs = wide.softmax(-1)[:, :, :L]
        else:
            probs = scores.softmax(-1)  # (b_i, L, L)
        torch.bmm(probs, v_i, out=out_i)
    return out


def _attend(qkv: torch.Tensor, groups: List[Tuple[int, int, List[int]]]) -> torch.Tensor:
    """Attention of each image over its own tokens, head by head, for every head group of a sub-block in one pass.

    Args:
        qkv: (R + 3, dh) rows: head group g's q, k, v as (T_g, h_g, 3, dh) from row ``start_g``, then three spare
            rows, which this zeroes where padded attention slots read them.
        groups: (start_g, h_g, counts_g) per head group; ``counts_g`` are the tokens of its images, in packed order
            (``pack_tokens`` makes them ascending within a group).

    Returns:
        (R / 3, dh) attention outputs: group g's as (T_g, h_g, dh) from row ``start_g / 3``.
    """
    dh = qkv.shape[1]
    scale = dh ** -0.5
    start, h, counts = groups[0]
    n, length = len(counts), counts[0]
    if len(groups) == 1 and counts.count(length) == n:  # equal counts: a plain batch of views, no index arithmetic
        T = n * length
        q, k, v = (t.transpose(1, 2) for t in qkv[start:start + T * h * 3].view(n, length, h, 3, dh).unbind(3))
        return _attention(q, k, v, None, scale).view(n, h, length, dh).transpose(1, 2).reshape(T * h, dh)

    # Every image of every group, by token count (stable: packed order within a count), with its heads and first row.
    group_counts = [np.array(counts) for _, _, counts in groups]
    counts = np.concatenate(group_counts)
    heads = np.concatenate([np.full(len(c), h) for (_, h, _), c in zip(groups, group_counts)])
    first_rows = np.concatenate([start + 3 * h * (np.cumsum(c) - c) for (start, h, _), c in zip(groups, group_counts)])
    if len(groups) > 1 or np.any(counts[1:] < counts[:-1]):  # ``pack_tokens``'s single group is sorted already
        order = np.argsort(counts, kind='stable')
        counts, heads, first_rows = counts[order], heads[order], first_rows[order]
    buckets = attention_buckets(counts.tolist(), heads.tolist(), 2 * dh,
                                SPLIT_COST_MACS.get(qkv.device.type, float('inf')))

    # Padded layout: each (image, head) is one attention problem of its bucket's length L, and a bucket is one
    # contiguous batch of problems. A (token, head) is one row of q, k, v together, (3 * dh,): each padded slot reads
    # one, or the zero row where it is padding, and its key gets a bias of -inf there. Per problem: its first row, the
    # stride between its tokens' rows (its image's heads), its token count; per bucket, a (problems, L) matrix of rows.
    # NumPy: a few hundred problems, and a handful of vector operations per bucket.
    first_problem = np.concatenate([[0], np.cumsum(heads)])  # (n + 1,) each image's first problem, then the total
    image = np.repeat(np.arange(len(counts)), heads)  # (p,) problems, image by image
    head = np.arange(len(image)) - first_problem[image]
    first_row, stride, count = first_rows[image] // 3 + head, heads[image], counts[image]
    zero_row = qkv.shape[0] // 3 - 1
    problem_bounds = first_problem[[first for first, _, _ in buckets] + [len(counts)]]  # bucket b: [b], [b + 1]
    sizes = [(problem_bounds[i + 1] - problem_bounds[i]) * length for i, (_, _, length) in enumerate(buckets)]
    rows = np.empty(sum(sizes), dtype=np.int64)  # (P,) padded slots
    bias = np.zeros(sum(sizes), dtype=np.float32)
    positions = np.arange(max(length for _, _, length in buckets))
    plan, slot = [], 0
    for i, (first, _, length) in enumerate(buckets):
        a, b = problem_bounds[i], problem_bounds[i + 1]
        rows_b = rows[slot:slot + sizes[i]].reshape(b - a, length)  # (problems, L)
        np.multiply(positions[:length], stride[a:b, None], out=rows_b)
        rows_b += first_row[a:b, None]
        has_padding = counts[first] < length  # ascending counts: the bucket's first image is its shortest
        if has_padding:
            padding = positions[:length] >= count[a:b, None]
            rows_b[padding] = zero_row
            bias[slot:slot + sizes[i]].reshape(b - a, length)[padding] = -np.inf
        plan.append((slot, b - a, length, has_padding))
        slot += sizes[i]
    # Where each output row comes from: the slot that read its row (padded slots all name the zero row, a spare).
    slot_of_row = np.empty(zero_row + 1, dtype=np.int64)
    slot_of_row[rows] = np.arange(len(rows))
    dev = qkv.device
    rows_t, slot_of_row_t = (torch.from_numpy(a).to(dev) for a in (rows, slot_of_row[:-1]))
    bias_t = torch.from_numpy(bias).to(dev, qkv.dtype)
    qkv[-3:].zero_()  # what padded slots read (the equal-count path above reads none)
    padded_qkv = qkv.view(-1, 3 * dh).index_select(0, rows_t)  # (P, 3 * dh)
    out = qkv.new_empty(len(rows), dh)  # (P, dh)
    for slot, num, length, has_padding in plan:
        size = num * length
        if size:  # images without tokens have nothing to attend
            # (problems, L, dh) each, rows 3 * dh apart: strided views, no copy
            q, k, v = padded_qkv[slot:slot + size].view(num, length, 3, dh).unbind(2)
            _attention(q, k, v, bias_t[slot:slot + size].view(num, 1, length) if has_padding else None, scale,
                       out[slot:slot + size].view(num, length, dh))
    return out.index_select(0, slot_of_row_t)


def _msa(
        block: Block,
        tokens: torch.Tensor,
        packing: Packing,
        head_mode: str,
        into: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """MSA outputs (before ``ls1``) of the packed, normed rows ``tokens`` (T, D): added to ``into`` and ``into``
    returned, where given and the path allows it (the caller adds what comes back otherwise)."""
    attn = block.attn
    D = tokens.shape[-1]
    H, dh = attn.num_heads, attn.head_dim
    first = packing.groups[0]
    if len(packing.groups) == 1 and first.head_runs is None and first.start == 0 and first.end == len(tokens) \
            and max(first.counts) * len(first.counts) == len(tokens):
        # every row, every head, images of equal token counts: timm's own attention module, on (n, L, D)
        return attn(tokens.view(len(first.counts), -1, D)).view(-1, D)
    dtype = _compute_dtype(tokens)
    accumulate = into is not None
    out = into if accumulate else _output_rows(tokens, attn.proj.out_features, _row_spans(packing.groups), dtype)
    proj_t = _transposed(attn.proj)  # (H*dh, D)
    groups = [(g, [(0, H)] if g.head_runs is None else g.head_runs) for g in packing.groups]
    if head_mode == 'full':
        # Every group's q, k, v in one buffer of dh-wide rows, so that one attention pass serves all groups.
        w_qkv, b_qkv = _head_major_qkv(attn.qkv, H, parts=3)  # rows [q_h; k_h; v_h] per head
        kept = [sum(b - a for a, b in runs) for _, runs in groups]  # heads per group
        rows = [(g.end - g.start) * h for (g, _), h in zip(groups, kept)]  # (token, head) rows per group
        qkv = tokens.new_empty(3 * sum(rows) + 3, dh, dtype=dtype)  # + 3 rows for padded slots (_attend zeroes them)
        layout, start = [], 0
        for (g, runs), h, n in zip(groups, kept, rows):
            if n:
                _normalize_qk(attn, _qkv_into(qkv[start:start + 3 * n], tokens[g.start:g.end], w_qkv, b_qkv, runs, dh))
                layout.append((start, h, g.counts))
            start += 3 * n
        o = _attend(qkv, layout) if layout else qkv[:0]  # (R / 3, dh)
        start = 0
        for (g, runs), h, n in zip(groups, kept, rows):  # a group without heads gets proj's bias alone
            _kept_heads_matmul_into(out[g.start:g.end], o[start:start + n].view(g.end - g.start, h * dh), proj_t,
                                    attn.proj.bias, runs, dh, x_is_full_width=False, accumulate=accumulate)
            start += n
        return out
    for g, runs in groups:  # partial: a dropped head passes its values through, so v is needed at full width
        x_g = tokens[g.start:g.end]
        T_g = g.end - g.start
        o = F.linear(x_g, attn.qkv.weight[2 * H * dh:], attn.qkv.bias[2 * H * dh:]
                     if attn.qkv.bias is not None else None)  # (Tg, H*dh) values of every head
        w_qk, b_qk = _head_major_qkv(attn.qkv, H, parts=2)  # rows [q_h; k_h] per head
        for a, b in runs:
            rows = slice(a * 2 * dh, b * 2 * dh)
            qkv = x_g.new_empty(T_g * (b - a) * 3 + 3, dh, dtype=o.dtype)  # _attend's layout, one group
            q_k_v = qkv[:-3].view(T_g, b - a, 3, dh)
            qk = F.linear(x_g, w_qk[rows], b_qk[rows] if b_qk is not None else None)  # (T_g, (b - a) * 2 * dh)
            q_k_v[:, :, :2] = qk.view(T_g, b - a, 2, dh)
            q_k_v[:, :, 2] = o[:, a * dh:b * dh].view(T_g, b - a, dh)
            _normalize_qk(attn, q_k_v)
            o[:, a * dh:b * dh] = _attend(qkv, [(0, b - a, g.counts)]).view(T_g, (b - a) * dh)
        _linear_into(out[g.start:g.end], o, proj_t, attn.proj.bias, accumulate)
    return out


# On CPU the FFN runs its packed rows in chunks of about this many bytes of hidden activations, fc1, activation and fc2
# in turn, so that a chunk's hidden units are still in cache when the activation and fc2 read them. Over 8,000 rows of
# a DeiT-S FFN (49 MB of hidden units), chunks of 1,024-2,048 rows make the FFN alone 20-25% faster, and the whole
# batch-64 forward 3-9% where the sparse model runs alone (2 threads, Intel Xeon; ``benchmarks/ffn_chunks.py``). At
# 512 rows and fewer, fc2's weight, reread per chunk, costs more than the cache saves. GPUs run the FFN in one pass.
FFN_CHUNK_BYTES = {'cpu': 6 << 20}


def _ffn(
        block: Block,
        x_ffn: torch.Tensor,
        packing: Packing,
        head_dim: int,
        into: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """FFN outputs (before ``ls2``) of packed, not yet normed rows (T, D); fc1 reads only kept heads' channels. Added to
    ``into`` and ``into`` returned, where given and the MLP has no norm or dropout between fc1 and fc2. Rows outside
    the packing's groups (another sub-block's, ``pack_sub_blocks``) are left alone, or get 0."""
    mlp = block.mlp
    T = packing.num_rows
    dtype = _compute_dtype(x_ffn)
    hidden_row_bytes = mlp.fc1.out_features * dtype.itemsize
    chunk = max(1, FFN_CHUNK_BYTES.get(x_ffn.device.type, T * hidden_row_bytes) // hidden_row_bytes)  # rows
    spans = _row_spans(packing.groups)
    if spans == [(0, len(x_ffn))] and T <= chunk and len(packing.groups) == 1 and packing.groups[0].head_runs is None:
        # One chunk, every head: timm's own MLP, as the dense model runs it. At batch 1, paired in the benchmark's
        # harness (2 threads, Intel Xeon), 1.044x the speed of the buffer path below on DeiT-S at keep 0.7/0.7/0.9
        # (twice) and 1.050x on the Fashion-MNIST AdaViT; a tie with every token kept, and 1.012x on Fashion-MNIST at
        # batch 256. The buffer and the chunks pay off on the thousands of rows of a batch.
        y = mlp(block.norm2(x_ffn))  # (T, D)
        if into is None:
            return y
        into += y
        return into
    fused_fc2 = into is not None and all(isinstance(m, (torch.nn.Identity, torch.nn.Dropout))
                                         for m in (mlp.drop1, mlp.norm, mlp.drop2))  # eval: dropout does nothing
    out = into if fused_fc2 else None
    longest = max(end - start for start, end in spans)
    hidden_buffer = x_ffn.new_empty(min(chunk, longest), mlp.fc1.out_features, dtype=dtype)  # (C, R), reused per chunk
    # fc1 reads timm's weight through a transposed view (a range of input channels is a strided row slice of it), not a
    # contiguous (D, R) copy as proj does. Side by side (2 threads, Intel Xeon): 4.6-5.1% faster at DeiT-S batch 1 in
    # `adavit benchmark`'s rotation (a tie with the sparse model alone), 4.9% on Fashion-MNIST at batch 256, a tie at
    # batch 64; for proj the copy measured faster on Fashion-MNIST. And no second copy of fc1's weights is kept.
    fc1_t = mlp.fc1.weight.t()  # (D, R) view
    for start, end in ((s, min(s + chunk, span_end)) for span_start, span_end in spans
                       for s in range(span_start, span_end, chunk)):
        h2 = block.norm2(x_ffn[start:end])  # (C, D)
        hidden = hidden_buffer[:end - start]
        for g in packing.groups:  # each head group's rows in this chunk: fc1 on its kept heads' channels
            if g.end <= start:
                continue
            if g.start >= end:
                break
            a, b = max(g.start, start), min(g.end, end)
            h_g, hidden_g = h2[a - start:b - start], hidden[a - start:b - start]
            if g.head_runs is None:
                _linear_into(hidden_g, h_g, fc1_t, mlp.fc1.bias)
            else:
                _kept_heads_matmul_into(hidden_g, h_g, fc1_t, mlp.fc1.bias, g.head_runs, head_dim,
                                        x_is_full_width=True)
        hidden = _activate(mlp.act, hidden)
        if fused_fc2:
            _linear_into(into[start:end], hidden, mlp.fc2.weight.t(), mlp.fc2.bias, accumulate=True)
            continue
        y = mlp.drop2(mlp.fc2(mlp.norm(mlp.drop1(hidden))))  # (C, D)
        if out is None:
            out = _output_rows(x_ffn, y.shape[1], spans, y.dtype)
        out[start:end] = y
    return out


def _row_spans(groups: List[HeadGroup]) -> List[Tuple[int, int]]:
    """The packed rows the head groups cover, as [start, end) ranges, adjacent groups merged."""
    spans = [(groups[0].start, groups[0].end)]
    for g in groups[1:]:
        if g.start == spans[-1][1]:
            spans[-1] = (spans[-1][0], g.end)
        else:
            spans.append((g.start, g.end))
    return spans


def _output_rows(rows: torch.Tensor, width: int, spans: List[Tuple[int, int]], dtype: torch.dtype) -> torch.Tensor:
    """A (T, width) output buffer for a sub-block's ``spans`` of the (T, D) ``rows``: zeros where they leave rows out,
    which the caller then adds to rows the sub-block does not run on."""
    if spans == [(0, len(rows))]:
        return rows.new_empty(len(rows), width, dtype=dtype)
    return rows.new_zeros(len(rows), width, dtype=dtype)


# ``torch.ops.aten.gelu_`` resolves its overload on every call: at batch 1 that cost 5 us of a 44 us GELU (hot).
_GELU_IN_PLACE = torch.ops.aten.gelu_.default


def _activate(act: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """``act(hidden)``, in place for GELU: the hidden buffer is the executor's own, so no second (C, R) buffer is
    made (timm's Mlp, with one, is 12% slower on an FFN of 12,800 x 96 -> 384). Other activations run as defined."""
    if type(act) is torch.nn.GELU:
        return _GELU_IN_PLACE(hidden, approximate=act.approximate)
    return act(hidden)


def normed_rows(
        norm1: Callable[[torch.Tensor], torch.Tensor],
        x_normed: Optional[torch.Tensor],
        residual: torch.Tensor,
        rows: Optional[torch.Tensor],
) -> torch.Tensor:
    """The block's ``norm1`` of a sub-block's packed rows (T, D): the ``rows`` of ``x_normed`` where the model has
    normed every token (for its patch gate), else ``norm1`` of ``residual``, those rows of the stream, alone."""
    if x_normed is None:
        return norm1(residual)
    flat = x_normed.reshape(-1, x_normed.shape[-1])
    return flat if rows is None else flat.index_select(0, rows)


def _copy_rows(x: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """``x[rows] = values`` for (R, D) ``x`` and (T, D) ``values``, in place.

    ``index_copy_`` moves one element at a time: reinterpreted as 16-byte elements (the bits are copied, not converted),
    a row of 96 float32 takes 24 moves instead of 96, and the copy is twice as fast (2 CPU threads, 11,000 of 12,800
    rows).
    """
    if all(t.is_contiguous() and (t.storage_offset() * t.element_size()) % 16 == 0 for t in (x, values)) \
            and (x.shape[1] * x.element_size()) % 16 == 0:
        x, values = x.view(torch.complex128), values.view(torch.complex128)
    x.index_copy_(0, rows, values)


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


def _as_mask(decisions: torch.Tensor) -> np.ndarray:
    """``decisions > 0.5`` of a CPU tensor as a NumPy bool array. NumPy compares fp32 and fp64 tensors in place and
    takes bool ones as they are: at a few hundred decisions a torch op costs several times as much."""
    if decisions.dtype == torch.bool:
        return decisions.numpy()
    if decisions.dtype in (torch.float32, torch.float64):
        return decisions.detach().numpy() > 0.5
    return (decisions > 0.5).numpy()


def _host_masks(*decisions: Optional[torch.Tensor]) -> List[Optional[np.ndarray]]:
    """``t > 0.5`` of each decision tensor (or None) as a NumPy bool array: on a CPU by ``_as_mask``, otherwise by one
    device-to-host copy that serves them all (one sync per block on a GPU)."""
    present = [t for t in decisions if t is not None]
    if all(t.device.type == 'cpu' for t in present):
        masks = iter(_as_mask(t) for t in present)
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


def _plan_batch(
        patch_keep: Optional[torch.Tensor],
        head_keep: Optional[torch.Tensor],
        block_keep: Optional[torch.Tensor],
        num_tokens: int,
        batch_size: int,
        head_mode: str,
) -> Tuple[Optional[Packing], Optional[Packing]]:
    """The MSA and FFN packings of a batch of B images (decisions as ``sparse_block_forward`` takes them, N tokens).

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


class _SingleImagePlan(NamedTuple):
    """A plain block as the latency path runs it (``_single_image_plan``): the weights of each contiguous range of heads
    [a, b) sliced beforehand, and the norms and the activation as calls of their kernels, not of their modules."""
    qkv: Dict[Tuple[int, int], Tuple[torch.Tensor, Optional[torch.Tensor]]]  # qkv^T (D, w*3*dh): [q_a; k_a; v_a; ...]
    proj: Dict[Tuple[int, int], torch.Tensor]  # rows of proj^T (w * dh, D)
    fc1: Dict[Tuple[int, int], torch.Tensor]  # rows of fc1^T (w * dh, R), a view of the weight
    proj_bias: Optional[torch.Tensor]
    fc1_bias: Optional[torch.Tensor]
    fc2_t: torch.Tensor  # (R, D) view
    fc2_bias: Optional[torch.Tensor]
    norm1: Callable[[torch.Tensor], torch.Tensor]
    norm2: Callable[[torch.Tensor], torch.Tensor]
    activate: Callable[[torch.Tensor], torch.Tensor]  # ``_activate`` of the block's activation: in place for GELU
    dtype: torch.dtype  # the weights'
    num_heads: int
    head_dim: int


_PLAIN_LAYER_NORMS = (torch.nn.LayerNorm, LayerNorm)


class _LayerNormKernel:
    """A plain LayerNorm as a call of ``F.layer_norm``, reading the module's attributes on every call as its forward
    does. A class, not a closure, so that a model that holds it in its plan still pickles (``torch.save(model)``)."""

    def __init__(self, norm: torch.nn.LayerNorm) -> None:
        self.norm, self.params = norm, norm._parameters

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        norm, params = self.norm, self.params
        return F.layer_norm(x, norm.normalized_shape, params['weight'], params['bias'], norm.eps)


def _norm_kernel(norm: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    """``norm`` as a ``_LayerNormKernel`` where it is a plain LayerNorm, else the module itself."""
    if type(norm) not in _PLAIN_LAYER_NORMS or norm.__dict__.get('_fast_norm', False):
        return norm
    return _LayerNormKernel(norm)


def _single_image_plan(block: Block) -> Optional[_SingleImagePlan]:
    """The block's ``_SingleImagePlan``, remade whenever a weight changes (load_state_dict, training, ``.to``) or a
    module is replaced; None where the block is not timm's plain layout (layer scale, q/k norm, a norm inside the MLP),
    which the batch path serves."""
    # Dictionary lookups instead of module attributes (each a ``__getattr__``): this runs once per block at batch 1,
    # where Python runs with caches full of weights (DeiT-S's forward spent 2.3x the Python time of a 12-wide twin's).
    parts = block._modules
    attn, mlp = parts['attn']._modules, parts['mlp']._modules
    linears = (attn['qkv'], attn['proj'], mlp['fc1'], mlp['fc2'])
    absent = (parts['ls1'], parts['ls2'], attn['q_norm'], attn['k_norm'], mlp.get('norm'))  # Identity in a plain block
    modules = absent + (parts['norm1'], parts['norm2'], mlp['act']) + linears
    params = [m._parameters[name] for m in linears for name in ('weight', 'bias')]

    def make():
        if not all(type(m) is torch.nn.Identity for m in absent):
            return None
        H, dh = block.attn.num_heads, block.attn.head_dim
        w_qkv, b_qkv = _head_major_qkv(attn['qkv'], H, parts=3)  # rows [q_h; k_h; v_h] per head
        proj_t, fc1_t = _transposed(attn['proj']), params[4].t()
        ranges = [(a, b) for a in range(H) for b in range(a + 1, H + 1)]
        return _SingleImagePlan(
            qkv={(a, b): (w_qkv[a * 3 * dh:b * 3 * dh].t(), None if b_qkv is None else b_qkv[a * 3 * dh:b * 3 * dh])
                 for a, b in ranges},
            proj={(a, b): proj_t[a * dh:b * dh] for a, b in ranges},
            fc1={(a, b): fc1_t[a * dh:b * dh] for a, b in ranges},
            proj_bias=params[3], fc1_bias=params[5], fc2_t=params[6].t(), fc2_bias=params[7],
            norm1=_norm_kernel(parts['norm1']), norm2=_norm_kernel(parts['norm2']),
            activate=functools.partial(_activate, mlp['act']),
            dtype=params[0].dtype, num_heads=H, head_dim=dh)
    return _cached(block, '_adavit_single_image_plan', make, params, modules)


def _latency_plan(block: Block, x: torch.Tensor, head_mode: str) -> Optional[_SingleImagePlan]:
    """The plan ``_single_image_block_forward`` runs this call with, or None where the batch path serves it: it takes
    one image, full head deactivation, a plain block (``_single_image_plan``) and weights in the stream's dtype."""
    if x.shape[0] != 1 or head_mode != 'full':
        return None
    plan = _single_image_plan(block)
    if plan is None or x.dtype != plan.dtype or _compute_dtype(x) != x.dtype:
        return None
    return plan


def _single_image_decisions(
        patch_keep: Optional[torch.Tensor],
        head_keep: Optional[torch.Tensor],
        block_keep: Optional[torch.Tensor],
        on_host: bool,
) -> Tuple[bool, bool, Optional[Tuple[Tuple[int, int], ...]], Optional[np.ndarray]]:
    """One image's decisions (``sparse_block_forward``'s, B = 1) on the host.

    Args:
        on_host: Whether the decisions are CPU tensors, read in place. Otherwise one device-to-host copy brings all of
            them (``batch_masks``), so that a GPU waits once per block.

    Returns:
        (runs the MSA, runs the FFN, kept heads as ``head_runs`` or None for all, kept token indices (T,) or None for
        all).
    """
    # (2,) sub-blocks run, (H,) heads kept, (N,) tokens kept, each None for all
    if not on_host:
        tokens, heads, run_msa, run_ffn = batch_masks(patch_keep, head_keep, block_keep)
        sub_blocks = None if run_msa is None and run_ffn is None else \
            [run_msa is None or run_msa[0], run_ffn is None or run_ffn[0]]
        heads = None if heads is None else heads[0].tolist()
        tokens = None if tokens is None else tokens[0]
    else:
        sub_blocks = None if block_keep is None else [v > 0.5 for v in block_keep[0].tolist()]
        heads = None if head_keep is None else [v > 0.5 for v in head_keep[0].tolist()]
        tokens = None if patch_keep is None else _as_mask(patch_keep)[0]
    run_msa, run_ffn = (True, True) if sub_blocks is None else (bool(sub_blocks[0]), bool(sub_blocks[1]))
    runs = None
    if heads is not None:
        pattern = sum(1 << h for h, kept in enumerate(heads) if kept)
        runs = None if pattern == (1 << len(heads)) - 1 else head_runs(pattern, len(heads))
    rows = None
    if tokens is not None:
        rows = np.flatnonzero(tokens)
        rows = None if rows.size == tokens.size else rows
    return run_msa, run_ffn, runs, rows


def _single_image_block_forward(
        plan: _SingleImagePlan,
        x: torch.Tensor,
        x_normed: Optional[torch.Tensor],
        patch_keep: Optional[torch.Tensor],
        head_keep: Optional[torch.Tensor],
        block_keep: Optional[torch.Tensor],
) -> torch.Tensor:
    """The latency path (``sparse_block_forward``'s arguments, B = 1, with the block as its ``_latency_plan``). One
    image is one head group, so there is nothing to pack, group or bucket: the block runs as a dense one does, on the
    kept tokens and the kept heads' weights, every head as one range of them.

    At batch 1 a DeiT-S block is a few dozen small ops, and in the middle of a forward, with the caches full of
    weights, the Python around each op costs a fair share of the block's time. So this path reads the decisions
    straight into NumPy, takes its weight slices ready-made and calls the kernels, not the modules. Paired against the
    batch path (2 threads, Intel Xeon, DeiT-S at keep 0.7/0.7/0.9): 1.029x the speed while it still called the norms,
    the activation, and timm's attention and MLP where every head is kept, as modules; calling kernels (every head as
    one range), 1.050x that again (1.058x with the decision networks, 1.031x with every unit kept).
    """
    _, N, D = x.shape
    on_cpu = x.device.type == 'cpu'  # and so are the decisions, which the model makes where x is
    run_msa, run_ffn, runs, kept = _single_image_decisions(patch_keep, head_keep, block_keep, on_host=on_cpu)
    if not (run_msa or run_ffn):
        return x
    dh = plan.head_dim
    if runs is None:  # every head: one range
        runs = ((0, plan.num_heads),)
    rows = None if kept is None else index_tensor([kept], x.device)  # (T,)
    flat = x.view(N, D)
    residual = flat if rows is None else flat.index_select(0, rows)  # (T, D): updated in place, then written back
    T = residual.shape[0]
    if run_msa:
        normed = normed_rows(plan.norm1, x_normed, residual, rows)  # (T, D)
        h = 0
        for a, b in runs:
            h += b - a
        if h:
            qkv = normed.new_empty(T, h * 3 * dh)  # (T, h, 3, dh) flattened
            # The loops below do what ``_qkv_into`` and ``_kept_heads_matmul_into`` do, written out: calling those
            # helpers here, with these views, measured 0.979x the speed at batch 1 (paired, DeiT-S, 2 threads).
            column = 0
            for run in runs:  # one matmul per range of kept heads, into its columns
                w_qkv, b_qkv = plan.qkv[run]
                width = w_qkv.shape[1]
                if b_qkv is None:
                    torch.mm(normed, w_qkv, out=qkv[:, column:column + width])
                else:
                    torch.addmm(b_qkv, normed, w_qkv, out=qkv[:, column:column + width])
                column += width
            q, k, v = qkv.view(1, T, h, 3, dh).permute(3, 0, 2, 1, 4).unbind(0)  # (1, h, T, dh) each
            if T > SINGLE_IMAGE_MATH_ATTENTION_UP_TO:  # flash, called straight: (1, h, T, dh) -> (T, h * dh)
                o = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(T, h * dh)
            else:
                o = _attention(q, k, v, None, dh ** -0.5).reshape(h, T, dh).transpose(0, 1).reshape(T, h * dh)
            column = 0
            for run in runs:  # proj on the kept heads' rows, added into the residual rows
                proj_t = plan.proj[run]
                torch.addmm(residual, o[:, column:column + proj_t.shape[0]], proj_t, out=residual)
                column += proj_t.shape[0]
        if plan.proj_bias is not None:  # a dropped head's output is 0: with none kept, proj gives its bias
            residual += plan.proj_bias
    if run_ffn:
        normed = plan.norm2(residual)  # (T, D)
        hidden = normed.new_empty(T, plan.fc2_t.shape[0])  # (T, R)
        bias = plan.fc1_bias
        if not runs:  # no head's channels: fc1 gives its bias
            hidden.copy_(bias.expand_as(hidden)) if bias is not None else hidden.zero_()
        for i, (a, b) in enumerate(runs):  # fc1 on the kept heads' channels, accumulated
            fc1_t = plan.fc1[a, b]
            if i == 0 and bias is not None:
                torch.addmm(bias, normed[:, a * dh:b * dh], fc1_t, out=hidden)
            elif i == 0:
                torch.mm(normed[:, a * dh:b * dh], fc1_t, out=hidden)
            else:
                torch.addmm(hidden, normed[:, a * dh:b * dh], fc1_t, out=hidden)
        torch.addmm(residual, plan.activate(hidden), plan.fc2_t, out=residual)
        if plan.fc2_bias is not None:
            residual += plan.fc2_bias
    if rows is not None:
        _copy_rows(flat, rows, residual)
    return x


# Devices that run this module's plan: images grouped by head pattern, each group's GEMMs on its kept heads' weights, so
# every dropped head's multiply-adds are saved at the price of many small kernels. Other devices (GPUs), where a launch
# costs more than such a kernel's work, run ``sparse_accelerator.py``'s plan of a few launches per block.
HEAD_GROUPED_DEVICES = {'cpu'}


def runs_accelerator_plan(device: torch.device) -> bool:
    """Whether the sparse executor runs ``sparse_accelerator.py``'s plan on ``device`` (``HEAD_GROUPED_DEVICES``)."""
    return device.type not in HEAD_GROUPED_DEVICES


def sparse_block_forward(
        block: Block,
        x: torch.Tensor,
        x_normed: Optional[torch.Tensor],
        patch_keep: Optional[torch.Tensor],
        head_keep: Optional[torch.Tensor],
        block_keep: Optional[torch.Tensor],
        head_mode: str = 'full',
) -> torch.Tensor:
    """One timm ``Block`` under AdaViT decisions, computing only what they keep (same arguments as the masked one).

    Inference only: run it under ``torch.no_grad()`` or ``torch.inference_mode()``.

    Args:
        block: The timm block, in eval mode.
        x: Block input, (B, N, D); updated in place.
        x_normed: ``block.norm1(x)``, where the model computed it (for the patch gate), or None: each sub-block then
            norms only the rows it keeps.
        patch_keep: (B, N) token decisions, or None.
        head_keep: (B, H) head decisions, or None.
        block_keep: (B, 2) [MSA, FFN] decisions, or None.
        head_mode: ``"full"`` or ``"partial"``.

    Returns:
        Block output, (B, N, D).
    """
    # At batch 1 the latency path runs on every device: on an H200 in bf16 it took 6.9 ms a DeiT-S forward against the
    # accelerator plan's 11.6 (198 kernel launches against 309; keep 0.7/0.7/0.9, paired).
    plan = _latency_plan(block, x, head_mode)
    if plan is not None:
        return _single_image_block_forward(plan, x, x_normed, patch_keep, head_keep, block_keep)
    if runs_accelerator_plan(x.device):
        from .sparse_accelerator import accelerator_block_forward  # it builds on this module's helpers
        return accelerator_block_forward(block, x, x_normed, patch_keep, head_keep, block_keep, head_mode)
    B, N, _ = x.shape
    msa_packing, ffn_packing = _plan_batch(patch_keep, head_keep, block_keep, N, B, head_mode)
    flat = x.view(B * N, -1)
    # Under autocast the layers compute in bf16/fp16 while the residual stream stays fp32: their outputs are then added.
    plain = _compute_dtype(x) == x.dtype
    shared = msa_packing is not None and ffn_packing is not None and ffn_packing.rows is msa_packing.rows
    # A sub-block updates its residual rows: all of them in place, or its packed rows, gathered and written back (once
    # for both sub-blocks when they keep the same rows). Without layer scale, proj and fc2 add their products into these
    # rows themselves: no (T, D) output, no separate add.
    residual = None
    if msa_packing is not None:
        residual = flat if msa_packing.rows is None else flat.index_select(0, msa_packing.rows)  # (T, D)
        into = residual if plain and isinstance(block.ls1, torch.nn.Identity) else None
        out = _msa(block, normed_rows(block.norm1, x_normed, residual, msa_packing.rows), msa_packing, head_mode, into)
        if out is not residual:
            residual += block.ls1(out).to(x.dtype)
        if msa_packing.rows is not None and not shared:
            _copy_rows(flat, msa_packing.rows, residual)
    if ffn_packing is not None:
        if not shared:
            residual = flat if ffn_packing.rows is None else flat.index_select(0, ffn_packing.rows)  # (T, D)
        into = residual if plain and isinstance(block.ls2, torch.nn.Identity) else None
        out = _ffn(block, residual, ffn_packing, block.attn.head_dim, into)
        if out is not residual:
            residual += block.ls2(out).to(x.dtype)
        if ffn_packing.rows is not None:
            _copy_rows(flat, ffn_packing.rows, residual)
    return x
