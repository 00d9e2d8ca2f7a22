"""The ablation zoo: the linear attentions the paper compares FLatten with (Tables 3 and 4).

Every kind here is an :class:`~.base.Attention` that defines only :meth:`mix` (and declares the
extras it needs), so every backbone can use it for its ``L`` stages through ``MODEL.LA.LINEAR_KIND``
(see ``config.py``), with that backbone's projections, key/value reduction and stripe windows.
``mask`` (Swin's shifted-window mask) is ignored, as by FLatten's own module: linear-order
attention cannot mask pairs.

Table 4's ladder, all with the learned positional encoding added to the keys, as FLatten, so that
the rungs differ only in the kernel and the DWC:

* ``vanilla_linear``: ``φ(x) = ReLU(x) + ε``, no focusing, no DWC;
* ``focused_only``: the focused function ``φ_p`` (temperature, power p, norm restoration), no DWC;
* ``dwc_only``: the ReLU kernel plus the depthwise rank-restoration conv;
* ``focused_linear`` (FLatten itself, :mod:`.kinds`): focused function plus DWC.

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
  q, k, v maps, each on its own grid), the two sets of heads concatenated before ``proj`` (2C → C).
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Attention, AttentionOptions
from .focused import KERNEL_EPS, linear_attention
from .kinds import FocusedLinearAttention
from .registry import LINEAR_KINDS, register_attention

__all__ = ['LINEAR_KINDS', 'VanillaLinearAttention', 'FocusedOnlyAttention', 'DWCOnlyAttention', 'HydraAttention',
           'EfficientAttention', 'AngularLinearAttention', 'ReLULinearAttention']

RELU_LINEAR_EPS = 1e-15  # EfficientViT's denominator epsilon


# ---------------------------------------------------------------------------------------------
# Table 4: vanilla linear -> + focused function -> + DWC (FLatten is 'focused_linear')
# ---------------------------------------------------------------------------------------------

@register_attention('vanilla_linear')
class VanillaLinearAttention(Attention):
    """Table 4 baseline: ``φ(Q) (φ(K+P)ᵀ V) / (φ(Q) · mean φ(K+P))`` with ``φ(x) = ReLU(x) + ε``,
    no focusing, no DWC (the key positional encoding kept, as in FLatten)."""
    uses_positional_encoding = True
    float32_core = True

    def mix(self, q, k, v, mask, geometry):
        kernel = F.relu(q) + KERNEL_EPS, F.relu(k + self.key_encoding(geometry)) + KERNEL_EPS
        return linear_attention(*kernel, v, self.num_heads)


@register_attention('focused_only')
class FocusedOnlyAttention(FocusedLinearAttention):
    """Table 4 middle rung: FLatten's focused function without the DWC."""
    uses_dwc = False


@register_attention('dwc_only')
class DWCOnlyAttention(VanillaLinearAttention):
    """The DWC without the focused function (ReLU kernel + rank restoration)."""
    uses_dwc = True


# ---------------------------------------------------------------------------------------------
# Table 3: other efficient attentions
# ---------------------------------------------------------------------------------------------

@register_attention('hydra')
class HydraAttention(Attention):
    """Hydra attention (Bolya et al. 2022): one head per channel, cosine kernel, O(N·C).

    ``out[i, c] = q̂[i, c] · Σ_j k̂[j, c] v[j, c]`` with ``q̂ = q/‖q‖``, ``k̂ = k/‖k‖`` over the C
    channels. ``num_heads`` only sets the width check: Hydra always uses C heads.
    """
    float32_core = True

    def mix(self, q, k, v, mask, geometry):
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        return q * (k * v).sum(dim=1, keepdim=True)


@register_attention('efficient')
class EfficientAttention(Attention):
    """Efficient attention (Shen et al. 2021): ``softmax_d(Q) (softmax_n(K)ᵀ V)`` per head."""
    float32_core = True

    def mix(self, q, k, v, mask, geometry):
        q = self.heads(q).softmax(dim=-1)
        k = self.heads(k).softmax(dim=-2)
        return self.merge_heads(q @ (k.transpose(-2, -1) @ self.heads(v)))


@register_attention('angular')
class AngularLinearAttention(Attention):
    """Linear angular attention (Castling-ViT, You et al. 2023) with a depthwise conv on V.

    ``Sim(q, k) = ½ + q̂·k̂/π`` (first-order form of ``1 − arccos(q̂·k̂)/π``), row-normalised:
    ``(½ Σ_j v_j + Q̂ (K̂ᵀ V)/π) / (½ n + Q̂ · Σ_j k̂_j / π) + DWC(V)``.
    """
    uses_dwc = True
    float32_core = True

    def mix(self, q, k, v, mask, geometry):
        n = k.shape[1]
        q, k = F.normalize(self.heads(q), dim=-1), F.normalize(self.heads(k), dim=-1)
        vh = self.heads(v)
        num = 0.5 * vh.sum(dim=-2, keepdim=True) + (q @ (k.transpose(-2, -1) @ vh)) / math.pi
        den = 0.5 * n + (q @ k.sum(dim=-2).unsqueeze(-1)) / math.pi
        return self.merge_heads(num / den)


@register_attention('relu_linear')
class ReLULinearAttention(Attention):
    """EfficientViT's multi-scale ReLU linear attention (Cai et al. 2022/2023).

    Heads of the projected tokens and heads of the aggregated tokens (``aggreg``: a 5×5 depthwise
    conv of the q, k, v maps, then a 1×1 conv grouped per head) each compute
    ``ReLU(Q)(ReLU(K)ᵀV) / (ReLU(Q)·ΣReLU(K) + ε)``; ``proj`` maps the 2C concatenation to C.
    The aggregation never mixes q, k and v channels, so each map is convolved on its own grid
    (the query grid for q; the key grid, reduced in PVT, for k and v).
    """
    float32_core = True
    output_factor = 2

    def init_kind_modules(self, options: AttentionOptions) -> None:
        dim = 3 * self.dim
        self.aggreg = nn.Sequential(nn.Conv2d(dim, dim, 5, padding=2, groups=dim, bias=False),
                                    nn.Conv2d(dim, dim, 1, groups=3 * self.num_heads, bias=False))

    def _relu_linear(self, q, k, v):
        q, k, v = F.relu(self.heads(q)), F.relu(self.heads(k)), self.heads(v)
        num = q @ (k.transpose(-2, -1) @ v)
        den = q @ k.sum(dim=-2).unsqueeze(-1)
        return self.merge_heads(num / (den + RELU_LINEAR_EPS))

    def _aggregate(self, x: torch.Tensor, part: int, grid) -> torch.Tensor:
        """`aggreg` on channel block `part` (0: q, 1: k, 2: v) of its input, for x (B, n, C) on `grid`."""
        depthwise, pointwise = self.aggreg
        rows = slice(part * self.dim, (part + 1) * self.dim)
        image = x.transpose(1, 2).reshape(x.shape[0], self.dim, *grid)  # float32: autocast is off in mix()
        image = F.conv2d(image, depthwise.weight[rows], padding=2, groups=self.dim)
        image = F.conv2d(image, pointwise.weight[rows], groups=self.num_heads)
        return image.flatten(2).transpose(1, 2)

    def mix(self, q, k, v, mask, geometry):
        aggregated = [self._aggregate(t, i, grid) for i, (t, grid) in
                      enumerate(((q, geometry.window), (k, geometry.key_grid), (v, geometry.key_grid)))]
        return torch.cat([self._relu_linear(q, k, v), self._relu_linear(*aggregated)], dim=-1)
