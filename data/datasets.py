"""Dataset wrappers: reproducible per-sample augmentation and images that fail clearly."""
from __future__ import annotations

import logging
import random
from typing import Any, Callable, Optional, Set, Tuple, Union

import numpy as np
import torch
from torchvision import datasets

from .errors import DataError

__all__ = ['SeededAugmentation', 'CheckedImageFolder', 'sample_seed', 'seed_sample']

logger = logging.getLogger('flatten.data')


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """A 63-bit seed that differs for every (run seed, epoch, sample)."""
    return ((seed * 1_000_003 + epoch) * 1_000_003 + index) % (2 ** 63)


def seed_sample(seed: int) -> None:
    """Seed the three generators timm's augmentations draw from: torch's CPU generator, ``random``, numpy.

    Only the CPU generator of torch: ``torch.manual_seed`` also seeds every accelerator backend, which
    costs a few per cent of a 224² RandAugment sample (docs/performance.md, "The input pipeline").
    """
    torch.default_generator.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)


class SeededAugmentation(torch.utils.data.Dataset):
    """Make each training sample's random augmentation a pure function of (seed, epoch, index).

    Before loading sample i the wrapper seeds torch, ``random`` and numpy (timm's RandAugment draws
    from all three) with :func:`sample_seed`. So the augmented batch no longer depends on which
    DataLoader worker loads it or on what that worker drew before: a run resumed mid-epoch, or run
    with another number of workers or ranks, sees exactly the same images. In the main process
    (``num_workers = 0``) the global RNG states are restored afterwards, so training randomness
    (drop path, Mixup) is untouched.

    An index ``copy * N + i`` (N = ``len(dataset)``, from :class:`data.samplers.ResumableRepeatAugSampler`)
    loads sample i with the seed of that encoded index: the copies of a repeated sample are augmented
    differently, and copy 0 (every index a plain sampler yields) keeps the seed of i.

    A key ``(epoch, index)`` (from :class:`data.samplers.EpochTaggedSampler`) uses that epoch instead
    of the one of :meth:`set_epoch`, which persistent DataLoader workers never see.
    """

    def __init__(self, dataset: torch.utils.data.Dataset, seed: int):
        self.dataset = dataset
        self.seed = seed
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: Union[int, Tuple[int, int]]) -> Any:
        epoch, index = key if isinstance(key, tuple) else (self.epoch, key)
        seed = sample_seed(self.seed, epoch, index)
        sample_index = index % len(self.dataset)  # the repeat copy only changes the seed
        in_worker = torch.utils.data.get_worker_info() is not None
        saved = None if in_worker else (torch.get_rng_state(), random.getstate(), np.random.get_state())
        seed_sample(seed)
        try:
            return self.dataset[sample_index]
        finally:
            if saved is not None:
                torch.set_rng_state(saved[0])
                random.setstate(saved[1])
                np.random.set_state(saved[2])


class CheckedImageFolder(datasets.ImageFolder):
    """ImageFolder whose unreadable files are reported by name.

    A corrupt or non-image file raises DataError naming it; with ``skip_corrupt`` it is logged
    once and the next readable sample (in dataset order) takes its place, so batch shapes and the
    epoch length stay as planned.
    """

    def __init__(self, root: str, transform: Optional[Callable] = None, skip_corrupt: bool = False):
        super().__init__(root, transform=transform)
        self.skip_corrupt = skip_corrupt
        self._reported: Set[str] = set()

    def __getitem__(self, index: int) -> Tuple[Any, int]:
        for offset in range(len(self.samples)):
            path, target = self.samples[(index + offset) % len(self.samples)]
            try:
                image = self.loader(path)
            except (OSError, SyntaxError, ValueError) as err:  # PIL: UnidentifiedImageError, truncated data
                if not self.skip_corrupt:
                    raise DataError(
                        f'cannot read image {path}: {err}. Remove or replace the file, or set DATA.SKIP_CORRUPT '
                        f'True to skip unreadable images') from None
                if path not in self._reported:
                    self._reported.add(path)
                    logger.warning(f'skipping unreadable image {path}: {err}')
                continue
            if self.transform is not None:
                image = self.transform(image)
            return image, target
        raise DataError(f'no image under {self.root} can be read')
