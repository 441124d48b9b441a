"""Images in and out of a model: loading image files and undoing the normalisation for display.

The data config (preprocessing) lives in ``adavit.data.datasets``; ``data_config`` and ``model_input_size`` are
re-exported here for the pictures' callers.
"""
import os
from typing import Any, List, Mapping, Optional, Sequence

import numpy as np
import torch
from torch import nn

from ..data.datasets import FASHION_MNIST_CLASSES, data_config, model_input_size
from ..errors import InputError

__all__ = ['FASHION_MNIST_CLASSES', 'data_config', 'load_images', 'model_input_size', 'unnormalize']


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
