"""A toy instance-segmentation set of real data: Fashion-MNIST glyphs pasted on black canvases.

Each canvas (800×1333 by default: the size torchvision's detectors resize COCO images to) holds a few
Fashion-MNIST images, each scaled by a random factor and pasted at a random position, never
overlapping another. Its target is what torchvision's ``MaskRCNN`` trains on:

* ``boxes``: float32 (N, 4) ``x1, y1, x2, y2`` in pixels, the tight box of the glyph's mask;
* ``labels``: int64 (N,), the Fashion-MNIST class + 1 (0 is the background);
* ``masks``: uint8 (N, H, W), the glyph's pixels brighter than a threshold.

Everything is drawn from a seeded generator per canvas, so canvas ``i`` is the same for the same seed
whatever else is read. Images are float32 (3, H, W) in [0, 1] (the grey glyph in all three channels).
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from .errors import DataError
from .fashion_mnist import FashionMNIST

__all__ = ['FashionMNISTCanvases', 'detection_collate', 'paste_glyphs']

Target = Dict[str, torch.Tensor]


def paste_glyphs(glyphs: np.ndarray, classes: np.ndarray, size: Tuple[int, int], count: int,
                 scale: Tuple[float, float], threshold: int, rng: np.random.Generator,
                 tries: int = 50) -> Tuple[np.ndarray, Target]:
    """Paste `count` glyphs drawn from `glyphs` (uint8 (M, h, w)) with labels `classes` on a black
    ``size`` (H, W) canvas: each resized by a factor drawn uniformly from `scale` (bilinear, at most the
    canvas), at a uniformly drawn position whose square does not overlap an earlier one (after
    `tries` refused positions the glyph is left out). Returns the uint8 (H, W) canvas and the target
    (boxes, labels = class + 1, masks = pixels > `threshold`) of the glyphs pasted."""
    H, W = size
    canvas = np.zeros((H, W), dtype=np.uint8)
    taken: List[Tuple[int, int, int, int]] = []
    boxes, labels, masks = [], [], []
    for _ in range(count):
        index = int(rng.integers(len(glyphs)))
        factor = float(rng.uniform(*scale))
        h = max(1, min(H, round(glyphs.shape[1] * factor)))
        w = max(1, min(W, round(glyphs.shape[2] * factor)))
        for _ in range(tries):
            top, left = int(rng.integers(H - h + 1)), int(rng.integers(W - w + 1))
            if all(top >= b or top + h <= t or left >= r or left + w <= lf for t, lf, b, r in taken):
                break
        else:
            continue
        glyph = np.asarray(Image.fromarray(glyphs[index]).resize((w, h), Image.Resampling.BILINEAR))
        mask = glyph > threshold
        if not mask.any():
            continue
        taken.append((top, left, top + h, left + w))
        canvas[top:top + h, left:left + w] = glyph
        full = np.zeros((H, W), dtype=np.uint8)
        full[top:top + h, left:left + w] = mask
        rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
        boxes.append([left + cols[0], top + rows[0], left + cols[-1] + 1, top + rows[-1] + 1])
        labels.append(int(classes[index]) + 1)
        masks.append(full)
    target = dict(
        boxes=torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
        labels=torch.tensor(labels, dtype=torch.int64),
        masks=torch.from_numpy(np.stack(masks)) if masks else torch.zeros((0, H, W), dtype=torch.uint8))
    return canvas, target


class FashionMNISTCanvases(torch.utils.data.Dataset):
    """`num_images` canvases of ``size`` (H, W), each with a number of glyphs drawn from `glyphs`
    (inclusive range) at scales drawn from `scale`; items are ``(image (3, H, W) float, target)``.

    The glyphs come from a Fashion-MNIST split in `root` (default: the Debian package's folder; the
    10,000 test images unless `train`, which reads the 60,000 training images, six times slower),
    or from `source` = ``(uint8 images (M, h, w), int labels (M,))`` when given. Canvas ``i`` is drawn
    from ``numpy.random.default_rng([seed, i])``."""

    num_classes = 11  # the 10 Fashion-MNIST classes and the background

    def __init__(self, num_images: int = 4, size: Sequence[int] = (800, 1333), glyphs: Tuple[int, int] = (3, 6),
                 scale: Tuple[float, float] = (3.0, 9.0), threshold: int = 32, seed: int = 0, root: str = '',
                 train: bool = False, source: Optional[Tuple[np.ndarray, np.ndarray]] = None) -> None:
        if num_images < 1:
            raise DataError(f'num_images must be at least 1, got {num_images}')
        if len(size) != 2 or min(size) < 1:
            raise DataError(f'size must be (H, W) with positive sides, got {tuple(size)}')
        if not 1 <= glyphs[0] <= glyphs[1]:
            raise DataError(f'glyphs must be a range (lo, hi) with 1 <= lo <= hi, got {glyphs}')
        if not 0 < scale[0] <= scale[1]:
            raise DataError(f'scale must be a range (lo, hi) with 0 < lo <= hi, got {scale}')
        if not 0 <= threshold < 255:
            raise DataError(f'threshold must be in [0, 255), got {threshold}')
        if source is None:
            split = FashionMNIST(root, train=train)
            source = (split.images, split.targets)
        self.images, self.classes = np.asarray(source[0], dtype=np.uint8), np.asarray(source[1])
        if self.images.ndim != 3 or len(self.images) != len(self.classes) or len(self.images) == 0:
            raise DataError(f'source must be (images (M, h, w), labels (M,)), got {self.images.shape} and '
                            f'{self.classes.shape}')
        self.num_images, self.size = num_images, (int(size[0]), int(size[1]))
        self.glyphs, self.scale, self.threshold, self.seed = tuple(glyphs), tuple(scale), threshold, seed

    def __len__(self) -> int:
        return self.num_images

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Target]:
        if not 0 <= index < self.num_images:
            raise IndexError(f'canvas {index} out of range (0 to {self.num_images - 1})')
        rng = np.random.default_rng([self.seed, index])
        count = int(rng.integers(self.glyphs[0], self.glyphs[1] + 1))
        canvas, target = paste_glyphs(self.images, self.classes, self.size, count, self.scale, self.threshold, rng)
        image = torch.from_numpy(canvas).float().div_(255).expand(3, -1, -1).contiguous()
        return image, target


def detection_collate(batch):
    """Torchvision detectors take lists: ``([image, ...], [target, ...])``."""
    images, targets = zip(*batch, strict=True)
    return list(images), list(targets)
