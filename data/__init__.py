"""Datasets, transforms and loaders.

The COCO names (``CocoDetection``, ``CocoGroundTruth``, ``ensure_det_demo``, ``write_det_demo``) are imported on
first use: they need pycocotools, which only detection runs import."""
from importlib import import_module

from .build import (
    DataBundle,
    build_dataset,
    build_detection_loaders,
    build_loaders,
    build_mixup,
    build_segmentation_loaders,
    build_transform,
)
from .datasets import CheckedImageFolder, SeededAugmentation
from .det_transforms import DetTrainTransform
from .errors import DataError, DatasetNotFoundError
from .fashion_mnist import FashionMNIST
from .samplers import ResumableDistributedSampler, ResumableRepeatAugSampler, ShardedEvalSampler

_LAZY = {'CocoDetection': '.coco', 'CocoGroundTruth': '.coco', 'ensure_det_demo': '.det_demo',
         'write_det_demo': '.det_demo'}

__all__ = ['DataBundle', 'build_dataset', 'build_loaders', 'build_segmentation_loaders', 'build_detection_loaders',
           'build_mixup', 'build_transform', 'CheckedImageFolder', 'SeededAugmentation', 'DetTrainTransform',
           'DataError', 'DatasetNotFoundError', 'FashionMNIST', 'ResumableDistributedSampler',
           'ResumableRepeatAugSampler', 'ShardedEvalSampler', *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        return getattr(import_module(_LAZY[name], __name__), name)
    raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
