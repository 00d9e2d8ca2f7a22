"""COCO instance annotations (detection and instance segmentation) in the standard layout, read and checked whole.

    ROOT/train2017/000000000009.jpg …                 ROOT/annotations/instances_train2017.json
    ROOT/val2017/000000000139.jpg …                   ROOT/annotations/instances_val2017.json

The annotation file is parsed with the standard library and checked before anything runs; what would make the
data mean something else stops the run with one :class:`DataError` naming the file and the id: JSON that does
not parse (line and column), a missing ``images`` / ``annotations`` / ``categories`` list, an entry without its
fields, a repeated id, an annotation whose ``image_id`` or ``category_id`` is not listed, an RLE mask of another
size than its image, a listed image file that does not exist (every file is checked when the dataset is built),
an image whose size is not the one listed (when it is read).

What a training run can do without is skipped, with one logged line per reason that gives the count and the
first ids (logger ``flatten.data``): polygons of fewer than 3 points (or an odd count of numbers) are dropped,
and an annotation left without a polygon is not a training target; a box of zero or negative width or height,
or lying entirely outside its image, is not a training target (a box overflowing its image is clipped to it).
Crowd annotations (``iscrowd`` 1, one region over many objects) are not training targets either, as mmdet's
default assigner ignores them. A training view (``train=True``) leaves out the images that keep no target;
the evaluation view keeps every image, and its ground truth (:attr:`CocoDetection.coco`, a pycocotools COCO
object for COCOeval) keeps every annotation as written, crowds and odd boxes included, so that AP is the
official one; only the degenerate polygons are dropped from it too (pycocotools would read a 4-number polygon
as a box and fail on shorter ones), an annotation left without any then having an empty mask.

Category ids, sorted ascending, are the labels 1..K of the model (0 is the background).
"""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import logging
import math
import os
import pickle
from typing import Any, Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import numpy as np
import torch
from PIL import Image
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

from .det_transforms import image_to_tensor
from .errors import DataError, DatasetNotFoundError

__all__ = ['CocoDetection', 'CocoGroundTruth', 'COCO_SPLITS', 'decode_segmentation']

logger = logging.getLogger('flatten.data')

COCO_SPLITS = ('train', 'val')
_SHOWN_IDS = 5  # ids named in a logged skip


def _load_json(path: str) -> Dict[str, Any]:
    try:
        with open(path, 'rb') as f:
            content = json.load(f)
    except json.JSONDecodeError as err:
        raise DataError(f'{path} is not valid JSON: {err.msg} at line {err.lineno}, column {err.colno}') from None
    except UnicodeDecodeError as err:
        raise DataError(f'{path} is not valid JSON: it is not UTF-8 text ({err.reason} at byte {err.start})') from None
    if not isinstance(content, dict):
        raise DataError(f'{path}: the top level is a JSON {type(content).__name__}, not an object with "images", '
                        f'"annotations" and "categories"')
    missing = [key for key in ('images', 'annotations', 'categories') if not isinstance(content.get(key), list)]
    if missing:
        raise DataError(f'{path}: no {" / ".join(repr(key) for key in missing)} list; COCO instance annotations hold '
                        f'"images", "annotations" and "categories"')
    return content


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _entry_id(path: str, key: str, position: int, entry: Any) -> int:
    """The integer id of ``content[key][position]``, which must be an object."""
    if not isinstance(entry, dict) or not _is_int(entry.get('id')):
        raise DataError(f'{path}: {key}[{position}] has no integer "id": {str(entry)[:120]}')
    return entry['id']


def _index(path: str, key: str, noun: str, entries: List[Any], fields: Dict[str, Callable[[Any], bool]],
           what: Dict[str, str]) -> Dict[int, dict]:
    """{id: entry} of the `key` list (of `noun` entries), each entry holding `fields` (name: check), ids unique."""
    indexed: Dict[int, dict] = {}
    for position, entry in enumerate(entries):
        entry_id = _entry_id(path, key, position, entry)
        if entry_id in indexed:
            raise DataError(f'{path}: {noun} id {entry_id} appears twice (at {key}[{position}] and before)')
        for field, check in fields.items():
            if not check(entry.get(field)):
                raise DataError(f'{path}: {noun} id {entry_id} has {field} {entry.get(field)!r}: '
                                f'{what[field]}')
        indexed[entry_id] = entry
    return indexed


_IMAGE_FIELDS = {'file_name': lambda v: isinstance(v, str) and v != '',
                 'width': lambda v: _is_int(v) and v > 0, 'height': lambda v: _is_int(v) and v > 0}
_IMAGE_WHAT = {'file_name': 'a file name is needed', 'width': 'a positive integer is needed',
               'height': 'a positive integer is needed'}
_CATEGORY_FIELDS = {'name': lambda v: isinstance(v, str)}
_CATEGORY_WHAT = {'name': 'a name (string) is needed'}


def _check_segmentation(path: str, ann: dict, image: dict) -> List[list] | dict:
    """The annotation's segmentation with its degenerate polygons (fewer than 3 points, an odd count of
    numbers) dropped; an RLE is checked against the image size."""
    ann_id, segmentation = ann['id'], ann.get('segmentation')
    height, width = image['height'], image['width']
    if isinstance(segmentation, list):
        if not all(isinstance(polygon, list) for polygon in segmentation):
            raise DataError(f'{path}: annotation id {ann_id} has a "segmentation" list that is not a list of polygons '
                            f'(lists of x, y numbers)')
        return [polygon for polygon in segmentation if (len(polygon) >= 6 and len(polygon) % 2 == 0)]
    if isinstance(segmentation, dict):
        size, counts = segmentation.get('size'), segmentation.get('counts')
        if size != [height, width]:
            raise DataError(f'{path}: annotation id {ann_id} has an RLE mask of size {size!r}, but its image id '
                            f'{image["id"]} is {height}x{width} (height x width)')
        if isinstance(counts, list):
            if not (all(_is_int(c) and c >= 0 for c in counts) and sum(counts) == height * width):
                raise DataError(f'{path}: annotation id {ann_id} has uncompressed RLE counts that are not '
                                f'non-negative integers summing to {height}x{width} = {height * width} pixels')
        elif not isinstance(counts, str):
            raise DataError(f'{path}: annotation id {ann_id} has an RLE mask without "counts" (a string, or a list '
                            f'of run lengths)')
        return segmentation
    raise DataError(f'{path}: annotation id {ann_id} has no "segmentation" (polygons or an RLE mask): instance '
                    f'segmentation needs a mask per object')


def _check_annotation(path: str, ann: dict, images: Dict[int, dict], categories: Dict[int, dict]) -> None:
    ann_id = ann['id']
    if ann.get('image_id') not in images:
        raise DataError(f'{path}: annotation id {ann_id} has image_id {ann.get("image_id")!r}, which is not the id '
                        f'of an entry of "images"')
    if ann.get('category_id') not in categories:
        raise DataError(f'{path}: annotation id {ann_id} has category_id {ann.get("category_id")!r}, which is not '
                        f'the id of an entry of "categories" (ids {sorted(categories)[:10]}'
                        f'{" ..." if len(categories) > 10 else ""})')
    bbox = ann.get('bbox')
    if not (isinstance(bbox, list) and len(bbox) == 4 and all(_is_number(v) for v in bbox)):
        raise DataError(f'{path}: annotation id {ann_id} has bbox {bbox!r}: four numbers [x, y, width, height] are '
                        f'needed')
    if not _is_number(ann.get('area')):
        raise DataError(f'{path}: annotation id {ann_id} has area {ann.get("area")!r}: a number is needed (COCOeval '
                        f'sorts objects into small / medium / large by it)')
    if ann.get('iscrowd', 0) not in (0, 1):
        raise DataError(f'{path}: annotation id {ann_id} has iscrowd {ann.get("iscrowd")!r}: 0 or 1 is needed')


def _empty_rle(image: dict) -> dict:
    """An uncompressed RLE of no pixel at the image's size."""
    return {'size': [image['height'], image['width']], 'counts': [image['height'] * image['width']]}


def _clipped_box(bbox: Sequence[float], image: dict) -> Tuple[float, float, float, float]:
    """COCO's [x, y, w, h] as x1, y1, x2, y2 clipped to the image (empty when it lies outside)."""
    x, y, w, h = bbox
    width, height = image['width'], image['height']
    return (min(max(x, 0.0), width), min(max(y, 0.0), height),
            min(max(x + w, 0.0), width), min(max(y + h, 0.0), height))


def _log_skips(path: str, reason: str, ann_ids: List[int], level: int = logging.WARNING) -> None:
    if ann_ids:
        shown = ', '.join(str(i) for i in ann_ids[:_SHOWN_IDS]) + (', ...' if len(ann_ids) > _SHOWN_IDS else '')
        logger.log(level, f'{path}: {len(ann_ids)} annotation(s) {reason} (ids {shown})')


def decode_segmentation(segmentation: List[list] | dict, height: int, width: int) -> np.ndarray:
    """The uint8 (height, width) bitmap of COCO polygons (a list of [x1, y1, x2, y2, ...], merged) or an RLE
    mask (``counts`` compressed, as a string, or uncompressed, as a list of run lengths)."""
    if isinstance(segmentation, list):
        rle = mask_utils.merge(mask_utils.frPyObjects(segmentation, height, width))
    elif isinstance(segmentation['counts'], list):
        rle = mask_utils.frPyObjects(segmentation, height, width)
    else:
        rle = segmentation
    return np.ascontiguousarray(mask_utils.decode(rle))


def _coco_from_dict(dataset: Dict[str, Any]) -> COCO:
    """A pycocotools COCO over the already parsed `dataset`, without its prints."""
    coco = COCO()
    coco.dataset = dataset
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return coco


class _Record(NamedTuple):
    """What an item needs of one image: its file and size, and in the training view its targets."""
    image_id: int
    file_name: str
    width: int
    height: int
    boxes: Optional[np.ndarray] = None  # float32 (N, 4) x1, y1, x2, y2, clipped to the image
    labels: Optional[np.ndarray] = None  # int64 (N,) in 1..K
    segmentations: Tuple[Any, ...] = ()  # polygons or RLE, as checked


class _PackedRecords:
    """Records pickled into one byte array. DataLoader workers forked from the main process then read them without
    touching the refcounts of millions of Python objects, which would copy every page they sit in into every
    worker: the memory of a COCO training run would grow with the workers (detectron2 packs its dataset so too)."""

    def __init__(self, records: Sequence[_Record]):
        blobs = [pickle.dumps(record, protocol=pickle.HIGHEST_PROTOCOL) for record in records]
        self.ends = np.cumsum([len(blob) for blob in blobs], dtype=np.int64)
        self.data = np.frombuffer(b''.join(blobs), dtype=np.uint8)

    def __len__(self) -> int:
        return len(self.ends)

    def __getitem__(self, index: int) -> _Record:
        start = int(self.ends[index - 1]) if index > 0 else 0
        return pickle.loads(memoryview(self.data[start:int(self.ends[index])]))


class CocoDetection(torch.utils.data.Dataset):
    """The `split` ('train' or 'val') of a COCO-layout folder `root`, checked as the module docstring says.

    Items are ``(image, target)``: the image float32 (3, H, W) in [0, 1] RGB, or ``transform(RGB PIL image,
    target)`` when `transform` is given (it must return the image as such a tensor). The training view
    (``train=True``) gives targets ``{'boxes': float32 (N, 4) x1, y1, x2, y2 in pixels, 'labels': int64 (N,) in
    1..K, 'masks': uint8 (N, H, W), 'image_id': int}``, without crowd or degenerate annotations, and only images
    that keep one; the evaluation view gives every image with ``{'image_id': int, 'orig_size': (H, W)}`` (no mask
    is decoded).

    Attributes: ``coco`` (the pycocotools COCO object of the whole split, for COCOeval), ``cat_ids`` (sorted
    category ids; label i is ``cat_ids[i - 1]``), ``label_to_cat_id`` ({label: category id}), ``class_names``
    (('background', name of label 1, ..., name of label K): indexed by label), ``num_classes`` (K), ``ids`` (the
    image ids of this view, ascending), ``annotation_file``, ``image_dir``.
    """

    def __init__(self, root: str, split: str, transform: Optional[Callable] = None, train: bool = False):
        if split not in COCO_SPLITS:
            raise ValueError(f'split must be one of {COCO_SPLITS}, got {split!r}')
        self.root, self.split, self.transform, self.train = root, split, transform, train
        self.image_dir = os.path.join(root, f'{split}2017')
        self.annotation_file = os.path.join(root, 'annotations', f'instances_{split}2017.json')
        for path, is_there in ((self.annotation_file, os.path.isfile), (self.image_dir, os.path.isdir)):
            if not is_there(path):
                raise DatasetNotFoundError(
                    f'COCO: no {path}. --data-path must be the COCO folder, holding train2017/, val2017/ and '
                    f'annotations/instances_{{train,val}}2017.json')
        path = self.annotation_file
        content = _load_json(path)
        images = _index(path, 'images', 'image', content['images'], _IMAGE_FIELDS, _IMAGE_WHAT)
        categories = _index(path, 'categories', 'category', content['categories'], _CATEGORY_FIELDS, _CATEGORY_WHAT)
        if not categories:
            raise DataError(f'{path}: the "categories" list is empty')
        self.cat_ids: Tuple[int, ...] = tuple(sorted(categories))
        self.label_to_cat_id: Dict[int, int] = {label: cat_id for label, cat_id in enumerate(self.cat_ids, 1)}
        self.class_names: Tuple[str, ...] = ('background',) + tuple(categories[c]['name'] for c in self.cat_ids)
        self.num_classes = len(self.cat_ids)
        self._check_files(images)
        annotations = content['annotations']
        seen: set = set()
        trimmed = []  # annotations that lose a degenerate polygon
        for position, ann in enumerate(annotations):
            ann_id = _entry_id(path, 'annotations', position, ann)
            if ann_id in seen:
                raise DataError(f'{path}: annotation id {ann_id} appears twice (at annotations[{position}] and '
                                f'before)')
            seen.add(ann_id)
            _check_annotation(path, ann, images, categories)
            # cleaned in place: the evaluation's ground truth and the training targets share the polygons
            segmentation = _check_segmentation(path, ann, images[ann['image_id']])
            if isinstance(segmentation, list) and len(segmentation) < len(ann['segmentation']):
                trimmed.append(ann_id)
            ann['segmentation'] = segmentation
        _log_skips(path, 'have polygons of fewer than 3 points (or an odd count of numbers): those polygons are '
                         'dropped', trimmed)
        if train:
            targets = self._training_targets(annotations, images)
            records = [_Record(image_id, images[image_id]['file_name'], images[image_id]['width'],
                               images[image_id]['height'], *targets[image_id]) for image_id in sorted(targets)]
        else:
            records = [_Record(image_id, images[image_id]['file_name'], images[image_id]['width'],
                               images[image_id]['height']) for image_id in sorted(images)]
        self._records = _PackedRecords(records)
        self.ids: List[int] = [record.image_id for record in records]
        for ann in annotations:
            if ann['segmentation'] == []:
                ann['segmentation'] = _empty_rle(images[ann['image_id']])
        self.coco = _coco_from_dict(content)
        if train and len(self.ids) < len(images):
            logger.info(f'{path}: {len(images) - len(self.ids)} of the {len(images)} images have no training target '
                        f'(no annotation, or only crowd or skipped ones): the training split leaves them out')
        if not self.ids:
            raise DataError(f'{path}: no image {"with a training target " if train else ""}is listed')

    def _check_files(self, images: Dict[int, dict]) -> None:
        """Every listed image file exists (one directory listing, not a stat per file)."""
        listed = set(os.listdir(self.image_dir))

        def exists(file_name: str) -> bool:
            if os.path.basename(file_name) == file_name:
                return file_name in listed
            return os.path.isfile(os.path.join(self.image_dir, file_name))  # a file in a subfolder

        missing = [image for image in images.values() if not exists(image['file_name'])]
        if missing:
            first = missing[0]
            raise DataError(f'{self.annotation_file}: image id {first["id"]}: file '
                            f'{os.path.join(self.image_dir, first["file_name"])} does not exist ({len(missing)} of the '
                            f'{len(images)} listed images are missing)')

    def _training_targets(self, annotations: List[dict],
                          images: Dict[int, dict]) -> Dict[int, Tuple[np.ndarray, np.ndarray, Tuple[Any, ...]]]:
        """{image id: (boxes, labels, segmentations)} of the images that keep a training target, in annotation
        order; the skips are logged."""
        labels = {cat_id: label for label, cat_id in self.label_to_cat_id.items()}
        kept: Dict[int, List[Tuple[Tuple[float, ...], int, Any]]] = {}
        crowd, no_polygon, empty_box = [], [], []
        for ann in annotations:
            box = _clipped_box(ann['bbox'], images[ann['image_id']])
            if ann.get('iscrowd', 0):
                crowd.append(ann['id'])
            elif ann['segmentation'] == []:
                no_polygon.append(ann['id'])
            elif not (box[2] > box[0] and box[3] > box[1]):
                empty_box.append(ann['id'])
            else:
                kept.setdefault(ann['image_id'], []).append((box, labels[ann['category_id']], ann['segmentation']))
        path = self.annotation_file
        _log_skips(path, 'are crowd regions (iscrowd 1): not training targets, as mmdet ignores them', crowd,
                   logging.INFO)
        _log_skips(path, 'have no polygon of 3 or more points: not training targets', no_polygon)
        _log_skips(path, 'have a box of zero or negative width or height, or outside the image: not training '
                         'targets', empty_box)
        return {image_id: (np.array([r[0] for r in records], np.float32), np.array([r[1] for r in records], np.int64),
                           tuple(r[2] for r in records))
                for image_id, records in kept.items()}

    def __len__(self) -> int:
        return len(self.ids)

    def _read_image(self, record: _Record) -> Image.Image:
        """The RGB PIL image of `record`, checked against its listed size."""
        path = os.path.join(self.image_dir, record.file_name)
        try:
            with Image.open(path) as opened:
                image = opened.convert('RGB')
        except (OSError, SyntaxError, ValueError) as err:  # PIL: UnidentifiedImageError, truncated data
            raise DataError(f'cannot read image {path} (image id {record.image_id}): {err}') from None
        if image.size != (record.width, record.height):
            raise DataError(f'image {path} (image id {record.image_id}) is {image.size[0]}x{image.size[1]} (WxH) but '
                            f'{self.annotation_file} lists it as {record.width}x{record.height}')
        return image

    def _target(self, record: _Record) -> Dict[str, Any]:
        if not self.train:
            return {'image_id': record.image_id, 'orig_size': (record.height, record.width)}
        masks = np.stack([decode_segmentation(s, record.height, record.width) for s in record.segmentations])
        return {'boxes': torch.from_numpy(record.boxes), 'labels': torch.from_numpy(record.labels),
                'masks': torch.from_numpy(masks), 'image_id': record.image_id}

    def __getitem__(self, index: int) -> Tuple[torch.Tensor, Dict[str, Any]]:
        record = self._records[index]
        image, target = self._read_image(record), self._target(record)
        if self.transform is None:
            return image_to_tensor(image), target
        return self.transform(image, target)


@dataclasses.dataclass(frozen=True)
class CocoGroundTruth:
    """What the COCO evaluation (utils/det_eval.py) needs of a validation set: the pycocotools `coco` object, the
    map from the model's labels 1..K to category ids, and the ids of the images evaluated (a subset's only)."""
    coco: COCO
    label_to_cat_id: Dict[int, int]
    image_ids: Tuple[int, ...]

    @classmethod
    def of(cls, dataset: torch.utils.data.Dataset) -> CocoGroundTruth:
        """The ground truth of a :class:`CocoDetection` or of a ``torch.utils.data.Subset`` (nested or not) of
        one, whose images alone are then evaluated."""
        positions: Optional[List[int]] = None
        while isinstance(dataset, torch.utils.data.Subset):
            inner = [int(i) for i in dataset.indices]
            positions = inner if positions is None else [inner[i] for i in positions]
            dataset = dataset.dataset
        if not isinstance(dataset, CocoDetection):
            raise TypeError(f'CocoGroundTruth.of needs a CocoDetection or a Subset of one, got '
                            f'{type(dataset).__name__}')
        ids = dataset.ids if positions is None else [dataset.ids[i] for i in positions]
        return cls(dataset.coco, dict(dataset.label_to_cat_id), tuple(ids))
