"""Attention kinds over one token grid with a fused ``qkv`` projection (Swin windows, DeiT grids)."""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

from ..grid import GridSpec
from .core import focused_linear_attention, make_dwc, rank_restore_dwc, upcast
from .registry import AttentionOptions, register_attention

__all__ = ['FocusedLinearAttention', 'SoftmaxAttention', 'WindowAttention', 'relative_position_index']


@register_attention('focused_linear')
class FocusedLinearAttention(nn.Module):
    """Focused linear attention with a fused qkv projection (FLatten-Swin's module;
    docs/numerics.md, "Swin").

    ``Y = proj(phi_p(Q) phi_p(K+P)ᵀ V / Z + DWC(V))`` over the N = H·W tokens of one grid, in
    O(N·d²) per head. State-dict names as the official module: ``scale`` (1, 1, C) and
    ``positional_encoding`` (1, N, C), then ``qkv``, ``proj``, ``dwc``.

    The ``mask`` argument of shifted Swin windows is accepted and ignored, as in the official
    code (docs/differences.md, "Swin shift mask ignored by focused attention"): a linear-order
    attention cannot mask pairs without forming the N×N matrix.
    ``attn_drop`` is accepted for the common signature; the official module never applies it.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            grid_size: Tuple[int, int],
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            options: AttentionOptions = AttentionOptions(),
    ):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.grid_size = tuple(grid_size)
        self.focusing_factor = options.focusing_factor
        self.fused = True  # the fused implementation; set_fused_attention(model, False) picks the reference
        head_dim = dim // num_heads
        num_tokens = self.grid_size[0] * self.grid_size[1]

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = make_dwc(head_dim, options.kernel_size)
        self.scale = nn.Parameter(torch.zeros(1, 1, dim))
        self.positional_encoding = nn.Parameter(torch.zeros(1, num_tokens, dim))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, N, C) with N = H·W tokens row-major on ``grid_size``; returns (B, N, C).

        The kernel and the linear-order products run in float32 even under autocast: the cube of
        the focused function and the unnormalised sums overflow float16 for inputs of magnitude
        1e2, while the projections and the DWC keep the autocast dtype.
        """
        B, N, C = x.shape
        q, k, v = self.qkv(x).unflatten(-1, (3, C)).unbind(dim=2)
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = focused_linear_attention(upcast(q), upcast(k), upcast(v), self.scale, self.positional_encoding,
                                           self.num_heads, self.focusing_factor, self.fused)
        out = out + rank_restore_dwc(self.dwc, v, self.num_heads, self.grid_size, self.fused)
        return self.proj_drop(self.proj(out))

    def parameter_grids(self) -> Dict[str, GridSpec]:
        return {'positional_encoding': GridSpec(self.grid_size)}

    def extra_repr(self) -> str:
        return f'dim={self.dim}, num_heads={self.num_heads}, grid_size={self.grid_size}, p={self.focusing_factor}'


# ---------------------------------------------------------------------------------------------
# Softmax attention: global (ViT / DeiT) and windowed with relative position bias (Swin)
# ---------------------------------------------------------------------------------------------

@register_attention('softmax')
class SoftmaxAttention(nn.Module):
    """Global multi-head softmax attention without position bias (ViT / DeiT's ``Attention``).

    ``softmax(q kᵀ·d^-½ + mask) v`` over all T tokens of the input, then ``proj``. T need not be
    H·W: DeiT prepends its class token, so ``grid_size`` only records the patch grid. State-dict
    names as timm's ``Attention`` (``qkv``, ``proj``), so released DeiT weights load unchanged.

    Attention runs through ``scaled_dot_product_attention``, whose kernels accumulate the logits in
    float32: under fp16 autocast an explicit ``q @ kᵀ`` overflows (> 65504) for inputs of magnitude 1e2.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            grid_size: Tuple[int, int],
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            options: AttentionOptions = AttentionOptions(),
    ):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.grid_size = tuple(grid_size)
        self.head_scale = options.qk_scale or (dim // num_heads) ** -0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def _heads(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x: (B, T, C) -> q, k, v, each (B, heads, T, d)."""
        B, T, C = x.shape
        return self.qkv(x).reshape(B, T, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4).unbind(0)

    def _attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                attn_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Softmax attention of (…, heads, T, d) tensors with an additive mask, then ``proj``:
        (…, heads, T, d) -> (B, T, C) with the leading dims folded into B."""
        dropout = self.attn_drop.p if self.training else 0.
        mask = None if attn_mask is None else attn_mask.to(q.dtype)
        x = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=dropout, scale=self.head_scale)
        T, d = x.shape[-2:]
        x = x.reshape(-1, self.num_heads, T, d).transpose(1, 2).reshape(-1, T, self.num_heads * d)
        return self.proj_drop(self.proj(x))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, T, C); mask: None or an additive float mask broadcastable to (B, heads, T, T)."""
        q, k, v = self._heads(x)
        return self._attend(q, k, v, mask)

    def extra_repr(self) -> str:
        return f'dim={self.dim}, num_heads={self.num_heads}, grid_size={self.grid_size}'


def relative_position_index(grid_size: Tuple[int, int]) -> torch.Tensor:
    """(N, N) int64 index into a ((2H−1)(2W−1), heads) bias table; entry (i, j) encodes
    ``(Δrow + H−1)·(2W−1) + (Δcol + W−1)`` with ``Δ = coord_i − coord_j`` (Swin v1)."""
    H, W = grid_size
    coords = torch.stack(torch.meshgrid(torch.arange(H), torch.arange(W), indexing='ij')).flatten(1)  # (2, N)
    delta = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2)
    return (delta[..., 0] + H - 1) * (2 * W - 1) + (delta[..., 1] + W - 1)


@register_attention('window_softmax')
class WindowAttention(SoftmaxAttention):
    """Swin's softmax attention over one window with a learned relative position bias.

    ``softmax(q kᵀ·d^-½ + B[index] + mask) v`` then ``proj``. State-dict names as Swin v1:
    ``relative_position_bias_table`` ((2H−1)(2W−1), heads), the persistent int64 buffer
    ``relative_position_index`` (N, N), ``qkv``, ``proj``.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            grid_size: Tuple[int, int],
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            options: AttentionOptions = AttentionOptions(),
    ):
        super().__init__(dim, num_heads, grid_size, qkv_bias, attn_drop, proj_drop, options)
        H, W = self.grid_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * H - 1) * (2 * W - 1), num_heads))
        self.register_buffer('relative_position_index', relative_position_index(self.grid_size))
        trunc_normal_(self.relative_position_bias_table, std=.02)

    def parameter_grids(self) -> Dict[str, GridSpec]:
        H, W = self.grid_size
        return {'relative_position_bias_table': GridSpec((2 * H - 1, 2 * W - 1), layout='table')}

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B·nW, N, C); mask: (nW, N, N) of 0 / −100 for shifted windows, or None."""
        B_, N, _ = x.shape
        q, k, v = self._heads(x)  # (B·nW, h, N, d)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(N, N, self.num_heads).permute(2, 0, 1)  # (h, N, N)
        if mask is None:
            return self._attend(q, k, v, bias.unsqueeze(0))
        num_windows = mask.shape[0]
        # the shift mask differs per window: put windows on their own axis so it broadcasts over B
        q, k, v = (t.view(B_ // num_windows, num_windows, self.num_heads, N, -1) for t in (q, k, v))
        return self._attend(q, k, v, bias.unsqueeze(0) + mask.unsqueeze(1))
