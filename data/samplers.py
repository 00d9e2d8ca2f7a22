"""Samplers for distributed evaluation."""
from __future__ import annotations

from typing import Iterator

import torch

__all__ = ['ShardedEvalSampler']


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
