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
"""
from __future__ import annotations

import difflib
import itertools
from collections import OrderedDict
from typing import Callable, Dict, List, Optional, Sequence, Union

import timm
import torch
import torch.nn as nn
from torchvision.models.detection import FasterRCNN, MaskRCNN
from torchvision.models.detection.anchor_utils import AnchorGenerator
from torchvision.ops import MultiScaleRoIAlign
from torchvision.ops.feature_pyramid_network import ExtraFPNBlock, FeaturePyramidNetwork, LastLevelMaxPool

from .registry import UnknownModelError, list_models

__all__ = ['TimmFPNBackbone', 'fpn_backbone', 'mask_rcnn', 'faster_rcnn', 'DEFAULT_OUT_INDICES']

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

    Attributes:
        out_channels: the channels of each level, as torchvision's detectors require.
        featmap_names: the keys of the backbone levels (``'pool'`` not included), for ``MultiScaleRoIAlign``.
        strides: the stride of every returned level, ``'pool'`` included (when the extra block is
            ``LastLevelMaxPool``: twice the last stride).
    """

    def __init__(self, body: nn.Module, out_channels: int = 256, extra_blocks: Optional[ExtraFPNBlock] = None,
                 norm_layer: Optional[Callable[..., nn.Module]] = None) -> None:
        super().__init__()
        if out_channels <= 0:
            raise ValueError(f'out_channels must be positive, got {out_channels}')
        if extra_blocks is None:
            extra_blocks = LastLevelMaxPool()
        self.body = body
        self.in_channels_list: List[int] = list(body.feature_info.channels())
        self.featmap_names: List[str] = [str(i) for i in range(len(self.in_channels_list))]
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
