"""data/seg_transforms.py: the ADE20K recipe's joint image/label transforms keep image and label
aligned, rescale as the recipe says, prefer crops that no class dominates, and pad with the ignore
index."""
from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from PIL import Image

from data.ade20k import IGNORE_INDEX
from data.seg_transforms import (
    IMAGENET_MEAN_255,
    IMAGENET_STD_255,
    SegEvalTransform,
    SegTrainTransform,
    crop_with_cat_max_ratio,
    photometric_distortion,
    rescale_size,
)


def _unnormalise(image: torch.Tensor) -> torch.Tensor:
    return image * torch.tensor(IMAGENET_STD_255).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN_255).view(3, 1, 1)


@pytest.mark.parametrize('size, scale, expected', [
    ((640, 480), (2048, 512), (683, 512)),   # the short side binds
    ((640, 480), (1024, 256), (341, 256)),   # ratio 0.5
    ((3000, 500), (2048, 512), (2048, 341)),  # a panorama: the long side binds
    ((32, 24), (32, 24), (32, 24)),
])
def test_rescale_size(size, scale, expected):
    assert rescale_size(size, scale) == expected


def test_crops_that_one_class_dominates_are_redrawn():
    # 8x32 label: class 0 on columns 0-23, class 1 on 24-31; an 8x8 crop mixes both (neither >= 75 %)
    # only for left edges 19-21, 3 of the 25 possible
    label = np.zeros((8, 32), dtype=np.int64)
    label[:, 24:] = 1
    image = np.zeros((8, 32, 3), dtype=np.uint8)

    def mixed_share(cat_max_ratio: float) -> float:
        random.seed(0)
        mixed = 0
        for _ in range(300):
            _, window = crop_with_cat_max_ratio(image, label, (8, 8), cat_max_ratio)
            counts = np.bincount(window.ravel(), minlength=2)
            mixed += counts.max() / counts.sum() < 0.75
        return mixed / 300

    # one draw: 3/25 = 0.12; up to ten draws: 1 - (22/25)^10 = 0.72
    assert mixed_share(1.0) == pytest.approx(0.12, abs=0.06)
    assert mixed_share(0.75) == pytest.approx(0.72, abs=0.08)
    # a map smaller than the crop is taken whole
    small_image, small_label = crop_with_cat_max_ratio(image[:5, :6], label[:5, :6], (8, 8), 0.75)
    assert small_image.shape == (5, 6, 3) and small_label.shape == (5, 6)


@pytest.mark.parametrize('flip_prob', [0.0, 1.0])
def test_image_and_label_stay_aligned(flip_prob):
    # the red channel carries 10x the label, so alignment is visible after crop and flip
    rng = np.random.default_rng(0)
    label = rng.integers(0, 20, (24, 32))
    pixels = np.stack([label * 10, rng.integers(0, 256, label.shape), rng.integers(0, 256, label.shape)], -1)
    transform = SegTrainTransform(scale=(32, 24), ratio_range=(1.0, 1.0), crop=(16, 16), cat_max_ratio=1.0,
                                  flip_prob=flip_prob, photometric=False)
    random.seed(3)
    image, target = transform(Image.fromarray(pixels.astype(np.uint8)), label)
    assert image.shape == (3, 16, 16) and image.dtype == torch.float32 and target.dtype == torch.int64
    red = _unnormalise(image)[0]
    torch.testing.assert_close(red, target.float() * 10, atol=1e-3, rtol=0)
    # and the crop is a window of the (flipped) label map
    source = torch.from_numpy(label[:, ::-1].copy() if flip_prob else label)
    assert any(torch.equal(source[t:t + 16, s:s + 16], target) for t in range(9) for s in range(17))


def test_small_images_are_padded_with_zero_and_the_ignore_index():
    label = np.full((30, 40), 3)
    image = Image.fromarray(np.full((30, 40, 3), 200, dtype=np.uint8))
    # 40x30 rescaled into (64, 16): factor min(64/40, 16/30) -> 21x16, inside the 32x32 crop
    transform = SegTrainTransform(scale=(64, 16), ratio_range=(1.0, 1.0), crop=(32, 32), flip_prob=0.0,
                                  photometric=False)
    tensor, target = transform(image, label)
    assert tensor.shape == (3, 32, 32) and target.shape == (32, 32)
    assert (target[:16, :21] == 3).all()
    assert (target[16:] == IGNORE_INDEX).all() and (target[:, 21:] == IGNORE_INDEX).all()
    assert (tensor[:, 16:] == 0).all() and (tensor[:, :, 21:] == 0).all()
    torch.testing.assert_close(_unnormalise(tensor)[:, :16, :21], torch.full((3, 16, 21), 200.0), atol=1e-3, rtol=0)


def test_photometric_distortion():
    rng = np.random.default_rng(0)
    colour = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    outputs = []
    for seed in range(20):
        random.seed(seed)
        outputs.append(photometric_distortion(colour))
    assert all(o.shape == colour.shape and o.dtype == np.uint8 for o in outputs)
    assert sum(not np.array_equal(o, colour) for o in outputs) >= 15  # all four steps skipped: 1 in 16
    random.seed(5)
    assert np.array_equal(photometric_distortion(colour), outputs[5])  # seeded: the same draw
    # saturation and hue leave grey grey; brightness and contrast keep it grey too
    grey = np.repeat(rng.integers(0, 256, (8, 8, 1), dtype=np.uint8), 3, axis=-1)
    for seed in range(20):
        random.seed(seed)
        out = photometric_distortion(grey)
        assert (out[..., 0] == out[..., 1]).all() and (out[..., 1] == out[..., 2]).all()


def test_eval_keeps_the_label_at_its_size():
    label = np.arange(48 * 64).reshape(48, 64) % 7
    images, target = SegEvalTransform(scale=(128, 32))(Image.new('RGB', (64, 48)), label)
    assert [image.shape for image in images] == [(3, 32, 43)] and torch.equal(target, torch.from_numpy(label))
    images, _ = SegEvalTransform(scale=(128, 32), ratios=(0.5, 1.5))(Image.new('RGB', (64, 48)), label)
    assert [image.shape for image in images] == [(3, 16, 21), (3, 48, 64)]
