"""With every decision keeping everything, AdaViT is timm's VisionTransformer with the same weights."""
from typing import Tuple

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import adavit
from adavit.model import gate_keys
from _adavit_reference import DEIT_TINY, TINY, Config, make_official_state_dict

CONFIGS = {'tiny': TINY, 'deit_tiny': DEIT_TINY}


def _pair(cfg: Config, head_mode: str, executor: str = 'masked') -> Tuple[adavit.AdaViT, VisionTransformer]:
    """An AdaViT with random (non-trivial) weights and a timm ViT holding the same backbone weights."""
    cfg = Config(**{**cfg.__dict__, 'head_mode': head_mode})
    model = adavit.AdaViT(**cfg.model_kwargs(), executor=executor)
    model.load_state_dict(adavit.convert_official_state_dict(make_official_state_dict(cfg, seed=3)))
    kwargs = cfg.model_kwargs()
    del kwargs['head_mode'], kwargs['patch_policy']
    dense = VisionTransformer(**kwargs)
    gates = set(gate_keys(model))
    dense.load_state_dict({k: v for k, v in model.state_dict().items() if k not in gates})  # strict
    return model, dense


def _keep_all(model: adavit.AdaViT, batch: int) -> adavit.Decisions:
    depth, heads, tokens = len(model.blocks), model.blocks[0].attn.num_heads, model.patch_embed.num_patches + 1
    return adavit.Decisions(torch.ones(batch, depth, tokens), torch.ones(batch, depth, heads),
                            torch.ones(batch, depth, 2), model.patch_gated, model.head_gated, model.block_gated)


def _open_gates(model: adavit.AdaViT) -> None:
    """Gate biases so large that every decision keeps, in eval and (whatever the Gumbel noise) in training."""
    with torch.no_grad():
        for blk in model.blocks:
            for gate in (blk.patch_gate, blk.head_gate, blk.block_gate):
                if gate is not None:
                    gate.weight.zero_()
                    gate.bias.fill_(1e3)


@pytest.mark.parametrize('head_mode', ['full', 'partial'])
@pytest.mark.parametrize('via', ['decisions', 'gate_biases'])
@pytest.mark.parametrize('config', ['tiny', 'deit_tiny'])
def test_keep_everything_equals_timm_vit(config: str, via: str, head_mode: str, executor: str) -> None:
    cfg = CONFIGS[config]
    model, dense = _pair(cfg, head_mode, executor)
    model.eval()
    dense.eval()
    x = torch.randn(2, 3, cfg.img_size, cfg.img_size)
    with torch.no_grad():
        expected = dense(x)
        if via == 'decisions':
            logits = model(x, decisions=_keep_all(model, 2))
        else:
            _open_gates(model)
            logits, taken = model(x, return_decisions=True)
            assert bool((taken.patch == 1).all() and (taken.head == 1).all() and (taken.block == 1).all())
    assert logits.shape == expected.shape
    assert (logits - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize('head_mode', ['full', 'partial'])
def test_keep_everything_training_step_equals_timm_vit(head_mode: str) -> None:
    """In training (Gumbel decisions, straight-through) open gates give the dense forward and the dense gradients."""
    model, dense = _pair(TINY, head_mode)
    _open_gates(model)
    model.train()
    dense.train()
    x = torch.randn(3, 3, TINY.img_size, TINY.img_size)
    logits, taken = model(x, return_decisions=True)
    expected = dense(x)
    assert bool((taken.patch == 1).all() and (taken.head == 1).all() and (taken.block == 1).all())
    assert (logits - expected).abs().max().item() <= 1e-5
    logits.square().sum().backward()
    expected.square().sum().backward()
    dense_params = dict(dense.named_parameters())
    for name, p in model.named_parameters():
        if name in dense_params:
            torch.testing.assert_close(p.grad, dense_params[name].grad, rtol=1e-4, atol=1e-5, msg=name)


def test_decisions_layout_and_gating_flags() -> None:
    """Released layout: patch gates in every block, head and block gates from block 1 on; class entries always 1."""
    model = adavit.AdaViT(**TINY.model_kwargs(), executor='masked').eval()
    x = torch.randn(2, 3, TINY.img_size, TINY.img_size)
    with torch.no_grad():
        _, d = model(x, return_decisions=True)
    assert d.patch.shape == (2, TINY.depth, TINY.num_patches + 1)
    assert d.head.shape == (2, TINY.depth, TINY.heads)
    assert d.block.shape == (2, TINY.depth, 2)
    assert d.patch_gated.tolist() == [True] * TINY.depth
    assert d.head_gated.tolist() == [False] + [True] * (TINY.depth - 1)
    assert d.block_gated.tolist() == [False] + [True] * (TINY.depth - 1)
    assert bool((d.patch[:, :, 0] == 1).all())
    assert bool((d.head[:, 0] == 1).all() and (d.block[:, 0] == 1).all())
    assert set(torch.cat([d.patch.flatten(), d.head.flatten(), d.block.flatten()]).tolist()) <= {0.0, 1.0}
    # Fresh gates (weights trunc_normal 0.02, bias 0): patches need logit > ln(1.5) so nearly all drop at eval.
    assert d.patch[:, :, 1:].mean().item() < 0.2
    for blk in model.blocks[1:]:
        assert torch.equal(blk.head_gate.bias, torch.zeros(TINY.heads))
        assert 0.01 < blk.head_gate.weight.std().item() < 0.03
