"""FLatten-Swin: Swin Transformer v1 with focused linear attention in chosen stages
(docs/numerics.md, "Swin backbone").

One class builds both FLatten-Swin (``attn_type='LLSS'``, global L windows) and the plain Swin
baseline (``attn_type='SSSS'``, window 7). State-dict names, shapes and order are those of the
official ``FLattenSwinTransformer`` (``tests/assets/official_state_dicts/flatten_swin_*.txt``),
including the persistent buffers ``relative_position_index`` and ``attn_mask``.

Window rules (official):

* L blocks use ``window_size``; S blocks use ``softmax_window_size``, by default 7 when
  ``window_size <= 56`` else 12.
* Odd blocks shift by ``window // 2``.
* A window that covers the whole stage map (``min(resolution) <= window``) is clamped to the map
  and never shifted: ``window_size=56`` means global attention at 224².

Any input size (docs/numerics.md, "Any input size"), as Swin's detection backbone does it:

* the image is padded to whole patches, an odd map before a patch merging to an even one, and a
  map to whole windows inside each block (the padded tokens take part in attention, and the shift
  mask is that of the padded map);
* **global L blocks stay global**: an L block whose window covers the map at the build size
  attends over the whole map at any size (non-square maps included), its positional encoding
  resized to the map; with ``fixed_window=True`` it keeps its build window instead (windows of
  56×56 at 224², padded), for very large inputs;
* every other block keeps its window and relative position table; odd blocks shift by
  ``window // 2`` whenever the map is larger than one window.
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, PatchEmbed, to_2tuple, trunc_normal_

from .attention import AttentionOptions, block_kinds, create_attention, letter_kinds
from .grid import GridSpec, ceil_div, gather_map, padded_size, resized_tokens, size_dependent, symbolic
from .layers import Backbone, run_blocks
from .registry import register_variants

__all__ = ['FLattenSwinTransformer', 'window_partition', 'window_reverse', 'shifted_window_mask', 'hard_mask']

torch.fx.wrap('resized_tokens')
torch.fx.wrap('size_dependent')

# Swin's S stages: softmax with the relative position bias of the window.
SWIN_SOFTMAX_KIND = 'window_softmax'


def window_partition(x: torch.Tensor, window_size: Union[int, Tuple[int, int]]) -> torch.Tensor:
    """(B, H, W, C) -> (B·nW, wh, ww, C); windows row-major, tokens row-major inside. An int
    `window_size` is a square window."""
    B, H, W, C = x.shape
    wh, ww = to_2tuple(window_size)
    x = x.view(B, H // wh, wh, W // ww, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, wh, ww, C)


def window_reverse(windows: torch.Tensor, window_size: Union[int, Tuple[int, int]], H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B·nW, wh, ww, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    wh, ww = to_2tuple(window_size)
    x = windows.view(-1, H // wh, W // ww, wh, ww, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, H, W, C)


def shifted_window_mask(resolution: Tuple[int, int], window_size: int, shift_size: int) -> torch.Tensor:
    """(nW, ws², ws²) float mask: 0 within a region of the rolled map, −100 across regions."""
    H, W = resolution
    labels = torch.zeros((1, H, W, 1))
    cnt = 0
    for h in (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None)):
        for w in (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None)):
            labels[:, h, w, :] = cnt
            cnt += 1
    windows = window_partition(labels, window_size).view(-1, window_size * window_size)
    mask = windows.unsqueeze(1) - windows.unsqueeze(2)
    return mask.masked_fill(mask != 0, -100.0).masked_fill(mask == 0, 0.0)


def hard_mask(mask: torch.Tensor) -> torch.Tensor:
    """The −100 entries of a shift mask (the official value, kept in the buffer) as −inf.

    With −100 the masked logits sit ~100 below the row maximum, and e^−100 ≈ 3.7e−44 is a float32
    (and bfloat16) subnormal: x86 CPUs compute on subnormals far slower, so the softmax and both
    matmuls of a shifted block slowed down several times (docs/numerics.md, "Swin backbone"). With −inf
    those probabilities are exactly 0 instead of 3.7e−44, which no float32 sum of them can register;
    every query keeps its own region (the diagonal is 0), so no row is all −inf.
    """
    return mask.masked_fill(mask < 0, float('-inf'))


class SwinTransformerBlock(nn.Module):
    """Pre-norm block: (shifted) window attention of kind `attn_kind`, then the MLP.

    x: (B, H·W, C) tokens of a `resolution` map -> (B, H·W, C). The shift mask of the build size is
    a persistent buffer on the block (official layout); focused linear attention receives it and
    ignores it (docs/differences.md, "Swin shift mask ignored by focused attention"). An L block
    whose window covers the build map is *global* (``global_attention``): its window is the whole
    map at any input size, unless `fixed_window`. See the module docstring for other sizes.
    """

    def __init__(
            self,
            dim: int,
            input_resolution: Tuple[int, int],
            num_heads: int,
            window_size: int = 7,
            shift_size: int = 0,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            norm_layer: type = nn.LayerNorm,
            attn_kind: str = 'window_softmax',
            attn_options: AttentionOptions = AttentionOptions(),
            fixed_window: bool = False,
    ):
        super().__init__()
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        covers = min(self.input_resolution) <= window_size
        self.global_attention = covers and (attn_kind != SWIN_SOFTMAX_KIND) and not fixed_window
        if covers:
            # the window covers the map: clamp it to the map, nothing to shift at this size
            window_size = min(self.input_resolution)
        self.window_size = window_size
        self.shift_when_windowed = (window_size // 2) if (shift_size > 0) else 0
        window, self.shift_size = self.window_for(self.input_resolution)

        self.norm1 = norm_layer(dim)
        self.attn = create_attention(
            attn_kind, dim, num_heads, grid_size=window, qkv_bias=qkv_bias, attn_drop=attn_drop, proj_drop=drop,
            options=attn_options)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        padded = padded_size(self.input_resolution, window)
        mask = shifted_window_mask(padded, window_size, self.shift_size) if self.shift_size > 0 else None
        self.register_buffer('attn_mask', mask)

    def window_for(self, resolution: Tuple[int, int]) -> Tuple[Tuple[int, int], int]:
        """The window and the shift of this block on a `resolution` map: the whole map for a global
        block, else the block's window, shifted (odd blocks) when the map exceeds one window."""
        if self.global_attention:
            return tuple(resolution), 0
        shift = self.shift_when_windowed if min(resolution) > self.window_size else 0
        return (self.window_size, self.window_size), shift

    def shift_mask(self, padded: Tuple[int, int], shift: int, device: torch.device) -> Optional[torch.Tensor]:
        """The shift mask of the `padded` map as the attention adds it (:func:`hard_mask`): from the
        buffer at the build size, else computed once per size and device."""
        if shift == 0:
            return None
        if (self.attn_mask is not None) and (padded == padded_size(self.input_resolution, (self.window_size,) * 2)):
            return hard_mask(self.attn_mask)
        cache = self.__dict__.setdefault('_mask_cache', {})
        key = (padded, shift, device)
        if key not in cache:
            cache[key] = hard_mask(shifted_window_mask(padded, self.window_size, shift).to(device))
        return cache[key]

    def forward(self, x: torch.Tensor, resolution: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        return size_dependent(self, x, resolution)

    def size_dependent_forward(self, x: torch.Tensor, resolution: Optional[Tuple[int, int]]) -> torch.Tensor:
        H, W = resolution or self.input_resolution
        attention = self.traced_attention if symbolic(H, W) else self.window_attention
        x = x + self.drop_path(attention(self.norm1(x), H, W))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def window_attention(self, x: torch.Tensor, H: int, W: int) -> torch.Tensor:
        """The attention branch on normed tokens x (B, H·W, C): pad to whole windows, roll by the shift,
        attend per window, and undo all three."""
        B, L, C = x.shape
        window, shift = self.window_for((H, W))
        x = x.view(B, H, W, C)
        Hp, Wp = padded_size((H, W), window)
        if (Hp, Wp) != (H, W):
            x = F.pad(x, (0, 0, 0, Wp - W, 0, Hp - H))
        if shift > 0:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        windows = window_partition(x, window).reshape(-1, window[0] * window[1], C)  # may be a strided view
        windows = self.attn(windows, mask=self.shift_mask((Hp, Wp), shift, x.device), grid=window)
        x = window_reverse(windows.reshape(-1, *window, C), window, Hp, Wp)
        if shift > 0:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        return x[:, :H, :W].reshape(B, H * W, C)

    def traced_attention(self, x: torch.Tensor, H, W) -> torch.Tensor:
        """:meth:`window_attention` at symbolic sizes (torch.export): the same numbers, written without
        size comparisons, which would pin the traced size, and without permuting maps of symbolic size,
        whose stride checks do too (docs/export.md). A global block attends over the tokens as they are.

        Padding, the cyclic shift and the window partition are one gather of the tokens, and their
        inverse another; the shift is ``window // 2`` or 0 as a symbolic integer, and the shift mask
        comes from index arithmetic (all zeros where the eager forward has none)."""
        if self.global_attention:
            return self.attn(x, grid=(H, W))
        B, L, C = x.shape
        ws = self.window_size
        rows, cols = (H + ws - 1) // ws, (W + ws - 1) // ws  # windows per axis
        Hp, Wp = rows * ws, cols * ws
        shift = 0
        if self.shift_when_windowed:
            shift = torch.sym_ite(torch.sym_min(H, W) > ws, self.shift_when_windowed, 0)
        # the rows and columns of the padded map rolled by -shift, laid out as [window row, window column,
        # row in window, column in window], and the token each position reads (past the map: zeros)
        row = torch.arange(Hp, device=x.device).view(rows, 1, ws, 1)
        col = torch.arange(Wp, device=x.device).view(1, cols, 1, ws)
        windows = gather_map(x, (H, W), _wrap(row + shift, Hp), _wrap(col + shift, Wp))
        mask = None
        if self.shift_when_windowed:  # regions 0/1/2 per axis of the rolled map, as shifted_window_mask
            region = (_region(row, Hp, ws, shift) * 3 + _region(col, Wp, ws, shift)).view(rows * cols, ws * ws)
            mask = torch.where(region.unsqueeze(1) != region.unsqueeze(2), float('-inf'), 0.0).to(x.dtype)
        windows = self.attn(windows.view(B * rows * cols, ws * ws, C), mask=mask, grid=(ws, ws))
        # back: token (h, w) sits at ((h - shift) mod Hp, (w - shift) mod Wp) of the rolled map
        row = _wrap(torch.arange(H, device=x.device) + (Hp - shift), Hp).view(-1, 1)
        col = _wrap(torch.arange(W, device=x.device) + (Wp - shift), Wp).view(1, -1)
        back = ((row // ws) * cols + col // ws) * (ws * ws) + (row % ws) * ws + col % ws
        return windows.view(B, rows * cols * ws * ws, C).index_select(1, back.reshape(-1))

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, input_resolution={self.input_resolution}, window_size={self.window_size}, '
                f'shift_size={self.shift_size}, global_attention={self.global_attention}')


def _wrap(index: torch.Tensor, size) -> torch.Tensor:
    """`index` mod `size` for indices in [0, 2·size), without a remainder by a symbolic size (which
    the ONNX exporter cannot translate)."""
    return torch.where(index >= size, index - size, index)


def _region(index: torch.Tensor, size, window: int, shift) -> torch.Tensor:
    """Region label (0, 1, 2) of each row `index` of a rolled map of `size` rows, as
    :func:`shifted_window_mask` assigns them: before the last window, in it before the last `shift`
    rows, in those rows."""
    return (index >= size - window).long() + (index >= size - shift).long()


class PatchMerging(nn.Module):
    """2×2 neighbourhood concat (Swin v1 order), LN(4C), Linear 4C→2C without bias.

    x: (B, H·W, C) on a `resolution` map -> (B, ⌈H/2⌉·⌈W/2⌉, 2C); an odd map is zero-padded first.
    """

    def __init__(self, input_resolution: Tuple[int, int], dim: int, norm_layer: type = nn.LayerNorm):
        super().__init__()
        self.input_resolution = tuple(input_resolution)
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(4 * dim)

    def forward(self, x: torch.Tensor, resolution: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        return size_dependent(self, x, resolution)

    def size_dependent_forward(self, x: torch.Tensor, resolution: Optional[Tuple[int, int]]) -> torch.Tensor:
        H, W = resolution or self.input_resolution
        B, L, C = x.shape
        x = x.view(B, H, W, C)
        if symbolic(H, W):  # one gather, in the concat order below, without parity tests or strided slices
            h, w = half_size((H, W))
            row = torch.arange(2 * h, device=x.device).view(h, 1, 1, 2)  # [y, x, dw, dh]: row 2y + dh
            col = torch.arange(2 * w, device=x.device).view(1, w, 2, 1)  # column 2x + dw
            x = gather_map(x.view(B, L, C), (H, W), row, col)
            return self.reduction(self.norm(x.view(B, h * w, 4 * C)))
        if (H % 2) or (W % 2):
            x = F.pad(x, (0, 0, 0, W % 2, 0, H % 2))
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(B, -1, 4 * C)))


class BasicLayer(nn.Module):
    """One stage: blocks with alternating shifts, then optional PatchMerging (``downsample``, which
    the model applies after taking the stage's features)."""

    def __init__(
            self,
            dim: int,
            input_resolution: Tuple[int, int],
            num_heads: int,
            attn_kinds: Sequence[str],
            window_sizes: Sequence[int],
            mlp_ratio: float,
            qkv_bias: bool,
            drop: float,
            attn_drop: float,
            drop_path: Sequence[float],
            norm_layer: type,
            downsample: bool,
            attn_options: AttentionOptions,
            fixed_window: bool = False,
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(
                dim=dim, input_resolution=input_resolution, num_heads=num_heads, window_size=window_sizes[j],
                shift_size=0 if j % 2 == 0 else window_sizes[j] // 2, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                drop=drop, attn_drop=attn_drop, drop_path=drop_path[j], norm_layer=norm_layer,
                attn_kind=attn_kinds[j], attn_options=attn_options, fixed_window=fixed_window)
            for j in range(len(attn_kinds))])
        self.downsample = PatchMerging(input_resolution, dim, norm_layer) if downsample else None

    def forward(self, x: torch.Tensor, resolution: Tuple[int, int]) -> torch.Tensor:
        """The blocks on x (B, H·W, C) of the `resolution` map (without the downsampling)."""
        return run_blocks(self.blocks, x, self.grad_checkpointing, resolution)


def half_size(resolution: Tuple[int, int]) -> Tuple[int, int]:
    """The map after a 2×2 patch merging (odd sides padded): ⌈H/2⌉ × ⌈W/2⌉."""
    return (resolution[0] + 1) // 2, (resolution[1] + 1) // 2


class FLattenSwinTransformer(Backbone):
    """Swin Transformer v1 whose stages use focused linear (L) or window softmax (S) attention.

    Args:
        img_size: build input size (int or (H, W)): it sizes the positional tensors; the model
            runs at any size of at least ``patch_size · 2^(stages−1)`` (module docstring).
        window_size: window of the L blocks (clamped to the stage map, so 56 is global at 224).
        fixed_window: L blocks global at the build size keep their build window at other sizes
            (padded) instead of following the map (``MODEL.SWIN.FIXED_WINDOW``).
        softmax_window_size: window of the S blocks; None keeps the official rule (7, or 12 when
            ``window_size > 56``).
        attn_type: one letter per stage (``L``/``S``/``M``) plus the ``M`` block count, e.g. 'LLMS2'.
        focusing_factor, kernel_size: focused-attention power p and DWC kernel.

    ``forward_features`` returns the final-normed tokens (B, L, C); ``forward_head`` averages them
    and applies ``head``.
    """
    first_conv = 'patch_embed.proj'  # timm's pretrained_cfg name of the input layer

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dim: int = 96,
            depths: Sequence[int] = (2, 2, 6, 2),
            num_heads: Sequence[int] = (3, 6, 12, 24),
            window_size: int = 7,
            softmax_window_size: Optional[int] = None,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.1,
            norm_layer: type = nn.LayerNorm,
            ape: bool = False,
            patch_norm: bool = True,
            attn_type: str = 'LLLL',
            linear_kind: str = 'focused_linear',
            focusing_factor: int = 3,
            kernel_size: int = 5,
            fixed_window: bool = False,
            use_checkpoint: bool = False,
    ):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f'Swin: DEPTHS {list(depths)} and NUM_HEADS {list(num_heads)} must have the same length')
        img_size = to_2tuple(img_size)
        self.min_input_size = patch_size * 2 ** (len(depths) - 1)
        self.check_size(img_size)
        self.img_size = img_size
        self.num_classes = num_classes
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.num_features = int(embed_dim * 2 ** (self.num_layers - 1))
        self.head_hidden_size = self.num_features  # timm 1.0: what the classifier reads (no pre-logits)
        self.ape = ape
        self.attn_type = attn_type
        if softmax_window_size is None:
            softmax_window_size = 7 if window_size <= 56 else 12
        self.window_sizes = (window_size, softmax_window_size)  # (L blocks, S blocks), before clamping

        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            norm_layer=norm_layer if patch_norm else None, strict_img_size=False, dynamic_img_pad=True)
        self.grid = grid = self.patch_embed.dynamic_feat_size(img_size)  # a partial patch is padded
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=.02)
        self.pos_drop = nn.Dropout(p=drop_rate)

        kinds = block_kinds(attn_type, depths, letter_kinds(linear_kind, SWIN_SOFTMAX_KIND))
        options = AttentionOptions(focusing_factor=focusing_factor, kernel_size=kernel_size, qk_scale=qk_scale)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        resolution = grid
        for i in range(self.num_layers):
            last = i == self.num_layers - 1
            windows = [softmax_window_size if kind == SWIN_SOFTMAX_KIND else window_size for kind in kinds[i]]
            self.layers.append(BasicLayer(
                dim=embed_dim * 2 ** i, input_resolution=resolution, num_heads=num_heads[i], attn_kinds=kinds[i],
                window_sizes=windows, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                attn_drop=attn_drop_rate, drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])],
                norm_layer=norm_layer, downsample=not last, attn_options=options, fixed_window=fixed_window))
            resolution = half_size(resolution)
        self.norm = norm_layer(self.num_features)
        self.head = self._make_head()
        self.feature_info = [dict(num_chs=embed_dim * 2 ** i, reduction=patch_size * 2 ** i, module=f'layers.{i}')
                             for i in range(self.num_layers)]
        self._finish_init(use_checkpoint)

    def input_size_args(self, img_size: Tuple[int, int]) -> Dict[str, int]:
        """Both windows scaled with the patch grid (the smaller ratio of the two sides), as timm's Swin
        ``set_input_size`` scales them: 224² -> 384² turns (56, 7) into (96, 12), the windows of the
        official 384² models, and a global L stage stays global."""
        new = self.patch_embed.dynamic_feat_size(img_size)
        scaled = [max(1, min(window * n // o for n, o in zip(new, self.grid, strict=True)))
                  for window in self.window_sizes]
        return dict(window_size=scaled[0], softmax_window_size=scaled[1])

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'absolute_pos_embed'}

    def parameter_grids(self) -> Dict[str, GridSpec]:
        return {'absolute_pos_embed': GridSpec(self.grid)} if self.ape else {}

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set:
        return {'relative_position_bias_table'}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for layer in self.layers:
            layer.grad_checkpointing = enable

    def run_levels(self, x: torch.Tensor, keep, last: int):
        """Levels are the stages, before their patch merging: stage i gives (B, H_i·W_i, C·2^i) on
        the ⌈H/(p·2^i)⌉ × ⌈W/(p·2^i)⌉ map; ``forward_features`` final-norms the last."""
        patch = self.patch_embed.patch_size
        grid = (ceil_div(x.shape[-2], patch[0]), ceil_div(x.shape[-1], patch[1]))  # a partial patch is padded
        x = self.patch_embed(x)
        if self.ape:
            x = x + resized_tokens(self.absolute_pos_embed, self.grid, 0, grid)
        x = self.pos_drop(x)
        kept = {}
        for i, layer in enumerate(self.layers[:last + 1]):
            x = layer(x, grid)
            if i in keep:
                kept[i] = (x, grid)
            if (i < last) and (layer.downsample is not None):
                x, grid = layer.downsample(x, grid), half_size(grid)
        return x, kept

    def prune_levels(self, last: int) -> None:
        self.layers = self.layers[:last + 1]
        self.layers[-1].downsample = None
        self.num_layers = last + 1


# ---------------------------------------------------------------------------------------------
# Variants (timm-style entry points)
# ---------------------------------------------------------------------------------------------

_FLATTEN = dict(attn_type='LLSS', window_size=56)
_SOFTMAX = dict(attn_type='SSSS', window_size=7, softmax_window_size=7)
_TINY = dict(embed_dim=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24))
_SMALL = dict(embed_dim=96, depths=(2, 2, 18, 2), num_heads=(3, 6, 12, 24))
_BASE = dict(embed_dim=128, depths=(2, 2, 18, 2), num_heads=(4, 8, 16, 32))

# name: (architecture, description with the parameter count at 1000 classes)
register_variants(FLattenSwinTransformer, {
    'flatten_swin_tiny_patch4_224': (
        {**_TINY, **_FLATTEN},
        'FLatten-Swin-T (29.2M): global focused linear attention in stages 1–2 (paper Table 8).'),
    'flatten_swin_small_patch4_224': ({**_SMALL, **_FLATTEN}, 'FLatten-Swin-S (50.5M).'),
    'flatten_swin_base_patch4_224': ({**_BASE, **_FLATTEN}, 'FLatten-Swin-B (89.0M).'),
    'flatten_swin_base_patch4_384': (
        {**_BASE, **_FLATTEN, 'window_size': 96, 'img_size': 384},
        'FLatten-Swin-B at 384² (91.4M): L window 96 (global), S window 12.'),
    'softmax_swin_tiny_patch4_window7_224': (
        {**_TINY, **_SOFTMAX}, 'Swin-T baseline (28.3M): window-7 softmax attention everywhere, Swin v1 layout.'),
    'softmax_swin_small_patch4_window7_224': ({**_SMALL, **_SOFTMAX}, 'Swin-S baseline (49.6M).'),
    'softmax_swin_base_patch4_window7_224': ({**_BASE, **_SOFTMAX}, 'Swin-B baseline (87.8M).'),
    'softmax_swin_base_patch4_window12_384': (
        {**_BASE, **_SOFTMAX, 'window_size': 12, 'softmax_window_size': 12, 'img_size': 384},
        'Swin-B baseline at 384² (87.9M): window-12 softmax attention everywhere.'),
})

