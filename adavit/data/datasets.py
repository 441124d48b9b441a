"""Datasets for training and evaluation: Fashion-MNIST (IDX files) and any ``ImageFolder`` with train/ and val/.

Transforms come from timm (``resolve_data_config`` + ``create_transform``) with the channel count and image size of
the model, so one code path serves a 28x28 grey-scale toy and ImageNet-sized RGB data.

Augmentation is made a function of (seed, epoch, sample index) by ``SeededTransform``, so a run resumed in the middle
of an epoch sees exactly the images the uninterrupted run saw, whatever the number of loader workers.
"""
import functools
import gzip
import os
import random
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset, Subset

from ..errors import ConfigError, InputError

FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat', 'Sandal', 'Shirt', 'Sneaker', 'Bag',
                         'Ankle boot')
FASHION_MNIST_MEAN = (0.2860,)
FASHION_MNIST_STD = (0.3530,)
_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'val': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
_INSTALL_HINT = 'install them with `apt-get install dataset-fashion-mnist` or pass --data-dir DIR'


def read_idx(path: str) -> np.ndarray:
    """Read an IDX file (optionally gzipped), the format of the MNIST family."""
    opener = gzip.open if path.endswith('.gz') else open
    try:
        with opener(path, 'rb') as f:
            data = f.read()
    except (OSError, EOFError) as e:
        raise InputError(f'cannot read {path} ({e}): the file is corrupt; {_INSTALL_HINT}') from e
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] != 0x08:
        raise InputError(f'{path} is not an unsigned-byte IDX file; {_INSTALL_HINT}')
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i:8 + 4 * i], 'big') for i in range(ndim))
    array = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim)
    if array.size != int(np.prod(shape)):
        raise InputError(f'{path} is truncated: {array.size} values for shape {shape}; {_INSTALL_HINT}')
    return array.reshape(shape)


def _find(directory: str, stem: str) -> Optional[str]:
    for name in (stem + '.gz', stem, stem.replace('-idx', '.idx') + '.gz', stem.replace('-idx', '.idx')):
        path = os.path.join(directory, name)
        if os.path.isfile(path):
            return path
    raw = os.path.join(directory, 'FashionMNIST', 'raw')  # torchvision's download layout
    if os.path.isdir(raw) and raw != directory:
        return _find(raw, stem)
    return None


class FashionMNIST(Dataset):
    """Fashion-MNIST from its IDX files; items are ``(PIL grey image, label)`` before the transform.

    Args:
        directory: Folder holding the four IDX files (gzipped or not).
        split: ``"train"`` (60k images) or ``"val"`` (the 10k test images).
        transform: Applied to each PIL image.
    """

    classes = FASHION_MNIST_CLASSES

    def __init__(self, directory: str, split: str, transform: Optional[Callable] = None) -> None:
        images, labels = (_find(directory, stem) for stem in _FILES[split])
        if images is None or labels is None:
            raise InputError(f'Fashion-MNIST files are not in {directory}; {_INSTALL_HINT}')
        self.images = read_idx(images)
        self.targets = read_idx(labels).astype(np.int64)
        if len(self.images) != len(self.targets):
            raise InputError(f'{images} and {labels} disagree on the number of images; {_INSTALL_HINT}')
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        image = Image.fromarray(self.images[index], mode='L')
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])


def fashion_mnist_dir(directory: Optional[str], download: bool) -> str:
    """The folder with the Fashion-MNIST IDX files: ``directory``, the Debian package's, or a torchvision download."""
    candidates = [directory] if directory else [FASHION_MNIST_DIR]
    for candidate in candidates:
        if candidate and _find(candidate, _FILES['train'][0]) and _find(candidate, _FILES['val'][0]):
            return candidate
    where = directory or FASHION_MNIST_DIR
    if download:
        root = directory or os.path.join(os.path.expanduser('~'), '.cache', 'adavit', 'fashion-mnist')
        try:
            from torchvision.datasets import FashionMNIST as TorchvisionFashionMNIST
            for train in (True, False):
                TorchvisionFashionMNIST(root, train=train, download=True)
        except Exception as e:  # noqa: any failure (offline, permissions) ends in the same advice
            raise InputError(f'Fashion-MNIST files are not in {where} and the download failed '
                             f'({type(e).__name__}); {_INSTALL_HINT}') from e
        return os.path.join(root, 'FashionMNIST', 'raw')
    raise InputError(f'Fashion-MNIST files are not in {where}; {_INSTALL_HINT}')


def image_folder(root: str, split: str, in_chans: int, transform: Optional[Callable]) -> Dataset:
    """A torchvision ``ImageFolder`` on ``root/split``, its images converted to the model's channel count."""
    from torchvision.datasets import ImageFolder
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise InputError(f'dataset folder {root} has no {split}/ folder: expected {root}/train/<class>/<image> and '
                         f'{root}/val/<class>/<image>')
    mode = 'L' if in_chans == 1 else 'RGB'
    try:
        return ImageFolder(path, transform=transform, loader=functools.partial(_open_image, mode=mode))
    except (FileNotFoundError, OSError) as e:
        raise InputError(f'{path} holds no images in class folders ({str(e).splitlines()[0][:120]})') from e


def _open_image(path: str, mode: str) -> Image.Image:
    with open(path, 'rb') as f:
        return Image.open(f).convert(mode)


def data_config(
        model: torch.nn.Module,
        data_cfg: Optional[Mapping[str, Any]] = None,
        dataset_name: Optional[str] = None,
) -> Dict[str, Any]:
    """timm's eval data config for ``model`` (input size, interpolation, mean, std, crop), made consistent with what
    the model actually takes. The one place preprocessing is decided: training, evaluation, ``predict``,
    ``visualize`` and ``load_model`` all go through it.

    The input size always comes from the patch embedding: ``timm.data.resolve_data_config({}, model=model)`` falls
    back to ImageNet (3x224x224, ImageNet mean/std) for a model built directly (no ``pretrained_cfg``). Mean and std
    are reconciled with the channel count.

    Args:
        model: A timm ViT-like model (it has ``patch_embed``).
        data_cfg: A run's ``data`` config section: its ``interpolation`` (default bilinear), ``crop_pct`` (default 1)
            and ``mean``/``std`` (default: Fashion-MNIST's for Fashion-MNIST, else the model's) decide. None: the
            model's own ``pretrained_cfg`` decides, without cropping unless it was made for this very input size.
        dataset_name: The dataset, default ``data_cfg['name']`` (``"fashion-mnist"`` when absent).

    Returns:
        A dict for ``timm.data.create_transform(**cfg)``: input_size, interpolation, mean, std, crop_pct, crop_mode.
    """
    from timm.data import resolve_data_config
    in_chans, height, width = model_input_size(model)
    input_size = (in_chans, height, width)
    args: Dict[str, Any] = {'input_size': input_size}
    if data_cfg is not None:
        name = dataset_name if dataset_name is not None else str(data_cfg.get('name', 'fashion-mnist'))
        mean, std = data_cfg.get('mean'), data_cfg.get('std')
        if mean is None and name == 'fashion-mnist':
            mean, std = FASHION_MNIST_MEAN, FASHION_MNIST_STD
        args.update(interpolation=data_cfg.get('interpolation', 'bilinear'), crop_pct=data_cfg.get('crop_pct', 1.0))
        if mean is not None:
            args['mean'], args['std'] = tuple(mean), tuple(std if std is not None else [1.0] * len(mean))
    config = resolve_data_config(args=args, model=model)
    for key in ('mean', 'std'):
        values = tuple(float(v) for v in config[key])
        if len(values) != in_chans:
            # An RGB default (e.g. ImageNet's) for a grey model: average it; a single value for RGB: repeat it.
            values = (sum(values) / len(values),) * in_chans
        config[key] = values
    if data_cfg is None:
        pretrained = dict(getattr(model, 'pretrained_cfg', None) or {})
        if tuple(pretrained.get('input_size') or ()) != input_size:
            # Nothing tells how the model was trained to crop at this size: do not crop away image content.
            config['crop_pct'] = 1.0
    return config


def model_input_size(model: torch.nn.Module) -> Tuple[int, int, int]:
    """(channels, height, width) a ViT-like model takes."""
    embed = getattr(model, 'patch_embed', None)
    if embed is None or not hasattr(embed, 'img_size'):
        raise ConfigError(f'cannot tell the input size of {type(model).__name__}: expected a timm ViT')
    height, width = embed.img_size
    return int(embed.proj.in_channels), int(height), int(width)


def build_transform(model: torch.nn.Module, data_cfg: Mapping[str, Any], training: bool) -> Callable:
    """timm's train or eval transform for ``model`` and the ``data`` config section."""
    from timm.data import create_transform
    name = str(data_cfg.get('name', 'fashion-mnist'))
    config = data_config(model, data_cfg, name)
    kwargs: Dict[str, Any] = {}
    if training:
        kwargs = dict(scale=tuple(data_cfg.get('scale', (0.08, 1.0))),
                      ratio=tuple(data_cfg.get('ratio', (0.75, 4 / 3))),
                      hflip=data_cfg.get('hflip', 0.5), color_jitter=data_cfg.get('color_jitter', 0.0) or 0.0,
                      auto_augment=data_cfg.get('auto_augment'), re_prob=data_cfg.get('re_prob', 0.0),
                      interpolation=config['interpolation'])
    else:
        kwargs = dict(interpolation=config['interpolation'], crop_pct=config['crop_pct'])
    return create_transform(config['input_size'], is_training=training, mean=config['mean'], std=config['std'],
                            **kwargs)


class SeededTransform:
    """Run ``transform`` under RNG seeded by (seed, epoch, index), leaving the caller's RNG untouched.

    timm's and torchvision's random transforms draw from Python's ``random`` and torch's default generator. Seeding
    them per sample makes an image's augmentation independent of which worker loads it and of how many images came
    before it, which is what an exact mid-epoch resume needs.
    """

    def __init__(self, transform: Callable, seed: int) -> None:
        self.transform = transform
        self.seed = seed
        self.epoch = 0

    def __call__(self, image: Any, index: int) -> Any:
        sample_seed = (self.seed * 1_000_003 + self.epoch) * 10_000_019 + index
        py_state, torch_state = random.getstate(), torch.get_rng_state()
        random.seed(sample_seed)
        torch.default_generator.manual_seed(sample_seed % (2 ** 63))
        try:
            return self.transform(image)
        finally:
            random.setstate(py_state)
            torch.set_rng_state(torch_state)


class IndexedTransformDataset(Dataset):
    """A dataset whose raw items are transformed by a ``SeededTransform`` that knows the item's index."""

    def __init__(self, dataset: Dataset, transform: SeededTransform) -> None:
        self.dataset = dataset
        self.transform = transform

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        image, target = self.dataset[index]
        return self.transform(image, index), target


def build_datasets(
        data_cfg: Mapping[str, Any],
        model: torch.nn.Module,
        seed: int = 0,
        splits: Sequence[str] = ('train', 'val'),
) -> Tuple[Dict[str, Dataset], List[str]]:
    """The datasets of a run, transformed for ``model``.

    Args:
        data_cfg: The ``data`` config section (``name``: ``"fashion-mnist"`` or an ImageFolder path).
        model: The model the images are for (input size, channels, normalisation).
        seed: Seed of the training augmentation.
        splits: Which splits to build, of ``"train"`` and ``"val"``.

    Returns:
        ``{split: dataset}`` (train wrapped in ``IndexedTransformDataset``, its transform seeded per sample; subsets
        applied) and the class names.

    Raises:
        InputError: Missing files or folders, as one line that says what to do.
    """
    name = str(data_cfg.get('name', 'fashion-mnist'))
    raw: Dict[str, Dataset] = {}
    if name == 'fashion-mnist':
        directory = fashion_mnist_dir(data_cfg.get('dir'), bool(data_cfg.get('download', True)))
        raw = {split: FashionMNIST(directory, split) for split in splits}
        classes = list(FASHION_MNIST_CLASSES)
    else:
        if not os.path.isdir(name):
            raise InputError(f'dataset folder {name} does not exist: pass --data fashion-mnist or a folder with '
                             f'train/ and val/ class folders')
        for split in splits:
            if not os.path.isdir(os.path.join(name, split)):
                image_folder(name, split, 1, None)  # raises the one-line error for the missing split
        in_chans = model_input_size(model)[0]
        raw = {split: image_folder(name, split, in_chans, None) for split in splits}
        classes = list(raw[splits[0]].classes)  # type: ignore[attr-defined]
        for split in splits[1:]:
            if list(raw[split].classes) != classes:  # type: ignore[attr-defined]
                raise InputError(f'{name}/{split} and {name}/{splits[0]} have different class folders')
    out: Dict[str, Dataset] = {}
    for split, dataset in raw.items():
        limit = data_cfg.get('subset' if split == 'train' else 'val_subset')
        if limit is not None:
            dataset = Subset(dataset, range(min(int(limit), len(dataset))))  # type: ignore[arg-type]
        if split == 'train':
            out[split] = IndexedTransformDataset(dataset, SeededTransform(build_transform(model, data_cfg, True), seed))
        else:
            out[split] = IndexedTransformDataset(dataset, _Unseeded(build_transform(model, data_cfg, False)))
    return out, classes


class _Unseeded:
    """Eval transforms are deterministic: no seeding needed."""

    def __init__(self, transform: Callable) -> None:
        self.transform = transform

    def __call__(self, image: Any, index: int) -> Any:
        return self.transform(image)
