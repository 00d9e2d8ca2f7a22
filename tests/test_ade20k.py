"""data/ade20k.py: the ADEChallengeData2016 layout read file by file, labels shifted (0 → ignored,
1..K → 0..K-1), and each bad file named."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
from conftest import write_ade20k_split
from PIL import Image

from data.ade20k import ADE20K, IGNORE_INDEX
from data.errors import DataError, DatasetNotFoundError


@pytest.fixture
def ade(tmp_path: Path) -> Path:
    root = tmp_path / 'ADEChallengeData2016'
    write_ade20k_split(root, 'train', 3)
    write_ade20k_split(root, 'val', 2, seed=1)
    return root


def test_items_pair_images_with_shifted_labels(ade):
    train, val = ADE20K(str(ade), 'train', num_classes=5), ADE20K(str(ade), 'val', num_classes=5)
    assert (len(train), len(val)) == (3, 2)
    image, label = train[1]
    assert image.mode == 'RGB' and image.size == (12, 9) and label.shape == (9, 12) and label.dtype == np.int64
    raw = np.asarray(Image.open(ade / 'annotations' / 'training' / 'ADE_train_00000001.png'), dtype=np.int64)
    assert (label[raw == 0] == IGNORE_INDEX).all() and np.array_equal(label[raw > 0], raw[raw > 0] - 1)
    assert set(np.unique(label).tolist()) <= set(range(5)) | {IGNORE_INDEX}
    joint = ADE20K(str(ade), 'val', num_classes=5, transform=lambda im, lab: (im.size, lab.sum()))
    assert joint[0] == (val[0][0].size, val[0][1].sum())


def _unlabelled(root: Path) -> str:
    os.remove(root / 'annotations' / 'training' / 'ADE_train_00000002.png')
    return 'ADE_train_00000002.jpg has no'


def _orphan(root: Path) -> str:
    os.remove(root / 'images' / 'training' / 'ADE_train_00000000.jpg')
    return 'ADE_train_00000000.png has no image'


def _empty(root: Path) -> str:
    for folder in ('images', 'annotations'):
        for path in (root / folder / 'training').iterdir():
            path.unlink()
    return 'holds no image'


def _no_folder(root: Path) -> str:
    for path in (root / 'annotations' / 'training').iterdir():
        path.unlink()
    (root / 'annotations' / 'training').rmdir()
    return 'annotations/training'


def _resized(root: Path) -> str:
    path = root / 'annotations' / 'training' / 'ADE_train_00000001.png'
    Image.open(path).resize((10, 9)).save(path)
    return r'ADE_train_00000001.png is 10x9 \(WxH\) but its image is 12x9'


def _rgb(root: Path) -> str:
    path = root / 'annotations' / 'training' / 'ADE_train_00000001.png'
    Image.open(path).convert('RGB').save(path)
    return 'ADE_train_00000001.png is a RGB image'


def _out_of_range(root: Path) -> str:
    path = root / 'annotations' / 'training' / 'ADE_train_00000001.png'
    label = np.asarray(Image.open(path)).copy()
    label[0, :2] = (7, 9)
    Image.fromarray(label, mode='L').save(path)
    return r'ADE_train_00000001.png holds values \[7, 9\]: ADE20K classes are 1..5'


# (what is wrong, how to break the fixture, whether listing or reading the item finds it)
BAD = [('image without annotation', _unlabelled, 'list'), ('annotation without image', _orphan, 'list'),
       ('empty split', _empty, 'list'), ('missing folder', _no_folder, 'list'),
       ('label size differs', _resized, 'item'), ('colour-coded label', _rgb, 'item'),
       ('values above the classes', _out_of_range, 'item')]


@pytest.mark.parametrize('case, damage, when', BAD, ids=[case for case, _, _ in BAD])
def test_bad_files_are_named(ade, case, damage, when):
    message = damage(ade)
    error = DatasetNotFoundError if case == 'missing folder' else DataError
    with pytest.raises(error, match=message):
        dataset = ADE20K(str(ade), 'train', num_classes=5)
        assert when == 'item', f'{case}: not found when the split was listed'
        dataset[1]
