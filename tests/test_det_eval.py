"""COCO evaluation of detectors (utils/det_eval.py) on hand-built ground truth, with a stand-in model that plays
back prepared detections: known APs, category ids, the order of results, two gloo ranks, and the results files."""
from __future__ import annotations

import contextlib
import io
import json
import logging
import math
import random
import warnings
from types import SimpleNamespace
from typing import Dict, List, Sequence, Tuple

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from pycocotools import mask as mask_utils
from pycocotools.coco import COCO

import utils.det_eval as det_eval
from utils.det_eval import coco_evaluate, evaluate_detection, gather_results, to_coco_results

CATEGORY_IDS = (1, 3, 7)  # not contiguous, as COCO's are: labels 1, 2, 3 stand for them
LABEL_TO_CAT_ID = {label: cat_id for label, cat_id in enumerate(CATEGORY_IDS, start=1)}
# image id: (height, width); the last is large enough for a COCO 'large' object (area > 96²)
SIZES = {1: (64, 64), 2: (64, 64), 3: (64, 64), 4: (64, 64), 5: (64, 64), 6: (128, 128)}
# (image id, category id, [x, y, w, h]): small (< 32²), medium and large objects, at most one of a category
# per image, so that even AR@1 of the ground truth itself is 1
OBJECTS = [(1, 1, [4, 6, 12, 10]), (1, 3, [20, 18, 40, 40]), (2, 7, [30, 2, 20, 24]), (3, 1, [10, 10, 36, 36]),
           (3, 7, [2, 40, 14, 14]), (4, 3, [5, 5, 8, 8]), (5, 1, [0, 0, 64, 64]), (6, 7, [10, 14, 100, 104]),
           (6, 1, [4, 4, 10, 6])]
PERFECT = pytest.approx(100.0, abs=1e-10)  # COCOeval's precision is tp / (tp + fp + eps): 1 - 2e-16 at best


def make_gt(objects: Sequence[Tuple[int, int, List[float]]] = OBJECTS,
            sizes: Dict[int, Tuple[int, int]] = SIZES, image_ids: Sequence[int] = ()) -> SimpleNamespace:
    """Ground truth as the detection data gives it: rectangles as boxes and as polygons."""
    annotations = []
    for ann_id, (image_id, cat_id, (x, y, w, h)) in enumerate(objects, start=1):
        polygon = [x, y, x, y + h, x + w, y + h, x + w, y]
        annotations.append({'id': ann_id, 'image_id': image_id, 'category_id': cat_id, 'bbox': [x, y, w, h],
                            'area': w * h, 'iscrowd': 0, 'segmentation': [polygon]})
    coco = COCO()
    coco.dataset = {'images': [{'id': i, 'height': h, 'width': w} for i, (h, w) in sizes.items()],
                    'categories': [{'id': c, 'name': f'class{c}'} for c in CATEGORY_IDS], 'annotations': annotations}
    with contextlib.redirect_stdout(io.StringIO()):
        coco.createIndex()
    return SimpleNamespace(coco=coco, label_to_cat_id=LABEL_TO_CAT_ID, image_ids=list(image_ids or sizes))


def detections(boxes: Sequence[Sequence[float]], cat_ids: Sequence[int], scores: Sequence[float],
               masks: torch.Tensor = None) -> Dict[str, torch.Tensor]:
    """A detector's output for one image from x, y, w, h boxes and COCO category ids."""
    cat_to_label = {c: label for label, c in LABEL_TO_CAT_ID.items()}
    xyxy = torch.tensor([[x, y, x + w, y + h] for x, y, w, h in boxes], dtype=torch.float32).view(-1, 4)
    output = {'boxes': xyxy, 'labels': torch.tensor([cat_to_label[c] for c in cat_ids], dtype=torch.int64),
              'scores': torch.tensor(scores, dtype=torch.float32)}
    if masks is not None:
        output['masks'] = masks
    return output


def perfect_outputs(gt: SimpleNamespace, with_masks: bool = True) -> Dict[int, Dict[str, torch.Tensor]]:
    """The ground truth itself as detections of score 1 (masks: the polygons rasterised by pycocotools)."""
    outputs = {}
    for image_id, (h, w) in SIZES.items():
        anns = gt.coco.loadAnns(gt.coco.getAnnIds(imgIds=[image_id]))
        with warnings.catch_warnings():  # pycocotools 2.0.11's decode warns under numpy 2
            warnings.simplefilter('ignore', DeprecationWarning)
            masks = [torch.from_numpy(gt.coco.annToMask(a)).float()[None] for a in anns]
        masks = torch.stack(masks) if masks else torch.zeros(0, 1, h, w)
        outputs[image_id] = detections([a['bbox'] for a in anns], [a['category_id'] for a in anns],
                                       [1.0] * len(anns), masks if with_masks else None)
    return outputs


def noisy_outputs(gt: SimpleNamespace) -> Dict[int, Dict[str, torch.Tensor]]:
    """Shifted boxes and masks, false positives and tied scores: an AP strictly between 0 and 1 whose value
    depends on the order COCOeval reads tied detections in."""
    rng = random.Random(0)
    outputs = {}
    for image_id, (h, w) in SIZES.items():
        boxes, cats, scores = [], [], []
        for a in gt.coco.loadAnns(gt.coco.getAnnIds(imgIds=[image_id])):
            x, y, bw, bh = a['bbox']
            for _ in range(2):  # two guesses per object with the same score: the first one listed wins
                boxes.append([x + rng.randint(-3, 3), y + rng.randint(-3, 3), bw, bh])
                cats.append(a['category_id'])
                scores.append(round(rng.uniform(0.3, 1.0), 1))
            boxes.append([rng.randint(0, w // 2), rng.randint(0, h // 2), 9, 9])  # a false positive
            cats.append(rng.choice(CATEGORY_IDS))
            scores.append(scores[-1])
        masks = torch.zeros(len(boxes), 1, h, w)
        for k, (x, y, bw, bh) in enumerate(boxes):
            masks[k, 0, max(y, 0):y + bh, max(x, 0):x + bw] = 0.9
        outputs[image_id] = detections(boxes, cats, scores, masks)
    return outputs


class Replay(nn.Module):
    """A detector stand-in: the outputs prepared for an image, whose pixels all hold its id."""

    def __init__(self, outputs: Dict[int, Dict[str, torch.Tensor]]):
        super().__init__()
        self.outputs = outputs

    def forward(self, images: List[torch.Tensor]) -> List[Dict[str, torch.Tensor]]:
        assert not self.training
        return [self.outputs[int(image[0, 0, 0])] for image in images]


def make_loader(image_ids: Sequence[int], sizes: Dict[int, Tuple[int, int]] = SIZES) -> list:
    """Batches of one image, as the validation loader gives them."""
    return [([torch.full((3, *sizes[i]), float(i))], [{'image_id': i, 'orig_size': sizes[i]}]) for i in image_ids]


def run(outputs, image_ids: Sequence[int] = tuple(SIZES), gt=None, **kwargs) -> dict:
    gt = make_gt() if gt is None else gt
    return evaluate_detection(Replay(outputs), make_loader(image_ids), device=torch.device('cpu'), gt=gt, **kwargs)


def test_ground_truth_as_detections_scores_100(caplog, capsys):
    gt = make_gt()
    with caplog.at_level(logging.INFO, logger='flatten.engine'):
        metrics = run(perfect_outputs(gt), gt=gt, name=' EMA', print_freq=4)
    for iou_type in ('bbox', 'segm'):
        assert metrics[f'{iou_type}_stats'] == pytest.approx([1.0] * 12, abs=1e-12)
        figures = [metrics[f'{iou_type}_{s}'] for s in ('AP', 'AP50', 'AP75', 'APs', 'APm', 'APl')]
        assert figures == [PERFECT] * 6
    assert metrics['count'] == 6
    log = caplog.text
    assert ' * EMA bbox AP 100.0 AP50 100.0 segm AP 100.0' in log
    assert all(f'Test EMA: [{idx}/6]' in log for idx in (0, 4, 5)) and ('Test EMA: [1/6]' not in log)
    assert 'eta 0:00:00' in log
    assert log.count('Average Precision  (AP) @[ IoU=0.50:0.95 | area=   all | maxDets=100 ] = 1.000') == 2
    assert capsys.readouterr().out == ''  # pycocotools' prints go to the log, not the console


def test_one_true_and_one_higher_scored_false_positive_has_the_hand_computed_ap(caplog):
    # Two objects of category 1, both small. Detections by score: a false positive (0.9, IoU 0 with the object of
    # image 2), then the object of image 1 exactly (0.8). Precision after each: 0, 1/2; recall: 0, 1/2. COCO makes
    # precision non-increasing from the right (1/2, 1/2) and reads it at the recall thresholds 0, 0.01, ..., 1:
    # recalls 0 .. 0.50 (51 points) find precision 1/2, the 50 above 1/2 find none. AP = 51 * 0.5 / 101 at every
    # IoU threshold; AR@100 = 1/2; no medium or large object, so COCOeval's -1 and NaN percent there.
    gt = make_gt([(1, 1, [5, 5, 20, 20]), (2, 1, [30, 30, 20, 20])], {1: (64, 64), 2: (64, 64)})
    outputs = {1: detections([[5, 5, 20, 20]], [1], [0.8]), 2: detections([[0, 0, 10, 10]], [1], [0.9])}
    with caplog.at_level(logging.INFO, logger='flatten.engine'):
        metrics = run(outputs, image_ids=[1, 2], gt=gt)
    ap = 51 * 0.5 / 101
    stats = metrics['bbox_stats']
    assert stats[:4] == pytest.approx([ap, ap, ap, ap]) and stats[4:6] == [-1.0, -1.0]
    assert stats[6:9] == pytest.approx([0.5, 0.5, 0.5]) and stats[9] == pytest.approx(0.5)
    assert metrics['bbox_AP'] == pytest.approx(100 * ap) and math.isnan(metrics['bbox_APm'])
    assert 'segm_AP' not in metrics  # no masks in the outputs: a Faster R-CNN
    assert 'the model gives no masks; segm is not evaluated' in caplog.text
    assert ' * bbox AP 25.2 AP50 25.2\n' in caplog.text + '\n'


def test_a_box_at_iou_063_counts_at_ap50_but_not_at_ap75():
    # IoU = 12.6 * 20 / (20 * 20) = 0.63: a match at the thresholds 0.50, 0.55, 0.60 only, so AP = 3 / 10
    gt = make_gt([(1, 3, [0, 0, 20, 20])], {1: (64, 64)})
    records, _ = to_coco_results(1, detections([[0, 0, 12.6, 20]], [3], [0.7]), LABEL_TO_CAT_ID)
    stats, table = coco_evaluate(gt, records, 'bbox')
    assert stats[:3] == pytest.approx([0.3, 1.0, 0.0])
    assert table.splitlines()[0].endswith('= 0.300') and len(table.splitlines()) == 12


def test_labels_map_back_to_non_contiguous_category_ids_and_masks_to_rle():
    masks = torch.zeros(3, 1, 8, 10)
    masks[0, 0, 1:4, 2:7] = 0.8
    masks[1, 0, :, :5] = 0.5  # not above the threshold
    masks[2, 0, 7, 9] = 1.0
    output = {'boxes': torch.tensor([[2.0, 1.0, 7.0, 4.0], [0.0, 0.0, 5.0, 8.0], [9.0, 7.0, 10.0, 8.0]]),
              'labels': torch.tensor([3, 1, 2]), 'scores': torch.tensor([0.9, 0.5, 0.25]), 'masks': masks}
    boxes, segms = to_coco_results(42, output, LABEL_TO_CAT_ID)
    assert [r['category_id'] for r in boxes] == [7, 1, 3] == [r['category_id'] for r in segms]
    assert boxes[0] == {'image_id': 42, 'category_id': 7, 'bbox': [2.0, 1.0, 5.0, 3.0], 'score': pytest.approx(0.9)}
    assert all(isinstance(r['segmentation']['counts'], str) and ('bbox' not in r) for r in segms)
    json.dumps(segms)
    with warnings.catch_warnings():
        warnings.simplefilter('ignore', DeprecationWarning)
        decoded = mask_utils.decode([{**r['segmentation'], 'counts': r['segmentation']['counts'].encode()}
                                     for r in segms])
    assert decoded.shape == (8, 10, 3)
    assert decoded.transpose(2, 0, 1).tolist() == (masks[:, 0] > 0.5).to(torch.uint8).tolist()
    message = r'image 42: labels \[0, 4\] have no COCO category \(known labels: \[1, 2, 3\]\)'
    with pytest.raises(ValueError, match=message):
        to_coco_results(42, {**output, 'labels': torch.tensor([0, 4, 1])}, LABEL_TO_CAT_ID)


def test_gathered_results_do_not_depend_on_how_images_were_sharded(monkeypatch):
    gt = make_gt()
    outputs = noisy_outputs(gt)
    per_image = {i: to_coco_results(i, outputs[i], LABEL_TO_CAT_ID) for i in SIZES}

    def shard(image_ids):
        return [r for i in image_ids for r in per_image[i][0]], [r for i in image_ids for r in per_image[i][1]]

    gathered = []
    for ranks in ([[1, 2, 3, 4, 5, 6]], [[1, 3, 5], [2, 4, 6]], [[6, 5, 4, 3], [2, 1]], [[4], [6, 1], [3, 5, 2]]):
        shards = [shard(ids) for ids in ranks]
        results = {}
        for k, iou_type in enumerate(('bbox', 'segm')):
            monkeypatch.setattr(det_eval, '_all_gather', lambda records, k=k, shards=shards: [s[k] for s in shards])
            results[iou_type] = gather_results(shards[0][k])
        gathered.append(results)
    assert all(g == gathered[0] for g in gathered)
    stats = [coco_evaluate(gt, g[t], t)[0] for g in gathered[:2] for t in ('bbox', 'segm')]
    assert stats[:2] == stats[2:]
    assert all(0.2 < s[0] < 0.9 for s in stats)
    # the order of an image's own records matters (ties): reversing them changes the figures
    reversed_bbox = [r for i in SIZES for r in reversed(per_image[i][0])]
    assert coco_evaluate(gt, reversed_bbox, 'bbox')[0] != stats[0]


def _two_rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    gt = make_gt()
    shards = [[2, 5, 6], [4, 1, 3]]  # a shuffled, uneven-by-content split
    metrics = run(noisy_outputs(gt), image_ids=shards[rank], gt=gt, results_dir=out_dir if rank == 0 else None)
    with open(f'{out_dir}/metrics{rank}.json', 'w') as f:
        json.dump(metrics, f)
    dist.destroy_process_group()


def test_two_gloo_ranks_give_the_figures_of_one_process(tmp_path):
    # fork: the workers inherit the imported modules instead of importing torch and timm again (seconds each)
    mp.start_processes(_two_rank_worker, args=(str(tmp_path / 'init'), str(tmp_path)), nprocs=2, start_method='fork')
    gt = make_gt()
    single = run(noisy_outputs(gt), gt=gt, results_dir=str(tmp_path / 'single'))
    single = json.loads(json.dumps(single))
    for rank in range(2):
        assert json.loads((tmp_path / f'metrics{rank}.json').read_text()) == single
    assert 0 < single['bbox_AP'] < 100 and 0 < single['segm_AP'] < 100 and single['count'] == 6
    for iou_type in ('bbox', 'segm'):
        name = f'detections_{iou_type}.json'
        assert (tmp_path / name).read_text() == (tmp_path / 'single' / name).read_text()


def _failing_rank_worker(rank: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    outputs = perfect_outputs(make_gt())
    # the ground truth lacks image 1, which the loader of rank 0 gives: rank 0's COCOeval refuses
    gt = make_gt([o for o in OBJECTS if o[0] != 1], {i: size for i, size in SIZES.items() if i != 1})
    try:
        run(outputs, image_ids=[[1, 2], [3]][rank], gt=gt, iou_types=('bbox',))
    except Exception as error:
        with open(f'{out_dir}/error{rank}.txt', 'w') as f:
            f.write(f'{type(error).__name__}: {error}')
    dist.destroy_process_group()


def test_a_failure_of_rank_0s_evaluation_reaches_the_other_ranks(tmp_path):
    mp.start_processes(_failing_rank_worker, args=(str(tmp_path / 'init'), str(tmp_path)), nprocs=2,
                       start_method='fork')
    message = 'ValueError: bbox results name images [1] that the ground truth does not have'
    assert (tmp_path / 'error0.txt').read_text() == message
    assert (tmp_path / 'error1.txt').read_text() == f'RuntimeError: rank 0 failed in the COCO evaluation: {message}'


def test_no_detections_score_0_and_results_files_load_back(tmp_path):
    gt = make_gt()
    empty = {i: detections([], [], [], torch.zeros(0, 1, *SIZES[i])) for i in SIZES}
    metrics = run(empty, gt=gt, results_dir=str(tmp_path / 'empty'))
    assert metrics['bbox_stats'] == [0.0] * 12 == metrics['segm_stats'] and metrics['segm_AP'] == 0.0
    assert json.loads((tmp_path / 'empty' / 'detections_segm.json').read_text()) == []

    metrics = run(perfect_outputs(gt), gt=gt, results_dir=str(tmp_path))
    for iou_type in ('bbox', 'segm'):
        path = str(tmp_path / f'detections_{iou_type}.json')
        with contextlib.redirect_stdout(io.StringIO()):
            loaded = gt.coco.loadRes(path)
        assert len(loaded.getAnnIds()) == len(OBJECTS)
        assert coco_evaluate(gt, json.load(open(path)), iou_type)[0] == metrics[f'{iou_type}_stats']
    assert sorted(p.name for p in tmp_path.iterdir()) == ['detections_bbox.json', 'detections_segm.json', 'empty']


def test_outputs_for_a_resized_image_map_to_the_original_size():
    gt = make_gt([(1, 1, [8, 16, 24, 32])], {1: (64, 64)})
    half = torch.zeros(1, 1, 32, 32)
    half[0, 0, 8:24, 4:16] = 1.0
    model = Replay({1: detections([[4, 8, 12, 16]], [1], [0.9], half)})
    loader = [([torch.full((3, 32, 32), 1.0)], [{'image_id': 1, 'orig_size': (64, 64)}])]
    metrics = evaluate_detection(model, loader, device=torch.device('cpu'), gt=gt)
    assert metrics['bbox_AP'] == PERFECT and metrics['segm_AP'] == PERFECT


def test_subset_of_images_and_error_paths(caplog):
    gt = make_gt(image_ids=[1, 2])  # evaluate two images of the six
    metrics = run(perfect_outputs(gt), image_ids=[1, 2], gt=gt)
    assert metrics['count'] == 2 and metrics['bbox_AP'] == PERFECT
    with caplog.at_level(logging.WARNING, logger='flatten.engine'):
        metrics = run(perfect_outputs(gt), image_ids=[1], gt=gt)
    assert '1 of the 2 ground-truth images were not evaluated (e.g. [2])' in caplog.text
    assert metrics['bbox_stats'][8] == pytest.approx(2 / 3)  # AR@100: categories 1 and 3 found, 7 (image 2) missed
    with pytest.raises(ValueError, match=r'images \[2\] were evaluated more than once'):
        run(perfect_outputs(gt), image_ids=[1, 2, 2], gt=gt)
    with pytest.raises(ValueError, match=r"iou_types \['keypoints'\] are not among \('bbox', 'segm'\)"):
        run(perfect_outputs(gt), gt=gt, iou_types=('bbox', 'keypoints'))
    with pytest.raises(ValueError, match=r'bbox results name images \[99\] that the ground truth does not have'):
        coco_evaluate(gt, [{'image_id': 99, 'category_id': 1, 'bbox': [0, 0, 1, 1], 'score': 1.0}], 'bbox')
