"""The ablation zoo: the linear attentions the paper compares FLatten with (Tables 3 and 4).

Every kind here takes the generic token signature (``forward(x: (B, H·W, C), mask=None)``, a fused
``qkv`` projection, ``proj``), so Swin windows and DeiT grids can use it for their ``L`` stages
through ``MODEL.LA.LINEAR_KIND`` (see ``config.py``). ``mask`` (Swin's shifted-window mask) is
ignored, as by FLatten's own module: linear-order attention cannot mask pairs.

Table 4's ladder, all with the learned positional encoding added to the keys, as FLatten, so that
the rungs differ only in the kernel and the DWC:

* ``vanilla_linear``: ``φ(x) = ReLU(x) + ε``, no focusing, no DWC;
* ``focused_only``: the focused function ``φ_p`` (temperature, power p, norm restoration), no DWC;
* ``dwc_only``: the ReLU kernel plus the depthwise rank-restoration conv;
* ``focused_linear`` (FLatten itself, :mod:`.generic`): focused function plus DWC.

Table 3's other efficient attentions:

* ``hydra``: Hydra attention, Bolya et al., "Hydra Attention: Efficient Attention with Many Heads",
  ECCV Workshops 2022. As many heads as channels with the cosine-similarity kernel:
  ``out = q̂ ⊙ Σ_j (k̂_j ⊙ v_j)`` with ``q̂, k̂`` L2-normalised over the channels, unnormalised.
* ``efficient``: Efficient attention, Shen et al., "Efficient Attention: Attention with Linear
  Complexities", WACV 2021. Per head, softmax of Q over its d channels and of K over the n tokens:
  ``out = ρ_q(Q) (ρ_k(K)ᵀ V)``; the rows of ``ρ_q(Q) ρ_k(K)ᵀ`` already sum to one.
* ``angular``: linear angular attention, You et al., "Castling-ViT: Compressing Self-Attention via
  Switching Towards Linear-Angular Attention at Vision Transformer Inference", CVPR 2023. The angular
  kernel ``1 − θ(q, k)/π`` in its linear first-order form ``½ + q̂·k̂/π`` (per head, ``q̂, k̂`` unit
  vectors; always in [0.18, 0.82], so the row sums are positive), row-normalised, plus a depthwise
  conv on V as in Castling-ViT.
* ``relu_linear``: EfficientViT's ReLU linear attention, Cai, Gan and Han, "EfficientViT: Enhanced
  linear attention for high-resolution low-computation visual recognition", arXiv:2205.14756, 2022
  (the paper's [2]; published as "EfficientViT: Lightweight Multi-Scale Attention for
  High-Resolution Dense Prediction", ICCV 2023).
  ``ReLU(Q)(ReLU(K)ᵀV) / (ReLU(Q)·ΣReLU(K) + ε)`` per head, on the projected tokens and on a second
  set aggregated from their neighbourhood (a 5×5 depthwise conv then a grouped 1×1 conv of the
  q, k, v maps), the two sets of heads concatenated before ``proj`` (2C → C).
"""
from __future__ import annotations

import math
from typing import Dict, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..grid import GridSpec
from .core import KERNEL_EPS, focused_kernel, linear_attention, make_dwc, rank_restore_dwc, upcast
from .registry import AttentionOptions, register_attention

__all__ = ['LINEAR_KINDS', 'LadderAttention', 'VanillaLinearAttention', 'FocusedOnlyAttention', 'DWCOnlyAttention',
           'HydraAttention', 'EfficientAttention', 'AngularLinearAttention', 'ReLULinearAttention']

RELU_LINEAR_EPS = 1e-15  # EfficientViT's denominator epsilon

# The kinds MODEL.LA.LINEAR_KIND may put in the L stages of Swin and DeiT (FLatten's is the default).
LINEAR_KINDS = ('focused_linear', 'vanilla_linear', 'focused_only', 'dwc_only', 'hydra', 'efficient', 'angular',
                'relu_linear')


class _TokenAttention(nn.Module):
    """Shared skeleton: ``qkv`` projection, the kind's :meth:`attend` in float32, ``proj``."""

    def __init__(self, dim: int, num_heads: int, grid_size: Tuple[int, int], qkv_bias: bool = True,
                 attn_drop: float = 0., proj_drop: float = 0., options: AttentionOptions = AttentionOptions(),
                 proj_in: Optional[int] = None):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.grid_size = tuple(grid_size)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(proj_in or dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """(B, N, C) float32 projections -> (B, N, proj_in) attention output; defined by each kind."""
        raise NotImplementedError(f'{type(self).__name__} does not define attend()')

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, N, C) with N = H·W tokens row-major on ``grid_size``; returns (B, N, C).
        The kernels and sums run in float32 under autocast (their sums overflow float16)."""
        C = x.shape[-1]
        q, k, v = self.qkv(x).unflatten(-1, (3, C)).unbind(dim=2)
        with torch.autocast(device_type=x.device.type, enabled=False):
            out = self.attend(upcast(q), upcast(k), upcast(v))
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f'dim={self.dim}, num_heads={self.num_heads}, grid_size={self.grid_size}'


def _heads(x: torch.Tensor, num_heads: int) -> torch.Tensor:
    """(B, N, C) -> (B, h, N, d)."""
    B, N, C = x.shape
    return x.reshape(B, N, num_heads, C // num_heads).transpose(1, 2)


def _merge(x: torch.Tensor) -> torch.Tensor:
    """(B, h, N, d) -> (B, N, h·d)."""
    B, h, N, d = x.shape
    return x.transpose(1, 2).reshape(B, N, h * d)


# ---------------------------------------------------------------------------------------------
# Table 4: vanilla linear -> + focused function -> + DWC (FLatten is 'focused_linear')
# ---------------------------------------------------------------------------------------------

class LadderAttention(_TokenAttention):
    """Linear attention with the learned key positional encoding, a ReLU or focused kernel, and an
    optional DWC: ``φ(Q) (φ(K+P)ᵀ V) / (φ(Q) · mean φ(K+P)) [+ DWC(V)]``. Subclasses fix the rung."""
    focused = False
    with_dwc = False

    def __init__(self, dim, num_heads, grid_size, qkv_bias=True, attn_drop=0., proj_drop=0.,
                 options: AttentionOptions = AttentionOptions()):
        super().__init__(dim, num_heads, grid_size, qkv_bias, attn_drop, proj_drop, options)
        self.focusing_factor = options.focusing_factor
        self.positional_encoding = nn.Parameter(torch.zeros(1, self.grid_size[0] * self.grid_size[1], dim))
        if self.focused:
            self.scale = nn.Parameter(torch.zeros(1, 1, dim))
        if self.with_dwc:
            self.dwc = make_dwc(dim // num_heads, options.kernel_size)

    def kernel(self, x: torch.Tensor) -> torch.Tensor:
        if self.focused:
            return focused_kernel(x, self.scale, self.focusing_factor)
        return F.relu(x) + KERNEL_EPS

    def attend(self, q, k, v):
        out = linear_attention(self.kernel(q), self.kernel(k + self.positional_encoding), v, self.num_heads)
        if self.with_dwc:
            out = out + rank_restore_dwc(self.dwc, v, self.num_heads, self.grid_size)
        return out

    def parameter_grids(self) -> Dict[str, GridSpec]:
        return {'positional_encoding': GridSpec(self.grid_size)}


@register_attention('vanilla_linear')
class VanillaLinearAttention(LadderAttention):
    """Table 4 baseline: ReLU-kernel linear attention, no focusing, no DWC."""


@register_attention('focused_only')
class FocusedOnlyAttention(LadderAttention):
    """Table 4 middle rung: the focused function without the DWC."""
    focused = True


@register_attention('dwc_only')
class DWCOnlyAttention(LadderAttention):
    """The DWC without the focused function (ReLU kernel + rank restoration)."""
    with_dwc = True


# ---------------------------------------------------------------------------------------------
# Table 3: other efficient attentions
# ---------------------------------------------------------------------------------------------

@register_attention('hydra')
class HydraAttention(_TokenAttention):
    """Hydra attention (Bolya et al. 2022): one head per channel, cosine kernel, O(N·C).

    ``out[i, c] = q̂[i, c] · Σ_j k̂[j, c] v[j, c]`` with ``q̂ = q/‖q‖``, ``k̂ = k/‖k‖`` over the C
    channels. ``num_heads`` only sets the width check: Hydra always uses C heads.
    """

    def attend(self, q, k, v):
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        return q * (k * v).sum(dim=1, keepdim=True)


@register_attention('efficient')
class EfficientAttention(_TokenAttention):
    """Efficient attention (Shen et al. 2021): ``softmax_d(Q) (softmax_n(K)ᵀ V)`` per head."""

    def attend(self, q, k, v):
        q = _heads(q, self.num_heads).softmax(dim=-1)
        k = _heads(k, self.num_heads).softmax(dim=-2)
        return _merge(q @ (k.transpose(-2, -1) @ _heads(v, self.num_heads)))


@register_attention('angular')
class AngularLinearAttention(_TokenAttention):
    """Linear angular attention (Castling-ViT, You et al. 2023) with a depthwise conv on V.

    ``Sim(q, k) = ½ + q̂·k̂/π`` (first-order form of ``1 − arccos(q̂·k̂)/π``), row-normalised:
    ``(½ Σ_j v_j + Q̂ (K̂ᵀ V)/π) / (½ n + Q̂ · Σ_j k̂_j / π) + DWC(V)``.
    """

    def __init__(self, dim, num_heads, grid_size, qkv_bias=True, attn_drop=0., proj_drop=0.,
                 options: AttentionOptions = AttentionOptions()):
        super().__init__(dim, num_heads, grid_size, qkv_bias, attn_drop, proj_drop, options)
        self.dwc = make_dwc(dim // num_heads, options.kernel_size)

    def attend(self, q, k, v):
        n = k.shape[1]
        q = F.normalize(_heads(q, self.num_heads), dim=-1)
        k = F.normalize(_heads(k, self.num_heads), dim=-1)
        vh = _heads(v, self.num_heads)
        num = 0.5 * vh.sum(dim=-2, keepdim=True) + (q @ (k.transpose(-2, -1) @ vh)) / math.pi
        den = 0.5 * n + (q @ k.sum(dim=-2).unsqueeze(-1)) / math.pi
        return _merge(num / den) + rank_restore_dwc(self.dwc, v, self.num_heads, self.grid_size)


@register_attention('relu_linear')
class ReLULinearAttention(_TokenAttention):
    """EfficientViT's multi-scale ReLU linear attention (Cai et al. 2022/2023).

    Heads of the projected tokens and heads of the aggregated tokens (``aggreg``: a 5×5 depthwise
    conv of the q, k, v maps, then a 1×1 conv grouped per head) each compute
    ``ReLU(Q)(ReLU(K)ᵀV) / (ReLU(Q)·ΣReLU(K) + ε)``; ``proj`` maps the 2C concatenation to C.
    """

    def __init__(self, dim, num_heads, grid_size, qkv_bias=True, attn_drop=0., proj_drop=0.,
                 options: AttentionOptions = AttentionOptions()):
        super().__init__(dim, num_heads, grid_size, qkv_bias, attn_drop, proj_drop, options, proj_in=2 * dim)
        self.aggreg = nn.Sequential(
            nn.Conv2d(3 * dim, 3 * dim, 5, padding=2, groups=3 * dim, bias=False),
            nn.Conv2d(3 * dim, 3 * dim, 1, groups=3 * num_heads, bias=False))

    def _relu_linear(self, q, k, v):
        q, k, v = (_heads(t, self.num_heads) for t in (q, k, v))
        q, k = F.relu(q), F.relu(k)
        num = q @ (k.transpose(-2, -1) @ v)
        den = q @ k.sum(dim=-2).unsqueeze(-1)
        return _merge(num / (den + RELU_LINEAR_EPS))

    def attend(self, q, k, v):
        B, N, C = q.shape
        H, W = self.grid_size
        maps = torch.cat([q, k, v], dim=-1).transpose(1, 2).reshape(B, 3 * C, H, W)
        agg = self.aggreg(maps)  # float32: autocast is off inside attend()
        qa, ka, va = agg.reshape(B, 3 * C, N).transpose(1, 2).chunk(3, dim=-1)
        return torch.cat([self._relu_linear(q, k, v), self._relu_linear(qa, ka, va)], dim=-1)
