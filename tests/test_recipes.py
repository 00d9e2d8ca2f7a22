"""The shipped recipes as shipped: their real augmentation on real images, and one full-size CLI run.

Every yaml in configs/ builds its own train and eval transforms and Mixup/CutMix, which run over
Fashion-MNIST images rendered as RGB JPEGs at the config's size, with the per-sample seeds training
uses. RandAugment's posterize to 0 bits, which Pillow 13 rejects, is checked op by op against the
Pillow < 13 result, independently of the Pillow installed.
"""
from __future__ import annotations

import functools
import re
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch
from conftest import REPO, decode_rgb, fashion_mnist_samples, make_fashion_mnist_image_folder, render_rgb_jpeg, run_main
from PIL import Image, ImageOps
from timm.data import auto_augment

from config import load_config
from data import SeededAugmentation, build_mixup, build_transform
from data.augment import posterize, use_stable_posterize

CONFIGS = sorted(str(path.relative_to(REPO)) for path in (REPO / 'configs').rglob('*.yaml'))
# Every key build_transform(True, ...) reads, and the seed the per-sample augmentation seeds derive from
TRAIN_TRANSFORM_KEYS = ('DATA.IMG_SIZE', 'DATA.INTERPOLATION', 'AUG.SCALE', 'AUG.RATIO', 'AUG.HFLIP',
                        'AUG.COLOR_JITTER', 'AUG.AUTO_AUGMENT', 'AUG.REPROB', 'AUG.REMODE', 'AUG.RECOUNT', 'SEED')
CALLS_PER_SETTING = 3000
IMAGES_PER_CLASS = 10  # 100 real images, so 30 epochs of (epoch, index) seeds make 3,000 calls
ACC = re.compile(r' \* Acc@1 (\d+\.\d+) Acc@5 (\d+\.\d+)')


def _value(cfg, key: str):
    for part in key.split('.'):
        cfg = cfg[part]
    return tuple(cfg) if isinstance(cfg, (list, tuple)) else cfg


def _settings() -> Dict[Tuple, List[str]]:
    """Config paths grouped by their train-augmentation setting."""
    groups: Dict[Tuple, List[str]] = {}
    for path in CONFIGS:
        cfg = load_config(str(REPO / path))
        groups.setdefault(tuple(_value(cfg, key) for key in TRAIN_TRANSFORM_KEYS), []).append(path)
    return groups


SETTINGS = _settings()


def _setting_id(setting: Tuple) -> str:
    named = dict(zip(TRAIN_TRANSFORM_KEYS, setting, strict=True))
    return f'{named["DATA.IMG_SIZE"]}px-{named["AUG.AUTO_AUGMENT"]}'


@functools.cache
def _jpegs(size: int) -> Tuple[Tuple[bytes, ...], Tuple[int, ...]]:
    """The real test images, rendered once per size as in-memory RGB JPEG files."""
    images, labels = fashion_mnist_samples(IMAGES_PER_CLASS)
    return tuple(render_rgb_jpeg(image, size) for image in images), tuple(int(label) for label in labels)


class JpegImages(torch.utils.data.Dataset):
    """(transform(decoded JPEG), label) items, like an ImageFolder held in memory."""

    def __init__(self, jpegs, labels, transform):
        self.jpegs, self.labels, self.transform = jpegs, labels, transform

    def __len__(self) -> int:
        return len(self.jpegs)

    def __getitem__(self, index: int):
        return self.transform(decode_rgb(self.jpegs[index])), self.labels[index]


def _rgb_image(size: int = 224) -> Image.Image:
    return decode_rgb(_jpegs(size)[0][0])


def _pillow12_posterize(array: np.ndarray, bits: int) -> np.ndarray:
    """What Pillow < 13 ImageOps.posterize made of uint8 pixels: v & ~(2**(8 - bits) - 1), in 8 bits."""
    return array & np.uint8(~(2 ** (8 - bits) - 1) & 0xFF)


# --- posterize ------------------------------------------------------------------------------------------

@pytest.mark.parametrize('magnitude, bits', [(10, 0), (7.5, 1), (5, 2), (2.5, 3), (0, 4)])
def test_posterize_increasing_gives_the_pillow12_image(fashion_mnist_dir, magnitude, bits):
    """timm's op at magnitude 10 asks for 0 bits (Pillow 13 raises); fixed, it gives the black image."""
    op = auto_augment.AugmentOp('PosterizeIncreasing', prob=1.0, magnitude=magnitude)
    assert op.level_fn(magnitude, op.hparams) == (bits,)
    use_stable_posterize(op)
    image = _rgb_image()
    out = op(image)
    assert (out.mode, out.size) == (image.mode, image.size)
    expected = _pillow12_posterize(np.asarray(image), bits)
    np.testing.assert_array_equal(np.asarray(out), expected)
    if bits == 0:
        assert not np.asarray(out).any() and np.asarray(image).any()


@pytest.mark.parametrize('mode', ['L', 'RGB'])
def test_posterize_every_bit_count(fashion_mnist_dir, mode):
    image = _rgb_image(64).convert(mode)
    pixels = np.asarray(image)
    for bits in range(-2, 11):
        expected = pixels if bits >= 8 else _pillow12_posterize(pixels, max(bits, 0))
        np.testing.assert_array_equal(np.asarray(posterize(image, bits, fillcolor=(0, 0, 0))), expected)
        if 1 <= bits <= 8:  # where every Pillow accepts the bit count, it agrees
            np.testing.assert_array_equal(np.asarray(ImageOps.posterize(image, bits)), expected)


def _ops(transform) -> List[auto_augment.AugmentOp]:
    [augment] = [t for t in transform.transforms if isinstance(t, (auto_augment.RandAugment, auto_augment.AutoAugment))]
    if isinstance(augment, auto_augment.RandAugment):
        return list(augment.ops)
    return [op for sub_policy in augment.policy for op in sub_policy]


@pytest.mark.parametrize('policy', [None, 'rand-m9-mstd0.5', 'v0', 'original', 'augmix-m5-w3'])
def test_train_transform_uses_the_stable_posterize(policy):
    """build_transform puts the fixed posterize into its own ops; timm's tables stay as they are."""
    opts = ['AUG.AUTO_AUGMENT', policy] if policy else []
    transform = build_transform(True, load_config(str(REPO / 'configs/flatten_swin_t.yaml'), opts))
    if policy and policy.startswith('augmix'):
        [augmix] = [t for t in transform.transforms if isinstance(t, auto_augment.AugMixAugment)]
        ops = list(augmix.ops)
    else:
        ops = _ops(transform)
    posterize_ops = [op for op in ops if op.name.startswith('Posterize')]
    assert posterize_ops and all(op.aug_fn is posterize for op in posterize_ops)
    assert not any(op.aug_fn is auto_augment.posterize for op in ops)
    if policy is None:  # the shipped recipe
        assert [op.name for op in posterize_ops] == ['PosterizeIncreasing']
    assert auto_augment.NAME_TO_OP['PosterizeIncreasing'] is auto_augment.posterize


# --- every shipped recipe ---------------------------------------------------------------------------------

def test_configs_fall_into_few_augmentation_settings():
    """The grouping below sees every config; configs that share a setting build the same transform."""
    assert sum(map(len, SETTINGS.values())) == len(CONFIGS) >= 60
    for paths in SETTINGS.values():
        reprs = {repr(build_transform(True, load_config(str(REPO / path)))) for path in paths}
        assert len(reprs) == 1, paths


def _check_mixup(cfg, batches: List[Tuple[torch.Tensor, torch.Tensor]]) -> None:
    mixup = build_mixup(cfg, cfg.MODEL.NUM_CLASSES)
    if mixup is None:
        assert cfg.AUG.MIXUP == 0 and cfg.AUG.CUTMIX == 0
        return
    for images, labels in batches:
        mixed, targets = mixup(images.clone(), labels)
        assert mixed.shape == images.shape and torch.isfinite(mixed).all()
        assert targets.shape == (len(labels), cfg.MODEL.NUM_CLASSES) and (targets >= 0).all()
        torch.testing.assert_close(targets.sum(1), torch.ones(len(labels)))


@pytest.mark.slow
@pytest.mark.parametrize('setting', list(SETTINGS), ids=_setting_id)
def test_shipped_augmentation_on_real_images(fashion_mnist_dir, setting):
    """3,000 seeded train-transform calls per setting, shared round-robin among its configs (each with
    the transform its own yaml builds); then each config's eval transform and Mixup/CutMix."""
    paths = SETTINGS[setting]
    cfgs = [load_config(str(REPO / path)) for path in paths]
    size = cfgs[0].DATA.IMG_SIZE
    jpegs, labels = _jpegs(size)
    datasets = [SeededAugmentation(JpegImages(jpegs, labels, build_transform(True, cfg)), cfg.SEED) for cfg in cfgs]
    samples = []
    for call in range(CALLS_PER_SETTING):
        epoch, index = divmod(call, len(jpegs))
        dataset = datasets[call % len(datasets)]
        dataset.set_epoch(epoch)
        image, label = dataset[index]
        assert image.shape == (3, size, size) and image.dtype == torch.float32, paths[call % len(datasets)]
        assert torch.isfinite(image).all()
        samples.append((image, label))

    batch = 8  # Mixup's batch mode needs an even batch
    batches = [(torch.stack([image for image, _ in samples[i:i + batch]]),
                torch.tensor([label for _, label in samples[i:i + batch]])) for i in range(0, 3 * batch, batch)]
    eval_images = [decode_rgb(jpeg) for jpeg in jpegs[::25]]
    for path, cfg in zip(paths, cfgs, strict=True):
        evaluate = build_transform(False, cfg)
        for image in eval_images:
            out = evaluate(image)
            assert out.shape == (3, size, size) and out.dtype == torch.float32 and torch.isfinite(out).all(), path
        _check_mixup(cfg, batches)


# --- one full-size run of the official recipe ---------------------------------------------------------------

@pytest.mark.slow
def test_official_swin_t_recipe_trains_saves_and_evaluates(tmp_path, fashion_mnist_dir):
    """configs/flatten_swin_t.yaml as shipped (29M parameters, 224², RandAugment, Mixup/CutMix, label
    smoothing, random erasing, 8 loader workers) for one short epoch of real images, then --eval of the
    checkpoint it wrote. Only the data, batch size and schedule length are changed."""
    data = make_fashion_mnist_image_folder(tmp_path / 'data', size=224, train_per_class=4, val_per_class=2)
    cfg = str(REPO / 'configs' / 'flatten_swin_t.yaml')
    out = tmp_path / 'out'
    train = run_main(['--cfg', cfg, '--data-path', data, '--batch-size', '8', '--output', out,
                      '--opts', 'TRAIN.EPOCHS', '1'], threads=None, timeout=1200)
    assert train.returncode == 0, train.stdout[-3000:] + train.stderr[-3000:]
    # the full FLatten-Swin-T body, logged as the registered variant it is; main.py sizes the head to the
    # dataset's 10 classes (29.19M with 1000)
    assert ('flatten_swin_tiny_patch4_224: flatten_swin_tiny_patch4_224(num_classes=10, drop_path_rate=0.2), '
            '28,431,074 parameters') in train.stdout
    assert 'start training: epoch 0 update 0 of 1 epochs x 5 updates' in train.stdout
    assert re.search(r'Train: \[0/1\]\[4/5\]', train.stdout)
    trained = ACC.findall(train.stdout)
    assert len(trained) == 1
    run = out / 'flatten_swin_tiny_patch4_224' / 'default'
    resolved = (run / 'config.yaml').read_text()
    for setting in ('AUTO_AUGMENT: rand-m9-mstd0.5-inc1', 'MIXUP: 0.8', 'CUTMIX: 1.0', 'LABEL_SMOOTHING: 0.1',
                    'REPROB: 0.25', 'IMG_SIZE: 224', 'NUM_WORKERS: 8', 'WARMUP_EPOCHS: 20'):
        assert setting in resolved, setting

    evaluation = run_main(['--cfg', cfg, '--data-path', data, '--batch-size', '8', '--output', tmp_path / 'eval',
                           '--eval', '--resume', run / 'ckpt_epoch_0.pth'], threads=None)
    assert evaluation.returncode == 0, evaluation.stdout[-3000:] + evaluation.stderr[-3000:]
    assert ACC.findall(evaluation.stdout) == trained
