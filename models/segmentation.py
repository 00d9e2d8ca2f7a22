"""Semantic segmentation models: any registered backbone under UperNet or Semantic FPN (paper Table 1).

    from models import build_model
    model = build_model(load_config('configs/ade20k/upernet_flatten_swin_t.yaml'))   # a Segmentor
    model.train(); out = model(images)   # {'main': (B, K, ⌈H/4⌉, ⌈W/4⌉), 'aux': (B, K, ⌈H/16⌉, ⌈W/16⌉)}
    model.eval(); logits = model(images)  # (B, K, ⌈H/4⌉, ⌈W/4⌉), the auxiliary head not run

A :class:`Segmentor` is a timm ``features_only`` backbone (the variant ``models.build.resolve(cfg)``
names, so ``MODEL.TYPE`` and every architecture key apply exactly as for classification), a decode
head and, when ``SEG.AUX_WEIGHT > 0``, mmseg's auxiliary FCN head on one backbone stage. The heads
follow mmseg 0.x, the code base of the papers' segmentation runs (docs/segmentation.md, "The models"):

* :class:`UperNetHead`: segmentation_models_pytorch's ``UPerNetDecoder`` (PPM + FPN fusion), its
  ``feature_norms`` standing in for the per-stage LayerNorms that mmseg's Swin and CSwin
  segmentation backbones put on their outputs;
* :class:`SemanticFPNHead`: torchvision's ``FeaturePyramidNetwork`` as mmseg's FPN neck plus mmseg's
  FPNHead (smp's FPN decoder is another design: no 3×3 output convs, GroupNorm);
* :class:`FCNHead`: mmseg's FCNHead with one conv (``num_convs=1, concat_input=False``).

Decoder norms are BatchNorm2d (mmseg trains with SyncBN; DDP runs convert them). Every head ends,
as mmseg's, with ``Dropout2d`` and a 1×1 classifier ``conv_seg``.
"""
from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from segmentation_models_pytorch.decoders.upernet.decoder import PSPModule, UPerNetDecoder
from torchvision.ops.feature_pyramid_network import FeaturePyramidNetwork

from .detection import BackboneHooks, create_feature_extractor

__all__ = ['Segmentor', 'UperNetHead', 'SemanticFPNHead', 'FCNHead', 'build_segmentor', 'DECODERS']

DECODERS = ('upernet', 'fpn')
# smp's UPerNetDecoder builds its pyramid pooling with these output sides; others replace its PSP module
SMP_POOL_SCALES = (1, 2, 3, 6)
# mmseg's Swin and CSwin segmentation backbones norm each output with nn.LayerNorm (eps 1e-5); smp's
# feature_norms, which take their place here, default to 1e-6
FEATURE_NORM_EPS = 1e-5


def conv_bn_relu(in_channels: int, out_channels: int, kernel_size: int) -> nn.Sequential:
    """mmseg's ``ConvModule`` with BN and ReLU: a conv without bias (the norm has one), 'same' padding."""
    return nn.Sequential(
        nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2, bias=False),
        nn.BatchNorm2d(out_channels), nn.ReLU(inplace=True))


def init_decoder(module: nn.Module) -> None:
    """mmseg's initialisation of a decode head: convs Kaiming normal (fan_out, ReLU) with zero bias
    (``ConvModule.init_weights``), BN weight 1 and bias 0; the classifier ``conv_seg`` N(0, 0.01²)
    (``BaseDecodeHead.init_weights``). Called before the FPN neck re-initialises its own convs."""
    for name, sub in module.named_modules():
        if isinstance(sub, nn.Conv2d):
            if name.split('.')[-1] == 'conv_seg':
                nn.init.normal_(sub.weight, std=0.01)
            else:
                nn.init.kaiming_normal_(sub.weight, mode='fan_out', nonlinearity='relu')
            if sub.bias is not None:
                nn.init.zeros_(sub.bias)
        elif isinstance(sub, (nn.BatchNorm2d, nn.LayerNorm)):
            nn.init.ones_(sub.weight)
            nn.init.zeros_(sub.bias)


class ClassifierMixin:
    """``Dropout2d(dropout)`` then the 1×1 classifier ``conv_seg`` (mmseg's ``BaseDecodeHead.cls_seg``)."""
    dropout: nn.Module
    conv_seg: nn.Conv2d

    def _make_classifier(self, channels: int, num_classes: int, dropout: float) -> None:
        # mmseg drops whole channels (nn.Dropout2d), not single activations
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.conv_seg = nn.Conv2d(channels, num_classes, kernel_size=1)

    def classify(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv_seg(self.dropout(x))


class UperNetHead(ClassifierMixin, nn.Module):
    """UperNet (Xiao et al. 2018) as mmseg's ``UPerHead``, on smp's ``UPerNetDecoder`` (``decoder``).

    smp computes the same graph as mmseg's UPerHead, module for module: a pyramid pooling module
    (per scale adaptive average pool + 1×1 conv-BN-ReLU, upsampled and concatenated with the input,
    then a 3×3 conv-BN-ReLU bottleneck) on the last level; 1×1 conv-BN-ReLU laterals on the others;
    top-down sums with bilinear upsampling; 3×3 conv-BN-ReLU on every summed lateral; everything
    upsampled to the first level, concatenated (first level first, PPM last) and fused by a 3×3
    conv-BN-ReLU. Two differences are handled here: smp's decoder norms every input level with a
    LayerNorm2d (``decoder.feature_norms``), which plays the part of mmseg's per-stage backbone norms
    (with their eps, :data:`FEATURE_NORM_EPS`), and it pools with fixed scales (1, 2, 3, 6), so
    other `pool_scales` get smp's ``PSPModule`` built with them.

    features: list of (B, C_i, H_i, W_i), highest resolution first -> logits (B, K, H_0, W_0).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, channels: int = 512,
                 pool_scales: Sequence[int] = SMP_POOL_SCALES, dropout: float = 0.1) -> None:
        super().__init__()
        if len(in_channels) < 2:
            raise ValueError(f'UperNet needs at least two feature levels, got channels {list(in_channels)}')
        # smp's decoder skips the first two entries (its encoders' strides 1 and 2): two placeholders
        self.decoder = UPerNetDecoder(encoder_channels=[0, 0, *in_channels], encoder_depth=len(in_channels) + 1,
                                      decoder_channels=channels, use_norm='batchnorm')
        if tuple(pool_scales) != SMP_POOL_SCALES:
            self.decoder.psp = PSPModule(in_channels[-1], channels, sizes=tuple(pool_scales), use_norm='batchnorm')
        for norm in self.decoder.feature_norms:
            norm.eps = FEATURE_NORM_EPS
        self._make_classifier(channels, num_classes, dropout)
        init_decoder(self)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        return self.classify(self.decoder([features[0], features[0], *features]))


class SemanticFPNHead(ClassifierMixin, nn.Module):
    """Semantic FPN (Kirillov et al. 2019) as mmseg's ``FPN`` neck + ``FPNHead``.

    ``neck``: torchvision's ``FeaturePyramidNetwork``, `fpn_channels` wide: 1×1 lateral and 3×3 output
    convs with bias and no norm, nearest-neighbour top-down upsampling, as mmseg's FPN (and its
    Xavier-uniform initialisation). ``scale_heads[i]``: for level i of stride s_i,
    ``max(1, log2(s_i / s_0))`` 3×3 conv-BN-ReLU blocks of `channels`, each followed by ×2 bilinear
    upsampling when s_i > s_0; the levels are summed at the first level's size (resized there when an
    odd map size makes ×2 miss it), then classified.

    features: list of (B, C_i, H_i, W_i), highest resolution first -> logits (B, K, H_0, W_0).
    """

    def __init__(self, in_channels: Sequence[int], strides: Sequence[int], num_classes: int, channels: int = 128,
                 fpn_channels: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        if len(in_channels) != len(strides):
            raise ValueError(f'{len(in_channels)} channel counts for {len(strides)} strides')
        self.names = [str(i) for i in range(len(in_channels))]
        self.neck = FeaturePyramidNetwork(list(in_channels), fpn_channels)
        self.scale_heads = nn.ModuleList()
        for stride in strides:
            length = max(1, int(math.log2(stride) - math.log2(strides[0])))
            layers: List[nn.Module] = []
            for k in range(length):
                layers.append(conv_bn_relu(fpn_channels if k == 0 else channels, channels, 3))
                if stride != strides[0]:
                    layers.append(nn.Upsample(scale_factor=2, mode='bilinear', align_corners=False))
            self.scale_heads.append(nn.Sequential(*layers))
        self._make_classifier(channels, num_classes, dropout)
        init_decoder(self)
        for module in self.neck.modules():  # mmseg's FPN: Xavier uniform, zero bias
            if isinstance(module, nn.Conv2d):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        pyramid = list(self.neck(OrderedDict(zip(self.names, features, strict=True))).values())
        output = self.scale_heads[0](pyramid[0])
        for level, head in zip(pyramid[1:], self.scale_heads[1:], strict=True):
            output = output + F.interpolate(head(level), size=output.shape[-2:], mode='bilinear',
                                            align_corners=False)
        return self.classify(output)


class FCNHead(ClassifierMixin, nn.Module):
    """mmseg's auxiliary ``FCNHead`` (``num_convs=1, concat_input=False``): 3×3 conv-BN-ReLU to
    `channels`, then the classifier. x: (B, C, h, w) -> logits (B, K, h, w)."""

    def __init__(self, in_channels: int, num_classes: int, channels: int = 256, dropout: float = 0.1) -> None:
        super().__init__()
        self.convs = conv_bn_relu(in_channels, channels, 3)
        self._make_classifier(channels, num_classes, dropout)
        init_decoder(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classify(self.convs(x))


class Segmentor(BackboneHooks, nn.Module):
    """A feature-pyramid backbone, a decode head and an optional auxiliary head.

    ``forward(images)``: images (B, 3, H, W), any H, W the backbone accepts. The batch is first padded
    (bottom and right, with zeros: the normalised mean colour) to a multiple of the first level's
    stride ``size_divisor`` (4), so that every backbone gives a first level of exactly ⌈H/4⌉ × ⌈W/4⌉
    (Swin and PVT pad partial patches the same way themselves; CSwin's 7×7 stride-4 stem would drop
    the last rows otherwise). In training mode it returns ``{'main': (B, K, ⌈H/4⌉, ⌈W/4⌉)}`` plus
    ``'aux'``: (B, K, h, w) on the map of stage ``aux_stage`` when there is an auxiliary head; in eval
    mode only the main logits tensor, and the auxiliary head does not run. The caller upsamples
    logits to the label size.

    Args:
        backbone: a timm ``features_only`` model (:func:`models.detection.create_feature_extractor`)
            whose levels form a pyramid (each stride twice the previous one).
        num_classes: classes K.
        decoder: 'upernet' (:class:`UperNetHead`) or 'fpn' (:class:`SemanticFPNHead`).
        channels: decoder width (UperNet 512, Semantic FPN head 128).
        fpn_channels: Semantic FPN neck width.
        pool_scales: UperNet's pyramid pooling output sides.
        dropout: Dropout2d probability before every classifier.
        aux_channels: auxiliary head width; None builds no auxiliary head.
        aux_stage: the backbone level (0-based) the auxiliary head reads.
    """

    def __init__(self, backbone: nn.Module, num_classes: int, decoder: str = 'upernet', channels: int = 512,
                 fpn_channels: int = 256, pool_scales: Sequence[int] = SMP_POOL_SCALES, dropout: float = 0.1,
                 aux_channels: Optional[int] = 256, aux_stage: int = 2) -> None:
        super().__init__()
        in_channels = list(backbone.feature_info.channels())
        strides = list(backbone.feature_info.reduction())
        if any(b != 2 * a for a, b in itertools.pairwise(strides)):
            raise ValueError(f'a segmentor needs a feature pyramid (each level of twice the previous stride); '
                             f'this backbone\'s levels have strides {strides}')
        if not 0 <= aux_stage < len(in_channels):
            raise ValueError(f'SEG.AUX_STAGE={aux_stage}: the backbone has {len(in_channels)} stages (0 to '
                             f'{len(in_channels) - 1})')
        self.backbone = backbone
        self.num_classes = num_classes
        self.size_divisor = strides[0]
        if decoder == 'upernet':
            self.decode_head = UperNetHead(in_channels, num_classes, channels, pool_scales, dropout)
        elif decoder == 'fpn':
            self.decode_head = SemanticFPNHead(in_channels, strides, num_classes, channels, fpn_channels, dropout)
        else:
            raise ValueError(f'SEG.DECODER={decoder!r} is not one of {DECODERS}')
        self.aux_stage = aux_stage
        self.aux_head = (FCNHead(in_channels[aux_stage], num_classes, aux_channels, dropout)
                         if aux_channels is not None else None)

    @property
    def backbone_prefix(self) -> str:
        """Where the classifier's state-dict keys live in this model's (``backbone.model.``): the
        ``features_only`` wrapper keeps the classifier as ``model``, head and final norm pruned."""
        return 'backbone.model.'

    @property
    def backbone_model(self) -> nn.Module:
        """The backbone classifier inside the ``features_only`` wrapper (head and final norm pruned)."""
        return self.backbone.model

    def forward(self, images: torch.Tensor) -> Union[torch.Tensor, Dict[str, torch.Tensor]]:
        height, width = images.shape[-2:]
        pad_h, pad_w = -height % self.size_divisor, -width % self.size_divisor
        if pad_h or pad_w:
            images = F.pad(images, (0, pad_w, 0, pad_h))
        features = self.backbone(images)
        out_size = (math.ceil(height / self.size_divisor), math.ceil(width / self.size_divisor))
        main = self.decode_head(features)[..., :out_size[0], :out_size[1]]
        if not self.training:
            return main
        out = {'main': main}
        if self.aux_head is not None:
            out['aux'] = self.aux_head(features[self.aux_stage])
        return out


def build_segmentor(cfg) -> Segmentor:
    """The :class:`Segmentor` of `cfg` (``TASK: segmentation``): the backbone ``models.build.resolve(cfg)``
    names, as ``features_only`` with every stage, under ``SEG.DECODER`` with ``MODEL.NUM_CLASSES``
    classes; an auxiliary head when ``SEG.AUX_WEIGHT > 0``. ValueError naming the key for a value that
    cannot be built (``SEG.AUX_STAGE`` beyond the last stage, an unknown ``SEG.DECODER``, a backbone
    without a feature pyramid: ``MODEL.TYPE``)."""
    from .build import resolve  # models.build imports this module lazily: no cycle
    seg = cfg.SEG
    if seg.DECODER not in DECODERS:
        raise ValueError(f'SEG.DECODER={seg.DECODER!r} is not one of {DECODERS}')
    variant, overrides = resolve(cfg)
    backbone = create_feature_extractor(variant, _all_levels(variant, overrides), **overrides)
    try:
        return Segmentor(backbone, cfg.MODEL.NUM_CLASSES, seg.DECODER, seg.CHANNELS, seg.FPN_CHANNELS,
                         tuple(seg.POOL_SCALES), seg.DROPOUT, seg.AUX_CHANNELS if seg.AUX_WEIGHT > 0 else None,
                         seg.AUX_STAGE)
    except ValueError as err:
        if 'feature pyramid' in str(err):
            raise ValueError(f'MODEL.TYPE={cfg.MODEL.TYPE!r} cannot segment: {err}') from err
        raise


def _all_levels(variant: str, overrides: dict) -> Tuple[int, ...]:
    """Every feature level of the variant: the stage count of its depths (4 for every registered
    hierarchical model; a micro model may have fewer)."""
    from .registry import variant_spec
    depths = overrides.get('depths', variant_spec(variant).arch.get('depths'))
    return tuple(range(len(depths))) if depths is not None else (0, 1, 2, 3)
