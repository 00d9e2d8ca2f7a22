"""Train-loader throughput of the ImageNet recipe against a plain timm + torchvision loader, same files.

    python -m bench.loader --models configs/flatten_swin_t.yaml --images 600 --workers 0 1 2 --repeats 7 \\
        --json bench/results/loader_cpu.json

A folder of real JPEGs is rendered once from Fashion-MNIST (``apt-get install -y dataset-fashion-mnist``):
``--images`` training pictures, each glyph upscaled bicubically to ``--render-size``² RGB and saved at
JPEG quality 90 (a typical ImageNet photo is ~400×350), as ``train/<class>/<i>.jpg`` and a small
``val/``. Two loaders then read the same files with the config's training transform (timm's
``create_transform``: RandomResizedCrop, flip, RandAugment, erasing, at ``DATA.IMG_SIZE``):

* ``ours``: ``data.build_loaders`` as ``main.py`` uses it: per-sample seeding (SeededAugmentation), the
  readable-image check (CheckedImageFolder), the resumable sampler with its epoch tag, persistent workers;
* ``plain``: ``torchvision.datasets.ImageFolder`` with the same timm transform, a shuffling DataLoader
  with the same batch size, worker count and ``persistent_workers``.

Both get the same Pillow-proof posterize (data/augment.py): timm's own fails on Pillow 13, so without
it the plain loader cannot run the recipe at all. One repeat is one full pass (an epoch) over the
images; the two loaders alternate pass by pass, after one warm-up pass each (worker start-up). The
table gives images/s, images/s per worker and ``overhead`` = ours' time / plain's time - 1, from medians.
This process runs one torch thread (``--threads``), as every worker does: with two threads on a busy
2-core machine, ToTensor and Normalize of one 224² image take ~20 ms instead of ~0.3 ms.
A second, in-process measurement times the seeding on its own, as a worker pays it and as the main
process does (``NUM_WORKERS 0``, which also saves and restores the RNG states), against one sample of
the plain pipeline: its share of a sample, without loader noise.

``--micro`` renders 24 small images and runs one repeat (for tests).
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

import torch

if __package__ in (None, ''):  # run as `python bench/x.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from config import load_config  # noqa: E402
from data import FashionMNIST, build_loaders, build_transform  # noqa: E402
from data.datasets import SeededAugmentation, sample_seed, seed_sample  # noqa: E402
from utils.benchmark import machine_info, measure, median, write_json  # noqa: E402

FASHION_MNIST = '/usr/share/datasets/fashion-mnist'


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0], parents=[common.shared_arguments(
        ['configs/flatten_swin_t.yaml'], repeats=7, threads=1)])
    parser.add_argument('--images', type=int, default=600, help='training JPEGs to render (>= 2 batches)')
    parser.add_argument('--render-size', type=int, default=320, help='side of the rendered JPEGs')
    parser.add_argument('--batch', type=int, default=64, help='loader batch size')
    parser.add_argument('--workers', type=int, nargs='+', default=[0, 1, 2], help='DataLoader worker counts')
    parser.add_argument('--folder', default='', help='where to render the images (default: a temporary folder)')
    parser.add_argument('--fashion-mnist', default=FASHION_MNIST, help='Fashion-MNIST IDX folder')
    parser.add_argument('--micro', action='store_true', help='24 images of 64², batch 4, one repeat')
    args = parser.parse_args(argv)
    common.check_one_config(parser, args, 'its DATA/AUG recipe is timed')
    if args.micro:
        args.images, args.render_size, args.batch, args.repeats = 24, 64, 4, 1
    common.check_minimums(parser, args, images=1, render_size=1, batch=1, repeats=1)
    if min(args.workers) < 0:
        parser.error('--workers must be 0 or more')
    if args.images < 2 * args.batch:
        parser.error(f'--images {args.images} gives fewer than two batches of {args.batch}')
    return args


def render_folder(root: str, images: int, size: int, fashion_mnist: str) -> None:
    """``images`` training JPEGs under ``root/train`` and, from the images after them, one per class per
    100 training images (at least one) under ``root/val``."""
    import numpy as np
    from PIL import Image
    source = FashionMNIST(fashion_mnist, train=True)
    rest = np.arange(images, len(source.targets))
    val = [int(i) for c in range(10) for i in rest[source.targets[rest] == c][:max(1, images // 100)]]
    for split, indices in (('train', range(images)), ('val', val)):
        for index in indices:
            folder = os.path.join(root, split, f'class_{int(source.targets[index])}')
            os.makedirs(folder, exist_ok=True)
            picture = Image.fromarray(source.images[index]).resize((size, size), Image.Resampling.BICUBIC)
            picture.convert('RGB').save(os.path.join(folder, f'{index}.jpg'), format='JPEG', quality=90)


def plain_loader(cfg, root: str, workers: int, batch: int) -> torch.utils.data.DataLoader:
    """torchvision ImageFolder + the config's timm transform, a shuffling DataLoader: nothing of ours."""
    from torchvision.datasets import ImageFolder
    dataset = ImageFolder(os.path.join(root, 'train'), transform=build_transform(True, cfg))
    return torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=True, num_workers=workers,
                                       drop_last=True, persistent_workers=workers > 0)


def one_pass(loader: torch.utils.data.DataLoader, set_epoch=None) -> int:
    """Load every batch of one epoch; returns the images loaded."""
    if set_epoch is not None:
        set_epoch()
    return sum(len(labels) for _, labels in loader)


def time_workers(args, root: str, workers: int) -> dict:
    """One table row: both loaders with `workers` workers, timed pass by pass, interleaved."""
    cfg = load_config(args.models[0], ['DATA.DATA_PATH', root, 'DATA.DATASET', 'imagefolder', 'DATA.NUM_WORKERS',
                                 str(workers), 'DATA.BATCH_SIZE', str(args.batch)])
    bundle = build_loaders(cfg)
    plain = plain_loader(cfg, root, workers, args.batch)
    epoch = [0]
    loaded = {'ours': 0, 'plain': 0}

    def next_epoch():  # what main.run_epoch does before each epoch
        epoch[0] += 1
        bundle.dataset_train.set_epoch(epoch[0])
        bundle.loader_train.sampler.set_epoch(epoch[0])

    def ours_pass():
        loaded['ours'] = one_pass(bundle.loader_train, next_epoch)

    def plain_pass():
        loaded['plain'] = one_pass(plain)

    times = measure({'ours': ours_pass, 'plain': plain_pass}, torch.device('cpu'), repeats=args.repeats,
                    warmup=1, min_repeat_s=0.0)
    row = dict(workers=workers, batch=args.batch, images=loaded['ours'], img_size=cfg.DATA.IMG_SIZE, runs=times)
    for side in ('ours', 'plain'):
        rate = loaded[side] / median(times[side])
        row[f'{side}_img_s'] = rate
        row[f'{side}_img_s_per_worker'] = rate / max(workers, 1)
    row['overhead'] = median(times['ours']) / median(times['plain']) - 1
    print(f'workers {workers}: ours {row["ours_img_s"]:.1f} img/s, plain {row["plain_img_s"]:.1f} img/s, '
          f'overhead {100 * row["overhead"]:+.1f}%', flush=True)
    return row


class _Instant(torch.utils.data.Dataset):
    """A dataset whose items cost nothing: what is left of SeededAugmentation[i] is the seeding."""

    def __init__(self, size: int):
        self.size = size

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, index: int) -> int:
        return index


def time_seeding(args, root: str) -> dict:
    """The per-sample seeding on its own against one sample of the plain pipeline (ImageFolder + the timm
    transform) in this process, on the same indices, interleaved. ``worker`` is what a loader worker
    pays (``seed_sample``); ``main_process`` is SeededAugmentation over a dataset whose items cost
    nothing, in the main process (``NUM_WORKERS 0``), which also saves and restores the RNG states."""
    cfg = load_config(args.models[0], ['DATA.DATA_PATH', root, 'DATA.DATASET', 'imagefolder'])
    plain = plain_loader(cfg, root, 0, args.batch).dataset
    seeded = SeededAugmentation(_Instant(len(plain)), cfg.SEED)
    indices = list(range(min(len(plain), 64)))
    times = measure({'worker': lambda: [seed_sample(sample_seed(cfg.SEED, 0, i)) for i in indices],
                     'main_process': lambda: [seeded[i] for i in indices],
                     'plain_sample': lambda: [plain[i] for i in indices]},
                    torch.device('cpu'), repeats=args.repeats, warmup=1, min_repeat_s=0.0)
    per_image = {k: median(v) / len(indices) for k, v in times.items()}
    return dict(samples=len(indices), ms_per_image={k: 1000 * v for k, v in per_image.items()},
                share={k: per_image[k] / per_image['plain_sample'] for k in ('worker', 'main_process')}, runs=times)


COLUMNS = [('workers', 'workers'), ('ours_img_s', 'ours img/s', '{:.1f}'), ('plain_img_s', 'plain img/s', '{:.1f}'),
           ('ours_img_s_per_worker', 'ours img/s/worker', '{:.1f}'), ('overhead', 'overhead', '{:+.1%}')]


def print_table(payload: dict) -> None:
    print('\n' + common.format_table(payload['loaders'], COLUMNS))
    seeding = payload['seeding']
    ms, share = seeding['ms_per_image'], seeding['share']
    print(f'\nseeding alone ({seeding["samples"]} samples; a plain sample takes {ms["plain_sample"]:.2f} ms): '
          f'{1000 * ms["worker"]:.0f} µs in a worker ({100 * share["worker"]:.2f}%), '
          f'{1000 * ms["main_process"]:.0f} µs in the main process ({100 * share["main_process"]:.2f}%)')


def main(argv=None) -> int:
    args = parse_args(argv)
    if not os.path.isdir(args.fashion_mnist):
        print(f'{args.fashion_mnist} is missing: apt-get install -y dataset-fashion-mnist', file=sys.stderr)
        return 1
    start = time.perf_counter()
    with common.torch_threads(args.threads), tempfile.TemporaryDirectory() as tmp:
        root = args.folder or tmp
        if not os.path.isdir(os.path.join(root, 'train')):
            render_folder(root, args.images, args.render_size, args.fashion_mnist)
        payload = dict(machine=machine_info(torch.device('cpu')), args=vars(args),
                       loaders=[time_workers(args, root, workers) for workers in args.workers],
                       seeding=time_seeding(args, root))
    payload['seconds'] = time.perf_counter() - start
    print_table(payload)
    write_json(args.json, payload)
    return 0


if __name__ == '__main__':
    sys.exit(main())
