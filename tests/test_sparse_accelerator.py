"""The sparse executor's accelerator plan (few launches per block), run here on the CPU: same logits as the masked
reference, and the plan's index arithmetic checked by hand."""
import itertools
import types

import numpy as np
import pytest
import timm
import torch

from adavit import AdaViT, Decisions
from adavit.execution import planning, sparse, sparse_accelerator
from adavit.execution.sparse_accelerator import PAD_TO, _attention_plan, _kept_rows, _packed_attention_plan, _sub_block

from test_sparse import NUM_TOKENS, TINY, _both, _random_decisions


@pytest.fixture
def accelerator_plan(monkeypatch):
    """Every device runs the accelerator plan, the CPU too, and at batch 1 too (not the latency path)."""
    monkeypatch.setattr(sparse, 'HEAD_GROUPED_DEVICES', set())
    monkeypatch.setattr(sparse, 'latency_plan', lambda *args: None)


@pytest.mark.parametrize('head_mode,patch_policy', list(itertools.product(['full', 'partial'], ['token', 'cls'])))
@pytest.mark.parametrize('batch', [1, 7, 64])
def test_accelerator_plan_matches_masked_on_random_decisions(accelerator_plan, head_mode, patch_policy, batch):
    model = AdaViT(head_mode=head_mode, patch_policy=patch_policy, **TINY).eval()
    for seed, edge in enumerate(['', 'mixed', 'all_skipped', 'no_patch', 'no_head']):
        decisions = _random_decisions(batch, seed=seed, edge=edge)
        (masked, _), (out, _) = _both(model, torch.randn(batch, 3, 32, 32), decisions)
        assert torch.allclose(masked, out, atol=1e-4, rtol=0), (edge, (masked - out).abs().max())


@pytest.mark.parametrize('head_mode', ['full', 'partial'])
def test_accelerator_plan_matches_masked_with_layer_scale_and_shared_rows(accelerator_plan, head_mode):
    """Layer scale on both sub-blocks; MSA and FFN run by the same images (rows gathered and written back once) or not;
    every token kept with some heads dropped (the padded attention over whole images)."""
    model = AdaViT(init_values=0.5, head_mode=head_mode, **TINY).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.ls1.gamma.uniform_(0.2, 2.0)
            blk.ls2.gamma.uniform_(0.2, 2.0)
    for variant in ('same images', 'all tokens', 'keep all'):
        decisions = _random_decisions(9, seed=3)
        if variant == 'same images':
            decisions.block[:, :, 1] = decisions.block[:, :, 0]
        if variant in ('all tokens', 'keep all'):
            decisions.patch.fill_(1.0)
        if variant == 'keep all':
            decisions.head.fill_(1.0)
            decisions.block.fill_(1.0)
        (masked, _), (out, _) = _both(model, torch.randn(9, 3, 32, 32), decisions)
        assert torch.allclose(masked, out, atol=1e-4, rtol=0), (variant, (masked - out).abs().max())


def test_accelerator_plan_with_the_random_policy_plans_from_host_decisions(accelerator_plan, monkeypatch):
    """The random policy's draws reach the executor as host bool arrays (no device round trip) and give the masked
    reference's logits and decisions."""
    model = timm.create_model('adavit_deit_tiny_patch16_224', img_size=32, patch_size=8, depth=3, num_classes=5,
                              policy='random', random_keep=(0.6, 0.6, 0.8)).eval()
    seen = []
    plan = sparse_accelerator.accelerator_block_forward

    def spy(block, x, x_normed, patch_keep, head_keep, block_keep, head_mode='full'):
        seen.append({t.dtype for t in (patch_keep, head_keep, block_keep) if t is not None})
        return plan(block, x, x_normed, patch_keep, head_keep, block_keep, head_mode)

    monkeypatch.setattr(sparse_accelerator, 'accelerator_block_forward', spy)
    x = torch.randn(6, 3, 32, 32)
    with torch.no_grad():
        model.reset_random_policy(7)
        model.executor = 'masked'
        masked, taken_masked = model(x, return_decisions=True)
        model.reset_random_policy(7)
        model.executor = 'sparse'
        out, taken = model(x, return_decisions=True)
    assert seen == [{torch.bool}] * 3
    assert torch.equal(taken.patch, taken_masked.patch) and torch.equal(taken.head, taken_masked.head)
    assert taken.patch.dtype == x.dtype and taken.patch.device == x.device
    assert torch.allclose(masked, out, atol=1e-4, rtol=0)


def test_attention_plan_pads_each_kept_image_head_to_the_longest_image():
    """Two of three images run the MSA; image 2 keeps heads 0 and 2 of 3 and 2 tokens, image 0 every head and 3."""
    tokens = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 1]], dtype=bool)
    heads = np.array([[1, 1, 1], [0, 1, 0], [1, 0, 1]], dtype=bool)
    run = np.array([True, False, True])
    pieces = []
    msa = _sub_block(run, _kept_rows(tokens), heads, 3, 4, pieces)
    assert msa.num_rows == 5 and msa.counts.tolist() == [3, 2]
    assert np.concatenate(pieces)[msa.rows].tolist() == [0, 1, 2, 8, 11]  # rows of the flattened (B * N) stream
    plan = _attention_plan(msa, 3, pieces)
    index = np.concatenate(pieces)
    # Problems (image 0, heads 0-2), (image 2, heads 0 and 2); (token t, head h) is row t * 3 + h; image 2 starts at
    # packed token 3.
    assert index[plan.first].tolist() == [0, 1, 2, 9, 11]
    assert index[plan.last].tolist() == [6, 7, 8, 12, 14]
    assert index[plan.counts].tolist() == [3, 3, 3, 2, 2]
    assert plan.num_problems == 5 and plan.length == PAD_TO


def test_sub_block_of_every_image_and_token_needs_no_rows():
    pieces = []
    plan = _sub_block(None, None, np.ones((2, 3), dtype=bool), 2, 4, pieces)
    assert plan.rows is None and plan.num_rows == 8 and plan.heads is None and pieces == []
    assert _sub_block(np.zeros(2, dtype=bool), None, None, 2, 4, pieces) is None


def test_accelerator_plan_under_bf16_autocast_and_with_bf16_weights(accelerator_plan):
    """Autocast (layers in bf16, the residual stream in fp32) and bf16 weights: outputs added back in the stream's
    dtype, padded attention finite, logits as the masked reference's within bf16 rounding."""
    model = AdaViT(**TINY).eval()
    decisions = _random_decisions(5, seed=11, edge='mixed')
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        (masked, _), (out, _) = _both(model, x, decisions)
    assert torch.allclose(masked.float(), out.float(), atol=0.05, rtol=0.05)
    model = model.to(torch.bfloat16)
    decisions = Decisions(decisions.patch.bfloat16(), decisions.head.bfloat16(), decisions.block.bfloat16(),
                          decisions.patch_gated, decisions.head_gated, decisions.block_gated)  # as bf16 gates give them
    (masked, _), (out, _) = _both(model, x.bfloat16(), decisions)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert torch.allclose(masked.float(), out.float(), atol=0.05, rtol=0.05)


def test_the_cpu_groups_heads_and_other_devices_run_the_accelerator_plan(monkeypatch):
    assert not sparse.runs_accelerator_plan(torch.device('cpu'))
    assert sparse.runs_accelerator_plan(torch.device('cuda')) and sparse.runs_accelerator_plan(torch.device('mps'))
    monkeypatch.setattr(sparse, 'HEAD_GROUPED_DEVICES', {'cpu', 'cuda'})  # the CPU plan back on a GPU
    assert not sparse.runs_accelerator_plan(torch.device('cuda', 0))


def test_batch_one_takes_the_latency_path_on_accelerators_too(monkeypatch):
    """A plain block at batch 1 runs the latency path whatever the device; larger batches the accelerator plan."""
    monkeypatch.setattr(sparse, 'HEAD_GROUPED_DEVICES', set())
    calls = []
    latency = sparse.single_image_block_forward
    monkeypatch.setattr(sparse, 'single_image_block_forward', lambda *args: calls.append('latency') or latency(*args))
    plan = sparse_accelerator.accelerator_block_forward
    monkeypatch.setattr(sparse_accelerator, 'accelerator_block_forward',
                        lambda *args: calls.append('accelerator') or plan(*args))
    model = AdaViT(**TINY).eval()
    for batch in (1, 3):
        calls.clear()
        decisions = _random_decisions(batch, seed=2, edge='mixed')
        (masked, _), (out, _) = _both(model, torch.randn(batch, 3, 32, 32), decisions)
        assert calls == ['latency' if batch == 1 else 'accelerator'] * TINY['depth']
        assert torch.allclose(masked, out, atol=1e-4, rtol=0)


def test_index_tensor_concatenates_and_shares_on_the_cpu():
    rows = np.array([3, 1, 4], dtype=np.int64)
    one = planning.index_tensor([rows], torch.device('cpu'))
    assert one.tolist() == [3, 1, 4] and one.dtype == torch.int64 and one.data_ptr() == rows.ctypes.data
    both = planning.index_tensor([rows, np.array([5, 9], dtype=np.int64)], torch.device('cpu'))
    assert both.tolist() == [3, 1, 4, 5, 9]
    assert planning.index_tensor([], torch.device('cpu')) is None


def _reference_packed_attention(q, k, v, bounds, length, scale):
    """``packed_attention``'s contract on any device: (T, H, dh) packed images, image i in rows bounds[i]:bounds[i + 1],
    each attending over its own tokens."""
    assert bounds.dtype == torch.int32 and q.dtype == k.dtype == v.dtype  # as the flash kernel demands
    bounds = bounds.tolist()
    assert length == max(b - a for a, b in zip(bounds, bounds[1:]))
    out = torch.empty_like(q)
    for a, b in zip(bounds, bounds[1:]):
        q_i, k_i, v_i = (t[a:b].transpose(0, 1) for t in (q, k, v))  # (H, L, dh)
        out[a:b] = torch.nn.functional.scaled_dot_product_attention(q_i, k_i, v_i, scale=scale).transpose(0, 1)
    return out


@pytest.fixture
def packed_attention(accelerator_plan, monkeypatch):
    """The accelerator plan with attention over packed images, as on a GPU, by a reference ``packed_attention``."""
    monkeypatch.setattr(sparse_accelerator, 'packed_attention', _reference_packed_attention)
    monkeypatch.setattr(sparse_accelerator, '_runs_packed_attention', lambda block, x: True)


@pytest.mark.parametrize('head_mode', ['full', 'partial'])
@pytest.mark.parametrize('batch', [1, 9])
def test_packed_attention_matches_masked(packed_attention, head_mode, batch):
    model = AdaViT(head_mode=head_mode, qk_norm=True, **TINY).eval()
    for seed, edge in enumerate(['', 'mixed', 'all_skipped', 'no_patch', 'no_head']):
        decisions = _random_decisions(batch, seed=seed, edge=edge)
        (masked, _), (out, _) = _both(model, torch.randn(batch, 3, 32, 32), decisions)
        assert torch.allclose(masked, out, atol=1e-4, rtol=0), (edge, (masked - out).abs().max())


class _Fp32Norm(torch.nn.Module):
    """A norm whose output is fp32, as LayerNorm's is under CUDA autocast."""

    def __init__(self, norm: torch.nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(x).float()


def test_packed_attention_under_autocast_with_qk_norm(packed_attention):
    """Under CUDA autocast q/k norms give fp32 beside bf16 values; the kernel gets them in one dtype."""
    model = AdaViT(qk_norm=True, **TINY).eval()
    for blk in model.blocks:
        blk.attn.q_norm, blk.attn.k_norm = _Fp32Norm(blk.attn.q_norm), _Fp32Norm(blk.attn.k_norm)
    decisions = _random_decisions(6, seed=8, edge='mixed')
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        (masked, _), (out, _) = _both(model, torch.randn(6, 3, 32, 32), decisions)
    assert torch.allclose(masked.float(), out.float(), atol=0.05, rtol=0.05)


def test_packed_attention_plan_bounds_each_image():
    tokens = np.array([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 1]], dtype=bool)
    heads = np.array([[1, 1, 1], [0, 1, 0], [1, 0, 1]], dtype=bool)
    pieces = []
    msa = _sub_block(np.array([True, False, True]), _kept_rows(tokens), heads, 3, 4, pieces)
    plan = _packed_attention_plan(msa, pieces)
    assert np.concatenate(pieces)[plan.bounds].tolist() == [0, 3, 5] and plan.length == 3


def test_head_rows_give_each_packed_row_its_images_kept_heads():
    kept_heads = torch.tensor([[1, 0], [0, 1], [1, 1]])  # (B, H)
    rows = torch.tensor([0, 2, 4, 5, 7])  # of the (B * N) stream, N = 3
    first, second, third = [1, 0], [0, 1], [1, 1]
    some_rows = sparse_accelerator._head_rows(kept_heads, rows, 3).squeeze(2).tolist()
    assert some_rows == [first] * 2 + [second] * 2 + [third]
    every_row = sparse_accelerator._head_rows(kept_heads, None, 2).squeeze(2).tolist()
    assert every_row == [first] * 2 + [second] * 2 + [third] * 2


def test_packed_attention_only_where_the_flash_kernel_runs(monkeypatch):
    """The CPU, fp32, a pre-Ampere GPU, a ROCm build or flash attention switched off: padded attention."""
    block = AdaViT(**TINY).eval().blocks[0]  # head size 12: no flash kernel
    assert not sparse_accelerator._runs_packed_attention(block, torch.zeros(2, NUM_TOKENS, 48))  # CPU
    block = AdaViT(**dict(TINY, embed_dim=64)).eval().blocks[0]  # head size 16
    monkeypatch.setattr(sparse_accelerator, 'varlen_attn', lambda *args: None)  # PyTorch 2.9 and later have it

    def runs(dtype=torch.bfloat16, capability=(9, 0), cuda='12.8') -> bool:
        monkeypatch.setattr(torch.cuda, 'get_device_capability', lambda index=None: capability)
        monkeypatch.setattr(torch.version, 'cuda', cuda)
        sparse_accelerator._flash_kernel_runs_on.cache_clear()
        on_gpu = types.SimpleNamespace(device=torch.device('cuda', 0), dtype=dtype)  # a tensor on a GPU, to the check
        return sparse_accelerator._runs_packed_attention(block, on_gpu)

    flash = torch.backends.cuda.flash_sdp_enabled()
    try:
        assert runs() and runs(dtype=torch.float16)
        assert not runs(dtype=torch.float32) and not runs(capability=(7, 5)) and not runs(cuda=None)
        torch.backends.cuda.enable_flash_sdp(False)
        assert not runs()
    finally:
        torch.backends.cuda.enable_flash_sdp(flash)
        sparse_accelerator._flash_kernel_runs_on.cache_clear()
