"""Attention layers, plugged into backbone blocks by name.

Every attention kind attends over the tokens of one ``H×W`` grid (a Swin window, a PVT stage map,
a DeiT patch grid) and shares one constructor signature::

    Kind(dim, num_heads, grid_size=(H, W), qkv_bias=True, attn_drop=0., proj_drop=0.,
         options=AttentionOptions())
    forward(x: (B, H·W, C), mask: (nW, H·W, H·W) | None) -> (B, H·W, C)

so a backbone never imports a concrete class: it asks :func:`create_attention` for a kind by name,
and stage letters of ``MODEL.LA.ATTN_TYPE`` map to kind names (:func:`block_kinds`).

The focused-linear-attention maths (spec §1.1) lives in module-level functions
(:func:`focused_kernel`, :func:`linear_attention`, :func:`rank_restore_dwc`) that the PVT and
CSwin variants reuse with their own projections.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import trunc_normal_

__all__ = [
    'AttentionOptions', 'register_attention', 'create_attention', 'list_attention_kinds',
    'parse_attn_type', 'block_kinds', 'focused_kernel', 'linear_attention', 'rank_restore_dwc', 'dwc_matrix',
    'FocusedLinearAttention', 'WindowAttention', 'relative_position_index',
]

# Added to the kernel output (so every entry is > 0) and to the normaliser, as the official code.
KERNEL_EPS = 1e-6
NORMALIZER_EPS = 1e-6


@dataclass(frozen=True)
class AttentionOptions:
    """Knobs of the attention kinds that are not geometry (from ``MODEL.LA``)."""
    focusing_factor: int = 3  # power p of the focused function f_p
    kernel_size: int = 5  # depthwise rank-restoration conv (DWC) kernel
    qk_scale: Optional[float] = None  # softmax logit scale; None means head_dim ** -0.5


_ATTENTION_KINDS: Dict[str, Callable[..., nn.Module]] = {}


def register_attention(name: str) -> Callable:
    """Class decorator: make an attention kind available to :func:`create_attention`."""
    def wrap(cls):
        if name in _ATTENTION_KINDS:
            raise ValueError(f'attention kind {name!r} is registered twice')
        _ATTENTION_KINDS[name] = cls
        cls.kind = name
        return cls
    return wrap


def list_attention_kinds() -> List[str]:
    return sorted(_ATTENTION_KINDS)


def create_attention(
        kind: str,
        dim: int,
        num_heads: int,
        grid_size: Tuple[int, int],
        qkv_bias: bool = True,
        attn_drop: float = 0.,
        proj_drop: float = 0.,
        options: AttentionOptions = AttentionOptions(),
) -> nn.Module:
    """Build the attention kind `kind` for tokens on a ``grid_size`` grid of width `dim`."""
    if kind not in _ATTENTION_KINDS:
        raise KeyError(f'unknown attention kind {kind!r}; known kinds: {", ".join(list_attention_kinds())}')
    if dim % num_heads:
        raise ValueError(f'attention width {dim} is not divisible by num_heads={num_heads}')
    return _ATTENTION_KINDS[kind](
        dim, num_heads, grid_size=tuple(grid_size), qkv_bias=qkv_bias, attn_drop=attn_drop,
        proj_drop=proj_drop, options=options)


_ATTN_TYPE_RE = re.compile(r'^([A-Z]+)(\d*)$')


def parse_attn_type(attn_type: str, num_stages: int) -> Tuple[str, int]:
    """Split ``MODEL.LA.ATTN_TYPE`` into one letter per stage and the ``M`` suffix.

    ``'LLSS'`` -> ``('LLSS', 0)``; ``'LLMS2'`` -> ``('LLMS', 2)``: in an ``M`` stage the first 2
    blocks are ``L`` and the rest ``S``. Raises ValueError naming the string when the letter count
    does not match `num_stages` or an ``M`` stage has no suffix.
    """
    match = _ATTN_TYPE_RE.match(attn_type or '')
    if match is None or len(match.group(1)) != num_stages:
        raise ValueError(
            f'MODEL.LA.ATTN_TYPE={attn_type!r}: expected {num_stages} stage letters '
            f'(e.g. {"L" * num_stages!r}) optionally followed by the integer block count of M stages')
    letters, suffix = match.group(1), match.group(2)
    if 'M' in letters and not suffix:
        raise ValueError(f'MODEL.LA.ATTN_TYPE={attn_type!r}: an M stage needs an integer suffix, e.g. "LLMS2"')
    return letters, int(suffix) if suffix else 0


def block_kinds(attn_type: str, depths: Sequence[int], letter_kinds: Dict[str, str]) -> List[List[str]]:
    """Per-stage lists of per-block attention kind names.

    `letter_kinds` maps the stage letters this backbone understands (``L``, ``S``) to kind names;
    ``M`` is expanded into ``L`` blocks followed by ``S`` blocks.
    """
    letters, mixed_l_blocks = parse_attn_type(attn_type, len(depths))
    kinds = []
    for stage, (letter, depth) in enumerate(zip(letters, depths, strict=True)):
        if letter == 'M':
            stage_letters = ['L' if j < mixed_l_blocks else 'S' for j in range(depth)]
        else:
            stage_letters = [letter] * depth
        for block_letter in stage_letters:
            if block_letter not in letter_kinds:
                raise ValueError(
                    f'MODEL.LA.ATTN_TYPE={attn_type!r}: stage {stage} letter {block_letter!r} is not one of '
                    f'{sorted(letter_kinds) + ["M"]}')
        kinds.append([letter_kinds[block_letter] for block_letter in stage_letters])
    return kinds


# ---------------------------------------------------------------------------------------------
# Focused linear attention: the shared maths (spec §1.1)
# ---------------------------------------------------------------------------------------------

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


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """float16/bfloat16 -> float32; float32 and float64 pass unchanged."""
    return x.float() if x.dtype in (torch.float16, torch.bfloat16) else x


def make_dwc(head_dim: int, kernel_size: int) -> nn.Conv2d:
    """The rank-restoration conv: ``head_dim`` depthwise k×k kernels with zero padding k//2."""
    return nn.Conv2d(head_dim, head_dim, kernel_size, padding=kernel_size // 2, groups=head_dim)


@register_attention('focused_linear')
class FocusedLinearAttention(nn.Module):
    """Focused linear attention with a fused qkv projection (FLatten-Swin's module, spec §1.2).

    ``Y = proj(phi_p(Q) phi_p(K+P)ᵀ V / Z + DWC(V))`` over the N = H·W tokens of one grid, in
    O(N·d²) per head. State-dict names as the official module: ``scale`` (1, 1, C) and
    ``positional_encoding`` (1, N, C), then ``qkv``, ``proj``, ``dwc``.

    The ``mask`` argument of shifted Swin windows is accepted and ignored, as in the official
    code (spec §7.2): a linear-order attention cannot mask pairs without forming the N×N matrix.
    ``attn_drop`` is accepted for the common signature; the official module never applies it.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            grid_size: Tuple[int, int],
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            options: AttentionOptions = AttentionOptions(),
    ):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.grid_size = tuple(grid_size)
        self.focusing_factor = options.focusing_factor
        head_dim = dim // num_heads
        num_tokens = self.grid_size[0] * self.grid_size[1]

        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        self.dwc = make_dwc(head_dim, options.kernel_size)
        self.scale = nn.Parameter(torch.zeros(1, 1, dim))
        self.positional_encoding = nn.Parameter(torch.zeros(1, num_tokens, dim))

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B, N, C) with N = H·W tokens row-major on ``grid_size``; returns (B, N, C).

        The kernel and the linear-order products run in float32 even under autocast: the cube of
        the focused function and the unnormalised sums overflow float16 for inputs of magnitude
        1e2, while the projections and the DWC keep the autocast dtype.
        """
        B, N, C = x.shape
        q, k, v = self.qkv(x).unflatten(-1, (3, C)).unbind(dim=2)
        with torch.autocast(device_type=x.device.type, enabled=False):
            k = _upcast(k) + self.positional_encoding
            q = focused_kernel(_upcast(q), self.scale, self.focusing_factor)
            k = focused_kernel(k, self.scale, self.focusing_factor)
            out = linear_attention(q, k, _upcast(v), self.num_heads)
        out = out + rank_restore_dwc(self.dwc, v, self.num_heads, self.grid_size)
        return self.proj_drop(self.proj(out))

    def extra_repr(self) -> str:
        return f'dim={self.dim}, num_heads={self.num_heads}, grid_size={self.grid_size}, p={self.focusing_factor}'


# ---------------------------------------------------------------------------------------------
# Softmax attention with relative position bias (Swin's window attention)
# ---------------------------------------------------------------------------------------------

def relative_position_index(grid_size: Tuple[int, int]) -> torch.Tensor:
    """(N, N) int64 index into a ((2H−1)(2W−1), heads) bias table; entry (i, j) encodes
    ``(Δrow + H−1)·(2W−1) + (Δcol + W−1)`` with ``Δ = coord_i − coord_j`` (Swin v1)."""
    H, W = grid_size
    coords = torch.stack(torch.meshgrid(torch.arange(H), torch.arange(W), indexing='ij')).flatten(1)  # (2, N)
    delta = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0)  # (N, N, 2)
    return (delta[..., 0] + H - 1) * (2 * W - 1) + (delta[..., 1] + W - 1)


@register_attention('window_softmax')
class WindowAttention(nn.Module):
    """Swin's softmax attention over one window with a learned relative position bias.

    ``softmax(q kᵀ·d^-½ + B[index] + mask) v`` then ``proj``. State-dict names as Swin v1:
    ``relative_position_bias_table`` ((2H−1)(2W−1), heads), the persistent int64 buffer
    ``relative_position_index`` (N, N), ``qkv``, ``proj``.
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            grid_size: Tuple[int, int],
            qkv_bias: bool = True,
            attn_drop: float = 0.,
            proj_drop: float = 0.,
            options: AttentionOptions = AttentionOptions(),
    ):
        super().__init__()
        self.dim = dim
        self.num_heads = num_heads
        self.grid_size = tuple(grid_size)
        self.head_scale = options.qk_scale or (dim // num_heads) ** -0.5
        H, W = self.grid_size
        self.relative_position_bias_table = nn.Parameter(torch.zeros((2 * H - 1) * (2 * W - 1), num_heads))
        self.register_buffer('relative_position_index', relative_position_index(self.grid_size))
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=.02)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x: (B·nW, N, C); mask: (nW, N, N) of 0 / −100 for shifted windows, or None.

        Uses ``scaled_dot_product_attention``, whose kernels accumulate the logits in float32:
        under fp16 autocast, explicit ``q @ kᵀ`` overflows (> 65504) for inputs of magnitude 1e2.
        """
        B_, N, C = x.shape
        h = self.num_heads
        qkv = self.qkv(x).reshape(B_, N, 3, h, C // h).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B_, h, N, d)
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        bias = bias.view(N, N, h).permute(2, 0, 1)  # (h, N, N)
        dropout = self.attn_drop.p if self.training else 0.
        if mask is None:
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=bias.unsqueeze(0).to(q.dtype), dropout_p=dropout, scale=self.head_scale)
        else:
            num_windows = mask.shape[0]
            q, k, v = (t.view(B_ // num_windows, num_windows, h, N, -1) for t in (q, k, v))
            attn_mask = (bias.unsqueeze(0) + mask.unsqueeze(1)).to(q.dtype)  # (nW, h, N, N)
            x = F.scaled_dot_product_attention(
                q, k, v, attn_mask=attn_mask, dropout_p=dropout, scale=self.head_scale)
        x = x.reshape(B_, h, N, C // h).transpose(1, 2).reshape(B_, N, C)
        return self.proj_drop(self.proj(x))

    def extra_repr(self) -> str:
        return f'dim={self.dim}, num_heads={self.num_heads}, grid_size={self.grid_size}'
