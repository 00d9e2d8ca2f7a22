"""The paper's two attentions as kinds of the one contract (:mod:`.base`): softmax and FLatten.

* ``softmax``: multi-head softmax attention (ViT / DeiT, PVT's spatial-reduction attention,
  CSwin's stripe attention, depending on the layout the backbone sets);
* ``window_softmax``: softmax plus Swin's learned relative position bias over the window;
* ``focused_linear``: FLatten's focused linear attention (its maths: :mod:`.focused`;
  docs/numerics.md, "Common core") with the key positional encoding and the DWC.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from ..grid import GridSpec
from .base import Attention, AttentionGeometry, AttentionOptions
from .core import focused_linear_attention
from .registry import register_attention

__all__ = ['SoftmaxAttention', 'WindowAttention', 'FocusedLinearAttention', 'relative_position_index']


@register_attention('softmax')
class SoftmaxAttention(Attention):
    """``softmax(q kᵀ·scale + mask) v`` per head, with ``scale = options.qk_scale`` or ``d^-½``.

    ``mask``: None, an additive float mask broadcastable to (B, h, N, n), or Swin's (nW, N, N)
    shifted-window mask, one per window of a batch laid out image-major (B·nW windows).

    State-dict names as timm's ``Attention`` / PVT's ``Attention`` / CSwin's ``LePEAttention``
    for the layout in use, so released DeiT, PVT and CSwin weights load unchanged. Without a key
    reduction or stripes the token count need not be H·W (DeiT's and PVT's class token).

    Attention runs through ``scaled_dot_product_attention``, whose kernels accumulate the logits in
    float32: under fp16 autocast an explicit ``q @ kᵀ`` overflows (> 65504) for inputs of magnitude 1e2.
    """
    uses_attn_drop = True

    def init_kind(self, options: AttentionOptions) -> None:
        self.head_scale = options.qk_scale or self.head_dim ** -0.5

    def logit_bias(self, geometry: Optional[AttentionGeometry] = None) -> Optional[torch.Tensor]:
        """An additive (h, N, n) bias of the logits on `geometry` (None: the build one); none for
        plain softmax."""
        return None

    def mix(self, q, k, v, mask, geometry):
        q, k, v = self.heads(q), self.heads(k), self.heads(v)  # (B, h, N|n, d)
        bias = self.logit_bias(geometry)
        if (mask is not None) and (mask.dim() == 3) and torch.compiler.is_exporting():
            # Swin's (nW, N, N) shift mask, one copy per image: ONNX's attention takes 4-D inputs only
            mask = mask.repeat(q.shape[0] // mask.shape[0], 1, 1).unsqueeze(1)
        elif (mask is not None) and (mask.dim() == 3):  # Swin's (nW, N, N) shift mask: windows on their own axis
            num_windows = mask.shape[0]
            q, k, v = (t.view(-1, num_windows, *t.shape[1:]) for t in (q, k, v))
            mask = mask.unsqueeze(1)
        if mask is not None:
            bias = mask if bias is None else bias + mask
        dropout = self.attn_drop.p if self.training else 0.
        bias = None if bias is None else bias.to(q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=dropout, scale=self.head_scale)
        return self.merge_heads(x.reshape(-1, *x.shape[-3:]))


def relative_position_index(grid_size: Tuple[int, int]) -> torch.Tensor:
    """(N, N) int64 index into a ((2H−1)(2W−1), heads) bias table; entry (i, j) encodes
    ``(Δrow + H−1)·(2W−1) + (Δcol + W−1)`` with ``Δ = coord_i − coord_j`` (Swin v1)."""
    H, W = grid_size
    coords = torch.stack(torch.meshgrid(torch.arange(H), torch.arange(W), indexing='ij')).flatten(1)  # (2, N)
    delta = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2)
    return (delta[..., 0] + H - 1) * (2 * W - 1) + (delta[..., 1] + W - 1)


@register_attention('window_softmax')
class WindowAttention(SoftmaxAttention):
    """Swin's softmax attention with a learned relative position bias over the (window) grid.

    ``softmax(q kᵀ·d^-½ + B[index] + mask) v``. State-dict names as Swin v1:
    ``relative_position_bias_table`` ((2H−1)(2W−1), heads), the persistent int64 buffer
    ``relative_position_index`` (N, N), ``qkv``, ``proj``. The bias relates query and key
    positions on one grid, so keys and values cannot be reduced.
    """

    def init_kind(self, options: AttentionOptions) -> None:
        super().init_kind(options)
        if options.sr_ratio > 1 or options.linear:
            raise ValueError('window_softmax attention: its relative position bias needs the keys on the query grid '
                             '(no sr_ratio / linear key reduction)')
        H, W = self.window
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * H - 1) * (2 * W - 1), self.num_heads))
        self.register_buffer('relative_position_index', relative_position_index(self.window))
        trunc_normal_(self.relative_position_bias_table, std=.02)

    def logit_bias(self, geometry: Optional[AttentionGeometry] = None) -> torch.Tensor:
        if (geometry is not None) and (geometry.window != self.window):
            (H, W), (h, w) = self.window, geometry.window
            raise ValueError(f'window_softmax attention: its relative position bias is learned for the {H}x{W} '
                             f'window, got a {h}x{w} one (Swin keeps softmax windows fixed and pads the map)')
        N = self.relative_position_index.shape[0]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return bias.view(N, N, self.num_heads).permute(2, 0, 1)  # (h, N, N)

    def parameter_grids(self) -> Dict[str, GridSpec]:
        H, W = self.window
        return {'relative_position_bias_table': GridSpec((2 * H - 1, 2 * W - 1), layout='table')}


@register_attention('focused_linear')
class FocusedLinearAttention(Attention):
    """FLatten's focused linear attention: the equations and reference code are :mod:`.focused`
    (docs/numerics.md, "Common core", and the per-backbone sections).

    ``Y = proj(phi_p(Q) phi_p(K+P)ᵀ V / Z + DWC(V))`` over the tokens of one grid or window, in
    O(N·d²) per head; K and V may come from a reduced map (PVT), then the normaliser and the n^-½
    factors use the key count n and V is resampled to the N query tokens for the DWC. State-dict
    names as the official modules: ``scale`` (1, 1, C), ``positional_encoding`` (1, n, C), then
    the layout's projections and reduction, ``get_v`` (CSwin), ``dwc``.

    Linear-order attention cannot mask pairs without forming the N×N matrix, so Swin's shift mask
    is ignored, as in the official code; ``attn_drop`` is never applied, as officially.
    """
    uses_positional_encoding = True
    uses_dwc = True
    float32_core = True
    has_compiled_core = True

    def init_kind(self, options: AttentionOptions) -> None:
        self.focusing_factor = options.focusing_factor
        self.scale = nn.Parameter(torch.zeros(1, 1, self.dim))

    def mix(self, q, k, v, mask, geometry):
        return focused_linear_attention(q, k, v, self.scale, self.key_encoding(geometry), self.num_heads,
                                        self.focusing_factor, self.fused, compiled=self.compiled_core)

    def extra_repr(self) -> str:
        return f'{super().extra_repr()}, p={self.focusing_factor}'
