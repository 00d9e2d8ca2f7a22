"""Focused linear attention: the shared maths (spec §1.1), used by every focused kind.

Two implementations of the same function, selected per module by its ``fused`` flag:

* the **reference** follows the official operation order step by step (:func:`focused_kernel`,
  :func:`linear_attention`, the DWC with heads folded into the batch); it is the one the golden
  files were checked against and stays for tests;
* the **fused** path (:func:`focused_linear_attention` with ``fused=True``, the default) computes
  the same quantities with fewer and cheaper passes: it works in cache-sized chunks instead of on
  whole (B, N, C) activations; the temperature and epsilon are one ``addcmul``; the
  norm-restoration factors of φ(Q) and φ(K) and the n^-½·n^-½ pre-scales become per-token scalars
  applied to the value rows and the final normaliser instead of to whole tensors; the normaliser
  rides along as an extra column of KᵀV; heads are sliced instead of transposed; and the DWC runs
  as one grouped conv on the channels-last view of V (its d kernels repeated per head) instead of
  through two permuted copies.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

__all__ = ['KERNEL_EPS', 'NORMALIZER_EPS', 'focused_kernel', 'linear_attention', 'focused_linear_attention',
           'rank_restore_dwc', 'dwc_matrix', 'make_dwc', 'upcast', 'set_fused_attention']

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


# Elements (floats) per chunk of the fused path: ~1 MB per intermediate, so the element-wise passes
# of a chunk run out of cache instead of streaming whole (B, N, C) activations through DRAM.
FUSED_CHUNK_ELEMENTS = 1 << 18


def _focused_rows(x: torch.Tensor, inv_s: torch.Tensor, focusing_factor: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """(r^p, c) with r = (ReLU(x) + eps) / s and c = ‖r‖ / ‖r^p‖ per token, so phi_p(x) = c ⊙ r^p."""
    r = torch.addcmul(KERNEL_EPS * inv_s, F.relu(x), inv_s)  # (ReLU(x) + eps) / s in one pass
    r_p = r.pow(focusing_factor)
    return r_p, torch.linalg.vector_norm(r, dim=-1, keepdim=True) / torch.linalg.vector_norm(r_p, dim=-1, keepdim=True)


def _recomputed_focused_rows(x: torch.Tensor, inv_s: torch.Tensor,
                             focusing_factor: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """:func:`_focused_rows` saving only its input for the backward (the element-wise chain is rerun)."""
    return torch.utils.checkpoint.checkpoint(_focused_rows, x, inv_s, focusing_factor, use_reentrant=False)


def _chunks(batch: int, tokens: int, channels: int) -> Tuple[int, int]:
    """(batch elements, tokens) per chunk of about FUSED_CHUNK_ELEMENTS floats."""
    if tokens * channels >= FUSED_CHUNK_ELEMENTS:
        return 1, max(1, FUSED_CHUNK_ELEMENTS // channels)
    return max(1, FUSED_CHUNK_ELEMENTS // (tokens * channels)), tokens


def focused_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: torch.Tensor,
                             positional_encoding: torch.Tensor, num_heads: int, focusing_factor: int,
                             fused: bool = True) -> torch.Tensor:
    """``phi_p(Q) (phi_p(K+P)ᵀ V) / (phi_p(Q) · mean phi_p(K+P))`` per head: (B, N, C), head-major.

    q: (B, N, C) projected queries; k: (B, n, C) projected keys; v: (B, n, C) raw values;
    scale: (1, 1, C) temperature parameter; positional_encoding: (1, n, C), added to the keys.
    ``fused=False`` runs the reference; both give the same result up to float rounding (see the
    module docstring).

    Without autograd the fused path works chunk by chunk (a few batch elements, or a slice of tokens
    of one) so that its intermediates stay in cache (under autograd it runs as one chunk): first the
    keys, accumulating per head the d×(d+1) summary
    ``[Σ_j r^p(k_j)ᵀ (c_j/n) v_j | Σ_j (c_j/n) r^p(k_j)ᵀ]`` (the second column block is mean φ(K)),
    then the queries, each chunk written into its slice of the output.
    """
    if not fused:
        k = k + positional_encoding
        return linear_attention(focused_kernel(q, scale, focusing_factor), focused_kernel(k, scale, focusing_factor),
                                v, num_heads)
    B, N, C = q.shape
    n, d = k.shape[1], C // num_heads
    inv_s = 1 / F.softplus(scale)
    out = q.new_empty(B, N, C)
    kernel = _focused_rows
    if torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, scale, positional_encoding)):
        # under autograd, chunking multiplies the saved tensors and the backward's small kernels: one chunk;
        # the kernel's intermediates are recomputed in the backward instead of being saved
        group, key_rows, query_rows = B, n, N
        kernel = _recomputed_focused_rows
    elif torch.compiler.is_compiling():
        # inductor fuses the element-wise chain itself; chunking would only unroll the graph
        group, key_rows, query_rows = B, n, N
    else:
        group, key_rows = _chunks(B, n, C)
        query_rows = _chunks(B, N, C)[1]
    for b0 in range(0, B, group):
        b1 = min(B, b0 + group)
        # keys: phi(k_j) = c_j r^p(k_j); c_j and both n^-½ pre-scales ride on the value rows
        summary = None
        for t0 in range(0, n, key_rows):
            keys = k[b0:b1, t0:t0 + key_rows] + positional_encoding[:, t0:t0 + key_rows]
            rk_p, ck = kernel(keys, inv_s, focusing_factor)
            b, t = rk_p.shape[:2]
            weights = (ck / n).unsqueeze(-1)  # (b, t, 1, 1)
            values = torch.cat([v[b0:b1, t0:t0 + key_rows].view(b, t, num_heads, d) * weights,
                                weights.expand(b, t, num_heads, 1)], dim=-1)  # (b, t, h, d+1)
            part = rk_p.view(b, t, num_heads, d).permute(0, 2, 3, 1) @ values.transpose(1, 2)  # (b, h, d, d+1)
            summary = part if summary is None else summary + part
        # queries: phi(q) = cq r^p(q); (cq·num) / (cq·den + eps) is the reference's num / (phi(q)·k̄ + eps)
        for t0 in range(0, N, query_rows):
            rq_p, cq = kernel(q[b0:b1, t0:t0 + query_rows], inv_s, focusing_factor)
            b, t = rq_p.shape[:2]
            num_den = rq_p.view(b, t, num_heads, d).transpose(1, 2) @ summary  # (b, h, t, d+1)
            cq = cq.unsqueeze(1)  # (b, 1, t, 1)
            result = num_den[..., :d] * (cq / (cq * num_den[..., d:] + NORMALIZER_EPS))
            out[b0:b1, t0:t0 + query_rows].view(b, t, num_heads, d).copy_(result.transpose(1, 2))
    return out


def rank_restore_dwc(dwc: nn.Conv2d, v: torch.Tensor, num_heads: int, grid_size: Tuple[int, int],
                     fused: bool = True) -> torch.Tensor:
    """Depthwise conv over the value grid, one kernel set shared by all heads (spec §1.1 step 9).

    v: (B, H·W, C) raw values with tokens row-major on the ``grid_size = (H, W)`` grid;
    dwc: Conv2d(d, d, k, groups=d). Returns (B, H·W, C), head-major. The reference folds the heads
    into the batch (B·h, d, H, W); the fused path convolves the channels-last view (B, C, H, W) of V
    directly with the d kernels repeated for each head (the same weights, so the same gradient).
    """
    B, N, C = v.shape
    H, W = grid_size
    head_dim = C // num_heads
    if fused:
        image = v.reshape(B, H, W, C).permute(0, 3, 1, 2)
        weight, bias = dwc.weight.repeat(num_heads, 1, 1, 1), dwc.bias.repeat(num_heads)
        out = F.conv2d(image, weight, bias, stride=dwc.stride, padding=dwc.padding, groups=C)
        return out.permute(0, 2, 3, 1).reshape(B, N, C)
    v = v.reshape(B, H, W, num_heads, head_dim).permute(0, 3, 4, 1, 2).reshape(B * num_heads, head_dim, H, W)
    out = dwc(v)
    return out.reshape(B, num_heads, head_dim, N).permute(0, 3, 1, 2).reshape(B, N, C)


def set_fused_attention(model: nn.Module, enabled: bool = True) -> int:
    """Switch every focused-attention module of `model` to the fused (default) or the reference
    implementation; returns how many modules were switched."""
    switched = 0
    for module in model.modules():
        if hasattr(module, 'fused') and isinstance(module.fused, bool):
            module.fused = enabled
            switched += 1
    return switched


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
