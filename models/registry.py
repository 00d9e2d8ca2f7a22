"""The model registry: every buildable model is a named variant (a timm-style entry point).

A **variant** is a tiny function ``name(pretrained=False, **kwargs) -> nn.Module`` that fixes an
architecture (``flatten_swin_tiny_patch4_224``). :func:`register_model` records it here and in
timm's registry, so ``timm.create_model(name)`` works after ``import models``. A backbone declares
its variants as a table (name -> architecture and description) that :func:`register_variants`
turns into such functions. They build through timm's ``build_model_with_cfg``, with a
``pretrained_cfg`` (:func:`pretrained_cfg`) and feature extraction by ``forward_intermediates``,
so ``timm.create_model(name, features_only=True, out_indices=...)`` gives the feature maps.
:func:`variant_spec` gives the class and architecture behind a name, and :func:`list_families` the
variants of each backbone family (the module that registered them), so tools and benchmarks list
families from here. A config's ``MODEL.TYPE`` resolves to one of these variants plus constructor
overrides through the table in :mod:`models.build`.
"""
from __future__ import annotations

import difflib
import inspect
import sys
from typing import Any, Callable, Dict, List, Mapping, NamedTuple, Tuple, Type

import torch.nn as nn
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.layers import to_2tuple
from timm.models import build_model_with_cfg, generate_default_cfgs
from timm.models import register_model as timm_register_model

__all__ = [
    'UnknownModelError', 'VariantSpec', 'register_model', 'register_variants', 'list_models', 'list_families',
    'variant_spec', 'create_model', 'unknown_name', 'pretrained_cfg', 'FEATURE_CFG',
]

# The variants whose ImageNet-1k weights the authors released (their key sets: tests/assets/official_state_dicts;
# docs/checkpoints.md): timm knows their pretrained cfg under the tag '.official_in1k' as well
OFFICIAL_IN1K = frozenset({
    'flatten_cswin_tiny_224', 'flatten_cswin_small_224', 'flatten_cswin_base_224', 'flatten_cswin_base_384',
    'flatten_pvt_tiny', 'flatten_pvt_small', 'flatten_pvt_medium', 'flatten_pvt_large',
    'flatten_pvt_v2_b0', 'flatten_pvt_v2_b1', 'flatten_pvt_v2_b2', 'flatten_pvt_v2_b3', 'flatten_pvt_v2_b4',
    'flatten_swin_tiny_patch4_224', 'flatten_swin_small_patch4_224', 'flatten_swin_base_patch4_224',
    'flatten_swin_base_patch4_384'})
OFFICIAL_ORIGIN = dict(origin_url='https://github.com/LeapLabTHU/FLatten-Transformer', paper_ids='arXiv:2308.00442',
                       paper_name='FLatten Transformer: Vision Transformer using Focused Linear Attention',
                       license='mit')

# features_only models: timm's FeatureGetterNet over forward_intermediates, by default the last 4 levels
# (the 4 stages of a hierarchical model, the last 4 blocks of DeiT)
FEATURE_CFG = dict(feature_cls='getter', out_indices=4)


class UnknownModelError(KeyError):
    """A model or model-type name that is not registered; the message lists close matches."""

    def __str__(self) -> str:  # KeyError would quote the whole message
        return str(self.args[0])


class VariantSpec(NamedTuple):
    """What a variant built by :func:`register_variants` is: ``cls(**arch)``, described by `doc`; `family` is
    the short name of the module that registered it (``swin``, ``pvt_v2``, ...)."""
    cls: Type[nn.Module]
    arch: Dict[str, Any]
    doc: str
    family: str

    @property
    def label(self) -> str:
        """The display name, the description's first word: ``FLatten-Swin-T``, ``Swin-T`` (of ``Swin-T baseline``)."""
        return self.doc.split()[0].rstrip(':.,')


_VARIANTS: Dict[str, Callable[..., nn.Module]] = {}
_SPECS: Dict[str, VariantSpec] = {}


def unknown_name(what: str, name: str, known: List[str]) -> UnknownModelError:
    """The error for an unregistered `name` of kind `what` (``'model'``, ``'MODEL.TYPE'``), listing the
    close matches among `known` first."""
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
    ``head``) and its classes (1000, or `arch`'s ``num_classes``: timm keeps a pretrained head only when
    they match). ``fixed_input_size`` is False: every model runs at any size."""
    size = to_2tuple(arch.get('img_size', 224))
    return dict(
        input_size=(3, *size), mean=IMAGENET_DEFAULT_MEAN, std=IMAGENET_DEFAULT_STD,
        crop_pct=0.875 if max(size) <= 224 else 1.0, interpolation='bicubic', first_conv=cls.first_conv,
        classifier='head', num_classes=arch.get('num_classes', 1000), fixed_input_size=False)


def _names_weights(cfg: Any, overlay: Any) -> bool:
    """Does a pretrained cfg (a dict, a timm PretrainedCfg, or the tag of a registered one, which names none) or
    its overlay say where weights come from?"""
    def value(c: Any, key: str) -> Any:
        return c.get(key) if isinstance(c, Mapping) else getattr(c, key, None)
    sources = ('file', 'url', 'hf_hub_id', 'state_dict')
    return any(value(c, key) for c in (cfg, overlay) if (c is not None) and not isinstance(c, str) for key in sources)


def _entry_point(cls: Type[nn.Module], name: str, arch: Dict[str, Any], doc: str) -> Callable[..., nn.Module]:
    """``name(pretrained=False, **kwargs)``: ``cls(**arch, **kwargs)`` built by timm's
    ``build_model_with_cfg`` (``features_only=True`` and ``out_indices`` among the kwargs give timm's
    feature extractor), named and documented as if it had been written with ``def name`` in the
    module of `cls`. Its ``pretrained_cfg`` describes the model actually built (an ``img_size`` among the
    kwargs sets its input size)."""
    def entry_point(pretrained: bool = False, **kwargs) -> nn.Module:
        # pretrained=True loads what the pretrained cfg points at, as for timm's own models: a local file
        # (pretrained_cfg_overlay=dict(file=...), .safetensors or .pth) or a hub folder; no cfg registered
        # here names a download, so nothing is fetched unless the caller says where from
        cfg = kwargs.pop('pretrained_cfg', None) or pretrained_cfg(cls, {**arch, **kwargs})
        if pretrained and not _names_weights(cfg, kwargs.get('pretrained_cfg_overlay')):
            raise ValueError(f'{name}: pretrained=True needs weights to load, and this code base names no download: '
                             f'pass pretrained_cfg_overlay=dict(file=PATH) (a .safetensors or .pth file), create '
                             f"'local-dir:FOLDER' (python -m tools.export_weights writes one), or build with "
                             f'pretrained=False and call utils.checkpoint.load_pretrained(model, PATH)')
        model = build_model_with_cfg(cls, name, pretrained=pretrained, pretrained_cfg=cfg,
                                     feature_cfg=dict(FEATURE_CFG), **{**arch, **kwargs})
        if not kwargs.get('features_only'):  # the constructor arguments, for Backbone.set_input_size
            accepted = inspect.signature(cls).parameters
            model.build_args = {key: value for key, value in {**arch, **kwargs}.items() if key in accepted}
        return model

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
    docstring, and :func:`register_model` records it here and in timm, with its pretrained cfg
    (``timm.models.get_pretrained_cfg(name)``; tagged ``.official_in1k`` for the variants of
    :data:`OFFICIAL_IN1K`). No cfg names a download: timm lists none of them in ``list_pretrained()``.
    """
    module = sys.modules[cls.__module__]
    if not hasattr(module, 'default_cfgs'):
        module.default_cfgs = {}  # what timm's register_model reads the pretrained cfgs from
    for name, (arch, doc) in table.items():
        fn = _entry_point(cls, name, dict(arch), doc)
        setattr(module, name, fn)
        cfg = pretrained_cfg(cls, arch)
        key = f'{name}.official_in1k' if name in OFFICIAL_IN1K else name
        module.default_cfgs.update(generate_default_cfgs({key: {**cfg, **OFFICIAL_ORIGIN} if name in OFFICIAL_IN1K
                                                           else cfg}))
        register_model(fn)
        _SPECS[name] = VariantSpec(cls, dict(arch), doc, cls.__module__.rsplit('.', 1)[-1])


def list_models() -> List[str]:
    return sorted(_VARIANTS)


def list_families() -> Dict[str, List[str]]:
    """Family (``cswin``, ``deit``, ``pvt``, ``pvt_v2``, ``swin``: the module that registered it) -> its
    variant names in the order they were registered. Every FLatten name starts with ``flatten_`` and
    every softmax baseline's with ``softmax_``; within each the smallest model comes first."""
    families: Dict[str, List[str]] = {}
    for name, spec in _SPECS.items():
        families.setdefault(spec.family, []).append(name)
    return families


def variant_spec(name: str) -> VariantSpec:
    if name not in _SPECS:
        raise unknown_name('model', name, list_models())
    return _SPECS[name]


def create_model(name: str, **kwargs) -> nn.Module:
    """Build the registered variant `name`; `kwargs` override its constructor arguments."""
    if name not in _VARIANTS:
        raise unknown_name('model', name, list_models())
    return _VARIANTS[name](**kwargs)
