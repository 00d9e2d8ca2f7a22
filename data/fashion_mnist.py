"""Fashion-MNIST from the Debian package ``dataset-fashion-mnist`` (IDX files, optionally gzipped).

70,000 real 28×28 grayscale images in 10 classes: 60,000 train and 10,000 test (used as val).
Images are returned as RGB PIL images, so the ImageNet transforms and 3-channel models apply
unchanged.
"""
from __future__ import annotations

import gzip
import os
from typing import Callable, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from .errors import DataError, DatasetNotFoundError

__all__ = ['FashionMNIST', 'DEFAULT_FASHION_MNIST_DIR', 'FASHION_MNIST_CLASSES', 'read_idx']

DEFAULT_FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
FASHION_MNIST_CLASSES = ('T-shirt/top', 'Trouser', 'Pullover', 'Dress', 'Coat',
                         'Sandal', 'Shirt', 'Sneaker', 'Bag', 'Ankle boot')
_FILES = {
    True: ('train-images-idx3-ubyte', 'train-labels-idx1-ubyte'),
    False: ('t10k-images-idx3-ubyte', 't10k-labels-idx1-ubyte'),
}
_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: np.dtype('>i2'), 0x0C: np.dtype('>i4'),
               0x0D: np.dtype('>f4'), 0x0E: np.dtype('>f8')}


def _find(root: str, stem: str) -> str:
    for name in (stem + '.gz', stem):
        path = os.path.join(root, name)
        if os.path.isfile(path):
            return path
    raise DatasetNotFoundError(
        f'Fashion-MNIST file {stem}[.gz] not found in {root!r}. Install the Debian package with '
        f'`apt-get install -y dataset-fashion-mnist` (files go to {DEFAULT_FASHION_MNIST_DIR}) or point '
        f'--data-path at a folder holding the four IDX files.')


def read_idx(path: str) -> np.ndarray:
    """Parse an IDX file (magic: two zero bytes, a dtype code, the number of dimensions)."""
    opener = gzip.open if path.endswith('.gz') else open
    with opener(path, 'rb') as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0 or data[2] not in _IDX_DTYPES:
        raise DataError(f'{path} is not an IDX file (bad magic number {data[:4]!r})')
    ndim = data[3]
    shape = tuple(int.from_bytes(data[4 + 4 * i: 8 + 4 * i], 'big') for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[data[2]])
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape)) * dtype.itemsize
    if len(data) - offset != expected:
        raise DataError(f'{path} is truncated or corrupt: header says {shape} ({expected} bytes), '
                         f'file holds {len(data) - offset} bytes of data')
    return np.frombuffer(data, dtype=dtype, offset=offset).reshape(shape)


class FashionMNIST(torch.utils.data.Dataset):
    """Fashion-MNIST train (60k) or test (10k) split; items are ``(transform(RGB PIL image), label)``."""

    classes = FASHION_MNIST_CLASSES

    def __init__(self, root: str = '', train: bool = True, transform: Optional[Callable] = None):
        self.root = root or DEFAULT_FASHION_MNIST_DIR
        if not os.path.isdir(self.root):
            raise DatasetNotFoundError(
                f'Fashion-MNIST folder {self.root!r} does not exist. Install it with '
                f'`apt-get install -y dataset-fashion-mnist` or pass --data-path to the folder of the IDX files.')
        images_file, labels_file = _FILES[train]
        self.images = read_idx(_find(self.root, images_file))
        self.targets = read_idx(_find(self.root, labels_file)).astype(np.int64)
        if self.images.ndim != 3 or len(self.images) != len(self.targets):
            raise DataError(f'Fashion-MNIST in {self.root!r}: {self.images.shape} images do not match '
                             f'{self.targets.shape} labels')
        self.transform = transform

    def __len__(self) -> int:
        return len(self.targets)

    def __getitem__(self, index: int) -> Tuple[object, int]:
        image = Image.fromarray(self.images[index], mode='L').convert('RGB')
        if self.transform is not None:
            image = self.transform(image)
        return image, int(self.targets[index])
