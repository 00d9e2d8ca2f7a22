"""Keep timm's RandAugment / AutoAugment producing the same images whatever Pillow is installed.

timm's ``PosterizeIncreasing`` op (in the ``inc1`` RandAugment of every shipped config) keeps
``4 - int(magnitude / 10 * 4)`` bits, so a sampled magnitude of 10 asks for 0 bits: ``m9-mstd0.5``
draws N(9, 0.5²) and reaches 10 in 2.3% of draws, which makes about one training image in 700, or
a 128-image batch with probability ~0.18. Pillow < 13 ``ImageOps.posterize`` turned 0 bits into an
all-black image; Pillow 13 raises ``ValueError`` instead, which kills a training run within its
first steps. :func:`posterize` is the Pillow < 13 formula for every bit count, and
:func:`use_stable_posterize` puts it into the ops of a transform that timm built, leaving timm itself
untouched.
"""
from __future__ import annotations

from typing import Iterator

from PIL import Image, ImageOps
from timm.data import auto_augment

__all__ = ['posterize', 'use_stable_posterize']


def posterize(img: Image.Image, bits_to_keep: int, **_) -> Image.Image:
    """Keep the `bits_to_keep` most significant bits of every channel of `img` (L or RGB).

    Channel value v becomes ``v & ~(2**(8 - bits) - 1) & 0xFF``, exactly as Pillow < 13 computed it:
    8 or more bits leave the image as it is, 0 (or fewer) bits give a black image of the same mode
    and size. Other modes go to Pillow's own posterize. Extra keyword arguments (timm passes
    ``fillcolor`` and ``resample`` to every op) are ignored.
    """
    if bits_to_keep >= 8:
        return img
    if img.mode not in ('L', 'RGB'):
        return ImageOps.posterize(img, bits_to_keep)
    mask = ~(2 ** (8 - bits_to_keep) - 1) & 0xFF
    return img.point([value & mask for value in range(256)] * len(img.getbands()))


def _augment_ops(transform) -> Iterator[auto_augment.AugmentOp]:
    """Every timm AugmentOp inside `transform` (a Compose, RandAugment, AutoAugment or AugMix)."""
    if isinstance(transform, auto_augment.AugmentOp):
        yield transform
    elif isinstance(transform, (auto_augment.RandAugment, auto_augment.AugMixAugment)):
        for op in transform.ops:
            yield from _augment_ops(op)
    elif isinstance(transform, auto_augment.AutoAugment):
        for sub_policy in transform.policy:
            for op in sub_policy:
                yield from _augment_ops(op)
    elif hasattr(transform, 'transforms'):  # torchvision Compose
        for inner in transform.transforms:
            yield from _augment_ops(inner)


def use_stable_posterize(transform):
    """Make every posterize op that timm put into `transform` use :func:`posterize`; returns `transform`.

    Works on the op instances of this one transform (``AugmentOp.aug_fn``), so other users of timm
    in the same process see timm unchanged.
    """
    for op in _augment_ops(transform):
        if op.aug_fn is auto_augment.posterize:
            op.aug_fn = posterize
    return transform
