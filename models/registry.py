"""Two registries: model variants (timm-style entry points) and config model types.

* A **variant** is a tiny function ``name(pretrained=False, **kwargs) -> nn.Module`` that fixes an
  architecture (``flatten_swin_tiny_patch4_224``). :func:`register_model` records it here and in
  timm's registry, so ``timm.create_model(name)`` works after ``import models``. A backbone declares
  its variants as a table (name -> architecture and description) that :func:`register_variants`
  turns into such functions. They build through timm's ``build_model_with_cfg``, with a
  ``pretrained_cfg`` (:func:`pretrained_cfg`) and feature extraction by ``forward_intermediates``,
  so ``timm.create_model(name, features_only=True, out_indices=...)`` gives the feature maps.
* A **model type** is what ``MODEL.TYPE`` names in a config (``flatten_swin``, ``swin``, ...): a
  function ``(cfg) -> nn.Module`` that reads the architecture keys of the config.
  :func:`register_model_types` registers one builder under several names, each with its own fixed
  arguments; :func:`common_cfg_kwargs` and :func:`la_cfg_kwargs` read the config keys that every
  builder (or every FLatten builder) passes on.
"""
from __future__ import annotations

import difflib
import functools
import sys
from typing import Any, Callable, Dict, List, Mapping, Tuple, Type

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import to_2tuple
from timm.models import build_model_with_cfg
from timm.models import register_model as timm_register_model

__all__ = [
    'UnknownModelError', 'register_model', 'register_variants', 'list_models', 'create_model',
    'register_model_type', 'register_model_types', 'list_model_types', 'get_model_type',
    'common_cfg_kwargs', 'la_cfg_kwargs', 'pretrained_cfg', 'FEATURE_CFG',
]

# features_only models: timm's FeatureGetterNet over forward_intermediates, by default the last 4 levels
# (the 4 stages of a hierarchical model, the last 4 blocks of DeiT)
FEATURE_CFG = dict(feature_cls='getter', out_indices=4)


class UnknownModelError(KeyError):
    """A model or model-type name that is not registered; the message lists close matches."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


_VARIANTS: Dict[str, Callable[..., nn.Module]] = {}
_MODEL_TYPES: Dict[str, Callable] = {}


def _unknown(what: str, name: str, known: List[str]) -> UnknownModelError:
    close = difflib.get_close_matches(name, known, n=5, cutoff=0.5)
    hint = f' Close matches: {", ".join(close)}.' if close else ''
    return UnknownModelError(f'unknown {what} {name!r}.{hint} Known: {", ".join(known)}')


def register_model(fn: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Decorator: register a variant entry point here and in timm under ``fn.__name__``."""
    name = fn.__name__
    if name in _VARIANTS:
        raise ValueError(f'model {name!r} is registered twice')
    _VARIANTS[name] = fn
    return timm_register_model(fn)


def pretrained_cfg(cls: Type[nn.Module], arch: Mapping[str, Any]) -> Dict[str, Any]:
    """timm's ``pretrained_cfg`` of a variant of `cls` with the constructor arguments `arch`: the
    evaluation recipe of the released weights (input size, ImageNet mean and std, bicubic resize,
    centre crop 0.875 at 224², none at 384²), the first conv and the classifier (``cls.first_conv``,
    ``head``). ``fixed_input_size`` is False: every model runs at any size."""
    size = to_2tuple(arch.get('img_size', 224))
    return dict(
        input_size=(3, *size), mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        crop_pct=0.875 if max(size) <= 224 else 1.0, interpolation='bicubic', first_conv=cls.first_conv,
        classifier='head', num_classes=1000, fixed_input_size=False)


def _entry_point(cls: Type[nn.Module], name: str, arch: Dict[str, Any], doc: str) -> Callable[..., nn.Module]:
    """``name(pretrained=False, **kwargs)``: ``cls(**arch, **kwargs)`` built by timm's
    ``build_model_with_cfg`` (``features_only=True`` and ``out_indices`` among the kwargs give timm's
    feature extractor), named and documented as if it had been written with ``def name`` in the
    module of `cls`."""
    default_cfg = pretrained_cfg(cls, arch)

    def entry_point(pretrained: bool = False, **kwargs) -> nn.Module:
        if pretrained:
            raise ValueError('no weights are downloaded by this code base: build with pretrained=False and use '
                             'utils.checkpoint.load_pretrained(model, path) with a released checkpoint')
        # timm.create_model passes these hub arguments; the hub cache is never read here
        cfg = kwargs.pop('pretrained_cfg', None) or default_cfg
        kwargs.pop('cache_dir', None)
        return build_model_with_cfg(cls, name, pretrained=False, pretrained_cfg=cfg, feature_cfg=dict(FEATURE_CFG),
                                    **{**arch, **kwargs})

    entry_point.__name__ = entry_point.__qualname__ = name
    entry_point.__module__ = cls.__module__
    entry_point.__doc__ = doc
    entry_point.__annotations__ = {'pretrained': bool, 'return': cls}
    return entry_point


def register_variants(cls: Type[nn.Module], table: Mapping[str, Tuple[Mapping[str, Any], str]]) -> None:
    """Register one variant per row ``name: (architecture kwargs, one-line description)`` of `table`.

    Each variant is an entry point ``name(pretrained=False, **kwargs)`` that builds
    ``cls(**architecture, **kwargs)`` (so `kwargs` override the architecture). It is a module-level
    attribute of ``cls.__module__`` with ``__name__``/``__qualname__`` `name` and the description as
    docstring, and :func:`register_model` records it here and in timm.
    """
    module = sys.modules[cls.__module__]
    for name, (arch, doc) in table.items():
        fn = _entry_point(cls, name, dict(arch), doc)
        setattr(module, name, fn)
        register_model(fn)


def list_models() -> List[str]:
    return sorted(_VARIANTS)


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered variant `name`; `kwargs` override its constructor arguments."""
    if name not in _VARIANTS:
        raise _unknown('model', name, list_models())
    return _VARIANTS[name](**kwargs)


def register_model_type(*names: str) -> Callable:
    """Decorator: ``fn(cfg) -> nn.Module`` builds the model for these ``MODEL.TYPE`` values."""
    def wrap(fn):
        for name in names:
            if name in _MODEL_TYPES:
                raise ValueError(f'MODEL.TYPE {name!r} is registered twice')
            _MODEL_TYPES[name] = fn
        return fn
    return wrap


def register_model_types(builder: Callable[..., nn.Module], table: Mapping[str, Mapping[str, Any]]) -> None:
    """Register ``cfg -> builder(cfg, **fixed)`` for each row ``MODEL.TYPE name: fixed kwargs`` of `table`
    (the fixed kwargs are what the type name decides, e.g. the depths of a size)."""
    for name, fixed in table.items():
        register_model_type(name)(functools.update_wrapper(functools.partial(builder, **fixed), builder))


def common_cfg_kwargs(cfg) -> Dict[str, Any]:
    """Constructor arguments every MODEL.TYPE builder reads from the config: image size, classes,
    dropout and stochastic-depth rates, gradient checkpointing."""
    return dict(
        img_size=cfg.DATA.IMG_SIZE, num_classes=cfg.MODEL.NUM_CLASSES, drop_rate=cfg.MODEL.DROP_RATE,
        drop_path_rate=cfg.MODEL.DROP_PATH_RATE, use_checkpoint=cfg.TRAIN.USE_CHECKPOINT)


def la_cfg_kwargs(cfg) -> Dict[str, Any]:
    """The MODEL.LA keys every FLatten builder passes on: the block letters (ATTN_TYPE), the attention
    kind of the L blocks (LINEAR_KIND), the focusing power and the DWC kernel. The softmax baselines
    ignore MODEL.LA."""
    la = cfg.MODEL.LA
    return dict(attn_type=la.ATTN_TYPE, linear_kind=la.LINEAR_KIND, focusing_factor=la.FOCUSING_FACTOR,
                kernel_size=la.KERNEL_SIZE)


def list_model_types() -> List[str]:
    return sorted(_MODEL_TYPES)


def get_model_type(name: str) -> Callable:
    if name not in _MODEL_TYPES:
        raise _unknown('MODEL.TYPE', name, list_model_types())
    return _MODEL_TYPES[name]
