"""Datasets, transforms and loaders."""
from .build import DataBundle, build_dataset, build_loaders, build_mixup, build_transform
from .datasets import CheckedImageFolder, SeededAugmentation
from .errors import DataError, DatasetNotFoundError
from .fashion_mnist import FashionMNIST
from .samplers import ResumableDistributedSampler, ResumableRepeatAugSampler, ShardedEvalSampler

__all__ = ['DataBundle', 'build_dataset', 'build_loaders', 'build_mixup', 'build_transform', 'CheckedImageFolder',
           'SeededAugmentation', 'DataError', 'DatasetNotFoundError', 'FashionMNIST', 'ResumableDistributedSampler',
           'ResumableRepeatAugSampler', 'ShardedEvalSampler']
