"""Repeated augmentation (DATA.REPEATED_AUG): k copies of each drawn image, on different ranks and with
different augmentation seeds, with the epoch length kept and an exact mid-epoch resume."""
from __future__ import annotations

import collections
import math
import random
import re
import sys

import pytest
import torch
from conftest import MICRO_YAML, REPO, make_image_folder

from config import load_config
from data import DataError, ResumableDistributedSampler, ResumableRepeatAugSampler, SeededAugmentation, build_loaders
from data.datasets import sample_seed

WORLDS = [1, 2, 3, 4, 8]
SIZES = [24, 25, 97, 100, 1001]  # 24 = 8 x 3; the others are not multiples of world x 3


def _shards(size: int, world: int, k: int = 3, seed: int = 0, epoch: int = 0) -> list:
    """Every rank's encoded indices (``copy * size + index``) for one epoch."""
    shards = []
    for rank in range(world):
        sampler = ResumableRepeatAugSampler(range(size), num_replicas=world, rank=rank, seed=seed, num_repeats=k)
        sampler.set_epoch(epoch)
        shards.append(list(sampler))
    return shards


@pytest.mark.parametrize('world', WORLDS)
@pytest.mark.parametrize('size', SIZES)
def test_each_drawn_index_appears_exactly_k_times(size, world):
    k = 3
    shards = _shards(size, world, k)
    group = k // math.gcd(k, world)
    expected_len = group * (size // (world * group))
    assert [len(shard) for shard in shards] == [expected_len] * world
    assert 0 <= size / world - expected_len < group  # the epoch keeps (about) its length
    encoded = [value for shard in shards for value in shard]
    assert len(set(encoded)) == len(encoded)  # no (index, copy) twice
    copies = collections.Counter(value % size for value in encoded)
    assert set(copies.values()) == {k}
    assert len(copies) == expected_len * world // k  # about 1/k of the images per epoch
    for index in copies:
        assert sorted(value // size for value in encoded if value % size == index) == list(range(k))


@pytest.mark.parametrize('world', [3, 4, 8])
@pytest.mark.parametrize('size', [25, 97])
def test_copies_are_on_different_ranks_when_world_is_at_least_k(size, world):
    ranks = collections.defaultdict(set)
    for rank, shard in enumerate(_shards(size, world)):
        for value in shard:
            ranks[value % size].add(rank)
    assert ranks and all(len(on) == 3 for on in ranks.values())


@pytest.mark.parametrize('world, k', [(1, 2), (2, 4), (4, 2), (8, 5)])
def test_other_repeat_counts(world, k):
    shards = _shards(97, world, k)
    assert len({len(shard) for shard in shards}) == 1
    copies = collections.Counter(value % 97 for shard in shards for value in shard)
    assert set(copies.values()) == {k}


def test_order_depends_on_seed_and_epoch_only():
    assert _shards(97, 4, seed=5, epoch=2) == _shards(97, 4, seed=5, epoch=2)
    assert _shards(97, 4, seed=5, epoch=2) != _shards(97, 4, seed=5, epoch=3)
    assert _shards(97, 4, seed=5, epoch=2) != _shards(97, 4, seed=6, epoch=2)
    # the images drawn change too, not only their order
    drawn = [{value % 97 for shard in _shards(97, 4, epoch=epoch) for value in shard} for epoch in (0, 1)]
    assert drawn[0] != drawn[1]


@pytest.mark.parametrize('world, rank', [(1, 0), (4, 3), (8, 2)])
def test_skip_then_iterate_is_the_tail_of_the_epoch(world, rank):
    sampler = ResumableRepeatAugSampler(range(1001), num_replicas=world, rank=rank, seed=3)
    sampler.set_epoch(4)
    full = list(sampler)
    for skipped in (0, 1, 7, len(full)):
        sampler.skip(skipped)
        assert len(sampler) == len(full) - skipped
        assert list(sampler) == full[skipped:]
    sampler.set_epoch(4)  # a new epoch starts from its beginning
    assert list(sampler) == full
    with pytest.raises(ValueError, match=f'cannot skip {len(full) + 1} of the {len(full)} indices'):
        sampler.skip(len(full) + 1)


@pytest.mark.parametrize('world', [1, 3, 8])
def test_one_repeat_is_distributed_sampler_order(world):
    for rank in range(world):
        plain = torch.utils.data.DistributedSampler(range(1001), num_replicas=world, rank=rank, seed=2,
                                                    drop_last=True)
        plain.set_epoch(1)
        repeat = ResumableRepeatAugSampler(range(1001), num_replicas=world, rank=rank, seed=2, num_repeats=1)
        repeat.set_epoch(1)
        assert list(repeat) == list(plain)


def test_bad_arguments():
    with pytest.raises(ValueError, match=r'rank 4 is outside \[0, 4\)'):
        ResumableRepeatAugSampler(range(10), num_replicas=4, rank=4)
    with pytest.raises(ValueError, match='num_repeats=0 must be at least 1'):
        ResumableRepeatAugSampler(range(10), num_repeats=0)
    assert len(ResumableRepeatAugSampler(range(5), num_replicas=2)) == 0  # too small for one group per rank


class _SeedProbe(torch.utils.data.Dataset):
    """Returns (index, the torch seed it was loaded under, a draw from `random`)."""

    def __len__(self) -> int:
        return 50

    def __getitem__(self, index: int):
        return index, torch.initial_seed(), random.random()


def test_copies_get_different_seeds_and_plain_seeds_are_unchanged():
    dataset = SeededAugmentation(_SeedProbe(), seed=7)
    dataset.set_epoch(2)
    assert sample_seed(7, 2, 11) == 7000044000080  # the formula every existing run used
    sampler = ResumableDistributedSampler(dataset, num_replicas=2, rank=1, seed=7)
    sampler.set_epoch(2)
    for index in sampler:
        assert dataset[index][:2] == (index, sample_seed(7, 2, index))

    seeds = collections.defaultdict(list)
    for rank in range(4):
        sampler = ResumableRepeatAugSampler(dataset, num_replicas=4, rank=rank, seed=7)
        sampler.set_epoch(2)
        for value in sampler:
            index, seed, draw = dataset[value]
            assert index == value % 50
            seeds[index].append((value // 50, seed, draw))
    assert len(seeds) == 16  # 4 ranks x 12 samples / 3 copies
    for index, copies in seeds.items():
        assert len({seed for _, seed, _ in copies}) == 3 and len({draw for _, _, draw in copies}) == 3
        # copy 0 is augmented exactly as without repeated augmentation
        assert [seed for copy, seed, _ in copies if copy == 0] == [sample_seed(7, 2, index)]


def test_build_loaders_uses_the_repeat_sampler(tmp_path):
    root = make_image_folder(tmp_path / 'data', classes=3, train_per_class=8, val_per_class=1)
    base = ['DATA.DATA_PATH', str(root), 'DATA.IMG_SIZE', '32', 'DATA.NUM_WORKERS', '0', 'DATA.BATCH_SIZE', '6']
    assert isinstance(build_loaders(load_config(None, base)).loader_train.sampler.base, ResumableDistributedSampler)

    bundle = build_loaders(load_config(None, base + ['DATA.REPEATED_AUG', 'True']), rank=0, world_size=1)
    sampler = bundle.loader_train.sampler.base
    assert isinstance(sampler, ResumableRepeatAugSampler) and sampler.num_repeats == 3
    assert len(sampler) == 24 and len(bundle.loader_train) == 4  # 8 of the 24 images, 3 times each
    images, labels = next(iter(bundle.loader_train))
    # one process: the 3 copies of an image are neighbours, augmented differently
    assert labels[0] == labels[1] == labels[2]
    assert not torch.equal(images[0], images[1]) and not torch.equal(images[1], images[2])
    assert not torch.equal(images[0], images[2])

    counted = build_loaders(load_config(None, base + ['DATA.REPEATED_AUG', 'True', 'DATA.REPEATED_AUG_COUNT', '2']),
                            rank=1, world_size=3)
    assert counted.loader_train.sampler.base.num_repeats == 2 and len(counted.loader_train.sampler) == 8

    small = make_image_folder(tmp_path / 'small', classes=2, train_per_class=2, val_per_class=1)
    with pytest.raises(DataError, match='larger than the 3 training images of each of the 1 process'):
        build_loaders(load_config(None, ['DATA.DATA_PATH', str(small), 'DATA.BATCH_SIZE', '4', 'DATA.NUM_WORKERS',
                                         '0', 'DATA.REPEATED_AUG', 'True']))


@pytest.mark.parametrize('stem', ['deit_t', 'deit_s', 'deit_b'])
def test_deit_baseline_configs_use_repeated_augmentation(stem):
    cfg = load_config(str(REPO / 'configs' / f'{stem}.yaml'))
    assert cfg.DATA.REPEATED_AUG and cfg.DATA.REPEATED_AUG_COUNT == 3


@pytest.mark.slow
def test_sigkill_mid_epoch_then_resume_is_bit_identical(tmp_path):
    from test_resume import RANDOM_EVERYTHING, _run, _tensors
    data = make_image_folder(tmp_path / 'data', classes=4, train_per_class=16, val_per_class=2)
    cfg = tmp_path / 'micro.yaml'
    cfg.write_text(MICRO_YAML)

    def command(output):
        # 64 images: 63 samples (21 images x 3) per epoch, 7 updates of 8; a checkpoint every 2 updates
        return [sys.executable, str(REPO / 'main.py'), '--cfg', str(cfg), '--data-path', str(data), '--output',
                str(output), '--repeated-aug', '--opts'] + RANDOM_EVERYTHING + ['TRAIN.EPOCHS', '2']

    reference = tmp_path / 'reference'
    assert not _run(command(reference), tmp_path / 'reference.log')
    assert 'of 2 epochs x 7 updates' in (tmp_path / 'reference.log').read_text()

    interrupted = tmp_path / 'interrupted'
    # after the 6th batch of epoch 0, between checkpoints (the last one is at update 4)
    assert _run(command(interrupted), tmp_path / 'kill.log', lambda log: 'Train: [0/2][5/7]' in log)
    assert not _run(command(interrupted), tmp_path / 'final.log')
    # resumed inside epoch 0 (from update 4, or 6 when the kill came late), so the sampler skipped samples
    resumed = re.search(r'start training: epoch (\d+) update (\d+) of 2 epochs x 7 updates', (tmp_path / 'final.log')
                        .read_text())
    assert resumed and resumed.group(1) == '0' and resumed.group(2) in ('4', '6'), resumed

    expected = torch.load(reference / 'micro' / 'default' / 'ckpt_epoch_1.pth', weights_only=True)
    actual = torch.load(interrupted / 'micro' / 'default' / 'ckpt_epoch_1.pth', weights_only=True)
    assert (actual['epoch'], actual['step']) == (expected['epoch'], expected['step']) == (2, 0)
    assert actual['max_accuracy'] == expected['max_accuracy']
    expected_tensors, actual_tensors = _tensors(expected), _tensors(actual)
    assert expected_tensors.keys() == actual_tensors.keys()
    different = [k for k in expected_tensors if not torch.equal(expected_tensors[k], actual_tensors[k])]
    assert not different, different[:10]
