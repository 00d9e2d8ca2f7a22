"""Explicit attention matrices for analysis: the paper's Figs. 3, 5 and 8 (tools/attention_*.py).

Works on every attention module of the one contract (:class:`~.base.Attention`), so on every
backbone: DeiT and Swin (fused ``qkv``), PVT and PVTv2 (``q`` / ``kv`` with the key/value reduction)
and CSwin (the block's stacked Q, K, V, stripe windows, LePE). Given the module's forward input for
one image, :func:`equivalent_matrices` runs the module's own :meth:`~.base.Attention.project` in
float64, takes the first window (the whole map without windows) and forms the N×n matrix each
formulation would apply to the n values, N the queries and n the keys of that window (n < N when
PVT reduces the keys; n = N otherwise):

* ``softmax``: ``softmax(q kᵀ · scale)`` per head, with the module's own logit scale and, for
  Swin's window softmax, its relative position bias (never the shift mask);
* ``linear``: vanilla linear attention, ``(ReLU(q)+ε)(ReLU(k)+ε)ᵀ`` row-normalised, rank ≤ d;
* ``focused``: FLatten, ``φ_p(q) φ_p(k)ᵀ`` row-normalised plus, when the module has a DWC, the DWC
  folded in as a matrix (paper Eq. 11: ``M = Sim/Z + M_DWC``), for the first channel of each head.
  The DWC runs on the query grid (``module.window``); with reduced keys it sees V resampled to the
  N queries by the linear map ``R`` (N×n) of :func:`~.base.resample_tokens`, so its matrix is
  ``M_DWC R``.

The linear forms are row-normalised as the module's linear attention computes it: ``Sim_ij / Z_i`` with
``Z_i = Σ_j Sim_ij + n·ε`` (:data:`~.focused.NORMALIZER_EPS` on the key mean), so their rows sum to
just under one. ``k`` carries the module's key positional encoding when it has one; the temperature is the module's
``scale`` (zero when it has none) and the power its ``focusing_factor`` (3 when it has none).

CSwin's LePE is not part of any form: it is the layout's positional term, added to every kind's
output (softmax blocks included), and Eq. 11 has only the DWC. When the module has one, its per-
channel matrix (``get_v`` on the window, zero padded; first channel of each head) is returned on
its own as ``lepe``, so ``(focused + lepe) v`` is what a CSwin FLatten module computes (biases aside).
"""
from __future__ import annotations

import copy
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .base import Attention, resample_tokens
from .focused import KERNEL_EPS, NORMALIZER_EPS, dwc_matrix, focused_kernel

__all__ = ['FORMS', 'supports_analysis', 'token_projections', 'equivalent_matrices', 'query_distributions',
           'entropy', 'head_ranks', 'resampling_matrix', 'first_image']

FORMS = ('softmax', 'linear', 'focused')


def supports_analysis(module: nn.Module) -> bool:
    """True for every attention module of the one contract (every kind, every backbone)."""
    return isinstance(module, Attention)


def first_image(module: Attention, x: torch.Tensor) -> torch.Tensor:
    """The module input of the first image, with its batch dim of 1.

    x: (B, N, C), or (3, B, N, C) for ``projections='block'``; a batch-less (N, C) / (3, N, C) is
    accepted too (the form the tools used before).
    """
    stacked = module.projections == 'block'
    if x.dim() == (3 if stacked else 2):
        x = x.unsqueeze(1 if stacked else 0)
    if x.dim() != (4 if stacked else 3):
        shape = '(3, B, N, C)' if stacked else '(B, N, C)'
        raise ValueError(f'{type(module).__name__}: expected its forward input {shape}, got {tuple(x.shape)}')
    return x[:, :1] if stacked else x[:1]


def _float64(module: nn.Module) -> Attention:
    """A float64 copy of `module` (the analysis never touches the module itself); TypeError for a
    module that is not an :class:`~.base.Attention`."""
    if not supports_analysis(module):
        raise TypeError(f'{type(module).__name__} is not an attention module (models.attention.Attention); the '
                        f'analysis tools cover every kind of the DeiT, PVT, PVTv2, Swin and CSwin backbones')
    return copy.deepcopy(module).double().eval()


@torch.no_grad()
def token_projections(module: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Module input of one image -> float64 q (N, C) and k, v (n, C) of its first window; k has P added."""
    return _projections(_float64(module), first_image(module, x))


def _projections(module: Attention, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    q, k, v = module.project(x.double())
    q, k, v = q[0], k[0], v[0]  # the first window of the image
    if module.uses_positional_encoding:
        k = k + module.positional_encoding[0]
    return q, k, v


def resampling_matrix(num_keys: int, num_queries: int) -> torch.Tensor:
    """The (num_queries, num_keys) float64 matrix of :func:`~.base.resample_tokens` (identity if equal)."""
    eye = torch.eye(num_keys, dtype=torch.float64)
    return resample_tokens(eye[None], num_queries)[0]


def _heads(t: torch.Tensor, h: int) -> torch.Tensor:
    N, C = t.shape
    return t.reshape(N, h, C // h).transpose(0, 1)  # (h, N, d)


def _focused_phi(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    scale = getattr(module, 'scale', None)
    scale = torch.zeros(1, 1, t.shape[-1], dtype=t.dtype) if not isinstance(scale, torch.Tensor) else scale.double()
    return focused_kernel(t[None], scale, getattr(module, 'focusing_factor', 3))[0]


def _window_conv_matrix(conv: nn.Conv2d, channels, window: Tuple[int, int], num_tokens: int) -> torch.Tensor:
    """(len(channels), N, N): the depthwise `conv`'s kernels of `channels` as matrices on `window`."""
    if window[0] * window[1] != num_tokens:
        raise ValueError(f'a convolution on the {window[0]}x{window[1]} grid cannot act on {num_tokens} tokens')
    return dwc_matrix(conv.weight[channels].double(), window)


@torch.no_grad()
def equivalent_matrices(module: nn.Module, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """Module input of one image -> {form: (heads, N, n) float64 attention matrix}, plus ``lepe``
    (heads, N, N) when the module has CSwin's LePE (see the module docstring)."""
    module = _float64(module)
    h, d = module.num_heads, module.head_dim
    q, k, _ = _projections(module, first_image(module, x))
    N, n = q.shape[0], k.shape[0]
    logits = _heads(q, h) @ _heads(k, h).transpose(-2, -1) * getattr(module, 'head_scale', d ** -0.5)
    logit_bias = getattr(module, 'logit_bias', None)
    bias = logit_bias() if callable(logit_bias) else None
    softmax = (logits if bias is None else logits + bias).softmax(dim=-1)

    def normalised(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        sim = _heads(a, h) @ _heads(b, h).transpose(-2, -1)
        return sim / (sim.sum(dim=-1, keepdim=True) + n * NORMALIZER_EPS)

    linear = normalised(F.relu(q) + KERNEL_EPS, F.relu(k) + KERNEL_EPS)
    focused = normalised(_focused_phi(module, q), _focused_phi(module, k))
    if module.dwc is not None:  # one kernel set shared by the heads: channel 0 of each
        m_dwc = _window_conv_matrix(module.dwc, slice(0, 1), module.window, N)[0]
        focused = focused + m_dwc @ resampling_matrix(n, N)
    out = {'softmax': softmax, 'linear': linear, 'focused': focused}
    if module.get_v is not None:  # per channel of the module: the first channel of each head
        out['lepe'] = _window_conv_matrix(module.get_v, slice(0, h * d, d), module.window, N)
    return out


@torch.no_grad()
def query_distributions(q: torch.Tensor, k: torch.Tensor, num_heads: int, scale: torch.Tensor = None,
                        focusing_factor: int = 3) -> Dict[str, torch.Tensor]:
    """The attention distribution of one query over the n keys, averaged over the heads.

    q: (C,) query; k: (n, C) keys (positional encoding included); ``scale``: FLatten's (1, 1, C)
    temperature or None (zero). Returns {form: (n,) probabilities} for softmax, vanilla linear
    (ReLU kernel) and focused linear attention (paper Figs. 3 and 8; the DWC is not a distribution
    over keys and is left out).
    """
    q, k = q.double()[None], k.double()
    d = q.shape[-1] // num_heads
    scale = torch.zeros(1, 1, q.shape[-1], dtype=q.dtype) if scale is None else scale.double()
    qh, kh = _heads(q, num_heads), _heads(k, num_heads)  # (h, 1, d), (h, n, d)
    out = {'softmax': (qh @ kh.transpose(-2, -1) * d ** -0.5).softmax(-1)}
    for form, phi in (('linear', lambda t: F.relu(t) + KERNEL_EPS),
                      ('focused', lambda t: focused_kernel(t[None], scale, focusing_factor)[0])):
        sim = _heads(phi(q), num_heads) @ _heads(phi(k), num_heads).transpose(-2, -1)
        out[form] = sim / sim.sum(-1, keepdim=True)
    return {form: p.mean(dim=0)[0] for form, p in out.items()}


def entropy(p: torch.Tensor) -> float:
    """Shannon entropy in nats of a distribution (zeros contribute nothing)."""
    p = p.double()
    return float(-(p * torch.log(p.clamp_min(1e-300))).sum())


def head_ranks(matrices: torch.Tensor) -> torch.Tensor:
    """(heads, N, n) -> (heads,) numerical ranks (torch.linalg.matrix_rank's default tolerance)."""
    return torch.linalg.matrix_rank(matrices)
