"""Samplers: exact distributed evaluation, and training samplers that can resume mid-epoch."""
from __future__ import annotations

import math
from typing import Iterator, Sized, Tuple

import torch

__all__ = ['ShardedEvalSampler', 'ResumableDistributedSampler', 'ResumableRepeatAugSampler', 'ResumableStreamSampler',
           'EpochTaggedSampler']


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


class _StartsMidEpoch:
    """``set_epoch``, ``skip(n)`` and ``__len__`` of a sampler that draws ``num_samples`` indices per epoch and
    yields them from position ``start`` on (reset to 0 by ``set_epoch``)."""
    num_samples: int
    epoch: int = 0
    start: int = 0

    def set_epoch(self, epoch: int) -> None:
        """Start epoch `epoch` from its beginning."""
        self.epoch = epoch
        self.start = 0

    def skip(self, num_indices: int) -> None:
        if not 0 <= num_indices <= self.num_samples:
            raise ValueError(f'cannot skip {num_indices} of the {self.num_samples} indices of an epoch')
        self.start = num_indices

    def __len__(self) -> int:
        return self.num_samples - self.start


class ResumableDistributedSampler(_StartsMidEpoch, torch.utils.data.DistributedSampler):
    """DistributedSampler (shuffled by ``seed + epoch``, padded to a multiple of the world size)
    that can start part-way through an epoch.

    ``set_epoch(e)`` starts epoch e from its beginning; ``skip(n)`` then drops this rank's first n
    indices, so a run resumed after k batches of size B sees exactly the samples an uninterrupted
    run would see from batch k on.
    """

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        return iter(list(super().__iter__())[self.start:])


class ResumableRepeatAugSampler(_StartsMidEpoch, torch.utils.data.Sampler):
    """Repeated augmentation (DeiT): each image drawn in an epoch is drawn ``num_repeats`` = k times,
    each copy augmented differently and, when the world size W >= k, on k different ranks.

    Epoch e shuffles the N indices by ``seed + e`` (the same order on every rank), repeats each one k
    times in a row and deals the list round-robin to the ranks. Every rank takes the same number of
    samples, the largest multiple of g = k / gcd(k, W) that is at most N / W::

        num_samples = g * floor(N / (W * g))

    so the ranks jointly take a whole number, ``num_samples * W / k``, of k-copy groups: every index
    drawn appears exactly k times. The epoch keeps its length (about N / W per rank, as without
    repeats), so it covers about N / k distinct images. With k = 1 the order is that of
    ``DistributedSampler(drop_last=True)``.

    The sampler yields ``copy * N + index`` (copy in [0, k)); :class:`data.datasets.SeededAugmentation`
    decodes it, so copy 0 keeps the seed a plain sampler gives ``index``. ``set_epoch`` and ``skip``
    behave as in :class:`ResumableDistributedSampler`.
    """

    def __init__(self, dataset: Sized, num_replicas: int = 1, rank: int = 0, shuffle: bool = True, seed: int = 0,
                 num_repeats: int = 3):
        if not 0 <= rank < num_replicas:
            raise ValueError(f'rank {rank} is outside [0, {num_replicas})')
        if num_repeats < 1:
            raise ValueError(f'num_repeats={num_repeats} must be at least 1')
        self.dataset_len = len(dataset)
        self.num_replicas, self.rank = num_replicas, rank
        self.shuffle, self.seed, self.num_repeats = shuffle, seed, num_repeats
        group = num_repeats // math.gcd(num_repeats, num_replicas)
        self.num_samples = group * (self.dataset_len // (num_replicas * group))
        # indices drawn per epoch, each num_repeats times over all ranks
        self.num_selected = self.num_samples * num_replicas // num_repeats
        self.epoch = 0
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.dataset_len, generator=generator)
        else:
            order = torch.arange(self.dataset_len)
        # position p of the repeated list holds copy p % k of order[p // k]; rank r takes p = r, r + W, ...
        positions = torch.arange(self.rank, self.num_samples * self.num_replicas, self.num_replicas)
        encoded = (positions % self.num_repeats) * self.dataset_len + order[positions // self.num_repeats]
        return iter(encoded[self.start:].tolist())


class ResumableStreamSampler(_StartsMidEpoch, torch.utils.data.Sampler):
    """The training order of an iteration schedule: an endless stream of passes over the N indices,
    pass p shuffled by ``seed + p``, cut into "epochs" (evaluation periods) of ``num_samples``
    indices per rank.

    Period e covers stream positions ``[e·num_samples·W, (e+1)·num_samples·W)`` and rank r takes
    every W-th of them from r on, so the ranks' k-th batches together are the stream positions a
    single process with W times the batch takes in its k-th batch: the same samples for any world
    size at the same total batch. A period may span passes, and the end of a pass is never dropped.

    The sampler yields ``p * N + index`` (p the pass): :class:`data.datasets.SeededAugmentation`
    decodes it, so an image drawn again in a later pass of the same period is augmented afresh.
    ``set_epoch`` and ``skip`` behave as in :class:`ResumableDistributedSampler`.
    """

    def __init__(self, dataset: Sized, num_samples: int, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        if not 0 <= rank < num_replicas:
            raise ValueError(f'rank {rank} is outside [0, {num_replicas})')
        if len(dataset) < 1 or num_samples < 1:
            raise ValueError(f'a stream needs indices and a period length, got {len(dataset)} and {num_samples}')
        self.dataset_len, self.num_samples = len(dataset), num_samples
        self.num_replicas, self.rank, self.seed = num_replicas, rank, seed
        self.epoch = 0
        self.start = 0

    def __iter__(self) -> Iterator[int]:
        n, span = self.dataset_len, self.num_samples * self.num_replicas
        positions = torch.arange(self.epoch * span + self.rank, (self.epoch + 1) * span, self.num_replicas)
        positions = positions[self.start:]
        passes = positions // n
        encoded = torch.empty_like(positions)
        for p in passes.unique().tolist():
            order = torch.randperm(n, generator=torch.Generator().manual_seed(self.seed + p))
            here = passes == p
            encoded[here] = p * n + order[positions[here] % n]
        return iter(encoded.tolist())


class EpochTaggedSampler(torch.utils.data.Sampler):
    """Yield ``(epoch, index)`` for every index of a training sampler `base` (one of the two above).

    :class:`data.datasets.SeededAugmentation` seeds a sample from (seed, epoch, index). With
    ``persistent_workers`` each DataLoader worker keeps its own copy of the dataset from the first
    epoch, so a ``set_epoch`` on the main process's dataset never reaches it; the epoch travels with
    the index instead, and the workers can live for the whole run. ``set_epoch``, ``skip``, ``epoch``
    and ``len`` are those of `base`.
    """

    def __init__(self, base: _StartsMidEpoch):
        self.base = base

    @property
    def epoch(self) -> int:
        return self.base.epoch

    def set_epoch(self, epoch: int) -> None:
        self.base.set_epoch(epoch)

    def skip(self, num_indices: int) -> None:
        self.base.skip(num_indices)

    def __len__(self) -> int:
        return len(self.base)

    def __iter__(self) -> Iterator[Tuple[int, int]]:
        epoch = self.base.epoch
        return ((epoch, index) for index in self.base)
