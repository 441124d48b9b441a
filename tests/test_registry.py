"""timm entrypoints: names, pretrained configs, and pretrained loading from local files (never downloading)."""
import pytest
import timm
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_data_config
from timm.models.vision_transformer import VisionTransformer

import adavit
from adavit.model import gate_keys
from _adavit_reference import DEIT_TINY, make_official_state_dict, reference_forward, wrap_official_checkpoint

SIZES = ('tiny', 'small', 'base')


def test_import_registers_every_name() -> None:
    names = set(timm.list_models('adavit_*')) | set(timm.list_models('ada_step_*'))
    for prefix in ('adavit', 'ada_step'):
        for size in SIZES:
            assert f'{prefix}_deit_{size}_patch16_224' in names
    assert set(timm.list_pretrained('adavit_deit_*')) >= {f'adavit_deit_{s}_patch16_224.fb_in1k' for s in SIZES}


def test_created_model_is_adavit_with_options() -> None:
    model = timm.create_model('ada_step_deit_tiny_patch16_224', head_mode='partial', patch_policy='cls',
                              executor='masked')
    assert isinstance(model, adavit.AdaViT)
    assert (model.embed_dim, len(model.blocks), model.blocks[0].attn.num_heads) == (192, 12, 3)
    assert model.head_mode == 'partial' and model.blocks[0].patch_gate.weight.shape == (196, 192)
    cfg = model.pretrained_cfg
    assert tuple(cfg['mean']) == IMAGENET_DEFAULT_MEAN and tuple(cfg['std']) == IMAGENET_DEFAULT_STD
    data = resolve_data_config(model=model)
    assert data['input_size'] == (3, 224, 224) and data['mean'] == IMAGENET_DEFAULT_MEAN


@pytest.fixture(scope='module')
def deit_file(tmp_path_factory) -> tuple:
    """A randomly initialised timm DeiT-Tiny saved as a bare state dict (what the DeiT release files hold)."""
    torch.manual_seed(1)
    deit = timm.create_model('deit_tiny_patch16_224')
    path = tmp_path_factory.mktemp('weights') / 'deit_tiny.pth'
    torch.save({'model': deit.state_dict()}, path)
    return str(path), deit.state_dict()


@pytest.mark.parametrize('num_classes', [1000, 10])
def test_pretrained_backbone_from_file(deit_file: tuple, num_classes: int) -> None:
    path, saved = deit_file
    torch.manual_seed(5)
    fresh = timm.create_model('adavit_deit_tiny_patch16_224', num_classes=num_classes)
    torch.manual_seed(5)
    model = timm.create_model('adavit_deit_tiny_patch16_224', pretrained=True, num_classes=num_classes,
                              pretrained_cfg_overlay=dict(file=path))
    own = model.state_dict()
    gates = set(gate_keys(model))
    assert len(gates) == 2 * (12 + 11 + 11)
    for key, value in saved.items():
        if key.startswith('head.') and num_classes != 1000:
            continue
        assert torch.equal(own[key], value), key
    for key in gates:  # the decision networks keep their initialisation
        assert torch.equal(own[key], fresh.state_dict()[key]), key
    assert model.head.weight.shape == (num_classes, 192)
    if num_classes != 1000:  # timm dropped the 1000-class head: the new one is the fresh initialisation
        assert torch.equal(model.head.weight, fresh.head.weight)


def test_pretrained_official_checkpoint_from_file(tmp_path) -> None:
    """An official training checkpoint (EMA, module. prefixes, argparse args) loads through timm's pretrained path."""
    state_dict = make_official_state_dict(DEIT_TINY, seed=0)
    path = tmp_path / 'ada_step_deit_tiny.pth.tar'
    torch.save(wrap_official_checkpoint(state_dict), path)
    model = timm.create_model('ada_step_deit_tiny_patch16_224', pretrained=True, executor='masked',
                              pretrained_cfg_overlay=dict(file=str(path))).eval()
    expected = adavit.convert_official_state_dict(state_dict)
    own = model.state_dict()
    assert sorted(own) == sorted(expected)
    for key, value in expected.items():
        assert torch.equal(own[key], value), key
    x = torch.randn(1, 3, 224, 224)
    ref_logits, _, _ = reference_forward(state_dict, DEIT_TINY, x)
    with torch.no_grad():
        assert (model(x).double() - ref_logits).abs().max().item() <= 1e-4


def test_pretrained_file_of_another_architecture_is_one_line_error(tmp_path) -> None:
    path = tmp_path / 'not_a_vit.pth'
    torch.save({'conv.weight': torch.zeros(4, 3, 3, 3)}, path)
    with pytest.raises(adavit.CheckpointError) as info:
        timm.create_model('adavit_deit_tiny_patch16_224', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    assert '\n' not in str(info.value) and 'cls_token' in str(info.value)


def test_pretrained_file_of_another_width_is_one_line_error(tmp_path) -> None:
    torch.manual_seed(0)
    path = tmp_path / 'narrow_vit.pth'
    narrow = VisionTransformer(img_size=224, patch_size=16, embed_dim=96, depth=12, num_heads=3)  # width 96, not 192
    torch.save(narrow.state_dict(), path)
    with pytest.raises(adavit.CheckpointError) as info:
        timm.create_model('adavit_deit_tiny_patch16_224', pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    message = str(info.value)
    assert '\n' not in message and 'shape mismatches' in message and '(96,' in message
