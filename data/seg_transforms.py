"""Joint image/label transforms of the ADE20K recipe that UperNet and Semantic FPN papers train with.

Training, in order (one image and its label map):

1. **Random resize**: draw r ~ U(ratio_range) and rescale, keeping the aspect ratio, to the largest
   size whose long side is at most r·scale[0] and whose short side is at most r·scale[1]
   (scale (2048, 512): a 4:3 photo becomes 683×512 at r = 1). Image bilinear, label nearest.
2. **Random crop** of `crop` (H, W), retried up to 10 times until no class covers `cat_max_ratio` or
   more of the crop's labelled pixels (a crop that is three quarters sky teaches little).
3. **Horizontal flip** with probability `flip_prob`.
4. **Photometric distortion**, each step with probability ½: brightness ± 32, contrast × U(0.5, 1.5)
   (before or after the next two, at random), saturation × U(0.5, 1.5), hue ± 18° of 180°.
5. **Normalise** with the ImageNet mean and std (in 0–255 units), then **pad** the bottom and right
   to `crop` with 0 (image) and the ignore index (label).

Evaluation rescales the image the same way with r = 1 (or with each ratio of a multi-scale test)
and leaves the label at its own size, since predictions are scored at the original resolution.
Randomness comes from Python's ``random``, which :class:`data.datasets.SeededAugmentation` seeds per
(seed, epoch, sample) as for classification.
Where this differs from mmseg's OpenCV code (Pillow's resampling, Pillow's HSV), docs/segmentation.md
says by how much.
"""
from __future__ import annotations

import random
from typing import Sequence, Tuple

import numpy as np
import torch
from PIL import Image

from .ade20k import IGNORE_INDEX

__all__ = ['SegTrainTransform', 'SegEvalTransform', 'rescale_size', 'crop_with_cat_max_ratio',
           'photometric_distortion']

IMAGENET_MEAN_255 = (123.675, 116.28, 103.53)
IMAGENET_STD_255 = (58.395, 57.12, 57.375)


def rescale_size(size: Tuple[int, int], scale: Tuple[float, float]) -> Tuple[int, int]:
    """(W, H) `size` rescaled, ratio kept, to the largest size with long side ≤ max(scale) and short
    side ≤ min(scale)."""
    w, h = size
    factor = min(max(scale) / max(w, h), min(scale) / min(w, h))
    return int(w * factor + 0.5), int(h * factor + 0.5)


def crop_with_cat_max_ratio(image: np.ndarray, label: np.ndarray, crop: Tuple[int, int], cat_max_ratio: float,
                            ignore_index: int = IGNORE_INDEX, tries: int = 10) -> Tuple[np.ndarray, np.ndarray]:
    """A random `crop` (H, W) of image (H, W, 3) and label (H, W) (smaller maps are taken whole along
    that side); redrawn up to `tries` times while one class covers ≥ `cat_max_ratio` of the labelled
    pixels of the crop or it holds fewer than two classes (the last draw is kept)."""
    height, width = label.shape
    crop_h, crop_w = min(crop[0], height), min(crop[1], width)
    for _ in range(tries):
        top, left = random.randint(0, height - crop_h), random.randint(0, width - crop_w)
        window = label[top:top + crop_h, left:left + crop_w]
        if cat_max_ratio >= 1:
            break
        _, counts = np.unique(window[window != ignore_index], return_counts=True)
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    return image[top:top + crop_h, left:left + crop_w], window


def _scale_values(values: np.ndarray, alpha: float = 1.0, beta: float = 0.0) -> np.ndarray:
    return np.clip(values.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)


def photometric_distortion(image: np.ndarray, brightness: float = 32, contrast: Tuple[float, float] = (0.5, 1.5),
                           saturation: Tuple[float, float] = (0.5, 1.5), hue: float = 18) -> np.ndarray:
    """Step 4 of the module docstring on a uint8 (H, W, 3) RGB array; `hue` in OpenCV's 0–180 units."""
    if random.randint(0, 1):
        image = _scale_values(image, beta=random.uniform(-brightness, brightness))
    contrast_first = random.randint(0, 1)
    if contrast_first and random.randint(0, 1):
        image = _scale_values(image, alpha=random.uniform(*contrast))
    change_saturation, change_hue = random.randint(0, 1), random.randint(0, 1)
    if change_saturation or change_hue:
        hsv = np.asarray(Image.fromarray(image).convert('HSV')).copy()  # Pillow's H spans 0..255
        if change_saturation:
            hsv[..., 1] = _scale_values(hsv[..., 1], alpha=random.uniform(*saturation))
        if change_hue:
            shift = random.randint(-int(hue), int(hue)) * 256 / 180
            hsv[..., 0] = np.round(hsv[..., 0].astype(np.float32) + shift).astype(np.int64) % 256
        image = np.asarray(Image.fromarray(hsv, mode='HSV').convert('RGB'))
    if not contrast_first and random.randint(0, 1):
        image = _scale_values(image, alpha=random.uniform(*contrast))
    return image


def _normalise(image: np.ndarray) -> torch.Tensor:
    tensor = torch.from_numpy(np.array(image, dtype=np.float32)).permute(2, 0, 1)  # a writable copy
    mean = torch.tensor(IMAGENET_MEAN_255).view(3, 1, 1)
    std = torch.tensor(IMAGENET_STD_255).view(3, 1, 1)
    return (tensor - mean) / std


class SegTrainTransform:
    """Steps 1–5 of the module docstring: ``(PIL image, int64 (H, W) label)`` → ``(float32 (3, *crop),
    int64 crop label)``."""

    def __init__(self, scale: Sequence[int] = (2048, 512), ratio_range: Sequence[float] = (0.5, 2.0),
                 crop: Sequence[int] = (512, 512), cat_max_ratio: float = 0.75, flip_prob: float = 0.5,
                 photometric: bool = True, ignore_index: int = IGNORE_INDEX):
        self.scale, self.ratio_range, self.crop = tuple(scale), tuple(ratio_range), tuple(crop)
        self.cat_max_ratio, self.flip_prob, self.photometric = cat_max_ratio, flip_prob, photometric
        self.ignore_index = ignore_index

    def __call__(self, image: Image.Image, label: np.ndarray) -> Tuple[torch.Tensor, torch.Tensor]:
        ratio = random.uniform(*self.ratio_range)
        size = rescale_size(image.size, (self.scale[0] * ratio, self.scale[1] * ratio))
        pixels = np.asarray(image.resize(size, Image.BILINEAR))
        label = np.asarray(Image.fromarray(label.astype(np.int32)).resize(size, Image.NEAREST))  # mode 'I'
        pixels, label = crop_with_cat_max_ratio(pixels, label, self.crop, self.cat_max_ratio, self.ignore_index)
        if random.random() < self.flip_prob:
            pixels, label = pixels[:, ::-1], label[:, ::-1]
        if self.photometric:
            pixels = photometric_distortion(np.ascontiguousarray(pixels))
        padded = torch.zeros(3, *self.crop)
        padded_label = torch.full(self.crop, self.ignore_index, dtype=torch.int64)
        h, w = label.shape
        padded[:, :h, :w] = _normalise(pixels)
        padded_label[:h, :w] = torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))
        return padded, padded_label


class SegEvalTransform:
    """The image rescaled as training does, at each ratio of `ratios` (multi-scale testing), and
    normalised; the label as it is (int64). Returns ``(list of (3, h, w) images, label)``."""

    def __init__(self, scale: Sequence[int] = (2048, 512), ratios: Sequence[float] = (1.0,)):
        self.scale, self.ratios = tuple(scale), tuple(ratios)

    def __call__(self, image: Image.Image, label: np.ndarray) -> Tuple[list, torch.Tensor]:
        images = [_normalise(np.asarray(image.resize(rescale_size(image.size, (self.scale[0] * r, self.scale[1] * r)),
                                                     Image.BILINEAR)))
                  for r in self.ratios]
        return images, torch.from_numpy(np.ascontiguousarray(label).astype(np.int64))
