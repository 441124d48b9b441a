"""Building models from the ``model`` config section, and starting them from a backbone (``--init``).

``arch: adavit`` builds ``AdaViT(**rest)`` (``gates: []`` makes it a dense ViT), ``arch: vit`` a plain timm
``VisionTransformer(**rest)``, and any other name ``timm.create_model(name, **rest)``.

``--init`` accepts one of our checkpoints, a local timm/DeiT file, an official AdaViT file, or a timm model name (its
pretrained weights are downloaded by timm, adapted to the model's image size, channels and classes).
"""
import os
from dataclasses import dataclass
from typing import Any, Dict, Mapping, Optional

import torch
from torch import nn

from ..errors import CheckpointError, ConfigError
from ..model.adavit import AdaViT, check_state_dict_matches
from ..model.checkpoint import checkpoint_filter_fn, load_checkpoint_file, unwrap_state_dict
from .checkpoint import is_training_checkpoint

GATE_MARKERS = ('.patch_gate.', '.head_gate.', '.block_gate.')
# What must agree between an init checkpoint of ours and the model it starts (anything else fails on shapes).
_ARCH_KEYS = ('num_classes', 'img_size', 'in_chans', 'patch_size', 'embed_dim', 'depth', 'num_heads')


def build_model(model_cfg: Mapping[str, Any]) -> nn.Module:
    """The model a ``model`` config section describes (randomly initialised).

    Raises:
        ConfigError: An unknown architecture or a bad argument, as one line.
    """
    cfg = dict(model_cfg)
    arch = cfg.pop('arch', 'adavit')
    try:
        if arch == 'adavit':
            return AdaViT(**cfg)
        if arch == 'vit':
            from timm.models.vision_transformer import VisionTransformer
            return VisionTransformer(**cfg)
        import timm
        if not timm.is_model(arch):
            raise ConfigError(f'unknown model.arch {arch!r}: use adavit, vit or a timm model name')
        return timm.create_model(arch, pretrained=False, **cfg)
    except (TypeError, AssertionError, ValueError) as e:
        if isinstance(e, ConfigError):
            raise
        detail = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ConfigError(f'model config does not fit {arch}: {detail}') from e


def model_section(config: Mapping[str, Any]) -> Mapping[str, Any]:
    """The ``model`` section of a checkpoint's ``config`` entry (the whole resolved run config)."""
    section = config.get('model')
    return section if isinstance(section, Mapping) else config


def is_gated(model: nn.Module) -> bool:
    """True for an AdaViT with at least one decision network."""
    return isinstance(model, AdaViT) and any(k for k in model.state_dict() if any(g in k for g in GATE_MARKERS))


def load_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load every key or fail with one line that names the mismatch and the file."""
    try:
        check_state_dict_matches(model, dict(state_dict))
    except CheckpointError as e:
        raise CheckpointError(f'{source}: {e}') from e
    nn.Module.load_state_dict(model, dict(state_dict), strict=True)


def arch_summary(model_cfg: Mapping[str, Any]) -> Dict[str, Any]:
    return {k: model_cfg.get(k) for k in _ARCH_KEYS if k in model_cfg}


def _same(a: Any, b: Any) -> bool:
    def norm(v: Any) -> Any:
        return tuple(v) if isinstance(v, (list, tuple)) else (v, v) if isinstance(v, int) and not isinstance(v, bool) \
            else v
    return norm(a) == norm(b) or a == b


def check_compatible(init_cfg: Mapping[str, Any], model_cfg: Mapping[str, Any], source: str) -> None:
    """A one-line error when a checkpoint of ours was made for other classes, image size or shape."""
    mine, theirs = arch_summary(model_cfg), arch_summary(init_cfg)
    diffs = [f'{k}={theirs[k]} (model: {mine[k]})' for k in _ARCH_KEYS
             if k in mine and k in theirs and not _same(mine[k], theirs[k])]
    if diffs:
        raise CheckpointError(f'{source} was trained with ' + ', '.join(diffs) + ': use a checkpoint made for this '
                              'model, or change the model config to match it')


@dataclass
class InitInfo:
    """What ``initialize`` loaded."""
    source: Optional[str]  # the --init value
    backbone: Optional[str]  # absolute path of a dense backbone checkpoint, for --compare-dense and distillation
    head_reset: bool  # the classifier was left at its initialisation (class count differed)
    backbone_config: Optional[Dict[str, Any]] = None  # the model config of our own init checkpoint, if any


def _looks_like_path(value: str) -> bool:
    return os.sep in value or value.endswith(('.pt', '.pth', '.pth.tar', '.bin', '.safetensors', '.ckpt'))


def initialize(model: nn.Module, model_cfg: Mapping[str, Any], init: str) -> InitInfo:
    """Load backbone (and, where present, decision-network) weights from ``init`` into ``model``.

    Decision networks the source lacks keep their initialisation; every backbone weight must be there.

    Raises:
        CheckpointError: ``init`` does not exist, is unreadable, or was made for another architecture.
        ConfigError: ``init`` is neither a file nor a timm model name.
    """
    if os.path.isfile(init):
        obj = load_checkpoint_file(init)
        if is_training_checkpoint(obj):
            check_compatible(model_section(obj['config']), model_cfg, init)
            state_dict = dict(obj['model_ema'] if obj.get('model_ema') is not None else obj['model'])
            source_gated = any(g in k for k in state_dict for g in GATE_MARKERS)
            backbone = obj.get('backbone') if source_gated else os.path.abspath(init)
            _load_backbone(model, state_dict, init)
            return InitInfo(init, backbone, False, dict(model_section(obj['config'])))
        state_dict = unwrap_state_dict(obj)
        source_gated = any(g in k or '_select.' in k for k in state_dict for g in GATE_MARKERS)
        state_dict = checkpoint_filter_fn(state_dict, model) if isinstance(model, AdaViT) else state_dict
        head_reset = _load_backbone(model, state_dict, init, allow_head_reset=True)
        return InitInfo(init, None if source_gated else os.path.abspath(init), head_reset)
    if _looks_like_path(init):
        raise CheckpointError(f'--init {init} does not exist: pass a checkpoint file or a timm model name')
    import timm
    if not timm.is_model(init):
        raise ConfigError(f'--init {init!r} is neither a file nor a timm model name (see timm.list_models())')
    in_chans = model.patch_embed.proj.in_channels
    try:
        source = timm.create_model(init, pretrained=True, num_classes=model.num_classes, in_chans=in_chans,
                                   img_size=tuple(model.patch_embed.img_size))
    except Exception as e:  # noqa: download and adaptation errors all mean the same thing here
        raise CheckpointError(f'could not get pretrained weights of {init} from timm ({type(e).__name__}: '
                              f'{str(e).splitlines()[0][:160] if str(e) else ""})') from e
    state_dict = {k: v for k, v in source.state_dict().items() if not any(g in k for g in GATE_MARKERS)}
    pretrained_classes = (getattr(source, 'pretrained_cfg', None) or {}).get('num_classes')
    _load_backbone(model, state_dict, init, allow_head_reset=True)
    return InitInfo(init, None, pretrained_classes != model.num_classes)


def _load_backbone(model: nn.Module, state_dict: Dict[str, torch.Tensor], source: str,
                   allow_head_reset: bool = False) -> bool:
    own = model.state_dict()
    # Decision networks the model does not have (e.g. a gated checkpoint into a dense model) are dropped, and those
    # the source lacks keep their initialisation.
    state_dict = {k: v for k, v in state_dict.items() if not (any(g in k for g in GATE_MARKERS) and k not in own)}
    head_reset = False
    head_keys = [k for k in own if k.startswith('head.')]
    if allow_head_reset and any(k in state_dict and state_dict[k].shape != own[k].shape for k in head_keys):
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith('head.')}
        head_reset = True
    filled = dict(state_dict)
    for k, v in own.items():
        if k not in filled and (any(g in k for g in GATE_MARKERS) or (head_reset and k.startswith('head.'))):
            filled[k] = v
    if allow_head_reset and not head_reset:
        for k in head_keys:  # a source without a classifier (a feature extractor)
            if k not in filled:
                filled[k], head_reset = own[k], True
    load_strict(model, filled, source)
    return head_reset


def load_dense(source: str, model_cfg: Optional[Mapping[str, Any]], check: bool = True) -> nn.Module:
    """The dense backbone in ``source``, in eval mode: one of our checkpoints as saved, or a backbone file loaded into
    ``model_cfg``'s architecture without decision networks.

    Args:
        source: Checkpoint path.
        model_cfg: The model section the dense model must fit (None: only our own checkpoints are accepted).
        check: Check that one of our checkpoints has ``model_cfg``'s architecture.

    Raises:
        CheckpointError: The file is not a usable backbone (missing, foreign, or no classifier for these classes).
    """
    from .checkpoint import load_model
    obj = load_checkpoint_file(source)
    if is_training_checkpoint(obj):
        if check and model_cfg is not None:
            check_compatible(model_section(obj['config']), model_cfg, source)
        return load_model(source)
    if model_cfg is None:
        raise CheckpointError(f'{source} is not an adavit checkpoint and there is no model config to build it with')
    dense_cfg = dict(model_cfg)
    if dense_cfg.get('arch', 'adavit') == 'adavit':
        dense_cfg['gates'] = []
    model = build_model(dense_cfg)
    if initialize(model, dense_cfg, source).head_reset:
        raise CheckpointError(f'{source} has no classifier for {dense_cfg.get("num_classes")} classes: it is not a '
                              f'backbone trained on this data')
    return model.eval()


def build_teacher(model_cfg: Mapping[str, Any], source: str, device: torch.device) -> nn.Module:
    """The frozen dense teacher for distillation: ``source`` (our checkpoint or a backbone file), in eval mode."""
    if not os.path.isfile(source):
        raise CheckpointError(f'distillation teacher {source} does not exist: pass loss.teacher=CHECKPOINT')
    teacher = load_dense(source, model_cfg)
    for p in teacher.parameters():
        p.requires_grad_(False)
    return teacher.to(device).eval()
