"""Training configuration: YAML files under ``configs/``, ``--set key=value`` overrides, and validation.

A config is a nested dict with the sections of ``DEFAULTS``. Every key a user writes is checked against them, so a
typo is a one-line ``ConfigError`` that names the key and its close matches instead of a silently ignored setting.
The ``model`` section is the exception: its keys are the model constructor's arguments (``arch`` picks the
constructor), checked against that constructor's signature.
"""
import copy
import difflib
import inspect
import os
from typing import Any, Dict, Iterable, List, Mapping, Optional, Sequence

import yaml

from ..errors import ConfigError
from ..files import write_atomic

DEFAULTS: Dict[str, Any] = {
    'seed': 0,
    'output': 'runs/default',
    # A checkpoint to start from: one of ours, a timm/DeiT file, an official AdaViT file, or a timm model name whose
    # pretrained weights timm downloads.
    'init': None,
    'data': {
        'name': 'fashion-mnist',  # or a folder with train/ and val/ (torchvision ImageFolder layout)
        'dir': None,  # where the Fashion-MNIST IDX files are; None: /usr/share/datasets/fashion-mnist
        'download': True,  # fall back to a torchvision download when the IDX files are not there
        'subset': None,  # train on the first N training images
        'val_subset': None,  # validate on the first N validation images
        'workers': 0,
        'mean': None,  # None: the model's pretrained config (timm.data.resolve_data_config)
        'std': None,
        'interpolation': 'bilinear',
        'crop_pct': 1.0,
        'scale': [0.08, 1.0],  # RandomResizedCrop scale range
        'ratio': [0.75, 1.3333333],
        'hflip': 0.5,
        'color_jitter': 0.0,
        'auto_augment': None,
        're_prob': 0.0,  # random erasing
        'class_names': None,  # filled from the dataset; predict and visualize read it from checkpoints
    },
    'model': {
        'arch': 'adavit',  # 'adavit': AdaViT(**rest); 'vit': timm VisionTransformer(**rest); else timm.create_model
    },
    'train': {
        'epochs': 10,
        'max_steps': None,  # stop after this many optimizer steps (checkpoint saved), e.g. to split a run
        'batch_size': 128,  # per process
        'eval_batch_size': 256,
        'lr': 1e-3,  # for the global batch size (batch_size x world size)
        'min_lr': 1e-5,
        'warmup_lr': 1e-6,
        'warmup_epochs': 1.0,
        'weight_decay': 0.05,
        'gate_lr_scale': 1.0,  # learning-rate multiplier of the decision networks
        'betas': [0.9, 0.999],
        'label_smoothing': 0.1,
        'mixup': 0.0,
        'cutmix': 0.0,
        'mixup_prob': 1.0,
        'clip_grad': 1.0,  # max gradient norm; None or 0: off
        'amp': 'none',  # 'none', 'bf16' (CPU and CUDA) or 'fp16' (CUDA)
        'ema': False,
        'ema_decay': 0.999,
        'compile': False,
        'save_every': None,  # also save last.pt every N optimizer steps
        'eval_every': 1,  # validate every N epochs (and after the last)
        'deterministic': False,  # torch.use_deterministic_algorithms, for bit-exact resume tests
        'threads': None,  # torch.set_num_threads; None: torch's default
        'device': 'auto',  # 'auto', 'cpu', 'cuda'
        'progress': True,  # tqdm bars (rank 0, interactive terminals only)
        'export': None,  # at the end, write the best weights and the model config to this file
        'export_from': 'best',  # 'best' (by validation top-1) or 'last': where validation is the test set, 'last'
                                # keeps the test set out of model selection
    },
    'loss': {
        'budgets': [0.5, 0.5, 0.5],  # patch, head, block target keep-rates
        'weights': [2.0, 2.0, 2.0],
        'form': 'released',  # or 'squared'
        'distill_weight': 0.0,  # > 0: distil from the dense backbone (teacher)
        'distill_temperature': 1.0,
        'teacher': None,  # teacher checkpoint; None: the --init checkpoint
    },
}


def _close(key: str, choices: Iterable[str]) -> str:
    matches = difflib.get_close_matches(key, list(choices), n=3, cutoff=0.5)
    return f' (did you mean {", ".join(matches)}?)' if matches else f' (known: {", ".join(sorted(choices))})'


def model_arguments(arch: str) -> Optional[List[str]]:
    """The keyword arguments the constructor of ``arch`` accepts, or None when it takes any (a timm name)."""
    if arch not in ('adavit', 'vit'):
        return None
    from timm.models.vision_transformer import VisionTransformer
    names = set(inspect.signature(VisionTransformer.__init__).parameters) - {'self', 'args', 'kwargs'}
    if arch == 'adavit':
        from ..model.adavit import AdaViT
        names |= set(inspect.signature(AdaViT.__init__).parameters) - {'self', 'args', 'kwargs'}
    return sorted(names)


def validate(config: Mapping[str, Any]) -> None:
    """Raise a one-line ``ConfigError`` for any key that is not in ``DEFAULTS`` (or not a model argument)."""
    for key, value in config.items():
        if key not in DEFAULTS:
            raise ConfigError(f'unknown config key {key!r}{_close(key, DEFAULTS)}')
        if isinstance(DEFAULTS[key], dict):
            if not isinstance(value, Mapping):
                raise ConfigError(f'config section {key!r} must be a mapping, got {value!r}')
            if key == 'model':
                allowed = model_arguments(str(value.get('arch', 'adavit')))
                if allowed is None:
                    continue
                allowed = allowed + ['arch']
            else:
                allowed = list(DEFAULTS[key])
            for sub in value:
                if sub not in allowed:
                    raise ConfigError(f'unknown config key {key}.{sub}{_close(sub, allowed)}')


def merge(base: Dict[str, Any], update: Mapping[str, Any]) -> Dict[str, Any]:
    """``base`` updated recursively with ``update`` (a new dict; nested dicts merge, anything else replaces)."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_override(item: str) -> Dict[str, Any]:
    """``"train.lr=3e-4"`` -> ``{"train": {"lr": 0.0003}}``; the value is parsed as YAML (numbers, lists, null)."""
    if '=' not in item:
        raise ConfigError(f'override {item!r} is not of the form key=value (e.g. train.lr=3e-4)')
    key, raw = item.split('=', 1)
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    if isinstance(value, str):
        value = _number(value)
    out: Dict[str, Any] = {}
    node = out
    parts = key.strip().split('.')
    if not all(parts):
        raise ConfigError(f'override {item!r} has an empty key part')
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value
    return out


def _number(text: str) -> Any:
    # YAML 1.1 reads "1e-3" as a string (no dot); users mean a number.
    try:
        return float(text) if any(c in text.lower() for c in '.e') else int(text)
    except ValueError:
        return text


def _numbers(node: Any) -> Any:
    if isinstance(node, dict):
        return {k: _numbers(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_numbers(v) for v in node]
    return _number(node) if isinstance(node, str) else node


def read_yaml(path: str) -> Dict[str, Any]:
    """A YAML mapping from ``path``, or a one-line ``ConfigError``."""
    if not os.path.isfile(path):
        raise ConfigError(f'config file {path} does not exist: pass one of the files under configs/')
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as e:
        raise ConfigError(f'config file {path} is not valid YAML: {str(e).splitlines()[0]}') from e
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f'config file {path} must hold a mapping of sections, got {type(data).__name__}')
    return _numbers(data)


def build_config(
        path: Optional[str] = None,
        overrides: Sequence[Mapping[str, Any]] = (),
        base: Optional[Mapping[str, Any]] = None,
) -> Dict[str, Any]:
    """The resolved config: ``DEFAULTS`` <- ``base`` (e.g. a resumed run's) <- the YAML file <- each override.

    Raises:
        ConfigError: A missing or malformed file, or an unknown key (named, with close matches).
    """
    config = copy.deepcopy(DEFAULTS)
    layers: List[Mapping[str, Any]] = []
    if base is not None:
        layers.append(base)
    if path is not None:
        layers.append(read_yaml(path))
    layers.extend(overrides)
    for layer in layers:
        validate(layer)
        if 'model' in layer and 'arch' in layer['model'] and layer['model']['arch'] != config['model'].get('arch'):
            # A different constructor takes different arguments: start its section afresh.
            config['model'] = {}
        config = merge(config, layer)
    validate(config)
    check_values(config)
    return config


def check_values(config: Mapping[str, Any]) -> None:
    """One-line errors for values that would otherwise fail deep inside training."""
    train, loss = config['train'], config['loss']
    if train['amp'] not in ('none', 'bf16', 'fp16', None, False):
        raise ConfigError(f"train.amp must be 'none', 'bf16' or 'fp16', got {train['amp']!r}")
    for key in ('epochs', 'batch_size', 'eval_batch_size'):
        if not isinstance(train[key], int) or train[key] < 1:
            raise ConfigError(f'train.{key} must be a positive integer, got {train[key]!r}')
    for key in ('max_steps', 'save_every'):
        if train[key] is not None and (not isinstance(train[key], int) or train[key] < 1):
            raise ConfigError(f'train.{key} must be a positive integer or null, got {train[key]!r}')
    for key in ('subset', 'val_subset'):
        value = config['data'][key]
        if value is not None and (not isinstance(value, int) or value < 1):
            raise ConfigError(f'data.{key} must be a positive integer or null, got {value!r}')
    for key in ('budgets', 'weights'):
        if not isinstance(loss[key], (list, tuple)) or len(loss[key]) != 3:
            raise ConfigError(f'loss.{key} must be three numbers (patch, head, block), got {loss[key]!r}')
    if loss['form'] not in ('released', 'squared'):
        raise ConfigError(f"loss.form must be 'released' or 'squared', got {loss['form']!r}")


def save_yaml(config: Mapping[str, Any], path: str) -> None:
    """Write ``config`` as YAML, atomically (a half-written config.yaml would break a resume)."""
    write_atomic(path, lambda f: yaml.safe_dump(_plain(config), f, sort_keys=False, default_flow_style=None))


def _plain(node: Any) -> Any:
    if isinstance(node, Mapping):
        return {str(k): _plain(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
        return [_plain(v) for v in node]
    return node
