"""The sparse executor: same decisions and logits as the masked reference, and MACs that FlopCounterMode confirms."""
import itertools

import numpy as np
import pytest
import timm
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

import adavit
from adavit import AdaViT, Decisions
from adavit.cost.macs import decision_macs, dense_macs, macs
from adavit.execution import kernels, latency, planning, sparse
from adavit.execution.planning import attention_buckets, head_runs, pack_sub_blocks, pack_tokens

TINY = dict(img_size=32, patch_size=4, embed_dim=48, depth=4, num_heads=4, num_classes=7)
NUM_TOKENS = 65  # 8 x 8 patches + class token


def _random_decisions(batch: int, depth: int = 4, heads: int = 4, seed: int = 0, edge: str = '') -> Decisions:
    """Random {0, 1} decisions with per-image keep-rates; ``edge`` forces one of the edge cases on some images."""
    g = torch.Generator().manual_seed(seed)
    patch = (torch.rand(batch, depth, NUM_TOKENS, generator=g) < torch.rand(batch, 1, 1, generator=g)).float()
    head = (torch.rand(batch, depth, heads, generator=g) < 0.5).float()
    block = (torch.rand(batch, depth, 2, generator=g) < 0.6).float()
    if edge == 'mixed':  # image 0: no patch; image 1: no head with MSA on; image 2: MSA off, FFN on
        patch[0, :, 1:] = 0
        head[min(1, batch - 1)] = 0
        block[min(1, batch - 1), :, 0] = 1
        block[min(2, batch - 1)] = torch.tensor([0.0, 1.0])
    elif edge == 'all_skipped':
        block.zero_()
    elif edge == 'no_patch':
        patch[:, :, 1:] = 0
    elif edge == 'no_head':
        head.zero_()
        block.fill_(1.0)
    patch[..., 0] = 1.0  # the class token is never dropped
    gated = torch.ones(depth, dtype=torch.bool)
    return Decisions(patch, head, block, gated, gated, gated)


def _both(model: AdaViT, x: torch.Tensor, decisions=None):
    with torch.no_grad():
        model.executor = 'masked'
        masked = model(x, return_decisions=True, decisions=decisions)
        model.executor = 'sparse'
        sparse = model(x, return_decisions=True, decisions=decisions)
    return masked, sparse


@pytest.mark.parametrize('head_mode', ['full', 'partial'])
def test_sparse_matches_masked_with_layer_scale(head_mode):
    """With layer scale, proj and fc2 cannot add into the residual rows themselves: outputs are scaled, then added."""
    model = AdaViT(init_values=0.5, head_mode=head_mode, **TINY).eval()
    with torch.no_grad():
        for blk in model.blocks:
            blk.ls1.gamma.uniform_(0.2, 2.0)
            blk.ls2.gamma.uniform_(0.2, 2.0)
    for batch, edge in ((1, ''), (8, 'mixed')):
        (masked, _), (sparse, _) = _both(model, torch.randn(batch, 3, 32, 32), _random_decisions(batch, edge=edge))
        assert torch.allclose(masked, sparse, atol=1e-4, rtol=0), (batch, (masked - sparse).abs().max())


@pytest.mark.parametrize('head_mode,patch_policy', list(itertools.product(['full', 'partial'], ['token', 'cls'])))
@pytest.mark.parametrize('batch', [1, 2, 7, 64])
def test_sparse_matches_masked_on_random_decisions(head_mode, patch_policy, batch):
    model = AdaViT(head_mode=head_mode, patch_policy=patch_policy, **TINY).eval()
    edges = ['', 'mixed', 'all_skipped', 'no_patch', 'no_head'] if batch in (1, 7) else ['', 'mixed']
    for seed, edge in enumerate(edges):
        decisions = _random_decisions(batch, seed=seed, edge=edge)
        x = torch.randn(batch, 3, 32, 32)
        (masked, _), (sparse, _) = _both(model, x, decisions)
        assert torch.allclose(masked, sparse, atol=1e-4, rtol=0), (edge, (masked - sparse).abs().max())


@pytest.mark.parametrize('act_layer', [torch.nn.SiLU, torch.nn.GELU, lambda: torch.nn.GELU(approximate='tanh')])
def test_sparse_matches_masked_for_any_mlp_activation(act_layer):
    """The FFN's GELU runs in place on the executor's own buffer (tanh form too); other activations run as given."""
    model = AdaViT(act_layer=act_layer, **TINY).eval()
    for batch, edge in ((1, ''), (7, 'mixed'), (5, None)):  # None: keep everything, the one-group path
        x = torch.randn(batch, 3, 32, 32)
        decisions = None if edge is None else _random_decisions(batch, edge=edge)
        if decisions is None:
            model.set_thresholds(patch=0.0, head=0.0, block=0.0)
        (masked, _), (sparse, _) = _both(model, x, decisions)
        assert torch.allclose(masked, sparse, atol=1e-4, rtol=0), (batch, (masked - sparse).abs().max())


@pytest.mark.parametrize('head_mode,patch_policy', list(itertools.product(['full', 'partial'], ['token', 'cls'])))
def test_sparse_matches_masked_with_learned_gates(head_mode, patch_policy):
    """The model's own decisions: identical in both executors, and varied across the batch."""
    model = AdaViT(head_mode=head_mode, patch_policy=patch_policy, **TINY).eval()
    with torch.no_grad():
        for blk in model.blocks:
            for gate in (blk.patch_gate, blk.head_gate, blk.block_gate):
                if gate is not None:
                    gate.weight.normal_(0, 0.3)
                    gate.bias.fill_(0.4)
    x = torch.randn(16, 3, 32, 32)
    (masked, d_masked), (sparse, d_sparse) = _both(model, x)
    assert torch.equal(d_masked.patch, d_sparse.patch)
    assert torch.equal(d_masked.head, d_sparse.head) and torch.equal(d_masked.block, d_sparse.block)
    assert 0.05 < d_sparse.patch[:, :, 1:].mean() < 0.95
    assert d_sparse.patch[:, :, 1:].sum(-1).std() > 0  # images keep different numbers of patches
    assert torch.allclose(masked, sparse, atol=1e-4, rtol=0)


@pytest.mark.parametrize('gather_from_runs', [1, 2])
def test_sparse_matches_masked_when_kept_heads_are_gathered(monkeypatch, gather_from_runs):
    """The gathered-weights path (many separate runs of kept heads) against the masked reference."""
    monkeypatch.setattr(sparse, 'GATHER_FROM_RUNS', gather_from_runs)
    model = AdaViT(**TINY).eval()
    for batch in (1, 9):
        decisions = _random_decisions(batch, seed=batch, edge='mixed')
        (masked, _), (out, _) = _both(model, torch.randn(batch, 3, 32, 32), decisions)
        assert torch.allclose(masked, out, atol=1e-4, rtol=0)


@pytest.mark.parametrize('chunk_rows', [1, 7, 100])
@pytest.mark.parametrize('head_mode', ['full', 'partial'])
def test_sparse_matches_masked_when_the_ffn_runs_in_row_chunks(monkeypatch, chunk_rows, head_mode):
    """Chunks that split head groups (and images) anywhere give the masked reference's logits, with the MLP's fc2
    added into the residual rows and, with layer scale, returned and added afterwards."""
    monkeypatch.setitem(sparse.FFN_CHUNK_BYTES, 'cpu', chunk_rows * 4 * TINY['embed_dim'] * 4)  # fp32, mlp_ratio 4
    for init_values in (None, 0.5):
        model = AdaViT(init_values=init_values, head_mode=head_mode, **TINY).eval()
        calls = []  # fc2 runs as a module where layer scale keeps it from adding into the residual: once per chunk
        model.blocks[0].mlp.fc2.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
        decisions = _random_decisions(9, seed=chunk_rows, edge='mixed')
        (masked, _), (out, _) = _both(model, torch.randn(9, 3, 32, 32), decisions)
        assert torch.allclose(masked, out, atol=1e-4, rtol=0)
        if init_values is not None:
            rows = int((decisions.patch[:, 0] * decisions.block[:, 0, 1:]).sum())  # the FFN rows of block 0
            _, ffn = planning.plan_batch(decisions.patch[:, 0], decisions.head[:, 0], decisions.block[:, 0],
                                         decisions.patch.shape[2], 9, head_mode)
            spans = sparse._row_spans(ffn.groups)  # chunks restart where the MSA-only images' rows leave a gap
            assert sum(end - start for start, end in spans) == rows
            assert calls[1:] == [min(chunk_rows, end - s) for start, end in spans
                                 for s in range(start, end, chunk_rows)]


@pytest.mark.parametrize('init_values', [None, 0.5])
def test_sparse_runs_timms_mlp_where_one_chunk_holds_rows_of_every_head(init_values):
    """An FFN whose rows fit one chunk and keep every head runs timm's ``Mlp`` module as the dense model does (added
    into the residual rows, or returned for layer scale); with dropped heads, fc1 runs on kept channels instead."""
    model = AdaViT(init_values=init_values, **TINY).eval()
    calls = []
    model.blocks[2].mlp.register_forward_hook(lambda module, args, out: calls.append(args[0].shape[0]))
    decisions = _random_decisions(3, seed=5)
    decisions.head[:, 2] = 1.0
    decisions.block[:, 2] = 1.0
    (masked, _), (out, _) = _both(model, torch.randn(3, 3, 32, 32), decisions)
    assert torch.allclose(masked, out, atol=1e-4, rtol=0)
    assert calls[1:] == [int(decisions.patch[:, 2].sum())]  # the sparse pass: once, on the kept rows
    decisions.head[0, 2, 1] = 0.0
    calls.clear()
    (masked, _), (out, _) = _both(model, torch.randn(3, 3, 32, 32), decisions)
    assert torch.allclose(masked, out, atol=1e-4, rtol=0)
    assert len(calls) == 1  # the masked pass only


@pytest.mark.parametrize('math_up_to,chunk', [(0, 1 << 19), (64, 1 << 24), (256, 1 << 13)])
@pytest.mark.parametrize('split_macs', [0.0, 1.5e6, float('inf')])
def test_sparse_matches_masked_for_any_attention_bucketing(monkeypatch, split_macs, math_up_to, chunk):
    """One bucket per token count, the CPU default, and one padded bucket give the masked reference's logits, with
    scaled_dot_product_attention (math_up_to=0) and the matmul attention, whole or a few images at a time."""
    monkeypatch.setitem(sparse.SPLIT_COST_MACS, 'cpu', split_macs)
    monkeypatch.setattr(kernels, 'MATH_ATTENTION_UP_TO', math_up_to)
    monkeypatch.setattr(kernels, 'MATH_ATTENTION_CHUNK', chunk)
    model = AdaViT(qk_norm=True, **TINY).eval()  # qk_norm: the optional q/k norms are applied on the packed rows
    decisions = _random_decisions(32, seed=5, edge='mixed')
    (masked, _), (out, _) = _both(model, torch.randn(32, 3, 32, 32), decisions)
    assert torch.allclose(masked, out, atol=1e-4, rtol=0)


def test_attention_algorithm_by_sequence_length_and_path(monkeypatch):
    """Defaults: the batch path attends by matmuls up to MATH_ATTENTION_UP_TO keys, a single image by the flash kernel
    above SINGLE_IMAGE_MATH_ATTENTION_UP_TO; the outputs agree either way."""
    assert latency.SINGLE_IMAGE_MATH_ATTENTION_UP_TO < NUM_TOKENS <= kernels.MATH_ATTENTION_UP_TO
    flash_calls = []
    flash = torch.nn.functional.scaled_dot_product_attention

    def counted(*args, **kwargs):
        flash_calls.append(1)
        return flash(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, 'scaled_dot_product_attention', counted)
    model = AdaViT(**TINY).eval()
    decisions = _random_decisions(2, seed=3)
    decisions.patch.fill_(1.0)  # every token: 65 keys in each image's attention
    decisions.block.fill_(1.0)
    decisions.head[:, :, 0] = 0.0  # a dropped head, so that the executor's own attention runs, not timm's module
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        batch = model(x, decisions=decisions)
        assert flash_calls == []
        single = torch.cat([model(x[i:i + 1], decisions=decisions[i:i + 1]) for i in range(2)])
        assert len(flash_calls) == 2 * TINY['depth']
        model.executor = 'masked'
        masked = model(x, decisions=decisions)
    assert torch.allclose(batch, single, atol=1e-5, rtol=0) and torch.allclose(batch, masked, atol=1e-4, rtol=0)


@pytest.mark.parametrize('length', [1, 5, 15, 16, 23])
def test_matmul_attention_matches_softmax_reference_short_rows_included(length):
    """Rows shorter than SOFTMAX_MIN_ROW are softmaxed padded with -inf: the same numbers as a plain softmax."""
    g = torch.Generator().manual_seed(length)
    q, k, v = (torch.randn(6, length, 8, generator=g) for _ in range(3))
    bias = torch.zeros(6, 1, length)
    bias[::2, :, length // 2 + 1:] = float('-inf')  # some problems padded past half their keys
    expected = torch.softmax(q @ k.transpose(1, 2) * 0.3 + bias, -1) @ v
    assert torch.allclose(kernels.attention(q, k, v, bias, 0.3), expected, atol=1e-6, rtol=0)
    assert torch.allclose(kernels.attention(q, k, v, None, 0.3), torch.softmax(q @ k.transpose(1, 2) * 0.3, -1) @ v,
                          atol=1e-6, rtol=0)


@pytest.mark.parametrize('dtype,width', [(torch.float32, 48), (torch.float32, 7), (torch.bfloat16, 16)])
def test_copy_rows_is_index_copy(dtype, width):
    """Rows copied as 16-byte elements where they divide evenly, element by element otherwise: the same bits."""
    x = torch.randn(20, width).to(dtype)
    rows = torch.tensor([7, 0, 19, 3])
    values = torch.randn(4, width).to(dtype)
    expected = x.clone().index_copy_(0, rows, values)
    kernels.copy_rows(x, rows, values)
    assert torch.equal(x, expected)


def test_attention_buckets_pad_only_where_one_more_call_costs_more():
    ones = [1] * 5
    # merging 10 -> 11 pads 2 images by 21 pairs (42 MACs at 1 MAC per pair): under a 50-MAC call, merged;
    # merging 11 -> 20 would pad 3 images by 279 pairs: a new bucket.
    assert attention_buckets([10, 10, 11, 20, 20], ones, 1, 50) == [(0, 3, 11), (3, 5, 20)]
    assert attention_buckets([10, 10, 11, 20, 20], ones, 1, 0) == [(0, 2, 10), (2, 3, 11), (3, 5, 20)]
    assert attention_buckets([10, 10, 11, 20, 20], ones, 1, float('inf')) == [(0, 5, 20)]
    assert attention_buckets([7], [1], 1, 0) == [(0, 1, 7)]


def test_attention_buckets_bound_the_whole_padding_of_a_bucket():
    # Counts one apart: each step alone pads little (10 -> 11: 21 pairs, 11 -> 12: 2 x 23), but padding 10 and 11 up to
    # 12 is 44 + 23 = 67 pairs, over the 50 of a call: the bucket closes.
    assert attention_buckets([10, 11, 12, 13, 14], [1] * 5, 1, 50) == [(0, 2, 11), (2, 4, 13), (4, 5, 14)]
    # Each head of an image is a problem of its own: padding 3 heads of 10 tokens to 11 is 63 pairs.
    assert attention_buckets([10, 11], [1, 3], 1, 50) == [(0, 2, 11)]
    assert attention_buckets([10, 11], [3, 1], 1, 50) == [(0, 1, 10), (1, 2, 11)]


def test_pack_tokens_orders_images_by_token_count_within_a_head_pattern():
    tokens = np.array([[1, 1, 1], [1, 0, 0], [1, 1, 0]], dtype=bool)
    packing = pack_tokens(None, tokens, None, num_tokens=3, batch_size=3)
    assert packing.rows.tolist() == [3, 6, 7, 0, 1, 2]  # image 1 (1 token), image 2 (2), image 0 (3)
    assert packing.groups[0].counts == [1, 2, 3]


def test_sparse_after_official_checkpoint():
    """An official-format state dict, converted, gives the same logits in both executors."""
    source = AdaViT(**TINY)
    official = {}
    for key, value in source.state_dict().items():
        if '.attn.qkv.' in key:
            for name, part in zip(('query', 'key', 'value'), value.chunk(3, dim=0)):
                official['module.' + key.replace('qkv', name)] = part
            continue
        key = key.replace('.patch_gate.', '.attn.token_select.mlp_head.')
        key = key.replace('.head_gate.', '.head_select.mlp_head.').replace('.block_gate.', '.layer_select.mlp_head.')
        official['module.' + key] = value
    for key in official:  # about half kept: patches by their own tokens, heads and blocks by the class token
        if key.endswith('mlp_head.bias'):
            official[key] = torch.full_like(official[key], 0.45 if 'token_select' in key else 0.0)
        elif key.endswith('mlp_head.weight'):
            official[key] = torch.randn_like(official[key]) * (0.2 if 'token_select' in key else 20.0)
    model = AdaViT(**TINY).eval()
    model.load_state_dict(adavit.convert_official_state_dict({'state_dict_ema': official}))
    (masked, d), (sparse, _) = _both(model, torch.randn(9, 3, 32, 32))
    assert 0.05 < d.patch[:, :, 1:].mean() < 0.95 and 0.05 < d.head[:, 1:].mean() < 0.95
    assert torch.allclose(masked, sparse, atol=1e-4, rtol=0)


def test_eval_with_gradients_on_uses_the_exact_masked_path():
    """Sparse execution is for inference; with gradients on, eval falls back to masking and gradients flow."""
    model = AdaViT(**TINY).eval()
    x = torch.randn(3, 3, 32, 32)
    decisions = _random_decisions(3, seed=3)
    out = model(x, decisions=decisions)
    out.sum().backward()
    assert model.head.weight.grad is not None and model.blocks[2].attn.qkv.weight.grad.abs().sum() > 0
    with torch.no_grad():
        assert torch.allclose(out.detach(), model(x, decisions=decisions), atol=1e-4)


def test_pack_tokens_groups_by_head_pattern():
    run = np.array([True, False, True, True])
    tokens = np.array([[1, 1, 0], [1, 0, 1], [1, 0, 0], [1, 1, 1]], dtype=bool)
    heads = np.array([[1, 0, 1], [1, 1, 1], [1, 1, 1], [1, 0, 1]], dtype=bool)
    packing = pack_tokens(run, tokens, heads, num_tokens=3, batch_size=4)
    # images 0 and 3 share pattern 0b101 (code 5), image 2 keeps every head (code 7): sorted by code
    assert packing.rows.tolist() == [0, 1, 9, 10, 11, 6]
    assert [(g.start, g.end, g.counts, g.head_runs) for g in packing.groups] == \
        [(0, 5, [2, 3], ((0, 1), (2, 3))), (5, 6, [1], None)]
    assert pack_tokens(np.zeros(4, dtype=bool), tokens, heads, 3, 4) is None
    assert pack_tokens(None, None, np.ones((4, 3), dtype=bool), 3, 4).rows is None
    assert head_runs(0b1101, 4) == ((0, 1), (2, 4)) and head_runs(0, 4) == () and head_runs(0b1111, 4) == ((0, 4),)


@pytest.mark.parametrize('seed', range(4))
def test_pack_tokens_matches_a_plain_loop_on_random_masks(seed):
    """Rows and groups against the definition: images that run, by (head pattern, kept count), each with its kept tokens
    in order, as rows of the flattened batch."""
    rng = np.random.default_rng(seed)
    B, N, H = 13, 7, 3
    run, tokens, heads = rng.random(B) < 0.8, rng.random((B, N)) < 0.5, rng.random((B, H)) < 0.7
    packing = pack_tokens(run, tokens, heads, num_tokens=N, batch_size=B)
    images = sorted((i for i in range(B) if run[i]),
                    key=lambda i: (sum(int(h) << j for j, h in enumerate(heads[i])), tokens[i].sum()))
    assert packing.rows.tolist() == [i * N + t for i in images for t in range(N) if tokens[i, t]]
    assert sum((g.counts for g in packing.groups), []) == [int(tokens[i].sum()) for i in images]


def test_pack_sub_blocks_shares_rows_and_leaves_each_sub_block_its_own_images():
    run_msa = np.array([True, True, False, True, False])
    run_ffn = np.array([True, False, True, True, False])
    tokens = np.array([[1, 1, 0], [1, 0, 0], [1, 1, 1], [1, 0, 1], [1, 1, 1]], dtype=bool)
    heads = np.array([[1, 1], [1, 1], [1, 1], [1, 0], [0, 1]], dtype=bool)
    msa, ffn = pack_sub_blocks(run_msa, run_ffn, tokens, heads, num_tokens=3, batch_size=5)
    assert msa.rows is ffn.rows
    # pattern 0b01: image 3 (both); pattern 0b11: image 1 (MSA only), image 0 (both), image 2 (FFN only)
    assert msa.rows.tolist() == [9, 11, 3, 0, 1, 6, 7, 8]
    def groups(packing):
        return [(g.start, g.end, g.counts, g.head_runs) for g in packing.groups]
    assert groups(msa) == [(0, 2, [2], ((0, 1),)), (2, 5, [1, 2], None)]
    assert groups(ffn) == [(0, 2, [2], ((0, 1),)), (3, 8, [2, 3], None)]
    assert sparse._row_spans(ffn.groups) == [(0, 2), (3, 8)]
    assert pack_sub_blocks(np.zeros(5, dtype=bool), np.zeros(5, dtype=bool), tokens, heads, 3, 5) == (None, None)
    msa, ffn = pack_sub_blocks(None, np.zeros(5, dtype=bool), tokens, None, 3, 5)
    assert ffn is None and [(g.start, g.end, g.counts) for g in msa.groups] == [(0, 11, [1, 2, 2, 3, 3])]


@pytest.mark.parametrize('seed', range(4))
def test_pack_sub_blocks_matches_a_plain_loop_on_random_masks(seed):
    """Against the definition: images that run either sub-block, by (head pattern, MSA only / both / FFN only, kept
    count), each with its kept tokens in order; per pattern, each sub-block's group is the run of its own images."""
    rng = np.random.default_rng(seed)
    B, N, H = 17, 7, 3
    run_msa, run_ffn = rng.random(B) < 0.7, rng.random(B) < 0.7
    tokens, heads = rng.random((B, N)) < 0.5, rng.random((B, H)) < 0.7
    msa, ffn = pack_sub_blocks(run_msa, run_ffn, tokens, heads, num_tokens=N, batch_size=B)
    pattern = [sum(int(h) << j for j, h in enumerate(heads[i])) for i in range(B)]
    kind = [0 if not run_ffn[i] else 1 if run_msa[i] else 2 for i in range(B)]
    images = sorted((i for i in range(B) if run_msa[i] or run_ffn[i]),
                    key=lambda i: (pattern[i], kind[i], tokens[i].sum()))
    assert msa.rows is ffn.rows
    assert msa.rows.tolist() == [i * N + t for i in images for t in range(N) if tokens[i, t]]
    first_row = dict(zip(images, np.cumsum([0] + [int(tokens[i].sum()) for i in images]).tolist()))
    for packing, run in ((msa, run_msa), (ffn, run_ffn)):
        expected = []
        for p in sorted({pattern[i] for i in images}):
            members = [i for i in images if pattern[i] == p and run[i]]
            if members:
                counts = [int(tokens[i].sum()) for i in members]
                runs = None if p == (1 << H) - 1 else head_runs(p, H)
                expected.append((first_row[members[0]], first_row[members[0]] + sum(counts), counts, runs))
        assert [(g.start, g.end, g.counts, g.head_runs) for g in packing.groups] == expected


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.bfloat16, torch.float16])
def test_host_masks_threshold_at_one_half(dtype):
    """fp32/fp64 are read in place by NumPy; other dtypes take the one-copy path a GPU takes."""
    patch, block = torch.tensor([[0.0, 1.0, 0.5], [1.0, 0.0, 1.0]]).to(dtype), torch.tensor([[1.0, 0.0]]).to(dtype)
    tokens, heads, blocks = planning._host_masks(patch, None, block)
    assert tokens.tolist() == [[False, True, False], [True, False, True]] and heads is None
    assert blocks.tolist() == [[True, False]]
    assert planning._host_masks(None, None) == [None, None]


def test_batch_masks_are_none_where_the_decisions_keep_everything():
    patch = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    heads = torch.ones(2, 3, dtype=torch.bool)
    block = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    tokens, kept_heads, run_msa, run_ffn = planning.batch_masks(patch, heads, block)
    assert tokens.tolist() == [[True, True], [True, False]] and kept_heads is None
    assert run_msa is None and run_ffn.tolist() == [False, True]
    assert planning.batch_masks(torch.ones(2, 2), None, None) == (None, None, None, None)


def test_sparse_under_inference_mode_and_its_weight_copies_after_it():
    """Deployment runs under ``torch.inference_mode()``: the same logits as the masked reference, and the re-laid-out
    weight copies made there (inference tensors) still serve later calls under ``no_grad``."""
    for batch in (5, 1):  # the batch path and the latency path, each with its own weight views
        model = AdaViT(**TINY).eval()
        x, decisions = torch.randn(batch, 3, 32, 32), _random_decisions(batch, seed=4, edge='mixed')
        with torch.inference_mode():
            sparse_inference = model(x, decisions=decisions)
        (masked, _), (sparse, _) = _both(model, x, decisions)
        assert torch.allclose(sparse_inference, masked, atol=1e-4, rtol=0)
        assert torch.equal(sparse_inference, sparse)


def _flop_counted_macs(model: AdaViT, x: torch.Tensor, decisions=None) -> float:
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(x, decisions=decisions)
    return counter.get_total_flops() / 2  # FLOPs count a multiply and an add apart


@pytest.mark.parametrize('head_mode,patch_policy', list(itertools.product(['full', 'partial'], ['token', 'cls'])))
def test_macs_equal_flop_counter_on_sparse_executor(head_mode, patch_policy):
    model = AdaViT(head_mode=head_mode, patch_policy=patch_policy, **TINY).eval()
    for seed, edge in enumerate(['', 'mixed', 'no_patch', 'no_head', 'all_skipped']):
        decisions = _random_decisions(1, seed=seed, edge=edge)
        x = torch.randn(1, 3, 32, 32)
        counted = _flop_counted_macs(model, x, decisions)
        predicted = decision_macs(model, decisions, gates_ran=False).item()
        assert predicted == pytest.approx(counted, rel=0.01), edge
    # the model's own decisions, including the decision networks' cost
    x = torch.randn(1, 3, 32, 32)
    assert macs(model, x).item() == pytest.approx(_flop_counted_macs(model, x), rel=0.01)


def test_macs_of_deit_small():
    """The dense DeiT-S is 4.6 GMACs, and a keep-everything AdaViT costs that plus its decision networks."""
    model = timm.create_model('adavit_deit_small_patch16_224').eval()
    assert dense_macs(model) / 1e9 == pytest.approx(4.6, abs=0.05)
    assert dense_macs(timm.create_model('deit_small_patch16_224')) == dense_macs(model)
    assert dense_macs(timm.create_model('adavit_deit_tiny_patch16_224')) / 1e9 == pytest.approx(1.3, abs=0.05)
    assert dense_macs(timm.create_model('adavit_deit_base_patch16_224')) / 1e9 == pytest.approx(17.6, abs=0.05)
    ones = torch.ones(1, 12, 197), torch.ones(1, 12, 6), torch.ones(1, 12, 2)
    gated = torch.ones(12, dtype=torch.bool)
    everything = Decisions(*ones, gated, gated, gated)
    gates = 12 * 196 * 384 + 11 * (384 * 6 + 384 * 2)  # patch gate on every block, head and block gates from 1 on
    assert decision_macs(model, everything).item() == dense_macs(model) + gates
    assert decision_macs(model, everything, gates_ran=False).item() == dense_macs(model)
    counted = _flop_counted_macs(model, torch.randn(1, 3, 224, 224), everything)
    assert counted == pytest.approx(dense_macs(model), rel=0.01)
    with torch.no_grad():  # learned gates that keep everything: the decision networks run and are counted
        for blk in model.blocks:
            for gate in (blk.patch_gate, blk.head_gate, blk.block_gate):
                if gate is not None:
                    gate.weight.zero_()
                    gate.bias.fill_(10.0)
    x = torch.randn(1, 3, 224, 224)
    assert macs(model, x).item() == dense_macs(model) + gates
    assert _flop_counted_macs(model, x) == pytest.approx(dense_macs(model) + gates, rel=0.01)


def test_calibrate_thresholds_hits_target_keep_rates():
    from adavit.gates.budget import calibrate_thresholds
    model = AdaViT(**TINY).eval()
    with torch.no_grad():
        for blk in model.blocks:
            for gate in (blk.patch_gate, blk.head_gate, blk.block_gate):
                if gate is not None:
                    gate.weight.normal_(0, 0.5 if gate is blk.patch_gate else 20.0)
    images = torch.randn(32, 3, 32, 32)
    reached = calibrate_thresholds(model, images, patch=0.5, head=0.75)
    assert reached['patch'] == pytest.approx(0.5, abs=0.03)
    assert reached['head'] == pytest.approx(0.75, abs=0.06)
    assert model.patch_threshold == reached['patch_threshold'] and model.block_threshold == 0.5
    cheaper = calibrate_thresholds(model, images, patch=0.25)
    assert cheaper['patch'] == pytest.approx(0.25, abs=0.03)
    assert cheaper['patch_threshold'] > reached['patch_threshold']
    with pytest.raises(adavit.ConfigError):
        calibrate_thresholds(model, images, patch=1.5)
    # A cost target, met by the patch threshold: the mean MACs land just under it.
    from adavit.cost.macs import dense_macs, macs
    target = 0.6 * dense_macs(model)
    at_cost = calibrate_thresholds(model, images, macs=target)
    with torch.no_grad():
        assert macs(model, images).mean().item() == pytest.approx(at_cost['macs'])
    assert 0.95 * target < at_cost['macs'] <= target
    with pytest.raises(adavit.ConfigError):
        calibrate_thresholds(model, images, patch=0.5, macs=target)


def test_random_patch_keep_for_cost_reaches_the_target_cost():
    from adavit.cost.macs import decision_macs, dense_macs
    from adavit.gates.budget import random_patch_keep_for_cost
    model = AdaViT(**dict(TINY, policy='random', random_keep=(0.5, 0.8, 0.9))).eval()
    target = 0.45 * dense_macs(model)
    patch = random_patch_keep_for_cost(model, target, images=500, steps=12)
    assert model.random_keep == (patch, 0.8, 0.9)  # heads and blocks as set, patches found
    model.reset_random_policy(123)  # fresh draws, not the ones searched on
    with torch.no_grad():
        _, decisions = model(torch.randn(1000, 3, 32, 32), return_decisions=True)
    assert decision_macs(model, decisions, gates_ran=False).mean().item() == pytest.approx(target, rel=0.02)
    assert decisions.patch[:, model.patch_gated, 1:].mean().item() == pytest.approx(patch, abs=0.02)
    with pytest.raises(adavit.ConfigError):
        random_patch_keep_for_cost(AdaViT(**TINY), target)


def test_sparse_under_bf16_autocast_matches_masked():
    model = AdaViT(**TINY).eval()
    decisions = _random_decisions(5, seed=11, edge='mixed')
    x = torch.randn(5, 3, 32, 32)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        model.executor = 'masked'
        masked = model(x, decisions=decisions).float()
        model.executor = 'sparse'
        sparse = model(x, decisions=decisions).float()
    assert torch.allclose(masked, sparse, atol=0.05, rtol=0.05)


def test_sparse_with_bf16_weights_matches_masked():
    """`adavit benchmark --dtype bf16` casts weights and inputs: padded attention must stay finite in bf16."""
    model = AdaViT(**TINY).eval().to(torch.bfloat16)
    d = _random_decisions(9, seed=12, edge='mixed')
    decisions = Decisions(d.patch.bfloat16(), d.head.bfloat16(), d.block.bfloat16(), d.patch_gated, d.head_gated,
                          d.block_gated)  # what the model's own gates give in bf16
    x = torch.randn(9, 3, 32, 32, dtype=torch.bfloat16)
    (masked, _), (sparse, _) = _both(model, x, decisions)
    assert torch.isfinite(sparse).all()
    assert torch.allclose(masked.float(), sparse.float(), atol=0.05, rtol=0.05)


def test_single_image_path_serves_plain_blocks_at_batch_one(monkeypatch):
    """Batch 1 of a plain block runs the latency path; batches, partial deactivation, layer scale, q/k norms and
    autocast run the batch path."""
    block = AdaViT(**TINY).eval().blocks[0]
    one, two = torch.randn(1, NUM_TOKENS, 48), torch.randn(2, NUM_TOKENS, 48)
    assert latency.latency_plan(block, one, 'full')
    assert not latency.latency_plan(block, two, 'full')
    assert not latency.latency_plan(block, one, 'partial')
    assert not latency.latency_plan(AdaViT(init_values=0.5, **TINY).blocks[0], one, 'full')
    assert not latency.latency_plan(AdaViT(qk_norm=True, **TINY).blocks[0], one, 'full')
    with torch.autocast('cpu', dtype=torch.bfloat16):
        assert not latency.latency_plan(block, one, 'full')

    model = AdaViT(**TINY).eval()
    calls = []
    latency_path = sparse.single_image_block_forward
    monkeypatch.setattr(sparse, 'single_image_block_forward', lambda *args: calls.append(1) or latency_path(*args))
    _both(model, torch.randn(1, 3, 32, 32), _random_decisions(1, seed=3))
    assert len(calls) == TINY['depth']


@pytest.mark.parametrize('math_up_to', [0, 64])
@pytest.mark.parametrize('edge', ['', 'mixed', 'no_patch', 'no_head', 'all_skipped', 'all_tokens'])
def test_single_image_path_equals_the_batch_path(monkeypatch, edge, math_up_to):
    """The latency path computes what the batch path computes for one image, op for op: the same outputs, bit for bit,
    with attention by matmuls (short sequences) or by the flash kernel, where both paths switch at the same length."""
    monkeypatch.setattr(kernels, 'MATH_ATTENTION_UP_TO', math_up_to)
    monkeypatch.setattr(latency, 'SINGLE_IMAGE_MATH_ATTENTION_UP_TO', math_up_to)
    model = AdaViT(**TINY).eval()
    x = torch.randn(1, 3, 32, 32)
    decisions = _random_decisions(1, seed=5, edge='' if edge == 'all_tokens' else edge)
    if edge == 'all_tokens':  # every token, some heads: attention over the full sequence on kept heads only
        decisions.patch.fill_(1.0)
        decisions.head[0, :, 0] = 0.0
    with torch.no_grad():
        single = model(x, decisions=decisions)
        monkeypatch.setattr(sparse, 'latency_plan', lambda *args: None)
        batch = model(x, decisions=decisions)
    assert torch.equal(single, batch)


def test_single_image_path_follows_new_weights():
    """Its ready-made weight views are remade when the weights change in place (load_state_dict) or move to new
    storage (a new dtype)."""
    model = AdaViT(**TINY).eval()
    x, decisions = torch.randn(1, 3, 32, 32), _random_decisions(1, seed=6)
    _both(model, x, decisions)  # makes the views
    model.load_state_dict(AdaViT(**TINY).state_dict())
    (masked, _), (sparse_out, _) = _both(model, x, decisions)
    assert torch.allclose(masked, sparse_out, atol=1e-4, rtol=0)
    model = model.double()
    d = decisions
    (masked, _), (sparse_out, _) = _both(model, x.double(), Decisions(
        d.patch.double(), d.head.double(), d.block.double(), d.patch_gated, d.head_gated, d.block_gated))
    assert sparse_out.dtype == torch.float64 and torch.allclose(masked, sparse_out, atol=1e-10, rtol=0)


def test_single_image_path_follows_replaced_modules_and_norm_attributes():
    """The latency plan calls the norms and the activation as kernels: it follows a norm's eps changed in place, a new
    activation, and a block given layer scale (which the batch path then serves), as the masked executor does."""
    from timm.layers import LayerScale
    model = AdaViT(**TINY).eval()
    x, decisions = torch.randn(1, 3, 32, 32), _random_decisions(1, seed=6)
    decisions.block.fill_(1.0)  # every sub-block runs, so that each change shows
    probe = torch.randn(1, NUM_TOKENS, 48)

    def features():
        with torch.no_grad():
            model.executor = 'masked'
            masked = model.forward_features(x, decisions=decisions)
            model.executor = 'sparse'
            return masked, model.forward_features(x, decisions=decisions)

    changes = [lambda: setattr(model.blocks[0].norm2, 'eps', 10.0),
               lambda: setattr(model.blocks[1].mlp, 'act', torch.nn.ReLU()),
               lambda: setattr(model.blocks[3], 'ls1', LayerScale(48, init_values=0.5))]
    _, before = features()  # makes the plans
    assert isinstance(latency.latency_plan(model.blocks[3], probe, 'full'), tuple)
    for change in changes:
        change()
        masked, after = features()
        assert torch.allclose(masked, after, atol=1e-4, rtol=0) and not torch.equal(before, after)
        before = after
    assert latency.latency_plan(model.blocks[3], probe, 'full') is None


def test_model_with_latency_plans_pickles():
    """``torch.save(model)`` after a batch-1 forward: the plans it holds pickle, and the copy's plans call the copy's
    modules, so its outputs follow its own norms."""
    import io
    model = AdaViT(**TINY).eval()
    x, decisions = torch.randn(1, 3, 32, 32), _random_decisions(1, seed=6)
    with torch.no_grad():
        before = model(x, decisions=decisions)
        buffer = io.BytesIO()
        torch.save(model, buffer)
        buffer.seek(0)
        copy = torch.load(buffer, weights_only=False)  # our own object, just written
        assert torch.equal(copy(x, decisions=decisions), before)
        copy.blocks[0].norm2.eps = 10.0
        assert not torch.equal(copy(x, decisions=decisions), before)
        assert torch.equal(model(x, decisions=decisions), before)


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64, torch.bfloat16, torch.bool])
def test_single_image_decisions_read_in_place_as_through_one_copy(dtype):
    """CPU decisions are read in place; on other devices one copy brings a block's decisions to the host
    (``batch_masks``). Both readings agree, for every dtype, and say None where everything is kept."""
    patch = torch.tensor([[1.0, 0.0, 1.0, 1.0]]).to(dtype)
    heads = torch.tensor([[1.0, 0.0, 1.0]]).to(dtype)
    block = torch.tensor([[0.0, 1.0]]).to(dtype)
    for on_host in (True, False):
        run_msa, run_ffn, runs, rows = latency._single_image_decisions(patch, heads, block, on_host=on_host)
        assert (run_msa, run_ffn, runs, rows.tolist()) == (False, True, ((0, 1), (2, 3)), [0, 2, 3])
        assert type(run_msa) is bool and type(run_ffn) is bool
        no_head = latency._single_image_decisions(patch, torch.zeros(1, 3).to(dtype), None, on_host=on_host)
        assert no_head[:3] == (True, True, ())
        everything = latency._single_image_decisions(torch.ones(1, 4).to(dtype), torch.ones(1, 3).to(dtype), None,
                                                    on_host=on_host)
        assert everything == (True, True, None, None)


@pytest.mark.parametrize('edge', ['', 'mixed', 'no_head'])
def test_single_image_path_without_biases(edge):
    """qkv, proj, fc1 and fc2 without biases (``qkv_bias=False, proj_bias=False``): plain matmuls where the biases were
    added, and nothing at all where no head is kept."""
    model = AdaViT(qkv_bias=False, proj_bias=False, **TINY).eval()
    assert model.blocks[0].attn.qkv.bias is None and model.blocks[0].mlp.fc1.bias is None
    (masked, _), (sparse_out, _) = _both(model, torch.randn(1, 3, 32, 32), _random_decisions(1, seed=8, edge=edge))
    assert torch.allclose(masked, sparse_out, atol=1e-4, rtol=0)


@pytest.mark.parametrize('dtype', [torch.bool, torch.bfloat16])
def test_single_image_path_reads_bool_and_bf16_decisions(dtype):
    model = AdaViT(**TINY).eval()
    x = torch.randn(1, 3, 32, 32)
    if dtype == torch.bfloat16:
        model, x = model.to(dtype), x.to(dtype)
    d = _random_decisions(1, seed=7, edge='mixed')
    decisions = Decisions(d.patch.to(dtype), d.head.to(dtype), d.block.to(dtype), d.patch_gated, d.head_gated,
                          d.block_gated)
    (masked, _), (sparse_out, _) = _both(model, x, decisions)
    tolerance = 1e-4 if dtype == torch.bool else 0.05
    assert torch.allclose(masked.float(), sparse_out.float(), atol=tolerance, rtol=tolerance)


@pytest.mark.parametrize('batch,accelerator', [(5, False), (1, False), (5, True)])
def test_without_x_normed_each_sub_block_norms_only_its_rows(monkeypatch, batch, accelerator):
    """``x_normed=None``: norm1 of the kept rows alone gives what gathering them from norm1 of every token gives, on the
    batch path, the latency path and the accelerator plan."""
    if accelerator:
        monkeypatch.setattr(sparse, 'HEAD_GROUPED_DEVICES', set())
    block = AdaViT(**TINY).eval().blocks[1]
    decisions = _random_decisions(batch, seed=6, edge='mixed' if batch > 1 else '')
    x = torch.randn(batch, NUM_TOKENS, 48)
    with torch.no_grad():
        args = decisions.patch[:, 1], decisions.head[:, 1], decisions.block[:, 1]
        given = sparse.sparse_block_forward(block, x.clone(), block.norm1(x), *args)
        lazy = sparse.sparse_block_forward(block, x.clone(), None, *args)
    assert torch.equal(given, lazy)


@pytest.mark.parametrize('policy', ['learned', 'random'])
def test_model_norms_every_token_only_for_the_patch_gate(monkeypatch, policy):
    """The learned patch gate reads norm1 of every token; random or given decisions leave the norm to the sparse
    executor (``x_normed=None``)."""
    import adavit.model.adavit as model_module
    seen = []
    forward = model_module.sparse_block_forward
    def spy(blk, x, x_normed, *args):
        seen.append(x_normed is None)
        return forward(blk, x, x_normed, *args)

    monkeypatch.setattr(model_module, 'sparse_block_forward', spy)
    model = AdaViT(policy=policy, **TINY).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model(x)
        assert seen == [policy == 'random'] * TINY['depth']
        seen.clear()
        model(x, decisions=_random_decisions(2, seed=1))
        assert seen == [True] * TINY['depth']
