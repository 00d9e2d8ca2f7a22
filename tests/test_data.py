"""Data: Fashion-MNIST IDX reader, ImageFolder loaders, eval sharding, transforms, errors."""
from __future__ import annotations

import gzip
import shutil

import numpy as np
import pytest
import torch
from conftest import make_image_folder

from config import load_config
from data import DatasetNotFoundError, FashionMNIST, ShardedEvalSampler, build_loaders, build_transform
from data.fashion_mnist import read_idx


def _write_idx(path, array: np.ndarray, compress: bool = True) -> None:
    header = bytes([0, 0, 0x08, array.ndim]) + b''.join(int(n).to_bytes(4, 'big') for n in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if compress:
        with gzip.open(str(path) + '.gz', 'wb') as f:
            f.write(payload)
    else:
        path.write_bytes(payload)


def test_idx_reader_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 28, 28))
    _write_idx(tmp_path / 'x-idx3-ubyte', images)
    assert np.array_equal(read_idx(str(tmp_path / 'x-idx3-ubyte.gz')), images)
    _write_idx(tmp_path / 'y-idx1-ubyte', np.arange(5), compress=False)
    assert read_idx(str(tmp_path / 'y-idx1-ubyte')).tolist() == [0, 1, 2, 3, 4]


def test_idx_reader_rejects_bad_files(tmp_path):
    (tmp_path / 'junk').write_bytes(b'hello world')
    with pytest.raises(ValueError, match='not an IDX file'):
        read_idx(str(tmp_path / 'junk'))
    _write_idx(tmp_path / 'cut', np.zeros((5, 4, 4)), compress=False)
    (tmp_path / 'cut').write_bytes((tmp_path / 'cut').read_bytes()[:-3])
    with pytest.raises(ValueError, match='truncated'):
        read_idx(str(tmp_path / 'cut'))


def test_missing_fashion_mnist_says_how_to_install(tmp_path):
    with pytest.raises(DatasetNotFoundError, match='apt-get install -y dataset-fashion-mnist'):
        FashionMNIST(str(tmp_path / 'nowhere'))
    with pytest.raises(DatasetNotFoundError, match='train-images-idx3-ubyte'):
        FashionMNIST(str(tmp_path))


def test_real_fashion_mnist(fashion_mnist_dir):
    train, test = FashionMNIST(fashion_mnist_dir, train=True), FashionMNIST(fashion_mnist_dir, train=False)
    assert (len(train), len(test)) == (60000, 10000)
    image, label = test[0]
    assert image.mode == 'RGB' and image.size == (28, 28) and label == 9  # an ankle boot
    assert np.bincount(test.targets).tolist() == [1000] * 10


def test_fashion_mnist_from_a_copied_folder(fashion_mnist_dir, tmp_path):
    for name in ('t10k-images-idx3-ubyte.gz', 't10k-labels-idx1-ubyte.gz'):
        shutil.copy(f'{fashion_mnist_dir}/{name}', tmp_path / name)
    assert len(FashionMNIST(str(tmp_path), train=False)) == 10000


@pytest.mark.parametrize('size, world', [(97, 2), (97, 3), (10007, 8), (5, 8), (12, 4)])
def test_eval_sharding_counts_every_item_once(size, world):
    shards = [list(ShardedEvalSampler(size, rank, world)) for rank in range(world)]
    flat = sorted(i for shard in shards for i in shard)
    assert flat == list(range(size))
    assert max(map(len, shards)) - min(map(len, shards)) <= 1


def test_eval_transform_is_the_official_square_resize():
    from PIL import Image
    image = Image.new('RGB', (300, 200))
    cfg = load_config(None)
    out = build_transform(False, cfg)(image)
    assert out.shape == (3, 224, 224)
    names = [type(t).__name__ for t in build_transform(False, cfg).transforms]
    assert names == ['Resize', 'CenterCrop', 'ToTensor', 'Normalize']
    assert build_transform(False, cfg).transforms[0].size == (256, 256)
    no_crop = build_transform(False, load_config(None, ['TEST.CROP', 'False', 'DATA.IMG_SIZE', '384']))
    assert no_crop.transforms[0].size == (384, 384) and no_crop(image).shape == (3, 384, 384)


def test_train_transform_uses_timm_with_config_values():
    cfg = load_config(None, ['DATA.IMG_SIZE', '64'])
    names = [type(t).__name__ for t in build_transform(True, cfg).transforms]
    assert names[0] == 'RandomResizedCropAndInterpolation' and 'RandAugment' in names
    assert names[-1] == 'RandomErasing'
    plain = load_config(None, ['AUG.AUTO_AUGMENT', 'none', 'AUG.REPROB', '0.0', 'AUG.COLOR_JITTER', '0.0'])
    assert [type(t).__name__ for t in build_transform(True, plain).transforms][1:] == [
        'RandomHorizontalFlip', 'MaybeToTensor', 'Normalize']


def test_image_folder_loaders(image_folder):
    cfg = load_config(None, ['DATA.DATA_PATH', str(image_folder), 'DATA.BATCH_SIZE', '4', 'DATA.IMG_SIZE', '32',
                             'DATA.NUM_WORKERS', '0'])
    bundle = build_loaders(cfg)
    assert bundle.num_classes == 3 and len(bundle.dataset_train) == 24 and len(bundle.dataset_val) == 9
    images, labels = next(iter(bundle.loader_train))
    assert images.shape == (4, 3, 32, 32) and labels.dtype == torch.int64
    assert len(bundle.loader_train) == 6  # drop_last
    assert sum(len(batch[1]) for batch in bundle.loader_val) == 9


def test_subsets_are_fixed_draws_of_each_split(image_folder, caplog):
    opts = ['DATA.DATA_PATH', str(image_folder), 'DATA.BATCH_SIZE', '2', 'DATA.IMG_SIZE', '32', 'DATA.NUM_WORKERS', '0',
            'DATA.TRAIN_SUBSET', '10', 'DATA.VAL_SUBSET', '5']
    with caplog.at_level('INFO', logger='flatten.data'):
        bundle = build_loaders(load_config(None, opts))
    assert 'val split: a fixed random 5 of its 9 images (DATA.VAL_SUBSET)' in caplog.text
    assert len(bundle.dataset_train) == 10 and len(bundle.dataset_val) == 5
    assert sum(len(labels) for _, labels in bundle.loader_val) == 5 and bundle.num_classes == 3
    # the same seed draws the same images; another seed other ones
    again = build_loaders(load_config(None, opts))
    assert again.dataset_val.indices == bundle.dataset_val.indices
    assert build_loaders(load_config(None, opts + ['SEED', '1'])).dataset_val.indices != bundle.dataset_val.indices
    for key, size, message in (('DATA.VAL_SUBSET', '10', 'DATA.VAL_SUBSET=10 must be between 1 and the 9 val images'),
                               ('DATA.TRAIN_SUBSET', '25',
                                'DATA.TRAIN_SUBSET=25 must be between 1 and the 24 train images')):
        with pytest.raises(ValueError, match=message):
            build_loaders(load_config(None, opts + [key, size]))


def _epochs(bundle, epochs, skip=0):
    """The training batches of each epoch, driven as main.run_epoch drives them."""
    out = []
    for epoch in range(epochs):
        bundle.dataset_train.set_epoch(epoch)
        bundle.loader_train.sampler.set_epoch(epoch)
        bundle.loader_train.sampler.skip(skip if epoch == epochs - 1 else 0)
        out.append([(images, labels) for images, labels in bundle.loader_train])
    return out


def test_persistent_workers_see_every_epoch(image_folder):
    """Workers live for the run (persistent_workers), yet each epoch's augmentations are those of the
    main process at that epoch, including an epoch resumed part-way through."""
    opts = ['DATA.DATA_PATH', str(image_folder), 'DATA.BATCH_SIZE', '4', 'DATA.IMG_SIZE', '32']
    reference = _epochs(build_loaders(load_config(None, opts + ['DATA.NUM_WORKERS', '0'])), 3, skip=8)
    bundle = build_loaders(load_config(None, opts + ['DATA.NUM_WORKERS', '2']))
    assert bundle.loader_train.persistent_workers and bundle.loader_val.persistent_workers
    workers = _epochs(bundle, 3, skip=8)
    iterator = bundle.loader_train._iterator
    assert len(workers[2]) == 4  # 6 batches, the first 2 skipped
    for ref_epoch, epoch in zip(reference, workers, strict=True):
        for (ref_images, ref_labels), (images, labels) in zip(ref_epoch, epoch, strict=True):
            assert torch.equal(ref_labels, labels) and torch.equal(ref_images, images)
    assert not torch.equal(workers[0][0][0], workers[1][0][0])  # the epochs differ
    next(iter(bundle.loader_train))
    assert bundle.loader_train._iterator is iterator  # the same workers, not new ones


def test_image_folder_errors(tmp_path):
    root = make_image_folder(tmp_path / 'data', classes=2, train_per_class=2, val_per_class=1)
    base = ['DATA.BATCH_SIZE', '2', 'DATA.IMG_SIZE', '32', 'DATA.NUM_WORKERS', '0']
    with pytest.raises(DatasetNotFoundError, match='needs --data-path'):
        build_loaders(load_config(None, base))
    shutil.rmtree(root / 'val')
    with pytest.raises(DatasetNotFoundError, match="has no val/ folder"):
        build_loaders(load_config(None, base + ['DATA.DATA_PATH', str(root)]))
    root = make_image_folder(tmp_path / 'data2', classes=2, train_per_class=2, val_per_class=1)
    with pytest.raises(ValueError, match='larger than the 4 training images'):
        build_loaders(load_config(None, ['DATA.DATA_PATH', str(root), 'DATA.BATCH_SIZE', '8', 'DATA.NUM_WORKERS', '0']))
    make_image_folder(tmp_path / 'extra', classes=3, train_per_class=2, val_per_class=1)
    shutil.move(str(tmp_path / 'extra' / 'train' / 'class_2'), str(root / 'train' / 'class_2'))
    with pytest.raises(ValueError, match='the train split has 3 classes and the val split 2'):
        build_loaders(load_config(None, base + ['DATA.DATA_PATH', str(root)]))
