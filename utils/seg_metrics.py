"""Semantic segmentation metrics from one confusion matrix: mIoU, mAcc and aAcc.

``C[t, p]`` counts the pixels of ground-truth class ``t`` predicted as ``p``; pixels carrying the
ignore label are not counted. Batches add their matrices and ranks all-reduce the sum once, so the
metrics are exact for any batch size, shard size and world size (a mean of per-batch IoUs is not).
With ``I_c = C[c, c]``, ``G_c = Σ_p C[c, p]`` (ground-truth pixels) and ``P_c = Σ_t C[t, c]``
(predicted pixels), as ADE20K's benchmark and mmseg define them:

    IoU_c = I_c / (G_c + P_c − I_c)        Acc_c = I_c / G_c        aAcc = Σ_c I_c / Σ_c G_c

A class absent from both ground truth and prediction has no IoU (0/0) and is left out of the mean;
a class predicted but absent from the ground truth has IoU 0 and counts. Acc_c exists only where
``G_c > 0``. mIoU and mAcc are the means over the classes where each exists.
"""
from __future__ import annotations

import math
from typing import Dict, List

import torch

__all__ = ['confusion_matrix', 'segmentation_scores']


def confusion_matrix(pred: torch.Tensor, target: torch.Tensor, num_classes: int,
                     ignore_index: int = 255) -> torch.Tensor:
    """The ``(num_classes, num_classes)`` int64 confusion matrix of class maps ``pred`` and ``target``
    (same shape, any batch layout), counting only pixels whose target is not `ignore_index`."""
    if pred.shape != target.shape:
        raise ValueError(f'prediction shape {tuple(pred.shape)} differs from the label shape {tuple(target.shape)}')
    valid = target != ignore_index
    t, p = target[valid].long(), pred[valid].long()
    if t.numel() and (t.min() < 0 or t.max() >= num_classes):
        bad = sorted(set(t[(t < 0) | (t >= num_classes)].unique().tolist()))[:5]
        raise ValueError(f'label values {bad} are outside the {num_classes} classes (ignore label {ignore_index})')
    if p.numel() and (p.min() < 0 or p.max() >= num_classes):
        raise ValueError(f'predicted classes must lie in [0, {num_classes}); got {p.min().item()}..{p.max().item()}')
    counts = torch.bincount(t * num_classes + p, minlength=num_classes * num_classes)
    return counts.reshape(num_classes, num_classes)


def _percent(numerator: torch.Tensor, denominator: torch.Tensor) -> List[float]:
    """100·n/d per class; NaN where d is 0 (the figure does not exist)."""
    return [100.0 * n / d if d else math.nan for n, d in zip(numerator.tolist(), denominator.tolist(), strict=True)]


def _mean(values: List[float]) -> float:
    present = [v for v in values if not math.isnan(v)]
    return sum(present) / len(present) if present else math.nan


def segmentation_scores(matrix: torch.Tensor) -> Dict[str, object]:
    """``{'mIoU', 'mAcc', 'aAcc'}`` in percent and the per-class ``'IoU'`` and ``'Acc'`` lists (NaN
    where a class's figure does not exist, see the module docstring) of a confusion matrix."""
    matrix = matrix.to(torch.float64)
    intersection = matrix.diagonal()
    ground_truth, predicted = matrix.sum(1), matrix.sum(0)
    iou = _percent(intersection, ground_truth + predicted - intersection)
    acc = _percent(intersection, ground_truth)
    total = ground_truth.sum().item()
    return {'mIoU': _mean(iou), 'mAcc': _mean(acc),
            'aAcc': 100.0 * intersection.sum().item() / total if total else math.nan, 'IoU': iou, 'Acc': acc}
