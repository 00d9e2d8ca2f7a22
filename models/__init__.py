"""FLatten Transformer models. Importing this package registers every variant here and in timm."""
# each backbone module registers its variants (here and in timm) on import; build maps MODEL.TYPE to them
from . import cswin, deit, pvt, pvt_v2, swin  # noqa: F401
from .attention import AttentionOptions, create_attention, list_attention_kinds
from .build import build_model, list_model_types
from .registry import UnknownModelError, create_model, list_families, list_models

__all__ = [
    'AttentionOptions', 'create_attention', 'list_attention_kinds', 'build_model', 'UnknownModelError',
    'create_model', 'list_families', 'list_model_types', 'list_models',
]
