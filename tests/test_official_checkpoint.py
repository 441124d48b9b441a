"""Official-format checkpoints load strictly and reproduce the released eval semantics (an independent reference)."""
import pytest
import torch

import adavit
from adavit.model.checkpoint import is_official_state_dict
from _adavit_reference import DEIT_TINY, TINY, Config, make_official_state_dict, reference_forward, \
    wrap_official_checkpoint

# A batch and depth large enough that every kind of decision is both taken and refused somewhere.
SMALL = Config(**{**TINY.__dict__, 'depth': 4})
CONFIGS = {'tiny': SMALL, 'deit_tiny': DEIT_TINY}
BATCH = {'tiny': 4, 'deit_tiny': 2}


def _model(cfg: Config, executor: str, checkpoint: object) -> adavit.AdaViT:
    model = adavit.AdaViT(**cfg.model_kwargs(), executor=executor)
    model.load_state_dict(adavit.convert_official_state_dict(checkpoint))  # strict
    return model.eval()


def _assert_matches_reference(model: adavit.AdaViT, state_dict: dict, cfg: Config, x: torch.Tensor) -> None:
    ref_logits, ref_decisions, margin = reference_forward(state_dict, cfg, x)
    # The decisions are compared exactly, so no gate logit may sit within float32 noise of its threshold.
    assert margin > 1e-4, f'test weights put a decision within {margin:.2e} of its threshold: change the seed'
    with torch.no_grad():
        logits, taken = model(x, return_decisions=True)
    for kind in ('patch', 'head', 'block'):
        got = getattr(taken, kind).double()
        where = (got != ref_decisions[kind]).nonzero()[:5].tolist()
        assert torch.equal(got, ref_decisions[kind]), f'{kind} decisions differ at {where}'
    assert (logits.double() - ref_logits).abs().max().item() <= 1e-4


@pytest.mark.parametrize('patch_policy', ['token', 'cls'])
@pytest.mark.parametrize('head_mode', ['full', 'partial'])
@pytest.mark.parametrize('config', ['tiny', 'deit_tiny'])
def test_official_checkpoint_reproduces_reference(config: str, head_mode: str, patch_policy: str,
                                                  executor: str) -> None:
    cfg = Config(**{**CONFIGS[config].__dict__, 'head_mode': head_mode, 'patch_policy': patch_policy})
    state_dict = make_official_state_dict(cfg, seed=0)
    model = _model(cfg, executor, wrap_official_checkpoint(state_dict))
    x = torch.randn(BATCH[config], 3, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(1))
    _, decisions, _ = reference_forward(state_dict, cfg, x)
    # The test only means something if about half of everything is dropped.
    for kind, first in (('patch', 0), ('head', 1), ('block', 1)):
        units = decisions[kind][:, first:, 1:] if kind == 'patch' else decisions[kind][:, first:]
        assert 0.2 < units.mean().item() < 0.8, f'{kind} keep-rate {units.mean().item():.2f}'
    _assert_matches_reference(model, state_dict, cfg, x)


def test_official_checkpoint_file_round_trip(tmp_path, executor: str) -> None:
    """torch.save of an official dict (argparse args, module. prefixes) -> load_checkpoint_file -> convert -> load."""
    cfg = SMALL
    state_dict = make_official_state_dict(cfg, seed=0)
    path = tmp_path / 'ada_step_deit.pth.tar'
    torch.save(wrap_official_checkpoint(state_dict), path)
    loaded = adavit.load_checkpoint_file(str(path))
    assert loaded['args'].keep_layers == 1
    converted = adavit.convert_official_state_dict(loaded)
    # EMA weights preferred over the (perturbed) state_dict; module. stripped; q, k, v fused in that order.
    assert not any(k.startswith('module.') for k in converted)
    torch.testing.assert_close(converted['cls_token'], state_dict['cls_token'], rtol=0, atol=0)
    qkv = converted['blocks.2.attn.qkv.weight']
    for i, name in enumerate(('query', 'key', 'value')):
        assert torch.equal(qkv[i * cfg.dim:(i + 1) * cfg.dim], state_dict[f'blocks.2.attn.{name}.weight'])
        assert torch.equal(converted['blocks.2.attn.qkv.bias'][i * cfg.dim:(i + 1) * cfg.dim],
                           state_dict[f'blocks.2.attn.{name}.bias'])
    assert torch.equal(converted['blocks.2.block_gate.weight'], state_dict['blocks.2.layer_select.mlp_head.weight'])
    assert torch.equal(converted['blocks.0.patch_gate.bias'], state_dict['blocks.0.attn.token_select.mlp_head.bias'])
    model = _model(cfg, executor, converted)
    x = torch.randn(3, 3, cfg.img_size, cfg.img_size, generator=torch.Generator().manual_seed(2))
    _assert_matches_reference(model, state_dict, cfg, x)


def test_bare_official_state_dict_converts_and_is_recognised() -> None:
    state_dict = make_official_state_dict(SMALL, seed=0)
    assert is_official_state_dict(state_dict)
    converted = adavit.convert_official_state_dict(state_dict)
    assert not is_official_state_dict(converted)
    model = adavit.AdaViT(**SMALL.model_kwargs())
    assert sorted(converted) == sorted(model.state_dict())


def test_official_state_dict_without_value_is_rejected() -> None:
    state_dict = make_official_state_dict(SMALL, seed=0)
    del state_dict['blocks.1.attn.value.weight']
    with pytest.raises(adavit.CheckpointError, match=r'blocks\.1\.attn\.value') as info:
        adavit.convert_official_state_dict(state_dict)
    assert '\n' not in str(info.value)
