"""The sparse executor on accelerators: the same skipping, planned for few kernel launches instead of fewest MACs.

A GPU kernel launch costs the host about 10 us, more than most of the small GEMMs that grouping images by head pattern
makes (``sparse.py``, the CPU plan): at DeiT-S batch 256 that plan launched 4,852 kernels per forward and ran 22 times
slower than the dense model (H200, bf16). Here a block launches about twenty kernels, whatever the batch (261 per
forward at batch 256, keep 0.7/0.7/0.9). A single image takes the latency path (``latency.py``) instead, on every
device: it has fewer launches still.

* a sub-block gathers the kept tokens of the images that run it into one (T, D) matrix, runs each of timm's layers on
  it as one kernel, adds its output to those residual rows and writes them back (once for both sub-blocks when the
  same images run them). Not ``index_add_``: its atomic adds took 100 us per DeiT-S block at batch 256 in bf16, a plain
  row copy a fraction of that. The linears run by ``addmm`` (``_linear``), whose host cost does not grow when T is new;
* q, k, v are computed for every head of a kept token, in one GEMM. On a GPU in bf16 or fp16, attention then runs
  over each image's packed rows, every head, in one flash-attention call (``packed_attention``: no padding, no
  gather), and a dropped head's output is zeroed (full deactivation) or replaced by its values (partial). Elsewhere it
  runs only for the kept (image, head) pairs, gathered and padded to the longest image, in one masked
  ``scaled_dot_product_attention`` call. Full deactivation also zeroes a dropped head's channels before fc1. So a
  dropped head's share of the qkv, proj and fc1 GEMMs (and, packed, of attention) is computed, not skipped: to skip
  it, each head would need its own copy of its images' rows, which moves more bytes than the GEMM time saved;
* the plan is made on the host, in NumPy, and reaches the device as one small index array (rows, and a few numbers per
  image) copied from pinned memory without waiting: decisions already on the host (the random policy's) cost no sync,
  so the host runs ahead of the device; decisions made on the device cost one sync per block.

The output equals the masked reference (``masked.py``) up to float rounding, as the CPU plan's does.
"""
import functools
from dataclasses import dataclass
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import Mlp
from timm.models.vision_transformer import Block
from torch.nn.attention import SDPBackend, sdpa_kernel

try:  # flash attention over packed sequences of different lengths (PyTorch 2.9 and later, CUDA)
    from torch.nn.attention.varlen import varlen_attn
except ImportError:
    varlen_attn = None

from .kernels import activate, compute_dtype, copy_rows, head_major_qkv, normed_rows
from .planning import batch_masks, index_tensor


@dataclass
class SubBlockPlan:
    """The images that run one sub-block and their kept tokens, as offsets into the block's index array."""
    rows: Optional[slice]  # packed row indices (T,) of the flattened (B * N, D) stream, or None for every row in order
    num_rows: int  # T
    counts: np.ndarray  # (n,) kept tokens per image, in packed order
    heads: Optional[np.ndarray]  # (n, H) bool kept heads of these images, or None when all are kept


def _kept_rows(tokens: Optional[np.ndarray]) -> Optional[Tuple[np.ndarray, np.ndarray]]:
    """The kept tokens of every image: (rows of the flattened (B * N, D) stream, image-major (T,), counts (B,))."""
    return None if tokens is None else (np.flatnonzero(tokens), np.count_nonzero(tokens, axis=1))


def _sub_block(run: Optional[np.ndarray], kept: Optional[Tuple[np.ndarray, np.ndarray]], heads: Optional[np.ndarray],
               batch_size: int, num_tokens: int, pieces: List[np.ndarray]) -> Optional[SubBlockPlan]:
    """Plan the images that run a sub-block (``run``, None: all) and their ``kept`` tokens (``_kept_rows``, None: all);
    its rows go into ``pieces``."""
    if run is not None and not run.any():
        return None
    if heads is not None:
        heads = heads if run is None else heads[run]  # (n, H)
        heads = None if heads.all() else heads
    if kept is None:
        counts = np.full(batch_size if run is None else np.count_nonzero(run), num_tokens)
        if run is None:
            return SubBlockPlan(None, batch_size * num_tokens, counts, heads)
        rows = (np.flatnonzero(run)[:, None] * num_tokens + np.arange(num_tokens)).ravel()
    else:
        rows, counts = kept
        if run is not None:
            rows, counts = rows[np.repeat(run, counts)], counts[run]
    return SubBlockPlan(_append(pieces, rows), int(rows.size), counts, heads)


def _append(pieces: List[np.ndarray], values: np.ndarray) -> slice:
    """Queue ``values`` for the block's one host-to-device copy; returns where they will lie in it."""
    start = sum(p.size for p in pieces)
    pieces.append(values.astype(np.int64, copy=False).ravel())
    return slice(start, start + values.size)


# The padded attention runs on these SDPA backends. Not cuDNN's, SDPA's first choice on Hopper: it builds an execution
# plan for every new shape, and the shape here, (problems, longest image), changes with every batch's decisions. DeiT-S
# at batch 256 on an H200 in bf16, new decisions every call: 293.5 ms a forward with cuDNN first, 28.4 ms with these
# (with the same decisions per input, so its plans are cached: 21.4 against 23.0 ms; benchmarks/padded_attention.py).
PADDED_ATTENTION_BACKENDS = [SDPBackend.EFFICIENT_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.MATH]

# The longest problem is padded up to a multiple of this, so that the key mask's strides are multiples of 8 elements,
# as PyTorch's memory-efficient attention wants them (else it pads a copy of the mask on every call).
PAD_TO = 8


@dataclass
class AttentionPlan:
    """An MSA's attention problems, one per kept (image, head) with tokens, as offsets into the block's index array.

    Row ``t * H + h`` of the (T * H, 3 * dh) q, k, v rows is packed token t's head h. Problem p reads rows
    ``first_p + H * j`` for its tokens j < count_p, padded to the longest problem L with its last row (masked out).
    """
    first: slice  # (P,) first row
    last: slice  # (P,) last row
    counts: slice  # (P,) tokens
    num_problems: int  # P
    length: int  # L


def _attention_plan(plan: SubBlockPlan, num_heads: int, pieces: List[np.ndarray]) -> AttentionPlan:
    """The attention problems of an MSA (``AttentionPlan``)."""
    n = plan.counts.size
    first_token = np.cumsum(plan.counts) - plan.counts  # (n,) each image's first packed row
    kept = np.ones((n, num_heads), dtype=bool) if plan.heads is None else plan.heads.copy()  # (n, H)
    kept[plan.counts == 0] = False  # an image without tokens has nothing to attend
    image, head = np.nonzero(kept)  # (P,) problems, image-major
    counts = plan.counts[image]
    first = first_token[image] * num_heads + head
    length = -(-int(counts.max()) // PAD_TO) * PAD_TO if counts.size else 0
    return AttentionPlan(_append(pieces, first), _append(pieces, first + num_heads * (counts - 1)),
                         _append(pieces, counts), int(counts.size), length)


@dataclass
class PackedAttentionPlan:
    """An MSA's attention as packed sequences, one per image (``packed_attention``), as an offset into the block's index
    array."""
    bounds: slice  # (n + 1,) cumulative token counts: image i's packed rows are bounds[i]:bounds[i + 1]
    length: int  # the longest image's tokens


def _packed_attention_plan(plan: SubBlockPlan, pieces: List[np.ndarray]) -> PackedAttentionPlan:
    """The attention of an MSA as packed sequences (``PackedAttentionPlan``)."""
    bounds = np.zeros(plan.counts.size + 1, dtype=np.int64)
    np.cumsum(plan.counts, out=bounds[1:])
    return PackedAttentionPlan(_append(pieces, bounds), int(plan.counts.max()))


def packed_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bounds: torch.Tensor, length: int,
                     scale: float) -> torch.Tensor:
    """Attention of each image's packed rows over its own, for every head: (T, H, dh) q, k, v -> (T, H, dh); image i's
    rows are ``bounds[i]:bounds[i + 1]`` ((n + 1,) int32), ``length`` the most of any image.

    The flash kernel that ``torch.nn.attention.varlen.varlen_attn`` runs, called as that function calls it: the
    function wraps it in a Python custom op, which cost the host 320 us a call on an H200 machine, the kernel 50 us.
    """
    return torch.ops.aten._flash_attention_forward(q, k, v, bounds, bounds, length, length, 0.0, False, False,
                                                   scale=scale)[0]


def _runs_packed_attention(block: Block, x: torch.Tensor) -> bool:
    """Whether the MSA runs as packed sequences (``packed_attention``): PyTorch has ``varlen_attn`` (2.9 and later), its
    flash kernel is enabled (``torch.backends.cuda.flash_sdp_enabled``) and takes the GPU, dtype and head size.
    Elsewhere (the CPU, fp32, GPUs before Ampere) attention runs padded (``AttentionPlan``)."""
    head_dim = block.attn.head_dim
    return (varlen_attn is not None and x.device.type == 'cuda' and compute_dtype(x) in (torch.float16, torch.bfloat16)
            and head_dim % 8 == 0 and head_dim <= 256 and torch.backends.cuda.flash_sdp_enabled()
            and _flash_kernel_runs_on(x.device.index))


@functools.lru_cache(maxsize=None)
def _flash_kernel_runs_on(device_index: Optional[int]) -> bool:
    """PyTorch's flash kernel needs a CUDA build (not ROCm) and an NVIDIA GPU of compute capability 8.0 or more."""
    return torch.version.cuda is not None and torch.cuda.get_device_capability(device_index) >= (8, 0)


def accelerator_block_forward(
        block: Block,
        x: torch.Tensor,
        x_normed: Optional[torch.Tensor],
        patch_keep: Optional[torch.Tensor],
        head_keep: Optional[torch.Tensor],
        block_keep: Optional[torch.Tensor],
        head_mode: str = 'full',
) -> torch.Tensor:
    """One timm ``Block`` under AdaViT decisions, in a few launches (``sparse.sparse_block_forward``'s arguments).

    Decisions may lie on the host or on ``x``'s device. Updates ``x`` (B, N, D) in place and returns it.
    """
    B, N, D = x.shape
    H = block.attn.num_heads
    tokens, heads, run_msa, run_ffn = batch_masks(patch_keep, head_keep, block_keep)
    pieces: List[np.ndarray] = []
    kept = _kept_rows(tokens)
    msa = _sub_block(run_msa, kept, heads, B, N, pieces)
    # The same images run both sub-blocks: their rows are gathered once, and written back once.
    shared = msa is not None and (run_msa is run_ffn or (run_ffn is not None and np.array_equal(run_msa, run_ffn)))
    ffn_heads = heads if head_mode == 'full' else None
    if shared:
        ffn = SubBlockPlan(msa.rows, msa.num_rows, msa.counts, msa.heads if ffn_heads is not None else None)
    else:
        ffn = _sub_block(run_ffn, kept, ffn_heads, B, N, pieces)
    attention = None
    if msa is not None and not _is_plain_batch(msa):
        attention = (_packed_attention_plan(msa, pieces) if _runs_packed_attention(block, x) else
                     _attention_plan(msa, H, pieces))
    # Each image's kept heads (B, H), where rows of dropped heads are zeroed: fc1's input (full deactivation) and
    # packed attention's output.
    masks_heads = (msa is not None and msa.heads is not None and isinstance(attention, PackedAttentionPlan)) or (
        ffn is not None and ffn.heads is not None)
    heads_at = _append(pieces, heads) if masks_heads else None
    index = index_tensor(pieces, x.device)
    # In the stream's compute dtype: a product with int64 ran in a kernel that converts, 1.6x as slow (H200).
    kept_heads = None if heads_at is None else index[heads_at].view(B, H).to(compute_dtype(x))

    flat = x.view(B * N, D)
    residual = rows = None
    if msa is not None:
        rows = None if msa.rows is None else index[msa.rows]
        residual = flat if rows is None else flat.index_select(0, rows)  # (T, D)
        normed = normed_rows(block.norm1, x_normed, residual, rows)  # (T, D)
        out = _msa(block, normed, msa, attention, index, head_mode, kept_heads, rows, N)
        residual += _cast(_apply(block.ls1, out), residual.dtype)
        if rows is not None and not shared:  # shared rows are written back after the FFN
            copy_rows(flat, rows, residual)
    if ffn is not None:
        if not shared:
            rows = None if ffn.rows is None else index[ffn.rows]
            residual = flat if rows is None else flat.index_select(0, rows)  # (T, D)
        h = block.norm2(residual)
        if ffn.heads is not None:  # full deactivation: fc1 reads only the kept heads' channels
            h = (h.view(-1, H, D // H) * _head_rows(kept_heads, rows, N)).view(-1, D)
        residual += _cast(_apply(block.ls2, _mlp(block.mlp, h)), residual.dtype)
        if rows is not None:
            copy_rows(flat, rows, residual)
    return x


def _head_rows(kept_heads: torch.Tensor, rows: Optional[torch.Tensor], num_tokens: int) -> torch.Tensor:
    """Each packed row's kept heads, (T, H, 1) of 0 and 1, from each image's ``kept_heads`` (B, H) and the rows' indices
    in the flattened (B * N, D) stream (None: all)."""
    B = kept_heads.shape[0]
    images = torch.div(_positions(B * num_tokens, kept_heads.device) if rows is None else rows, num_tokens,
                       rounding_mode='floor')  # (T,) each row's image
    return kept_heads.index_select(0, images)[:, :, None]


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    """``F.linear(x, weight, bias)`` for (T, in) ``x``, by ``addmm``. On a GPU, ``F.linear`` costs the host 250 us a
    call where T is new, and here it is new in every block (H200's host: 32 us at a T it has seen; ``addmm`` 35 us at
    any T; ``benchmarks/op_host_cost.py``). Without a bias, ``mm``: not yet timed there."""
    return torch.mm(x, weight.t()) if bias is None else torch.addmm(bias, x, weight.t())


def _mlp(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``mlp(x)`` for (T, D) ``x``: timm's plain ``Mlp`` by ``_linear`` (in eval its dropouts do nothing), others as
    defined."""
    if type(mlp) is not Mlp or type(mlp.norm) is not torch.nn.Identity:
        return mlp(x)
    fc1, fc2 = mlp.fc1, mlp.fc2
    return _linear(activate(mlp.act, _linear(x, fc1.weight, fc1.bias)), fc2.weight, fc2.bias)


def _cast(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``x.to(dtype)``, without the call where it is one already (under autocast only it is not)."""
    return x if x.dtype == dtype else x.to(dtype)


def _apply(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """``module(x)``, without the call where the module is an ``Identity`` (a module call costs the host ~5 us)."""
    return x if type(module) is torch.nn.Identity else module(x)


def _is_plain_batch(plan: SubBlockPlan) -> bool:
    """Every head of images with equal token counts: timm's own attention runs it, on (n, L, D)."""
    return plan.heads is None and bool((plan.counts == plan.counts[0]).all())


_POSITIONS = {}  # device -> arange(n) on it: a slice of it is one launch less per block


def _positions(length: int, device: torch.device) -> torch.Tensor:
    """``torch.arange(length, device=device)``, sliced from a cached one."""
    cached = _POSITIONS.get(device)
    if cached is None or cached.numel() < length:
        cached = _POSITIONS[device] = torch.arange(max(length, 256), device=device)
    return cached[:length]


def _msa(
        block: Block,
        tokens: torch.Tensor,
        plan: SubBlockPlan,
        attention: Union[None, AttentionPlan, PackedAttentionPlan],
        index: Optional[torch.Tensor],
        head_mode: str,
        kept_heads: Optional[torch.Tensor],
        rows: Optional[torch.Tensor],
        num_tokens: int,
) -> torch.Tensor:
    """MSA outputs (before ``ls1``) of the packed, normed rows ``tokens`` (T, D), which are ``rows`` of the flattened
    (B * N, D) stream (None: all); ``kept_heads`` (B, H) on the device, or None where every image keeps every head."""
    attn = block.attn
    T, D = tokens.shape
    if attention is None:  # every head, equal token counts
        n = plan.counts.size
        return attn(tokens.view(n, T // n, D)).view(T, D)
    H, dh = attn.num_heads, attn.head_dim
    w_qkv, b_qkv = head_major_qkv(attn.qkv, H, parts=3)  # rows [q_h; k_h; v_h] per head
    qkv = _linear(tokens, w_qkv, b_qkv)  # (T, H * 3 * dh)
    if isinstance(attention, PackedAttentionPlan):
        q, k, v = qkv.view(T, H, 3, dh).unbind(2)  # (T, H, dh) each
        # q/k norms under autocast give fp32; the kernel, unlike SDPA, is not cast by autocast
        q, k = _cast(_apply(attn.q_norm, q), v.dtype), _cast(_apply(attn.k_norm, k), v.dtype)
        bounds = index[attention.bounds].to(torch.int32)
        o = packed_attention(q, k, v, bounds, attention.length, attn.scale)  # (T, H, dh)
        if plan.heads is not None:  # a dropped head's output is zero (full) or its values (partial)
            kept = _head_rows(kept_heads, rows, num_tokens)  # (T, H, 1)
            o = o * kept if head_mode == 'full' else torch.where(kept.bool(), o, v)
        return _linear(_apply(attn.norm, o.reshape(T, D)), attn.proj.weight, attn.proj.bias)
    qkv = qkv.view(T * H, 3 * dh)  # (T * H, 3 * dh): row t * H + h is token t's head h
    # Per (token, head), dropped heads included: zero (full) or the head's values (partial), then the attention rows;
    # plus a last row that the padded slots write to.
    o_rows = qkv.new_empty(T * H + 1, dh)
    if head_mode == 'full':
        o_rows.zero_()
    else:
        o_rows[:-1] = qkv[:, 2 * dh:]
    P, L = attention.num_problems, attention.length
    if P:
        positions = _positions(L, tokens.device)  # (L,)
        counts = index[attention.counts][:, None]  # (P, 1)
        slots = torch.minimum(torch.add(index[attention.first][:, None], positions, alpha=H),
                              index[attention.last][:, None])  # (P, L) rows to read, the last one again as padding
        real = positions < counts  # (P, L)
        q, k, v = qkv.index_select(0, slots.view(-1)).view(P, 1, L, 3, dh).unbind(3)  # (P, 1, L, dh) each
        q, k = _apply(attn.q_norm, q), _apply(attn.k_norm, k)
        with sdpa_kernel(PADDED_ATTENTION_BACKENDS):  # o: (P, 1, L, dh)
            o = F.scaled_dot_product_attention(q, k, v, attn_mask=real[:, None, None, :], scale=attn.scale)
        # Padded slots all go to the spare last row (which of them lands there does not matter).
        o_rows.index_copy_(0, torch.where(real, slots, T * H).view(-1), _cast(o.view(P * L, dh), o_rows.dtype))
    return _linear(_apply(attn.norm, o_rows[:-1].view(T, D)), attn.proj.weight, attn.proj.bias)
