"""The sparse executor's latency path: one image, one block at a time, as a dense block runs but on the image's kept
tokens and its kept heads' weights.

One image is one head group, so there is nothing to pack, group or bucket. At batch 1 a DeiT-S block is a few dozen
small ops, and in the middle of a forward, with the caches full of weights, the Python around each op costs a fair
share of the block's time: so this path reads the decisions straight into NumPy, takes its weight slices ready-made
(``single_image_plan``) and calls the kernels, not the modules. It serves every device (``sparse.py`` dispatches).
"""
import functools
from typing import Callable, Dict, NamedTuple, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from timm.layers import LayerNorm
from timm.models.vision_transformer import Block

from .kernels import (activate, attention, cached_on_module, compute_dtype, copy_rows, head_major_qkv, normed_rows,
                      transposed_weight)
from .planning import as_mask, batch_masks, head_runs, index_tensor

# A single image goes over from the matmul path (``attention``) to the flash kernel above this many keys: on its few
# heads the matmul path measured 0.971-0.988x there (2 threads, Intel Xeon), where batches gain up to
# ``kernels.MATH_ATTENTION_UP_TO``.
SINGLE_IMAGE_MATH_ATTENTION_UP_TO = 64


class _SingleImagePlan(NamedTuple):
    """A plain block as the latency path runs it (``single_image_plan``): the weights of each contiguous range of heads
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
    activate: Callable[[torch.Tensor], torch.Tensor]  # ``activate`` of the block's activation: in place for GELU
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


def single_image_plan(block: Block) -> Optional[_SingleImagePlan]:
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
        w_qkv, b_qkv = head_major_qkv(attn['qkv'], H, parts=3)  # rows [q_h; k_h; v_h] per head
        proj_t, fc1_t = transposed_weight(attn['proj']), params[4].t()
        ranges = [(a, b) for a in range(H) for b in range(a + 1, H + 1)]
        return _SingleImagePlan(
            qkv={(a, b): (w_qkv[a * 3 * dh:b * 3 * dh].t(), None if b_qkv is None else b_qkv[a * 3 * dh:b * 3 * dh])
                 for a, b in ranges},
            proj={(a, b): proj_t[a * dh:b * dh] for a, b in ranges},
            fc1={(a, b): fc1_t[a * dh:b * dh] for a, b in ranges},
            proj_bias=params[3], fc1_bias=params[5], fc2_t=params[6].t(), fc2_bias=params[7],
            norm1=_norm_kernel(parts['norm1']), norm2=_norm_kernel(parts['norm2']),
            activate=functools.partial(activate, mlp['act']),
            dtype=params[0].dtype, num_heads=H, head_dim=dh)
    return cached_on_module(block, '_adavit_single_image_plan', make, params, modules)


def latency_plan(block: Block, x: torch.Tensor, head_mode: str) -> Optional[_SingleImagePlan]:
    """The plan ``single_image_block_forward`` runs this call with, or None where the batch path serves it: it takes
    one image, full head deactivation, a plain block (``single_image_plan``) and weights in the stream's dtype."""
    if x.shape[0] != 1 or head_mode != 'full':
        return None
    plan = single_image_plan(block)
    if plan is None or x.dtype != plan.dtype or compute_dtype(x) != x.dtype:
        return None
    return plan


def _single_image_decisions(
        patch_keep: Optional[torch.Tensor],
        head_keep: Optional[torch.Tensor],
        block_keep: Optional[torch.Tensor],
        on_host: bool,
) -> Tuple[bool, bool, Optional[Tuple[Tuple[int, int], ...]], Optional[np.ndarray]]:
    """One image's decisions (``sparse.sparse_block_forward``'s, B = 1) on the host.

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
        tokens = None if patch_keep is None else as_mask(patch_keep)[0]
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


def single_image_block_forward(
        plan: _SingleImagePlan,
        x: torch.Tensor,
        x_normed: Optional[torch.Tensor],
        patch_keep: Optional[torch.Tensor],
        head_keep: Optional[torch.Tensor],
        block_keep: Optional[torch.Tensor],
) -> torch.Tensor:
    """One image through a block (``sparse.sparse_block_forward``'s arguments, B = 1, with the block as its
    ``latency_plan``): its kept tokens, and each range of its kept heads as one matmul on a slice of the weights.

    Paired against the batch path (2 threads, Intel Xeon, DeiT-S at keep 0.7/0.7/0.9): 1.029x the speed while it still
    called the norms, the activation, and timm's attention and MLP where every head is kept, as modules; calling kernels
    (every head as one range), 1.050x that again (1.058x with the decision networks, 1.031x with every unit kept).
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
            # The loops below do what the batch path's ``_qkv_into`` and ``_kept_heads_matmul_into`` (``sparse.py``) do,
            # written out: calling those helpers here, with these views, measured 0.979x the speed at batch 1 (paired,
            # DeiT-S, 2 threads).
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
                o = attention(q, k, v, None, dh ** -0.5).reshape(h, T, dh).transpose(0, 1).reshape(T, h * dh)
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
        copy_rows(flat, rows, residual)
    return x
