"""Explicit N×N attention matrices for analysis: the paper's Figs. 3, 5 and 8 (tools/attention_*.py).

Given a token attention module with a fused ``qkv`` projection (Swin windows, DeiT grids: the
generic and zoo kinds) and its input tokens, :func:`equivalent_matrices` forms, in float64 and from
the module's own projections, the attention matrix each formulation would apply:

* ``softmax``: ``softmax(q kᵀ · d^-½)`` per head;
* ``linear``: vanilla linear attention, ``(ReLU(q)+ε)(ReLU(k+P)+ε)ᵀ`` row-normalised, rank ≤ d;
* ``focused``: FLatten, ``φ_p(q) φ_p(k+P)ᵀ`` row-normalised plus the DWC folded in as its N×N
  matrix (paper Eq. 11: ``M = Sim/Z + M_DWC``), for the first channel of each head.

``P`` is the module's positional encoding and the temperature its ``scale`` when it has them (zero
otherwise); the DWC is the module's own when it has one.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .core import KERNEL_EPS, dwc_matrix, focused_kernel

__all__ = ['FORMS', 'supports_analysis', 'token_projections', 'equivalent_matrices', 'query_distributions',
           'entropy', 'head_ranks']

FORMS = ('softmax', 'linear', 'focused')


def supports_analysis(module: nn.Module) -> bool:
    """True for token kinds with a fused qkv projection over one grid (not PVT's or CSwin's)."""
    return (isinstance(getattr(module, 'qkv', None), nn.Linear) and hasattr(module, 'grid_size')
            and hasattr(module, 'num_heads') and not getattr(type(module), 'input_is_qkv', False))


@torch.no_grad()
def token_projections(module: nn.Module, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x: (N, C) tokens of one window / grid -> float64 q, k, v, each (N, C); k has P added."""
    x = x.double()
    weight = module.qkv.weight.double()
    bias = module.qkv.bias.double() if module.qkv.bias is not None else None
    q, k, v = F.linear(x, weight, bias).chunk(3, dim=-1)
    pe = getattr(module, 'positional_encoding', None)
    if pe is not None and pe.shape[1] == k.shape[0]:
        k = k + pe[0].double()
    return q, k, v


def _heads(t: torch.Tensor, h: int) -> torch.Tensor:
    N, C = t.shape
    return t.reshape(N, h, C // h).transpose(0, 1)  # (h, N, d)


def _focused_phi(module: nn.Module, t: torch.Tensor) -> torch.Tensor:
    scale = getattr(module, 'scale', None)
    scale = torch.zeros(1, 1, t.shape[-1], dtype=t.dtype) if scale is None else scale.double()
    return focused_kernel(t[None], scale, getattr(module, 'focusing_factor', 3))[0]


@torch.no_grad()
def equivalent_matrices(module: nn.Module, x: torch.Tensor) -> Dict[str, torch.Tensor]:
    """x: (N, C) input tokens of `module` -> {form: (heads, N, N) float64 attention matrix}."""
    if not supports_analysis(module):
        raise TypeError(f'{type(module).__name__} has no fused qkv projection over one grid; the analysis tools '
                        f'cover Swin- and DeiT-style attention')
    h = module.num_heads
    q, k, v = token_projections(module, x)
    d = q.shape[-1] // h
    softmax = (_heads(q, h) @ _heads(k, h).transpose(-2, -1) * d ** -0.5).softmax(dim=-1)

    def normalised(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        sim = _heads(a, h) @ _heads(b, h).transpose(-2, -1)
        return sim / sim.sum(dim=-1, keepdim=True)

    linear = normalised(F.relu(q) + KERNEL_EPS, F.relu(k) + KERNEL_EPS)
    focused = normalised(_focused_phi(module, q), _focused_phi(module, k))
    dwc = getattr(module, 'dwc', None)
    if isinstance(dwc, nn.Conv2d):
        m_dwc = dwc_matrix(dwc.weight.double(), module.grid_size)  # (d, N, N), shared by the heads
        focused = focused + m_dwc[0]
    return {'softmax': softmax, 'linear': linear, 'focused': focused}


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
    """(heads, N, N) -> (heads,) numerical ranks (torch.linalg.matrix_rank's default tolerance)."""
    return torch.linalg.matrix_rank(matrices)
