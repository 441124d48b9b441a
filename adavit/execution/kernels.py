"""The building blocks the sparse executor's paths share (the batch plan, the latency path, the accelerator plan):
weights re-laid out once and cached on their modules, matmuls written into slices of larger buffers, the CPU attention
kernel over padded problems, the activation in place, and row copies.
"""
from typing import Any, Callable, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


def cached_on_module(
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


def head_major_qkv(qkv: torch.nn.Linear, num_heads: int, parts: int) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """The first ``parts`` of q, k, v in head-major row order, [q_0; k_0; v_0; q_1; ...] for parts=3, ((H*parts*dh, D)).

    Then the rows of a contiguous range of heads are one slice.
    """
    def make():
        w = qkv.weight.view(3, num_heads, -1, qkv.in_features)[:parts]  # (parts, H, dh, D)
        b = qkv.bias.view(3, num_heads, -1)[:parts] if qkv.bias is not None else None
        return (w.transpose(0, 1).reshape(-1, qkv.in_features).contiguous(),
                b.transpose(0, 1).reshape(-1).contiguous() if b is not None else None)
    return cached_on_module(qkv, f'_adavit_head_major_{parts}', make)


def transposed_weight(linear: torch.nn.Linear) -> torch.Tensor:
    """``linear.weight.t()`` as a contiguous (in, out) matrix: a range of input channels is then a row slice."""
    return cached_on_module(linear, '_adavit_transposed', lambda: (linear.weight.t().contiguous(),))[0]


def compute_dtype(t: torch.Tensor) -> torch.dtype:
    """The dtype matmuls run in: autocast's when it is on (its rules do not reach ``out=`` calls), else ``t``'s."""
    if torch.is_autocast_enabled(t.device.type):
        return torch.get_autocast_dtype(t.device.type)
    return t.dtype


def linear_into(
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


# On CPU, attention over at most this many keys runs as matmul + softmax + matmul, which beats the flash kernel on the
# sequences dropped tokens leave: 1.3-1.6x at 20-45 keys (2 threads, 3 heads of 32 channels), and in a DeiT-S batch of
# 64 at keep 0.7/0.7/0.9 (buckets of 12-66 problems of 126-150 keys) the whole forward runs 1.023-1.030x as fast
# (paired, 2 threads, Intel Xeon; 1.012x at batch 8), a tie with all 197 tokens kept. Scores are made for at most
# MATH_ATTENTION_CHUNK (problem, query, key) entries at a time (2 MB of fp32, an L2 cache): with 64 MB chunks the gain
# was 1.005x, and on an AMD EPYC host flash was 5-10% faster with them (2 MB chunks not timed there). A single image
# has a threshold of its own (``latency.SINGLE_IMAGE_MATH_ATTENTION_UP_TO``). GPUs always use
# scaled_dot_product_attention.
MATH_ATTENTION_UP_TO = 256
MATH_ATTENTION_CHUNK = 1 << 19

# PyTorch's CPU softmax is about 15x slower per element over rows shorter than 16 (2 threads: 6 ns against 0.4 ns),
# and the few tokens deep blocks keep make such rows: the matmul path softmaxes them padded to this width with -inf.
SOFTMAX_MIN_ROW = 16


def attention(
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


# ``torch.ops.aten.gelu_`` resolves its overload on every call: at batch 1 that cost 5 us of a 44 us GELU (hot).
_GELU_IN_PLACE = torch.ops.aten.gelu_.default


def activate(act: torch.nn.Module, hidden: torch.Tensor) -> torch.Tensor:
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


def copy_rows(x: torch.Tensor, rows: torch.Tensor, values: torch.Tensor) -> None:
    """``x[rows] = values`` for (R, D) ``x`` and (T, D) ``values``, in place.

    ``index_copy_`` moves one element at a time: reinterpreted as 16-byte elements (the bits are copied, not converted),
    a row of 96 float32 takes 24 moves instead of 96, and the copy is twice as fast (2 CPU threads, 11,000 of 12,800
    rows).
    """
    if all(t.is_contiguous() and (t.storage_offset() * t.element_size()) % 16 == 0 for t in (x, values)) \
            and (x.shape[1] * x.element_size()) % 16 == 0:
        x, values = x.view(torch.complex128), values.view(torch.complex128)
    x.index_copy_(0, rows, values)
