"""Fashion-MNIST loading from the idx files of Debian's `dataset-fashion-mnist` package.

Parsed with numpy only (no torchvision: it does not build against this torch). The loaded arrays
are cached per process because every stream, test and trainer reads the same 70k images.
"""
from __future__ import annotations

import gzip
import os
import threading
from pathlib import Path

import numpy as np

DEFAULT_DIR = Path('/usr/share/datasets/fashion-mnist')
ENV_VAR = 'ASYNC_TTT_FASHION_MNIST'

CLASS_NAMES: tuple[str, ...] = (
    'T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
    'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot',
)

_FILES = {
    'train': ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    'test': ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}

# idx magic numbers: 0x0000 08 <ndim> (08 = unsigned byte)
_MAGIC_IMAGES = 0x00000803
_MAGIC_LABELS = 0x00000801

_cache: dict[tuple[str, str], tuple[np.ndarray, np.ndarray]] = {}
_lock = threading.Lock()


class DatasetMissingError(RuntimeError):
    """Fashion-MNIST is not where we look for it; the message says how to install it."""


def dataset_dir() -> Path:
    """Directory holding the idx files: $ASYNC_TTT_FASHION_MNIST or Debian's install location."""
    return Path(os.environ.get(ENV_VAR) or DEFAULT_DIR)


def _missing(directory: Path, what: str) -> DatasetMissingError:
    return DatasetMissingError(
        f'Fashion-MNIST not found: {what} in {directory}. Install the Debian package '
        f'dataset-fashion-mnist (`sudo apt-get install dataset-fashion-mnist`), or point '
        f'{ENV_VAR} at a directory with the idx files '
        f'(train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-...).')


def _find(directory: Path, stem: str) -> Path:
    for name in (stem + '.gz', stem):
        path = directory / name
        if path.is_file():
            return path
    raise _missing(directory, f'no {stem}[.gz]')


def _read_idx(path: Path, magic: int) -> np.ndarray:
    opener = gzip.open if path.suffix == '.gz' else open
    try:
        with opener(path, 'rb') as fh:
            raw = fh.read()
    except (OSError, EOFError) as exc:
        raise ValueError(f'{path}: cannot read idx file ({exc})') from exc
    if len(raw) < 8:
        raise ValueError(f'{path}: truncated idx header')
    found = int.from_bytes(raw[:4], 'big')
    if found != magic:
        raise ValueError(f'{path}: bad idx magic 0x{found:08x}, expected 0x{magic:08x}')
    ndim = raw[3]
    header = 4 + 4 * ndim
    dims = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim))
    expected = int(np.prod(dims))
    if len(raw) - header != expected:
        raise ValueError(f'{path}: {len(raw) - header} data bytes, header says {dims}')
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_fashion_mnist(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Return (images uint8 [N,28,28], labels int64 [N]) of 'train' (60k) or 'test' (10k).

    The arrays are shared and read-only (cached per process); copy before modifying.
    """
    if split not in _FILES:
        raise ValueError(f"split must be 'train' or 'test', not {split!r}")
    directory = dataset_dir()
    key = (str(directory), split)
    with _lock:
        if key in _cache:
            return _cache[key]
        if not directory.is_dir():
            raise _missing(directory, 'directory does not exist')
        img_stem, lbl_stem = _FILES[split]
        images = _read_idx(_find(directory, img_stem), _MAGIC_IMAGES)
        labels = _read_idx(_find(directory, lbl_stem), _MAGIC_LABELS).astype(np.int64)
        if images.ndim != 3 or images.shape[1:] != (28, 28) or len(images) != len(labels):
            raise ValueError(f'{directory}: unexpected shapes {images.shape} / {labels.shape}')
        images = np.ascontiguousarray(images)
        images.flags.writeable = False
        labels.flags.writeable = False
        _cache[key] = (images, labels)
        return images, labels
