"""COCO detection data: the reader's checks and skips (data/coco.py), the training transforms
(data/det_transforms.py), the demo writer (data/det_demo.py) and the detection loaders (data/build.py), on tiny
hand-written COCO folders and a fake Fashion-MNIST."""
from __future__ import annotations

import copy
import json
import logging
import random
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import numpy as np
import pytest
import torch
from PIL import Image
from pycocotools import mask as mask_utils

from config import get_default_config
from data.build import build_detection_loaders, build_loaders
from data.coco import CocoDetection, CocoGroundTruth
from data.det_demo import DET_DEMO_MARKER, DetDemoParams, convex_hull, ensure_det_demo, glyph_polygon, render_det_canvas
from data.det_transforms import DetTrainTransform
from data.detection_toy import paste_glyphs
from data.errors import DataError, DatasetNotFoundError
from data.fashion_mnist import FASHION_MNIST_CLASSES, FashionMNIST

# Category ids are not contiguous and not listed in order: labels follow the sorted ids 3, 7, 12 → 1, 2, 3.
CATEGORIES = [{'id': 12, 'name': 'bird'}, {'id': 3, 'name': 'cat'}, {'id': 7, 'name': 'dog'}]
SIZES = {1: (48, 32), 2: (40, 40), 3: (32, 48)}  # image id: (W, H); image 3 has no annotation


def _mask(size_wh, rows: slice, cols: slice) -> np.ndarray:
    mask = np.zeros((size_wh[1], size_wh[0]), dtype=np.uint8)
    mask[rows, cols] = 1
    return mask


def _uncompressed_rle(mask: np.ndarray) -> dict:
    """COCO's uncompressed RLE, written out by hand: run lengths of the column-major pixels, zeros first."""
    flat = mask.flatten(order='F')
    changes = np.flatnonzero(np.diff(flat)) + 1
    bounds = np.concatenate([[0], changes, [flat.size]])
    counts = np.diff(bounds).tolist()
    if flat[0] == 1:
        counts = [0] + counts
    return {'size': list(mask.shape), 'counts': counts}


def _compressed_rle(mask: np.ndarray) -> dict:
    rle = mask_utils.encode(np.asfortranarray(mask))
    return {'size': rle['size'], 'counts': rle['counts'].decode('ascii')}


TRIANGLE = [5.0, 10.0, 25.0, 10.0, 5.0, 30.0]  # right angle at (5, 10), legs of 20 px
_ROWS, _COLS = np.mgrid[:40, :40]
# The expected bitmap of each annotation of the valid dataset
MASKS = {
    11: _mask(SIZES[1], slice(6, 18), slice(4, 20)),  # polygon: the rectangle x 4..20, y 6..18
    12: _mask(SIZES[1], slice(20, 30), slice(30, 45)),  # compressed RLE
    # polygon: the pixels whose centre lies strictly inside the triangle (x + y < 35 on the hypotenuse)
    21: ((_COLS >= 5) & (_ROWS >= 10) & (_COLS + _ROWS < 34)).astype(np.uint8),
    22: _mask(SIZES[2], slice(2, 12), slice(25, 38)),  # uncompressed RLE
}


def _box(ann_id: int) -> List[float]:
    rows, cols = np.flatnonzero(MASKS[ann_id].any(1)), np.flatnonzero(MASKS[ann_id].any(0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1 - cols[0]), float(rows[-1] + 1 - rows[0])]


def coco_content() -> Dict:
    """The valid annotation file: two annotated images, one crowd region, one image without annotations."""
    anns = [
        {'id': 11, 'image_id': 1, 'category_id': 7, 'bbox': _box(11), 'area': 192.0, 'iscrowd': 0,
         'segmentation': [[4, 6, 20, 6, 20, 18, 4, 18]]},
        {'id': 12, 'image_id': 1, 'category_id': 3, 'bbox': _box(12), 'area': 150.0, 'iscrowd': 0,
         'segmentation': _compressed_rle(MASKS[12])},
        {'id': 13, 'image_id': 1, 'category_id': 12, 'bbox': [0.0, 0.0, 10.0, 5.0], 'area': 50.0, 'iscrowd': 1,
         'segmentation': _uncompressed_rle(_mask(SIZES[1], slice(0, 5), slice(0, 10)))},
        {'id': 21, 'image_id': 2, 'category_id': 12, 'bbox': [5.0, 10.0, 20.0, 20.0], 'area': 200.0, 'iscrowd': 0,
         'segmentation': [TRIANGLE]},
        {'id': 22, 'image_id': 2, 'category_id': 7, 'bbox': _box(22), 'area': 130.0,
         'segmentation': _uncompressed_rle(MASKS[22])},  # iscrowd left out: 0
    ]
    images = [{'id': i, 'file_name': f'{i:012d}.png', 'width': w, 'height': h} for i, (w, h) in SIZES.items()]
    return {'images': images, 'annotations': anns, 'categories': copy.deepcopy(CATEGORIES)}


def _pixels(image_id: int) -> np.ndarray:
    w, h = SIZES[image_id]
    return (np.arange(h * w * 3).reshape(h, w, 3) * (7 + image_id) % 256).astype(np.uint8)


def write_coco(root: Path, content: Dict, splits=('train', 'val')) -> Path:
    """`content` as both splits of a COCO folder, with a PNG per listed image of its listed size."""
    (root / 'annotations').mkdir(parents=True, exist_ok=True)
    for split in splits:
        (root / f'{split}2017').mkdir(exist_ok=True)
        for image in content.get('images', []):
            Image.fromarray(_pixels(image['id'])).save(root / f'{split}2017' / image['file_name'])
        (root / 'annotations' / f'instances_{split}2017.json').write_text(json.dumps(content))
    return root


@pytest.fixture
def coco_root(tmp_path: Path) -> Path:
    return write_coco(tmp_path / 'coco', coco_content())


def _annotation(content: Dict, ann_id: int) -> Dict:
    return next(ann for ann in content['annotations'] if ann['id'] == ann_id)


def _edit(change: Callable[[Dict], object]) -> Tuple[str, Callable]:
    """A row that edits the annotation file's content."""
    return 'content', change


def _spoil(change: Callable[[Path], object]) -> Tuple[str, Callable]:
    """A row that changes the written folder."""
    return 'folder', change


def _annotation_file(text: str) -> Tuple[str, Callable]:
    return _spoil(lambda root: (root / 'annotations' / 'instances_val2017.json').write_text(text))


FILE = r'annotations/instances_val2017\.json'

# How to break the valid dataset → the DataError's text, which names the file and the id
BAD_INPUTS = [
    ('truncated JSON', _annotation_file('{"images": [{"id": 1,'),
     FILE + r' is not valid JSON: Expecting property name enclosed in double quotes at line 1, column 22'),
    ('a list at the top', _annotation_file('[]'), FILE + r': the top level is a JSON list'),
    ('no images', _edit(lambda c: c.pop('images')), FILE + r": no 'images' list"),
    ('no annotations, no categories', _edit(lambda c: (c.pop('annotations'), c.pop('categories'))),
     FILE + r": no 'annotations' / 'categories' list"),
    ('no categories listed', _edit(lambda c: c.update(categories=[])), FILE + r': the "categories" list is empty'),
    ('an image without width', _edit(lambda c: c['images'][1].pop('width')),
     FILE + r': image id 2 has width None: a positive integer is needed'),
    ('an image id twice', _edit(lambda c: c['images'][2].update(id=1)),
     FILE + r': image id 1 appears twice \(at images\[2\] and before\)'),
    ('an annotation id twice', _edit(lambda c: _annotation(c, 22).update(id=11)),
     FILE + r': annotation id 11 appears twice'),
    ('an unknown image_id', _edit(lambda c: _annotation(c, 12).update(image_id=99)),
     FILE + r': annotation id 12 has image_id 99, which is not the id of an entry of "images"'),
    ('an unknown category_id', _edit(lambda c: _annotation(c, 21).update(category_id=5)),
     FILE + r': annotation id 21 has category_id 5, which is not the id of an entry of "categories" '
            r'\(ids \[3, 7, 12\]\)'),
    ('a bbox of three numbers', _edit(lambda c: _annotation(c, 11).update(bbox=[1, 2, 3])),
     FILE + r': annotation id 11 has bbox \[1, 2, 3\]: four numbers'),
    ('no area', _edit(lambda c: _annotation(c, 22).pop('area')), FILE + r': annotation id 22 has area None'),
    ('iscrowd 2', _edit(lambda c: _annotation(c, 21).update(iscrowd=2)),
     FILE + r': annotation id 21 has iscrowd 2: 0 or 1 is needed'),
    ('no segmentation', _edit(lambda c: _annotation(c, 11).pop('segmentation')),
     FILE + r': annotation id 11 has no "segmentation"'),
    ('an RLE of another size', _edit(lambda c: _annotation(c, 12)['segmentation'].update(size=[40, 40])),
     FILE + r': annotation id 12 has an RLE mask of size \[40, 40\], but its image id 1 is 32x48'),
    ('uncompressed RLE counts that miss pixels', _edit(lambda c: _annotation(c, 22)['segmentation']['counts'].pop()),
     FILE + r': annotation id 22 has uncompressed RLE counts that are not non-negative integers summing to 40x40'),
    ('a missing image file', _spoil(lambda root: (root / 'val2017' / '000000000002.png').unlink()),
     FILE + r': image id 2: file .*val2017/000000000002\.png does not exist \(1 of the 3 listed images are missing\)'),
]


@pytest.mark.parametrize('name, breaks, message', BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS])
def test_bad_annotation_files_stop_with_the_file_and_id(tmp_path, name, breaks, message):
    kind, change = breaks
    content = coco_content()
    if kind == 'content':
        change(content)
    root = write_coco(tmp_path / 'coco', content, splits=('val',))
    if kind == 'folder':
        change(root)
    with pytest.raises(DataError, match=message):
        CocoDetection(str(root), 'val')


def test_missing_folders_and_unreadable_images(tmp_path, coco_root):
    with pytest.raises(DatasetNotFoundError, match=r'COCO: no .*annotations/instances_val2017\.json\. --data-path'):
        CocoDetection(str(tmp_path / 'nowhere'), 'val')
    with pytest.raises(ValueError, match="split must be one of"):
        CocoDetection(str(coco_root), 'test')
    # an image of another size than listed, and one that is not an image, fail when read, naming file and id
    Image.fromarray(_pixels(1)[:20]).save(coco_root / 'val2017' / '000000000001.png')
    (coco_root / 'val2017' / '000000000002.png').write_bytes(b'not a PNG')
    dataset = CocoDetection(str(coco_root), 'val')
    with pytest.raises(DataError, match=r'000000000001\.png \(image id 1\) is 48x20 \(WxH\) but .* lists it as 48x32'):
        dataset[0]
    with pytest.raises(DataError, match=r'cannot read image .*000000000002\.png \(image id 2\)'):
        dataset[1]


def _set_bbox(ann_id: int, **values: float) -> Callable[[Dict], None]:
    """An edit of the bbox of annotation `ann_id`: x, y, w, h set to `values`."""
    def change(content: Dict) -> None:
        bbox = _annotation(content, ann_id)['bbox']
        for key, value in values.items():
            bbox['xywh'.index(key)] = value
    return change


EMPTY_BOX = 'have a box of zero or negative width or height, or outside the image: not training targets'
# How to spoil annotations → the logged line (level, text) and the annotations left as training targets
SKIPS = [
    ('zero-width box', _set_bbox(11, w=0.0), logging.WARNING, f'1 annotation(s) {EMPTY_BOX} (ids 11)', [12, 21, 22]),
    ('negative height', _set_bbox(21, h=-4.0), logging.WARNING, f'1 annotation(s) {EMPTY_BOX} (ids 21)', [11, 12, 22]),
    ('boxes outside the image', lambda c: (_set_bbox(11, x=50.0)(c), _set_bbox(22, x=-20.0, y=-20.0, w=10.0)(c)),
     logging.WARNING, f'2 annotation(s) {EMPTY_BOX} (ids 11, 22)', [12, 21]),
    ('a polygon of two points', lambda c: _annotation(c, 21).update(segmentation=[[1, 1, 5, 5]]), logging.WARNING,
     '1 annotation(s) have no polygon of 3 or more points: not training targets (ids 21)', [11, 12, 22]),
    ('a good polygon and an odd one', lambda c: _annotation(c, 21)['segmentation'].append([1, 2, 3, 4, 5, 6, 7]),
     logging.WARNING, '1 annotation(s) have polygons of fewer than 3 points (or an odd count of numbers): those '
                      'polygons are dropped (ids 21)', [11, 12, 21, 22]),
    ('crowd', lambda c: None, logging.INFO,
     '1 annotation(s) are crowd regions (iscrowd 1): not training targets, as mmdet ignores them (ids 13)',
     [11, 12, 21, 22]),
]


@pytest.mark.parametrize('name, change, level, message, kept', SKIPS, ids=[row[0] for row in SKIPS])
def test_unusable_annotations_are_logged_and_skipped_in_training(tmp_path, caplog, name, change, level, message,
                                                                  kept):
    content = coco_content()
    change(content)
    root = write_coco(tmp_path / 'coco', content, splits=('train',))
    with caplog.at_level(logging.INFO, logger='flatten.data'):
        dataset = CocoDetection(str(root), 'train', train=True)
    lines = [r for r in caplog.records if r.name == 'flatten.data' and message in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelno == level, caplog.text
    assert str(root / 'annotations' / 'instances_train2017.json') in lines[0].getMessage()
    boxes = [tuple(box) for i in range(len(dataset)) for box in dataset[i][1]['boxes'].tolist()]
    assert sorted((x1, y1, x2 - x1, y2 - y1) for x1, y1, x2, y2 in boxes) == sorted(
        tuple(_annotation(coco_content(), ann_id)['bbox']) for ann_id in kept)
    # the evaluation's ground truth keeps every annotation
    assert sorted(dataset.coco.anns) == [11, 12, 13, 21, 22]


def test_an_annotation_without_polygons_has_an_empty_mask_in_evaluation(tmp_path):
    content = coco_content()
    _annotation(content, 21)['segmentation'] = [[1, 1, 5, 5], [2, 2]]  # pycocotools: a box, then an error
    val = CocoDetection(str(write_coco(tmp_path / 'coco', content, splits=('val',))), 'val')
    assert val.coco.annToMask(val.coco.anns[21]).shape == (40, 40) and val.coco.annToMask(val.coco.anns[21]).sum() == 0
    assert val.coco.anns[21]['bbox'] == [5.0, 10.0, 20.0, 20.0]  # still a box to find


def test_overflowing_boxes_are_clipped(tmp_path):
    content = coco_content()
    _annotation(content, 12)['bbox'] = [30.0, 20.0, 100.0, 100.0]  # image 1 is 48x32
    root = write_coco(tmp_path / 'coco', content, splits=('train',))
    target = CocoDetection(str(root), 'train', train=True)[0][1]
    assert target['boxes'].tolist()[1] == [30.0, 20.0, 48.0, 32.0]


def test_category_mapping_round_trip(coco_root):
    dataset = CocoDetection(str(coco_root), 'train', train=True)
    assert dataset.cat_ids == (3, 7, 12) and dataset.num_classes == 3
    assert dataset.label_to_cat_id == {1: 3, 2: 7, 3: 12}
    assert dataset.class_names == ('background', 'cat', 'dog', 'bird')
    seen = {}
    for index in range(len(dataset)):
        _, target = dataset[index]
        for label, box in zip(target['labels'].tolist(), target['boxes'].tolist(), strict=True):
            seen[tuple(box)] = dataset.label_to_cat_id[label]
    expected = {}
    for ann in coco_content()['annotations']:
        if not ann.get('iscrowd'):
            x, y, w, h = ann['bbox']
            expected[(x, y, x + w, y + h)] = ann['category_id']
    assert seen == expected
    for label, cat_id in dataset.label_to_cat_id.items():
        assert dataset.coco.cats[cat_id]['name'] == dataset.class_names[label]


def test_polygon_and_rle_masks_decode_to_their_pixels(coco_root):
    dataset = CocoDetection(str(coco_root), 'train', train=True)
    assert dataset.ids == [1, 2]  # image 3 has no annotation
    first, second = dataset[0][1], dataset[1][1]
    assert first['masks'].dtype == torch.uint8 and first['masks'].shape == (2, 32, 48)
    assert first['boxes'].dtype == torch.float32 and first['labels'].dtype == torch.int64
    assert first['image_id'] == 1 and second['image_id'] == 2
    for target, ann_ids in ((first, (11, 12)), (second, (21, 22))):
        for mask, ann_id in zip(target['masks'].numpy(), ann_ids, strict=True):
            assert np.array_equal(mask, MASKS[ann_id]), ann_id


def test_crowd_is_ignored_in_training_but_kept_for_evaluation(coco_root):
    train = CocoDetection(str(coco_root), 'train', train=True)
    _, target = train[0]
    assert len(target['labels']) == 2 and 3 not in target['labels'].tolist()  # crowd 13 is a 'bird' (label 3)
    assert train.coco.anns[13]['iscrowd'] == 1
    val = CocoDetection(str(coco_root), 'val')
    assert val.coco.getAnnIds(imgIds=[1], iscrowd=None) == [11, 12, 13]


def test_images_without_annotations_are_kept_for_evaluation_only(coco_root, caplog):
    with caplog.at_level(logging.INFO, logger='flatten.data'):
        train = CocoDetection(str(coco_root), 'train', train=True)
    assert train.ids == [1, 2] and len(train) == 2
    assert '1 of the 3 images have no training target' in caplog.text
    val = CocoDetection(str(coco_root), 'val')
    assert val.ids == [1, 2, 3]
    image, target = val[2]
    assert target == {'image_id': 3, 'orig_size': (48, 32)}
    # the original image, unresized, in [0, 1]
    assert image.dtype == torch.float32 and image.shape == (3, 48, 32)
    assert torch.equal(image, torch.from_numpy(_pixels(3)).permute(2, 0, 1).float() / 255)


def test_ground_truth_of_a_subset_is_its_images(coco_root):
    val = CocoDetection(str(coco_root), 'val')
    assert CocoGroundTruth.of(val).image_ids == (1, 2, 3)
    subset = torch.utils.data.Subset(torch.utils.data.Subset(val, [2, 0, 1]), [0, 1])
    gt = CocoGroundTruth.of(subset)
    assert gt.image_ids == (3, 1) and gt.coco is val.coco and gt.label_to_cat_id == {1: 3, 2: 7, 3: 12}
    with pytest.raises(TypeError, match='needs a CocoDetection'):
        CocoGroundTruth.of(torch.utils.data.TensorDataset(torch.zeros(2)))


# ---------------------------------------------------------------------------------------------------------------
# Transforms
# ---------------------------------------------------------------------------------------------------------------

def _instances(width: int = 64, height: int = 48) -> tuple:
    """A textured image and five rectangles (one overflowing nothing, all inside) with their tight boxes."""
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    rects = [(2, 3, 20, 15), (30, 5, 60, 12), (10, 25, 25, 45), (40, 20, 62, 46), (26, 14, 38, 22)]  # x1 y1 x2 y2
    masks = np.zeros((len(rects), height, width), dtype=np.uint8)
    for mask, (x1, y1, x2, y2) in zip(masks, rects, strict=True):
        mask[y1:y2, x1:x2] = 1
    target = {'boxes': torch.tensor(rects, dtype=torch.float32), 'labels': torch.arange(1, len(rects) + 1),
              'masks': torch.from_numpy(masks), 'image_id': 7}
    return image, target


def _mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    boxes = []
    for mask in masks.numpy():
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        boxes.append([cols[0], rows[0], cols[-1] + 1, rows[-1] + 1])
    return torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4)


TRANSFORMS = {
    'resize down': dict(scales=[(40, 30)], flip_prob=0.0),
    'resize up, multi-scale': dict(scales=[(160, 100), (200, 120), (133, 80)], flip_prob=0.0),
    'flip': dict(scales=[(96, 72)], flip_prob=1.0),
    # crop scales that keep the image size and final scales that enlarge it: nearest never loses a pixel row
    'crop': dict(scales=[(192, 144)], flip_prob=0.5, crop_prob=1.0, crop_scales=[(64, 48)], crop_size=(16, 40)),
}


@pytest.mark.parametrize('settings', TRANSFORMS.values(), ids=list(TRANSFORMS))
def test_transformed_boxes_stay_the_boxes_of_the_transformed_masks(settings):
    transform = DetTrainTransform(**settings)
    kept = 0
    for seed in range(12):
        random.seed(seed)
        image, target = transform(*_instances())
        h, w = image.shape[-2:]
        assert image.dtype == torch.float32 and image.shape[0] == 3 and 0 <= image.min() and image.max() <= 1
        assert target['masks'].shape[1:] == (h, w) and target['image_id'] == 7
        assert target['boxes'].dtype == torch.float32 and target['masks'].dtype == torch.uint8
        assert len(target['boxes']) == len(target['labels']) == len(target['masks'])
        assert (target['masks'].flatten(1).sum(1) > 0).all()
        torch.testing.assert_close(_mask_boxes(target['masks']), target['boxes'], atol=1.0, rtol=0)
        kept += len(target['boxes'])
    assert kept > 0


def test_keep_ratio_resize_sizes_and_scaled_boxes():
    image, target = _instances()  # 64x48
    random.seed(0)
    resized, out = DetTrainTransform([(100, 60)], flip_prob=0.0)(image, target)
    # s = min(100 / 64, 60 / 48) = 1.25 → 80x60; boxes scale by 80/64 and 60/48
    assert resized.shape == (3, 60, 80)
    torch.testing.assert_close(out['boxes'], target['boxes'] * 1.25)
    # the pair's order does not matter, and the long side may be the binding limit: min(40 / 64, 35 / 48)
    assert DetTrainTransform([(60, 100)], flip_prob=0.0)(image, target)[0].shape == (3, 60, 80)
    assert DetTrainTransform([(40, 35)], flip_prob=0.0)(image, target)[0].shape == (3, 30, 40)


def test_flip_mirrors_image_boxes_and_masks():
    image, target = _instances()
    random.seed(3)
    plain_image, plain = DetTrainTransform([(96, 72)], flip_prob=0.0)(image, target)
    random.seed(3)  # the flip draw is made either way, so both see the same other draws
    flipped_image, flipped = DetTrainTransform([(96, 72)], flip_prob=1.0)(image, target)
    assert torch.equal(flipped_image, plain_image.flip(-1)) and torch.equal(flipped['masks'], plain['masks'].flip(-1))
    width = plain_image.shape[-1]
    torch.testing.assert_close(flipped['boxes'], torch.stack([width - plain['boxes'][:, 2], plain['boxes'][:, 1],
                                                              width - plain['boxes'][:, 0], plain['boxes'][:, 3]], 1))


def test_crops_keep_their_size_range_and_may_keep_no_instance():
    image, target = _instances()
    target = dict(target, boxes=target['boxes'][:1], labels=target['labels'][:1], masks=target['masks'][:1])
    transform = DetTrainTransform([(64, 48)], flip_prob=0.0, crop_prob=1.0, crop_scales=[(64, 48)], crop_size=(10, 20))
    counts = set()
    for seed in range(40):
        random.seed(seed)
        cropped, out = transform(image, target)
        h, w = cropped.shape[-2:]
        assert (max(h, w) == 64 or min(h, w) == 48)  # the window is resized to the 64x48 limits
        assert len(out['boxes']) == len(out['labels']) == len(out['masks']) and out['masks'].shape[1:] == (h, w)
        counts.add(len(out['boxes']))
    assert counts == {0, 1}  # the one rectangle, in the top-left corner, is often left out
    with pytest.raises(ValueError, match=r'crop_size must be a range \(lo, hi\)'):
        DetTrainTransform(crop_size=(600, 384))


def test_transform_is_a_function_of_the_seed():
    transform = DetTrainTransform([(80, 60), (120, 90)], flip_prob=0.5, crop_prob=0.5, crop_scales=[(64, 48)],
                                  crop_size=(20, 40))
    outputs = []
    for seed in (5, 5, 6):
        random.seed(seed)
        runs = [transform(*_instances()) for _ in range(4)]
        outputs.append([(img, t['boxes'], t['masks']) for img, t in runs])
    for (a_img, a_box, a_mask), (b_img, b_box, b_mask) in zip(outputs[0], outputs[1], strict=True):
        assert torch.equal(a_img, b_img) and torch.equal(a_box, b_box) and torch.equal(a_mask, b_mask)
    assert any(a[0].shape != c[0].shape or not torch.equal(a[0], c[0])
               for a, c in zip(outputs[0], outputs[2], strict=True))


# ---------------------------------------------------------------------------------------------------------------
# The demo writer and the loaders
# ---------------------------------------------------------------------------------------------------------------

SMALL = dict(num_train=6, num_val=4, size=(48, 64), glyphs=(1, 2), scale=(1.0, 1.4))
HULL_EXCESS = 1.3  # the hull of a pixelated diamond's pixel corners takes in part of its staircase edges


def _write_idx(path: Path, array: np.ndarray) -> None:
    """An uncompressed uint8 IDX file (magic 0x0000 08 ndim, big-endian dimensions, the bytes)."""
    header = bytes([0, 0, 0x08, array.ndim]) + b''.join(int(n).to_bytes(4, 'big') for n in array.shape)
    path.write_bytes(header + np.ascontiguousarray(array, dtype=np.uint8).tobytes())


@pytest.fixture
def fake_fmnist(tmp_path: Path) -> str:
    """Fashion-MNIST IDX files of 10 glyphs per split, a filled diamond with a faint rim: the training split holds
    classes 0-4 only and the test split classes 5-9 only, so the categories tell a canvas's source split."""
    root = tmp_path / 'fmnist'
    root.mkdir()
    r, c = np.mgrid[:28, :28]
    distance = np.abs(r - 13.5) + np.abs(c - 13.5)
    glyph = np.where(distance < 10, 220, np.where(distance < 12, 20, 0)).astype(np.uint8)
    for stem, first_class in (('train', 0), ('t10k', 5)):
        _write_idx(root / f'{stem}-images-idx3-ubyte', np.repeat(glyph[None], 10, axis=0))
        _write_idx(root / f'{stem}-labels-idx1-ubyte', first_class + np.arange(10) % 5)
    return str(root)


def test_convex_hull_and_glyph_polygon():
    square = np.array([[0, 0], [2, 0], [2, 2], [0, 2], [1, 1], [1, 0]])
    assert convex_hull(square).tolist() == [[0, 0], [2, 0], [2, 2], [0, 2]]  # interior and edge points dropped
    mask = np.zeros((10, 12), dtype=bool)
    mask[2:5, 3:9] = True  # a rectangle: its polygon is its four pixel corners and rasterises back to it
    mask[5:8, 3:5] = True  # an L: the hull cuts across its notch
    polygon = glyph_polygon(mask)
    assert polygon == [3, 2, 9, 2, 9, 5, 5, 8, 3, 8]
    rectangle = np.zeros((10, 12), dtype=bool)
    rectangle[2:5, 3:9] = True
    decoded = mask_utils.decode(mask_utils.frPyObjects([glyph_polygon(rectangle)], 10, 12)[0])
    assert np.array_equal(decoded.astype(bool), rectangle)


def test_demo_writes_a_coco_folder_whose_polygons_are_the_pasted_glyphs(tmp_path, fake_fmnist):
    root = ensure_det_demo(str(tmp_path / 'det'), fashion_mnist_root=fake_fmnist, **SMALL)
    assert (Path(root) / DET_DEMO_MARKER).exists()
    params = DetDemoParams(fashion_mnist_root=fake_fmnist, **SMALL)
    sources = {False: FashionMNIST(fake_fmnist, train=False), True: FashionMNIST(fake_fmnist, train=True)}
    for split_index, (split, count, categories) in enumerate((('train', 6, {1, 2, 3, 4, 5}),
                                                              ('val', 4, {6, 7, 8, 9, 10}))):
        dataset = CocoDetection(root, split, train=True)
        assert len(dataset) == count and dataset.class_names[1:] == FASHION_MNIST_CLASSES
        assert {ann['category_id'] for ann in dataset.coco.anns.values()} <= categories
        for index in range(count):
            image, target = dataset[index]
            assert image.shape == (3, 48, 64) and target['image_id'] == index + 1
            source = sources[split == 'train']
            rng = np.random.default_rng([params.seed, split_index, index])
            _, instances = render_det_canvas(source.images, source.targets, params, rng)
            assert [dataset.label_to_cat_id[label] for label in target['labels'].tolist()] == [i[0] for i in instances]
            # the annotation is the hull of the glyph's bright pixels: it covers them and little else
            ink, glyphs = _pasted(source, params, np.random.default_rng([params.seed, split_index, index]))
            for mask, box, glyph in zip(target['masks'].numpy().astype(bool), target['boxes'], glyphs, strict=True):
                solid = glyph & (ink > params.threshold)
                assert not (solid & ~mask).any() and mask.sum() <= HULL_EXCESS * solid.sum()
                assert torch.equal(_mask_boxes(torch.from_numpy(mask[None].astype(np.uint8)))[0], box)


def _pasted(source: FashionMNIST, params: DetDemoParams, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    """The glyph intensities (H, W) and the bool masks (N, H, W) of the glyphs the demo pasted with `rng`."""
    count = int(rng.integers(params.glyphs[0], params.glyphs[1] + 1))
    ink, target = paste_glyphs(source.images, source.targets, params.size, count, params.scale, 0, rng)
    return ink, target['masks'].numpy().astype(bool)


def test_demo_is_written_once_and_checks_its_parameters(tmp_path, fake_fmnist, caplog):
    with caplog.at_level(logging.INFO, logger='flatten.data'):
        root = ensure_det_demo(str(tmp_path / 'det'), fashion_mnist_root=fake_fmnist, **SMALL)
        stamp = (Path(root) / DET_DEMO_MARKER).stat().st_mtime_ns
        ensure_det_demo(root, fashion_mnist_root=fake_fmnist, **dict(SMALL, size=[48, 64]))
    assert [r.getMessage() for r in caplog.records].count(caplog.records[0].getMessage()) == 1
    assert 'Detection demo data: wrote 6 train + 4 val canvases of 48x64' in caplog.records[0].getMessage()
    assert (Path(root) / DET_DEMO_MARKER).stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match=r'detection demo: glyphs must be a range \(lo, hi\), 1 <= lo <= hi'):
        ensure_det_demo(str(tmp_path / 'other'), glyphs=(3, 2))
    foreign = tmp_path / 'coco'
    write_coco(foreign, coco_content())
    with pytest.raises(DataError, match=f'{foreign} exists and holds no {DET_DEMO_MARKER}'):
        ensure_det_demo(str(foreign), fashion_mnist_root=fake_fmnist, **SMALL)


def _det_cfg(dataset: str, data_path: str, output: str, *opts):
    cfg = get_default_config()
    cfg.merge_from_list(['TASK', 'detection', 'DATA.DATASET', dataset, 'DATA.DATA_PATH', data_path, 'OUTPUT', output,
                         'DATA.BATCH_SIZE', 2, 'DATA.NUM_WORKERS', 0, 'DET.TRAIN_SCALES', [[80, 60]],
                         'DET.CROP_PROB', 0.5, 'DET.CROP_SCALES', [[64, 48]], 'DET.CROP_SIZE', [24, 40], *opts])
    return cfg


def test_detection_loaders_give_batches_of_lists(tmp_path, fake_fmnist):
    root = ensure_det_demo(str(tmp_path / 'det'), fashion_mnist_root=fake_fmnist, **SMALL)
    bundle = build_loaders(_det_cfg('coco', root, str(tmp_path / 'out'), 'DATA.VAL_SUBSET', 3))
    assert bundle.num_classes == 10 and bundle.class_names == ('background',) + FASHION_MNIST_CLASSES
    assert len(bundle.dataset_val) == 3
    assert bundle.val_gt.image_ids == tuple(bundle.dataset_val.dataset.ids[i] for i in bundle.dataset_val.indices)
    images, targets = next(iter(bundle.loader_val))
    assert isinstance(images, list) and len(images) == 1 and images[0].shape == (3, 48, 64)  # the original size
    assert targets == [{'image_id': targets[0]['image_id'], 'orig_size': (48, 64)}]
    assert len(bundle.loader_train) == 3  # 6 images, batches of 2
    bundle.dataset_train.set_epoch(0)
    bundle.loader_train.sampler.set_epoch(0)
    batches = list(bundle.loader_train)
    for images, targets in batches:
        assert isinstance(images, list) and isinstance(targets, list) and len(images) == len(targets) == 2
        for image, target in zip(images, targets, strict=True):
            assert max(image.shape[-2:]) <= 80 and min(image.shape[-2:]) <= 60
            assert target['masks'].shape[1:] == image.shape[-2:] and set(target['labels'].tolist()) <= set(range(1, 11))
    # a resumed epoch sees the same batches from where it stopped (per-sample seeds, EpochTaggedSampler)
    bundle.loader_train.sampler.set_epoch(0)
    bundle.loader_train.sampler.skip(2)
    resumed = list(bundle.loader_train)
    assert len(resumed) == 2
    for (a_images, a_targets), (b_images, b_targets) in zip(batches[1:], resumed, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(a_images, b_images, strict=True))
        assert all(torch.equal(a['boxes'], b['boxes']) for a, b in zip(a_targets, b_targets, strict=True))


def test_the_demo_dataset_is_written_under_the_output_folder(tmp_path, fake_fmnist, monkeypatch):
    import data.det_demo

    written = []

    def small_demo(root: str) -> str:  # the demo's defaults, shrunk, on the fake Fashion-MNIST
        written.append(root)
        return ensure_det_demo(root, fashion_mnist_root=fake_fmnist, **SMALL)

    monkeypatch.setattr(data.det_demo, 'ensure_det_demo', small_demo)
    bundle = build_detection_loaders(_det_cfg('fmnist_coco', '', str(tmp_path / 'out')), train=False)
    assert bundle.loader_train is None and len(bundle.dataset_val) == 4 and bundle.val_gt.image_ids == (1, 2, 3, 4)
    assert written == [str(tmp_path / 'out' / 'datasets' / 'fmnist_coco')] * 2  # rank 0, then after the barrier


def test_detection_data_names_what_is_missing(tmp_path):
    with pytest.raises(DatasetNotFoundError, match=r"DATA.DATASET='coco' needs --data-path"):
        build_detection_loaders(_det_cfg('coco', '', str(tmp_path)))
    with pytest.raises(DataError, match=r"DATA.DATASET='ade20k' is not a detection dataset"):
        build_detection_loaders(_det_cfg('ade20k', '', str(tmp_path)))
