"""Images in and out of a model: its data config, loading image files, and undoing the normalisation for display."""
import os
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from torch import nn

from ..errors import InputError

FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                         'Ankle boot')


def model_input_size(model: nn.Module) -> Tuple[int, int, int]:
    """(C, H, W) that the model's patch embedding takes."""
    pe = model.patch_embed
    h, w = pe.img_size
    return int(pe.proj.in_channels), int(h), int(w)


def data_config(model: nn.Module) -> Dict[str, Any]:
    """timm's eval data config for ``model``, made consistent with what the model actually takes.

    ``timm.data.resolve_data_config({}, model=model)`` falls back to ImageNet (3x224x224, ImageNet mean/std) when the
    model has no ``pretrained_cfg`` (built directly, not via ``timm.create_model``). The input size is therefore
    always taken from the patch embedding, and mean/std are reconciled with the channel count.

    Returns:
        A dict for ``timm.data.create_transform(**cfg)``: input_size, interpolation, mean, std, crop_pct, crop_mode.
    """
    from timm.data import resolve_data_config

    input_size = model_input_size(model)
    pretrained = dict(getattr(model, 'pretrained_cfg', None) or {})
    cfg = resolve_data_config({'input_size': input_size}, model=model)
    in_chans = input_size[0]
    for key in ('mean', 'std'):
        value = tuple(float(v) for v in cfg[key])
        if len(value) != in_chans:
            # A 1-channel model under a 3-channel (ImageNet) default: its single statistic is the channel average.
            value = (float(np.mean(value)),) * in_chans if len(value) != 1 else value * in_chans
        cfg[key] = value
    if tuple(pretrained.get('input_size') or ()) != input_size:
        # Nothing tells how the model was trained to crop at this size: do not crop away image content.
        cfg['crop_pct'] = 1.0
    return cfg


def load_images(paths: Sequence[str], model: nn.Module, config: Optional[Mapping[str, Any]] = None) -> torch.Tensor:
    """Read image files and preprocess them as the model expects (timm's eval transform of the data config).

    Args:
        paths: Image files (anything PIL reads).
        model: The model; its channel count decides grayscale or RGB conversion.
        config: The timm data config to use (input_size, interpolation, mean, std, crop_pct, ...), e.g. the one the
            model was trained with; default ``data_config(model)``.

    Returns:
        (B, C, H, W) normalised float tensor.

    Raises:
        InputError: A path is missing, not a file, or not an image PIL can read (one line, naming the file).
    """
    from PIL import Image, UnidentifiedImageError
    from timm.data import create_transform

    if not paths:
        raise InputError('no images given: pass one or more image files')
    cfg = dict(config) if config is not None else data_config(model)
    transform = create_transform(**cfg)
    mode = 'L' if cfg['input_size'][0] == 1 else 'RGB'
    if cfg['input_size'][0] not in (1, 3):
        raise InputError(f'cannot load image files for a {cfg["input_size"][0]}-channel model: only 1 or 3 channels')
    tensors: List[torch.Tensor] = []
    for path in paths:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise InputError(f'image {path} does not exist or is not a file: check the path')
        try:
            with Image.open(path) as img:
                img = img.convert(mode)  # also forces the (lazy) decode inside the try
        except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as e:
            reason = str(e).strip().splitlines()[0][:120] if str(e).strip() else type(e).__name__
            raise InputError(f'cannot read image {path}: {reason} (is it an image file PIL can open?)') from e
        tensors.append(transform(img))
    return torch.stack(tensors)


def unnormalize(images: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """Undo ``Normalize(mean, std)`` for display.

    Args:
        images: (B, C, H, W) normalised images.
        mean: Per-channel mean (length C or 1).
        std: Per-channel standard deviation (length C or 1).

    Returns:
        (B, H, W, C) float array in [0, 1].
    """
    x = images.detach().float().cpu()
    m = torch.as_tensor(mean, dtype=x.dtype).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=x.dtype).view(1, -1, 1, 1)
    return (x * s + m).clamp(0.0, 1.0).permute(0, 2, 3, 1).numpy()
