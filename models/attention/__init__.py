"""Attention kinds, plugged into backbone blocks by name.

* :mod:`.base`: the one contract, :class:`Attention` (projections, key/value reduction, stripe
  windows, positional encoding, DWC and LePE, shared by every kind) and ``AttentionOptions``;
* :mod:`.registry`: ``create_attention(kind, ...)`` and the ATTN_TYPE grammar;
* :mod:`.focused`: the focused-linear-attention maths (the paper's equations and reference code;
  read it first); :mod:`.core` picks its implementation per call: that reference, the chunked
  :mod:`.fused` path or the :mod:`.compiled` one;
* :mod:`.kinds`: softmax, Swin's window softmax and FLatten's focused linear attention;
* :mod:`.zoo`: the ablation zoo (Tables 3–4): vanilla linear, focused only, DWC only, Hydra,
  Efficient, linear angular and EfficientViT's ReLU linear attention.

Importing this package registers every kind.
"""
from . import kinds, zoo  # noqa: F401  (each module registers its kinds on import)
from .base import (
    LINEAR_POOL_SIZE,
    PROJECTIONS,
    Attention,
    AttentionGeometry,
    AttentionOptions,
    focused_modules,
    resample_tokens,
    resolve_window,
    set_compiled_core,
    set_fused_attention,
    stripe_partition,
    stripe_reverse,
)
from .core import focused_linear_attention, rank_restore_dwc
from .focused import (
    KERNEL_EPS,
    NORMALIZER_EPS,
    dwc_matrix,
    focused_kernel,
    focusing,
    linear_attention,
    make_dwc,
    upcast,
)
from .kinds import FocusedLinearAttention, SoftmaxAttention, WindowAttention, relative_position_index
from .registry import (
    LINEAR_KINDS,
    block_kinds,
    create_attention,
    letter_kinds,
    list_attention_kinds,
    parse_attn_type,
    register_attention,
)

__all__ = [
    'Attention', 'AttentionGeometry', 'AttentionOptions', 'PROJECTIONS', 'LINEAR_POOL_SIZE', 'register_attention',
    'create_attention',
    'list_attention_kinds', 'parse_attn_type', 'block_kinds', 'letter_kinds', 'KERNEL_EPS', 'NORMALIZER_EPS',
    'focusing', 'focused_kernel', 'linear_attention', 'focused_linear_attention', 'rank_restore_dwc', 'dwc_matrix',
    'make_dwc', 'upcast', 'set_fused_attention', 'set_compiled_core', 'resample_tokens', 'resolve_window',
    'focused_modules', 'stripe_partition', 'stripe_reverse', 'FocusedLinearAttention', 'WindowAttention',
    'SoftmaxAttention', 'relative_position_index', 'LINEAR_KINDS',
]
