"""Two registries: model variants (timm-style entry points) and config model types.

* A **variant** is a tiny function ``name(pretrained=False, **kwargs) -> nn.Module`` that fixes an
  architecture (``flatten_swin_tiny_patch4_224``). :func:`register_model` records it here and in
  timm's registry, so ``timm.create_model(name)`` works after ``import models``.
* A **model type** is what ``MODEL.TYPE`` names in a config (``flatten_swin``, ``swin``, ...): a
  function ``(cfg) -> nn.Module`` that reads the architecture keys of the config.
"""
from __future__ import annotations

import difflib
from typing import Callable, Dict, List

import torch.nn as nn
from timm.models import register_model as timm_register_model

__all__ = [
    'UnknownModelError', 'register_model', 'list_models', 'create_model',
    'register_model_type', 'list_model_types', 'get_model_type', 'variant_kwargs',
]

# Arguments timm.create_model passes to every entry point; they describe hub weights, which this
# code base does not download.
_TIMM_FACTORY_KWARGS = ('pretrained_cfg', 'pretrained_cfg_overlay', 'cache_dir')


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


def variant_kwargs(pretrained: bool, kwargs: dict) -> dict:
    """Constructor overrides of a variant entry point, minus timm's factory arguments."""
    if pretrained:
        raise ValueError('no weights are downloaded by this code base: build with pretrained=False and use '
                         'utils.checkpoint.load_pretrained(model, path) with a released checkpoint')
    return {k: v for k, v in kwargs.items() if k not in _TIMM_FACTORY_KWARGS}


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


def list_model_types() -> List[str]:
    return sorted(_MODEL_TYPES)


def get_model_type(name: str) -> Callable:
    if name not in _MODEL_TYPES:
        raise _unknown('MODEL.TYPE', name, list_model_types())
    return _MODEL_TYPES[name]
