"""Shared pieces of the training and evaluation tests: tiny models, Fashion-MNIST subsets, CLI runners.

The Fashion-MNIST files come from the Debian package (``/usr/share/datasets/fashion-mnist``); without it a small
synthetic set in the same IDX format stands in, so the tests stay offline either way.
"""
import gzip
import hashlib
import os
import re
import signal
import struct
import subprocess
import sys
from typing import Any, Dict, List, Optional

import numpy as np
import pytest
import yaml

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FMNIST = '/usr/share/datasets/fashion-mnist'

# Two blocks of width 48 on 4x4 patches of 7 pixels: a forward pass costs ~0.1 MMACs per image.
TINY_MODEL: Dict[str, Any] = dict(arch='adavit', img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=48,
                                  depth=2, num_heads=3, mlp_ratio=2.0)


def _write_idx(path: str, array: np.ndarray) -> None:
    header = struct.pack('>BBBB', 0, 0, 8, array.ndim) + b''.join(struct.pack('>I', d) for d in array.shape)
    with gzip.open(path, 'wb') as f:
        f.write(header + array.astype(np.uint8).tobytes())


def synthetic_fashion_mnist(directory: str, train: int = 600, test: int = 200) -> str:
    """Class-dependent stripes plus noise, in Fashion-MNIST's file names and format."""
    rng = np.random.default_rng(0)
    os.makedirs(directory, exist_ok=True)
    for prefix, n in (('train', train), ('t10k', test)):
        labels = rng.integers(0, 10, n)
        images = rng.integers(0, 60, (n, 28, 28))
        for i, c in enumerate(labels):
            images[i, 2 * c:2 * c + 6, :] += 180
        _write_idx(os.path.join(directory, f'{prefix}-images-idx3-ubyte.gz'), np.clip(images, 0, 255))
        _write_idx(os.path.join(directory, f'{prefix}-labels-idx1-ubyte.gz'), labels)
    return directory


@pytest.fixture(scope='session')
def fmnist_dir(tmp_path_factory: pytest.TempPathFactory) -> str:
    if os.path.isfile(os.path.join(FMNIST, 'train-images-idx3-ubyte.gz')):
        return FMNIST
    return synthetic_fashion_mnist(str(tmp_path_factory.mktemp('fmnist')))


def write_config(path: str, data_dir: str, model: Optional[Dict[str, Any]] = None, **sections: Any) -> str:
    """A small-run YAML config: tiny model, 256 training and 100 validation images, no progress bars."""
    config: Dict[str, Any] = {
        'seed': 0,
        'data': {'name': 'fashion-mnist', 'dir': data_dir, 'download': False, 'subset': 256, 'val_subset': 100,
                 'workers': 0, 'scale': [0.8, 1.0]},
        'model': dict(TINY_MODEL, **(model or {})),
        'train': {'epochs': 2, 'batch_size': 32, 'eval_batch_size': 100, 'lr': 3e-3, 'warmup_epochs': 0.25,
                  'progress': False, 'threads': 1},
    }
    for key, value in sections.items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key].update(value)
        else:
            config[key] = value
    with open(path, 'w') as f:
        yaml.safe_dump(config, f)
    return path


def env(**extra: str) -> Dict[str, str]:
    out = dict(os.environ, OMP_NUM_THREADS='1', MKL_NUM_THREADS='1')
    out['PYTHONPATH'] = REPO + os.pathsep + out.get('PYTHONPATH', '')
    out.update(extra)
    return out


def run_group(cmd: List[str], timeout: float = 240, **extra_env: str) -> subprocess.CompletedProcess:
    """Run ``cmd`` in its own process group, which is killed as a whole on timeout (torchrun leaves workers)."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env(**extra_env),
                            cwd=REPO, start_new_session=True)
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        stdout, stderr = proc.communicate()
        raise AssertionError(f'{cmd} timed out after {timeout}s: {stdout[-1000:]} {stderr[-2000:]}')
    return subprocess.CompletedProcess(cmd, proc.returncode, stdout, stderr)


def run_cli(args: List[str], timeout: float = 240, **extra_env: str) -> subprocess.CompletedProcess:
    """``python -m adavit ARGS`` in a fresh process."""
    return run_group([sys.executable, '-m', 'adavit', *args], timeout, **extra_env)


def weight_hashes(stdout: str) -> Dict[int, str]:
    """Rank -> weight hash, from the lines ``ADAVIT_DEBUG_WEIGHTS_HASH=1`` makes each rank print."""
    # Searched anywhere, not per line: two ranks writing to one pipe can land their lines on one line.
    found = re.findall(r'adavit-weights-sha256 rank=(\d+) step=\d+ ([0-9a-f]{64})', stdout)
    return {int(rank): digest for rank, digest in found}


def file_digest(path: str) -> str:
    with open(path, 'rb') as f:
        return hashlib.sha256(f.read()).hexdigest()


def folder_digests(folder: str) -> Dict[str, str]:
    return {name: file_digest(os.path.join(folder, name)) for name in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, name))}


@pytest.fixture(scope='session')
def tiny_backbone(tmp_path_factory: pytest.TempPathFactory, fmnist_dir: str) -> str:
    """A dense tiny backbone run (2 epochs on 256 images); returns its run folder (best.pt, last.pt, ...)."""
    # Each test module that imports this fixture gets its own instance: the run folder is shared through the
    # session's base temp directory so that the training happens once.
    root = tmp_path_factory.getbasetemp() / 'tiny_backbone'
    if not (root / 'run' / 'metrics.json').exists():
        root.mkdir(exist_ok=True)
        config = write_config(str(root / 'backbone.yaml'), fmnist_dir, model={'gates': []})
        result = run_cli(['train', '--config', config, '--output', str(root / 'run'), '--overwrite'])
        assert result.returncode == 0, result.stderr
    return str(root / 'run')
