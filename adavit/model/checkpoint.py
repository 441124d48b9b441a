"""Reading checkpoints: the official AdaViT format, timm/DeiT backbones, and files loaded without unpickling code.

Official AdaViT checkpoints keep ``query``, ``key`` and ``value`` as three Linear layers and name the decision networks
``attn.token_select``, ``head_select`` and ``layer_select``; ours follow timm (a fused ``qkv``) and name them
``patch_gate``, ``head_gate`` and ``block_gate``.
"""
import argparse
import os
import pickle
import re
from typing import Any, Dict, Mapping

import torch
from timm.models.vision_transformer import checkpoint_filter_fn as timm_vit_filter_fn

from ..errors import CheckpointError

_GATE_RENAMES = (
    (re.compile(r'^blocks\.(\d+)\.attn\.token_select\.mlp_head\.'), r'blocks.\1.patch_gate.'),
    (re.compile(r'^blocks\.(\d+)\.head_select\.mlp_head\.'), r'blocks.\1.head_gate.'),
    (re.compile(r'^blocks\.(\d+)\.layer_select\.mlp_head\.'), r'blocks.\1.block_gate.'),
)
_QKV = re.compile(r'^(blocks\.\d+\.attn)\.(query|key|value)\.(weight|bias)$')
_REFUSED_GLOBAL = re.compile(r'Unsupported global: GLOBAL ([\w.]+)')

# What official checkpoints hold besides tensors: their training arguments. Nothing else is unpickled.
SAFE_CHECKPOINT_GLOBALS = [argparse.Namespace]


def load_checkpoint_file(path: str) -> Any:
    """``torch.load`` a checkpoint with weights-only unpickling, allowing only ``SAFE_CHECKPOINT_GLOBALS``.

    Raises:
        CheckpointError: The file is missing, not a PyTorch checkpoint, or holds objects outside the allowlist.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path} does not exist: check the path')
    try:
        with torch.serialization.safe_globals(SAFE_CHECKPOINT_GLOBALS):
            return torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as e:
        # torch wraps every failure of its weights-only unpickler in one long multi-line message; only a refused
        # global means a real checkpoint with foreign objects, anything else (e.g. "Unsupported operand") is garbage.
        refused = _REFUSED_GLOBAL.search(str(e))
        if refused:
            raise CheckpointError(f'{path} holds a Python object of type {refused.group(1)}, which is not on the '
                                  f'weights-only allowlist, so it was not unpickled; load it only if you trust it and '
                                  f're-save its state dict with torch.save') from e
        raise CheckpointError(f'{path} is not a PyTorch checkpoint (the weights-only unpickler rejected it)') from e
    except Exception as e:  # noqa: BLE001  garbage input makes the unpickler raise KeyError, IndexError, EOFError ...
        detail = str(e).strip().splitlines()[0][:160] if str(e).strip() else ''
        raise CheckpointError(f'{path} is not a readable PyTorch checkpoint (corrupt, truncated or another format?): '
                              f'{type(e).__name__} {detail}'.rstrip()) from e


def unwrap_state_dict(obj: Any) -> Dict[str, torch.Tensor]:
    """The state dict inside a checkpoint: ``state_dict_ema``, then ``state_dict``, ``model``, or the dict itself.

    A ``module.`` prefix (DataParallel/DDP) is stripped.
    """
    if not isinstance(obj, Mapping):
        raise CheckpointError(f'expected a checkpoint dict or a state dict, got {type(obj).__name__}')
    for key in ('state_dict_ema', 'state_dict', 'model_ema', 'model'):
        if isinstance(obj.get(key), Mapping):
            obj = obj[key]
            break
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise CheckpointError('the checkpoint holds no tensors: it is not a model state dict')
    return {k[len('module.'):] if k.startswith('module.') else k: v for k, v in tensors.items()}


def is_official_state_dict(state_dict: Mapping[str, Any]) -> bool:
    """True for the official AdaViT layout (separate query/key/value, ``*_select`` decision networks)."""
    return any(_QKV.match(k) or '_select.mlp_head.' in k for k in state_dict)


def convert_official_state_dict(obj: Any) -> Dict[str, torch.Tensor]:
    """Convert an official AdaViT checkpoint (or bare state dict) to the state dict ``AdaViT`` loads strictly.

    Prefers ``state_dict_ema`` over ``state_dict``, strips ``module.``, fuses ``query``/``key``/``value`` into
    timm's ``qkv`` (concatenated along the output dimension, in that order), and renames the decision networks.

    Args:
        obj: The object ``torch.load`` returned for an official file, or its state dict.

    Returns:
        A state dict in adavit's layout.
    """
    state_dict = unwrap_state_dict(obj)
    out: Dict[str, torch.Tensor] = {}
    qkv_parts: Dict[str, Dict[str, torch.Tensor]] = {}
    for key, value in state_dict.items():
        m = _QKV.match(key)
        if m:
            qkv_parts.setdefault(f'{m.group(1)}.qkv.{m.group(3)}', {})[m.group(2)] = value
            continue
        for pattern, replacement in _GATE_RENAMES:
            key = pattern.sub(replacement, key)
        out[key] = value
    for key, parts in qkv_parts.items():
        absent = [p for p in ('query', 'key', 'value') if p not in parts]
        if absent:
            raise CheckpointError(f'official checkpoint lacks {key.rsplit(".", 2)[0]}.{absent[0]} for {key}')
        out[key] = torch.cat([parts['query'], parts['key'], parts['value']], dim=0)
    return out


def checkpoint_filter_fn(state_dict: Dict[str, torch.Tensor], model: torch.nn.Module) -> Dict[str, torch.Tensor]:
    """timm's ``pretrained_filter_fn`` for AdaViT: accepts timm/DeiT backbones and official AdaViT checkpoints.

    Official layouts are converted, then timm's ViT filter adapts the rest (position embedding size, patch embedding,
    DeiT layer scale). Decision networks a backbone lacks stay as initialised; timm reports them as the expected
    missing keys. Any other missing key is an error, since timm loads AdaViT weights non-strictly.
    """
    state_dict = unwrap_state_dict(state_dict)
    if is_official_state_dict(state_dict):
        state_dict = convert_official_state_dict(state_dict)
    state_dict = timm_vit_filter_fn(state_dict, model, adapt_layer_scale=True)
    gates = ('.patch_gate.', '.head_gate.', '.block_gate.')
    missing = [k for k in model.state_dict() if k not in state_dict and not any(g in k for g in gates)
               and not k.startswith(('head.', 'fc_norm.'))]  # timm drops the classifier when num_classes differs
    if missing:
        raise CheckpointError(f'pretrained weights lack backbone keys {missing[:8]}: this file is not a checkpoint '
                              f'of this architecture')
    # A checkpoint of another width or depth would otherwise fail in load_state_dict with one line per tensor. The
    # classifier is exempt where timm discards it (model and pretrained config disagree on the class count).
    own = model.state_dict()
    head_dropped = getattr(model, 'pretrained_cfg', {}).get('num_classes') != getattr(model, 'num_classes', None)
    mis_shaped = [f'{k} {tuple(v.shape)} vs model {tuple(own[k].shape)}' for k, v in state_dict.items()
                  if k in own and v.shape != own[k].shape and not (head_dropped and k.startswith('head.'))]
    if mis_shaped:
        raise CheckpointError(f'pretrained weights do not fit this architecture ({len(mis_shaped)} shape mismatches, '
                              f'e.g. {", ".join(mis_shaped[:3])}): pick the model that matches the file')
    return state_dict
