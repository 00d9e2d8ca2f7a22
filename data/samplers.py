"""Samplers: exact distributed evaluation, and a training sampler that can resume mid-epoch."""
from __future__ import annotations

from typing import Iterator

import torch

__all__ = ['ShardedEvalSampler', 'ResumableDistributedSampler']


class ShardedEvalSampler(torch.utils.data.Sampler):
    """Rank r visits indices r, r+W, r+2W, …: every item exactly once over all ranks.

    Unlike DistributedSampler there is no padding, so a dataset whose size is not a multiple of
    the world size is neither duplicated nor truncated; ranks may hold one item more or less.
    The order is fixed (no shuffling), so evaluation does not consume any random state.
    """

    def __init__(self, dataset_len: int, rank: int = 0, world_size: int = 1):
        if not 0 <= rank < world_size:
            raise ValueError(f'rank {rank} is outside [0, {world_size})')
        self.indices = range(rank, dataset_len, world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class ResumableDistributedSampler(torch.utils.data.DistributedSampler):
    """DistributedSampler (shuffled by ``seed + epoch``, padded to a multiple of the world size)
    that can start part-way through an epoch.

    ``set_epoch(e)`` starts epoch e from its beginning; ``skip(n)`` then drops this rank's first n
    indices, so a run resumed after k batches of size B sees exactly the samples an uninterrupted
    run would see from batch k on.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.start = 0

    def set_epoch(self, epoch: int) -> None:
        super().set_epoch(epoch)
        self.start = 0

    def skip(self, num_indices: int) -> None:
        if not 0 <= num_indices <= self.num_samples:
            raise ValueError(f'cannot skip {num_indices} of the {self.num_samples} indices of an epoch')
        self.start = num_indices

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start:])

    def __len__(self) -> int:
        return self.num_samples - self.start
