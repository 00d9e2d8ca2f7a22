"""The one attention contract: shared projections, key/value reduction, stripe windows and extras.

Every attention kind is a subclass of :class:`Attention` and defines only how tokens mix,
:meth:`Attention.mix`: ``(q, k, v) -> out`` for the queries of one grid and the keys/values they
attend to. Everything around it is decided by the backbone through :class:`AttentionOptions` and
written once, here:

* **projections** (``options.projections``): one fused ``qkv`` Linear (Swin, DeiT), separate ``q``
  and ``kv`` Linears (PVT), or none when the block projects and passes the stacked ``(3, B, N, C)``
  Q, K, V (CSwin); then ``proj`` and its dropout unless the block owns it;
* **key/value reduction** (PVT): keys and values from a stride-``sr_ratio`` conv of the map then LN,
  or PVTv2's linear mode ``GELU(LN(Conv1x1(AvgPool(7)(map))))``;
* **stripe windows** (CSwin, ``options.window``): the map is cut into ``H_sp×W_sp`` windows, each
  attends on its own, and the result is put back on the map;
* **extras**: the key positional encoding, the rank-restoration DWC of V, and CSwin's LePE;
* **any input size**: ``forward(x, grid=...)`` runs the module on another token map than the one
  it was built for. An :class:`AttentionGeometry` says where the tokens lie (the map, the window of
  one attention, the key grid); window sides that span the build map span the new map, the others
  stay fixed, and the positional encoding is resized to the new key grid with the rule of
  ``--pretrained`` (:func:`models.grid.resized_parameter`, cached per size).

A kind declares which extras it needs with class attributes (``uses_positional_encoding``,
``uses_dwc``, ``uses_attn_drop``, ``float32_core``, ``output_factor``) and may create its own parameters in
:meth:`Attention.init_kind`. Because all of this is shared, every kind works in every backbone.

State-dict names are the official ones for each backbone: a module's own parameters come first
(``scale``, ``positional_encoding``, a bias table), then its children in the order
``qkv | q, kv``, ``proj``, ``pool, sr, norm, act``, the kind's modules, ``get_v``, ``dwc``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, NamedTuple, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..grid import GridSpec, resized_parameter, size_dependent, symbolic
from .core import rank_restore_dwc
from .focused import make_dwc, upcast

__all__ = ['AttentionOptions', 'AttentionGeometry', 'Attention', 'set_fused_attention', 'set_compiled_core',
           'focused_modules', 'PROJECTIONS', 'LINEAR_POOL_SIZE', 'LEPE_KERNEL_SIZE', 'resolve_window',
           'stripe_partition', 'stripe_reverse', 'resample_tokens', 'locally_enhanced_pe']

torch.fx.wrap('size_dependent')

# Where Q, K and V come from (see the module docstring).
PROJECTIONS = ('qkv', 'q_kv', 'block')
# PVTv2 linear mode pools the map to a fixed 7×7 grid of key/value tokens, whatever the stage.
LINEAR_POOL_SIZE = 7
# LePE: CSwin's locally-enhanced positional encoding, a depthwise 3×3 conv on V inside each window.
LEPE_KERNEL_SIZE = 3


@dataclass(frozen=True)
class AttentionOptions:
    """Knobs of an attention module: the kind's (``MODEL.LA``) and the layout the backbone sets."""
    focusing_factor: int = 3  # power p of the focused function f_p
    kernel_size: int = 5  # depthwise rank-restoration conv (DWC) kernel
    qk_scale: Optional[float] = None  # softmax logit scale; None means head_dim ** -0.5
    projections: str = 'qkv'  # one of PROJECTIONS
    sr_ratio: int = 1  # keys/values from a stride-sr conv of the map (1: no reduction)
    linear: bool = False  # PVTv2 "linear" mode: keys/values from a 7×7 average pool of the map
    window: Optional[Tuple[int, int]] = None  # stripe window inside the grid (None: the whole grid)
    lepe: bool = False  # add CSwin's LePE(V)


class AttentionGeometry(NamedTuple):
    """Where the tokens of one forward call lie (each an (H, W) size).

    grid: the token map the module sees; window: the query grid of one attention (a stripe, or
    the map); key_grid: the grid of the keys of one attention (the window, or its reduced /
    7×7-pooled map).
    """
    grid: Tuple[int, int]
    window: Tuple[int, int]
    key_grid: Tuple[int, int]


def resolve_window(grid_size: Tuple[int, int], window: Optional[Tuple[int, int]]) -> Tuple[int, int]:
    """The stripe ``(H_sp, W_sp)`` of `window` on the ``grid_size`` map (None: the whole map).

    Raises ValueError naming both sizes when the window does not tile the map, so a bad split is
    reported when the module is built, never mid-forward.
    """
    H, W = grid_size
    if window is None:
        return H, W
    H_sp, W_sp = window
    if (H_sp < 1) or (W_sp < 1) or (H % H_sp) or (W % W_sp):
        raise ValueError(f'stripe window {H_sp}x{W_sp} does not tile the {H}x{W} map')
    return H_sp, W_sp


def stripe_partition(x: torch.Tensor, grid_size: Tuple[int, int], window: Tuple[int, int]) -> torch.Tensor:
    """(B, H·W, C) -> (B·nW, H_sp·W_sp, C): windows batch-major, then window-row, then window-column;
    tokens row-major inside a window (the official CSwin ``img2windows``)."""
    B, _, C = x.shape
    H, W = grid_size
    H_sp, W_sp = window
    if symbolic(H, W):  # one gather: permuting a map of symbolic size would pin it (docs/export.md)
        return x.index_select(1, _stripe_index(grid_size, window, x.device)).view(-1, H_sp * W_sp, C)
    x = x.reshape(B, H // H_sp, H_sp, W // W_sp, W_sp, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H_sp * W_sp, C)


def _stripe_index(grid_size: Tuple[int, int], window: Tuple[int, int], device: torch.device) -> torch.Tensor:
    """The token index (row-major on the map) at each position of :func:`stripe_partition`'s layout."""
    (H, W), (H_sp, W_sp) = grid_size, window
    row = torch.arange(H, device=device).view(H // H_sp, 1, H_sp, 1)
    col = torch.arange(W, device=device).view(1, W // W_sp, 1, W_sp)
    return (row * W + col).reshape(-1)


def stripe_reverse(windows: torch.Tensor, grid_size: Tuple[int, int], window: Tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`stripe_partition`: (B·nW, H_sp·W_sp, C) -> (B, H·W, C)."""
    C = windows.shape[-1]
    H, W = grid_size
    H_sp, W_sp = window
    if symbolic(H, W):  # the inverse gather of stripe_partition's
        row = torch.arange(H, device=windows.device).view(-1, 1)
        col = torch.arange(W, device=windows.device).view(1, -1)
        stripe_row, stripe_col = row // H_sp, col // W_sp  # no remainder by a symbolic size (ONNX)
        position = ((stripe_row * (W // W_sp) + stripe_col) * (H_sp * W_sp) + (row - stripe_row * H_sp) * W_sp
                    + (col - stripe_col * W_sp))
        return windows.reshape(-1, H * W, C).index_select(1, position.reshape(-1))
    x = windows.reshape(-1, H // H_sp, W // W_sp, H_sp, W_sp, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H * W, C)


def resample_tokens(x: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """1-D linear interpolation along the flattened token axis: (B, n, C) -> (B, num_tokens, C).

    Each channel's length-n sequence is resampled independently (``align_corners=False``), so rows
    of a small grid are smeared along the row-major sequence rather than upsampled in 2-D. That is
    how the official FLatten-PVT feeds V of a reduced map to the DWC of the full map
    (docs/numerics.md, "PVT v1 key/value reduction").
    """
    if not symbolic(x.shape[1], num_tokens) and x.shape[1] == num_tokens:
        return x
    return F.interpolate(x.transpose(1, 2), size=num_tokens, mode='linear', align_corners=False).transpose(1, 2)


def locally_enhanced_pe(get_v: nn.Conv2d, v: torch.Tensor, window: Tuple[int, int]) -> torch.Tensor:
    """LePE(V): `get_v` (depthwise, one kernel per channel) on each window image, zero-padded at the
    window border. v: (B·nW, H_sp·W_sp, C) raw values in window layout; returns the same shape."""
    B_, N, C = v.shape
    image = v.transpose(1, 2).reshape(B_, C, *window)
    return get_v(image).reshape(B_, C, N).transpose(1, 2)


def _check_options(dim: int, num_heads: int, options: AttentionOptions) -> None:
    if options.projections not in PROJECTIONS:
        raise ValueError(f'attention projections={options.projections!r} is not one of {list(PROJECTIONS)}')
    if dim % num_heads:
        raise ValueError(f'attention width {dim} is not divisible by num_heads={num_heads}')
    if options.sr_ratio < 1:
        raise ValueError(f'attention sr_ratio must be >= 1, got {options.sr_ratio}')
    if (options.sr_ratio > 1 or options.linear) and (options.projections != 'q_kv'):
        raise ValueError(f'attention: a key/value reduction needs projections=\'q_kv\' (separate q and kv '
                         f'Linears, as in PVT), got {options.projections!r}')
    if (options.window is not None) and (options.sr_ratio > 1 or options.linear):
        raise ValueError('attention: a stripe window and a key/value reduction cannot be combined')


class Attention(nn.Module):
    """Base of every attention kind (see the module docstring for the contract).

    Args:
        dim, num_heads: width C and heads h (C divisible by h).
        grid_size: (H, W) of the token map the module sees; tokens are row-major on it. A kind that
            needs no grid (softmax without reduction) accepts other token counts (a class token).
        qkv_bias: bias of the Q/K/V projections; attn_drop: attention-probability dropout of the
            softmax kinds; proj_drop: dropout after ``proj``.
        options: :class:`AttentionOptions`.

    ``forward(x)``: x is (B, N, C), or the stacked (3, B, N, C) with ``projections='block'``;
    returns (B, N, C). ``mask`` (Swin's shifted-window mask) reaches :meth:`mix`, where only the
    softmax kinds apply it (docs/differences.md, "Swin shift mask ignored by focused attention").

    ``fused``: kinds with a fast path (the focused core, the DWC) use it when True (the default);
    :func:`set_fused_attention` switches every module to the reference. ``compiled_core``: the
    focused kinds run their core through ``torch.compile`` (and, in training, their DWC's weight
    gradient; :func:`set_compiled_core`).
    """
    kind: str  # set by register_attention
    uses_positional_encoding = False  # a learned (1, n, C) encoding added to the keys
    uses_dwc = False  # the rank-restoration DWC of V on the query grid
    float32_core = False  # mix() runs in float32 with autocast off (its sums overflow float16)
    output_factor = 1  # mix() returns output_factor·C channels (proj maps them back to C)
    uses_attn_drop = False  # dropout on attention probabilities (softmax kinds; linear kinds have none)
    has_compiled_core = False  # mix() honours ``compiled_core`` (set_compiled_core)

    def __init__(self, dim: int, num_heads: int, grid_size: Tuple[int, int], qkv_bias: bool = True,
                 attn_drop: float = 0., proj_drop: float = 0., options: AttentionOptions = AttentionOptions()):
        super().__init__()
        _check_options(dim, num_heads, options)
        self.dim, self.num_heads, self.grid_size = dim, num_heads, tuple(grid_size)
        self.head_dim = dim // num_heads
        self.projections = options.projections
        self.window = resolve_window(self.grid_size, options.window)  # the query grid of one attention
        self.fused = True
        self.compiled_core = False
        self.init_kind(options)  # the kind's own parameters first, as in the official state dicts
        self._init_reduction(dim, options)
        self.build_geometry = AttentionGeometry(self.grid_size, self.window, self.key_grid)
        if self.uses_positional_encoding:
            self.positional_encoding = nn.Parameter(torch.zeros(1, self.key_grid[0] * self.key_grid[1], dim))
        self._init_projections(dim, qkv_bias, attn_drop, proj_drop)
        self._init_reduction_modules(dim, options)
        self.init_kind_modules(options)
        self.get_v = nn.Conv2d(dim, dim, LEPE_KERNEL_SIZE, padding=LEPE_KERNEL_SIZE // 2, groups=dim) \
            if options.lepe else None
        self.dwc = make_dwc(self.head_dim, options.kernel_size) if self.uses_dwc else None

    # -- construction ------------------------------------------------------------------------

    def init_kind(self, options: AttentionOptions) -> None:
        """Create the kind's own parameters (before the shared ones); nothing by default."""

    def init_kind_modules(self, options: AttentionOptions) -> None:
        """Create the kind's own submodules (after projections and reduction); nothing by default."""

    def _init_reduction(self, dim: int, options: AttentionOptions) -> None:
        H, W = self.window
        self.sr_ratio, self.linear = options.sr_ratio, options.linear
        if self.uses_positional_encoding and (self.sr_ratio > 1) and ((H % self.sr_ratio) or (W % self.sr_ratio)):
            # one encoding vector per reduced cell: refuse to drop map borders of the build size
            raise ValueError(f'{self.kind} attention: grid {H}x{W} is not divisible by the spatial-reduction '
                             f'ratio {self.sr_ratio}')
        self.key_grid = self._key_grid(self.window)

    def _key_grid(self, window: Tuple[int, int]) -> Tuple[int, int]:
        """The key grid of one attention on `window`: PVTv2's fixed 7×7 pool, the stride-``sr_ratio``
        conv's map (a map the stride does not divide loses its last rows/columns, as in the
        original PVT), or the window itself."""
        if self.linear:
            return LINEAR_POOL_SIZE, LINEAR_POOL_SIZE
        if self.sr_ratio > 1:
            return window[0] // self.sr_ratio, window[1] // self.sr_ratio
        return window

    def geometry(self, grid: Optional[Tuple[int, int]] = None) -> AttentionGeometry:
        """The geometry of a forward call on the `grid` map (None: the build map).

        A window side that spans the build map spans `grid`; a narrower side (a stripe width) is
        kept and must divide `grid` (the block pads the map). Raises ValueError naming both sizes.
        """
        if grid is None:
            return self.build_geometry
        if symbolic(*grid):  # traced at dynamic sizes: comparing with the build map would pin the size
            grid = tuple(grid)
        elif tuple(grid) == self.grid_size:
            return self.build_geometry
        else:
            grid = (int(grid[0]), int(grid[1]))
        window = tuple(size if spans == built else spans
                       for size, spans, built in zip(grid, self.window, self.grid_size, strict=True))
        if not symbolic(*grid) and ((grid[0] % window[0]) or (grid[1] % window[1])):
            raise ValueError(f'{self.kind} attention: its {window[0]}x{window[1]} stripe window does not tile the '
                             f'{grid[0]}x{grid[1]} map (pad the map to whole stripes)')
        return AttentionGeometry(grid, window, self._key_grid(window))

    def striped(self, geometry: AttentionGeometry) -> bool:
        """Whether the map of `geometry` is cut into several stripe windows. At symbolic sizes: whether
        the build window is a stripe (comparing symbolic sides would pin them; a single stripe covering
        the map gives the same result as the whole map)."""
        if symbolic(*geometry.grid):
            return self.window != self.grid_size
        return geometry.window != geometry.grid

    def key_encoding(self, geometry: AttentionGeometry) -> torch.Tensor:
        """The key positional encoding (1, n, C) for the key grid of `geometry`: the parameter at
        the build size, else the parameter resized to that grid (cached per size)."""
        return resized_parameter(self.positional_encoding, GridSpec(self.key_grid), geometry.key_grid)

    def _init_projections(self, dim: int, qkv_bias: bool, attn_drop: float, proj_drop: float) -> None:
        if self.projections == 'qkv':
            self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        elif self.projections == 'q_kv':
            self.q = nn.Linear(dim, dim, bias=qkv_bias)
            self.kv = nn.Linear(dim, dim * 2, bias=qkv_bias)
        if self.uses_attn_drop:
            self.attn_drop = nn.Dropout(attn_drop)
        # the block owns proj with projections='block', unless this kind changes the width
        if (self.projections != 'block') or (self.output_factor != 1):
            self.proj = nn.Linear(dim * self.output_factor, dim)
            self.proj_drop = nn.Dropout(proj_drop)
        else:
            self.proj = None

    def _init_reduction_modules(self, dim: int, options: AttentionOptions) -> None:
        if self.linear:
            self.pool = nn.AdaptiveAvgPool2d(LINEAR_POOL_SIZE)
            self.sr = nn.Conv2d(dim, dim, kernel_size=1, stride=1)
            self.norm = nn.LayerNorm(dim)
            self.act = nn.GELU()
        elif self.sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=self.sr_ratio, stride=self.sr_ratio)
            self.norm = nn.LayerNorm(dim)

    # -- forward -----------------------------------------------------------------------------

    def project(self, x: torch.Tensor, geometry: Optional[AttentionGeometry] = None
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Module input -> q (B', N', C) and k, v (B', n', C) on the attention grids: projected,
        keys/values reduced, cut into stripe windows (B' = B·windows). `geometry`: the build one
        when None."""
        geometry = geometry or self.build_geometry
        if self.projections == 'block':
            q, k, v = x.unbind(0)
        elif self.projections == 'qkv':
            q, k, v = self.qkv(x).unflatten(-1, (3, self.dim)).unbind(dim=2)
        else:
            q = self.q(x)
            k, v = self.kv(self._key_value_input(x, geometry.grid)).unflatten(-1, (2, self.dim)).unbind(dim=2)
        if self.striped(geometry):
            q, k, v = (stripe_partition(t, geometry.grid, geometry.window) for t in (q, k, v))
        return q, k, v

    def _key_value_input(self, x: torch.Tensor, grid: Tuple[int, int]) -> torch.Tensor:
        """x: (B, N, C) tokens of the `grid` map -> (B, n, C), the input of ``kv``."""
        if (not self.linear) and (self.sr_ratio == 1):
            return x
        B, N, C = x.shape
        image = x.transpose(1, 2).reshape(B, C, *grid)
        if self.linear:
            return self.act(self.norm(self.sr(self.pool(image)).flatten(2).transpose(1, 2)))
        return self.norm(self.sr(image).flatten(2).transpose(1, 2))

    def attend(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor] = None,
               geometry: Optional[AttentionGeometry] = None) -> torch.Tensor:
        """The attention of q on (k, v) of one window: the kind's :meth:`mix` plus the DWC and LePE.

        With ``float32_core`` the mixing runs in float32 even under autocast (the cube of the focused
        function and the unnormalised key sums overflow float16 for inputs of magnitude 1e2), while
        the projections and the convolutions keep the autocast dtype.
        """
        geometry = geometry or self.build_geometry
        if self.float32_core:
            # a compiled core converts q, k, v inside its graph, so no float32 copies are stored for the backward
            cast = upcast if not (self.has_compiled_core and self.compiled_core) else (lambda t: t)
            with torch.autocast(device_type=q.device.type, enabled=False):
                out = self.mix(cast(q), cast(k), cast(v), mask, geometry)
        else:
            out = self.mix(q, k, v, mask, geometry)
        extras = 0
        if self.dwc is not None:  # V of a reduced map is resampled to the query tokens first
            v_map = resample_tokens(v, q.shape[1])
            extras = rank_restore_dwc(self.dwc, v_map, self.num_heads, geometry.window, self.fused,
                                      compiled=self.compiled_core and self.has_compiled_core)
        if self.get_v is not None:
            extras = extras + locally_enhanced_pe(self.get_v, v, geometry.window)
        if isinstance(extras, int):
            return out
        if self.output_factor == 1:
            return out + extras
        # a multi-scale kind: the extras join the heads of the tokens themselves (the first C channels)
        return torch.cat([out[..., :self.dim] + extras, out[..., self.dim:]], dim=-1)

    def mix(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Optional[torch.Tensor],
            geometry: AttentionGeometry) -> torch.Tensor:
        """(B, N, C) queries, (B, n, C) keys and values on the grids of `geometry` ->
        (B, N, output_factor·C); each kind's own."""
        raise NotImplementedError(f'attention kind {type(self).__name__} does not define mix()')

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None,
                grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        """x on the `grid` map (None: the build map ``grid_size``); see the class docstring."""
        return size_dependent(self, x, mask, grid)

    def size_dependent_forward(self, x: torch.Tensor, mask: Optional[torch.Tensor],
                               grid: Optional[Tuple[int, int]]) -> torch.Tensor:
        geometry = self.geometry(grid)
        q, k, v = self.project(x, geometry)
        out = self.attend(q, k, v, mask, geometry)
        if self.striped(geometry):
            out = stripe_reverse(out, geometry.grid, geometry.window)
        if self.proj is None:
            return out.to(x.dtype)
        return self.proj_drop(self.proj(out))

    # -- introspection -----------------------------------------------------------------------

    def heads(self, x: torch.Tensor) -> torch.Tensor:
        """(B, N, h·d) -> (B, h, N, d)."""
        B, N, C = x.shape
        return x.reshape(B, N, self.num_heads, C // self.num_heads).transpose(1, 2)

    @staticmethod
    def merge_heads(x: torch.Tensor) -> torch.Tensor:
        """(B, h, N, d) -> (B, N, h·d)."""
        B, h, N, d = x.shape
        x = x.transpose(1, 2)
        if torch.compiler.is_exporting():
            # a copy in the graph: the traced reshape is a view for the strides of the traced attention, which the
            # ONNX exporter's decomposition of scaled_dot_product_attention does not keep
            x = x.clone(memory_format=torch.contiguous_format)
        return x.reshape(B, N, h * d)

    def parameter_grids(self) -> Dict[str, GridSpec]:
        # one positional encoding per key token: the (window, reduced or 7×7 pooled) key grid
        return {'positional_encoding': GridSpec(self.key_grid)} if self.uses_positional_encoding else {}

    def extra_repr(self) -> str:
        text = f'dim={self.dim}, num_heads={self.num_heads}, grid_size={self.grid_size}'
        if self.window != self.grid_size:
            text += f', window={self.window}'
        if self.key_grid != self.window:
            text += f', key_grid={self.key_grid}'
        return text


def set_fused_attention(model: nn.Module, enabled: bool = True) -> int:
    """Switch every attention module of `model` to its fast path (the default) or to the reference
    implementation; returns how many modules were switched."""
    modules = [module for module in model.modules() if isinstance(module, Attention)]
    for module in modules:
        module.fused = enabled
    return len(modules)


def focused_modules(model: nn.Module) -> List[Attention]:
    """The attention modules of `model` whose kind has a compilable focused core (``has_compiled_core``)."""
    return [module for module in model.modules() if isinstance(module, Attention) and module.has_compiled_core]


def set_compiled_core(model: nn.Module, enabled: bool = True) -> int:
    """Run the core of every focused attention module of `model` through ``torch.compile``, in
    training (with the DWC's weight gradient) and without gradients (``--compile-core``;
    models.attention.compiled, ``compiled=True``), or back on the eager fused path; returns how many
    modules were switched (those with ``has_compiled_core``)."""
    modules = focused_modules(model)
    for module in modules:
        module.compiled_core = enabled
    return len(modules)
