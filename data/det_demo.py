"""The detection demo's data: Fashion-MNIST glyphs on small canvases, written in the COCO layout.

    ROOT/train2017/000000000001.jpg …     ROOT/annotations/instances_train2017.json
    ROOT/val2017/000000000001.jpg …       ROOT/annotations/instances_val2017.json
    ROOT/det_demo.json                    (the format version and the parameters it was written with)

so that the COCO reader (:class:`data.coco.CocoDetection`) and the COCO pipeline read it unchanged, and COCOeval
scores it. Training canvases take their glyphs from Fashion-MNIST's 60,000 training images, validation canvases
from its 10,000 test images, so the demo's AP is measured on garments the model has never seen.

Each canvas is drawn by :func:`data.detection_toy.paste_glyphs` (glyphs scaled at random, never overlapping) and
coloured as the segmentation demo's (:func:`data._glyph_demo.colour_glyphs`: a grey background with RGB noise, a
random tint per glyph). Each glyph is one annotation of category ``class + 1`` (ids 1..10, named as
:data:`data.fashion_mnist.FASHION_MNIST_CLASSES`) whose segmentation is one polygon: the convex hull of the
glyph's pixels brighter than `threshold` (the corners of those pixels, so a rectangle's hull covers it exactly).
The annotation is exactly what a reader decodes: its mask is the polygon as pycocotools rasterises it, and its
``bbox`` and ``area`` are that mask's. A convex hull fills a garment's concavities (between a trouser's legs,
under a bag's handle): a coarser outline than COCO's traced polygons, and the same for training and evaluation.

:func:`ensure_det_demo` is what a training run calls: it writes the folder only when it is missing or was written
with other parameters, into a temporary sibling that is renamed into place (data/_glyph_demo.py).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, List, Optional, Tuple

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from ._glyph_demo import CanvasParams, colour_glyphs, ensure_folder, write_marker
from .detection_toy import paste_glyphs
from .errors import DataError
from .fashion_mnist import FASHION_MNIST_CLASSES, FashionMNIST

__all__ = ['DET_DEMO_FORMAT', 'DET_DEMO_MARKER', 'DetDemoParams', 'convex_hull', 'ensure_det_demo', 'glyph_polygon',
           'render_det_canvas', 'write_det_demo']

# Bump when the same parameters would give other files (drawing order, colouring, polygons, file names): older
# folders are then rewritten rather than silently reused.
DET_DEMO_FORMAT = 1
DET_DEMO_MARKER = 'det_demo.json'
_SPLITS = (('train', True), ('val', False))  # COCO split, drawn from Fashion-MNIST's training images


@dataclasses.dataclass(frozen=True)
class DetDemoParams(CanvasParams):
    """Everything that decides the files; recorded in ``det_demo.json``.

    Defaults: 2,000 training and 200 validation canvases of 128×160 (`size`: (H, W), or one int for a square;
    not square, so that a keep-ratio resize has a long and a short side to tell apart), each with 2–4 glyphs
    (`glyphs`, an inclusive range) scaled 1–2× (`scale`: 28–56 px), JPEG `quality` 95 without chroma subsampling.
    `threshold`: the glyph pixels (0–255, before colouring) of at most this intensity, the anti-aliased rim and
    faint parts, are left out of the polygon's hull. `background`, `noise`, `tint`: the colouring, as the
    segmentation demo's (:class:`data.seg_demo.SegDemoParams`). `seed`: canvas i of a split is drawn from
    ``numpy.random.default_rng([seed, split, i])`` (split 0 = train, 1 = val). `fashion_mnist_root`: the folder of
    the IDX files ('' = the Debian package's)."""

    KIND = 'detection demo'
    FORMAT = DET_DEMO_FORMAT

    size: Tuple[int, int] = (128, 160)


def convex_hull(points: np.ndarray) -> np.ndarray:
    """The convex hull of (M, 2) points (x, y), counter-clockwise with y up (clockwise on screen, y down) from the
    smallest (x, y), without collinear vertices (Andrew's monotone chain)."""
    unique = sorted(set(map(tuple, np.asarray(points).tolist())))
    if len(unique) < 3:
        return np.array(unique, dtype=points.dtype).reshape(-1, 2)

    def cross(o, a, b) -> float:
        return (a[0] - o[0]) * (b[1] - o[1]) - (a[1] - o[1]) * (b[0] - o[0])

    def half(sequence) -> list:
        chain: list = []
        for point in sequence:
            while len(chain) >= 2 and cross(chain[-2], chain[-1], point) <= 0:
                chain.pop()
            chain.append(point)
        return chain

    lower, upper = half(unique), half(reversed(unique))
    return np.array(lower[:-1] + upper[:-1], dtype=points.dtype)


def glyph_polygon(mask: np.ndarray) -> List[int]:
    """The convex hull of the pixels of bool `mask` (H, W) as a COCO polygon ``[x1, y1, x2, y2, ...]``: the hull
    of the corners of each row's first and last pixel (pixel (r, c) spans x in [c, c + 1], y in [r, r + 1])."""
    rows = np.flatnonzero(mask.any(axis=1))
    if len(rows) == 0:
        raise ValueError('glyph_polygon needs a mask with at least one pixel')
    first = mask[rows].argmax(axis=1)
    last = mask.shape[1] - mask[rows, ::-1].argmax(axis=1)  # one past the last pixel
    corners = np.concatenate([np.stack([xs, ys], axis=1)
                              for xs in (first, last) for ys in (rows, rows + 1)]).astype(np.int64)
    return convex_hull(corners).ravel().tolist()


def render_det_canvas(images: np.ndarray, classes: np.ndarray, params: DetDemoParams,
                      rng: np.random.Generator) -> Tuple[np.ndarray, List[Tuple[int, List[int]]]]:
    """One canvas from glyphs `images` (uint8 (M, 28, 28)) with Fashion-MNIST labels `classes` (M,): the uint8
    (H, W, 3) RGB image and its instances, ``(category id = class + 1, polygon)`` per pasted glyph."""
    count = int(rng.integers(params.glyphs[0], params.glyphs[1] + 1))
    # threshold 0: each mask is all of its glyph's ink, rim included, so that the rim takes the glyph's tint
    ink, target = paste_glyphs(images, classes, params.size, count, params.scale, 0, rng)
    masks = target['masks'].numpy().astype(bool)
    instances = []
    for mask, category_id in zip(masks, target['labels'].tolist(), strict=True):
        solid = mask & (ink > params.threshold)
        instances.append((category_id, glyph_polygon(solid if solid.any() else mask)))
    return colour_glyphs(ink, masks, params, rng), instances


def _annotation(ann_id: int, image_id: int, category_id: int, polygon: List[int], size: Tuple[int, int]) -> dict:
    """A COCO annotation whose bbox and area are those of the polygon's rasterisation."""
    rle = mask_utils.frPyObjects([polygon], size[0], size[1])[0]
    return {'id': ann_id, 'image_id': image_id, 'category_id': category_id, 'segmentation': [polygon],
            'area': float(mask_utils.area(rle)), 'bbox': [float(v) for v in mask_utils.toBbox(rle)], 'iscrowd': 0}


def write_det_demo(root: str, params: Optional[DetDemoParams] = None, **overrides: Any) -> DetDemoParams:
    """Write the dataset into folder `root` (created; it must not hold files already), the marker last.

    Not atomic by itself: :func:`ensure_det_demo` calls it on a temporary folder. The same parameters give
    byte-identical files. Raises :class:`DatasetNotFoundError` (before creating anything) when the Fashion-MNIST
    files are missing. Returns the parameters written."""
    params = dataclasses.replace(params or DetDemoParams(), **overrides)
    sources = {train: FashionMNIST(params.fashion_mnist_root, train=train) for _, train in _SPLITS}
    os.makedirs(root, exist_ok=True)
    if os.listdir(root):
        raise DataError(f'detection demo: {root} is not empty; write_det_demo writes into a new folder')
    os.makedirs(os.path.join(root, 'annotations'))
    categories = [{'id': index + 1, 'name': name, 'supercategory': 'garment'}
                  for index, name in enumerate(FASHION_MNIST_CLASSES)]
    height, width = params.size
    for split_index, (split, train) in enumerate(_SPLITS):
        image_dir = os.path.join(root, f'{split}2017')
        os.makedirs(image_dir)
        images, annotations = [], []
        for index in range(params.num_train if train else params.num_val):
            rng = np.random.default_rng([params.seed, split_index, index])
            pixels, instances = render_det_canvas(sources[train].images, sources[train].targets, params, rng)
            image_id, file_name = index + 1, f'{index + 1:012d}.jpg'
            Image.fromarray(pixels).save(os.path.join(image_dir, file_name), quality=params.quality, subsampling=0)
            images.append({'id': image_id, 'file_name': file_name, 'height': height, 'width': width})
            for category_id, polygon in instances:
                annotations.append(_annotation(len(annotations) + 1, image_id, category_id, polygon, params.size))
        content = {'info': {'description': f'Fashion-MNIST glyphs on {height}x{width} canvases (data/det_demo.py)'},
                   'images': images, 'annotations': annotations, 'categories': categories}
        with open(os.path.join(root, 'annotations', f'instances_{split}2017.json'), 'w') as f:
            json.dump(content, f)
    write_marker(root, DET_DEMO_MARKER, params)
    return params


def ensure_det_demo(root: str, **params: Any) -> str:
    """Return `root` holding the demo dataset written with `params` (the fields of :class:`DetDemoParams`;
    missing ones take its defaults), writing it first when it is missing or was written with other parameters
    or another format version: atomically, safe for concurrent callers (DDP ranks), never replacing a folder
    it did not write (no marker: :class:`DataError`)."""
    settings = DetDemoParams(**params)
    return ensure_folder(root, settings, DET_DEMO_MARKER, lambda temp: write_det_demo(temp, settings))
