"""Detection backbones: any registered model as a torchvision FPN backbone (Mask R-CNN, Faster R-CNN).

    from models.detection import fpn_backbone, mask_rcnn
    backbone = fpn_backbone('flatten_swin_tiny_patch4_224')          # 4 levels + 'pool', 256 channels
    model = mask_rcnn('flatten_swin_tiny_patch4_224', num_classes=11)  # torchvision MaskRCNN

:class:`TimmFPNBackbone` is the counterpart of torchvision's ``BackboneWithFPN`` for timm models: its
body is ``timm.create_model(name, features_only=True, out_indices=...)`` (every variant of this
repository registers in timm on ``import models`` and runs at any input size), its neck torchvision's
``FeaturePyramidNetwork`` with ``LastLevelMaxPool`` (by default). Like ``BackboneWithFPN`` it has an
``out_channels`` attribute (the channels of every pyramid level, which torchvision's detectors read)
and returns an ``OrderedDict`` of NCHW maps keyed ``'0'``, ``'1'``, ... (highest resolution first, one
per entry of ``out_indices``) and ``'pool'`` (the extra max-pooled level): the keys torchvision's
default ``MultiScaleRoIAlign`` pools from.

Torchvision's detectors resize each image (``min_size=800``, ``max_size=1333`` by default) and pad the
batch to a multiple of 32, the stride of the last stage of the hierarchical backbones (Swin, PVT,
PVTv2, CSwin). DeiT gives four maps of the same stride 16; the FPN accepts them, but they are no
pyramid.

The detectors of the paper's Table 2 (``TASK: detection``, configs/coco; docs/detection.md, "The models"):

    model = build_model(load_config('configs/coco/cascade_mask_rcnn_flatten_swin_t_3x.yaml'))  # a Detector
    model.train(); losses = model(images, targets)     # images: list of (3, H, W) in [0, 1]
    model.eval(); detections = model(images)           # [{'boxes', 'labels' (1..K), 'scores', 'masks'}]

:func:`build_detector` puts the backbone ``models.build.resolve(cfg)`` names, every stage, under a
``TimmFPNBackbone`` (with per-stage LayerNorms for Swin and CSwin, as their mmdet detection backbones),
torchvision's RPN and either torchvision's Mask R-CNN ``RoIHeads`` or :class:`CascadeRoIHeads` (mmdet 2.x's
``CascadeRoIHead`` as the Swin detection recipe configures it). :class:`DetectionTransform` normalises and
pads; it resizes only in evaluation (mmdet's keep-ratio test resize), since the training pipeline resizes.
:meth:`Detector.flops_forward` is mmdet's ``forward_dummy``, the pass behind Table 2's FLOPs.
"""
from __future__ import annotations

import difflib
import itertools
from collections import OrderedDict
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple, Union

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import LayerNorm2d, to_2tuple
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection import _utils as det_utils
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.models.detection.faster_rcnn import FastRCNNConvFCHead, FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.generalized_rcnn import GeneralizedRCNN
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor
from torchvision.models.detection.roi_heads import RoIHeads, maskrcnn_loss
from torchvision.models.detection.rpn import RegionProposalNetwork, RPNHead
from torchvision.models.detection.transform import GeneralizedRCNNTransform, resize_boxes
from torchvision.ops import MultiScaleRoIAlign, generalized_box_iou_loss
from torchvision.ops import boxes as box_ops
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool

from .registry import UnknownModelError, list_models

__all__ = ['BackboneHooks', 'TimmFPNBackbone', 'fpn_backbone', 'mask_rcnn', 'faster_rcnn', 'DEFAULT_OUT_INDICES',
           'DETECTORS', 'DetectionTransform', 'BoxPredictor', 'CascadeRoIHeads', 'Detector', 'ForwardDummy',
           'build_detector']

DEFAULT_OUT_INDICES = (0, 1, 2, 3)  # the four stages of a hierarchical backbone (strides 4, 8, 16, 32)

OutIndices = Union[int, Sequence[int]]


def _check_name(name: str) -> None:
    """Raise :class:`UnknownModelError` unless timm knows `name` (after ``import models`` that includes
    every variant of this repository); the message lists close matches and this repository's variants."""
    if isinstance(name, str) and timm.is_model(name):
        return
    ours = list_models()
    close = difflib.get_close_matches(str(name), sorted(set(ours) | set(timm.list_models())), n=5, cutoff=0.6)
    hint = f' Close matches: {", ".join(close)}.' if close else ''
    raise UnknownModelError(f'unknown model {name!r} for a detection backbone.{hint} '
                            f'FLatten Transformer variants: {", ".join(ours)}')


def _check_out_indices(name: str, out_indices: OutIndices) -> None:
    """Raise ValueError unless `out_indices` is a positive int (the last n levels) or a non-empty
    sequence of distinct ints."""
    def is_int(value) -> bool:
        return isinstance(value, int) and not isinstance(value, bool)

    if is_int(out_indices) and out_indices > 0:
        return
    if isinstance(out_indices, Sequence) and not isinstance(out_indices, str) and len(out_indices) > 0 \
            and all(is_int(i) for i in out_indices) and len(set(out_indices)) == len(out_indices):
        return
    raise ValueError(f'out_indices={out_indices!r} for {name!r}: expected a non-empty sequence of distinct '
                     f'feature-level indices such as {DEFAULT_OUT_INDICES} (or an int n > 0: the last n levels)')


def create_feature_extractor(name: str, out_indices: OutIndices = DEFAULT_OUT_INDICES, **model_kwargs) -> nn.Module:
    """``timm.create_model(name, features_only=True, out_indices=out_indices, **model_kwargs)`` with errors
    that name the model and the indices: :class:`UnknownModelError` for an unknown name, ValueError for
    indices out of range or not increasing (the FPN needs its inputs from high to low resolution)."""
    _check_name(name)
    _check_out_indices(name, out_indices)
    indices = list(out_indices) if not isinstance(out_indices, int) else out_indices
    try:
        body = timm.create_model(name, features_only=True, out_indices=indices, **model_kwargs)
    except (AssertionError, IndexError) as err:  # timm's feature_take_indices asserts the range
        raise ValueError(f'out_indices={out_indices!r} do not fit {name!r}: {err}') from err
    resolved = getattr(body, 'out_indices', None)
    resolved = list(resolved) if isinstance(resolved, Sequence) else None
    if resolved is not None and any(b <= a for a, b in itertools.pairwise(resolved)):
        raise ValueError(f'out_indices={out_indices!r} for {name!r} resolve to levels {resolved}: they must '
                         f'increase (from high to low resolution, as the feature pyramid needs them)')
    return body


class TimmFPNBackbone(nn.Module):
    """A timm ``features_only`` model (``body``) with torchvision's ``FeaturePyramidNetwork`` (``fpn``) on top.

    ``forward(images)`` returns ``OrderedDict('0': P_first, ..., 'pool': extra level)``, every map with
    :attr:`out_channels` channels, the key order and names of torchvision's ``BackboneWithFPN``.

    Args:
        body: a feature extractor whose forward returns a list of NCHW maps, highest resolution first,
            with ``feature_info.channels()`` and ``feature_info.reduction()`` (timm's ``features_only``).
        out_channels: channels of every pyramid level.
        extra_blocks: torchvision's extra FPN block; default ``LastLevelMaxPool()`` (the ``'pool'`` level).
        norm_layer: normalisation of the FPN convolutions (torchvision's argument; default none).
        feature_norms: put a LayerNorm over the channels (eps 1e-5) on every body output before the FPN
            (``norms``), as the Swin and CSwin detection backbones of mmdet do (``norm0`` ... ``norm3``).

    Attributes:
        out_channels: the channels of each level, as torchvision's detectors require.
        featmap_names: the keys of the backbone levels (``'pool'`` not included), for ``MultiScaleRoIAlign``.
        strides: the stride of every returned level, ``'pool'`` included (when the extra block is
            ``LastLevelMaxPool``: twice the last stride).
    """

    def __init__(self, body: nn.Module, out_channels: int = 256, extra_blocks: Optional[ExtraFPNBlock] = None,
                 norm_layer: Optional[Callable[..., nn.Module]] = None, feature_norms: bool = False) -> None:
        super().__init__()
        if out_channels <= 0:
            raise ValueError(f'out_channels must be positive, got {out_channels}')
        if extra_blocks is None:
            extra_blocks = LastLevelMaxPool()
        self.body = body
        self.in_channels_list: List[int] = list(body.feature_info.channels())
        self.featmap_names: List[str] = [str(i) for i in range(len(self.in_channels_list))]
        # mmdet's Swin/CSwin backbones: nn.LayerNorm (eps 1e-5) on each output; timm's LayerNorm2d defaults to 1e-6
        self.norms = (nn.ModuleList(LayerNorm2d(channels, eps=1e-5) for channels in self.in_channels_list)
                      if feature_norms else None)
        self.fpn = FeaturePyramidNetwork(in_channels_list=self.in_channels_list, out_channels=out_channels,
                                         extra_blocks=extra_blocks, norm_layer=norm_layer)
        self.out_channels = out_channels
        strides = list(body.feature_info.reduction())
        if isinstance(extra_blocks, LastLevelMaxPool):
            strides.append(2 * strides[-1])
        self.strides: List[int] = strides

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        features = self.body(x)
        if len(features) != len(self.featmap_names):
            raise RuntimeError(f'the body returned {len(features)} maps, expected {len(self.featmap_names)}')
        if self.norms is not None:
            features = [norm(level) for norm, level in zip(self.norms, features, strict=True)]
        return self.fpn(OrderedDict(zip(self.featmap_names, features, strict=True)))


def fpn_backbone(name: str, out_indices: OutIndices = DEFAULT_OUT_INDICES, out_channels: int = 256,
                 extra_blocks: Optional[ExtraFPNBlock] = None, norm_layer: Optional[Callable[..., nn.Module]] = None,
                 **model_kwargs) -> TimmFPNBackbone:
    """The FPN backbone of the registered model `name`: its ``features_only`` levels `out_indices`
    (``(0, 1, 2, 3)``: the four stages) under a ``FeaturePyramidNetwork`` with `out_channels` channels.
    `model_kwargs` go to the model's constructor (``drop_path_rate=0.2``, ``embed_dim=...``, ...).

    Raises :class:`~models.registry.UnknownModelError` (a KeyError) naming an unknown model and close
    matches, and ValueError naming out_indices that are malformed, out of range or not increasing."""
    body = create_feature_extractor(name, out_indices, **model_kwargs)
    return TimmFPNBackbone(body, out_channels=out_channels, extra_blocks=extra_blocks, norm_layer=norm_layer)


def _level_defaults(backbone: TimmFPNBackbone, kwargs: dict) -> dict:
    """`kwargs` with an anchor generator and a box RoI pooler that match the backbone's levels where the
    caller passed none. Torchvision's defaults (one anchor size per level, 32 to 512, ratios 0.5/1/2;
    RoIAlign over '0'..'3') fit four levels plus 'pool'; for another number of levels the same rule
    (anchor 32·2^i on level i) is applied and the pooler reads the backbone's own level names. With
    an extra block other than ``LastLevelMaxPool`` the caller passes ``rpn_anchor_generator``."""
    names = backbone.featmap_names
    max_pool = isinstance(backbone.fpn.extra_blocks, LastLevelMaxPool)
    if names == ['0', '1', '2', '3'] and max_pool:
        return kwargs
    kwargs = dict(kwargs)
    if 'rpn_anchor_generator' not in kwargs:
        if not max_pool:
            raise ValueError('a backbone with a custom FPN extra block needs an explicit rpn_anchor_generator '
                             '(one anchor size tuple per returned level)')
        levels = len(names) + 1
        kwargs['rpn_anchor_generator'] = AnchorGenerator(sizes=tuple((32 * 2 ** i,) for i in range(levels)),
                                                         aspect_ratios=((0.5, 1.0, 2.0),) * levels)
    kwargs.setdefault('box_roi_pool', MultiScaleRoIAlign(featmap_names=names, output_size=7, sampling_ratio=2))
    return kwargs


def faster_rcnn(name: str, num_classes: Optional[int], out_indices: OutIndices = DEFAULT_OUT_INDICES,
                out_channels: int = 256, model_kwargs: Optional[dict] = None, **detector_kwargs) -> FasterRCNN:
    """Torchvision's ``FasterRCNN`` (`num_classes` with the background) on ``fpn_backbone(name, ...)``;
    `model_kwargs` go to the backbone model, `detector_kwargs` to ``FasterRCNN`` (``min_size``,
    ``box_head``, ...; with a ``box_predictor``, `num_classes` is None as torchvision requires)."""
    backbone = fpn_backbone(name, out_indices, out_channels, **(model_kwargs or {}))
    return FasterRCNN(backbone, num_classes=num_classes, **_level_defaults(backbone, detector_kwargs))


def mask_rcnn(name: str, num_classes: Optional[int], out_indices: OutIndices = DEFAULT_OUT_INDICES,
              out_channels: int = 256, model_kwargs: Optional[dict] = None, **detector_kwargs) -> MaskRCNN:
    """Torchvision's ``MaskRCNN`` (`num_classes` with the background) on ``fpn_backbone(name, ...)``;
    `model_kwargs` go to the backbone model, `detector_kwargs` to ``MaskRCNN`` (``min_size``,
    ``max_size``, ``box_detections_per_img``, lighter heads, ...; with ``box_predictor`` and
    ``mask_predictor``, `num_classes` is None as torchvision requires). The default image size is
    torchvision's (800 short side, at most 1333)."""
    backbone = fpn_backbone(name, out_indices, out_channels, **(model_kwargs or {}))
    kwargs = _level_defaults(backbone, detector_kwargs)
    if backbone.featmap_names != ['0', '1', '2', '3']:
        kwargs.setdefault('mask_roi_pool', MultiScaleRoIAlign(featmap_names=backbone.featmap_names, output_size=14,
                                                              sampling_ratio=2))
    return MaskRCNN(backbone, num_classes=num_classes, **kwargs)


# --------------------------------------------------------------------------------------------------
# Table 2: Mask R-CNN and Cascade Mask R-CNN from a config (TASK: detection)
# --------------------------------------------------------------------------------------------------

DETECTORS = ('mask_rcnn', 'cascade_mask_rcnn')
# backbone families whose mmdet/mmseg dense backbones put a LayerNorm on every output that the classifier has
# not (Swin's and CSwin's norm0..norm3); PVT's detection backbone norms no output, PVTv2 norms every stage
# inside the classifier already
FEATURE_NORM_FAMILIES = ('swin', 'cswin')
# mmdet's DeltaXYWHBBoxCoder target_stds of the three stages of the Swin cascade recipe; torchvision's BoxCoder
# weights are their inverses ((10, 10, 5, 5), (20, 20, 10, 10), (30.3, 30.3, 14.9, 14.9))
CASCADE_TARGET_STDS = ((0.1, 0.1, 0.2, 0.2), (0.05, 0.05, 0.1, 0.1), (0.033, 0.033, 0.067, 0.067))
# the recipe's GIoULoss(loss_weight=10.0) on decoded boxes
GIOU_LOSS_WEIGHT = 10.0
# the recipe (cascade_mask_rcnn_swin_*_giou_4conv1f): reg_class_agnostic=False, one box per object class
CASCADE_CLASS_AGNOSTIC = False
# mmdet's forward_dummy (the pass of tools/get_flops.py): 1000 random RoIs through the box head(s), the
# first 100 through the mask head(s)
DUMMY_ROIS, DUMMY_MASK_ROIS = 1000, 100


class DetectionTransform(GeneralizedRCNNTransform):
    """Torchvision's detection transform with the data pipeline doing the training resize.

    Every image (3, H, W) in [0, 1] is normalised with the ImageNet mean and std and the batch padded
    (bottom, right) to a multiple of `size_divisible`. In training mode images and targets pass at
    their size: the training pipeline already resized, flipped and cropped them. In eval mode each
    image is resized keeping its ratio to the largest size with long side ≤ ``test_scale[0]`` and
    short side ≤ ``test_scale[1]`` (mmdet's keep-ratio ``Resize`` to (1333, 800): it also enlarges,
    and rounds each side to the nearest pixel), bilinearly; ``postprocess`` (torchvision's) maps the
    boxes back to the input size and pastes the masks there.
    """

    def __init__(self, test_scale: Sequence[int] = (1333, 800), size_divisible: int = 32,
                 image_mean: Sequence[float] = IMAGENET_DEFAULT_MEAN,
                 image_std: Sequence[float] = IMAGENET_DEFAULT_STD) -> None:
        long_side, short_side = test_scale
        if min(long_side, short_side) <= 0:
            raise ValueError(f'test_scale={tuple(test_scale)}: both limits (long side, short side) must be positive')
        super().__init__(min_size=short_side, max_size=long_side, image_mean=list(image_mean),
                         image_std=list(image_std), size_divisible=size_divisible)
        self.test_scale = (long_side, short_side)

    def test_size(self, height: int, width: int) -> Tuple[int, int]:
        """(height, width) of an image of that size at evaluation (mmcv's ``rescale_size``)."""
        long_side, short_side = self.test_scale
        scale = min(long_side / max(height, width), short_side / min(height, width))
        return int(height * scale + 0.5), int(width * scale + 0.5)

    def resize(self, image: torch.Tensor, target: Optional[Dict[str, torch.Tensor]] = None
               ) -> Tuple[torch.Tensor, Optional[Dict[str, torch.Tensor]]]:
        if self.training:
            return image, target
        height, width = image.shape[-2:]
        size = self.test_size(height, width)
        if size == (height, width):
            return image, target
        image = F.interpolate(image[None], size=size, mode='bilinear', align_corners=False)[0]
        if target is not None:  # an evaluation with targets: keep them on the resized image
            target = dict(target)
            target['boxes'] = resize_boxes(target['boxes'], [height, width], list(size))
            if 'masks' in target:
                target['masks'] = F.interpolate(target['masks'][:, None].float(), size=size)[:, 0].byte()
        return image, target

    def __repr__(self) -> str:
        return (f'{type(self).__name__}(mean={self.image_mean}, std={self.image_std}, '
                f'eval resize to (long, short) <= {self.test_scale}, pad to /{self.size_divisible})')


class BoxPredictor(nn.Module):
    """The classifier and box regressor of a cascade stage, as mmdet's ``BBoxHead``.

    ``cls_score``: in_features -> K + 1 logits, background first (torchvision's label order, 1..K the
    object classes). ``bbox_pred``: in_features -> 4 deltas (``class_agnostic``) or 4K, one box per
    object class and none for the background (mmdet's ``reg_class_agnostic=False``). Initialised as
    mmdet's: weights N(0, 0.01²) and N(0, 0.001²), biases zero.

    x: (N, in_features) -> (logits (N, K + 1), deltas (N, 4) or (N, 4K)).
    """

    def __init__(self, in_features: int, num_classes: int, class_agnostic: bool = False) -> None:
        super().__init__()
        self.num_classes = num_classes
        self.class_agnostic = class_agnostic
        self.cls_score = nn.Linear(in_features, num_classes + 1)
        self.bbox_pred = nn.Linear(in_features, 4 if class_agnostic else 4 * num_classes)
        for layer, std in ((self.cls_score, 0.01), (self.bbox_pred, 0.001)):
            nn.init.normal_(layer.weight, std=std)
            nn.init.zeros_(layer.bias)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.cls_score(x), self.bbox_pred(x)

    def select(self, deltas: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The (N, 4) deltas of class ``labels`` (1..K) of every row; the only ones when class-agnostic."""
        if self.class_agnostic:
            return deltas
        return deltas.view(deltas.shape[0], self.num_classes, 4)[torch.arange(deltas.shape[0]), labels - 1]


def box_head_4conv1fc(channels: int, roi_size: int, fc_dim: int) -> FastRCNNConvFCHead:
    """mmdet's ``ConvFCBBoxHead`` with ``num_shared_convs=4, num_shared_fcs=1`` and BN (the "4conv1f" of the
    Swin cascade recipe): 4 × (3×3 conv without bias, BatchNorm, ReLU), flatten, fc + ReLU; torchvision's
    ``FastRCNNConvFCHead``, its fc Xavier-uniform as mmdet's. x: (N, C, 7, 7) -> (N, fc_dim)."""
    head = FastRCNNConvFCHead((channels, roi_size, roi_size), [channels] * 4, [fc_dim], norm_layer=nn.BatchNorm2d)
    for layer in head.modules():
        if isinstance(layer, nn.Linear):
            nn.init.xavier_uniform_(layer.weight)
            nn.init.zeros_(layer.bias)
    return head


class _Samples(NamedTuple):
    """The RoIs one cascade stage trains on, per image."""
    proposals: List[torch.Tensor]  # (n, 4) sampled RoIs
    labels: List[torch.Tensor]  # (n,) 0 = background, 1..K
    matched_idxs: List[torch.Tensor]  # (n,) index of the matched ground-truth box (0 for background)
    gt_boxes: List[torch.Tensor]  # (n, 4) the matched ground-truth box (meaningless for background)
    is_gt: List[torch.Tensor]  # (n,) the RoI is a ground-truth box added as a proposal


class CascadeRoIHeads(nn.Module):
    """Cascade R-CNN's RoI heads with a mask head per stage (Cai & Vasconcelos 2018/2019), as mmdet 2.x's
    ``CascadeRoIHead`` in the Swin detection recipe (``cascade_mask_rcnn_swin_*_giou_4conv1f``).

    Stage i has its own box head, :class:`BoxPredictor`, ``BoxCoder`` (``box_coder_weights[i]``), mask head and
    mask predictor; the RoI poolers are shared (they have no parameters). Same interface as torchvision's
    ``RoIHeads``: ``forward(features, proposals, image_shapes, targets)`` -> (detections, losses).

    Training, per stage i: the ground-truth boxes join the proposals; a proposal whose best IoU with a
    ground-truth box is ≥ ``stage_ious[i]`` is a positive of that box's class, any other a negative;
    ``batch_size_per_image`` of them are sampled (at most ``positive_fraction`` positives). Losses, each
    × ``stage_weights[i]``: cross-entropy over the K + 1 classes; GIoU loss (× ``giou_weight``) between the
    positives' decoded boxes and their ground truth, summed and divided by the number of sampled RoIs (mmdet's
    ``avg_factor``); torchvision's ``maskrcnn_loss`` of mask head i on stage i's positives. The sampled
    RoIs, regressed by stage i (positives with their ground-truth class, negatives with their best
    object class), clipped and without the added ground-truth boxes, are stage i + 1's proposals
    (no gradient flows through them).

    Evaluation: the proposals go through every stage, each refining the boxes of the previous one with
    its best object class; the stages' logits are averaged and soft-maxed (mmdet averages the logits,
    the paper the probabilities), the boxes are the last stage's regression of its RoIs, per class; then
    score threshold, per-class NMS and the top ``detections_per_img`` as torchvision's ``RoIHeads``.
    Masks: the mean of the stages' sigmoid masks on the final boxes, the channel of the detected class,
    (N, 1, 28, 28) per image, for ``GeneralizedRCNN``'s postprocess to paste.

    Losses: ``loss_classifier_stage{i}``, ``loss_box_reg_stage{i}``, ``loss_mask_stage{i}`` (weighted).
    """

    def __init__(self, box_roi_pool: MultiScaleRoIAlign, box_heads: Sequence[nn.Module],
                 box_predictors: Sequence[BoxPredictor], mask_roi_pool: MultiScaleRoIAlign,
                 mask_heads: Sequence[nn.Module], mask_predictors: Sequence[nn.Module], stage_ious: Sequence[float],
                 stage_weights: Sequence[float], box_coder_weights: Sequence[Sequence[float]],
                 batch_size_per_image: int = 512, positive_fraction: float = 0.25, score_thresh: float = 0.05,
                 nms_thresh: float = 0.5, detections_per_img: int = 100,
                 giou_weight: float = GIOU_LOSS_WEIGHT) -> None:
        super().__init__()
        lengths = {len(box_heads), len(box_predictors), len(mask_heads), len(mask_predictors), len(stage_ious),
                   len(stage_weights), len(box_coder_weights)}
        if len(lengths) != 1 or 0 in lengths:
            raise ValueError(f'every stage needs a box head, box predictor, mask head, mask predictor, IoU '
                             f'threshold, loss weight and box coder: got {len(box_heads)}, {len(box_predictors)}, '
                             f'{len(mask_heads)}, {len(mask_predictors)}, {len(stage_ious)}, {len(stage_weights)}, '
                             f'{len(box_coder_weights)}')
        self.num_stages = len(stage_ious)
        self.box_roi_pool = box_roi_pool
        self.box_heads = nn.ModuleList(box_heads)
        self.box_predictors = nn.ModuleList(box_predictors)
        self.mask_roi_pool = mask_roi_pool
        self.mask_heads = nn.ModuleList(mask_heads)
        self.mask_predictors = nn.ModuleList(mask_predictors)
        self.stage_ious = [float(iou) for iou in stage_ious]
        self.stage_weights = [float(weight) for weight in stage_weights]
        # one threshold: below it a negative, at or above a positive (mmdet's pos_iou_thr = neg_iou_thr)
        self.proposal_matchers = [det_utils.Matcher(iou, iou, allow_low_quality_matches=False) for iou in stage_ious]
        self.fg_bg_sampler = det_utils.BalancedPositiveNegativeSampler(batch_size_per_image, positive_fraction)
        self.box_coders = [det_utils.BoxCoder(tuple(float(w) for w in weights)) for weights in box_coder_weights]
        self.score_thresh = score_thresh
        self.nms_thresh = nms_thresh
        self.detections_per_img = detections_per_img
        self.giou_weight = giou_weight

    def forward(self, features: Dict[str, torch.Tensor], proposals: List[torch.Tensor],
                image_shapes: List[Tuple[int, int]], targets: Optional[List[Dict[str, torch.Tensor]]] = None
                ) -> Tuple[List[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]:
        if self.training:
            if targets is None:
                raise ValueError('CascadeRoIHeads needs targets (boxes, labels, masks) in training mode')
            for target in targets:
                for key in ('boxes', 'labels', 'masks'):
                    if key not in target:
                        raise ValueError(f'a training target has no {key!r} (keys: {sorted(target)})')
            return [], self._train(features, proposals, image_shapes, targets)
        return self._detect(features, proposals, image_shapes), {}

    def _box_forward(self, stage: int, features: Dict[str, torch.Tensor], boxes: List[torch.Tensor],
                     image_shapes: List[Tuple[int, int]]) -> Tuple[torch.Tensor, torch.Tensor]:
        pooled = self.box_roi_pool(features, boxes, image_shapes)
        class_logits, deltas = self.box_predictors[stage](self.box_heads[stage](pooled))
        # boxes are decoded from these: in float32 under autocast (pixel coordinates need more than fp16)
        return class_logits.float(), deltas.float()

    def _mask_forward(self, stage: int, features: Dict[str, torch.Tensor], boxes: List[torch.Tensor],
                      image_shapes: List[Tuple[int, int]]) -> torch.Tensor:
        pooled = self.mask_roi_pool(features, boxes, image_shapes)
        return self.mask_predictors[stage](self.mask_heads[stage](pooled))

    def _sample(self, stage: int, proposals: List[torch.Tensor], targets: List[Dict[str, torch.Tensor]]) -> _Samples:
        """Stage `stage`'s training RoIs: the proposals plus the ground-truth boxes, matched at the stage's
        IoU threshold and subsampled."""
        matcher = self.proposal_matchers[stage]
        candidates, labels, matched_idxs, gt_boxes, is_gt = [], [], [], [], []
        for boxes, target in zip(proposals, targets, strict=True):
            gt = target['boxes'].to(boxes.dtype)
            rois = torch.cat([boxes, gt])
            if gt.numel() == 0:  # an image without objects: every RoI is background
                matched = torch.zeros(len(rois), dtype=torch.int64, device=rois.device)
                roi_labels = torch.zeros_like(matched)
                gt = rois.new_zeros((1, 4))
            else:
                matches = matcher(box_ops.box_iou(gt, rois))
                matched = matches.clamp(min=0)
                roi_labels = target['labels'][matched].to(torch.int64)
                roi_labels[matches == matcher.BELOW_LOW_THRESHOLD] = 0
                roi_labels[matches == matcher.BETWEEN_THRESHOLDS] = -1  # none: one threshold
            candidates.append(rois)
            labels.append(roi_labels)
            matched_idxs.append(matched)
            gt_boxes.append(gt)
            is_gt.append(torch.arange(len(rois), device=rois.device) >= len(boxes))
        positive, negative = self.fg_bg_sampler(labels)
        keep = [torch.where(pos | neg)[0] for pos, neg in zip(positive, negative, strict=True)]
        return _Samples(proposals=[rois[k] for rois, k in zip(candidates, keep, strict=True)],
                        labels=[lab[k] for lab, k in zip(labels, keep, strict=True)],
                        matched_idxs=[m[k] for m, k in zip(matched_idxs, keep, strict=True)],
                        gt_boxes=[gt[m[k]] for gt, m, k in zip(gt_boxes, matched_idxs, keep, strict=True)],
                        is_gt=[g[k] for g, k in zip(is_gt, keep, strict=True)])

    def _refine(self, stage: int, deltas: torch.Tensor, rois: torch.Tensor, labels: torch.Tensor,
                counts: List[int], image_shapes: List[Tuple[int, int]]) -> List[torch.Tensor]:
        """Stage `stage`'s regression of the (N, 4) `rois` with the deltas of class `labels` (1..K), clipped
        to each image: the next stage's proposals, split per image (`counts`), detached."""
        boxes = self.box_coders[stage].decode_single(self.box_predictors[stage].select(deltas, labels), rois)
        return [box_ops.clip_boxes_to_image(b, shape).detach()
                for b, shape in zip(boxes.split(counts), image_shapes, strict=True)]

    def _train(self, features: Dict[str, torch.Tensor], proposals: List[torch.Tensor],
               image_shapes: List[Tuple[int, int]], targets: List[Dict[str, torch.Tensor]]) -> Dict[str, torch.Tensor]:
        losses: Dict[str, torch.Tensor] = {}
        gt_masks = [t['masks'] for t in targets]
        gt_labels = [t['labels'] for t in targets]
        for stage, weight in enumerate(self.stage_weights):
            samples = self._sample(stage, proposals, targets)
            class_logits, deltas = self._box_forward(stage, features, samples.proposals, image_shapes)
            labels, rois = torch.cat(samples.labels), torch.cat(samples.proposals)
            positive = torch.where(labels > 0)[0]
            if positive.numel() > 0:
                boxes = self.box_coders[stage].decode_single(
                    self.box_predictors[stage].select(deltas[positive], labels[positive]), rois[positive])
                loss_box = generalized_box_iou_loss(boxes, torch.cat(samples.gt_boxes)[positive], reduction='sum')
                loss_box = self.giou_weight * loss_box / labels.numel()
            else:
                loss_box = deltas.sum() * 0
            # each stage's mask head learns on that stage's positives (before its regression)
            mask_boxes = [p[lab > 0] for p, lab in zip(samples.proposals, samples.labels, strict=True)]
            mask_idxs = [m[lab > 0] for m, lab in zip(samples.matched_idxs, samples.labels, strict=True)]
            mask_logits = self._mask_forward(stage, features, mask_boxes, image_shapes)
            loss_mask = maskrcnn_loss(mask_logits, mask_boxes, gt_masks, gt_labels, mask_idxs)
            losses[f'loss_classifier_stage{stage}'] = weight * F.cross_entropy(class_logits, labels)
            losses[f'loss_box_reg_stage{stage}'] = weight * loss_box
            losses[f'loss_mask_stage{stage}'] = weight * loss_mask
            if stage + 1 < self.num_stages:
                with torch.no_grad():
                    # negatives are regressed with their best object class, as mmdet's refine_bboxes
                    best = class_logits[:, 1:].argmax(dim=1) + 1
                    refined = self._refine(stage, deltas, rois, torch.where(labels > 0, labels, best),
                                           [len(p) for p in samples.proposals], image_shapes)
                proposals = [boxes[~is_gt] for boxes, is_gt in zip(refined, samples.is_gt, strict=True)]
        return losses

    def _detect(self, features: Dict[str, torch.Tensor], proposals: List[torch.Tensor],
                image_shapes: List[Tuple[int, int]]) -> List[Dict[str, torch.Tensor]]:
        counts = [len(p) for p in proposals]
        rois = proposals
        logits_sum = None
        for stage in range(self.num_stages):
            class_logits, deltas = self._box_forward(stage, features, rois, image_shapes)
            logits_sum = class_logits if logits_sum is None else logits_sum + class_logits
            if stage + 1 < self.num_stages:
                rois = self._refine(stage, deltas, torch.cat(rois), class_logits[:, 1:].argmax(dim=1) + 1, counts,
                                    image_shapes)
        scores = F.softmax(logits_sum / self.num_stages, dim=-1)
        last = self.box_predictors[-1]
        if last.class_agnostic:
            boxes = self.box_coders[-1].decode_single(deltas, torch.cat(rois))[:, None].expand(-1, last.num_classes, 4)
        else:
            boxes = self.box_coders[-1].decode(deltas, rois)  # (N, K, 4)
        result = [self._postprocess(b, s, shape) for b, s, shape in
                  zip(boxes.split(counts), scores.split(counts), image_shapes, strict=True)]
        final_boxes = [r['boxes'] for r in result]
        probs = sum(self._mask_forward(stage, features, final_boxes, image_shapes).sigmoid()
                    for stage in range(self.num_stages)) / self.num_stages
        labels = torch.cat([r['labels'] for r in result])
        probs = probs[torch.arange(len(labels), device=labels.device), labels][:, None]
        for r, masks in zip(result, probs.split([len(b) for b in final_boxes]), strict=True):
            r['masks'] = masks
        return result

    def _postprocess(self, boxes: torch.Tensor, scores: torch.Tensor, image_shape: Tuple[int, int]
                     ) -> Dict[str, torch.Tensor]:
        """One image's detections from per-class boxes (n, K, 4) and class probabilities (n, K + 1), as
        torchvision's ``RoIHeads.postprocess_detections``."""
        num_classes = boxes.shape[1]
        boxes = box_ops.clip_boxes_to_image(boxes, image_shape).reshape(-1, 4)
        labels = torch.arange(1, num_classes + 1, device=boxes.device).view(1, -1).expand(len(scores), -1).reshape(-1)
        scores = scores[:, 1:].reshape(-1)
        keep = torch.where(scores > self.score_thresh)[0]
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = box_ops.remove_small_boxes(boxes, min_size=1e-2)
        boxes, scores, labels = boxes[keep], scores[keep], labels[keep]
        keep = box_ops.batched_nms(boxes, scores, labels, self.nms_thresh)[:self.detections_per_img]
        return {'boxes': boxes[keep], 'labels': labels[keep], 'scores': scores[keep]}


class BackboneHooks:
    """What the training code asks of a dense model built on a classifier backbone (a detector, a
    segmentor): ``backbone_model`` (the classifier inside the ``features_only`` wrapper, head and final norm
    pruned) and ``backbone_prefix`` (where its state-dict keys live in the model's, the place
    :func:`utils.checkpoint.load_pretrained` loads an ImageNet file into) are the subclass's; the
    optimizer's exemptions and DDP's unused parameters follow from them."""

    backbone_prefix: str
    backbone_model: nn.Module

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """The backbone's exempt names, under their prefix here (``<prefix>absolute_pos_embed``)."""
        inner = self.backbone_model
        names = inner.no_weight_decay() if hasattr(inner, 'no_weight_decay') else set()
        return {self.backbone_prefix + name for name in names}

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set:
        inner = self.backbone_model
        return set(inner.no_weight_decay_keywords()) if hasattr(inner, 'no_weight_decay_keywords') else set()

    @torch.jit.ignore
    def unused_parameters(self) -> set:
        """Parameters a training forward pass never uses: the backbone's own that ``features_only`` kept.
        FLatten-PVT's never-applied final norm, the classifiers' only one, is pruned with the head, so every
        dense model built here uses all its parameters in training (its heads, FPN and RPN too)."""
        inner = self.backbone_model
        names = inner.unused_parameters() if hasattr(inner, 'unused_parameters') else set()
        own = dict(self.named_parameters())
        return {self.backbone_prefix + name for name in names if self.backbone_prefix + name in own}


class Detector(BackboneHooks, GeneralizedRCNN):
    """Torchvision's ``GeneralizedRCNN`` (transform, backbone, RPN, RoI heads) over a :class:`TimmFPNBackbone`,
    with what the training code asks of every model here.

    ``forward(images, targets)`` in training: images a list of (3, H, W) in [0, 1], targets a list of dicts
    with ``boxes`` (n, 4) xyxy in pixels, ``labels`` (n,) in 1..K, ``masks`` (n, H, W) uint8 -> dict of
    losses. In evaluation ``forward(images)`` -> one dict per image: ``boxes`` (N, 4) in the input's
    pixels, ``labels`` (N,) in 1..K, ``scores`` (N,), ``masks`` (N, 1, H, W) probabilities.

    ``num_classes`` is K, the object classes (the heads add the background).
    """

    def __init__(self, backbone: TimmFPNBackbone, rpn: RegionProposalNetwork, roi_heads: nn.Module,
                 transform: GeneralizedRCNNTransform, num_classes: int) -> None:
        super().__init__(backbone, rpn, roi_heads, transform)
        self.num_classes = num_classes

    @property
    def backbone_prefix(self) -> str:
        """Where the classifier's state-dict keys live in this model's: ``backbone.body.model.`` (the FPN
        backbone's body is the ``features_only`` wrapper, which keeps the classifier as ``model``)."""
        return 'backbone.body.model.'

    @property
    def backbone_model(self) -> nn.Module:
        """The backbone classifier inside the ``features_only`` wrapper (head and final norm pruned)."""
        return self.backbone.body.model

    def head_stages(self) -> Tuple[List[Tuple[nn.Module, nn.Module]], List[Tuple[nn.Module, nn.Module]]]:
        """([(box head, box predictor)] per stage, [(mask head, mask predictor)] per stage): one of each for
        Mask R-CNN, one per stage for the cascade."""
        heads = self.roi_heads
        if isinstance(heads, CascadeRoIHeads):
            return (list(zip(heads.box_heads, heads.box_predictors, strict=True)),
                    list(zip(heads.mask_heads, heads.mask_predictors, strict=True)))
        masks = [(heads.mask_head, heads.mask_predictor)] if heads.has_mask() else []
        return [(heads.box_head, heads.box_predictor)], masks

    def flops_forward(self, images: torch.Tensor, num_rois: int = DUMMY_ROIS,
                      num_mask_rois: int = DUMMY_MASK_ROIS) -> List[torch.Tensor]:
        """mmdet's ``forward_dummy``, the pass its ``tools/get_flops.py`` counts (Table 2's FLOPs).

        images: (B, 3, H, W), already normalised and of a size divisible by 32 (no transform). Runs the
        backbone, FPN and RPN head on the whole batch, then every box head and predictor on `num_rois`
        RoIs and every mask head and predictor on `num_mask_rois` of them. The RoI features are zeros of
        the poolers' output shapes: RoIAlign, which mmcv's counter does not count either, is not run
        (its level assignment of random boxes would need real data). Returns every output tensor.
        """
        features = self.backbone(images)
        objectness, deltas = self.rpn.head(list(features.values()))
        outputs = [*objectness, *deltas]
        channels = self.backbone.out_channels
        box_pool = self.roi_heads.box_roi_pool
        box_features = images.new_zeros(num_rois, channels, *to_2tuple(box_pool.output_size))
        box_stages, mask_stages = self.head_stages()
        for head, predictor in box_stages:
            outputs.extend(predictor(head(box_features)))
        if mask_stages:
            mask_pool = self.roi_heads.mask_roi_pool
            mask_features = images.new_zeros(min(num_mask_rois, num_rois), channels, *to_2tuple(mask_pool.output_size))
            for head, predictor in mask_stages:
                outputs.append(predictor(head(mask_features)))
        return outputs


class ForwardDummy(nn.Module):
    """``detector.flops_forward`` (with `num_rois` and `num_mask_rois`) as a module's ``forward``, for FLOP
    counters that call ``model(images)``: ``utils.flops.count_macs(ForwardDummy(detector), (3, 1280, 800),
    fake=True)`` is Table 2's count."""

    def __init__(self, detector: Detector, num_rois: int = DUMMY_ROIS, num_mask_rois: int = DUMMY_MASK_ROIS) -> None:
        super().__init__()
        self.detector = detector
        self.num_rois, self.num_mask_rois = num_rois, num_mask_rois

    def forward(self, images: torch.Tensor) -> List[torch.Tensor]:
        return self.detector.flops_forward(images, self.num_rois, self.num_mask_rois)


def _rpn(backbone: TimmFPNBackbone, det) -> RegionProposalNetwork:
    """Torchvision's RPN on every FPN level (``'pool'`` included): one anchor size per level, 32·2^i, ratios
    0.5/1/2; positives at IoU ≥ 0.7, negatives < 0.3; ``DET.RPN_BATCH_PER_IMAGE`` anchors, half positive;
    NMS 0.7 per level; ``DET.RPN_PRE/POST_NMS_TRAIN/TEST`` proposals."""
    levels = len(backbone.featmap_names) + 1  # + the max-pooled level
    anchors = AnchorGenerator(sizes=tuple((32 * 2 ** i,) for i in range(levels)),
                              aspect_ratios=((0.5, 1.0, 2.0),) * levels)
    head = RPNHead(backbone.out_channels, anchors.num_anchors_per_location()[0])
    return RegionProposalNetwork(
        anchors, head, fg_iou_thresh=0.7, bg_iou_thresh=0.3, batch_size_per_image=det.RPN_BATCH_PER_IMAGE,
        positive_fraction=0.5, pre_nms_top_n=dict(training=det.RPN_PRE_NMS_TRAIN, testing=det.RPN_PRE_NMS_TEST),
        post_nms_top_n=dict(training=det.RPN_POST_NMS_TRAIN, testing=det.RPN_POST_NMS_TEST), nms_thresh=0.7)


def _mask_head(channels: int, mask_channels: int, num_classes: int) -> Tuple[nn.Module, nn.Module]:
    """Torchvision's Mask R-CNN mask head (4 × 3×3 conv + ReLU) and predictor (2×2 deconv + ReLU, 1×1 conv to
    `num_classes` + 1 channels: torchvision keeps a background channel, mmdet has none)."""
    return (MaskRCNNHeads(channels, [mask_channels] * 4, 1),
            MaskRCNNPredictor(mask_channels, mask_channels, num_classes + 1))


def _mask_rcnn_heads(backbone: TimmFPNBackbone, det, num_classes: int) -> RoIHeads:
    channels, names = backbone.out_channels, backbone.featmap_names
    mask_head, mask_predictor = _mask_head(channels, det.MASK_CHANNELS, num_classes)
    return RoIHeads(
        box_roi_pool=MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2),
        box_head=TwoMLPHead(channels * 7 * 7, det.BOX_FC_DIM),
        box_predictor=FastRCNNPredictor(det.BOX_FC_DIM, num_classes + 1),
        fg_iou_thresh=0.5, bg_iou_thresh=0.5, batch_size_per_image=det.BOX_BATCH_PER_IMAGE, positive_fraction=0.25,
        bbox_reg_weights=None, score_thresh=det.SCORE_THRESH, nms_thresh=0.5,
        detections_per_img=det.DETECTIONS_PER_IMAGE,
        mask_roi_pool=MultiScaleRoIAlign(names, output_size=14, sampling_ratio=2),
        mask_head=mask_head, mask_predictor=mask_predictor)


def _cascade_heads(backbone: TimmFPNBackbone, det, num_classes: int) -> CascadeRoIHeads:
    stages = len(det.CASCADE_IOUS)
    if stages > len(CASCADE_TARGET_STDS):
        raise ValueError(f'DET.CASCADE_IOUS={list(det.CASCADE_IOUS)} has {stages} stages; box coder weights are '
                         f'known for at most {len(CASCADE_TARGET_STDS)} (mmdet\'s target_stds)')
    channels, names = backbone.out_channels, backbone.featmap_names
    mask_parts = [_mask_head(channels, det.MASK_CHANNELS, num_classes) for _ in range(stages)]
    return CascadeRoIHeads(
        box_roi_pool=MultiScaleRoIAlign(names, output_size=7, sampling_ratio=2),
        box_heads=[box_head_4conv1fc(channels, 7, det.BOX_FC_DIM) for _ in range(stages)],
        box_predictors=[BoxPredictor(det.BOX_FC_DIM, num_classes, CASCADE_CLASS_AGNOSTIC) for _ in range(stages)],
        mask_roi_pool=MultiScaleRoIAlign(names, output_size=14, sampling_ratio=2),
        mask_heads=[head for head, _ in mask_parts], mask_predictors=[predictor for _, predictor in mask_parts],
        stage_ious=det.CASCADE_IOUS, stage_weights=det.CASCADE_WEIGHTS,
        box_coder_weights=[tuple(1.0 / std for std in stds) for stds in CASCADE_TARGET_STDS[:stages]],
        batch_size_per_image=det.BOX_BATCH_PER_IMAGE, positive_fraction=0.25, score_thresh=det.SCORE_THRESH,
        nms_thresh=0.5, detections_per_img=det.DETECTIONS_PER_IMAGE)


def build_detector(cfg) -> Detector:
    """The :class:`Detector` of `cfg` (``TASK: detection``): the backbone ``models.build.resolve(cfg)`` names, as
    ``features_only`` with every stage, under an FPN of ``DET.FPN_CHANNELS`` (``LastLevelMaxPool``; per-stage
    LayerNorms first for Swin and CSwin), torchvision's RPN and the RoI heads of ``DET.DETECTOR`` for
    ``MODEL.NUM_CLASSES`` object classes. ValueError naming the key for a value that cannot be built (an
    unknown ``DET.DETECTOR``, more cascade stages than box coders, a backbone without a feature pyramid:
    ``MODEL.TYPE``)."""
    from .build import resolve  # models.build imports this module lazily: no cycle
    from .registry import variant_spec
    from .segmentation import _all_levels
    det = cfg.DET
    if det.DETECTOR not in DETECTORS:
        raise ValueError(f'DET.DETECTOR={det.DETECTOR!r} is not one of {DETECTORS}')
    variant, overrides = resolve(cfg)
    body = create_feature_extractor(variant, _all_levels(variant, overrides), **overrides)
    strides = list(body.feature_info.reduction())
    if any(b != 2 * a for a, b in itertools.pairwise(strides)):
        raise ValueError(f'MODEL.TYPE={cfg.MODEL.TYPE!r} cannot detect: a detector needs a feature pyramid (each '
                         f'level of twice the previous stride); this backbone\'s levels have strides {strides}')
    backbone = TimmFPNBackbone(body, det.FPN_CHANNELS,
                               feature_norms=variant_spec(variant).family in FEATURE_NORM_FAMILIES)
    num_classes = cfg.MODEL.NUM_CLASSES
    heads = (_mask_rcnn_heads if det.DETECTOR == 'mask_rcnn' else _cascade_heads)(backbone, det, num_classes)
    return Detector(backbone, _rpn(backbone, det), heads, DetectionTransform(tuple(det.TEST_SCALE)), num_classes)
