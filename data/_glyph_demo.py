"""What the two demo datasets share (data/seg_demo.py in the ADE20K layout, data/det_demo.py in the COCO layout):
the parameters of their canvases, the colouring of the pasted Fashion-MNIST glyphs, and writing the folder once.

:func:`ensure_folder` writes a dataset only when `root` is missing or its marker file records other parameters,
into a temporary sibling that is renamed into place, so a killed write leaves no half dataset and concurrent
callers (DDP ranks) are safe: each writes its own copy and the loser of the rename race uses the winner's folder.
A folder without the marker is never replaced (it may be real data).
"""
from __future__ import annotations

import dataclasses
import errno
import json
import logging
import os
import shutil
import time
import uuid
from typing import Any, Callable, ClassVar, Dict, Optional, Tuple

import numpy as np

from .errors import DataError
from .fashion_mnist import DEFAULT_FASHION_MNIST_DIR

logger = logging.getLogger('flatten.data')

__all__ = ['CanvasParams', 'STALE_TEMP_SECONDS', 'colour_glyphs', 'ensure_folder', 'read_marker', 'write_marker']

# A temporary folder untouched this long is a killed write, not a running one (the default sets take
# seconds): the next call removes it.
STALE_TEMP_SECONDS = 3600.0


@dataclasses.dataclass(frozen=True)
class CanvasParams:
    """Everything that decides a demo's files, recorded in its marker; a subclass per demo names it (`KIND`, for
    messages) and versions its file format (`FORMAT`). The fields are documented by the subclasses."""

    KIND: ClassVar[str] = 'demo'
    FORMAT: ClassVar[int] = 1

    num_train: int = 2000
    num_val: int = 200
    size: Tuple[int, int] = (128, 128)
    glyphs: Tuple[int, int] = (2, 4)
    scale: Tuple[float, float] = (1.0, 2.0)
    threshold: int = 32
    background: Tuple[int, int] = (0, 96)
    noise: float = 8.0
    tint: Tuple[int, int] = (128, 255)
    quality: int = 95
    seed: int = 0
    fashion_mnist_root: str = ''

    def __post_init__(self) -> None:
        # normalise (lists from JSON or YAML, '' for the default folder) so equal settings compare equal
        if isinstance(self.size, int):
            object.__setattr__(self, 'size', (self.size, self.size))
        for name in ('size', 'glyphs', 'background', 'tint'):
            object.__setattr__(self, name, tuple(int(v) for v in getattr(self, name)))
        object.__setattr__(self, 'scale', tuple(float(v) for v in self.scale))
        object.__setattr__(self, 'noise', float(self.noise))
        object.__setattr__(self, 'fashion_mnist_root',
                           os.path.abspath(self.fashion_mnist_root or DEFAULT_FASHION_MNIST_DIR))
        checks = (
            ('num_train', (self.num_train >= 1), 'at least 1'),
            ('num_val', (self.num_val >= 1), 'at least 1'),
            ('size', (len(self.size) == 2 and min(self.size) >= 28), '(H, W) with sides of at least 28'),
            ('glyphs', (len(self.glyphs) == 2 and 1 <= self.glyphs[0] <= self.glyphs[1]),
             'a range (lo, hi), 1 <= lo <= hi'),
            ('scale', (len(self.scale) == 2 and 0 < self.scale[0] <= self.scale[1]),
             'a range (lo, hi), 0 < lo <= hi'),
            ('threshold', (0 <= self.threshold < 255), 'in [0, 255)'),
            ('background', (len(self.background) == 2 and 0 <= self.background[0] <= self.background[1] <= 255),
             'a range (lo, hi) within [0, 255]'),
            ('noise', (self.noise >= 0), 'at least 0'),
            ('tint', (len(self.tint) == 2 and 0 <= self.tint[0] <= self.tint[1] <= 255),
             'a range (lo, hi) within [0, 255]'),
            ('quality', (1 <= self.quality <= 100), 'in [1, 100]'),
        )
        for name, ok, requirement in checks:
            if not ok:
                raise DataError(f'{self.KIND}: {name} must be {requirement}, got {getattr(self, name)!r}')

    def to_json(self) -> Dict[str, Any]:
        """The marker's content: the format version and these parameters, as JSON reads them back."""
        return json.loads(json.dumps({'format': self.FORMAT, 'params': dataclasses.asdict(self)}))


def colour_glyphs(ink: np.ndarray, masks: np.ndarray, params: CanvasParams, rng: np.random.Generator) -> np.ndarray:
    """The uint8 (H, W, 3) RGB canvas of glyph intensities `ink` (uint8 (H, W), 0 off the glyphs): a random grey
    background with RGB noise, each glyph of bool `masks` (N, H, W) in a random tint, blended by its intensity, so
    that a model has to find garments by shape rather than by "bright = garment"."""
    colour = np.zeros(ink.shape + (3,), dtype=np.float32)
    for mask in masks:
        colour[mask] = rng.uniform(params.tint[0], params.tint[1], 3)
    alpha = ink[..., None].astype(np.float32) / 255
    grey = rng.uniform(params.background[0], params.background[1])
    noise = rng.standard_normal(ink.shape + (3,), dtype=np.float32) * params.noise
    image = grey * (1 - alpha) + colour * alpha + noise
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


def read_marker(root: str, marker: str) -> Optional[Dict[str, Any]]:
    """The marker of `root`, or None when it has none or it cannot be parsed (a folder to rewrite)."""
    try:
        with open(os.path.join(root, marker)) as f:
            return json.load(f)
    except (FileNotFoundError, NotADirectoryError, json.JSONDecodeError, UnicodeDecodeError):
        return None


def write_marker(root: str, marker: str, params: CanvasParams) -> None:
    """Record `params` in `root`; written last, it marks the folder complete."""
    with open(os.path.join(root, marker), 'w') as f:
        json.dump(params.to_json(), f, indent=2, sort_keys=True)
        f.write('\n')


def _check_replaceable(root: str, marker: str, kind: str) -> None:
    """Refuse to replace a folder that no demo writer wrote (no marker, not empty): it may be real data."""
    if (os.path.isdir(root) and os.listdir(root) and not os.path.exists(os.path.join(root, marker))):
        raise DataError(f'{kind}: {root} exists and holds no {marker}, so it was not written by the demo; '
                        f'refusing to replace it. Point the demo at another folder or delete it.')
    if os.path.exists(root) and not os.path.isdir(root):
        raise DataError(f'{kind}: {root} exists and is not a folder')


def _remove_stale_temps(parent: str, prefix: str) -> None:
    """Remove temporary folders of killed writes (untouched for STALE_TEMP_SECONDS); a running write's
    folder is younger and is left alone."""
    now = time.time()
    for name in os.listdir(parent):
        path = os.path.join(parent, name)
        try:
            stale = name.startswith(prefix) and (now - os.path.getmtime(path) > STALE_TEMP_SECONDS)
        except FileNotFoundError:  # another process removed it meanwhile
            continue
        if stale:
            shutil.rmtree(path, ignore_errors=True)


def _install(temp: str, root: str, expected: Dict[str, Any], prefix: str, marker: str, kind: str,
             tries: int = 3) -> bool:
    """Rename the finished `temp` to `root`; True when ours is installed, False when another process
    installed the same data first (then `temp` is removed). A stale `root` is renamed aside, then removed."""
    for _ in range(tries):
        try:
            os.rename(temp, root)  # atomic; replaces only a missing or empty folder
            return True
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
        if read_marker(root, marker) == expected:  # lost the race to a process with the same parameters
            shutil.rmtree(temp, ignore_errors=True)
            return False
        _check_replaceable(root, marker, kind)
        aside = os.path.join(os.path.dirname(root), f'{prefix}old-{uuid.uuid4().hex}')
        try:
            os.rename(root, aside)
        except FileNotFoundError:  # another process moved it aside first
            continue
        shutil.rmtree(aside, ignore_errors=True)
    shutil.rmtree(temp, ignore_errors=True)
    raise DataError(f'{kind}: could not install {root}: other processes keep writing it with other parameters')


def ensure_folder(root: str, params: CanvasParams, marker: str, write: Callable[[str], Any]) -> str:
    """Make `root` hold the dataset `write(folder)` writes into a new folder, with `marker` recording
    ``params.to_json()``: as the module docstring says. Logs what was written (or that another process
    installed it first) and returns `root` as an absolute path."""
    root = os.path.abspath(root)
    expected = params.to_json()
    if read_marker(root, marker) == expected:
        return root
    _check_replaceable(root, marker, params.KIND)
    parent = os.path.dirname(root)
    os.makedirs(parent, exist_ok=True)
    prefix = f'.{os.path.basename(root)}.tmp-'
    _remove_stale_temps(parent, prefix)
    start = time.perf_counter()
    temp = os.path.join(parent, f'{prefix}{os.getpid()}-{uuid.uuid4().hex}')
    try:
        write(temp)
    except BaseException:
        shutil.rmtree(temp, ignore_errors=True)
        raise
    seconds = time.perf_counter() - start
    summary = (f'{params.num_train} train + {params.num_val} val canvases of {params.size[0]}x{params.size[1]} '
               f'(glyphs from the Fashion-MNIST train / test splits in {params.fashion_mnist_root})')
    what = f'{params.KIND[0].upper()}{params.KIND[1:]} data'
    if _install(temp, root, expected, prefix, marker, params.KIND):
        logger.info(f'{what}: wrote {summary} to {root} in {seconds:.1f} s')
    else:
        logger.info(f'{what}: another process wrote {root} first; using it ({summary})')
    return root
