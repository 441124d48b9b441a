"""Bad input reaches the user as one line (an ``adavit.AdaViTError``) that names what is wrong."""
import random
import re

import pytest
import torch

import adavit
from adavit.model import unwrap_state_dict
from _adavit_reference import TINY, make_official_state_dict


class NotAllowed:
    """A class a weights-only load must refuse to unpickle."""

    def __init__(self) -> None:
        self.payload = 1


@pytest.fixture(scope='module')
def model() -> adavit.AdaViT:
    return adavit.AdaViT(**TINY.model_kwargs(), executor='masked').eval()


def _one_line(error: pytest.ExceptionInfo) -> str:
    message = str(error.value)
    assert isinstance(error.value, adavit.AdaViTError)
    assert message and '\n' not in message, message
    return message


def test_wrong_image_size(model: adavit.AdaViT) -> None:
    with pytest.raises(adavit.InputError) as info:
        model(torch.randn(1, 3, 48, 40))
    message = _one_line(info)
    assert '32x32' in message and '48x40' in message


def test_wrong_channel_count(model: adavit.AdaViT) -> None:
    with pytest.raises(adavit.InputError) as info:
        model(torch.randn(1, 1, 32, 32))
    message = _one_line(info)
    assert '3-channel' in message and '1 channels' in message


@pytest.mark.parametrize('bad', [torch.randn(3, 32, 32), torch.randn(1, 1, 3, 32, 32)])
def test_wrong_rank(model: adavit.AdaViT, bad: torch.Tensor) -> None:
    with pytest.raises(adavit.InputError) as info:
        model(bad)
    assert str(tuple(bad.shape)) in _one_line(info)


def test_state_dict_with_missing_and_unexpected_keys(model: adavit.AdaViT) -> None:
    state_dict = dict(model.state_dict())
    del state_dict['blocks.1.head_gate.weight']
    state_dict['blocks.1.surprise.weight'] = torch.zeros(1)
    with pytest.raises(adavit.CheckpointError) as info:
        model.load_state_dict(state_dict)
    message = _one_line(info)
    assert 'missing keys [blocks.1.head_gate.weight]' in message
    assert 'unexpected keys [blocks.1.surprise.weight]' in message


def test_state_dict_with_wrong_shapes(model: adavit.AdaViT) -> None:
    state_dict = dict(model.state_dict())
    state_dict['head.weight'] = torch.zeros(1000, TINY.dim)
    with pytest.raises(adavit.CheckpointError) as info:
        model.load_state_dict(state_dict)
    assert 'head.weight (1000, 24) vs model (7, 24)' in _one_line(info)


def test_many_missing_keys_are_summarised(model: adavit.AdaViT) -> None:
    with pytest.raises(adavit.CheckpointError) as info:
        model.load_state_dict({'cls_token': torch.zeros(1, 1, TINY.dim)})
    assert re.search(r'\.\.\. \d+ more', _one_line(info))


def test_unconverted_official_state_dict_points_to_the_converter(model: adavit.AdaViT) -> None:
    with pytest.raises(adavit.CheckpointError) as info:
        model.load_state_dict(make_official_state_dict(TINY))
    message = _one_line(info)
    assert 'convert_official_state_dict' in message and 'blocks.0.attn.query.weight' in message


@pytest.mark.parametrize('content', [random.Random(0).randbytes(4096), b'not a checkpoint\njust text\n', b''],
                         ids=['random_bytes', 'text', 'empty'])
def test_file_that_is_not_a_checkpoint(tmp_path, content: bytes) -> None:
    path = tmp_path / 'weights.pth'
    path.write_bytes(content)
    with pytest.raises(adavit.CheckpointError) as info:
        adavit.load_checkpoint_file(str(path))
    message = _one_line(info)
    assert str(path) in message and 'not a' in message


def test_missing_file(tmp_path) -> None:
    with pytest.raises(adavit.CheckpointError) as info:
        adavit.load_checkpoint_file(str(tmp_path / 'nowhere.pth'))
    assert 'nowhere.pth does not exist' in _one_line(info)


def test_pickle_with_disallowed_global_is_refused(tmp_path) -> None:
    path = tmp_path / 'foreign.pth'
    torch.save({'state_dict': {'w': torch.zeros(2)}, 'extra': NotAllowed()}, path)
    with pytest.raises(adavit.CheckpointError) as info:
        adavit.load_checkpoint_file(str(path))
    message = _one_line(info)
    assert str(path) in message and 'NotAllowed' in message and 'allowlist' in message


def test_allowed_containers_load(tmp_path) -> None:
    """An OrderedDict state dict (what nn.Module.state_dict returns) and argparse args are fine."""
    model = adavit.AdaViT(**TINY.model_kwargs())
    path = tmp_path / 'ours.pth'
    torch.save({'model': model.state_dict(), 'args': __import__('argparse').Namespace(lr=1.0)}, path)
    state_dict = unwrap_state_dict(adavit.load_checkpoint_file(str(path)))
    model.load_state_dict(state_dict)


@pytest.mark.parametrize('obj, needle', [([1, 2], 'list'), ({'epoch': 3}, 'no tensors')])
def test_unwrap_rejects_non_state_dicts(obj, needle: str) -> None:
    with pytest.raises(adavit.CheckpointError) as info:
        unwrap_state_dict(obj)
    assert needle in _one_line(info)


@pytest.mark.parametrize('kwargs, needle', [
    (dict(head_mode='half'), 'head_mode'),
    (dict(patch_policy='pixel'), 'patch_policy'),
    (dict(policy='oracle'), 'policy'),
    (dict(executor='gpu'), 'executor'),
    (dict(gates=('patch', 'token')), "['token']"),
    (dict(random_keep=(0.5, 0.5)), 'random_keep'),
    (dict(class_token=False, global_pool='avg'), 'class token'),
])
def test_bad_configuration(kwargs: dict, needle: str) -> None:
    with pytest.raises(adavit.ConfigError) as info:
        adavit.AdaViT(**{**TINY.model_kwargs(), **kwargs})
    assert needle in _one_line(info)


def test_bad_threshold(model: adavit.AdaViT) -> None:
    with pytest.raises(adavit.ConfigError) as info:
        model.set_thresholds(patch=1.5)
    assert 'patch threshold' in _one_line(info)
