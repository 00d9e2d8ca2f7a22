"""Focused linear attention: the shared maths (docs/numerics.md, "Common core"), used by every
focused kind.

The focusing function is defined once, :func:`focusing`; everything else is one of two
implementations of the same attention, selected per module by its ``fused`` flag:

* the **reference** follows the official steps on whole tensors (:func:`focused_kernel`,
  :func:`linear_attention`, the DWC with heads folded into the batch); it stays for tests;
* the **fused** path (:func:`focused_linear_attention` with ``fused=True``, the default) computes
  the same quantities with fewer and cheaper passes: it works in cache-sized chunks instead of on
  whole (B, N, C) activations; the norm-restoration factors of φ(Q) and φ(K) and the n^-½·n^-½
  pre-scales become per-token scalars applied to the value rows and the final normaliser instead of
  to whole tensors; the normaliser rides along as an extra column of KᵀV; heads are sliced instead
  of transposed; and the DWC runs as one grouped conv on the channels-last view of V (its d kernels
  repeated per head) instead of through two permuted copies. Under autograd its backward is written
  by hand (the same chunks, :func:`focusing` re-evaluated from the saved inputs, then its derivative
  :func:`_focusing_backward`), so no (B, N, C) intermediate of the core is kept for the backward.

``compiled=True`` (``--compile-core``, :func:`~models.attention.base.set_compiled_core`) runs the
fused forward as one graph of plain tensor ops under ``torch.compile``, once per input shape. In
training, selective activation checkpointing inside the graph keeps, besides its inputs, only
per-token norms and per-head summaries (:func:`_keep_small_results`), and inductor fuses the
element-wise chains of the forward, its recomputation and the derived backward into a few loops;
the DWC's weight gradient is compiled too (:class:`_DepthwiseConv`). Calls without gradients
(evaluation, inference) run a forward-only graph of the same ops. Calls under saved-tensor hooks
(grad checkpointing) keep the eager path; a compiler that fails warns once and the eager path
takes over.
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

__all__ = ['KERNEL_EPS', 'NORMALIZER_EPS', 'focused_kernel', 'linear_attention', 'focused_linear_attention',
           'compiled_focused_core', 'compiled_focused_inference', 'rank_restore_dwc', 'dwc_matrix', 'make_dwc',
           'upcast', 'Focused', 'focusing']

# Added to the kernel output (so every entry is > 0) and to the normaliser, as the official code.
KERNEL_EPS = 1e-6
NORMALIZER_EPS = 1e-6


class Focused(NamedTuple):
    """One evaluation of the focusing function on token rows; ``phi_p(x) = c ⊙ u``."""
    r: torch.Tensor  # (ReLU(x) + eps) / s, s the softplus temperature
    u: torch.Tensor  # r^p
    norm_r: torch.Tensor  # ‖r‖ per token (…, 1)
    norm_u: torch.Tensor  # ‖r^p‖ per token (…, 1)

    @property
    def c(self) -> torch.Tensor:
        """The norm-restoration factor ‖r‖ / ‖r^p‖ of each token."""
        return self.norm_r / self.norm_u


def focusing(x: torch.Tensor, inv_s: torch.Tensor, focusing_factor: int) -> Focused:
    """The focusing function, the one definition every implementation uses (docs/numerics.md,
    "Common core", step 4).

    x: (…, C) projected queries or keys (keys already carry the positional encoding); inv_s: (C,)
    or broadcastable, ``1 / softplus(scale)``. With ``r = (ReLU(x) + eps) / s`` the focused function
    is ``f_p(r) = ‖r‖ · r^p / ‖r^p‖``, taken over the full C channels of each token, before the
    head split: the norms are never per head.
    """
    r = torch.addcmul(KERNEL_EPS * inv_s, F.relu(x), inv_s)  # (ReLU(x) + eps) / s in one pass
    u = r.pow(focusing_factor)
    return Focused(r, u, torch.linalg.vector_norm(r, dim=-1, keepdim=True),
                   torch.linalg.vector_norm(u, dim=-1, keepdim=True))


def focused_kernel(x: torch.Tensor, scale: torch.Tensor, focusing_factor: int) -> torch.Tensor:
    """phi_p(x) for whole tensors: x (B, N, C), scale the (1, 1, C) raw temperature parameter."""
    f = focusing(x, 1 / F.softplus(scale), focusing_factor)
    return f.u * f.c


def linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Per-head ``phi(Q) (phi(K)ᵀ V) / (phi(Q) · mean(phi(K)))`` in linear order.

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


def _fused_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, inv_s: torch.Tensor,
                   positional_encoding: torch.Tensor, num_heads: int, focusing_factor: int,
                   chunked: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """The fused forward: (output (B, N, C), per-head summaries (B, h, d, d+1)).

    Chunk by chunk (a few batch elements, or a slice of tokens of one) so that the intermediates
    stay in cache: first the keys, accumulating per head the d×(d+1) summary
    ``[Σ_j r^p(k_j)ᵀ (c_j/n) v_j | Σ_j (c_j/n) r^p(k_j)ᵀ]`` (the second column block is mean φ(K)),
    then the queries, each chunk written into its slice of the output.
    """
    B, N, C = q.shape
    n, d = k.shape[1], C // num_heads
    out = q.new_empty(B, N, C)
    summaries = []
    if chunked:
        group, key_rows = _chunks(B, n, C)
        query_rows = _chunks(B, N, C)[1]
    else:  # under torch.compile: inductor fuses the element-wise chain itself; chunks would unroll the graph
        group, key_rows, query_rows = B, n, N
    for b0 in range(0, B, group):
        b1 = min(B, b0 + group)
        # keys: phi(k_j) = c_j r^p(k_j); c_j and both n^-½ pre-scales ride on the value rows
        summary = None
        for t0 in range(0, n, key_rows):
            keys = k[b0:b1, t0:t0 + key_rows] + positional_encoding[:, t0:t0 + key_rows]
            fk = focusing(keys, inv_s, focusing_factor)
            rk_p, ck = fk.u, fk.c
            b, t = rk_p.shape[:2]
            weights = (ck / n).unsqueeze(-1)  # (b, t, 1, 1)
            values = torch.cat([v[b0:b1, t0:t0 + key_rows].view(b, t, num_heads, d) * weights,
                                weights.expand(b, t, num_heads, 1)], dim=-1)  # (b, t, h, d+1)
            part = rk_p.view(b, t, num_heads, d).permute(0, 2, 3, 1) @ values.transpose(1, 2)  # (b, h, d, d+1)
            summary = part if summary is None else summary + part
        summaries.append(summary)
        # queries: phi(q) = cq r^p(q); (cq·num) / (cq·den + eps) is the reference's num / (phi(q)·k̄ + eps)
        for t0 in range(0, N, query_rows):
            fq = focusing(q[b0:b1, t0:t0 + query_rows], inv_s, focusing_factor)
            rq_p, cq = fq.u, fq.c
            b, t = rq_p.shape[:2]
            num_den = rq_p.view(b, t, num_heads, d).transpose(1, 2) @ summary  # (b, h, t, d+1)
            cq = cq.unsqueeze(1)  # (b, 1, t, 1)
            result = num_den[..., :d] * (cq / (cq * num_den[..., d:] + NORMALIZER_EPS))
            out[b0:b1, t0:t0 + query_rows].view(b, t, num_heads, d).copy_(result.transpose(1, 2))
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


def _saved_tensor_hooks() -> bool:
    """Whether saved-tensor hooks are active (activation checkpointing: TRAIN.USE_CHECKPOINT). The
    compiled paths stay off there: a checkpoint's recomputation must run the code its forward ran,
    which a compiled graph with its own checkpoint cannot promise."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def _compilable(dwc: nn.Conv2d) -> bool:
    """The DWC shape :class:`_DepthwiseConv` handles: stride 1, zero padding k//2, square kernel."""
    k = dwc.kernel_size[0]
    return (dwc.kernel_size == (k, k)) and (dwc.stride == (1, 1)) and (dwc.padding == (k // 2, k // 2)) \
        and (dwc.dilation == (1, 1)) and (dwc.padding_mode == 'zeros') and (dwc.bias is not None)


def _keep_small_results(ctx, func, *args, **kwargs) -> torch.utils.checkpoint.CheckpointPolicy:
    """Selective-checkpoint policy of the compiled core: save the per-token norms and the matmuls whose
    result is much smaller than their inputs (the per-head key summaries S, a sum over tokens), recompute
    the rest. The backward then recomputes only element-wise chains and the query-side product, not the
    key side's product; the saved tensors add 0.5 MB to the 29 MB of inputs at FLatten-Swin-T's stage 1
    (batch 8), and the core's forward + backward is 1.24x faster there (1.05x at stage 2; one run,
    medians of 11, interleaved)."""
    policy = torch.utils.checkpoint.CheckpointPolicy
    if func is torch.ops.aten.linalg_vector_norm.default:
        return policy.MUST_SAVE
    if func is torch.ops.aten.bmm.default:
        a, b = args[0], args[1]
        if 4 * a.shape[0] * a.shape[1] * b.shape[2] < max(a.numel(), b.numel()):
            return policy.MUST_SAVE
    return policy.PREFER_RECOMPUTE


def _recomputed_fused(*args) -> torch.Tensor:
    """:func:`_plain_fused` under non-reentrant selective activation checkpointing: the compiled graph
    saves its inputs and the small results of :func:`_keep_small_results`, and recomputes the (B, N, C)
    intermediates in its backward, as the eager path does. Left to itself, inductor's partitioner keeps
    (B, N, C) intermediates: FLatten-Swin-T's training step then peaks 140 MiB higher (943 against
    803 MiB, batch 8), above Swin-T's 845 MiB."""
    context = functools.partial(torch.utils.checkpoint.create_selective_checkpoint_contexts, _keep_small_results)
    return torch.utils.checkpoint.checkpoint(_plain_fused, *args, use_reentrant=False, context_fn=context)


class _CompiledCore:
    """`function` under ``torch.compile``, built on first use, one graph per input shape
    (``dynamic=False``: a stage's shape is fixed during training, and static kernels are the fastest).

    The first call first compiles and runs `probe`, if given (a forward and backward on a tiny input
    of the same device and dtype: the backward graph is compiled lazily, inside ``loss.backward()``,
    where a failure could not fall back; a forward-only function needs none). If that probe or a
    later compiled call raises, the error is reported once as a RuntimeWarning and every later call
    returns None, so that callers use the eager path (which raises again if the inputs themselves
    are at fault). Calls with inputs of a new layout (shape, strides, dtype, device) once
    ``MAX_LAYOUTS`` have been compiled also return None: past its recompile limit (8 graphs per
    function, one of them the probe's) torch.compile would run the function's ops eagerly, and the
    unchunked ops hold whole (B, N, C) intermediates where the eager fused path works in chunks
    (a detector fed many input sizes, say).
    """
    MAX_LAYOUTS = 6

    def __init__(self, function, probe: Optional[Callable], what: str):
        self.target, self.probe, self.what = function, probe, what
        self.function = None
        self.failed: Optional[str] = None
        self.layouts = set()

    def __call__(self, *args) -> Optional[torch.Tensor]:
        if self.failed is not None:
            return None
        layout = tuple((tuple(a.shape), a.stride(), a.dtype, a.device, a.requires_grad)
                       if isinstance(a, torch.Tensor) else a for a in args)
        if layout not in self.layouts:
            if len(self.layouts) >= self.MAX_LAYOUTS:
                return None
            self.layouts.add(layout)
        if self.function is None:
            self.function = torch.compile(self.target, dynamic=False)
            if (self.probe is not None) and (self._guarded(self.probe, self.function, *args) is None):
                return None
        return self._guarded(self.function, *args)

    def _guarded(self, function, *args):
        try:
            return function(*args)
        except Exception as error:  # any compiler failure: the eager path is always correct
            self.failed = f'{type(error).__name__}: {error}'.splitlines()[0]
            warnings.warn(f'the compiled {self.what} failed ({self.failed}); the eager path is used instead',
                          RuntimeWarning, stacklevel=4)
            return None


def _probe_core(function, q, k, v, scale, positional_encoding, num_heads, focusing_factor) -> bool:
    q, k, v, pe = (torch.randn(1, 4, 4, dtype=q.dtype, device=q.device, requires_grad=True) for _ in range(4))
    scale = torch.zeros(1, 1, 4, dtype=q.dtype, device=q.device, requires_grad=True)
    function(q, k, v, scale, pe, 1, focusing_factor).sum().backward()
    return True


compiled_focused_core = _CompiledCore(_recomputed_fused, _probe_core, 'focused core')
# Without gradients: the same ops, forward only, nothing to checkpoint. One graph per shape, as in
# training: an evaluation loop compiles its full batches and its last, shorter one (about 5-15 s
# each per stage on CPU), up to _CompiledCore.MAX_LAYOUTS layouts.
compiled_focused_inference = _CompiledCore(_plain_fused, None, 'focused core (inference)')


def focused_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: torch.Tensor,
                             positional_encoding: torch.Tensor, num_heads: int, focusing_factor: int,
                             fused: bool = True, compiled: bool = False) -> torch.Tensor:
    """``phi_p(Q) (phi_p(K+P)ᵀ V) / (phi_p(Q) · mean phi_p(K+P))`` per head: (B, N, C), head-major.

    q: (B, N, C) projected queries; k: (B, n, C) projected keys; v: (B, n, C) raw values;
    scale: (1, 1, C) temperature parameter; positional_encoding: (1, n, C), added to the keys.
    ``fused=False`` runs the reference; both give the same result up to float rounding (see the
    module docstring). The fused path works in cache-sized chunks (:func:`_fused_forward`); under
    autograd its backward is hand-written (:func:`_fused_backward`) and recomputes the kernel;
    under torch.compile it runs as one chunk of plain tensor ops that inductor fuses and
    differentiates itself. ``compiled=True`` (with ``fused``) compiles that chunk on its own
    (:class:`_CompiledCore`; checkpointed inside the graph for calls that need gradients, forward
    only for the others), except under saved-tensor hooks (activation checkpointing), and takes the
    eager path if the compiler fails; q, k, v may then be float16 or
    bfloat16 (the autocast dtype), converted to float32 inside the graph, so that no float32 copy
    of them is stored for the backward; the core computes in float32 on every path.
    """
    if not fused:
        k = k + positional_encoding
        return linear_attention(focused_kernel(q, scale, focusing_factor), focused_kernel(k, scale, focusing_factor),
                                v, num_heads)
    if torch.compiler.is_compiling():
        return _plain_fused(q, k, v, scale, positional_encoding, num_heads, focusing_factor)
    inv_s = 1 / F.softplus(scale)
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, inv_s, positional_encoding))
    if compiled and not _saved_tensor_hooks():
        compiled_core = compiled_focused_core if training else compiled_focused_inference
        out = compiled_core(q, k, v, scale, positional_encoding, num_heads, focusing_factor)
        if out is not None:
            return out
    if compiled:  # the compiled graph computes in float32 whatever q, k, v are: so do the eager paths then
        q, k, v = upcast(q), upcast(k), upcast(v)
    if training:
        return _FusedFocusedLinearAttention.apply(q, k, v, inv_s, positional_encoding, num_heads, focusing_factor)
    return _fused_forward(q, k, v, inv_s, positional_encoding, num_heads, focusing_factor)[0]


def _dwc_weight_grad(image: torch.Tensor, grad: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The weight gradient of a stride-1 depthwise conv with zero padding k//2, as plain ops (compiled
    by :data:`compiled_dwc_weight_grad`): ``Σ_{b,y,x} grad[b,c,y,x] · image_pad[b,c,y+i,x+j]`` for each
    tap (i, j), on the channels-last views. image, grad: (B, C, H, W); returns (C, 1, k, k).

    Each tap is first summed over batch and columns only, per row y; the k² × (H, C) row sums are then
    added up. Inductor's loop then walks the rows once for all taps, with the few input rows a row needs
    in cache, instead of streaming both tensors once per tap: 1.6× faster at FLatten-Swin-T's stages 1
    and 2 (4.1 against 6.3 ms and 2.0 against 3.1 ms, batch 8, one run, medians of 15). The shorter
    sums are also more precise: 3.9e-7 relative error against the float64 gradient at stage 1, where
    oneDNN's float32 one has 5.4e-7. The image is first copied to a dense channels-last tensor: in the
    model it is a view of V inside the qkv projection's output (every third run of C floats), and
    inductor's loop over that strided view is slower: 2.5 against 1.4 ms with the copy at stage 2,
    7.1 against 6.7 ms at stage 1 (AMD EPYC, one run, medians of 25, interleaved)."""
    pad = kernel_size // 2
    image = image.contiguous(memory_format=torch.channels_last)
    x = F.pad(image.permute(0, 2, 3, 1), (0, 0, pad, pad, pad, pad))
    g = grad.permute(0, 2, 3, 1)
    H, W = g.shape[1:3]
    rows = [(g * x[:, i:i + H, j:j + W]).sum((0, 2)) for i in range(kernel_size) for j in range(kernel_size)]
    return torch.stack(rows, dim=-1).sum(0).view(-1, 1, kernel_size, kernel_size)


def _probe_dwc_weight_grad(function, image, grad, kernel_size) -> bool:
    x = torch.randn(1, 2, 4, 4, dtype=image.dtype, device=image.device)
    function(x, x, kernel_size)
    return True


compiled_dwc_weight_grad = _CompiledCore(_dwc_weight_grad, _probe_dwc_weight_grad, 'DWC weight gradient')


class _DepthwiseConv(torch.autograd.Function):
    """``F.conv2d(image, weight, bias, padding=k//2, groups=C)`` whose weight gradient is
    :func:`_dwc_weight_grad` compiled: oneDNN's depthwise weight gradient on a channels-last input
    takes 13.6 ms at FLatten-Swin-T's stage 1 (batch 8, 2 threads) against 7.1 ms compiled, and its
    input gradient (2.3 ms) and the bias sum (0.7 ms) stay as they are. Falls back to oneDNN's weight
    gradient if the compiler fails."""

    @staticmethod
    def forward(ctx, image, weight, bias):
        ctx.save_for_backward(image, weight)
        return F.conv2d(image, weight, bias, padding=weight.shape[-1] // 2, groups=image.shape[1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        image, weight = ctx.saved_tensors
        C, pad = image.shape[1], weight.shape[-1] // 2
        compiled = compiled_dwc_weight_grad(image, grad, weight.shape[-1])
        grad_image, onednn_weight, _ = torch.ops.aten.convolution_backward(
            grad, image, weight, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], C, [True, compiled is None, False])
        return grad_image, onednn_weight if compiled is None else compiled, grad.sum((0, 2, 3))


def rank_restore_dwc(dwc: nn.Conv2d, v: torch.Tensor, num_heads: int, grid_size: Tuple[int, int],
                     fused: bool = True, compiled: bool = False) -> torch.Tensor:
    """Depthwise conv over the value grid, one kernel set shared by all heads (docs/numerics.md, "Common core",
    step 9).

    v: (B, H·W, C) raw values with tokens row-major on the ``grid_size = (H, W)`` grid;
    dwc: Conv2d(d, d, k, groups=d). Returns (B, H·W, C), head-major. The reference folds the heads
    into the batch (B·h, d, H, W); the fused path convolves the channels-last view (B, C, H, W) of V
    directly with the d kernels repeated for each head (the same weights, so the same gradient).
    Under CPU autocast it runs in float32 (and returns float32). ``compiled`` (with ``fused``, in
    training, not under saved-tensor hooks) computes the weight gradient with a compiled kernel
    (:class:`_DepthwiseConv`).
    """
    if v.device.type == 'cpu' and torch.is_autocast_enabled('cpu'):
        # in float32 under CPU autocast: oneDNN's bfloat16 depthwise backward (input and weight gradients)
        # takes 3x the float32 time at FLatten-Swin-T's stage 1 (90 vs 29 ms, batch 8, bench/profile_step.py)
        with torch.autocast('cpu', enabled=False):
            return rank_restore_dwc(dwc, v.float(), num_heads, grid_size, fused, compiled)
    B, N, C = v.shape
    H, W = grid_size
    head_dim = C // num_heads
    if fused:
        image = v.reshape(B, H, W, C).permute(0, 3, 1, 2)
        weight, bias = dwc.weight.repeat(num_heads, 1, 1, 1), dwc.bias.repeat(num_heads)
        if compiled and _compilable(dwc) and torch.is_grad_enabled() and not _saved_tensor_hooks():
            out = _DepthwiseConv.apply(image, weight, bias)
        else:
            out = F.conv2d(image, weight, bias, stride=dwc.stride, padding=dwc.padding, groups=C)
        return out.permute(0, 2, 3, 1).reshape(B, N, C)
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
