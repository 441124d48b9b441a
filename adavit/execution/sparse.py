"""The sparse executor: eval-time execution that skips what the decisions drop, instead of multiplying it by zero.

Per block, for each sub-block (MSA, FFN):

* only the images that run it are processed, and of those only their kept tokens, packed across the batch, so that
  token-wise layers (norms, linears, MLP) run once on a (T, D) matrix of real tokens; where the MSA and the FFN run for
  different images, both work on one gathered set of rows, each on its own images' (``planning.pack_sub_blocks``);
* images are grouped by their head pattern; a group's q, k, v, proj and (full deactivation) fc1 use only its kept
  heads' weights, so a dropped head costs nothing. Each contiguous range of kept heads is a slice of the (re-laid-out,
  cached) weights with a matmul of its own; only many ranges are gathered into one matrix (``GATHER_FROM_RUNS``);
* attention runs per image and kept head over the image's kept tokens only, for all head groups in one pass: the
  (image, head) problems, sorted by token count, run in buckets padded to the bucket's longest image and masked
  (``planning.attention_buckets``: the only wasted work, and only in the small T x T products);
* on CPU the FFN runs its rows a chunk at a time (``FFN_CHUNK_BYTES``), so that fc1's output is still in cache when
  the activation and fc2 read it;
* at batch 1 a block runs as a dense one does, on the kept tokens and the kept heads' weights, with as little Python
  between the kernels as it takes (``latency.py``, the latency path).

The output equals the masked reference (``masked.py``) up to float rounding: a dropped token's MSA and FFN outputs are
multiplied by 0 there, so it passes through unchanged, and a kept query only ever sees kept keys.

This is the plan for CPUs. On other devices (GPUs), where a kernel launch costs the host more than a small matmul's
work, batches run ``sparse_accelerator.py``'s plan of a few launches per block instead (``HEAD_GROUPED_DEVICES``); a
single image takes the latency path there too.

The executor's parts: ``planning.py`` plans each block on the host (which rows, which head groups, which attention
buckets); ``kernels.py`` holds what every path shares (re-laid-out weights, matmuls into buffers, the CPU attention
kernel); ``latency.py`` runs one image; this module runs a batch on the CPU and dispatches a block to its path.
"""
from typing import List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from .kernels import (activate, attention, compute_dtype, copy_rows, head_major_qkv, linear_into, normed_rows,
                      transposed_weight)
from .latency import latency_plan, single_image_block_forward
from .planning import HeadGroup, Packing, attention_buckets, plan_batch


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
        linear_into(out, x.index_select(1, channels) if x_is_full_width else x, weight_t.index_select(0, channels),
                     bias, accumulate)
    else:  # one matmul per range, accumulated in place
        offset = 0
        for i, (a, b) in enumerate(runs):
            lo, hi = a * head_dim, b * head_dim
            x_run = x[:, lo:hi] if x_is_full_width else x[:, offset:offset + hi - lo]
            offset += hi - lo
            linear_into(out, x_run, weight_t[lo:hi], bias if i == 0 else None, accumulate or i > 0)


def _run_channels(runs: Sequence[Tuple[int, int]], head_dim: int, device: torch.device) -> torch.Tensor:
    """Channel indices of the heads in ``runs``, in order."""
    return torch.cat([torch.arange(a * head_dim, b * head_dim, device=device) for a, b in runs])


# Splitting a head group's attention into one more call costs about as much as this many multiply-adds of padded work
# (measured on a 2-core CPU: ~40 us per call of matmul, softmax and matmul); on a GPU, launches cost more than
# padding, so a group is padded to its longest image in one call.
SPLIT_COST_MACS = {'cpu': 1.5e6}


def _qkv_into(
        out: torch.Tensor,
        x: torch.Tensor,
        weight: torch.Tensor,
        bias: Optional[torch.Tensor],
        runs: Sequence[Tuple[int, int]],
        head_dim: int,
) -> torch.Tensor:
    """q, k, v of the kept heads for the rows ``x`` (T, D), written into ``out`` (T * h * 3, dh) as (T, h, 3, dh).

    ``weight`` is the head-major qkv weight (rows [q_0; k_0; v_0; q_1; ...], ``head_major_qkv``): each run of kept
    heads is a row slice of it, whose matmul writes straight into its columns of ``out`` (no weight copy), unless there
    are ``GATHER_FROM_RUNS`` runs or more.
    """
    T, per_head = x.shape[0], 3 * head_dim
    kept = sum(b - a for a, b in runs)
    rows = out.view(T, kept * per_head)  # (T, h * 3 * dh)
    if len(runs) >= GATHER_FROM_RUNS:
        channels = _run_channels(runs, per_head, x.device)
        linear_into(rows, x, weight.index_select(0, channels).t(),
                     bias.index_select(0, channels) if bias is not None else None)
    else:
        offset = 0
        for a, b in runs:
            lo, hi = a * per_head, b * per_head
            linear_into(rows[:, offset:offset + hi - lo], x, weight[lo:hi].t(),
                         bias[lo:hi] if bias is not None else None)
            offset += hi - lo
    return out.view(T, kept, 3, head_dim)


def _normalize_qk(attn: torch.nn.Module, qkv: torch.Tensor) -> None:
    """timm's optional q/k norms (``qk_norm=True``), in place on a (T, h, 3, dh) block of q, k, v."""
    for part, norm in enumerate((attn.q_norm, attn.k_norm)):
        if not isinstance(norm, torch.nn.Identity):
            qkv[:, :, part] = norm(qkv[:, :, part])


def _attend(qkv: torch.Tensor, groups: List[Tuple[int, int, List[int]]]) -> torch.Tensor:
    """Attention of each image over its own tokens, head by head, for every head group of a sub-block in one pass.

    Args:
        qkv: (R + 3, dh) rows: head group g's q, k, v as (T_g, h_g, 3, dh) from row ``start_g``, then three spare
            rows, which this zeroes where padded attention slots read them.
        groups: (start_g, h_g, counts_g) per head group; ``counts_g`` are the tokens of its images, in packed order
            (``planning.pack_tokens`` makes them ascending within a group).

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
        return attention(q, k, v, None, scale).view(n, h, length, dh).transpose(1, 2).reshape(T * h, dh)

    # Every image of every group, by token count (stable: packed order within a count), with its heads and first row.
    group_counts = [np.array(counts) for _, _, counts in groups]
    counts = np.concatenate(group_counts)
    heads = np.concatenate([np.full(len(c), h) for (_, h, _), c in zip(groups, group_counts)])
    first_rows = np.concatenate([start + 3 * h * (np.cumsum(c) - c) for (start, h, _), c in zip(groups, group_counts)])
    if len(groups) > 1 or np.any(counts[1:] < counts[:-1]):  # ``planning.pack_tokens``'s single group is sorted already
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
            attention(q, k, v, bias_t[slot:slot + size].view(num, 1, length) if has_padding else None, scale,
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
    dtype = compute_dtype(tokens)
    accumulate = into is not None
    out = into if accumulate else _output_rows(tokens, attn.proj.out_features, _row_spans(packing.groups), dtype)
    proj_t = transposed_weight(attn.proj)  # (H*dh, D)
    groups = [(g, [(0, H)] if g.head_runs is None else g.head_runs) for g in packing.groups]
    if head_mode == 'full':
        # Every group's q, k, v in one buffer of dh-wide rows, so that one attention pass serves all groups.
        w_qkv, b_qkv = head_major_qkv(attn.qkv, H, parts=3)  # rows [q_h; k_h; v_h] per head
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
        w_qk, b_qk = head_major_qkv(attn.qkv, H, parts=2)  # rows [q_h; k_h] per head
        for a, b in runs:
            rows = slice(a * 2 * dh, b * 2 * dh)
            qkv = x_g.new_empty(T_g * (b - a) * 3 + 3, dh, dtype=o.dtype)  # _attend's layout, one group
            q_k_v = qkv[:-3].view(T_g, b - a, 3, dh)
            qk = F.linear(x_g, w_qk[rows], b_qk[rows] if b_qk is not None else None)  # (T_g, (b - a) * 2 * dh)
            q_k_v[:, :, :2] = qk.view(T_g, b - a, 2, dh)
            q_k_v[:, :, 2] = o[:, a * dh:b * dh].view(T_g, b - a, dh)
            _normalize_qk(attn, q_k_v)
            o[:, a * dh:b * dh] = _attend(qkv, [(0, b - a, g.counts)]).view(T_g, (b - a) * dh)
        linear_into(out[g.start:g.end], o, proj_t, attn.proj.bias, accumulate)
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
    the packing's groups (another sub-block's, ``planning.pack_sub_blocks``) are left alone, or get 0."""
    mlp = block.mlp
    T = packing.num_rows
    dtype = compute_dtype(x_ffn)
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
                linear_into(hidden_g, h_g, fc1_t, mlp.fc1.bias)
            else:
                _kept_heads_matmul_into(hidden_g, h_g, fc1_t, mlp.fc1.bias, g.head_runs, head_dim,
                                        x_is_full_width=True)
        hidden = activate(mlp.act, hidden)
        if fused_fc2:
            linear_into(into[start:end], hidden, mlp.fc2.weight.t(), mlp.fc2.bias, accumulate=True)
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
    plan = latency_plan(block, x, head_mode)
    if plan is not None:
        return single_image_block_forward(plan, x, x_normed, patch_keep, head_keep, block_keep)
    if runs_accelerator_plan(x.device):
        # Imported here, not at the top: its import (torch's varlen attention) adds about 50 ms to ``import adavit``,
        # which a CPU never needs.
        from .sparse_accelerator import accelerator_block_forward
        return accelerator_block_forward(block, x, x_normed, patch_keep, head_keep, block_keep, head_mode)
    B, N, _ = x.shape
    msa_packing, ffn_packing = plan_batch(patch_keep, head_keep, block_keep, N, B, head_mode)
    flat = x.view(B * N, -1)
    # Under autocast the layers compute in bf16/fp16 while the residual stream stays fp32: their outputs are then added.
    plain = compute_dtype(x) == x.dtype
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
            copy_rows(flat, msa_packing.rows, residual)
    if ffn_packing is not None:
        if not shared:
            residual = flat if ffn_packing.rows is None else flat.index_select(0, ffn_packing.rows)  # (T, D)
        into = residual if plain and isinstance(block.ls2, torch.nn.Identity) else None
        out = _ffn(block, residual, ffn_packing, block.attn.head_dim, into)
        if out is not residual:
            residual += block.ls2(out).to(x.dtype)
        if ffn_packing.rows is not None:
            copy_rows(flat, ffn_packing.rows, residual)
    return x
