"""Extreme decisions (nothing kept, no heads, MSA off) and batches that mix them, against the reference."""
from typing import Dict

import pytest
import torch

import adavit
from adavit.execution.masked import masked_block_forward
from _adavit_reference import TINY, Config, make_official_state_dict, reference_forward
from conftest import HAS_SPARSE

CFG = Config(**{**TINY.__dict__, 'depth': 4})
L, H, T = CFG.depth, CFG.heads, CFG.num_patches + 1


def _case(name: str, generator: torch.Generator) -> Dict[str, torch.Tensor]:
    """Decisions of one image, (depth, units) each; block 0 follows the same pattern as the gated blocks."""
    patch, head, block = torch.ones(L, T), torch.ones(L, H), torch.ones(L, 2)
    if name == 'no_patches':
        patch[:, 1:] = 0
    elif name == 'no_heads':
        head[:] = 0
    elif name == 'msa_off':
        block[:, 0] = 0
    elif name == 'no_heads_msa_off':
        head[:] = 0
        block[:, 0] = 0
    elif name == 'all_off':
        patch[:, 1:] = 0
        head[:] = 0
        block[:] = 0
    elif name == 'mixed':
        patch = (torch.rand(L, T, generator=generator) < 0.5).float()
        patch[:, 0] = 1
        head = (torch.rand(L, H, generator=generator) < 0.5).float()
        block = (torch.rand(L, 2, generator=generator) < 0.5).float()
        patch[1, 1:] = 0  # one block with no patch at all, one with no head, one with only the FFN
        head[2] = 0
        block[3] = torch.tensor([0.0, 1.0])
    return {'patch': patch, 'head': head, 'block': block}


def _batch(names) -> Dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    cases = [_case(n, g) for n in names]
    return {k: torch.stack([c[k] for c in cases]) for k in ('patch', 'head', 'block')}


def _as_decisions(model: adavit.AdaViT, d: Dict[str, torch.Tensor]) -> adavit.Decisions:
    return adavit.Decisions(d['patch'], d['head'], d['block'], model.patch_gated, model.head_gated, model.block_gated)


CASES = ['no_patches', 'no_heads', 'msa_off', 'no_heads_msa_off', 'all_off', 'mixed']
BATCHES = {name: [name, name] for name in CASES}
BATCHES['mixed_batch'] = CASES + ['mixed']


@pytest.mark.parametrize('batch', list(BATCHES))
@pytest.mark.parametrize('head_mode', ['full', 'partial'])
def test_extreme_decisions_match_reference(batch: str, head_mode: str, executor: str) -> None:
    cfg = Config(**{**CFG.__dict__, 'head_mode': head_mode})
    state_dict = make_official_state_dict(cfg, seed=5)
    model = adavit.AdaViT(**cfg.model_kwargs(), executor=executor).eval()
    model.load_state_dict(adavit.convert_official_state_dict(state_dict))
    decisions = _batch(BATCHES[batch])
    x = torch.randn(len(BATCHES[batch]), 3, cfg.img_size, cfg.img_size)
    expected, _, _ = reference_forward(state_dict, cfg, x, decisions=decisions)
    with torch.no_grad():
        logits, taken = model(x, decisions=_as_decisions(model, decisions), return_decisions=True)
    assert torch.isfinite(logits).all()
    assert (logits.double() - expected).abs().max().item() <= 1e-4
    for kind in ('patch', 'head', 'block'):
        assert torch.equal(getattr(taken, kind), decisions[kind])


def _block_functions():
    yield pytest.param(masked_block_forward, id='masked')
    if HAS_SPARSE:
        from adavit.execution.sparse import sparse_block_forward
        yield pytest.param(sparse_block_forward, id='sparse')


@pytest.mark.parametrize('block_forward', list(_block_functions()))
def test_no_heads_with_msa_on_outputs_proj_bias_times_patch_mask(block_forward) -> None:
    """Full deactivation of every head: the MSA output is the (unmasked) proj bias, times the patch mask."""
    model = adavit.AdaViT(**CFG.model_kwargs(), executor='masked').eval()
    model.load_state_dict(adavit.convert_official_state_dict(make_official_state_dict(CFG, seed=5)))
    blk = model.blocks[1]
    x = torch.randn(3, T, CFG.dim)
    patch = (torch.rand(3, T) < 0.5).float()
    patch[:, 0] = 1
    patch[2, 1:] = 0  # an image with no patch kept at all
    heads = torch.zeros(3, H)
    msa_only = torch.tensor([[1.0, 0.0]] * 3)
    with torch.no_grad():
        out = block_forward(blk, x.clone(), blk.norm1(x), patch, heads, msa_only, 'full')
    expected = x + patch[:, :, None] * blk.attn.proj.bias
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize('block_forward', list(_block_functions()))
def test_no_heads_partial_passes_values_through(block_forward) -> None:
    """Partial deactivation of every head: attention is the identity, so MSA = proj(v(norm1(x))) times the mask."""
    model = adavit.AdaViT(**{**CFG.model_kwargs(), 'head_mode': 'partial'}, executor='masked').eval()
    blk = model.blocks[1]
    x = torch.randn(2, T, CFG.dim)
    patch = (torch.rand(2, T) < 0.5).float()
    patch[:, 0] = 1
    with torch.no_grad():
        out = block_forward(blk, x.clone(), blk.norm1(x), patch, torch.zeros(2, H), torch.tensor([[1.0, 0.0]] * 2),
                            'partial')
        v = blk.attn.qkv(blk.norm1(x))[..., 2 * CFG.dim:]
        expected = x + patch[:, :, None] * blk.attn.proj(v)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize('block_forward', list(_block_functions()))
def test_dropped_patches_pass_through_unchanged(block_forward) -> None:
    """A dropped patch is unchanged by the block; a kept one does not see dropped ones."""
    model = adavit.AdaViT(**CFG.model_kwargs(), executor='masked').eval()
    blk = model.blocks[1]
    x = torch.randn(2, T, CFG.dim)
    patch = torch.ones(2, T)
    patch[:, 1::2] = 0
    with torch.no_grad():
        out = block_forward(blk, x.clone(), blk.norm1(x), patch, None, None, 'full')
        # Changing the dropped tokens changes nothing for the kept ones.
        x2 = x.clone()
        x2[:, 1::2] += torch.randn_like(x2[:, 1::2])
        out2 = block_forward(blk, x2.clone(), blk.norm1(x2), patch, None, None, 'full')
    assert torch.equal(out[:, 1::2], x[:, 1::2])
    torch.testing.assert_close(out[:, 0::2], out2[:, 0::2], rtol=0, atol=1e-6)
