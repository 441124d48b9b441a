"""Fixtures of the visualization and predict tests: a tiny Fashion-MNIST AdaViT and real images read from IDX."""
import gzip
import os
from typing import Tuple

import numpy as np
import torch

FMNIST_DIR = '/usr/share/datasets/fashion-mnist'
MEAN, STD = 0.2860, 0.3530


def read_idx(path: str, count: int) -> np.ndarray:
    """The first ``count`` items of a gzipped IDX file (big-endian header: magic, then one uint32 per dimension)."""
    with gzip.open(path, 'rb') as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim)]
    return np.frombuffer(data, np.uint8, offset=4 + 4 * ndim).reshape(dims)[:count].copy()


def fmnist(count: int) -> Tuple[np.ndarray, np.ndarray]:
    """(images (count, 28, 28) uint8, labels (count,) int64) from the Fashion-MNIST test split."""
    images = read_idx(os.path.join(FMNIST_DIR, 't10k-images-idx3-ubyte.gz'), count)
    labels = read_idx(os.path.join(FMNIST_DIR, 't10k-labels-idx1-ubyte.gz'), count).astype(np.int64)
    return images, labels


def normalise(images: np.ndarray) -> torch.Tensor:
    """uint8 (B, 28, 28) -> normalised (B, 1, 28, 28), as the eval transform would produce."""
    return (torch.from_numpy(images).float()[:, None] / 255.0 - MEAN) / STD


MODEL_KWARGS = dict(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=3, num_heads=2, num_classes=10,
                    patch_threshold=0.5)


def tiny_model(**overrides) -> torch.nn.Module:
    """A tiny AdaViT; threshold 0.5 on the patch gate keeps about half the patches at initialisation (0.6, the
    default, keeps almost none), so that overlays and keep-rates show both kinds."""
    from adavit import AdaViT

    torch.manual_seed(0)
    model = AdaViT(**{**MODEL_KWARGS, **overrides}).eval()
    model.pretrained_cfg = dict(input_size=(1, 28, 28), mean=(MEAN,), std=(STD,), crop_pct=1.0,
                                interpolation='bilinear')
    return model


def save_checkpoint(model: torch.nn.Module, path: str, **config) -> str:
    """Our checkpoint format: ``{'model': state_dict, 'config': {'model': {'arch': 'adavit', ...}, 'data': ...}}``."""
    cfg = {'model': dict(arch='adavit', **MODEL_KWARGS),
           'data': {'name': 'fashion-mnist', 'mean': [MEAN], 'std': [STD], 'crop_pct': 1.0,
                    'interpolation': 'bilinear'}}
    cfg.update(config)
    torch.save({'model': model.state_dict(), 'config': cfg}, path)
    return path


def save_pngs(images: np.ndarray, directory: str) -> list:
    """Write uint8 (B, H, W) images as grayscale PNG files; returns their paths."""
    from PIL import Image

    paths = []
    for i, img in enumerate(images):
        path = os.path.join(directory, f'fmnist_{i}.png')
        Image.fromarray(img, mode='L').save(path)
        paths.append(path)
    return paths
