"""The fused path of focused linear attention: the maths of :mod:`.focused`, fewer and cheaper passes.

It works in cache-sized chunks instead of on whole (B, N, C) activations; the norm-restoration
factors of φ(Q) and φ(K) and the n^-½·n^-½ pre-scales become per-token scalars applied to the value
rows and the final normaliser instead of to whole tensors; the normaliser rides along as an extra
column of KᵀV; heads are sliced instead of transposed. Under autograd its backward is written by
hand (the same chunks, :func:`~.focused.focusing` re-evaluated from the saved inputs, then its
derivative :func:`_focusing_backward`), so no (B, N, C) intermediate of the core is kept for the
backward. It equals the reference to float rounding (tested in float64); docs/numerics.md,
"Common core" and "Fused and compiled paths".
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

from .focused import NORMALIZER_EPS, Focused, focusing, upcast

__all__ = ['FUSED_CHUNK_ELEMENTS']

# Elements (floats) per chunk of the fused path: ~1 MB per intermediate, so the element-wise passes
# of a chunk run out of cache instead of streaming whole (B, N, C) activations through DRAM.
FUSED_CHUNK_ELEMENTS = 1 << 18


def _focusing_backward(x: torch.Tensor, inv_s: torch.Tensor, focusing_factor: int, f: Focused,
                       grad_u: torch.Tensor, grad_c: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Gradients of :func:`focusing` with respect to x and inv_s, given those of u = r^p and c.

    ``f`` is :func:`focusing` recomputed on the same x. With c = ‖r‖/‖u‖:
    ``dL/dr = p r^(p-1) ⊙ (g_u − g_c ‖r‖/‖u‖³ · u) + g_c / (‖r‖‖u‖) · r``, then
    ``dL/dx = dL/dr ⊙ inv_s ⊙ [x > 0]`` and ``dL/d inv_s = Σ_tokens dL/dr ⊙ r / inv_s`` (r / inv_s
    is ReLU(x) + eps). r ≥ eps/s > 0, so ``r^(p-1) = u / r`` is defined.
    """
    r, u, norm_r, norm_u = f
    # divide by one norm at a time: for an all-negative token r ≈ 1e-6 and ‖u‖³ underflows float32
    g_over_u = grad_c / norm_u
    grad_r = torch.addcmul(grad_u, u, g_over_u * (norm_r / norm_u) / norm_u, value=-1)
    if focusing_factor != 1:
        grad_r.mul_(u / r).mul_(focusing_factor)
    grad_r.addcmul_(r, g_over_u / norm_r)
    grad_inv_s = (grad_r * r).sum(dim=tuple(range(x.dim() - 1))) / inv_s.reshape(-1)
    grad_x = torch.ops.aten.threshold_backward(grad_r.mul_(inv_s), x, 0)  # ReLU's backward: zero where x <= 0
    return grad_x, grad_inv_s


def _chunks(batch: int, tokens: int, channels: int) -> Tuple[int, int]:
    """(batch elements, tokens) per chunk of about FUSED_CHUNK_ELEMENTS floats."""
    if tokens * channels >= FUSED_CHUNK_ELEMENTS:
        return 1, max(1, FUSED_CHUNK_ELEMENTS // channels)
    return max(1, FUSED_CHUNK_ELEMENTS // (tokens * channels)), tokens


def _key_summary(keys: torch.Tensor, values: torch.Tensor, inv_s: torch.Tensor, n: int, num_heads: int,
                 focusing_factor: int) -> torch.Tensor:
    """One key chunk's part of the per-head summary (b, h, d, d+1): keys (b, t, C) with the positional
    encoding added, values (b, t, C), n the number of keys of the whole map. phi(k_j) = c_j r^p(k_j):
    c_j and both n^-½ pre-scales ride on the value rows (and on the normaliser column)."""
    fk = focusing(keys, inv_s, focusing_factor)
    rk_p, ck = fk.u, fk.c
    b, t, C = rk_p.shape
    d = C // num_heads
    weights = (ck / n).unsqueeze(-1)  # (b, t, 1, 1)
    values = torch.cat([values.reshape(b, t, num_heads, d) * weights,
                        weights.expand(b, t, num_heads, 1)], dim=-1)  # (b, t, h, d+1)
    return rk_p.reshape(b, t, num_heads, d).permute(0, 2, 3, 1) @ values.transpose(1, 2)  # (b, h, d, d+1)


def _query_output(queries: torch.Tensor, summary: torch.Tensor, inv_s: torch.Tensor, num_heads: int,
                  focusing_factor: int) -> torch.Tensor:
    """One query chunk's output (b, h, t, d) from queries (b, t, C) and the summary (b, h, d, d+1):
    phi(q) = cq r^p(q), and (cq·num) / (cq·den + eps) is the reference's num / (phi(q)·k̄ + eps)."""
    fq = focusing(queries, inv_s, focusing_factor)
    rq_p, cq = fq.u, fq.c
    b, t, C = rq_p.shape
    d = C // num_heads
    num_den = rq_p.reshape(b, t, num_heads, d).transpose(1, 2) @ summary  # (b, h, t, d+1)
    cq = cq.unsqueeze(1)  # (b, 1, t, 1)
    return num_den[..., :d] * (cq / (cq * num_den[..., d:] + NORMALIZER_EPS))


def _fused_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_s: torch.Tensor,
                   positional_encoding: torch.Tensor, num_heads: int, focusing_factor: int,
                   chunked: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fused forward: (output (B, N, C), per-head summaries (B, h, d, d+1)).

    Chunk by chunk (a few batch elements, or a slice of tokens of one) so that the intermediates
    stay in cache: first the keys, accumulating per head the d×(d+1) summary
    ``[Σ_j r^p(k_j)ᵀ (c_j/n) v_j | Σ_j (c_j/n) r^p(k_j)ᵀ]`` (the second column block is mean φ(K)),
    then the queries, each chunk written into its slice of the output. Without `chunked` (under
    torch.compile, whose inductor fuses the element-wise chain itself, and torch.export, whose sizes
    are symbolic) the same two steps run once on whole tensors, with no loop over the sizes.
    """
    B, N, C = q.shape
    n = k.shape[1]
    if not chunked:
        summary = _key_summary(k + positional_encoding, v, inv_s, n, num_heads, focusing_factor)
        out = _query_output(q, summary, inv_s, num_heads, focusing_factor)
        return out.transpose(1, 2).reshape(B, N, C), summary
    out = q.new_empty(B, N, C)
    summaries = []
    group, key_rows = _chunks(B, n, C)
    query_rows = _chunks(B, N, C)[1]
    for b0 in range(0, B, group):
        b1 = min(B, b0 + group)
        summary = None
        for t0 in range(0, n, key_rows):
            keys = k[b0:b1, t0:t0 + key_rows] + positional_encoding[:, t0:t0 + key_rows]
            part = _key_summary(keys, v[b0:b1, t0:t0 + key_rows], inv_s, n, num_heads, focusing_factor)
            summary = part if summary is None else summary + part
        summaries.append(summary)
        for t0 in range(0, N, query_rows):
            rows = _query_output(q[b0:b1, t0:t0 + query_rows], summary, inv_s, num_heads, focusing_factor)
            rows = rows.transpose(1, 2)  # (b, t, h, d)
            out[b0:b1, t0:t0 + query_rows].view(rows.shape).copy_(rows)
    return out, torch.cat(summaries)


def _query_chunk_backward(x: torch.Tensor, g: torch.Tensor, summary: torch.Tensor, inv_s: torch.Tensor,
                          num_heads: int, focusing_factor: int):
    """One query chunk of :func:`_fused_backward`: (dL/dx, dL/d inv_s, this chunk's part of dL/dS).

    x: (b, t, C) queries, g: (b, t, C) output gradient, summary: (b, h, d, d+1) the saved S.
    """
    f = focusing(x, inv_s, focusing_factor)
    b, t, C = x.shape
    d = C // num_heads
    u = f.u.view(b, t, num_heads, d).transpose(1, 2)  # (b, h, t, d)
    num_den = u @ summary  # (b, h, t, d+1), before the factor c
    c = f.c.unsqueeze(1)  # (b, 1, t, 1)
    inv_den = 1 / (c * num_den[..., d:] + NORMALIZER_EPS)  # (b, h, t, 1)
    g = g.reshape(b, t, num_heads, d).transpose(1, 2)
    # dDen = −Σ_e G_e·out_e / D with out = c·num/D, i.e. −c·Σ_e(G_e·num_e)/D²
    grad_den = -(g * num_den[..., :d]).sum(-1, keepdim=True) * c * inv_den * inv_den
    grad_nd = torch.cat([g * inv_den, grad_den], dim=-1)  # (b, h, t, d+1) w.r.t. [Num | Den]
    grad_summary = u.transpose(-2, -1) @ (grad_nd * c)  # (b, h, d, d+1)
    grad_phi = grad_nd @ summary.transpose(-2, -1)  # (b, h, t, d) w.r.t. phi(q) = c·u
    grad_u = (grad_phi * c).transpose(1, 2).reshape(b, t, C)
    grad_c = (grad_phi * u).sum(dim=(1, 3)).unsqueeze(-1)  # (b, t, 1)
    return (*_focusing_backward(x, inv_s, focusing_factor, f, grad_u, grad_c), grad_summary)


def _key_chunk_backward(x: torch.Tensor, values: torch.Tensor, grad_summary: torch.Tensor, inv_s: torch.Tensor,
                        num_heads: int, focusing_factor: int, n: int):
    """One key chunk of :func:`_fused_backward`: (dL/dx, dL/d inv_s, dL/dv).

    x: (b, t, C) keys plus positional encoding, values: (b, t, C), grad_summary: (b, h, d, d+1).
    """
    f = focusing(x, inv_s, focusing_factor)
    b, t, C = x.shape
    d = C // num_heads
    u = f.u.view(b, t, num_heads, d).transpose(1, 2)  # (b, h, t, d)
    vals = values.view(b, t, num_heads, d).transpose(1, 2)
    weights = (f.c / n).unsqueeze(1)  # (b, 1, t, 1)
    grad_w = u @ grad_summary  # (b, h, t, d+1) w.r.t. W = (c/n)[v | 1]
    grad_u = (torch.cat([vals, torch.ones_like(vals[..., :1])], dim=-1) * weights
              ) @ grad_summary.transpose(-2, -1)  # (b, h, t, d)
    grad_v = (grad_w[..., :d] * weights).transpose(1, 2).reshape(b, t, C)
    grad_c = ((grad_w[..., :d] * vals).sum(-1, keepdim=True) + grad_w[..., d:]).sum(1) / n  # (b, t, 1)
    grad_u = grad_u.transpose(1, 2).reshape(b, t, C)
    return (*_focusing_backward(x, inv_s, focusing_factor, f, grad_u, grad_c), grad_v)


def _fused_backward(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_s: torch.Tensor,
                    positional_encoding: torch.Tensor, summaries: torch.Tensor, num_heads: int,
                    focusing_factor: int) -> Tuple[torch.Tensor, ...]:
    """Gradients of :func:`_fused_forward` for (q, k, v, inv_s, positional_encoding), in the same chunks.

    Per batch group, the queries first: with S = [S_v | s_1] the saved summary, U = r^p(q) and
    ``out = c·U S_v / (c·U s_1 + eps)``, the gradient G of the output gives
    ``[dNum | dDen] = [G / D | −Σ(G ⊙ out) / D]`` (D = c·U s_1 + eps), then ``dΦq = [dNum | dDen] Sᵀ``
    and ``dS = Σ_i Φq_iᵀ [dNum | dDen]_i``. Then the keys: with W_j = (c_j/n)[v_j | 1] the summary is
    ``S = Σ_j U_jᵀ W_j``, so ``dU_j = W_j dSᵀ`` and ``dW_j = U_j dS``, which gives dv_j and dc_j.
    """
    B, N, C = q.shape
    n = k.shape[1]
    grad_q, grad_k, grad_v = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    grad_pe = torch.zeros_like(positional_encoding)
    grad_inv_s = torch.zeros(C, dtype=q.dtype, device=q.device)
    group, key_rows = _chunks(B, n, C)
    query_rows = _chunks(B, N, C)[1]
    for b0 in range(0, B, group):
        b1 = min(B, b0 + group)
        grad_summary = 0
        for t0 in range(0, N, query_rows):
            rows = slice(t0, t0 + query_rows)
            grad_q[b0:b1, rows], grad_inv, part = _query_chunk_backward(
                q[b0:b1, rows], grad_out[b0:b1, rows], summaries[b0:b1], inv_s, num_heads, focusing_factor)
            grad_summary = grad_summary + part
            grad_inv_s += grad_inv
        for t0 in range(0, n, key_rows):
            rows = slice(t0, t0 + key_rows)
            grad_x, grad_inv, grad_v[b0:b1, rows] = _key_chunk_backward(
                k[b0:b1, rows] + positional_encoding[:, rows], v[b0:b1, rows], grad_summary, inv_s, num_heads,
                focusing_factor, n)
            grad_k[b0:b1, rows] = grad_x
            grad_pe[:, rows] += grad_x.sum(0, keepdim=True)
            grad_inv_s += grad_inv
    return grad_q, grad_k, grad_v, grad_inv_s.view_as(inv_s), grad_pe


class _FusedFocusedLinearAttention(torch.autograd.Function):
    """The fused path under autograd: chunked forward, hand-written chunked backward.

    Saves only the inputs and the (B, h, d, d+1) summaries; the element-wise kernel is recomputed
    in the backward, so no (B, N, C) intermediate outlives the forward.
    """

    @staticmethod
    def forward(ctx, q, k, v, inv_s, positional_encoding, num_heads, focusing_factor):
        out, summaries = _fused_forward(q, k, v, inv_s, positional_encoding, num_heads, focusing_factor)
        ctx.save_for_backward(q, k, v, inv_s, positional_encoding, summaries)
        ctx.num_heads, ctx.focusing_factor = num_heads, focusing_factor
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out):
        q, k, v, inv_s, positional_encoding, summaries = ctx.saved_tensors
        # in float32 like the forward, even if backward() is called inside an autocast region
        with torch.autocast(device_type=grad_out.device.type, enabled=False):
            grads = _fused_backward(grad_out.to(q.dtype), q, k, v, inv_s, positional_encoding, summaries,
                                    ctx.num_heads, ctx.focusing_factor)
        return grads + (None, None)


def _plain_fused(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: torch.Tensor,
                 positional_encoding: torch.Tensor, num_heads: int, focusing_factor: int) -> torch.Tensor:
    """The fused forward as one chunk of plain tensor ops, in float32 whatever the dtype of q, k, v:
    what torch.compile traces."""
    q, k, v = upcast(q), upcast(k), upcast(v)
    return _fused_forward(q, k, v, 1 / F.softplus(scale), positional_encoding, num_heads, focusing_factor,
                          chunked=False)[0]

