"""Joint image / instance transforms of the COCO training recipes (mmdet 2.x, which the Swin and FLatten detection
configs train Mask R-CNN and Cascade Mask R-CNN with). Instances are ``boxes`` (N, 4) x1, y1, x2, y2 in pixels,
``labels`` (N,) and ``masks`` uint8 (N, H, W).

Training (:class:`DetTrainTransform`), one image and its instances:

1. **Horizontal flip** with probability `flip_prob` (drawn first, as the Swin recipe flips before it resizes;
   applied last, to the smaller image: flipping commutes with the resize and with a uniformly placed crop).
2. **Keep-ratio resize** to one of `scales` drawn uniformly, each a (long side, short side) limit: the image is
   scaled by s = min(long / max(w, h), short / min(w, h)) to ``int(w·s + 0.5) × int(h·s + 0.5)`` (mmcv's
   ``rescale_size``). ``[(1333, 800)]`` is the 1x recipe, ``[(1333, 480), (1333, 512), …, (1333, 800)]`` the 3x
   multi-scale one. Image bilinear (Pillow), masks nearest, boxes multiplied by the two axes' size ratios and
   clipped to the image.
3. **Or, with probability `crop_prob`** (Swin's 3x recipe: 0.5, its second AutoAugment policy): resize to one of
   `crop_scales`, take a random window whose height and width are each drawn uniformly from the `crop_size` range
   (at most the image's), at a uniform position; boxes are shifted and clipped to the window and the instances
   whose clipped box is empty are dropped. A window may keep no instance at all (mmdet's allow_negative_crop):
   the detector then sees an image of background only. Boxes are clipped, not recomputed from the cropped masks
   (mmdet's default), so a cut through a non-convex object may leave its box larger than its mask. The window is
   then resized to one of `scales` as in 2.

The randomness is Python's ``random``, which :class:`data.datasets.SeededAugmentation` seeds per (seed, epoch,
sample). Evaluation needs no transform: the detector resizes to DET.TEST_SCALE itself and maps its predictions
back to the size of the image it is given, so the evaluation pipeline hands it the original image
(:func:`image_to_tensor`, which :class:`data.coco.CocoDetection` applies when it has no transform). Pillow's
bilinear filter widens with the scale when it shrinks an image (mmcv's OpenCV resize does not): the same image up
to aliasing.
"""
from __future__ import annotations

import random
from typing import Dict, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from torchvision.transforms.functional import pil_to_tensor

from .seg_transforms import rescale_size

__all__ = ['DetTrainTransform', 'image_to_tensor', 'resize_instances', 'crop_instances', 'flip_instances']

Instances = Tuple[np.ndarray, np.ndarray, np.ndarray]  # boxes float32 (N, 4), labels int64 (N,), masks uint8 (N, H, W)


def image_to_tensor(image: Image.Image) -> torch.Tensor:
    """An RGB PIL image as float32 (3, H, W) in [0, 1], what torchvision's detectors take."""
    return pil_to_tensor(image.convert('RGB')).float().div_(255)


def resize_instances(image: Image.Image, instances: Instances,
                     scale: Sequence[float]) -> Tuple[Image.Image, Instances]:
    """Step 2 of the module docstring: keep-ratio resize of `image` (and its instances) to the (long, short)
    limits `scale`."""
    boxes, labels, masks = instances
    width, height = image.size
    size = rescale_size((width, height), tuple(scale))
    image = image.resize(size, Image.BILINEAR)
    factors = np.array([size[0] / width, size[1] / height] * 2, dtype=np.float32)
    boxes = np.minimum(boxes * factors, np.array([size[0], size[1]] * 2, dtype=np.float32))
    resized = [np.asarray(Image.fromarray(mask).resize(size, Image.NEAREST)) for mask in masks]
    masks = np.stack(resized) if resized else np.zeros((0, size[1], size[0]), dtype=np.uint8)
    return image, (boxes, labels, masks)


def crop_instances(image: Image.Image, instances: Instances,
                   crop_size: Sequence[int]) -> Tuple[Image.Image, Instances]:
    """The random window of step 3: each side drawn from the `crop_size` (lo, hi) range (at most the image's
    side), at a uniform position; instances whose clipped box is empty are dropped."""
    boxes, labels, masks = instances
    width, height = image.size
    low, high = crop_size
    crop_h = random.randint(min(height, low), min(height, high))
    crop_w = random.randint(min(width, low), min(width, high))
    top, left = random.randint(0, height - crop_h), random.randint(0, width - crop_w)
    image = image.crop((left, top, left + crop_w, top + crop_h))
    boxes = boxes - np.array([left, top, left, top], dtype=np.float32)
    boxes = np.clip(boxes, 0, np.array([crop_w, crop_h, crop_w, crop_h], dtype=np.float32))
    keep = (boxes[:, 2] > boxes[:, 0]) & (boxes[:, 3] > boxes[:, 1])
    masks = masks[keep, top:top + crop_h, left:left + crop_w]
    return image, (boxes[keep], labels[keep], masks)


def flip_instances(image: Image.Image, instances: Instances) -> Tuple[Image.Image, Instances]:
    """`image` mirrored left-right, with its instances."""
    boxes, labels, masks = instances
    width = image.size[0]
    flipped = boxes.copy()
    flipped[:, 0], flipped[:, 2] = width - boxes[:, 2], width - boxes[:, 0]
    return image.transpose(Image.FLIP_LEFT_RIGHT), (flipped, labels, masks[:, :, ::-1])


class DetTrainTransform:
    """Steps 1–3 of the module docstring: ``(RGB PIL image, target)`` → ``(float32 (3, h, w) in [0, 1],
    target)``, the target's ``boxes`` float32 (N, 4), ``labels`` int64 (N,) and ``masks`` uint8 (N, H, W) (tensors
    or arrays) transformed with the image (as tensors) and its other keys (``image_id``) passed through.

    `scales` and `crop_scales`: sequences of (long side, short side) pairs; `crop_size`: the (lo, hi) range of
    each side of the window, in pixels of the image resized to a crop scale."""

    def __init__(self, scales: Sequence[Sequence[float]] = ((1333, 800),), flip_prob: float = 0.5,
                 crop_prob: float = 0.0,
                 crop_scales: Sequence[Sequence[float]] = ((1333, 400), (1333, 500), (1333, 600)),
                 crop_size: Sequence[int] = (384, 600)):
        self.scales = [tuple(scale) for scale in scales]
        self.crop_scales = [tuple(scale) for scale in crop_scales]
        self.crop_size = tuple(int(side) for side in crop_size)
        self.flip_prob, self.crop_prob = flip_prob, crop_prob
        if not self.scales or any(len(scale) != 2 or min(scale) <= 0 for scale in self.scales + self.crop_scales):
            raise ValueError(f'scales {scales} and crop_scales {crop_scales} must be non-empty lists of positive '
                             f'(long side, short side) pairs')
        if not (len(self.crop_size) == 2 and 1 <= self.crop_size[0] <= self.crop_size[1]):
            raise ValueError(f'crop_size must be a range (lo, hi) with 1 <= lo <= hi, got {crop_size}')

    def __call__(self, image: Image.Image, target: Dict) -> Tuple[torch.Tensor, Dict]:
        instances = (np.asarray(target['boxes'], dtype=np.float32).reshape(-1, 4),
                     np.asarray(target['labels'], dtype=np.int64), np.asarray(target['masks'], dtype=np.uint8))
        flip = random.random() < self.flip_prob
        if random.random() < self.crop_prob:
            image, instances = resize_instances(image, instances, random.choice(self.crop_scales))
            image, instances = crop_instances(image, instances, self.crop_size)
        image, instances = resize_instances(image, instances, random.choice(self.scales))
        if flip:
            image, instances = flip_instances(image, instances)
        boxes, labels, masks = instances
        transformed = dict(target, boxes=torch.from_numpy(np.ascontiguousarray(boxes, dtype=np.float32)),
                           labels=torch.from_numpy(np.ascontiguousarray(labels)),
                           masks=torch.from_numpy(np.ascontiguousarray(masks)))
        return image_to_tensor(image), transformed
