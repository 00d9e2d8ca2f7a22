"""Shared fixtures: golden files, inventories and tiny on-disk datasets."""
from __future__ import annotations

import contextlib
import copy
import io
import logging
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import traceback
import warnings
from pathlib import Path
from typing import Dict, List, Tuple

import numpy as np
import pytest
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
# Golden tensors (the official code's outputs, tests/assets/golden/README.md) and state-dict inventories
# (docs/checkpoints.md, "State-dict inventories"), so that every clone can check numerical identity.
ASSETS = REPO / 'tests' / 'assets'
FASHION_MNIST_DIR = '/usr/share/datasets/fashion-mnist'
# PyTorch's own intra-op thread count, read before any test changes it: what a user's fresh process gets
DEFAULT_THREADS = torch.get_num_threads()


# Long end-to-end runs started in the background when collection ends (see start_early)
_EARLY: Dict[str, Tuple[List[str], str]] = {}
_STARTED: Dict[str, Tuple[subprocess.Popen, Path]] = {}


def start_early(test_name: str, args: List[object], needs: str = '') -> None:
    """Have ``main.py args --output DIR`` start, single-threaded, in a process of its own as soon as
    the tests are collected, for the test function `test_name` (when it was selected), which then
    runs last and reads the result through the :func:`early_run` fixture.

    The suite's in-process tests mostly run on one thread, so the README demos (minutes each) take
    the other core instead of running one after the other at the end: their assertions are the
    same, only when the work happens changes. One thread gives the demos the same numbers as two
    (micro models; docs/testing.md). They run at the lowest CPU priority, so that a test using
    both cores (timed bench loops, full-size models) is not slowed by them. Nothing starts when the
    folder `needs` is missing (the test skips itself then)."""
    _EARLY[test_name] = ([str(a) for a in args], needs)


def pytest_collection_modifyitems(session, config, items) -> None:
    items.sort(key=lambda item: item.name in _EARLY)  # stable: the early-started tests wait last


def pytest_collection_finish(session) -> None:
    for name in sorted({item.name for item in session.items} & set(_EARLY)):
        args, needs = _EARLY[name]
        if (name in _STARTED) or (needs and not os.path.isdir(needs)):
            continue
        output = Path(tempfile.mkdtemp(prefix=f'{name}-'))
        env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
        with open(output / 'stdout.txt', 'w') as log:
            command = [sys.executable, str(REPO / 'main.py')] + args + ['--output', str(output)]
            process = subprocess.Popen(command, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        with contextlib.suppress(ProcessLookupError):  # lowest priority: it yields to every test (its loader
            os.setpriority(os.PRIO_PROCESS, process.pid, 19)  # workers, forked later, inherit it)
        _STARTED[name] = (process, output)


def pytest_sessionfinish(session, exitstatus) -> None:
    for process, output in _STARTED.values():
        if process.poll() is None:
            process.kill()
            process.wait()
        shutil.rmtree(output, ignore_errors=True)


@pytest.fixture
def early_run(request) -> Tuple[int, str, Path]:
    """(exit code, stdout and stderr, output folder) of this test's :func:`start_early` run."""
    process, output = _STARTED[request.node.name]
    try:
        process.wait(timeout=1800)
    except subprocess.TimeoutExpired:
        process.kill()
        args = ' '.join(_EARLY[request.node.name][0])
        raise AssertionError(f'{request.node.name}: main.py {args} ran over 30 minutes') from None
    return process.returncode, (output / 'stdout.txt').read_text(), output


def asset_path(*parts: str) -> Path:
    return ASSETS.joinpath(*parts)


def load_golden(name: str) -> dict:
    return torch.load(asset_path('golden', f'{name}.pt'), weights_only=True)


def read_inventory(name: str, with_dtype: bool = False) -> List[tuple]:
    """(key, shape) pairs of an official state-dict inventory, in file order; with `with_dtype`,
    (key, shape, dtype) where buffers carry their recorded dtype and parameters float32."""
    entries = []
    for line in asset_path('official_state_dicts', f'{name}.txt').read_text().splitlines():
        if line.startswith('#') or not line.strip():
            continue
        match = re.match(r'(\S+) \[([\d, ]*)\](?: BUFFER (\w+))?', line)
        shape = tuple(int(x) for x in match.group(2).split(',') if x.strip())
        if with_dtype:
            entries.append((match.group(1), shape, getattr(torch, match.group(3) or 'float32')))
        else:
            entries.append((match.group(1), shape))
    return entries


def make_image_folder(root: Path, classes: int = 3, train_per_class: int = 8, val_per_class: int = 3,
                      size: int = 32, seed: int = 0) -> Path:
    """A tiny ImageFolder tree root/{train,val}/class_i/*.png of class-dependent colour blobs,
    so that a model can actually learn something from it."""
    rng = np.random.default_rng(seed)
    for split, per_class in (('train', train_per_class), ('val', val_per_class)):
        for c in range(classes):
            folder = root / split / f'class_{c}'
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                base = np.zeros((size, size, 3), dtype=np.float32)
                base[..., c % 3] = 180.0
                base += rng.normal(0, 40, size=base.shape)
                Image.fromarray(base.clip(0, 255).astype(np.uint8)).save(folder / f'{i}.png')
    return root


@pytest.fixture
def image_folder(tmp_path: Path) -> Path:
    return make_image_folder(tmp_path / 'data')


@pytest.fixture
def fashion_mnist_dir() -> str:
    if not os.path.isdir(FASHION_MNIST_DIR):
        pytest.skip('Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)')
    return FASHION_MNIST_DIR


MICRO_YAML = """\
DATA:
  IMG_SIZE: 32
  BATCH_SIZE: 4
  NUM_WORKERS: 0
MODEL:
  TYPE: flatten_swin
  NAME: micro
  DROP_PATH_RATE: 0.0
  SWIN:
    PATCH_SIZE: 2
    EMBED_DIM: 16
    DEPTHS: [ 2, 2 ]
    NUM_HEADS: [ 1, 2 ]
    WINDOW_SIZE: 16
    SOFTMAX_WINDOW_SIZE: 4
  LA:
    ATTN_TYPE: LS
TRAIN:
  EPOCHS: 2
  WARMUP_EPOCHS: 0
  BASE_LR: 4e-3
AUG:
  AUTO_AUGMENT: none
  REPROB: 0.0
  MIXUP: 0.0
  CUTMIX: 0.0
PRINT_FREQ: 2
"""


@pytest.fixture
def micro_cfg(tmp_path: Path) -> str:
    """A micro FLatten-Swin config (32² input, global L stage + softmax stage) for CLI tests."""
    path = tmp_path / 'micro.yaml'
    path.write_text(MICRO_YAML)
    return str(path)


# A micro segmentor for CLI tests: UperNet (16 channels, auxiliary head) on a four-stage micro
# FLatten-Swin (64² build size; L stages global, S stages in 2x2 windows), 4 classes, 2 periods of 2 updates.
SEG_MICRO_YAML = """\
TASK: segmentation
DATA:
  DATASET: ade20k
  IMG_SIZE: 64
  BATCH_SIZE: 2
  NUM_WORKERS: 0
MODEL:
  TYPE: flatten_swin
  NAME: seg_micro
  NUM_CLASSES: 4
  DROP_PATH_RATE: 0.0
  LABEL_SMOOTHING: 0.0
  SWIN:
    PATCH_SIZE: 4
    EMBED_DIM: 16
    DEPTHS: [ 1, 1, 1, 1 ]
    NUM_HEADS: [ 1, 1, 2, 2 ]
    WINDOW_SIZE: 16
    SOFTMAX_WINDOW_SIZE: 2
  LA:
    ATTN_TYPE: LLSS
SEG:
  DECODER: upernet
  CHANNELS: 16
  AUX_CHANNELS: 8
  SCALE: [ 64, 48 ]
  RATIO_RANGE: [ 0.75, 1.25 ]
  CROP_SIZE: [ 48, 48 ]
TRAIN:
  ITERS: 4
  EVAL_PERIOD: 2
  WARMUP_ITERS: 1
  BASE_LR: 2e-3
  WARMUP_LR: 2e-6
  MIN_LR: 0.0
  WEIGHT_DECAY: 0.01
  CLIP_GRAD: None
  LR_SCHEDULER:
    NAME: poly
AUG:
  MIXUP: 0.0
  CUTMIX: 0.0
PRINT_FREQ: 1
"""


@pytest.fixture
def seg_micro_cfg(tmp_path: Path) -> str:
    path = tmp_path / 'seg_micro.yaml'
    path.write_text(SEG_MICRO_YAML)
    return str(path)


def write_ade20k_split(root: Path, split: str, count: int, size=(12, 9), classes: int = 5, seed: int = 0) -> None:
    """`count` random JPEG images of `size` (W, H) with random single-channel annotations 0..classes, in the
    ADEChallengeData2016 layout under `root`."""
    rng = np.random.default_rng(seed)
    folder = {'train': 'training', 'val': 'validation'}[split]
    (root / 'images' / folder).mkdir(parents=True, exist_ok=True)
    (root / 'annotations' / folder).mkdir(parents=True, exist_ok=True)
    for i in range(count):
        stem = f'ADE_{split}_{i:08d}'
        pixels = rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
        Image.fromarray(pixels).save(root / 'images' / folder / f'{stem}.jpg')
        label = rng.integers(0, classes + 1, (size[1], size[0]), dtype=np.uint8)
        Image.fromarray(label, mode='L').save(root / 'annotations' / folder / f'{stem}.png')


def run_main(args: List[str], launcher: List[str] | None = None, timeout: float = 600, threads: int | None = 1,
             fresh_process: bool = False) -> subprocess.CompletedProcess:
    """Run main.py with `args` and return what a user would see: exit code, stdout and stderr.

    In this process by default (``main.main(args)`` from the repository root, its logs and warnings
    captured, the caller's logger, RNG and thread count put back afterwards): starting Python and
    importing torch for every CLI test adds nothing to what it checks. A real process
    (``fresh_process``, or any `launcher` such as torchrun) for what only one can show: signals, the
    interpreter's exit code and traceback, torchrun, and torch.compile, whose caches and recompile
    limits are per process. `threads` caps the intra-op threads of the micro runs, which only lose to
    threading overhead; None keeps PyTorch's default (all cores), as a user's run would."""
    args = [str(a) for a in args]
    if fresh_process or (launcher is not None):
        env = dict(os.environ, PYTHONUNBUFFERED='1')
        if threads is not None:
            env['OMP_NUM_THREADS'] = str(threads)
        command = (launcher or [sys.executable]) + [str(REPO / 'main.py')] + args
        return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    return _run_main_in_process(args, threads)


def _run_main_in_process(args: List[str], threads: int | None) -> subprocess.CompletedProcess:
    import main
    project_logger = logging.getLogger('flatten')
    saved_logger = (list(project_logger.handlers), project_logger.level, project_logger.propagate)
    saved_rng = (random.getstate(), np.random.get_state(), torch.get_rng_state())
    saved_threads, saved_cwd = torch.get_num_threads(), os.getcwd()
    stdout, stderr = io.StringIO(), io.StringIO()

    def show_warning(message, category, filename, lineno, file=None, line=None):
        stderr.write(warnings.formatwarning(message, category, filename, lineno, line))

    try:
        os.chdir(REPO)
        torch.set_num_threads(DEFAULT_THREADS if threads is None else threads)
        with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr), warnings.catch_warnings():
            warnings.simplefilter('default')
            warnings.showwarning = show_warning
            try:
                code = main.main(args)
            except SystemExit as exit_:  # argparse
                code = exit_.code if isinstance(exit_.code, int) else 1
            except Exception:  # what the interpreter would print before exiting with 1
                traceback.print_exc()
                code = 1
    finally:
        for handler in project_logger.handlers:
            if handler not in saved_logger[0]:
                handler.close()
        project_logger.handlers[:] = saved_logger[0]
        project_logger.setLevel(saved_logger[1])
        project_logger.propagate = saved_logger[2]
        random.setstate(saved_rng[0])
        np.random.set_state(saved_rng[1])
        torch.set_rng_state(saved_rng[2])
        torch.set_num_threads(saved_threads)
        os.chdir(saved_cwd)
    return subprocess.CompletedProcess(['main.py'] + args, code, stdout.getvalue(), stderr.getvalue())


def assert_model_contract(make, size: int, num_classes: int = 10) -> None:
    """The registry-wide model checks (timm tests/test_models.py style) for the model `make()` builds
    with `num_classes` classes, at batch 1 and ``size``² input: shape and finite output; a finite
    gradient for every parameter except those the model declares unused; strict state-dict round trip
    into a copy with other weights, to an identical output; pre-logits features; reset_classifier to 3
    and to 0 classes."""
    model = make()
    # the round-trip target: a copy with other weights (a second make() would redo the costly init)
    clone = randomize(copy.deepcopy(model), seed=1).eval()
    x = torch.randn(1, 3, size, size)
    out = model(x)
    assert out.shape == (1, num_classes) and model.num_classes == num_classes
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    # only parameters a model declares unused may lack a gradient (PVT v1's final norm: docs/differences.md,
    # "PVT v1's unused final norm")
    skipped = model.unused_parameters()
    for param_name, param in model.named_parameters():
        if param_name in skipped:
            assert param.grad is None, f'{param_name} is expected to be unused'
        else:
            assert param.grad is not None, f'{param_name} receives no gradient'
            assert torch.isfinite(param.grad).all(), param_name

    model.eval()
    clone.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        reference = model(x)
        torch.testing.assert_close(clone(x), reference)
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        assert features.shape == (1, model.num_features)
        model.reset_classifier(3)
        assert model(x).shape == (1, 3) and model.num_classes == 3
        model.reset_classifier(0)
        assert model(x).shape == (1, model.num_features)
    assert isinstance(model.no_weight_decay(), set) and isinstance(model.no_weight_decay_keywords(), set)


def randomize(module: torch.nn.Module, std: float = 0.3, seed: int = 0) -> torch.nn.Module:
    """Overwrite every parameter with seeded N(0, std²) values: non-zero temperatures, positional
    encodings and tokens and O(1) weights, so every term of a formula matters in a comparison."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in module.parameters():
            param.copy_(torch.randn(param.shape, generator=gen) * std)
    return module


def fashion_mnist_samples(per_class: int, train: bool = False, root: str = FASHION_MNIST_DIR):
    """The first `per_class` real images of each of the 10 classes of a Fashion-MNIST split, class by
    class: ``(uint8 array (10·per_class, 28, 28), int labels)``. Skips the test when the files are missing."""
    if not os.path.isdir(root):
        pytest.skip('Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)')
    from data import FashionMNIST
    dataset = FashionMNIST(root, train=train)
    indices = [int(i) for c in range(10) for i in np.flatnonzero(dataset.targets == c)[:per_class]]
    return dataset.images[indices], dataset.targets[indices]


def render_rgb_jpeg(image: np.ndarray, size: int, quality: int = 90) -> bytes:
    """A 28×28 grayscale image as the JPEG bytes of a size×size RGB picture (bicubic upscale), the
    kind of file an ImageFolder of photographs holds; decode with :func:`decode_rgb`."""
    picture = Image.fromarray(image).resize((size, size), Image.Resampling.BICUBIC).convert('RGB')
    buffer = io.BytesIO()
    picture.save(buffer, format='JPEG', quality=quality)
    return buffer.getvalue()


def decode_rgb(jpeg: bytes):
    """JPEG bytes as an RGB PIL image, as torchvision's ImageFolder loader opens a file."""
    with Image.open(io.BytesIO(jpeg)) as image:
        return image.convert('RGB')


def make_fashion_mnist_image_folder(root: Path, size: int, train_per_class: int, val_per_class: int) -> Path:
    """An ImageFolder tree root/{train,val}/<class>/<n>.jpg of real Fashion-MNIST images rendered as
    size×size RGB JPEGs: train from the training split, val from the test split (10 classes)."""
    for split, per_class, train in (('train', train_per_class, True), ('val', val_per_class, False)):
        images, labels = fashion_mnist_samples(per_class, train=train)
        for n, (image, label) in enumerate(zip(images, labels, strict=True)):
            folder = root / split / f'class_{int(label)}'
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f'{n}.jpg').write_bytes(render_rgb_jpeg(image, size))
    return root
