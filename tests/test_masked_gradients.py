"""The masked executor's values *and gradients* (to inputs, weights and decisions) equal SPEC's explicit formula.

The formula below materialises everything SPEC names: the (N, N) attention map with -inf outside the allowed pairs,
the channel products on q, k, v, the proj input and the FFN input, the identity map of dropped heads in partial mode,
and the products with the patch and block decisions. Optimisations of adavit/execution/masked.py must keep it.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Block

from adavit.execution.masked import masked_block_forward


def explicit_block(blk: Block, x: torch.Tensor, t: torch.Tensor, h: torch.Tensor, b: torch.Tensor,
                   head_mode: str) -> torch.Tensor:
    B, N, D = x.shape
    H = blk.attn.num_heads
    dh = D // H
    w = h.repeat_interleave(dh, dim=1)[:, None, :]  # (B, 1, D) channel mask
    xn = blk.norm1(x)
    q, k, v = (F.linear(xn, blk.attn.qkv.weight[i * D:(i + 1) * D], blk.attn.qkv.bias[i * D:(i + 1) * D])
               for i in range(3))
    if head_mode == 'full':
        q, k, v = q * w, k * w, v * w
    q, k, v = (z.reshape(B, N, H, dh).transpose(1, 2) for z in (q, k, v))  # (B, H, N, dh)
    keep = t.detach() > 0.5
    allowed = (keep[:, :, None] & keep[:, None, :]) | torch.eye(N, dtype=torch.bool)
    logits = (q @ k.transpose(-2, -1)) / math.sqrt(dh)
    attn = logits.masked_fill(~allowed[:, None], float('-inf')).softmax(dim=-1)
    if head_mode == 'partial':
        hh = h[:, :, None, None]
        attn = hh * attn + (1 - hh) * torch.eye(N)
    o = (attn @ v).transpose(1, 2).reshape(B, N, D)
    if head_mode == 'full':
        o = o * w
    x = x + b[:, 0, None, None] * (blk.attn.proj(o) * t[:, :, None])
    h2 = blk.norm2(x)
    if head_mode == 'full':
        h2 = h2 * w
    return x + b[:, 1, None, None] * (blk.mlp(h2) * t[:, :, None])


@pytest.mark.parametrize('head_mode', ['full', 'partial'])
def test_masked_executor_values_and_gradients(head_mode: str) -> None:
    B, N, D, H = 4, 10, 24, 3
    blk = Block(D, H, qkv_bias=True).train()
    x = torch.randn(B, N, D)
    t = (torch.rand(B, N) < 0.5).float()
    t[:, 0] = 1
    t[1, 1:] = 0
    h = (torch.rand(B, H) < 0.5).float()
    h[2] = 0
    b = torch.tensor([[1.0, 1.0], [1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    weights = torch.randn(B, N, D)  # a loss that weighs every output differently

    results = []
    for fn in ('masked', 'explicit'):
        blk.zero_grad()
        inputs = [z.clone().requires_grad_() for z in (x, t, h, b)]
        if fn == 'masked':
            out = masked_block_forward(blk, inputs[0], blk.norm1(inputs[0]), *inputs[1:], head_mode)
        else:
            out = explicit_block(blk, *inputs, head_mode)
        (out * weights).sum().backward()
        results.append((out.detach(), [z.grad for z in inputs], {n: p.grad.clone() for n, p in blk.named_parameters()}))
    (out, grads, params), (ref_out, ref_grads, ref_params) = results
    torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
    for name, g, ref in zip(('x', 'patch', 'head', 'block'), grads, ref_grads):
        torch.testing.assert_close(g, ref, rtol=1e-4, atol=1e-5, msg=f'gradient to {name}')
        if name != 'x':
            assert ref.abs().sum() > 0, name  # the decisions do receive gradient
    for name in ref_params:
        torch.testing.assert_close(params[name], ref_params[name], rtol=1e-4, atol=1e-5, msg=name)
