"""``build_model(cfg)``: one table turns a config into a registered variant plus constructor overrides.

Every model is a registered variant (:mod:`models.registry`). A config names its model with
``MODEL.TYPE`` (the official values: ``flatten_swin``, ``FLatten_CSWin_64_24181_tiny_224``,
``pvt_v2_b2``, ...), and :data:`MODEL_TYPES` says, for each value, in one row:

* the variant it starts from;
* the config keys it reads, each into one constructor argument (with a conversion where the config
  spells a value differently, e.g. ``SOFTMAX_WINDOW_SIZE 0`` for "the L window");
* what the type name fixes beyond that variant (the S stripes of ``FLatten_CSWin_..._384``);
* config keys it cannot honour, which are refused by name.

:func:`resolve` applies the row and then names the registered variant of the same class that is
closest to the result, so a config reads as ``create_model(variant, **overrides)`` with only the
arguments that differ from that variant: ``configs/flatten_swin_b_384.yaml`` is
``flatten_swin_base_patch4_384`` with ``drop_path_rate=0.5``. A sixth backbone registers its variants
and adds its rows here; nothing else reads the config's architecture keys.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Mapping, Tuple

import torch.nn as nn

from . import cswin, deit, pvt, pvt_v2, swin  # noqa: F401  (each registers its variants)
from .cswin import SPLITS_384
from .pvt import PVT_DEPTHS
from .pvt_v2 import PVT_V2_ARCHS
from .registry import create_model, list_families, unknown_name, variant_spec

__all__ = ['ModelType', 'MODEL_TYPES', 'list_model_types', 'resolve', 'describe', 'build_model']

# (config key, constructor argument, conversion of the config value)
Key = Tuple[str, str, Callable[[Any], Any]]


def _same(value: Any) -> Any:
    return value


def _or_none(value: Any) -> Any:
    """The config's "unset" (0 or '') as the constructor's None."""
    return value or None


def _digits(value: Any) -> Any:
    """yacs reads ``PVT_LA_SR_RATIOS 1111`` as the int 1111: the constructor's digit string ``'1111'``."""
    return str(value) if isinstance(value, int) else value


def _keys(section: str, *names: str, **convert: Callable[[Any], Any]) -> Tuple[Key, ...]:
    """``SECTION.NAME -> name`` for each of `names` (lower-cased); `convert` maps a NAME to its conversion."""
    return tuple((f'{section}.{name}', name.lower(), convert.get(name, _same)) for name in names)


# what every type reads
_COMMON: Tuple[Key, ...] = (
    ('DATA.IMG_SIZE', 'img_size', _same), ('MODEL.NUM_CLASSES', 'num_classes', _same),
    ('MODEL.DROP_RATE', 'drop_rate', _same), ('MODEL.DROP_PATH_RATE', 'drop_path_rate', _same),
    ('TRAIN.USE_CHECKPOINT', 'use_checkpoint', _same))
# what every FLatten type reads; the softmax baselines ignore MODEL.LA (their official configs have none)
_LA = _keys('MODEL.LA', 'ATTN_TYPE', 'LINEAR_KIND', 'FOCUSING_FACTOR', 'KERNEL_SIZE')
_SWIN = _keys('MODEL.SWIN', 'PATCH_SIZE', 'IN_CHANS', 'EMBED_DIM', 'DEPTHS', 'NUM_HEADS', 'WINDOW_SIZE', 'MLP_RATIO',
              'QKV_BIAS', 'QK_SCALE', 'APE', 'PATCH_NORM', 'FIXED_WINDOW', DEPTHS=tuple, NUM_HEADS=tuple)
_FLATTEN_SWIN = _COMMON + _SWIN + _LA + (('MODEL.SWIN.SOFTMAX_WINDOW_SIZE', 'softmax_window_size', _or_none),)
# the Swin baseline: every block softmax, in windows of WINDOW_SIZE
_SOFTMAX_SWIN = _COMMON + _SWIN + (
    ('MODEL.SWIN.WINDOW_SIZE', 'softmax_window_size', _same),
    ('MODEL.SWIN.DEPTHS', 'attn_type', lambda depths: 'S' * len(depths)))
_DEIT = _COMMON + _keys('MODEL.DEIT', 'PATCH_SIZE', 'IN_CHANS', 'EMBED_DIM', 'DEPTH', 'NUM_HEADS', 'MLP_RATIO',
                        'QKV_BIAS', 'GLOBAL_POOL', GLOBAL_POOL=_or_none) + (
    ('MODEL.DEIT.ABS_POS_EMBED', 'use_abs_pos', _same),)
# CSwin's architecture comes from its type name; the official configs keep IN_CHANS in MODEL.SWIN
_CSWIN = _COMMON + (('MODEL.SWIN.IN_CHANS', 'in_chans', _same),)
_FLATTEN_CSWIN = _CSWIN + _LA + (('MODEL.LA.CSWIN_LA_SPLIT_SIZE', 'la_split_size', _same),)
_FLATTEN_PVT = _COMMON + _LA + (('MODEL.LA.PVT_LA_SR_RATIOS', 'la_sr_ratios', _digits),)
_PVT_LINEAR = (('MODEL.LA.PVT_LINEAR', 'linear', _same),)  # PVTv2's linear mode, of both kinds ("-Li")
_NOT_PVT_V1 = (('MODEL.LA.PVT_LINEAR', 'is a PVTv2 mode'),)


@dataclass(frozen=True)
class ModelType:
    """One ``MODEL.TYPE``: ``variant`` built with ``fixed`` and the config values of ``keys``; a key of
    ``refuse`` set (truthy) in the config is an error, with its reason."""
    variant: str
    keys: Tuple[Key, ...]
    fixed: Mapping[str, Any] = field(default_factory=dict)
    refuse: Tuple[Tuple[str, str], ...] = ()


MODEL_TYPES: Dict[str, ModelType] = {
    'flatten_swin': ModelType('flatten_swin_tiny_patch4_224', _FLATTEN_SWIN),
    'swin': ModelType('softmax_swin_tiny_patch4_window7_224', _SOFTMAX_SWIN),
    'flatten_deit': ModelType('flatten_deit_tiny_patch16_224', _DEIT + _LA),
    'deit': ModelType('softmax_deit_tiny_patch16_224', _DEIT),
    **{f'flatten_pvt_{size}': ModelType(f'flatten_pvt_{size}', _FLATTEN_PVT, refuse=_NOT_PVT_V1)
       for size in PVT_DEPTHS},
    **{f'pvt_{size}': ModelType(f'softmax_pvt_{size}', _COMMON, refuse=_NOT_PVT_V1) for size in PVT_DEPTHS},
    **{f'flatten_pvt_v2_{size}': ModelType(f'flatten_pvt_v2_{size}', _FLATTEN_PVT + _PVT_LINEAR)
       for size in PVT_V2_ARCHS},
    **{f'pvt_v2_{size}': ModelType(f'softmax_pvt_v2_{size}', _COMMON + _PVT_LINEAR) for size in PVT_V2_ARCHS},
    # the official CSwin names: width, depths, size and resolution of the S stripes
    'FLatten_CSWin_64_24181_tiny_224': ModelType('flatten_cswin_tiny_224', _FLATTEN_CSWIN),
    'FLatten_CSWin_64_24322_small_224': ModelType('flatten_cswin_small_224', _FLATTEN_CSWIN),
    'FLatten_CSWin_96_36292_base_224': ModelType('flatten_cswin_base_224', _FLATTEN_CSWIN),
    'FLatten_CSWin_96_36292_base_384': ModelType('flatten_cswin_base_384', _FLATTEN_CSWIN),
    # FLatten-CSwin-T and -S at 384² (no official config): the 384² S stripes
    'FLatten_CSWin_64_24181_tiny_384': ModelType('flatten_cswin_tiny_224', _FLATTEN_CSWIN,
                                                 fixed=dict(split_size=SPLITS_384)),
    'FLatten_CSWin_64_24322_small_384': ModelType('flatten_cswin_small_224', _FLATTEN_CSWIN,
                                                  fixed=dict(split_size=SPLITS_384)),
    'CSWin_64_12211_tiny_224': ModelType('softmax_cswin_tiny_224', _CSWIN),
    'CSWin_64_24322_small_224': ModelType('softmax_cswin_small_224', _CSWIN),
    'CSWin_96_24322_base_224': ModelType('softmax_cswin_base_224', _CSWIN),
    'CSWin_96_24322_base_384': ModelType('softmax_cswin_base_384', _CSWIN),
}


def list_model_types() -> List[str]:
    return sorted(MODEL_TYPES)


def _config_value(cfg, key: str) -> Any:
    node = cfg
    for part in key.split('.'):
        node = getattr(node, part)
    return node


def _arguments(name: str) -> Dict[str, Any]:
    """Every constructor argument variant `name` builds with: its architecture over the defaults."""
    spec = variant_spec(name)
    defaults = {p.name: p.default for p in inspect.signature(spec.cls).parameters.values()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **spec.arch}


def _differ(args: Mapping[str, Any], name: str) -> Dict[str, Any]:
    base = _arguments(name)
    return {key: value for key, value in args.items() if key not in base or base[key] != value}


def resolve(cfg) -> Tuple[str, Dict[str, Any]]:
    """``(variant, overrides)`` with ``create_model(variant, **overrides)`` the model of `cfg`.

    The row of ``cfg.MODEL.TYPE`` gives every argument; `variant` is then the registered variant of the
    same class needing the fewest overrides (the row's own variant on a tie), and `overrides` are only
    the arguments that differ from it. Raises UnknownModelError (close matches first) for an unknown
    ``MODEL.TYPE`` and ValueError naming the key for a config key the type refuses.
    """
    if cfg.MODEL.TYPE not in MODEL_TYPES:
        raise unknown_name('MODEL.TYPE', cfg.MODEL.TYPE, list_model_types())
    row = MODEL_TYPES[cfg.MODEL.TYPE]
    for key, why in row.refuse:
        if _config_value(cfg, key):
            raise ValueError(f'{key} {why}; MODEL.TYPE {cfg.MODEL.TYPE!r} cannot use it')
    args = {**_arguments(row.variant), **row.fixed,
            **{arg: convert(_config_value(cfg, key)) for key, arg, convert in row.keys}}
    spec = variant_spec(row.variant)
    candidates = [row.variant] + [name for name in list_families()[spec.family]
                                  if name != row.variant and variant_spec(name).cls is spec.cls]
    variant = min(candidates, key=lambda name: len(_differ(args, name)))  # min keeps the first of a tie
    return variant, _differ(args, variant)


def describe(cfg) -> str:
    """``cfg``'s model as a timm call: ``flatten_swin_tiny_patch4_224(drop_path_rate=0.2)``."""
    variant, overrides = resolve(cfg)
    return f'{variant}({", ".join(f"{k}={v!r}" for k, v in overrides.items())})'


def build_model(cfg) -> nn.Module:
    """Build the model described by `cfg` (``MODEL.TYPE`` plus the keys its row reads), see :func:`resolve`:
    the classifier, or with ``TASK: segmentation`` a :class:`models.segmentation.Segmentor` on it, with
    ``TASK: detection`` a :class:`models.detection.Detector`.

    Raises :class:`models.registry.UnknownModelError` listing the known types (closest first) when
    ``MODEL.TYPE`` is not registered, and ValueError naming the offending key when the keys do not fit
    together (e.g. an image size the windows cannot tile).
    """
    # a segmentor: the backbone of the same row under a decode head (models/segmentation.py)
    if getattr(cfg, 'TASK', 'classification') == 'segmentation':
        from .segmentation import build_segmentor
        return build_segmentor(cfg)
    # a detector: the same backbone under an FPN, an RPN and RoI heads (models/detection.py)
    if getattr(cfg, 'TASK', 'classification') == 'detection':
        from .detection import build_detector
        return build_detector(cfg)
    name, overrides = resolve(cfg)
    return create_model(name, **overrides)
