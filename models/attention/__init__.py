"""Attention kinds, plugged into backbone blocks by name.

* :mod:`.registry`: ``create_attention(kind, ...)``, ``AttentionOptions``, the ATTN_TYPE grammar;
* :mod:`.core`: the focused-linear-attention maths shared by every focused kind;
* :mod:`.generic`: kinds with a fused ``qkv`` over one token grid (Swin windows, DeiT grids);
* :mod:`.pvt`: PVT's kinds, with separate ``q`` / ``kv`` and optional key/value reduction;
* :mod:`.cswin`: CSwin's kinds, which take the block's stacked projections and add LePE;
* :mod:`.zoo`: the ablation zoo (Tables 3–4): vanilla linear, focused only, DWC only, Hydra,
  Efficient, linear angular and EfficientViT's ReLU linear attention.

Importing this package registers every kind.
"""
from . import cswin, generic, pvt, zoo  # noqa: F401  (each module registers its kinds on import)
from .core import (
    KERNEL_EPS,
    NORMALIZER_EPS,
    dwc_matrix,
    focused_kernel,
    focused_linear_attention,
    linear_attention,
    make_dwc,
    rank_restore_dwc,
    set_fused_attention,
    upcast,
)
from .generic import FocusedLinearAttention, SoftmaxAttention, WindowAttention, relative_position_index
from .registry import (
    AttentionOptions,
    block_kinds,
    create_attention,
    list_attention_kinds,
    parse_attn_type,
    register_attention,
)
from .zoo import LINEAR_KINDS

__all__ = [
    'AttentionOptions', 'register_attention', 'create_attention', 'list_attention_kinds', 'parse_attn_type',
    'block_kinds', 'KERNEL_EPS', 'NORMALIZER_EPS', 'focused_kernel', 'linear_attention', 'focused_linear_attention',
    'rank_restore_dwc', 'dwc_matrix', 'make_dwc', 'upcast', 'set_fused_attention', 'FocusedLinearAttention',
    'WindowAttention', 'SoftmaxAttention', 'relative_position_index', 'LINEAR_KINDS',
]
