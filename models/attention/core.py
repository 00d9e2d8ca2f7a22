"""Focused linear attention: the shared maths (spec §1.1), used by every focused kind.

``phi_p`` (:func:`focused_kernel`), the linear-order product with its normaliser
(:func:`linear_attention`) and the depthwise rank-restoration conv (:func:`rank_restore_dwc`) are
plain functions, so each backbone's module keeps only its own projections and geometry.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ['KERNEL_EPS', 'NORMALIZER_EPS', 'focused_kernel', 'linear_attention', 'rank_restore_dwc',
           'dwc_matrix', 'make_dwc', 'upcast']

# Added to the kernel output (so every entry is > 0) and to the normaliser, as the official code.
KERNEL_EPS = 1e-6
NORMALIZER_EPS = 1e-6


def focused_kernel(x: torch.Tensor, scale: torch.Tensor, focusing_factor: int) -> torch.Tensor:
    """phi_p(x) = f_p(ReLU(x) + eps) with a learned per-channel temperature.

    x: (B, N, C) projected queries or keys (keys already carry the positional encoding);
    scale: (1, 1, C) raw parameter, applied as ``softplus(scale)``. The focusing function
    ``f_p(r) = ‖r‖ · r^p / ‖r^p‖`` works on the full C channels of each token, before the head
    split: the norms are never per head (spec §1.1 step 4).
    """
    x = F.relu(x) + KERNEL_EPS
    x = x / F.softplus(scale)
    norm = x.norm(dim=-1, keepdim=True)
    x = x ** focusing_factor
    # divide by the new norm first, then multiply by the old one (official operation order)
    return (x / x.norm(dim=-1, keepdim=True)) * norm


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Per-head ``phi(Q) (phi(K)ᵀ V) / (phi(Q) · mean(phi(K)))`` in linear order.

    q: (B, N, C) kernelised queries; k: (B, n, C) kernelised keys; v: (B, n, C) raw values.
    Returns (B, N, C), heads concatenated head-major. Kᵀ and V are both pre-scaled by n^-½ and the
    normaliser uses the key *mean* (official HEAD, spec §1.1 steps 6–8), which keeps the d×d
    summary and the denominator O(1) in magnitude whatever n is.
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


def rank_restore_dwc(dwc: nn.Conv2d, v: torch.Tensor, num_heads: int, grid_size: Tuple[int, int]) -> torch.Tensor:
    """Depthwise conv over the value grid, one kernel set shared by all heads (spec §1.1 step 9).

    v: (B, H·W, C) raw values with tokens row-major on the ``grid_size = (H, W)`` grid;
    dwc: Conv2d(d, d, k, groups=d). Heads are folded into the batch (B·h, d, H, W) so the same d
    kernels serve every head. Returns (B, H·W, C), head-major.
    """
    B, N, C = v.shape
    H, W = grid_size
    head_dim = C // num_heads
    v = v.reshape(B, H, W, num_heads, head_dim).permute(0, 3, 4, 1, 2).reshape(B * num_heads, head_dim, H, W)
    out = dwc(v)
    return out.reshape(B, num_heads, head_dim, N).permute(0, 3, 1, 2).reshape(B, N, C)


def dwc_matrix(weight: torch.Tensor, grid_size: Tuple[int, int]) -> torch.Tensor:
    """The DWC as per-channel N×N matrices (paper Eq. 11's M_DWC): (d, 1, k, k) -> (d, N, N).

    ``DWC(v)[i, c] = Σ_j M[c, i, j] · v[j, c] + bias[c]`` for tokens row-major on ``grid_size``
    with zero padding, so ``phi(Q) phi(K)ᵀ / Z + M[c]`` is the equivalent full attention map of
    channel c.
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
    """float16/bfloat16 -> float32; float32 and float64 pass unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def make_dwc(head_dim: int, kernel_size: int) -> nn.Conv2d:
    """The rank-restoration conv: ``head_dim`` depthwise k×k kernels with zero padding k//2."""
    return nn.Conv2d(head_dim, head_dim, kernel_size, padding=kernel_size // 2, groups=head_dim)
