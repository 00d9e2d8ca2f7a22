"""FLatten Transformer models. Importing this package registers every variant here and in timm."""
from . import swin  # noqa: F401  (registers the Swin variants and model types)
from .attention import AttentionOptions, create_attention, list_attention_kinds
from .build import build_model
from .registry import UnknownModelError, create_model, list_model_types, list_models

__all__ = [
    'AttentionOptions', 'create_attention', 'list_attention_kinds', 'build_model', 'UnknownModelError',
    'create_model', 'list_model_types', 'list_models',
]
