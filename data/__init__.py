"""Datasets, transforms and loaders."""
from .build import DataBundle, build_dataset, build_loaders, build_mixup, build_transform
from .fashion_mnist import DatasetNotFoundError, FashionMNIST
from .samplers import ShardedEvalSampler

__all__ = ['DataBundle', 'build_dataset', 'build_loaders', 'build_mixup', 'build_transform',
           'DatasetNotFoundError', 'FashionMNIST', 'ShardedEvalSampler']
