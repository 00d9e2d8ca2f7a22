"""Focused linear attention: the maths of the FLatten paper (section 4), as reference code.

Per head, for N queries, n keys and d channels (x^{**p} is the element-wise power p):

    Sim(Q_i, K_j) = φ_p(Q_i) φ_p(K_j)ᵀ                                       similarity, Eq. (5)
    φ_p(x) = f_p(ReLU(x)),   f_p(x) = ‖x‖ / ‖x^{**p}‖ · x^{**p}       focusing function, Eq. (6)
    O_i = φ(Q_i) (Σ_j φ(K_j)ᵀ V_j) / (φ(Q_i) Σ_j φ(K_j)ᵀ)         linear order, O(N d²), Eq. (4)
    O = φ(Q) φ(K)ᵀ V + DWC(V)                                  rank restoration, Eqs. (10), (12)

f_p keeps ‖x‖ and turns x towards its largest axes, so similar query–key pairs score higher and
dissimilar ones lower (Eqs. 7–8): the sharp maps of softmax at linear cost. φ(Q) φ(K)ᵀ has rank
≤ d; the depthwise conv adds a local map M_DWC that can be full rank (Eq. 11, :func:`dwc_matrix`).

As in the official code: x is first ``(ReLU(x) + ε) / softplus(scale)`` with a learned per-channel
temperature, the norms of f_p span all C channels (before the head split), the keys carry a
positional encoding, Kᵀ and V are pre-scaled by n^-½ and the normaliser uses the key mean.
docs/numerics.md, "Common core", gives every step. Everything here works on whole tensors and is
the specification: the fast paths (:mod:`.fused`, :mod:`.compiled`, chosen in :mod:`.core`) are
tested against it.
"""
from __future__ import annotations

from typing import NamedTuple, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['KERNEL_EPS', 'NORMALIZER_EPS', 'Focused', 'focusing', 'focused_kernel', 'linear_attention',
           'reference_dwc', 'make_dwc', 'dwc_matrix', 'upcast']

# Added to the kernel output (so every entry is > 0) and to the normaliser, as the official code.
KERNEL_EPS = 1e-6
NORMALIZER_EPS = 1e-6


class Focused(NamedTuple):
    """One evaluation of the focusing function on token rows; ``φ_p(x) = c ⊙ u``. The parts are
    kept apart because the fused path moves c onto values and normaliser (docs/numerics.md)."""
    r: torch.Tensor  # (ReLU(x) + eps) / s, s the softplus temperature
    u: torch.Tensor  # r^p
    norm_r: torch.Tensor  # ‖r‖ per token (…, 1)
    norm_u: torch.Tensor  # ‖r^p‖ per token (…, 1)

    @property
    def c(self) -> torch.Tensor:
        """The norm-restoration factor ‖r‖ / ‖r^p‖ of each token."""
        return self.norm_r / self.norm_u


def focusing(x: torch.Tensor, inv_s: torch.Tensor, focusing_factor: int) -> Focused:
    """The focusing function φ_p (Eq. 6), the one definition every path uses (docs/numerics.md,
    "Common core", step 4).

    x: (…, C) projected queries or keys (keys already carry the positional encoding); inv_s: (C,)
    or broadcastable, ``1 / softplus(scale)``. With ``r = (ReLU(x) + eps) / s``,
    ``f_p(r) = ‖r‖ · r^p / ‖r^p‖`` over all C channels of a token: the norms are never per head.
    """
    r = torch.addcmul(KERNEL_EPS * inv_s, F.relu(x), inv_s)  # (ReLU(x) + eps) / s in one pass
    u = r.pow(focusing_factor)
    return Focused(r, u, torch.linalg.vector_norm(r, dim=-1, keepdim=True),
                   torch.linalg.vector_norm(u, dim=-1, keepdim=True))


def focused_kernel(x: torch.Tensor, scale: torch.Tensor, focusing_factor: int) -> torch.Tensor:
    """φ_p(x) for whole tensors: x (B, N, C), scale the (1, 1, C) raw temperature parameter."""
    f = focusing(x, 1 / F.softplus(scale), focusing_factor)
    return f.u * f.c


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Per head ``φ(Q) (φ(K)ᵀ V) / (φ(Q) · mean φ(K))`` in linear order (Eq. 4).

    q: (B, N, C) kernelised queries; k: (B, n, C) kernelised keys; v: (B, n, C) raw values.
    Returns (B, N, C), heads concatenated head-major. Kᵀ and V are both pre-scaled by n^-½ and the
    normaliser uses the key *mean* (official HEAD; docs/numerics.md, "Common core", steps 6–8),
    which keeps the d×d summary and the denominator O(1) in magnitude whatever n is.
    """
    B, N, C = q.shape
    n = k.shape[1]
    head_dim = C // num_heads
    q = q.reshape(B, N, num_heads, head_dim).transpose(1, 2)  # (B, h, N, d)
    k = k.reshape(B, n, num_heads, head_dim).transpose(1, 2)  # (B, h, n, d)
    v = v.reshape(B, n, num_heads, head_dim).transpose(1, 2)  # (B, h, n, d)
    z = 1 / (q @ k.mean(dim=-2, keepdim=True).transpose(-2, -1) + NORMALIZER_EPS)  # (B, h, N, 1)
    kv = (k.transpose(-2, -1) * n ** -0.5) @ (v * n ** -0.5)  # (B, h, d, d)
    x = q @ kv * z
    return x.transpose(1, 2).reshape(B, N, C)


def reference_dwc(dwc: nn.Conv2d, v: torch.Tensor, num_heads: int, grid_size: Tuple[int, int]) -> torch.Tensor:
    """DWC(V) of Eq. (10): one set of d depthwise kernels shared by all heads, heads folded into the
    batch as in the official code (docs/numerics.md, "Common core", step 9).

    v: (B, H·W, C) raw values, tokens row-major on ``grid_size = (H, W)``; dwc: :func:`make_dwc`.
    Returns (B, H·W, C), head-major.
    """
    B, N, C = v.shape
    H, W = grid_size
    head_dim = C // num_heads
    v = v.reshape(B, H, W, num_heads, head_dim).permute(0, 3, 4, 1, 2).reshape(B * num_heads, head_dim, H, W)
    out = dwc(v)
    return out.reshape(B, num_heads, head_dim, N).permute(0, 3, 1, 2).reshape(B, N, C)


def make_dwc(head_dim: int, kernel_size: int) -> nn.Conv2d:
    """The rank-restoration conv: ``head_dim`` depthwise k×k kernels with zero padding k//2."""
    return nn.Conv2d(head_dim, head_dim, kernel_size, padding=kernel_size // 2, groups=head_dim)


def dwc_matrix(weight: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
    """The DWC as per-channel N×N matrices (paper Eq. 11's M_DWC): (d, 1, k, k) -> (d, N, N).

    ``DWC(v)[i, c] = Σ_j M[c, i, j] · v[j, c] + bias[c]`` for tokens row-major on ``grid_size``
    with zero padding, so ``φ(Q) φ(K)ᵀ / Z + M[c]`` is the equivalent full attention map of
    channel c: what its rank is measured on.
    """
    d, _, kh, kw = weight.shape
    H, W = grid_size
    rows, cols = torch.meshgrid(torch.arange(H), torch.arange(W), indexing='ij')
    rows, cols = rows.flatten(), cols.flatten()
    dy = rows[None, :] - rows[:, None] + kh // 2  # (N_i, N_j) kernel row that links token i to j
    dx = cols[None, :] - cols[:, None] + kw // 2
    inside = (dy >= 0) & (dy < kh) & (dx >= 0) & (dx < kw)
    taps = weight[:, 0, dy.clamp(0, kh - 1), dx.clamp(0, kw - 1)]  # (d, N, N)
    return taps * inside.to(weight.dtype)


def upcast(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32; float32 and float64 pass unchanged. The core runs in float32: the
    cube of φ_p and the key sums overflow float16 (docs/numerics.md, "Mixed precision")."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
