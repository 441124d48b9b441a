"""Training checkpoints: atomic writes, RNG states as tensors, and ``load_model`` for inference.

A checkpoint is a dict of tensors and plain Python values only, so ``torch.load(weights_only=True)`` reads it:

* ``model``: the state dict; ``model_ema``: the EMA weights (or None);
* ``config``: the whole resolved run config; its ``model`` section rebuilds the model (``build_model``), its ``data``
  section the preprocessing (with the class names);
* ``optimizer``, ``scheduler``, ``scaler``;
* ``epoch``, ``batch_in_epoch`` (batches of ``epoch`` already consumed), ``step`` (optimizer steps done);
* ``rng``: one dict of RNG states per rank; ``random_policy``: the random policy's generator state;
* ``init`` (what the run started from) and ``backbone`` (the dense backbone checkpoint, for ``--compare-dense``).
"""
import random
from typing import IO, Any, Dict, List, Mapping, Optional

import numpy as np
import torch
from torch import nn

from ..errors import CheckpointError
from ..files import write_atomic
from ..model.checkpoint import load_checkpoint_file

FORMAT = 'adavit-train-1'


def _serialise(obj: Any, f: IO) -> None:
    """Write ``obj``'s bytes to the open file ``f`` (the one place that writes checkpoint bytes)."""
    torch.save(obj, f)


def save_atomic(obj: Any, path: str) -> None:
    """Write ``obj`` to ``path`` so that ``path`` always holds either the previous file or the new one, complete, and
    synced to disk (``files.write_atomic``): a crash or a kill during the write leaves the previous checkpoint
    untouched."""
    write_atomic(path, lambda f: _serialise(obj, f), binary=True, durable=True)


# --------------------------------------------------------------------------------------------------------------------
# RNG states, as tensors and plain values (no pickled objects)

def capture_rng() -> Dict[str, Any]:
    """This process's Python, NumPy, torch and CUDA RNG states."""
    py_version, py_state, py_gauss = random.getstate()
    np_name, np_keys, np_pos, np_has_gauss, np_gauss = np.random.get_state()
    return {
        'python_version': int(py_version),
        'python': torch.tensor(py_state, dtype=torch.int64),
        'python_gauss': py_gauss,
        'numpy': torch.from_numpy(np.asarray(np_keys, dtype=np.int64)),
        'numpy_pos': int(np_pos),
        'numpy_has_gauss': int(np_has_gauss),
        'numpy_gauss': float(np_gauss),
        'torch': torch.get_rng_state(),
        'cuda': torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng(state: Mapping[str, Any]) -> None:
    """Undo ``capture_rng``."""
    random.setstate((state['python_version'], tuple(int(v) for v in state['python'].tolist()), state['python_gauss']))
    np.random.set_state(('MT19937', state['numpy'].numpy().astype(np.uint32), state['numpy_pos'],
                         state['numpy_has_gauss'], state['numpy_gauss']))
    torch.set_rng_state(state['torch'])
    if state.get('cuda') and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state['cuda'])


def plain_state(state: Mapping[str, Any]) -> Dict[str, Any]:
    """A scheduler's (or scaler's) state dict reduced to what weights-only loading accepts."""
    allowed = (int, float, bool, str, type(None), torch.Tensor)

    def ok(value: Any) -> bool:
        if isinstance(value, (list, tuple)):
            return all(ok(v) for v in value)
        if isinstance(value, dict):
            return all(isinstance(k, str) and ok(v) for k, v in value.items())
        return isinstance(value, allowed)

    return {k: v for k, v in state.items() if ok(v)}


# --------------------------------------------------------------------------------------------------------------------
# Reading

def read_checkpoint(path: str) -> Dict[str, Any]:
    """One of our checkpoints, loaded weights-only; a one-line ``CheckpointError`` for anything else."""
    obj = load_checkpoint_file(path)
    if not isinstance(obj, dict) or 'config' not in obj or 'model' not in obj:
        raise CheckpointError(f'{path} is not an adavit training checkpoint (it lacks the model config); timm, DeiT '
                              f'and official AdaViT files are for --init')
    return obj


def is_training_checkpoint(obj: Any) -> bool:
    return isinstance(obj, dict) and isinstance(obj.get('config'), dict) and isinstance(obj.get('model'), dict)


def load_model(path: str, ema: Optional[bool] = None, device: Any = 'cpu') -> nn.Module:
    """The model saved in one of our checkpoints, rebuilt from its ``config`` entry, in eval mode.

    Args:
        path: A ``last.pt``, ``best.pt`` or exported checkpoint.
        ema: Load the EMA weights (``True``), the raw ones (``False``), or the EMA weights when present (``None``).
        device: Where to put the model.

    Raises:
        CheckpointError: Not one of our checkpoints, or its weights do not fit its config.
    """
    from .builder import build_model, load_strict, model_section
    checkpoint = read_checkpoint(path)
    model = build_model(model_section(checkpoint['config']))
    use_ema = checkpoint.get('model_ema') is not None if ema is None else ema
    if use_ema and checkpoint.get('model_ema') is None:
        raise CheckpointError(f'{path} holds no EMA weights (the run had train.ema off)')
    load_strict(model, checkpoint['model_ema' if use_ema else 'model'], path)
    attach_data_config(model, checkpoint['config'])
    return model.to(device).eval()


def attach_data_config(model: nn.Module, config: Mapping[str, Any]) -> Dict[str, Any]:
    """Record on ``model`` the preprocessing it was trained with, the way timm models carry theirs.

    ``model.pretrained_cfg`` (and its alias ``default_cfg``) get the input size, interpolation, mean, std and crop of
    the run's ``data`` section, so that ``timm.data.resolve_data_config({}, model=model)`` (and any timm-based
    pipeline) preprocesses images as in training instead of falling back to ImageNet's 3x224x224. Class names and
    the class count come along when the config has them.

    Returns:
        The data config attached.
    """
    from ..data.datasets import data_config
    data = config.get('data') if isinstance(config.get('data'), Mapping) else None
    cfg = data_config(model, data)
    pretrained = dict(getattr(model, 'pretrained_cfg', None) or {})
    pretrained.update({k: cfg[k] for k in ('input_size', 'interpolation', 'mean', 'std', 'crop_pct', 'crop_mode')
                       if k in cfg})
    pretrained['num_classes'] = int(getattr(model, 'num_classes', 0) or 0)
    names = (data or {}).get('class_names')
    if names is not None and len(names) == pretrained['num_classes']:
        pretrained['label_names'] = [str(n) for n in names]
    model.pretrained_cfg = pretrained
    model.default_cfg = pretrained  # the older timm name of the same thing; one dict, so they cannot disagree
    return cfg


def weights_hash(model: nn.Module) -> str:
    """SHA-256 of a model's state dict (names, dtypes, shapes and bytes), to compare weights across ranks/runs."""
    import hashlib
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().cpu().contiguous()
        digest.update(f'{name}:{t.dtype}:{tuple(t.shape)}'.encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b'')
    return digest.hexdigest()


def list_ranks(states: List[Mapping[str, Any]], rank: int) -> Optional[Mapping[str, Any]]:
    """Rank ``rank``'s RNG state, or None when the checkpoint came from a smaller world."""
    return states[rank] if rank < len(states) else None
