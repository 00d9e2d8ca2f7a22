"""ADE20K scene parsing in the ``ADEChallengeData2016`` layout, read and checked file by file.

    ADEChallengeData2016/
        images/training/ADE_train_00000001.jpg …       annotations/training/ADE_train_00000001.png …
        images/validation/ADE_val_00000001.jpg …       annotations/validation/ADE_val_00000001.png …

An annotation is a single-channel 8-bit PNG of its image's size: 0 marks pixels without a label and
1…150 the classes. Items come out with 0 mapped to the ignore index (255) and 1…K to 0…K−1, as the
benchmark scores them (mmseg calls this ``reduce_zero_label``). Bad files stop the run with a
:class:`DataError` naming the file: an image without its annotation (or the reverse), an annotation
whose size differs from its image, a colour-coded (RGB) annotation, values above the class count.
"""
from __future__ import annotations

import os
from typing import Callable, List, Optional, Tuple

import numpy as np
import torch
from PIL import Image

from .errors import DataError, DatasetNotFoundError

__all__ = ['ADE20K', 'IGNORE_INDEX', 'ADE20K_SPLITS']

IGNORE_INDEX = 255
ADE20K_SPLITS = {'train': 'training', 'val': 'validation'}
IMAGE_EXTENSIONS = ('.jpg', '.jpeg', '.png')


def _stems(folder: str, extensions: Tuple[str, ...]) -> dict:
    """{file stem: path} of the files in `folder` with one of `extensions`."""
    return {os.path.splitext(name)[0]: os.path.join(folder, name) for name in sorted(os.listdir(folder))
            if name.lower().endswith(extensions)}


class ADE20K(torch.utils.data.Dataset):
    """The `split` ('train' or 'val') of an ADE20K-layout folder; items are ``transform(image, label)``
    with the RGB PIL image and the int64 (H, W) label (classes 0…K−1, 255 ignored), or those two
    untransformed when `transform` is None."""

    def __init__(self, root: str, split: str, num_classes: int = 150,
                 transform: Optional[Callable] = None):
        if split not in ADE20K_SPLITS:
            raise ValueError(f'split must be one of {sorted(ADE20K_SPLITS)}, got {split!r}')
        folder = ADE20K_SPLITS[split]
        self.root, self.split, self.num_classes, self.transform = root, split, num_classes, transform
        image_dir = os.path.join(root, 'images', folder)
        label_dir = os.path.join(root, 'annotations', folder)
        for path in (image_dir, label_dir):
            if not os.path.isdir(path):
                raise DatasetNotFoundError(
                    f'ADE20K: no folder {path}. --data-path must be the ADEChallengeData2016 folder, holding '
                    f'images/{{training,validation}}/*.jpg and annotations/{{training,validation}}/*.png')
        images, labels = _stems(image_dir, IMAGE_EXTENSIONS), _stems(label_dir, ('.png',))
        unlabelled = sorted(set(images) - set(labels))
        if unlabelled:
            raise DataError(f'ADE20K {split}: {len(unlabelled)} image(s) without an annotation, e.g. '
                            f'{images[unlabelled[0]]} has no {os.path.join(label_dir, unlabelled[0] + ".png")}')
        orphans = sorted(set(labels) - set(images))
        if orphans:
            raise DataError(f'ADE20K {split}: {len(orphans)} annotation(s) without an image, e.g. '
                            f'{labels[orphans[0]]} has no image of that name in {image_dir}')
        if not images:
            raise DataError(f'ADE20K {split}: {image_dir} holds no image (.jpg, .jpeg or .png)')
        self.samples: List[Tuple[str, str]] = [(images[stem], labels[stem]) for stem in sorted(images)]

    def __len__(self) -> int:
        return len(self.samples)

    def read_label(self, path: str, size: Tuple[int, int]) -> np.ndarray:
        """The (H, W) int64 label of annotation `path`, checked against the image size (W, H) `size`."""
        with Image.open(path) as label:
            if label.mode not in ('L', 'P'):
                raise DataError(f'annotation {path} is a {label.mode} image; ADE20K annotations are single-channel '
                                f'PNGs of class indices (0 = no label, 1..{self.num_classes}), not colour-coded maps')
            if label.size != size:
                raise DataError(f'annotation {path} is {label.size[0]}x{label.size[1]} (WxH) but its image is '
                                f'{size[0]}x{size[1]}')
            values = np.asarray(label, dtype=np.int64)
        top = int(values.max())
        if top > self.num_classes:
            bad = sorted(np.unique(values[values > self.num_classes]).tolist())[:5]
            raise DataError(f'annotation {path} holds values {bad}: ADE20K classes are 1..{self.num_classes} '
                            f'(0 = no label); set MODEL.NUM_CLASSES to the class count of this data')
        return np.where(values == 0, IGNORE_INDEX, values - 1)

    def __getitem__(self, index: int):
        image_path, label_path = self.samples[index]
        try:
            image = Image.open(image_path).convert('RGB')
        except (OSError, SyntaxError, ValueError) as err:
            raise DataError(f'cannot read image {image_path}: {err}') from None
        label = self.read_label(label_path, image.size)
        if self.transform is None:
            return image, label
        return self.transform(image, label)
