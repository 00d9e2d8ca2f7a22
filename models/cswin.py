"""FLatten-CSwin: CSWin Transformer with focused linear attention in chosen stages
(docs/numerics.md, "CSwin backbone").

One class builds both FLatten-CSwin (``attn_type='LLSS'``: global focused linear attention in
stages 1–2, LePE stripe softmax in stages 3–4) and the original CSWin baseline (``'SSSS'``).
State-dict names, shapes and order are those of the official ``CSWinTransformer``
(``tests/assets/official_state_dicts/flatten_cswin_*.txt``): ``stage1_conv_embed.{0,2}``, blocks
``stage{s}.{j}.{qkv, norm1, proj, attns.{b}, mlp, norm2}``, ``merge{1..3}.{conv, norm}``, ``norm``,
``head``.

Stripe rules (official, plus two extensions that the official code does not handle):

* L blocks take their split from ``la_split_size`` (``MODEL.LA.CSWIN_LA_SPLIT_SIZE``), S blocks from
  ``split_size``.
* A block is one global branch (full width, all heads, window = the stage map) in the last stage or
  when the split covers the map; otherwise it has two branches on the channel halves with half the
  heads each: vertical ``H×split`` stripes (official ``idx 0``) and horizontal ``split×W`` stripes
  (``idx 1``).
* Extension 1: a split *larger* than the map is clamped to the map (global), as Swin clamps its
  window; the official code crashes. ``la_split_size=None`` means "the whole map at every stage",
  which is the official setting at any resolution.
* Extension 2: L blocks with a split *smaller* than the map run focused linear attention per stripe
  window (the stripe code of :mod:`models.attention.base`); the official code crashes (docs/differences.md,
  "CSwin with an LA split smaller than the map").
* A map that a stripe width does not divide is zero-padded to whole stripes in the blocks with
  two branches (Q, K and V of the padded tokens are zero, as in CSWin's detection backbone), at
  the build size and at any other input size; a global branch never pads.

Any input size runs (docs/numerics.md, "Any input size"): stripes keep their width and span the
actual map, global branches cover the actual map, and their positional encodings are resized to
it with the rule of ``--pretrained``, cached per size.
"""
from __future__ import annotations

import dataclasses
from typing import List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers import DropPath, Mlp, to_2tuple

from .attention import AttentionOptions, block_kinds, create_attention, letter_kinds
from .grid import gather_map, padded_size, size_dependent, symbolic
from .layers import Backbone, run_blocks
from .registry import register_variants

__all__ = ['CSWinTransformer', 'stage_resolutions', 'branch_windows', 'parse_split_sizes']

torch.fx.wrap('size_dependent')

# CSwin's S blocks: LePE stripe softmax attention; its L blocks take MODEL.LA.LINEAR_KIND.
CSWIN_SOFTMAX_KIND = 'softmax'


def stage_resolutions(img_size: Tuple[int, int], num_stages: int) -> List[Tuple[int, int]]:
    """Token-map size of every stage: the stride-4 7×7 stem (padding 2), then stride-2 3×3 merges."""
    H, W = img_size
    sizes = [((H - 3) // 4 + 1, (W - 3) // 4 + 1)]
    for _ in range(num_stages - 1):
        H, W = sizes[-1]
        sizes.append(((H - 1) // 2 + 1, (W - 1) // 2 + 1))
    return sizes


def branch_windows(resolution: Tuple[int, int], split: int, last_stage: bool) -> List[Optional[Tuple[int, int]]]:
    """The stripe window of each attention branch of a block: ``[None]`` (one global branch) in the
    last stage or when `split` covers the map, else vertical then horizontal stripes."""
    H, W = resolution
    if last_stage or ((split >= H) and (split >= W)):
        return [None]
    return [(H, min(split, W)), (min(split, H), W)]


def parse_split_sizes(value: Union[str, Sequence[int]], num_stages: int, key: str) -> Tuple[int, ...]:
    """``'56-28-14-7'`` (the config's dash-separated string) or a sequence -> one int per stage.

    Raises ValueError naming `key` and the value when it is not `num_stages` positive integers.
    """
    parts = value.split('-') if isinstance(value, str) else list(value)
    try:
        sizes = tuple(int(part) for part in parts)
    except ValueError:
        sizes = ()
    if (len(sizes) != num_stages) or any(size < 1 for size in sizes):
        raise ValueError(f'{key}={value!r}: expected {num_stages} positive stripe sizes, one per stage '
                         f'(e.g. {"-".join(["7"] * num_stages)!r})')
    return sizes


class ImageToTokens(nn.Module):
    """(B, C, H, W) -> (B, H·W, C), tokens row-major (the official stem's rearrange)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(2).transpose(1, 2)


class MergeBlock(nn.Module):
    """Downsampling between stages: Conv2d 3×3 stride 2 (padding 1) then LN.

    x: (B, H·W, C) on a `resolution` map (None: the build map) -> (B, ⌈H/2⌉·⌈W/2⌉, C_out).
    """

    def __init__(self, dim: int, dim_out: int, resolution: Tuple[int, int], norm_layer: type = nn.LayerNorm):
        super().__init__()
        self.resolution = tuple(resolution)
        self.conv = nn.Conv2d(dim, dim_out, 3, stride=2, padding=1)
        self.norm = norm_layer(dim_out)

    def forward(self, x: torch.Tensor, resolution: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        B, _, C = x.shape
        x = x.transpose(1, 2).reshape(B, C, *(resolution or self.resolution))
        return self.norm(self.conv(x).flatten(2).transpose(1, 2))


class CSWinBlock(nn.Module):
    """Pre-norm block: shared ``qkv``, one or two stripe branches of kind `attn_kind`, ``proj``, MLP.

    x: (B, H·W, C) on a `resolution` map (None: the build map) -> (B, H·W, C). The projections
    belong to the block (official layout); a two-branch block gives each branch one channel half
    of Q, K and V on the map padded to whole stripes (``stripe``: the stripe height and width
    that must tile it) and concatenates the outputs before ``proj``. The official block constructs
    a ``proj_drop`` it never applies, so there is none here: with ``drop > 0`` only the MLP
    dropouts act, as in the official code.
    """

    def __init__(
            self,
            dim: int,
            resolution: Tuple[int, int],
            num_heads: int,
            split: int,
            last_stage: bool,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            norm_layer: type = nn.LayerNorm,
            attn_kind: str = CSWIN_SOFTMAX_KIND,
            attn_options: AttentionOptions = AttentionOptions(),
    ):
        super().__init__()
        self.dim = dim
        self.resolution = tuple(resolution)
        windows = branch_windows(self.resolution, split, last_stage)
        branches = len(windows)
        # two branches: vertical (H, w) and horizontal (h, W) stripes; the map is padded to whole h×w tiles
        self.stripe = None if branches == 1 else (windows[1][0], windows[0][1])
        grid = self.padded(self.resolution)
        windows = [None] if branches == 1 else [(grid[0], self.stripe[1]), (self.stripe[0], grid[1])]
        if (num_heads % branches) or (dim % branches):
            raise ValueError(
                f'CSwin block on the {resolution[0]}x{resolution[1]} map: split {split} gives {branches} stripe '
                f'branches, which need an even dim and num_heads (got dim={dim}, num_heads={num_heads})')
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.norm1 = norm_layer(dim)
        self.proj = nn.Linear(dim, dim)
        self.attns = nn.ModuleList([
            create_attention(
                attn_kind, dim // branches, num_heads // branches, grid_size=grid, qkv_bias=qkv_bias,
                attn_drop=attn_drop, proj_drop=drop, options=dataclasses.replace(
                    attn_options, projections='block', window=window, lepe=True))
            for window in windows])
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=nn.GELU, drop=drop)
        self.norm2 = norm_layer(dim)

    def padded(self, resolution: Tuple[int, int]) -> Tuple[int, int]:
        """The map the attention branches see: `resolution` padded to whole stripes (two branches)."""
        return tuple(resolution) if self.stripe is None else padded_size(resolution, self.stripe)

    def forward(self, x: torch.Tensor, resolution: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        return size_dependent(self, x, resolution)

    def size_dependent_forward(self, x: torch.Tensor, resolution: Optional[Tuple[int, int]]) -> torch.Tensor:
        B, L, C = x.shape
        H, W = resolution or self.resolution
        # (3, B, L, C): Q, K, V are consecutive C-chunks of the qkv output
        qkv = self.qkv(self.norm1(x)).reshape(B, L, 3, C).permute(2, 0, 1, 3)
        Hp, Wp = self.padded((H, W))
        traced = symbolic(H, W) and (self.stripe is not None)  # pad and crop without comparing sizes
        if traced:
            row, col = torch.arange(Hp, device=x.device).view(-1, 1), torch.arange(Wp, device=x.device).view(1, -1)
            qkv = gather_map(qkv, (H, W), row, col, dim=2)
        elif (Hp, Wp) != (H, W):
            qkv = F.pad(qkv.reshape(3, B, H, W, C), (0, 0, 0, Wp - W, 0, Hp - H)).reshape(3, B, Hp * Wp, C)
        parts = qkv.chunk(len(self.attns), dim=-1)
        out = torch.cat([attn(part, grid=(Hp, Wp)) for attn, part in zip(self.attns, parts, strict=True)], dim=-1)
        if traced:
            row, col = torch.arange(H, device=x.device).view(-1, 1), torch.arange(W, device=x.device).view(1, -1)
            out = out.index_select(1, (row * Wp + col).reshape(-1))
        elif (Hp, Wp) != (H, W):
            out = out.reshape(B, Hp, Wp, C)[:, :H, :W].reshape(B, H * W, C)
        x = x + self.drop_path(self.proj(out))
        return x + self.drop_path(self.mlp(self.norm2(x)))

    def extra_repr(self) -> str:
        return f'dim={self.dim}, resolution={self.resolution}, branches={len(self.attns)}'


class CSWinTransformer(Backbone):
    """CSWin Transformer whose stages use focused linear (L) or LePE stripe softmax (S) attention.

    Args:
        img_size: build input size (int or (H, W)): it sizes the positional encodings; the model
            runs at any size of at least 32 (module docstring).
        depths, num_heads: blocks and heads per stage; widths are ``embed_dim·2^i``.
        split_size: stripe width of the S blocks per stage (the last stage is always global).
        la_split_size: stripe width of the L blocks per stage, as ints or the config's dash string
            (``'56-28-14-7'``); None means the whole stage map (global, the official setting).
        attn_type: one letter per stage (``L``/``S``/``M``) plus the ``M`` block count, e.g. 'LLMS2'.
        linear_kind: the attention kind of the L blocks (``MODEL.LA.LINEAR_KIND``).
        focusing_factor, kernel_size: focused-attention power p and DWC kernel.

    ``forward_features`` returns the final-normed tokens (B, L, C); ``forward_head`` averages them
    and applies ``head``.
    """
    first_conv = 'stage1_conv_embed.0'  # timm's pretrained_cfg name of the input layer

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dim: int = 64,
            depths: Sequence[int] = (2, 4, 18, 1),
            num_heads: Sequence[int] = (2, 4, 8, 16),
            split_size: Sequence[int] = (1, 2, 7, 7),
            la_split_size: Union[None, str, Sequence[int]] = None,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: type = nn.LayerNorm,
            attn_type: str = 'LLSS',
            linear_kind: str = 'focused_linear',
            focusing_factor: int = 3,
            kernel_size: int = 5,
            use_checkpoint: bool = False,
    ):
        super().__init__()
        num_stages = len(depths)
        if len(num_heads) != num_stages:
            raise ValueError(f'CSwin: depths {list(depths)} and num_heads {list(num_heads)} must have the same length')
        self.img_size = to_2tuple(img_size)
        self.min_input_size = 4 * 2 ** (num_stages - 1)
        self.check_size(self.img_size)
        self.num_classes = num_classes
        self.num_stages = num_stages
        self.num_features = embed_dim * 2 ** (num_stages - 1)
        self.head_hidden_size = self.num_features  # timm 1.0: what the classifier reads (no pre-logits)
        self.attn_type = attn_type
        self.resolutions = stage_resolutions(self.img_size, num_stages)
        splits = {'S': parse_split_sizes(split_size, num_stages, 'split_size'),
                  'L': (tuple(max(r) for r in self.resolutions) if la_split_size is None else
                        parse_split_sizes(la_split_size, num_stages, 'MODEL.LA.CSWIN_LA_SPLIT_SIZE'))}
        letters = letter_kinds(linear_kind, CSWIN_SOFTMAX_KIND)
        kinds = block_kinds(attn_type, depths, letters)
        letter_of = {kind: letter for letter, kind in letters.items()}
        self._check_la_splits(kinds, splits['L'], letter_of)

        self.stage1_conv_embed = nn.Sequential(
            nn.Conv2d(in_chans, embed_dim, 7, stride=4, padding=2), ImageToTokens(), norm_layer(embed_dim))
        options = AttentionOptions(focusing_factor=focusing_factor, kernel_size=kernel_size, qk_scale=qk_scale)
        dpr = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        for i in range(num_stages):
            dim, last = embed_dim * 2 ** i, i == num_stages - 1
            self.add_module(f'stage{i + 1}', nn.ModuleList([
                CSWinBlock(
                    dim=dim, resolution=self.resolutions[i], num_heads=num_heads[i],
                    split=splits[letter_of[kind]][i], last_stage=last, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                    drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[sum(depths[:i]) + j],
                    norm_layer=norm_layer, attn_kind=kind, attn_options=options)
                for j, kind in enumerate(kinds[i])]))
            if not last:
                self.add_module(f'merge{i + 1}', MergeBlock(dim, 2 * dim, self.resolutions[i], norm_layer))
        self.norm = norm_layer(self.num_features)
        self.head = self._make_head()
        self.feature_info = [dict(num_chs=embed_dim * 2 ** i, reduction=4 * 2 ** i, module=f'stage{i + 1}')
                             for i in range(num_stages)]
        self._finish_init(use_checkpoint)

    def _check_la_splits(self, kinds: List[List[str]], splits: Sequence[int], letter_of: dict) -> None:
        """An explicit MODEL.LA.CSWIN_LA_SPLIT_SIZE must tile the stage maps of the build size: a split
        written for another image size (56-28-14-7 is "global at 224²") would otherwise turn global
        focused attention into padded stripes. Raise ValueError naming the sizes. (S-block stripes are
        padded, as in CSWin's detection backbone.)"""
        for i, stage_kinds in enumerate(kinds):
            if 'L' not in {letter_of[kind] for kind in stage_kinds}:
                continue
            H, W = self.resolutions[i]
            for window in branch_windows((H, W), splits[i], last_stage=i == self.num_stages - 1):
                if (window is not None) and ((H % window[0]) or (W % window[1])):
                    raise ValueError(
                        f'CSwin stage {i + 1} (L blocks): MODEL.LA.CSWIN_LA_SPLIT_SIZE entry {splits[i]} does not '
                        f'tile the {H}x{W} map of a {self.img_size[0]}x{self.img_size[1]} image; use a divisor of '
                        f'{H} and {W} (or a split >= the map, or no split, for global attention)')

    def run_levels(self, x: torch.Tensor, keep, last: int):
        """Levels are the stages, before their merge block: stage i gives (B, H_i·W_i, C·2^i) on
        the map of :func:`stage_resolutions`; ``forward_features`` final-norms the last."""
        resolutions = stage_resolutions((x.shape[-2], x.shape[-1]), self.num_stages)
        x = self.stage1_conv_embed(x)
        kept = {}
        for i in range(last + 1):
            x = run_blocks(getattr(self, f'stage{i + 1}'), x, self.grad_checkpointing, resolutions[i])
            if i in keep:
                kept[i] = (x, resolutions[i])
            if i < last:
                x = getattr(self, f'merge{i + 1}')(x, resolutions[i])
        return x, kept

    def prune_levels(self, last: int) -> None:
        for i in range(last, self.num_stages):
            if i > last:
                delattr(self, f'stage{i + 1}')
            if hasattr(self, f'merge{i + 1}'):
                delattr(self, f'merge{i + 1}')
        self.num_stages = last + 1


# ---------------------------------------------------------------------------------------------
# Variants (timm-style entry points)
# ---------------------------------------------------------------------------------------------

# FLatten's CSwin-T and -B change the original depths (paper appendix: deeper stages 1-2, shallower 3)
_FLATTEN_TINY = dict(embed_dim=64, depths=(2, 4, 18, 1), num_heads=(2, 4, 8, 16))
_FLATTEN_SMALL = dict(embed_dim=64, depths=(2, 4, 32, 2), num_heads=(2, 4, 8, 16))
_FLATTEN_BASE = dict(embed_dim=96, depths=(3, 6, 29, 2), num_heads=(4, 8, 16, 32))
_CSWIN_TINY = dict(embed_dim=64, depths=(1, 2, 21, 1), num_heads=(2, 4, 8, 16))
_CSWIN_SMALL = dict(embed_dim=64, depths=(2, 4, 32, 2), num_heads=(2, 4, 8, 16))
_CSWIN_BASE = dict(embed_dim=96, depths=(2, 4, 32, 2), num_heads=(4, 8, 16, 32))
_FLATTEN = dict(attn_type='LLSS')
_SOFTMAX = dict(attn_type='SSSS')
# S-block stripe widths per stage at 224² and 384²
_SPLITS_224 = (1, 2, 7, 7)
SPLITS_384 = (1, 2, 12, 12)
_AT_224 = dict(img_size=224, split_size=_SPLITS_224)
_AT_384 = dict(img_size=384, split_size=SPLITS_384)

# name: (architecture, description with the parameter count at 1000 classes)
register_variants(CSWinTransformer, {
    'flatten_cswin_tiny_224': (
        {**_FLATTEN_TINY, **_FLATTEN, **_AT_224},
        'FLatten-CSwin-T (21.2M): global focused linear attention in stages 1–2 (paper Table 8).'),
    'flatten_cswin_small_224': ({**_FLATTEN_SMALL, **_FLATTEN, **_AT_224}, 'FLatten-CSwin-S (35.5M).'),
    'flatten_cswin_base_224': ({**_FLATTEN_BASE, **_FLATTEN, **_AT_224}, 'FLatten-CSwin-B (74.9M).'),
    'flatten_cswin_base_384': (
        {**_FLATTEN_BASE, **_FLATTEN, **_AT_384},
        'FLatten-CSwin-B at 384² (78.4M): global L stages on 96² and 48² maps, S stripes of 12.'),
    'softmax_cswin_tiny_224': (
        {**_CSWIN_TINY, **_SOFTMAX, **_AT_224},
        'CSWin-T baseline: LePE stripe softmax attention everywhere, original depths 1-2-21-1.'),
    'softmax_cswin_small_224': ({**_CSWIN_SMALL, **_SOFTMAX, **_AT_224}, 'CSWin-S baseline (depths 2-4-32-2).'),
    'softmax_cswin_base_224': (
        {**_CSWIN_BASE, **_SOFTMAX, **_AT_224}, 'CSWin-B baseline (width 96, depths 2-4-32-2).'),
    'softmax_cswin_base_384': (
        {**_CSWIN_BASE, **_SOFTMAX, **_AT_384}, 'CSWin-B baseline at 384² (stripes 12 in stage 3).'),
})

