"""COCO evaluation of a detector in the engine: box and mask AP from pycocotools' COCOeval over the
detections of every rank. docs/detection.md ("Evaluation") describes what is computed."""
from __future__ import annotations

import contextlib
import copy
import io
import json
import logging
import math
import os
import time
from typing import Callable, Dict, List, Mapping, Optional, Protocol, Sequence, Tuple

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO
from pycocotools.cocoeval import COCOeval
from timm.utils import AverageMeter

from .distributed import get_world_size, is_dist, is_main_process
from .engine import format_eta

__all__ = ['CocoGroundTruth', 'IOU_TYPES', 'STAT_NAMES', 'to_coco_results', 'gather_results', 'coco_evaluate',
           'evaluate_detection']

logger = logging.getLogger('flatten.engine')

IOU_TYPES = ('bbox', 'segm')
# COCOeval.stats, in its order: the six AP and six AR figures of its summary table
STAT_NAMES = ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl', 'AR1', 'AR10', 'AR100', 'ARs', 'ARm', 'ARl')


class CocoGroundTruth(Protocol):
    """What the evaluation needs of a COCO validation set: the annotations as a pycocotools `coco`,
    the map from the model's contiguous labels 1..K to COCO category ids, and the ids of the images
    evaluated (the whole set or a subset)."""
    coco: COCO
    label_to_cat_id: Mapping[int, int]
    image_ids: Sequence[int]


def to_coco_results(image_id: int, output: Mapping[str, torch.Tensor], label_to_cat_id: Mapping[int, int],
                    mask_threshold: float = 0.5) -> Tuple[List[dict], List[dict]]:
    """The detections of one image in COCO's results format: a box record ``{image_id, category_id,
    bbox: [x, y, w, h], score}`` and, when `output` has ``'masks'``, a mask record ``{image_id,
    category_id, segmentation: RLE, score}`` per detection, in the model's order.

    `output` is the detector's dict for the image: ``boxes`` (N, 4) x1, y1, x2, y2 in pixels,
    ``labels`` (N,) in 1..K, ``scores`` (N,) and optionally ``masks`` (N, 1, H, W) probabilities at
    the image's size, binarised at `mask_threshold`. Mask records carry no ``bbox``: COCO.loadRes
    would then take the box's area, not the mask's, for the small/medium/large split.
    """
    boxes = output['boxes'].detach().float().cpu()
    labels = output['labels'].detach().cpu().tolist()
    scores = output['scores'].detach().float().cpu().tolist()
    unknown = sorted({label for label in labels if label not in label_to_cat_id})
    if unknown:
        raise ValueError(f'image {image_id}: labels {unknown} have no COCO category (known labels: '
                         f'{sorted(label_to_cat_id)})')
    category_ids = [int(label_to_cat_id[label]) for label in labels]
    xywh = torch.cat([boxes[:, :2], boxes[:, 2:] - boxes[:, :2]], dim=1).tolist()
    box_records = [{'image_id': int(image_id), 'category_id': category_id, 'bbox': box, 'score': score}
                   for category_id, box, score in zip(category_ids, xywh, scores, strict=True)]
    if ('masks' not in output) or (len(labels) == 0):
        return box_records, []
    binary = (output['masks'][:, 0] > mask_threshold).cpu().numpy().astype(np.uint8)
    # pycocotools encodes (H, W, N) column-major arrays
    rles = mask_utils.encode(np.asfortranarray(binary.transpose(1, 2, 0)))
    mask_records = []
    for category_id, rle, score in zip(category_ids, rles, scores, strict=True):
        rle['counts'] = rle['counts'].decode('ascii')  # bytes in pycocotools; json writes str
        mask_records.append({'image_id': int(image_id), 'category_id': category_id, 'segmentation': rle,
                             'score': score})
    return box_records, mask_records


def _all_gather(obj: object) -> List[object]:
    """`obj` of every rank, in rank order; ``[obj]`` in a single process."""
    if not is_dist():
        return [obj]
    gathered: List[object] = [None] * get_world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def gather_results(records: List[dict]) -> List[dict]:
    """Every rank's `records` in one list, sorted by image id with each image's records in their own
    order (a stable sort), so that the list is the same for any world size and sharding: COCOeval
    breaks score ties by input order. Every rank gets the list; in a single process it is `records`
    sorted."""
    merged = [record for part in _all_gather(records) for record in part]
    return sorted(merged, key=lambda record: record['image_id'])


def _results_coco(coco: COCO, results: List[dict]) -> COCO:
    """`results` as the detections COCO object COCOeval reads. COCO.loadRes fails on an empty list, so
    no detections is a COCO of the same images and categories without annotations."""
    if results:
        return coco.loadRes([dict(record) for record in results])  # copies: loadRes adds id, area, iscrowd
    empty = COCO()
    empty.dataset = {'images': list(coco.dataset['images']), 'categories': copy.deepcopy(coco.dataset['categories']),
                     'annotations': []}
    empty.createIndex()
    return empty


def coco_evaluate(gt: CocoGroundTruth, results: List[dict], iou_type: str) -> Tuple[List[float], str]:
    """COCOeval's 12 statistics (fractions, in :data:`STAT_NAMES` order) of `results` (COCO results
    format) against ``gt.coco`` over the images ``gt.image_ids``, and its summary table as text.

    pycocotools' chatter goes nowhere: the caller logs the table. No detections at all scores as a
    detector that found nothing: 0 where the split has ground truth, and COCOeval's -1 (undefined)
    where it has none, e.g. APl on images without large objects, exactly as with detections.
    """
    if iou_type not in IOU_TYPES:
        raise ValueError(f'iou_type {iou_type!r} is not one of {IOU_TYPES}')
    unknown = sorted({record['image_id'] for record in results} - set(gt.coco.getImgIds()))
    if unknown:
        raise ValueError(f'{iou_type} results name images {unknown[:10]} that the ground truth does not have')
    chatter, table = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(chatter):
        evaluator = COCOeval(gt.coco, _results_coco(gt.coco, results), iou_type)
        evaluator.params.imgIds = sorted(set(int(image_id) for image_id in gt.image_ids))
        evaluator.evaluate()
        evaluator.accumulate()
    with contextlib.redirect_stdout(table):
        evaluator.summarize()
    return [float(s) for s in evaluator.stats], table.getvalue().rstrip('\n')


def _percent(stat: float) -> float:
    """A COCOeval fraction in percent; its -1 (nothing to score) becomes NaN, not -100."""
    return stat * 100.0 if stat >= 0 else math.nan


def _to_original_size(output: Dict[str, torch.Tensor], size: Tuple[int, int],
                      orig_size: Tuple[int, int]) -> Dict[str, torch.Tensor]:
    """`output` for an image given at `size` (h, w), mapped to the annotations' `orig_size` (H, W): a
    no-op when the loader gives original images, as the detector already maps back to its input."""
    if tuple(size) == tuple(orig_size):
        return output
    scale = torch.tensor([orig_size[1] / size[1], orig_size[0] / size[0]] * 2, device=output['boxes'].device)
    mapped = {**output, 'boxes': output['boxes'].float() * scale}
    if ('masks' in output) and (output['masks'].shape[0] > 0):
        mapped['masks'] = F.interpolate(output['masks'].float(), size=tuple(orig_size), mode='bilinear',
                                        align_corners=False)
    return mapped


def _write_json_atomically(path: str, records: List[dict]) -> None:
    os.makedirs(os.path.dirname(path) or '.', exist_ok=True)
    with open(path + '.tmp', 'w') as f:
        json.dump(records, f)
    os.replace(path + '.tmp', path)


def _on_main_process(compute: Callable[[], object]) -> object:
    """`compute()` run by rank 0 alone and broadcast to every rank. Its failure is broadcast too, so the
    other ranks raise at once instead of waiting for the collective timeout."""
    payload: object = None
    failure: Optional[Exception] = None
    if is_main_process():
        try:
            payload = ('ok', compute())
        except Exception as error:
            failure, payload = error, ('error', f'{type(error).__name__}: {error}')
    if is_dist():
        box = [payload]
        dist.broadcast_object_list(box, src=0)
        payload = box[0]
    if failure is not None:
        raise failure
    status, value = payload
    if status == 'error':
        raise RuntimeError(f'rank 0 failed in the COCO evaluation: {value}')
    return value


@torch.no_grad()
def evaluate_detection(model: nn.Module, loader, *, device: torch.device, gt: CocoGroundTruth,
                       autocast: Callable = contextlib.nullcontext, print_freq: int = 100, name: str = '',
                       iou_types: Sequence[str] = IOU_TYPES, results_dir: Optional[str] = None) -> Dict[str, object]:
    """COCO box and mask AP of `model` (a torchvision-style detector; in eval mode ``model(images)``
    gives one dict per image, see :func:`to_coco_results`) over `loader`'s images, each seen by one
    rank: batches ``(images: list of (3, H, W), targets: list of {'image_id', 'orig_size': (H, W)})``.

    Every rank's detections are gathered in an order independent of the world size and rank 0 runs
    COCOeval, whose statistics every rank then receives, so the figures equal a single process's.
    Returns ``{type}_AP, _AP50, _AP75, _APs, _APm, _APl`` in percent (NaN where COCOeval has nothing
    to score), ``{type}_stats`` (the 12 COCOeval fractions) and ``count`` (images, over all ranks).
    Logs COCOeval's tables and ``' * bbox AP x AP50 y segm AP z'`` (prefixed by `name`). A model
    without masks skips 'segm'. With `results_dir`, rank 0 writes ``detections_{type}.json`` there.
    """
    unknown = [iou_type for iou_type in iou_types if iou_type not in IOU_TYPES]
    if unknown:
        raise ValueError(f'iou_types {unknown} are not among {IOU_TYPES}')
    model.eval()
    records: Dict[str, List[dict]] = {'bbox': [], 'segm': []}
    image_ids: List[int] = []
    has_masks = False
    batch_time, end = AverageMeter(), time.time()
    for idx, (images, targets) in enumerate(loader):
        images = [image.to(device, non_blocking=True) for image in images]
        with autocast():
            outputs = model(images)
        for image, target, output in zip(images, targets, outputs, strict=True):
            image_id = int(target['image_id'])
            orig_size = tuple(int(s) for s in target['orig_size'])
            if 'segm' not in iou_types:  # nobody reads the masks: spare their resizing and encoding
                output = {key: value for key, value in output.items() if key != 'masks'}
            output = _to_original_size(output, tuple(image.shape[-2:]), orig_size)
            boxes, masks = to_coco_results(image_id, output, gt.label_to_cat_id)
            records['bbox'] += boxes
            records['segm'] += masks
            image_ids.append(image_id)
            has_masks = has_masks or ('masks' in output)
        batch_time.update(time.time() - end)
        end = time.time()
        if (idx % print_freq == 0) or (idx == len(loader) - 1):
            logger.info(f'Test{name}: [{idx}/{len(loader)}]\ttime {batch_time.val:.3f} ({batch_time.avg:.3f})\t'
                        f'eta {format_eta(batch_time.avg * (len(loader) - idx - 1))}')
    # a rank that had no image cannot tell whether the model gives masks: ask them all
    shards = _all_gather((image_ids, has_masks))
    seen = [image_id for ids, _ in shards for image_id in ids]
    _check_coverage(seen, gt.image_ids)
    types = [iou_type for iou_type in iou_types if (iou_type != 'segm') or any(masked for _, masked in shards)]
    if 'segm' in set(iou_types) - set(types):
        logger.info(f'Test{name}: the model gives no masks; segm is not evaluated')
    results = {iou_type: gather_results(records[iou_type]) for iou_type in types}
    if (results_dir is not None) and is_main_process():
        for iou_type in types:
            _write_json_atomically(os.path.join(results_dir, f'detections_{iou_type}.json'), results[iou_type])
    evaluations = _on_main_process(lambda: {t: coco_evaluate(gt, results[t], t) for t in types})
    metrics: Dict[str, object] = {}
    for iou_type in types:
        stats, table = evaluations[iou_type]
        logger.info(f'{iou_type}{name} ({len(results[iou_type])} detections on {len(seen)} images):\n{table}')
        for stat, value in zip(STAT_NAMES[:6], stats[:6], strict=True):
            metrics[f'{iou_type}_{stat}'] = _percent(value)
        metrics[f'{iou_type}_stats'] = stats
    summary = []
    for iou_type in types:
        summary.append(f'{iou_type} AP {metrics[f"{iou_type}_AP"]:.1f}')
        if iou_type == 'bbox':
            summary.append(f'AP50 {metrics["bbox_AP50"]:.1f}')
    logger.info(f'{" *" + name if name else " *"} {" ".join(summary)}')
    return {**metrics, 'count': len(seen)}


def _check_coverage(seen: List[int], expected: Sequence[int]) -> None:
    """An image evaluated twice (a sampler that pads its shards) would count its detections twice;
    one never evaluated counts every object in it as missed."""
    counts: Dict[int, int] = {}
    for image_id in seen:
        counts[image_id] = counts.get(image_id, 0) + 1
    repeated = sorted(image_id for image_id, n in counts.items() if n > 1)
    if repeated:
        raise ValueError(f'images {repeated[:10]} were evaluated more than once ({len(repeated)} in all): the '
                         f'validation sampler must not pad the ranks\' shards')
    missing = sorted(set(int(i) for i in expected) - set(counts))
    if missing:
        logger.warning(f'{len(missing)} of the {len(set(expected))} ground-truth images were not evaluated '
                       f'(e.g. {missing[:5]}): their objects count as missed')
