"""CSwin's attention kinds: stripe windows, LePE, and projections owned by the block
(docs/numerics.md, "CSwin stripes and LePE").

In CSwin the ``qkv`` and ``proj`` Linears belong to the block (official state dict), so these kinds
set ``input_is_qkv = True``: ``forward(qkv: (3, B, H·W, C)) -> (B, H·W, C)`` with Q, K and V the
three C-channel projections of one branch, tokens row-major on the stage map ``grid_size = (H, W)``.
The stripe is ``options.window = (H_sp, W_sp)`` (None: the whole map). Tokens are partitioned into
``H_sp×W_sp`` windows (:func:`stripe_partition`, the official ``img2windows``), attention runs in
each window, and :func:`stripe_reverse` (``windows2img``) puts the result back on the map.

* ``cswin_focused_linear`` (:class:`CSwinFocusedLinearAttention`): ``O + DWC(V) + LePE(V)``, with
  ``O`` the focused linear attention of the window, ``DWC`` the rank-restoration conv (one d-channel
  kernel set shared by the heads) and ``LePE`` CSwin's per-channel depthwise 3×3 ``get_v``. No proj.
* ``cswin_lepe_softmax`` (:class:`LePEAttention`): ``softmax(q kᵀ·d^-½) v + LePE(V)`` per window.

**Stripe windows in the focused kind (a deliberate extension of the official code).** The official
module builds its positional encoding and LePE per window but then runs the kernel sums, the
normaliser and the DWC over all H·W tokens of the map, which only type-checks when the window is the
whole map; with an LA split smaller than the stage resolution it crashes mid-forward
(docs/differences.md, "CSwin with an LA split smaller than the map"). Here every step runs
independently per stripe window: the key sums Σφ(K)ᵀV and the normaliser mean over the window's
tokens, the DWC on the ``H_sp×W_sp`` window grid with zero padding at the window border (like LePE
and like Swin's windowed FLA), and a positional encoding of the window shape ``(1, H_sp·W_sp, C)``
shared by all windows. This is the same windowed semantics as the softmax kind, the O(N²) form
restricted to same-window pairs, and it reduces exactly to the official global computation when the
window is the whole map, as in every official config (golden ``module_cswin_fla_global`` and
``cswin_mini_LLSS``).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..grid import GridSpec
from .core import focused_linear_attention, make_dwc, rank_restore_dwc, upcast
from .registry import AttentionOptions, register_attention

__all__ = ['CSwinFocusedLinearAttention', 'LePEAttention', 'stripe_partition', 'stripe_reverse', 'resolve_window']

# LePE: CSwin's locally-enhanced positional encoding, a depthwise 3×3 conv on V inside each window.
LEPE_KERNEL_SIZE = 3


def resolve_window(grid_size: Tuple[int, int], window: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    """The stripe ``(H_sp, W_sp)`` of `window` on the ``grid_size`` map (None: the whole map).

    Raises ValueError naming both sizes when the window does not tile the map, so a bad split is
    reported when the module is built, never mid-forward.
    """
    H, W = grid_size
    if window is None:
        return H, W
    H_sp, W_sp = window
    if (H_sp < 1) or (W_sp < 1) or (H % H_sp) or (W % W_sp):
        raise ValueError(f'CSwin stripe window {H_sp}x{W_sp} does not tile the {H}x{W} stage map')
    return H_sp, W_sp


def stripe_partition(x: torch.Tensor, grid_size: Tuple[int, int], window: Tuple[int, int]) -> torch.Tensor:
    """(B, H·W, C) -> (B·nW, H_sp·W_sp, C): windows batch-major, then window-row, then window-column;
    tokens row-major inside a window (official ``img2windows``)."""
    B, _, C = x.shape
    H, W = grid_size
    H_sp, W_sp = window
    x = x.reshape(B, H // H_sp, H_sp, W // W_sp, W_sp, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H_sp * W_sp, C)


def stripe_reverse(windows: torch.Tensor, grid_size: Tuple[int, int], window: Tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`stripe_partition`: (B·nW, H_sp·W_sp, C) -> (B, H·W, C)."""
    C = windows.shape[-1]
    H, W = grid_size
    H_sp, W_sp = window
    x = windows.reshape(-1, H // H_sp, W // W_sp, H_sp, W_sp, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H * W, C)


def locally_enhanced_pe(get_v: nn.Conv2d, v: torch.Tensor, window: Tuple[int, int]) -> torch.Tensor:
    """LePE(V): `get_v` (depthwise, one kernel per channel) on each window image, zero-padded at the
    window border. v: (B·nW, H_sp·W_sp, C) raw values in window layout; returns the same shape."""
    B_, N, C = v.shape
    image = v.transpose(1, 2).reshape(B_, C, *window)
    return get_v(image).reshape(B_, C, N).transpose(1, 2)


def make_lepe(dim: int) -> nn.Conv2d:
    return nn.Conv2d(dim, dim, LEPE_KERNEL_SIZE, padding=LEPE_KERNEL_SIZE // 2, groups=dim)


@register_attention('cswin_focused_linear')
class CSwinFocusedLinearAttention(nn.Module):
    """FLatten-CSwin's focused linear attention over stripe windows (no qkv, no proj).

    ``Y = phi_p(Q) phi_p(K+P)ᵀ V / Z + DWC(V) + LePE(V)`` per window. State-dict names and order as
    the official module: ``scale`` (1, 1, C), ``positional_encoding`` (1, H_sp·W_sp, C), ``get_v``
    (C, 1, 3, 3), ``dwc`` (d, 1, k, k). ``qkv_bias``, ``attn_drop`` and ``proj_drop`` are accepted for
    the common signature; the projections live in the block and the official module applies no
    dropout.
    """

    input_is_qkv = True

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
        self.window = resolve_window(self.grid_size, options.window)
        self.focusing_factor = options.focusing_factor
        self.fused = True  # the fused implementation; set_fused_attention(model, False) picks the reference
        self.scale = nn.Parameter(torch.zeros(1, 1, dim))
        self.positional_encoding = nn.Parameter(torch.zeros(1, self.window[0] * self.window[1], dim))
        self.get_v = make_lepe(dim)
        self.dwc = make_dwc(dim // num_heads, options.kernel_size)

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv: (3, B, H·W, C) stacked projections; returns (B, H·W, C) in the dtype of `qkv`.

        As in the generic kind, the kernel and the linear-order products run in float32 under
        autocast (the cube of the focused function and the key sums overflow float16), while the
        DWC and LePE convolutions keep the autocast dtype.
        """
        q, k, v = (stripe_partition(t, self.grid_size, self.window) for t in qkv.unbind(0))
        with torch.autocast(device_type=qkv.device.type, enabled=False):
            out = focused_linear_attention(upcast(q), upcast(k), upcast(v), self.scale, self.positional_encoding,
                                           self.num_heads, self.focusing_factor, self.fused)
        out = out + rank_restore_dwc(self.dwc, v, self.num_heads, self.window, self.fused)
        out = out + locally_enhanced_pe(self.get_v, v, self.window)
        return stripe_reverse(out, self.grid_size, self.window).to(qkv.dtype)

    def parameter_grids(self) -> Dict[str, GridSpec]:
        return {'positional_encoding': GridSpec(self.window)}

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, num_heads={self.num_heads}, grid_size={self.grid_size}, window={self.window}, '
                f'p={self.focusing_factor}')


@register_attention('cswin_lepe_softmax')
class LePEAttention(nn.Module):
    """CSwin's softmax attention over stripe windows plus LePE (no qkv, no proj).

    ``softmax(q kᵀ·scale) v + LePE(V)`` per window, with ``scale = options.qk_scale`` or ``d^-½``.
    The only parameters are ``get_v`` (C, 1, 3, 3), as in the official state dict.
    """

    input_is_qkv = True

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
        self.window = resolve_window(self.grid_size, options.window)
        self.head_scale = options.qk_scale or (dim // num_heads) ** -0.5
        self.get_v = make_lepe(dim)
        self.attn_drop = nn.Dropout(attn_drop)

    def forward(self, qkv: torch.Tensor) -> torch.Tensor:
        """qkv: (3, B, H·W, C) stacked projections; returns (B, H·W, C).

        ``scaled_dot_product_attention`` accumulates the logits in float32, so long stripes do not
        overflow float16 under autocast.
        """
        q, k, v = (stripe_partition(t, self.grid_size, self.window) for t in qkv.unbind(0))
        B_, N, C = v.shape
        h = self.num_heads
        heads = [t.reshape(B_, N, h, C // h).transpose(1, 2) for t in (q, k, v)]  # (B_, h, N, d)
        dropout = self.attn_drop.p if self.training else 0.
        out = F.scaled_dot_product_attention(*heads, dropout_p=dropout, scale=self.head_scale)
        out = out.transpose(1, 2).reshape(B_, N, C) + locally_enhanced_pe(self.get_v, v, self.window)
        return stripe_reverse(out, self.grid_size, self.window)

    def extra_repr(self) -> str:
        return f'dim={self.dim}, num_heads={self.num_heads}, grid_size={self.grid_size}, window={self.window}'
