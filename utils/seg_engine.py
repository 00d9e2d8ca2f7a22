"""Semantic segmentation in the engine: the loss, inference (whole image, sliding window, multi-scale
and flip) and the mIoU evaluation. docs/segmentation.md gives the recipe these follow."""
from __future__ import annotations

import contextlib
import logging
import math
import time
from typing import Callable, Dict, List, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import AverageMeter

from data.ade20k import IGNORE_INDEX

from .distributed import all_reduce_sum
from .engine import format_eta
from .seg_metrics import confusion_matrix, segmentation_scores

__all__ = ['SegLoss', 'AllReduceBatchNorm2d', 'sync_batchnorm', 'predict', 'evaluate_segmentation']

logger = logging.getLogger('flatten.engine')


class SegLoss(nn.Module):
    """Pixel cross-entropy of the decoder's logits, plus `aux_weight` times that of the auxiliary head's,
    each upsampled (bilinear) to the label's size.

    The mean runs over every pixel of the batch, an ignored one counting 0, as mmseg 0.x computed it
    for the paper's baselines. Every rank then divides by the same count, so W ranks averaging their
    gradients equal one process with W times the batch (a mean over labelled pixels only would not).
    """

    def __init__(self, aux_weight: float = 0.0, ignore_index: int = IGNORE_INDEX):
        super().__init__()
        self.aux_weight, self.ignore_index = aux_weight, ignore_index

    def forward(self, outputs, target: torch.Tensor) -> torch.Tensor:
        outputs = outputs if isinstance(outputs, dict) else {'main': outputs}
        loss = 0.0
        for name, logits in outputs.items():
            logits = F.interpolate(logits, size=target.shape[-2:], mode='bilinear', align_corners=False)
            pixels = F.cross_entropy(logits, target, ignore_index=self.ignore_index, reduction='none')
            loss = loss + (1.0 if name == 'main' else self.aux_weight) * pixels.mean()
        return loss


class AllReduceBatchNorm2d(nn.BatchNorm2d):
    """BatchNorm2d with the statistics of the global batch in training: the per-channel sums are
    all-reduced over the ranks (differentiably), as torch's SyncBatchNorm does on GPUs only. With
    one process, or in evaluation, it is BatchNorm2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not (self.training and dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1):
            return super().forward(x)
        from torch.distributed.nn.functional import all_reduce  # the autograd-aware collective
        dtype, x = x.dtype, x.float()
        count = all_reduce(x.new_tensor([x.numel() / x.shape[1]]))
        mean = all_reduce(x.sum((0, 2, 3))) / count
        centred = x - mean[None, :, None, None]
        var = all_reduce((centred * centred).sum((0, 2, 3))) / count
        with torch.no_grad():
            self.num_batches_tracked.add_(1)
            self.running_mean.lerp_(mean, self.momentum)
            self.running_var.lerp_(var * count / (count - 1).clamp(min=1), self.momentum)
        y = centred * torch.rsqrt(var + self.eps)[None, :, None, None]
        if self.affine:
            y = y * self.weight[None, :, None, None] + self.bias[None, :, None, None]
        return y.to(dtype)


def sync_batchnorm(model: nn.Module, device: torch.device) -> nn.Module:
    """`model` with every BatchNorm synchronised over the ranks: torch's SyncBatchNorm on CUDA,
    :class:`AllReduceBatchNorm2d` elsewhere (gloo). Parameters, buffers and names are kept."""
    if device.type == 'cuda':
        return nn.SyncBatchNorm.convert_sync_batchnorm(model)
    for name, child in model.named_children():
        if type(child) is nn.BatchNorm2d:
            synced = AllReduceBatchNorm2d(child.num_features, child.eps, child.momentum, child.affine,
                                          child.track_running_stats)
            synced.load_state_dict(child.state_dict())
            setattr(model, name, synced)
        else:
            sync_batchnorm(child, device)
    return model


def _forward(model: nn.Module, image: torch.Tensor, autocast: Callable) -> torch.Tensor:
    """Class logits of `image` (1, 3, h, w) at its own size (the model predicts at a quarter)."""
    with autocast():
        logits = model(image)
    return F.interpolate(logits.float(), size=image.shape[-2:], mode='bilinear', align_corners=False)


def _slide(model: nn.Module, image: torch.Tensor, crop: Tuple[int, int], stride: Tuple[int, int],
           num_classes: int, autocast: Callable) -> torch.Tensor:
    """Logits of `image` from `crop` windows every `stride` pixels, the last flush with the border;
    each pixel averages the windows that cover it. A side smaller than the crop is one window."""
    _, _, h, w = image.shape
    scores = image.new_zeros(1, num_classes, h, w, dtype=torch.float32)
    counts = image.new_zeros(1, 1, h, w, dtype=torch.float32)
    rows = max(h - crop[0] + stride[0] - 1, 0) // stride[0] + 1
    cols = max(w - crop[1] + stride[1] - 1, 0) // stride[1] + 1
    for i in range(rows):
        for j in range(cols):
            y2, x2 = min(i * stride[0] + crop[0], h), min(j * stride[1] + crop[1], w)
            y1, x1 = max(y2 - crop[0], 0), max(x2 - crop[1], 0)
            scores[:, :, y1:y2, x1:x2] += _forward(model, image[:, :, y1:y2, x1:x2], autocast)
            counts[:, :, y1:y2, x1:x2] += 1
    return scores / counts


@torch.no_grad()
def predict(model: nn.Module, images: Sequence[torch.Tensor], size: Tuple[int, int], num_classes: int, *,
            mode: str = 'whole', crop: Tuple[int, int] = (512, 512), stride: Tuple[int, int] = (341, 341),
            flip: bool = False, autocast: Callable = contextlib.nullcontext) -> torch.Tensor:
    """Class probabilities (1, K, H, W) at the label's `size` (H, W): for each image of `images` (the
    same picture at each test scale, (1, 3, h, w)) and, with `flip`, its mirror image, the logits of
    a `mode` pass ('whole' or 'slide') are resized to `size` and soft-maxed; the passes are averaged."""
    probabilities = None
    for image in images:
        for flipped in ((False, True) if flip else (False,)):
            view = image.flip(-1) if flipped else image
            logits = _forward(model, view, autocast) if mode == 'whole' else \
                _slide(model, view, crop, stride, num_classes, autocast)
            logits = logits.flip(-1) if flipped else logits
            p = F.interpolate(logits, size=size, mode='bilinear', align_corners=False).softmax(1)
            probabilities = p if probabilities is None else probabilities + p
    return probabilities / (len(images) * (2 if flip else 1))


@torch.no_grad()
def evaluate_segmentation(model: nn.Module, loader: torch.utils.data.DataLoader, *, device: torch.device,
                          num_classes: int, autocast: Callable = contextlib.nullcontext, print_freq: int = 100,
                          name: str = '', memory_format: torch.memory_format = torch.contiguous_format,
                          mode: str = 'whole', crop: Tuple[int, int] = (512, 512),
                          stride: Tuple[int, int] = (341, 341), flip: bool = False,
                          class_names: Sequence[str] = ()) -> Dict[str, object]:
    """mIoU, mAcc and aAcc (percent) over every image of `loader`'s dataset, from one confusion matrix
    that the ranks all-reduce (exact for any batch and world size), the per-class IoU and Acc lists,
    the image count and the matrix itself (``'confusion_matrix'``, an int64 tensor). Logs the per-class
    table and ``' * mIoU x mAcc y aAcc z'`` (prefixed by `name`)."""
    model.eval()
    matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)
    count = torch.zeros(1, dtype=torch.int64, device=device)
    batch_time, end = AverageMeter(), time.time()
    for idx, (images, labels) in enumerate(loader):
        images = [image.to(device, non_blocking=True, memory_format=memory_format) for image in images]
        labels = labels.to(device, non_blocking=True)
        for b in range(labels.shape[0]):  # loaders of whole images hold one per batch: sizes differ
            probabilities = predict(model, [image[b:b + 1] for image in images], tuple(labels.shape[-2:]),
                                    num_classes, mode=mode, crop=crop, stride=stride, flip=flip, autocast=autocast)
            matrix += confusion_matrix(probabilities.argmax(1)[0], labels[b], num_classes, IGNORE_INDEX)
            count += 1
        batch_time.update(time.time() - end)
        end = time.time()
        if (idx % print_freq == 0) or (idx == len(loader) - 1):
            logger.info(f'Test{name}: [{idx}/{len(loader)}]\ttime {batch_time.val:.3f} ({batch_time.avg:.3f})\t'
                        f'eta {format_eta(batch_time.avg * (len(loader) - idx - 1))}')
    all_reduce_sum(matrix)
    all_reduce_sum(count)
    scores = segmentation_scores(matrix.cpu())
    _log_classes(scores, class_names or [str(c) for c in range(num_classes)], name)
    logger.info(f'{" *" + name if name else " *"} mIoU {scores["mIoU"]:.2f} mAcc {scores["mAcc"]:.2f} '
                f'aAcc {scores["aAcc"]:.2f}')
    return {**scores, 'count': int(count.item()), 'confusion_matrix': matrix.cpu()}


def _log_classes(scores: Dict[str, object], names: List[str], name: str) -> None:
    def cell(value: float) -> str:
        return '  n/a' if math.isnan(value) else f'{value:5.2f}'
    width = max(len(n) for n in names)
    lines = [f'per-class scores{name}:', f'{"class":>{width}}   IoU    Acc']
    lines += [f'{n:>{width}} {cell(iou)}  {cell(acc)}' for n, iou, acc in zip(names, scores['IoU'], scores['Acc'],
                                                                              strict=True)]
    logger.info('\n'.join(lines))
