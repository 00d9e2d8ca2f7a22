"""Attention kinds of PVT v1/v2: separate ``q`` and ``kv`` projections over a spatially reduced map.

Both kinds attend from the N = H·W tokens of a stage map to n key/value tokens taken from

* the map itself (``sr_ratio = 1``): n = N;
* a stride-``sr`` conv of the map then LN (``sr_ratio > 1``): n = (H/sr)·(W/sr);
* PVTv2's "linear" mode: ``GELU(LN(Conv1x1(AdaptiveAvgPool2d(7)(map))))``: n = 49.

``pvt_focused_linear`` is FLatten-PVT's focused linear attention (docs/numerics.md, "PVT v1 key/value
reduction" and "PVT v2 and linear mode"), ``pvt_softmax`` PVT's spatial-reduction softmax attention.
State-dict names and order are the official ones:
``[scale, positional_encoding,] q, kv, proj, [sr, norm | sr, norm], [dwc]``.
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..grid import GridSpec
from .core import focused_linear_attention, make_dwc, rank_restore_dwc, upcast
from .registry import AttentionOptions, register_attention

__all__ = ['PvtFocusedLinearAttention', 'SpatialReductionAttention', 'LINEAR_POOL_SIZE', 'resample_tokens']

# PVTv2 linear mode pools the map to a fixed 7×7 grid of key/value tokens, whatever the stage.
LINEAR_POOL_SIZE = 7


def resample_tokens(x: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """1-D linear interpolation along the flattened token axis: (B, n, C) -> (B, num_tokens, C).

    Each channel's length-n sequence is resampled independently (``align_corners=False``), so rows
    of a small grid are smeared along the row-major sequence rather than upsampled in 2-D. That is
    how the official FLatten-PVT feeds V of a reduced map to the DWC of the full map
    (docs/numerics.md, "PVT v1 key/value reduction").
    """
    if x.shape[1] == num_tokens:
        return x
    return F.interpolate(x.transpose(1, 2), size=num_tokens, mode='linear', align_corners=False).transpose(1, 2)


class _KeyValueReduction(nn.Module):
    """Shared geometry of the PVT kinds: where keys and values come from.

    Subclasses call :meth:`_init_reduction` after creating ``q``, ``kv`` and ``proj``, so that
    ``sr``/``norm`` (and ``pool``/``act``) follow them in the state dict as in the official code.
    """

    def _init_reduction(self, dim: int, grid_size: Tuple[int, int], options: AttentionOptions) -> None:
        H, W = grid_size
        self.grid_size = (H, W)
        self.sr_ratio = options.sr_ratio
        self.linear = options.linear
        if self.sr_ratio < 1:
            raise ValueError(f'PVT attention: sr_ratio must be >= 1, got {self.sr_ratio}')
        if self.linear:
            self.pool = nn.AdaptiveAvgPool2d(LINEAR_POOL_SIZE)
            self.sr = nn.Conv2d(dim, dim, kernel_size=1, stride=1)
            self.norm = nn.LayerNorm(dim)
            self.act = nn.GELU()
            self.kv_grid = (LINEAR_POOL_SIZE, LINEAR_POOL_SIZE)
        elif self.sr_ratio > 1:
            # a map the stride does not divide loses its last rows/columns, as in the original PVT
            self.sr = nn.Conv2d(dim, dim, kernel_size=self.sr_ratio, stride=self.sr_ratio)
            self.norm = nn.LayerNorm(dim)
            self.kv_grid = (H // self.sr_ratio, W // self.sr_ratio)
        else:
            self.kv_grid = (H, W)
        self.num_kv_tokens = self.kv_grid[0] * self.kv_grid[1]

    def _key_value_input(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, N, C) tokens of the ``grid_size`` map -> (B, n, C), the input of ``kv``."""
        if (not self.linear) and (self.sr_ratio == 1):
            return x
        B, N, C = x.shape
        H, W = self.grid_size
        image = x.transpose(1, 2).reshape(B, C, H, W)
        if self.linear:
            return self.act(self.norm(self.sr(self.pool(image)).flatten(2).transpose(1, 2)))
        return self.norm(self.sr(image).flatten(2).transpose(1, 2))

    def extra_repr(self) -> str:
        return (f'num_heads={self.num_heads}, grid_size={self.grid_size}, sr_ratio={self.sr_ratio}, '
                f'linear={self.linear}, num_kv_tokens={self.num_kv_tokens}')


@register_attention('pvt_focused_linear')
class PvtFocusedLinearAttention(_KeyValueReduction):
    """FLatten-PVT's focused linear attention (docs/numerics.md, "PVT v1 key/value reduction" and
    "PVT v2 and linear mode").

    ``Y = proj(phi_p(Q) phi_p(K+P)ᵀ V / Z + DWC(V↑))`` with Q from all N tokens and K, V from the n
    reduced tokens. ``positional_encoding`` is (1, n, C): one vector per key token, so (1, 49, C) in
    linear mode (the official code sizes it ``N // sr²`` there too and crashes unless that is 49).
    ``V↑`` is V resampled from n to N tokens by :func:`resample_tokens` (V itself when n = N), and
    the DWC runs on the H×W map. The normaliser and the n^-½ factors use the key count n.

    ``attn_drop`` and ``mask`` are accepted for the common signature and ignored, as officially.
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
        H, W = grid_size
        if (not options.linear) and (options.sr_ratio > 1) and ((H % options.sr_ratio) or (W % options.sr_ratio)):
            # the positional encoding is one vector per reduced cell: refuse to drop map borders
            raise ValueError(
                f'PVT focused linear attention: grid {H}x{W} is not divisible by the spatial-reduction ratio '
                f'{options.sr_ratio}')
        self.dim = dim
        self.num_heads = num_heads
        self.focusing_factor = options.focusing_factor
        self.fused = True  # the fused implementation; set_fused_attention(model, False) picks the reference
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._init_reduction(dim, grid_size, options)
        self.dwc = make_dwc(dim // num_heads, options.kernel_size)
        self.scale = nn.Parameter(torch.zeros(1, 1, dim))
        self.positional_encoding = nn.Parameter(torch.zeros(1, self.num_kv_tokens, dim))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, N, C) with N = H·W tokens row-major on ``grid_size``; returns (B, N, C).

        The kernel and the linear-order products run in float32 even under autocast (the cube of
        the focused function overflows float16), while projections, the reduction and the DWC keep
        the autocast dtype, exactly as ``generic.FocusedLinearAttention``.
        """
        B, N, C = x.shape
        q = self.q(x)
        k, v = self.kv(self._key_value_input(x)).unflatten(-1, (2, C)).unbind(dim=2)  # (B, n, C) each
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = focused_linear_attention(upcast(q), upcast(k), upcast(v), self.scale, self.positional_encoding,
                                           self.num_heads, self.focusing_factor, self.fused)
        out = out + rank_restore_dwc(self.dwc, resample_tokens(v, N), self.num_heads, self.grid_size, self.fused)
        return self.proj_drop(self.proj(out))

    def parameter_grids(self) -> Dict[str, GridSpec]:
        # one encoding per key token: the reduced (or 7×7 pooled) map
        return {'positional_encoding': GridSpec(self.kv_grid)}

    def extra_repr(self) -> str:
        return f'dim={self.dim}, {super().extra_repr()}, p={self.focusing_factor}'


@register_attention('pvt_softmax')
class SpatialReductionAttention(_KeyValueReduction):
    """PVT's softmax attention over spatially reduced keys/values (PVT v1 SRA, PVTv2 incl. linear).

    ``softmax(q kᵀ · d^-½) v`` per head, then ``proj``; K and V come from the n reduced tokens.
    With ``sr_ratio = 1`` and no linear mode the grid is not used, so the token count may differ
    from ``grid_size`` (PVT v1 prepends a class token in its last stage). A ``sr_ratio`` that does
    not divide the grid floors the reduced map, as the original PVT v1/v2 do at any input size.
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
        self.head_scale = options.qk_scale or (dim // num_heads) ** -0.5
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self._init_reduction(dim, grid_size, options)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, N, C); returns (B, N, C). `mask` is accepted for the common signature and unused.

        Uses ``scaled_dot_product_attention``, whose kernels accumulate the logits in float32
        (an explicit ``q @ kᵀ`` overflows float16 for large inputs); the scale is the official
        ``d^-½`` applied to the logits, equal up to float rounding.
        """
        B, N, C = x.shape
        h = self.num_heads
        q = self.q(x).reshape(B, N, h, C // h).transpose(1, 2)  # (B, h, N, d)
        k, v = self.kv(self._key_value_input(x)).reshape(B, -1, 2, h, C // h).permute(2, 0, 3, 1, 4)  # (B, h, n, d)
        dropout = self.attn_drop.p if self.training else 0.
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout, scale=self.head_scale)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f'dim={self.dim}, {super().extra_repr()}'
