"""``build_model(cfg)``: the config's MODEL.TYPE looked up in the model-type registry."""
from __future__ import annotations

import torch.nn as nn

from .registry import get_model_type

__all__ = ['build_model']


def build_model(cfg) -> nn.Module:
    """Build the model described by `cfg` (``MODEL.TYPE`` plus its architecture keys).

    Raises :class:`models.registry.UnknownModelError` listing the known types (closest first)
    when ``MODEL.TYPE`` is not registered, and ValueError naming the offending key when the
    architecture keys do not fit together (e.g. an image size the windows cannot tile).
    """
    return get_model_type(cfg.MODEL.TYPE)(cfg)
