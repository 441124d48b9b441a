"""The building blocks the sparse executor's paths share (``adavit/execution/kernels.py``), the decisions as host masks,
and the latency path's ready-made weight slices, each against the plain torch computation it stands for."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from adavit import AdaViT
from adavit.execution import kernels
from adavit.execution.latency import single_image_plan
from adavit.execution.planning import as_mask

from test_sparse import TINY


def test_cached_on_module_remakes_only_when_a_parameter_or_module_changes():
    linear = torch.nn.Linear(4, 3)
    made = []

    def make():
        made.append(1)
        return linear.weight.sum().item()

    first = kernels.cached_on_module(linear, '_test_cache', make)
    assert kernels.cached_on_module(linear, '_test_cache', make) == first and len(made) == 1
    with torch.no_grad():
        linear.weight.add_(1.0)  # in place: same storage, a new version
    assert kernels.cached_on_module(linear, '_test_cache', make) == pytest.approx(first + 12.0)
    linear.weight = torch.nn.Parameter(torch.zeros(3, 4))  # new storage
    assert kernels.cached_on_module(linear, '_test_cache', make) == 0.0 and len(made) == 3
    other = torch.nn.Identity()
    kernels.cached_on_module(linear, '_test_cache', make, modules=(other,))  # another module: remade, then kept
    kernels.cached_on_module(linear, '_test_cache', make, modules=(other,))
    assert len(made) == 4


def test_head_major_qkv_puts_each_heads_q_k_v_together():
    H, dh, D = 3, 2, 5
    qkv = torch.nn.Linear(D, 3 * H * dh)
    weight, bias = kernels.head_major_qkv(qkv, H, parts=3)
    assert weight.shape == (3 * H * dh, D) and weight.is_contiguous()
    for h in range(H):
        for part in range(3):  # timm's rows: [q of every head; k of every head; v of every head]
            timm_rows = slice(part * H * dh + h * dh, part * H * dh + (h + 1) * dh)
            ours = slice((3 * h + part) * dh, (3 * h + part + 1) * dh)
            assert torch.equal(weight[ours], qkv.weight[timm_rows]) and torch.equal(bias[ours], qkv.bias[timm_rows])
    qk_weight, _ = kernels.head_major_qkv(qkv, H, parts=2)  # q and k only: [q_0; k_0; q_1; ...]
    assert torch.equal(qk_weight[dh:2 * dh], qkv.weight[H * dh:H * dh + dh])


def test_transposed_weight_is_a_contiguous_transpose():
    linear = torch.nn.Linear(4, 6)
    weight_t = kernels.transposed_weight(linear)
    assert weight_t.is_contiguous() and torch.equal(weight_t, linear.weight.t())


def test_compute_dtype_follows_autocast():
    x = torch.randn(2, 3)
    assert kernels.compute_dtype(x) == torch.float32
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert kernels.compute_dtype(x) == torch.bfloat16


@pytest.mark.parametrize('with_bias', [True, False])
@pytest.mark.parametrize('accumulate', [True, False])
def test_linear_into_writes_or_adds_into_a_slice(with_bias, accumulate):
    torch.manual_seed(0)
    x, weight_t = torch.randn(5, 4), torch.randn(4, 3)
    bias = torch.randn(3) if with_bias else None
    buffer = torch.randn(5, 8)
    before = buffer.clone()
    kernels.linear_into(buffer[:, 2:5], x, weight_t, bias, accumulate=accumulate)
    product = x @ weight_t + (bias if with_bias else 0.0)
    expected = before[:, 2:5] + product if accumulate else product
    assert torch.allclose(buffer[:, 2:5], expected, atol=1e-6)
    assert torch.equal(buffer[:, :2], before[:, :2]) and torch.equal(buffer[:, 5:], before[:, 5:])  # the rest untouched


@pytest.mark.parametrize('approximate', ['none', 'tanh'])
def test_activate_runs_gelu_in_place_and_other_activations_as_defined(approximate):
    hidden = torch.randn(4, 6)
    expected = F.gelu(hidden, approximate=approximate)
    out = kernels.activate(torch.nn.GELU(approximate=approximate), hidden)
    assert out.data_ptr() == hidden.data_ptr() and torch.equal(out, expected)
    other = torch.randn(4, 6)
    assert torch.equal(kernels.activate(torch.nn.SiLU(), other), F.silu(other))


def test_normed_rows_reads_the_models_norm_or_norms_the_rows_itself():
    norm = torch.nn.LayerNorm(4)
    x = torch.randn(1, 5, 4)
    rows = torch.tensor([0, 2, 3])
    residual = x.view(5, 4).index_select(0, rows)
    from_model = kernels.normed_rows(norm, norm(x), residual, rows)
    alone = kernels.normed_rows(norm, None, residual, rows)
    assert torch.allclose(from_model, norm(residual), atol=1e-6) and torch.allclose(alone, norm(residual), atol=1e-6)
    assert torch.equal(kernels.normed_rows(norm, norm(x), x.view(5, 4), None), norm(x).view(5, 4))


@pytest.mark.parametrize('dtype', [torch.bool, torch.float32, torch.float64, torch.bfloat16])
def test_as_mask_is_decisions_above_one_half(dtype):
    decisions = torch.tensor([[1.0, 0.0, 1.0], [0.0, 0.0, 1.0]]).to(dtype)
    mask = as_mask(decisions)
    assert isinstance(mask, np.ndarray) and mask.dtype == bool
    assert mask.tolist() == [[True, False, True], [False, False, True]]


def test_single_image_plan_slices_each_range_of_heads():
    block = AdaViT(**TINY).eval().blocks[0]
    plan = single_image_plan(block)
    H, dh = block.attn.num_heads, block.attn.head_dim
    assert plan.num_heads == H and plan.head_dim == dh
    assert len(plan.qkv) == H * (H + 1) // 2  # every contiguous range [a, b)
    w_qkv, b_qkv = kernels.head_major_qkv(block.attn.qkv, H, parts=3)
    qkv_t, qkv_bias = plan.qkv[1, H]
    assert torch.equal(qkv_t, w_qkv[3 * dh:].t()) and torch.equal(qkv_bias, b_qkv[3 * dh:])
    assert torch.equal(plan.proj[0, 1], block.attn.proj.weight.t()[:dh])
    assert torch.equal(plan.fc1[1, 2], block.mlp.fc1.weight.t()[dh:2 * dh])
    assert single_image_plan(block) is plan  # cached until a weight changes
    assert single_image_plan(AdaViT(init_values=0.5, **TINY).blocks[0]) is None  # layer scale: the batch path's
