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
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import DropPath, Mlp, PatchEmbed, to_2tuple, trunc_normal_

from .attention import AttentionOptions, block_kinds, create_attention, letter_kinds
from .grid import GridSpec
from .layers import Backbone, run_blocks
from .registry import common_cfg_kwargs, la_cfg_kwargs, register_model_type, register_variants

__all__ = ['FLattenSwinTransformer', 'window_partition', 'window_reverse', 'shifted_window_mask']

# Swin's S stages: softmax with the relative position bias of the window.
SWIN_SOFTMAX_KIND = 'window_softmax'


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """(B, H, W, C) -> (B·nW, ws, ws, C); windows row-major, tokens row-major inside."""
    B, H, W, C = x.shape
    x = x.view(B, H // window_size, window_size, W // window_size, window_size, C)
    return x.permute(0, 1, 3, 2, 4, 5).reshape(-1, window_size, window_size, C)


def window_reverse(windows: torch.Tensor, window_size: int, H: int, W: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: (B·nW, ws, ws, C) -> (B, H, W, C)."""
    C = windows.shape[-1]
    x = windows.view(-1, H // window_size, W // window_size, window_size, window_size, C)
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


class SwinTransformerBlock(nn.Module):
    """Pre-norm block: (shifted) window attention of kind `attn_kind`, then the MLP.

    x: (B, H·W, C) -> (B, H·W, C). The shift mask is a persistent buffer on the block (official
    layout); focused linear attention receives it and ignores it (docs/differences.md,
    "Swin shift mask ignored by focused attention").
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
    ):
        super().__init__()
        self.dim = dim
        self.input_resolution = tuple(input_resolution)
        if min(self.input_resolution) <= window_size:
            # the window covers the map: attend globally, nothing to shift
            window_size, shift_size = min(self.input_resolution), 0
        H, W = self.input_resolution
        if (H % window_size) or (W % window_size):
            raise ValueError(
                f'Swin stage resolution {H}x{W} is not divisible by window {window_size}: choose DATA.IMG_SIZE '
                f'and MODEL.SWIN.WINDOW_SIZE / SOFTMAX_WINDOW_SIZE so every stage map tiles into windows')
        self.window_size = window_size
        self.shift_size = shift_size

        self.norm1 = norm_layer(dim)
        self.attn = create_attention(
            attn_kind, dim, num_heads, grid_size=(window_size, window_size), qkv_bias=qkv_bias,
            attn_drop=attn_drop, proj_drop=drop, options=attn_options)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        mask = shifted_window_mask(self.input_resolution, window_size, shift_size) if shift_size > 0 else None
        self.register_buffer('attn_mask', mask)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = self.input_resolution
        B, L, C = x.shape
        ws, shift = self.window_size, self.shift_size
        shortcut = x
        x = self.norm1(x).view(B, H, W, C)
        if shift > 0:
            x = torch.roll(x, shifts=(-shift, -shift), dims=(1, 2))
        windows = window_partition(x, ws).view(-1, ws * ws, C)
        windows = self.attn(windows, mask=self.attn_mask)
        x = window_reverse(windows.view(-1, ws, ws, C), ws, H, W)
        if shift > 0:
            x = torch.roll(x, shifts=(shift, shift), dims=(1, 2))
        x = shortcut + self.drop_path(x.reshape(B, H * W, C))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def extra_repr(self) -> str:
        return (f'dim={self.dim}, input_resolution={self.input_resolution}, window_size={self.window_size}, '
                f'shift_size={self.shift_size}')


class PatchMerging(nn.Module):
    """2×2 neighbourhood concat (Swin v1 order), LN(4C), Linear 4C→2C without bias.

    x: (B, H·W, C) -> (B, H/2·W/2, 2C).
    """

    def __init__(self, input_resolution: Tuple[int, int], dim: int, norm_layer: type = nn.LayerNorm):
        super().__init__()
        self.input_resolution = tuple(input_resolution)
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = norm_layer(4 * dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        H, W = self.input_resolution
        B, L, C = x.shape
        x = x.view(B, H, W, C)
        x = torch.cat([x[:, 0::2, 0::2], x[:, 1::2, 0::2], x[:, 0::2, 1::2], x[:, 1::2, 1::2]], dim=-1)
        return self.reduction(self.norm(x.view(B, -1, 4 * C)))


class BasicLayer(nn.Module):
    """One stage: blocks with alternating shifts, then optional PatchMerging."""

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
    ):
        super().__init__()
        self.grad_checkpointing = False
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(
                dim=dim, input_resolution=input_resolution, num_heads=num_heads, window_size=window_sizes[j],
                shift_size=0 if j % 2 == 0 else window_sizes[j] // 2, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                drop=drop, attn_drop=attn_drop, drop_path=drop_path[j], norm_layer=norm_layer,
                attn_kind=attn_kinds[j], attn_options=attn_options)
            for j in range(len(attn_kinds))])
        self.downsample = PatchMerging(input_resolution, dim, norm_layer) if downsample else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = run_blocks(self.blocks, x, self.grad_checkpointing)
        if self.downsample is not None:
            x = self.downsample(x)
        return x


class FLattenSwinTransformer(Backbone):
    """Swin Transformer v1 whose stages use focused linear (L) or window softmax (S) attention.

    Args:
        img_size: input size (int or (H, W)); the input must have exactly this size.
        window_size: window of the L blocks (clamped to the stage map, so 56 is global at 224).
        softmax_window_size: window of the S blocks; None keeps the official rule (7, or 12 when
            ``window_size > 56``).
        attn_type: one letter per stage (``L``/``S``/``M``) plus the ``M`` block count, e.g. 'LLMS2'.
        focusing_factor, kernel_size: focused-attention power p and DWC kernel.

    ``forward_features`` returns the final-normed tokens (B, L, C); ``forward_head`` averages them
    and applies ``head``.
    """

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
            use_checkpoint: bool = False,
    ):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f'Swin: DEPTHS {list(depths)} and NUM_HEADS {list(num_heads)} must have the same length')
        img_size = to_2tuple(img_size)
        if (img_size[0] % patch_size) or (img_size[1] % patch_size):
            raise ValueError(
                f'Swin: image size {img_size[0]}x{img_size[1]} is not divisible by patch size {patch_size}')
        self.img_size = img_size
        self.num_classes = num_classes
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.num_features = int(embed_dim * 2 ** (self.num_layers - 1))
        self.ape = ape
        self.attn_type = attn_type
        if softmax_window_size is None:
            softmax_window_size = 7 if window_size <= 56 else 12

        self.patch_embed = PatchEmbed(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
            norm_layer=norm_layer if patch_norm else None)
        grid = self.patch_embed.grid_size
        if ape:
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1], embed_dim))
            trunc_normal_(self.absolute_pos_embed, std=.02)
        self.pos_drop = nn.Dropout(p=drop_rate)

        kinds = block_kinds(attn_type, depths, letter_kinds(linear_kind, SWIN_SOFTMAX_KIND))
        options = AttentionOptions(focusing_factor=focusing_factor, kernel_size=kernel_size, qk_scale=qk_scale)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.layers = nn.ModuleList()
        for i in range(self.num_layers):
            resolution = (grid[0] // 2 ** i, grid[1] // 2 ** i)
            last = i == self.num_layers - 1
            if not last and ((resolution[0] % 2) or (resolution[1] % 2)):
                raise ValueError(
                    f'Swin: stage {i} map {resolution[0]}x{resolution[1]} cannot be patch-merged (odd size); '
                    f'DATA.IMG_SIZE must be divisible by PATCH_SIZE·2^{self.num_layers - 1}')
            windows = [softmax_window_size if kind == SWIN_SOFTMAX_KIND else window_size for kind in kinds[i]]
            self.layers.append(BasicLayer(
                dim=embed_dim * 2 ** i, input_resolution=resolution, num_heads=num_heads[i], attn_kinds=kinds[i],
                window_sizes=windows, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, drop=drop_rate,
                attn_drop=attn_drop_rate, drop_path=dpr[sum(depths[:i]):sum(depths[:i + 1])],
                norm_layer=norm_layer, downsample=not last, attn_options=options))
        self.norm = norm_layer(self.num_features)
        self.head = self._make_head()
        self._finish_init(use_checkpoint)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'absolute_pos_embed'}

    def parameter_grids(self) -> Dict[str, GridSpec]:
        return {'absolute_pos_embed': GridSpec(self.patch_embed.grid_size)} if self.ape else {}

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set:
        return {'relative_position_bias_table'}

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        for layer in self.layers:
            layer.grad_checkpointing = enable

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_chans, H, W) -> final-normed tokens (B, H/32·W/32, num_features) for 4 stages."""
        self.check_input_size(x)
        x = self.patch_embed(x)
        if self.ape:
            x = x + self.absolute_pos_embed
        x = self.pos_drop(x)
        for layer in self.layers:
            x = layer(x)
        return self.norm(x)


# ---------------------------------------------------------------------------------------------
# Variants (timm-style entry points) and the MODEL.TYPE builders
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


def _swin_kwargs(cfg) -> dict:
    """The MODEL.SWIN architecture keys (and the keys every builder reads) of both Swin types."""
    swin = cfg.MODEL.SWIN
    return dict(
        **common_cfg_kwargs(cfg), patch_size=swin.PATCH_SIZE, in_chans=swin.IN_CHANS, embed_dim=swin.EMBED_DIM,
        depths=tuple(swin.DEPTHS), num_heads=tuple(swin.NUM_HEADS), window_size=swin.WINDOW_SIZE,
        mlp_ratio=swin.MLP_RATIO, qkv_bias=swin.QKV_BIAS, qk_scale=swin.QK_SCALE, ape=swin.APE,
        patch_norm=swin.PATCH_NORM)


@register_model_type('flatten_swin')
def build_flatten_swin(cfg) -> FLattenSwinTransformer:
    """MODEL.TYPE 'flatten_swin': stages from MODEL.LA.ATTN_TYPE, L window MODEL.SWIN.WINDOW_SIZE."""
    return FLattenSwinTransformer(
        **_swin_kwargs(cfg), **la_cfg_kwargs(cfg), softmax_window_size=cfg.MODEL.SWIN.SOFTMAX_WINDOW_SIZE or None)


@register_model_type('swin')
def build_swin(cfg) -> FLattenSwinTransformer:
    """MODEL.TYPE 'swin': the softmax baseline; every block uses window MODEL.SWIN.WINDOW_SIZE and
    MODEL.LA is ignored (an official Swin config has no LA section)."""
    kwargs = _swin_kwargs(cfg)
    return FLattenSwinTransformer(
        **kwargs, attn_type='S' * len(kwargs['depths']), softmax_window_size=cfg.MODEL.SWIN.WINDOW_SIZE)
