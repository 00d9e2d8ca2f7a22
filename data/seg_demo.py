"""The segmentation demo's data: Fashion-MNIST glyphs on small canvases, written in the ADE20K layout.

    ROOT/images/training/ADE_train_00000001.jpg …     ROOT/annotations/training/ADE_train_00000001.png …
    ROOT/images/validation/ADE_val_00000001.jpg …     ROOT/annotations/validation/ADE_val_00000001.png …
    ROOT/seg_demo.json                                 (the format version and the parameters it was written with)

so that the ADE20K reader (:class:`data.ade20k.ADE20K` with ``num_classes=11``) and the ADE20K pipeline read
it unchanged. Training canvases take their glyphs from Fashion-MNIST's 60,000 training images, validation
canvases from its 10,000 test images, so the demo's mIoU is measured on garments the model has never seen.

Each canvas is drawn by :func:`data.detection_toy.paste_glyphs` (2–4 glyphs, each scaled 1–2×, never
overlapping) and then coloured: a random grey background with mild RGB noise and a random tint per
glyph, so that the model has to segment by shape rather than by "bright = garment". Annotations are
single-channel 8-bit PNGs: 1 = background, 2…11 = the ten Fashion-MNIST classes (class + 2), and 0 (no
label, ignored by the reader) for the faint rim of each glyph; the reader's reduce-zero-label maps
them to 0 = background, 1…10 = the classes (:data:`SEG_DEMO_CLASSES`).

:func:`ensure_seg_demo` is what a training run calls: it writes the folder only when it is missing or
was written with other parameters, into a temporary sibling that is renamed into place, so a killed
write leaves no half dataset and concurrent callers (DDP ranks) are safe.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Optional, Tuple

import numpy as np
from PIL import Image

from ._glyph_demo import STALE_TEMP_SECONDS, CanvasParams, colour_glyphs, ensure_folder, write_marker
from .detection_toy import paste_glyphs
from .errors import DataError
from .fashion_mnist import FASHION_MNIST_CLASSES, FashionMNIST

__all__ = ['SEG_DEMO_CLASSES', 'SEG_DEMO_FORMAT', 'SEG_DEMO_MARKER', 'STALE_TEMP_SECONDS', 'SegDemoParams',
           'ensure_seg_demo', 'render_canvas', 'write_seg_demo']

# Bump when the same parameters would give other files (drawing order, colouring, file names): older
# folders are then rewritten rather than silently reused.
SEG_DEMO_FORMAT = 1
SEG_DEMO_MARKER = 'seg_demo.json'
# After the reader's reduce-zero-label: label 0 is the background, 1…10 the Fashion-MNIST classes.
SEG_DEMO_CLASSES = ('background',) + FASHION_MNIST_CLASSES
_SPLITS = (('train', 'training', True), ('val', 'validation', False))  # name, ADE20K folder, Fashion-MNIST train


@dataclasses.dataclass(frozen=True)
class SegDemoParams(CanvasParams):
    """Everything that decides the files; recorded in ``seg_demo.json``.

    Defaults: 2,000 training and 200 validation canvases of 128×128 (`size`: (H, W), or one int for a
    square), written in about 5 s on one core (36 MB, most of it the JPEGs' noise). 128² keeps a
    0.3M-parameter model's step cheap on CPU while a glyph scaled 1–2× (28–56 px) still spans 7–14
    patches of 4 px; with 2–4 glyphs per canvas about 95% of the drawn glyphs find a free place (larger
    scales on this canvas drop a fifth of them); glyph classes label 15% of the pixels, the background
    82%, the ignored rims 3%. `threshold`: glyph pixels of at most this intensity (0–255, before
    colouring) are the anti-aliased rim and faint garment parts, about 13% of a glyph's non-zero pixels:
    they are annotated 0 (ignored), like Pascal VOC's void boundary band, rather than forced to either
    side of an edge that the image itself does not decide. `background`: the range of the canvas's grey
    level; `noise`: the standard deviation of per-pixel RGB noise; `tint`: the range of each RGB channel
    of a glyph's colour (kept above the background's so glyphs stay visible). JPEG `quality` 95 without
    chroma subsampling (which would blur the tints at glyph edges) decodes to within 3 grey levels
    (mean) of the rendered canvas, most of it the noise, so the annotations (drawn from the rendered
    canvas) still fit the image's edges. `fashion_mnist_root`: the folder of the IDX files ('' = the
    Debian package's)."""

    KIND = 'segmentation demo'
    FORMAT = SEG_DEMO_FORMAT


def render_canvas(images: np.ndarray, classes: np.ndarray, params: SegDemoParams,
                  rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """One canvas from glyphs `images` (uint8 (M, 28, 28)) with Fashion-MNIST labels `classes` (M,):
    the uint8 (H, W, 3) RGB image and its uint8 (H, W) annotation (0 ignored, 1 background, class + 2)."""
    count = int(rng.integers(params.glyphs[0], params.glyphs[1] + 1))
    # threshold 0: each mask is all of its glyph's ink, rim included, so that the rim takes the glyph's tint
    ink, target = paste_glyphs(images, classes, params.size, count, params.scale, 0, rng)
    masks = target['masks'].numpy().astype(bool)
    annotation = np.ones(params.size, dtype=np.uint8)
    solid = ink > params.threshold
    for mask, label in zip(masks, target['labels'].tolist(), strict=True):
        annotation[mask] = np.where(solid[mask], label + 1, 0)  # paste_glyphs' labels are class + 1
    return colour_glyphs(ink, masks, params, rng), annotation


def write_seg_demo(root: str, params: Optional[SegDemoParams] = None, **overrides: Any) -> SegDemoParams:
    """Write the dataset into folder `root` (created; it must not hold files already), the marker last.

    Not atomic by itself: :func:`ensure_seg_demo` calls it on a temporary folder. Canvas ``i`` of a split
    is drawn from ``numpy.random.default_rng([seed, split, i])`` (split 0 = train, 1 = val), so the same
    parameters give byte-identical files. Raises :class:`DatasetNotFoundError` (before creating anything)
    when the Fashion-MNIST files are missing. Returns the parameters written."""
    params = dataclasses.replace(params or SegDemoParams(), **overrides)
    sources = {train: FashionMNIST(params.fashion_mnist_root, train=train) for _, _, train in _SPLITS}
    os.makedirs(root, exist_ok=True)
    if os.listdir(root):
        raise DataError(f'segmentation demo: {root} is not empty; write_seg_demo writes into a new folder')
    for split_index, (split, folder, train) in enumerate(_SPLITS):
        image_dir, label_dir = os.path.join(root, 'images', folder), os.path.join(root, 'annotations', folder)
        os.makedirs(image_dir)
        os.makedirs(label_dir)
        source = sources[train]
        for index in range(params.num_train if train else params.num_val):
            rng = np.random.default_rng([params.seed, split_index, index])
            image, annotation = render_canvas(source.images, source.targets, params, rng)
            stem = f'ADE_{split}_{index + 1:08d}'
            Image.fromarray(image).save(os.path.join(image_dir, stem + '.jpg'), quality=params.quality,
                                        subsampling=0)
            Image.fromarray(annotation).save(os.path.join(label_dir, stem + '.png'))
    write_marker(root, SEG_DEMO_MARKER, params)
    return params


def ensure_seg_demo(root: str, **params: Any) -> str:
    """Return `root` holding the demo dataset written with `params` (the fields of :class:`SegDemoParams`;
    missing ones take its defaults), writing it first when it is missing or was written with other
    parameters or another format version.

    The write goes to a temporary sibling folder that is renamed to `root` when complete, so an
    interrupted write never leaves a half dataset, and concurrent callers (DDP ranks) are safe: each
    writes its own copy and the loser of the rename race uses the winner's folder. A folder at `root`
    that this function did not write (no marker) is never replaced: :class:`DataError`."""
    settings = SegDemoParams(**params)
    # write_seg_demo is looked up at each call (tests replace it)
    return ensure_folder(root, settings, SEG_DEMO_MARKER, lambda temp: write_seg_demo(temp, settings))
