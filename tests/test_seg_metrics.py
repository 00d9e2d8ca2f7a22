"""utils/seg_metrics.py: mIoU, mAcc and aAcc from a confusion matrix, on hand-built cases and against
per-class pixel sets."""
from __future__ import annotations

import math

import pytest
import torch

from utils.seg_metrics import confusion_matrix, segmentation_scores

# 2×3 label and prediction maps; the last label pixel is ignored
TARGET = torch.tensor([[0, 0, 1], [1, 2, 255]])
PRED = torch.tensor([[0, 1, 1], [1, 1, 2]])


def test_hand_built_case():
    matrix = confusion_matrix(PRED, TARGET, 3)
    # pairs (gt, pred): (0,0) (0,1) (1,1) (1,1) (2,1); the ignored pixel's prediction does not count
    assert matrix.tolist() == [[1, 1, 0], [0, 2, 0], [0, 1, 0]]
    scores = segmentation_scores(matrix)
    # IoU: 1/(2+1-1), 2/(2+4-2), 0/(1+0-0); Acc: 1/2, 2/2, 0/1; aAcc: 3/5
    assert scores['IoU'] == [50.0, 50.0, 0.0] and scores['Acc'] == [50.0, 100.0, 0.0]
    assert scores['mIoU'] == pytest.approx(100 / 3) and scores['mAcc'] == 50.0 and scores['aAcc'] == 60.0


def test_absent_and_predicted_only_classes():
    # class 3 is in neither map: no IoU, no Acc, and the means are those of the 3 classes above
    absent = segmentation_scores(confusion_matrix(PRED, TARGET, 4))
    assert math.isnan(absent['IoU'][3]) and math.isnan(absent['Acc'][3])
    assert absent['mIoU'] == pytest.approx(100 / 3) and absent['mAcc'] == 50.0 and absent['aAcc'] == 60.0
    # class 3 predicted once where the label is 0: IoU 0 counts in the mean, Acc does not exist
    pred = PRED.clone()
    pred[0, 0] = 3
    predicted_only = segmentation_scores(confusion_matrix(pred, TARGET, 4))
    # class 0 loses its only hit: IoU0 = 0/(2+0-0) = 0
    assert predicted_only['IoU'] == [0.0, 50.0, 0.0, 0.0] and predicted_only['mIoU'] == 12.5
    assert math.isnan(predicted_only['Acc'][3]) and predicted_only['mAcc'] == pytest.approx(100 / 3)
    # every pixel ignored: nothing exists
    empty = segmentation_scores(confusion_matrix(PRED, torch.full_like(TARGET, 255), 3))
    assert all(math.isnan(empty[key]) for key in ('mIoU', 'mAcc', 'aAcc'))


def test_random_maps_against_pixel_sets():
    generator = torch.Generator().manual_seed(0)
    classes, ignore = 7, 255
    target = torch.randint(0, classes, (4, 33, 29), generator=generator)
    target[torch.rand(target.shape, generator=generator) < 0.1] = ignore
    target[target == 5] = ignore  # class 5 never in the ground truth
    pred = torch.randint(0, classes, target.shape, generator=generator)
    pred[pred == 6] = 0  # class 6 never predicted
    scores = segmentation_scores(confusion_matrix(pred, target, classes, ignore))
    valid = target != ignore
    for c in range(classes):
        is_gt, is_pred = (target == c) & valid, (pred == c) & valid
        union = (is_gt | is_pred).sum().item()
        if union:
            assert scores['IoU'][c] == pytest.approx(100 * (is_gt & is_pred).sum().item() / union)
        if is_gt.sum():
            assert scores['Acc'][c] == pytest.approx(100 * (is_gt & is_pred).sum().item() / is_gt.sum().item())
    assert math.isnan(scores['Acc'][5]) and not math.isnan(scores['IoU'][5])  # predicted, never labelled
    assert scores['aAcc'] == pytest.approx(100 * ((pred == target) & valid).sum().item() / valid.sum().item())


def test_matrices_add_over_batches_where_mean_ious_do_not():
    generator = torch.Generator().manual_seed(1)
    target = torch.randint(0, 3, (2, 8, 8), generator=generator)
    pred = torch.where(torch.rand(target.shape, generator=generator) < 0.7, target, (target + 1) % 3)
    pred[1, :, :4] = 2  # the second image is worse at class 2
    whole = confusion_matrix(pred, target, 3)
    parts = [confusion_matrix(pred[i], target[i], 3) for i in range(2)]
    assert torch.equal(whole, parts[0] + parts[1])
    per_image = sum(segmentation_scores(m)['mIoU'] for m in parts) / 2
    assert segmentation_scores(whole)['mIoU'] != pytest.approx(per_image)


@pytest.mark.parametrize('pred, target, message', [
    (torch.zeros(2, 3), torch.zeros(3, 2), r'prediction shape \(2, 3\) differs from the label shape \(3, 2\)'),
    (torch.zeros(3), torch.tensor([0, 3, 7]), r'label values \[3, 7\] are outside the 3 classes'),
    (torch.tensor([0, 4, 1]), torch.zeros(3), r'predicted classes must lie in \[0, 3\)'),
])
def test_bad_maps_are_named(pred, target, message):
    with pytest.raises(ValueError, match=message):
        confusion_matrix(pred.long(), target.long(), 3)
