"""What ``predict`` and ``visualize`` share: a checkpoint loaded for inference, with its class names and the data
config (preprocessing) it was trained with.

The model comes from ``adavit.training.checkpoint.load_model`` (the training package owns the checkpoint format).
Where that is not available, a local reader of the same format is used: ``{'model': state_dict, 'config':
{'model': {'arch': ..., **kwargs}, 'data': {...}, ...}}``.
"""
import os
from dataclasses import dataclass
from typing import Any, Dict, List, Mapping, Optional, Sequence

from torch import nn

from ..errors import CheckpointError, ConfigError
from ..data.datasets import FASHION_MNIST_CLASSES

_FMNIST_NAMES = ('fashion-mnist', 'fashion_mnist', 'fmnist')


@dataclass
class Loaded:
    """A checkpoint ready for inference.

    Attributes:
        model: In eval mode.
        class_names: One per output.
        data_config: timm data config for ``create_transform`` (input_size, interpolation, mean, std, crop_pct).
    """
    model: nn.Module
    class_names: List[str]
    data_config: Dict[str, Any]


def _read_config(path: str) -> Mapping[str, Any]:
    from ..model.checkpoint import load_checkpoint_file

    obj = load_checkpoint_file(path)
    config = obj.get('config') if isinstance(obj, Mapping) else None
    return config if isinstance(config, Mapping) else {}


def _load_model_local(path: str) -> nn.Module:
    """Fallback reader of ``{'model': state_dict, 'config': {'model': {'arch': ..., ...}}}``, eval mode."""
    import timm

    from ..model.adavit import AdaViT
    from ..model.checkpoint import load_checkpoint_file

    obj = load_checkpoint_file(path)
    if not isinstance(obj, Mapping) or not isinstance(obj.get('model'), Mapping) or \
            not isinstance(obj.get('config'), Mapping):
        raise CheckpointError(f'{path} is not an adavit checkpoint (a dict with "model" and "config"): '
                              f'train one with `adavit train`')
    kwargs = dict(obj['config'].get('model') or {})
    arch = kwargs.pop('arch', 'adavit')
    if arch == 'adavit':
        model = AdaViT(**kwargs)
    elif arch == 'vit':
        from timm.models.vision_transformer import VisionTransformer
        model = VisionTransformer(**kwargs)
    else:
        model = timm.create_model(arch, pretrained=False, **kwargs)
    model.load_state_dict(obj['model'])
    return model.eval()


def load_model(path: str) -> nn.Module:
    """The model of checkpoint ``path`` in eval mode (``adavit.training.checkpoint.load_model`` when available)."""
    try:
        from ..training.checkpoint import load_model as training_load_model
    except ImportError:
        training_load_model = _load_model_local
    return training_load_model(os.fspath(path)).eval()


def data_config_for(model: nn.Module, config: Mapping[str, Any]) -> Dict[str, Any]:
    """The eval data config the model was trained with: the checkpoint's ``data`` section when there is one, else the
    model's own (both through ``adavit.data.datasets.data_config``)."""
    from ..data.datasets import data_config
    data = config.get('data')
    return dict(data_config(model, data if isinstance(data, Mapping) else None))


def class_names(model: nn.Module, config: Mapping[str, Any], override: Optional[str] = None) -> List[str]:
    """Class names for the model's outputs, in this order of preference:

    ``override`` (comma-separated names, a text file with one name per line, or ``fashion-mnist``), the checkpoint
    config (``class_names`` at the top or in ``data``), the model's ``pretrained_cfg['label_names']``, the
    Fashion-MNIST names for a 10-class Fashion-MNIST config, else the indices.

    Raises:
        ConfigError: ``override`` names a different number of classes than the model has.
    """
    num_classes = int(getattr(model, 'num_classes', 0))
    if override:
        names: Sequence[str]
        if os.path.isfile(override):
            with open(override, encoding='utf-8') as f:
                names = [line.strip() for line in f if line.strip()]
        elif override.strip().lower() in _FMNIST_NAMES:
            names = FASHION_MNIST_CLASSES
        else:
            names = [n.strip() for n in override.split(',')]
        if len(names) != num_classes:
            raise ConfigError(f'--classes gives {len(names)} names but the model has {num_classes} classes')
        return list(names)
    data = config.get('data') if isinstance(config.get('data'), Mapping) else {}
    for candidate in (config.get('class_names'), data.get('class_names'),
                      (getattr(model, 'pretrained_cfg', None) or {}).get('label_names')):
        if candidate is not None and len(candidate) == num_classes:
            return [str(n) for n in candidate]
    if num_classes == 10 and str(data.get('name', '')).lower() in _FMNIST_NAMES:
        return list(FASHION_MNIST_CLASSES)
    return [str(k) for k in range(num_classes)]


def load_for_inference(path: str, classes: Optional[str] = None) -> Loaded:
    """Model (eval), class names and data config of checkpoint ``path``; ``classes`` overrides the names."""
    path = os.fspath(path)
    model = load_model(path)
    config = _read_config(path)
    return Loaded(model, class_names(model, config, classes), data_config_for(model, config))
