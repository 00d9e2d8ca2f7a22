"""data/seg_demo.py: the segmentation demo's canvases written in the ADE20K layout, read back by the ADE20K
reader, reproducible to the byte, rewritten only when the parameters change, and written atomically."""
from __future__ import annotations

import logging
import multiprocessing
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import data.seg_demo as seg_demo
from data.ade20k import ADE20K, IGNORE_INDEX
from data.errors import DataError, DatasetNotFoundError
from data.fashion_mnist import FashionMNIST
from data.seg_demo import SEG_DEMO_CLASSES, SEG_DEMO_MARKER, SegDemoParams, ensure_seg_demo, render_canvas

SMALL = dict(num_train=6, num_val=4, size=(64, 80), glyphs=(2, 3), scale=(1.0, 1.5))


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed uint8 IDX file (magic 0x0000 08 ndim, big-endian dimensions, the bytes)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b''.join(int(n).to_bytes(4, 'big') for n in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


@pytest.fixture
def fake_fmnist(tmp_path: Path) -> str:
    """A Fashion-MNIST folder of 20 synthetic glyphs per split (a solid square with a faint rim): the
    training split holds classes 0-4 only and the test split classes 5-9 only, so an annotation tells
    which split its glyphs came from."""
    root = tmp_path / 'fmnist'
    root.mkdir()
    glyph = np.zeros((28, 28), dtype=np.uint8)
    glyph[5:23, 5:23] = 20  # the faint rim (below the default threshold 32): annotated 0, ignored
    glyph[6:22, 6:22] = 220
    for stem, first_class in (('train', 0), ('t10k', 5)):
        _write_idx(root / f'{stem}-images-idx3-ubyte', np.repeat(glyph[None], 20, axis=0))
        _write_idx(root / f'{stem}-labels-idx1-ubyte', first_class + np.arange(20) % 5)
    return str(root)


def _files(root: Path) -> dict:
    return {str(path.relative_to(root)): path.read_bytes() for path in sorted(root.rglob('*')) if path.is_file()}


def _reduced_classes(root: str, split: str) -> set:
    """The label values (after the reader's reduce-zero-label) of a split, read by the ADE20K reader."""
    dataset = ADE20K(root, split, num_classes=11)
    return set(np.unique(np.concatenate([dataset[i][1].ravel() for i in range(len(dataset))])).tolist())


def test_written_folder_reads_as_ade20k(tmp_path, fashion_mnist_dir):
    root = ensure_seg_demo(str(tmp_path / 'seg'), **SMALL)
    assert root == str(tmp_path / 'seg') and len(SEG_DEMO_CLASSES) == 11
    for split, count in (('train', 6), ('val', 4)):
        dataset = ADE20K(root, split, num_classes=11)
        assert len(dataset) == count
        for index in range(count):
            image, label = dataset[index]
            assert image.mode == 'RGB' and image.size == (80, 64) and label.shape == (64, 80)
            values = set(np.unique(label).tolist())
            assert values <= set(range(11)) | {IGNORE_INDEX} and 0 in values
            assert values & set(range(1, 11)), f'{split} canvas {index} has no glyph'
            assert (label == 0).mean() > 0.5 and (label == IGNORE_INDEX).mean() < 0.1
    with Image.open(tmp_path / 'seg' / 'annotations' / 'validation' / 'ADE_val_00000001.png') as annotation:
        assert annotation.mode == 'L'


def test_validation_canvases_are_drawn_from_the_test_split(tmp_path, fashion_mnist_dir):
    """Each validation canvas is reproduced from the reader's test images (annotation exactly, image up
    to JPEG error), and not from its training images."""
    root = ensure_seg_demo(str(tmp_path / 'seg'), **SMALL)
    params = SegDemoParams(**SMALL)
    val = ADE20K(root, 'val', num_classes=11)
    test_split, train_split = FashionMNIST(fashion_mnist_dir, train=False), FashionMNIST(fashion_mnist_dir)
    for index in range(len(val)):
        image, label = val[index]
        rng_args = [params.seed, 1, index]
        expected, annotation = render_canvas(test_split.images, test_split.targets, params,
                                             np.random.default_rng(rng_args))
        assert np.array_equal(np.where(annotation == 0, IGNORE_INDEX, annotation.astype(np.int64) - 1), label)
        assert np.abs(np.asarray(image, dtype=np.float64) - expected).mean() < 6
        _, from_train = render_canvas(train_split.images, train_split.targets, params,
                                      np.random.default_rng(rng_args))
        assert not np.array_equal(from_train, annotation)


def test_splits_take_glyphs_from_their_own_split(tmp_path, fake_fmnist):
    root = ensure_seg_demo(str(tmp_path / 'seg'), fashion_mnist_root=fake_fmnist, **SMALL)
    # training split: classes 0-4 → annotation 2-6 → read as 1-5; test split: classes 5-9 → 6-10
    train, val = _reduced_classes(root, 'train'), _reduced_classes(root, 'val')
    assert {0, IGNORE_INDEX} <= train and train - {0, IGNORE_INDEX} and train <= {0, IGNORE_INDEX, 1, 2, 3, 4, 5}
    assert {0, IGNORE_INDEX} <= val and val - {0, IGNORE_INDEX} and val <= {0, IGNORE_INDEX, 6, 7, 8, 9, 10}


def test_same_parameters_give_identical_bytes_and_others_rewrite(tmp_path, fake_fmnist):
    first = Path(ensure_seg_demo(str(tmp_path / 'a'), fashion_mnist_root=fake_fmnist, seed=3, **SMALL))
    second = Path(ensure_seg_demo(str(tmp_path / 'b'), fashion_mnist_root=fake_fmnist, seed=3, **SMALL))
    written = _files(first)
    assert written == _files(second) and len(written) == 2 * (6 + 4) + 1
    ensure_seg_demo(str(first), fashion_mnist_root=fake_fmnist, seed=4, **SMALL)
    reseeded = _files(first)
    assert reseeded.keys() == written.keys() and reseeded[SEG_DEMO_MARKER] != written[SEG_DEMO_MARKER]
    assert reseeded['images/training/ADE_train_00000001.jpg'] != written['images/training/ADE_train_00000001.jpg']
    ensure_seg_demo(str(first), fashion_mnist_root=fake_fmnist, seed=4, **dict(SMALL, num_val=2))
    assert len(ADE20K(str(first), 'val', num_classes=11)) == 2  # the old folder's extra canvases are gone
    assert sorted(os.listdir(tmp_path)) == ['a', 'b', 'fmnist']  # nothing left beside it


def test_second_call_does_not_rewrite_nor_read_fashion_mnist(tmp_path, fake_fmnist, caplog):
    with caplog.at_level(logging.INFO, logger='flatten.data'):
        root = Path(ensure_seg_demo(str(tmp_path / 'seg'), fashion_mnist_root=fake_fmnist, **SMALL))
    lines = [record.getMessage() for record in caplog.records if record.name == 'flatten.data']
    assert len(lines) == 1 and str(root) in lines[0] and '6 train + 4 val canvases of 64x80' in lines[0]
    stamps = {name: (root / name).stat().st_mtime_ns for name in (SEG_DEMO_MARKER, 'images/training')}
    for path in Path(fake_fmnist).iterdir():
        path.unlink()  # a rewrite would now fail with DatasetNotFoundError
    caplog.clear()
    with caplog.at_level(logging.INFO, logger='flatten.data'):
        # equal parameters spelled otherwise (lists as YAML gives them) are the same dataset
        again = ensure_seg_demo(str(root), fashion_mnist_root=fake_fmnist, **dict(SMALL, size=[64, 80]))
    assert again == str(root) and not caplog.records
    assert stamps == {name: (root / name).stat().st_mtime_ns for name in stamps}


def test_leftovers_of_a_killed_write_do_not_break_the_next_call(tmp_path, fake_fmnist):
    stale, running = tmp_path / '.seg.tmp-4242-dead', tmp_path / '.seg.tmp-4343-live'
    for leftover in (stale, running):
        (leftover / 'images' / 'training').mkdir(parents=True)
        (leftover / 'images' / 'training' / 'ADE_train_00000001.jpg').write_bytes(b'\xff\xd8 half a JPEG')
    old = os.path.getmtime(stale) - 2 * seg_demo.STALE_TEMP_SECONDS
    os.utime(stale, (old, old))
    root = ensure_seg_demo(str(tmp_path / 'seg'), fashion_mnist_root=fake_fmnist, **SMALL)
    assert len(ADE20K(root, 'train', num_classes=11)) == 6
    # the killed write's folder is removed; a recent one may belong to a running writer and is kept
    assert not stale.exists() and running.exists()


def test_an_interrupted_write_leaves_nothing(tmp_path, fake_fmnist, monkeypatch):
    calls = []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return render_canvas(*args, **kwargs)

    monkeypatch.setattr(seg_demo, 'render_canvas', interrupted)
    with pytest.raises(KeyboardInterrupt):
        ensure_seg_demo(str(tmp_path / 'seg'), fashion_mnist_root=fake_fmnist, **SMALL)
    assert sorted(os.listdir(tmp_path)) == ['fmnist']


def test_loser_of_the_rename_race_uses_the_winners_folder(tmp_path, fake_fmnist, monkeypatch, caplog):
    """Another process installs the same dataset while this one writes: this one keeps the winner's
    folder and removes its own copy."""
    root = str(tmp_path / 'seg')
    real_write = seg_demo.write_seg_demo

    def raced(folder, params):
        monkeypatch.setattr(seg_demo, 'write_seg_demo', real_write)
        ensure_seg_demo(root, fashion_mnist_root=fake_fmnist, **SMALL)  # the other process wins
        return real_write(folder, params)

    monkeypatch.setattr(seg_demo, 'write_seg_demo', raced)
    with caplog.at_level(logging.INFO, logger='flatten.data'):
        assert ensure_seg_demo(root, fashion_mnist_root=fake_fmnist, **SMALL) == root
    assert 'another process wrote' in caplog.records[-1].getMessage()
    assert sorted(os.listdir(tmp_path)) == ['fmnist', 'seg'] and len(ADE20K(root, 'val', num_classes=11)) == 4


def _ensure_in_child(args) -> str:
    root, fmnist = args
    return ensure_seg_demo(root, fashion_mnist_root=fmnist, **SMALL)


def test_concurrent_processes_share_one_folder(tmp_path, fake_fmnist):
    root = str(tmp_path / 'seg')
    with multiprocessing.get_context('fork').Pool(3) as pool:
        assert pool.map(_ensure_in_child, [(root, fake_fmnist)] * 3) == [root] * 3
    assert sorted(os.listdir(tmp_path)) == ['fmnist', 'seg'] and len(ADE20K(root, 'train', num_classes=11)) == 6


def test_missing_fashion_mnist_raises_the_readers_error_and_writes_nothing(tmp_path):
    (tmp_path / 'empty').mkdir()
    with pytest.raises(DatasetNotFoundError, match=r'train-images-idx3-ubyte\[.gz\] not found'):
        ensure_seg_demo(str(tmp_path / 'seg'), fashion_mnist_root=str(tmp_path / 'empty'))
    with pytest.raises(DatasetNotFoundError, match='dataset-fashion-mnist'):
        ensure_seg_demo(str(tmp_path / 'seg'), fashion_mnist_root=str(tmp_path / 'nowhere'))
    assert sorted(os.listdir(tmp_path)) == ['empty']


def test_a_folder_it_did_not_write_is_never_replaced(tmp_path, fake_fmnist):
    foreign = tmp_path / 'ADEChallengeData2016'
    (foreign / 'images').mkdir(parents=True)
    (foreign / 'images' / 'keep.jpg').write_bytes(b'real data')
    with pytest.raises(DataError, match=f'{foreign} exists and holds no {SEG_DEMO_MARKER}'):
        ensure_seg_demo(str(foreign), fashion_mnist_root=fake_fmnist, **SMALL)
    assert (foreign / 'images' / 'keep.jpg').read_bytes() == b'real data'
    (tmp_path / 'empty').mkdir()  # an empty folder holds nothing to lose
    assert len(ADE20K(ensure_seg_demo(str(tmp_path / 'empty'), fashion_mnist_root=fake_fmnist, **SMALL), 'val',
                      num_classes=11)) == 4


@pytest.mark.parametrize('bad, message', [
    (dict(num_val=0), 'num_val must be at least 1, got 0'),
    (dict(size=(16, 64)), r'size must be \(H, W\) with sides of at least 28, got \(16, 64\)'),
    (dict(glyphs=(3, 2)), r'glyphs must be a range \(lo, hi\), 1 <= lo <= hi, got \(3, 2\)'),
    (dict(tint=(0, 300)), r'tint must be a range \(lo, hi\) within \[0, 255\], got \(0, 300\)'),
])
def test_bad_parameters_are_named(tmp_path, bad, message):
    with pytest.raises(DataError, match=message):
        ensure_seg_demo(str(tmp_path / 'seg'), **bad)
    with pytest.raises(TypeError, match='colour'):
        ensure_seg_demo(str(tmp_path / 'seg'), colour=3)
