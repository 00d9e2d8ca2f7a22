"""Which implementation of focused linear attention runs: the two calls every focused kind makes.

:func:`focused_linear_attention` (φ_p and the linear order) and :func:`rank_restore_dwc` (the DWC)
pick, per call, one of three implementations of the same maths:

* the **reference** (``fused=False``), :mod:`.focused`: the paper's steps on whole tensors; read it
  first, the others are tested against it;
* the **fused** path (the default), :mod:`.fused`: cache-sized chunks and a hand-written backward;
  the DWC as one grouped conv on the channels-last view of V;
* the **compiled** path (``compiled=True``, ``--compile-core``), :mod:`.compiled`: the fused forward
  as one ``torch.compile`` graph, and the DWC's weight gradient compiled.

The fast paths are looked up as module attributes (``fused._fused_forward``), not imported names, so
that a patched one (tests, bench/profile_step.py) is the one that runs. docs/numerics.md, "Common
core" and "Fused and compiled paths".
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from . import compiled as _compiled
from . import fused as _fused
from .focused import focused_kernel, linear_attention, reference_dwc, upcast

__all__ = ['focused_linear_attention', 'rank_restore_dwc']


def focused_linear_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: torch.Tensor,
                             positional_encoding: torch.Tensor, num_heads: int, focusing_factor: int,
                             fused: bool = True, compiled: bool = False) -> torch.Tensor:
    """``φ_p(Q) (φ_p(K+P)ᵀ V) / (φ_p(Q) · mean φ_p(K+P))`` per head: (B, N, C), head-major.

    q: (B, N, C) projected queries; k: (B, n, C) projected keys; v: (B, n, C) raw values;
    scale: (1, 1, C) temperature parameter; positional_encoding: (1, n, C), added to the keys.
    ``fused=False`` runs the reference; both give the same result up to float rounding. The fused
    path works in cache-sized chunks; under autograd its backward is hand-written and recomputes the
    kernel; under torch.compile it runs as one chunk of plain tensor ops that inductor fuses and
    differentiates itself. ``compiled=True`` (with ``fused``) compiles that chunk on its own
    (checkpointed inside the graph for calls that need gradients, forward only for the others),
    except under saved-tensor hooks (activation checkpointing), and takes the eager path if the
    compiler fails; q, k, v may then be float16 or bfloat16 (the autocast dtype), converted to
    float32 inside the graph, so that no float32 copy of them is stored for the backward; the core
    computes in float32 on every path.
    """
    if not fused:
        k = k + positional_encoding
        return linear_attention(focused_kernel(q, scale, focusing_factor), focused_kernel(k, scale, focusing_factor),
                                v, num_heads)
    if torch.compiler.is_compiling():
        return _fused._plain_fused(q, k, v, scale, positional_encoding, num_heads, focusing_factor)
    inv_s = 1 / F.softplus(scale)
    training = torch.is_grad_enabled() and any(t.requires_grad for t in (q, k, v, inv_s, positional_encoding))
    if compiled and not _compiled._saved_tensor_hooks():
        compiled_core = _compiled.compiled_focused_core if training else _compiled.compiled_focused_inference
        out = compiled_core(q, k, v, scale, positional_encoding, num_heads, focusing_factor)
        if out is not None:
            return out
    if compiled:  # the compiled graph computes in float32 whatever q, k, v are: so do the eager paths then
        q, k, v = upcast(q), upcast(k), upcast(v)
    if training:
        return _fused._FusedFocusedLinearAttention.apply(q, k, v, inv_s, positional_encoding, num_heads,
                                                         focusing_factor)
    return _fused._fused_forward(q, k, v, inv_s, positional_encoding, num_heads, focusing_factor)[0]


def rank_restore_dwc(dwc: nn.Conv2d, v: torch.Tensor, num_heads: int, grid_size: Tuple[int, int],
                     fused: bool = True, compiled: bool = False) -> torch.Tensor:
    """DWC(V): depthwise conv over the value grid, one kernel set shared by all heads (docs/numerics.md,
    "Common core", step 9).

    v: (B, H·W, C) raw values with tokens row-major on the ``grid_size = (H, W)`` grid;
    dwc: Conv2d(d, d, k, groups=d). Returns (B, H·W, C), head-major. The reference
    (:func:`~.focused.reference_dwc`) folds the heads into the batch (B·h, d, H, W); the fused path
    convolves the channels-last view (B, C, H, W) of V directly with the d kernels repeated for each
    head (the same weights, so the same gradient), without two permuted copies. Under CPU autocast it
    runs in float32 (and returns float32). ``compiled`` (with ``fused``, in training, not under
    saved-tensor hooks) computes the weight gradient with a compiled kernel (``_DepthwiseConv``).
    """
    if v.device.type == 'cpu' and torch.is_autocast_enabled('cpu'):
        # in float32 under CPU autocast: oneDNN's bfloat16 depthwise backward (input and weight gradients)
        # is several times slower than its float32 one (docs/numerics.md, "Mixed precision")
        with torch.autocast('cpu', enabled=False):
            return rank_restore_dwc(dwc, v.float(), num_heads, grid_size, fused, compiled)
    if not fused:
        return reference_dwc(dwc, v, num_heads, grid_size)
    B, N, C = v.shape
    H, W = grid_size
    image = v.reshape(B, H, W, C).permute(0, 3, 1, 2)
    weight, bias = dwc.weight.repeat(num_heads, 1, 1, 1), dwc.bias.repeat(num_heads)
    if compiled and _compiled._compilable(dwc) and torch.is_grad_enabled() and not _compiled._saved_tensor_hooks():
        out = _compiled._DepthwiseConv.apply(image, weight, bias)
    else:
        out = F.conv2d(image, weight, bias, stride=dwc.stride, padding=dwc.padding, groups=C)
    return out.permute(0, 2, 3, 1).reshape(B, N, C)
