"""Datasets, transforms and loaders (docs/training.md, "Data pipeline").

* ``imagenet`` / ``imagefolder``: torchvision ImageFolder trees ``<DATA_PATH>/train`` and ``/val``.
* ``fashion_mnist``: the Debian IDX files (train 60k / test 10k as val).
* ``ade20k`` (``TASK: segmentation``): the ADEChallengeData2016 folder (data/ade20k.py), with the
  segmentation transforms (data/seg_transforms.py) and an endless shuffled stream cut into evaluation
  periods for training (:class:`data.samplers.ResumableStreamSampler`); whole images for validation.
* ``coco`` (``TASK: detection``): the COCO folder (data/coco.py), with the detection transforms
  (data/det_transforms.py) and the classification's resumable epochs for training; original images, one
  per batch, for validation. ``fmnist_coco``: the demo's folder in the same layout (data/det_demo.py).

Train: timm's RandomResizedCrop + flip + RandAugment + ToTensor + Normalize + RandomErasing,
seeded per sample (:class:`data.datasets.SeededAugmentation`) and sharded by a shuffled
DistributedSampler that can resume mid-epoch (drop_last). Val: the official square resize
``(256/224·IMG)²`` + centre crop (``TEST.CROP``), sharded without padding so every image is
counted once.
"""
from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, List, Optional, Tuple

import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, Mixup, create_transform
from torchvision import transforms
from torchvision.transforms import InterpolationMode

from utils.distributed import barrier
from utils.preemption import ignore_stop_signals

from .ade20k import ADE20K
from .augment import use_stable_posterize
from .datasets import CheckedImageFolder, SeededAugmentation
from .detection_toy import detection_collate
from .errors import DataError, DatasetNotFoundError
from .fashion_mnist import FashionMNIST
from .samplers import (
    EpochTaggedSampler,
    ResumableDistributedSampler,
    ResumableRepeatAugSampler,
    ResumableStreamSampler,
    ShardedEvalSampler,
)
from .seg_demo import SEG_DEMO_CLASSES, ensure_seg_demo
from .seg_transforms import SegEvalTransform, SegTrainTransform

if TYPE_CHECKING:  # data/coco.py needs pycocotools, which only detection runs import
    from .coco import CocoGroundTruth

__all__ = ['DataBundle', 'build_dataset', 'build_transform', 'build_loaders', 'build_segmentation_loaders',
           'build_detection_loaders', 'build_mixup']

logger = logging.getLogger('flatten.data')

_INTERPOLATIONS = {'bicubic': InterpolationMode.BICUBIC, 'bilinear': InterpolationMode.BILINEAR,
                   'nearest': InterpolationMode.NEAREST}


def build_transform(is_train: bool, cfg) -> transforms.Compose:
    """The train (timm) or eval (official square resize + centre crop) transform for `cfg`."""
    img_size = cfg.DATA.IMG_SIZE
    if cfg.DATA.INTERPOLATION not in _INTERPOLATIONS and cfg.DATA.INTERPOLATION != 'random':
        raise DataError(f'DATA.INTERPOLATION={cfg.DATA.INTERPOLATION!r}: use one of '
                         f'{sorted(_INTERPOLATIONS) + ["random"]}')
    if is_train:
        auto_augment = cfg.AUG.AUTO_AUGMENT
        # timm's posterize fails on Pillow 13 when RandAugment asks for 0 bits (data/augment.py)
        return use_stable_posterize(create_transform(
            input_size=img_size,
            is_training=True,
            scale=tuple(cfg.AUG.SCALE),
            ratio=tuple(cfg.AUG.RATIO),
            hflip=cfg.AUG.HFLIP,
            color_jitter=cfg.AUG.COLOR_JITTER if cfg.AUG.COLOR_JITTER > 0 else None,
            auto_augment=auto_augment if (auto_augment and auto_augment != 'none') else None,
            re_prob=cfg.AUG.REPROB,
            re_mode=cfg.AUG.REMODE,
            re_count=cfg.AUG.RECOUNT,
            interpolation=cfg.DATA.INTERPOLATION,
        ))
    # 'random' only makes sense for training; evaluate with bicubic as the official code
    interpolation = _INTERPOLATIONS.get(cfg.DATA.INTERPOLATION, InterpolationMode.BICUBIC)
    if cfg.TEST.CROP:
        # a square, aspect-distorting resize (official FLatten; Swin resizes the short side instead)
        size = int((256 / 224) * img_size)
        resize = [transforms.Resize((size, size), interpolation=interpolation), transforms.CenterCrop(img_size)]
    else:
        resize = [transforms.Resize((img_size, img_size), interpolation=interpolation)]
    return transforms.Compose(resize + [
        transforms.ToTensor(), transforms.Normalize(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD)])


def _image_folder(root: str, split: str, transform, skip_corrupt: bool) -> CheckedImageFolder:
    path = os.path.join(root, split)
    if not os.path.isdir(path):
        raise DatasetNotFoundError(
            f'--data-path {root!r} has no {split}/ folder: expected an ImageFolder tree '
            f'{root}/train/<class>/<image> and {root}/val/<class>/<image>')
    try:
        return CheckedImageFolder(path, transform=transform, skip_corrupt=skip_corrupt)
    except FileNotFoundError as err:  # raised for empty trees / class folders without images
        raise DatasetNotFoundError(f'{path}: {err}') from None


def build_dataset(is_train: bool, cfg) -> Tuple[torch.utils.data.Dataset, List[str]]:
    """(dataset, class names) for the train or val split of ``DATA.DATASET``."""
    transform = build_transform(is_train, cfg)
    name = cfg.DATA.DATASET
    if name in ('imagenet', 'imagefolder'):
        if cfg.DATA.ZIP_MODE:
            raise DataError('DATA.ZIP_MODE (--zip) is not supported: extract the archive and point --data-path '
                            'at the ImageFolder tree')
        if not cfg.DATA.DATA_PATH:
            raise DatasetNotFoundError(f'DATA.DATASET={name!r} needs --data-path (a folder with train/ and val/)')
        dataset = _image_folder(cfg.DATA.DATA_PATH, 'train' if is_train else 'val', transform, cfg.DATA.SKIP_CORRUPT)
        return dataset, list(dataset.classes)
    if name == 'fashion_mnist':
        dataset = FashionMNIST(cfg.DATA.DATA_PATH, train=is_train, transform=transform)
        return dataset, list(dataset.classes)
    raise DataError(f"DATA.DATASET={name!r} is not supported; use 'imagenet', 'imagefolder' or 'fashion_mnist'")


def build_mixup(cfg, num_classes: int) -> Optional[Mixup]:
    """timm Mixup/CutMix with label smoothing, or None when both are off."""
    aug = cfg.AUG
    if not (aug.MIXUP > 0 or aug.CUTMIX > 0 or aug.CUTMIX_MINMAX is not None):
        return None
    return Mixup(
        mixup_alpha=aug.MIXUP, cutmix_alpha=aug.CUTMIX, cutmix_minmax=aug.CUTMIX_MINMAX,
        prob=aug.MIXUP_PROB, switch_prob=aug.MIXUP_SWITCH_PROB, mode=aug.MIXUP_MODE,
        label_smoothing=cfg.MODEL.LABEL_SMOOTHING, num_classes=num_classes)


def _subset(dataset: torch.utils.data.Dataset, size: int, seed: int, split: str) -> torch.utils.data.Subset:
    """A fixed random subset of the `split` ('train' or 'val') split, the same for every rank and run with this seed."""
    if not 0 < size <= len(dataset):
        raise DataError(f'DATA.{split.upper()}_SUBSET={size} must be between 1 and the {len(dataset)} {split} images')
    logger.info(f'{split} split: a fixed random {size:,} of its {len(dataset):,} images (DATA.{split.upper()}_SUBSET)')
    indices = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:size]
    return torch.utils.data.Subset(dataset, indices.tolist())


@dataclass
class DataBundle:
    dataset_train: Optional[torch.utils.data.Dataset]
    dataset_val: torch.utils.data.Dataset
    loader_train: Optional[torch.utils.data.DataLoader]
    loader_val: torch.utils.data.DataLoader
    num_classes: int
    class_names: Tuple[str, ...] = ()  # for per-class logs, where the dataset names its classes
    val_gt: Optional[CocoGroundTruth] = None  # detection: the ground truth of the images evaluated


def _loader(cfg, dataset, sampler, batch_size: int, pin_memory: bool, train: bool,
            collate_fn=None) -> torch.utils.data.DataLoader:
    """A loader of `dataset` in `sampler`'s order with the run's workers. Training loaders drop the last
    partial batch. Each loader draws its workers' base seed from its own generator, not from the global
    RNG: a global draw per epoch would shift drop-path and Mixup randomness between an uninterrupted and
    a resumed run (augmentations do not depend on worker seeds, see SeededAugmentation). Workers persist
    across epochs: the training sampler hands every index its epoch (EpochTaggedSampler)."""
    return torch.utils.data.DataLoader(
        dataset, sampler=sampler, batch_size=batch_size, collate_fn=collate_fn, num_workers=cfg.DATA.NUM_WORKERS,
        pin_memory=pin_memory, drop_last=train, persistent_workers=cfg.DATA.NUM_WORKERS > 0,
        generator=torch.Generator().manual_seed(cfg.SEED), worker_init_fn=ignore_stop_signals)


def _demo_root(cfg, rank: int, name: str, ensure) -> str:
    """The folder of a demo dataset that `ensure` (data/seg_demo.py, data/det_demo.py) writes once, at
    ``--data-path`` or ``<OUTPUT>/datasets/<name>``: rank 0 writes it first, the other ranks then find its
    marker."""
    root = cfg.DATA.DATA_PATH or os.path.join(cfg.OUTPUT or 'output', 'datasets', name)
    if rank == 0:
        ensure(root)
    barrier()
    return ensure(root)


def segmentation_root(cfg, rank: int = 0) -> str:
    """The ADE20K-layout folder of a segmentation config: ``--data-path`` for 'ade20k'; for the demo's
    'fmnist_canvases' the folder data/seg_demo.py writes (once: rank 0 first, then the others read
    its marker), at ``--data-path`` or ``<OUTPUT>/datasets/fmnist_canvases``."""
    name = cfg.DATA.DATASET
    if name == 'ade20k':
        if not cfg.DATA.DATA_PATH:
            raise DatasetNotFoundError("DATA.DATASET='ade20k' needs --data-path (the ADEChallengeData2016 folder)")
        return cfg.DATA.DATA_PATH
    if name == 'fmnist_canvases':
        return _demo_root(cfg, rank, name, ensure_seg_demo)
    raise DataError(f"DATA.DATASET={name!r} is not a segmentation dataset; TASK segmentation reads 'ade20k' (an "
                    f"ADEChallengeData2016 folder) or 'fmnist_canvases' (the demo's)")


def build_segmentation_loaders(cfg, rank: int = 0, world_size: int = 1, train: bool = True,
                               pin_memory: bool = False) -> DataBundle:
    """ADE20K-layout loaders. Validation: whole images one per batch (their sizes differ), at each
    ``SEG.TEST_SCALES`` ratio, with labels at their own size. Training: ``SEG`` crops, seeded per
    (SEED, period, sample), from a stream that gives each rank ``EVAL_PERIOD · BATCH_SIZE ·
    ACCUMULATION_STEPS`` samples per evaluation period."""
    seg, root, classes = cfg.SEG, segmentation_root(cfg, rank), cfg.MODEL.NUM_CLASSES
    dataset_val = ADE20K(root, 'val', classes, SegEvalTransform(seg.SCALE, seg.TEST_SCALES))
    if cfg.DATA.VAL_SUBSET:
        dataset_val = _subset(dataset_val, cfg.DATA.VAL_SUBSET, cfg.SEED, 'val')
    loader_val = _loader(cfg, dataset_val, ShardedEvalSampler(len(dataset_val), rank, world_size), 1, pin_memory,
                         train=False)
    dataset_train = loader_train = None
    if train:
        dataset_train = ADE20K(root, 'train', classes, SegTrainTransform(
            seg.SCALE, seg.RATIO_RANGE, seg.CROP_SIZE, seg.CAT_MAX_RATIO, flip_prob=cfg.AUG.HFLIP))
        if cfg.DATA.TRAIN_SUBSET:
            dataset_train = _subset(dataset_train, cfg.DATA.TRAIN_SUBSET, cfg.SEED, 'train')
        dataset_train = SeededAugmentation(dataset_train, cfg.SEED)
        per_period = cfg.TRAIN.EVAL_PERIOD * cfg.DATA.BATCH_SIZE * cfg.TRAIN.ACCUMULATION_STEPS
        sampler = ResumableStreamSampler(dataset_train, per_period, num_replicas=world_size, rank=rank, seed=cfg.SEED)
        loader_train = _loader(cfg, dataset_train, EpochTaggedSampler(sampler), cfg.DATA.BATCH_SIZE, pin_memory,
                               train=True)
    names = SEG_DEMO_CLASSES if cfg.DATA.DATASET == 'fmnist_canvases' else ()
    return DataBundle(dataset_train, dataset_val, loader_train, loader_val, cfg.MODEL.NUM_CLASSES, tuple(names))


def detection_root(cfg, rank: int = 0) -> str:
    """The COCO-layout folder of a detection config: ``--data-path`` for 'coco'; for the demo's 'fmnist_coco'
    the folder data/det_demo.py writes (once: rank 0 first, then the others read its marker), at
    ``--data-path`` or ``<OUTPUT>/datasets/fmnist_coco``."""
    name = cfg.DATA.DATASET
    if name == 'coco':
        if not cfg.DATA.DATA_PATH:
            raise DatasetNotFoundError("DATA.DATASET='coco' needs --data-path (the COCO folder, holding train2017/, "
                                       "val2017/ and annotations/)")
        return cfg.DATA.DATA_PATH
    if name == 'fmnist_coco':
        from .det_demo import ensure_det_demo  # pycocotools

        return _demo_root(cfg, rank, name, ensure_det_demo)
    raise DataError(f"DATA.DATASET={name!r} is not a detection dataset; TASK detection reads 'coco' (a COCO folder) "
                    f"or 'fmnist_coco' (the demo's)")


def build_detection_loaders(cfg, rank: int = 0, world_size: int = 1, train: bool = True,
                            pin_memory: bool = False) -> DataBundle:
    """COCO-layout loaders; batches are lists ``([image, ...], [target, ...])`` (data/coco.py gives the items).

    Validation: the original images, one per batch (padding a batch would change the predictions, and one
    process must score as two), each on one rank (:class:`ShardedEvalSampler`); ``val_gt`` is the ground truth
    of the images evaluated (DATA.VAL_SUBSET's, when set). Training: the ``DET`` recipe
    (:class:`data.det_transforms.DetTrainTransform`) seeded per (SEED, epoch, sample), over resumable shuffled
    epochs as for classification, so that a mid-epoch resume sees the same batches."""
    from .coco import CocoDetection, CocoGroundTruth  # pycocotools: imported by detection runs only
    from .det_transforms import DetTrainTransform

    root, det = detection_root(cfg, rank), cfg.DET
    coco_val = CocoDetection(root, 'val')
    dataset_val = _subset(coco_val, cfg.DATA.VAL_SUBSET, cfg.SEED, 'val') if cfg.DATA.VAL_SUBSET else coco_val
    loader_val = _loader(cfg, dataset_val, ShardedEvalSampler(len(dataset_val), rank, world_size), 1, pin_memory,
                         train=False, collate_fn=detection_collate)
    dataset_train = loader_train = None
    if train:
        transform = DetTrainTransform(det.TRAIN_SCALES, flip_prob=cfg.AUG.HFLIP, crop_prob=det.CROP_PROB,
                                      crop_scales=det.CROP_SCALES, crop_size=det.CROP_SIZE)
        dataset_train = CocoDetection(root, 'train', transform=transform, train=True)
        if dataset_train.cat_ids != coco_val.cat_ids:
            raise DataError(f'{dataset_train.annotation_file} and {coco_val.annotation_file} list other categories '
                            f'(ids {list(dataset_train.cat_ids)[:10]} and {list(coco_val.cat_ids)[:10]}): the labels '
                            f'1..K would not mean the same classes')
        if cfg.DATA.TRAIN_SUBSET:
            dataset_train = _subset(dataset_train, cfg.DATA.TRAIN_SUBSET, cfg.SEED, 'train')
        dataset_train = SeededAugmentation(dataset_train, cfg.SEED)
        sampler = ResumableDistributedSampler(dataset_train, num_replicas=world_size, rank=rank, shuffle=True,
                                              seed=cfg.SEED)
        if len(sampler) < cfg.DATA.BATCH_SIZE:
            raise DataError(
                f'DATA.BATCH_SIZE={cfg.DATA.BATCH_SIZE} is larger than the {len(sampler)} training images of each '
                f'of the {world_size} process(es) ({len(dataset_train)} in all): no full batch can be formed')
        loader_train = _loader(cfg, dataset_train, EpochTaggedSampler(sampler), cfg.DATA.BATCH_SIZE, pin_memory,
                               train=True, collate_fn=detection_collate)
    return DataBundle(dataset_train, dataset_val, loader_train, loader_val, coco_val.num_classes,
                      coco_val.class_names, CocoGroundTruth.of(dataset_val))


def build_loaders(cfg, rank: int = 0, world_size: int = 1, train: bool = True, pin_memory: bool = False) -> DataBundle:
    """Datasets and loaders; with ``train=False`` (``--eval``) only the validation side is built.

    Each training sample is augmented from its own seed (SEED, epoch, index), so neither the worker
    count nor a mid-epoch resume changes what the model sees; the train loop calls
    ``dataset_train.set_epoch`` and ``loader_train.sampler.set_epoch`` / ``skip`` every epoch. The
    workers (``DATA.NUM_WORKERS`` > 0) live for the whole run.
    """
    if cfg.TASK == 'segmentation':
        return build_segmentation_loaders(cfg, rank, world_size, train, pin_memory)
    if cfg.TASK == 'detection':
        return build_detection_loaders(cfg, rank, world_size, train, pin_memory)
    dataset_val, val_classes = build_dataset(False, cfg)
    num_classes = len(val_classes)
    if cfg.DATA.VAL_SUBSET:
        dataset_val = _subset(dataset_val, cfg.DATA.VAL_SUBSET, cfg.SEED, 'val')
    loader_val = _loader(cfg, dataset_val, ShardedEvalSampler(len(dataset_val), rank, world_size),
                         cfg.DATA.BATCH_SIZE, pin_memory, train=False)
    dataset_train = loader_train = None
    if train:
        dataset_train, train_classes = build_dataset(True, cfg)
        if train_classes != val_classes:
            only_train = sorted(set(train_classes) - set(val_classes))[:5]
            only_val = sorted(set(val_classes) - set(train_classes))[:5]
            raise DataError(
                f'the train split has {len(train_classes)} classes and the val split {len(val_classes)}, with '
                f'different names (only in train: {only_train}; only in val: {only_val}): label indices would '
                f'not match; both splits must hold the same class folders')
        if cfg.DATA.TRAIN_SUBSET:
            dataset_train = _subset(dataset_train, cfg.DATA.TRAIN_SUBSET, cfg.SEED, 'train')
        dataset_train = SeededAugmentation(dataset_train, cfg.SEED)
        if cfg.DATA.REPEATED_AUG:
            sampler = ResumableRepeatAugSampler(dataset_train, num_replicas=world_size, rank=rank, shuffle=True,
                                                seed=cfg.SEED, num_repeats=cfg.DATA.REPEATED_AUG_COUNT)
        else:
            sampler = ResumableDistributedSampler(
                dataset_train, num_replicas=world_size, rank=rank, shuffle=True, seed=cfg.SEED)
        if len(sampler) < cfg.DATA.BATCH_SIZE:
            raise DataError(
                f'DATA.BATCH_SIZE={cfg.DATA.BATCH_SIZE} is larger than the {len(sampler)} training images of each '
                f'of the {world_size} process(es) ({len(dataset_train)} in all): no full batch can be formed')
        loader_train = _loader(cfg, dataset_train, EpochTaggedSampler(sampler), cfg.DATA.BATCH_SIZE, pin_memory,
                               train=True)
    return DataBundle(dataset_train, dataset_val, loader_train, loader_val, num_classes)
