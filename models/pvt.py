"""FLatten-PVT: Pyramid Vision Transformer v1 with focused linear attention
(docs/numerics.md, "PVT v1 backbone").

One class builds FLatten-PVT (``attn_type='LLLL'``: focused linear attention over the whole stage
map in every block) and the PVT v1 baseline (``attn_type='SSSS'``, spatial-reduction softmax
attention with ``sr_ratios`` 8-4-2-1, plus the original class token). State-dict names, shapes and
order are those of the official ``PyramidVisionTransformer`` of ``flatten_pvt.py``
(``tests/assets/official_state_dicts/flatten_pvt_*.txt``).

Differences from the official builders (deliberate):

* ``img_size`` and ``num_classes`` are honoured: ``pos_embed{i}`` and the FLA
  ``positional_encoding`` are sized from the stage maps of ``img_size`` (official: always 224).
* Any input size runs (docs/numerics.md, "Any input size"): every patch embedding pads a partial
  patch, and ``pos_embed{i}`` and the positional encodings are resized to the actual stage maps
  with the rule of ``--pretrained``, cached per size.
* Geometry that does not fit the build size (stage maps vs. the L blocks' sr ratios) raises a
  ValueError naming the sizes at construction.
"""
from __future__ import annotations

from functools import partial
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import PatchEmbed, to_2tuple, trunc_normal_

from .attention import AttentionOptions, block_kinds, letter_kinds
from .grid import GridSpec, ceil_div, resized_tokens
from .layers import Backbone, Block, run_blocks
from .registry import register_variants

__all__ = [
    'PyramidVisionTransformer', 'PyramidBackbone', 'StagePlan', 'parse_sr_ratios', 'check_stage_geometry',
    'pvt_attention_options', 'register_size_variants', 'FLATTEN_MODE',
]

torch.fx.wrap('resized_tokens')

# PVT's S blocks: spatial-reduction softmax attention; its L blocks take MODEL.LA.LINEAR_KIND.
PVT_SOFTMAX_KIND = 'softmax'


def pvt_attention_options(kind: str, sr_ratio: int, la_sr_ratio: int, linear: bool = False,
                          **la_options) -> AttentionOptions:
    """PVT's attention layout: separate ``q`` / ``kv`` projections, keys and values reduced by the
    stage's ``sr_ratio`` in S blocks and by its ``la_sr_ratio`` in L blocks (or PVTv2's linear mode);
    `la_options` are the MODEL.LA knobs (focusing_factor, kernel_size, qk_scale)."""
    return AttentionOptions(projections='q_kv', sr_ratio=sr_ratio if kind == PVT_SOFTMAX_KIND else la_sr_ratio,
                            linear=linear, **la_options)


def parse_sr_ratios(value: Union[str, int, Sequence[int]], num_stages: int) -> Tuple[int, ...]:
    """Spatial-reduction ratios of the L blocks, one per stage.

    Accepts the official forms, the int ``1111`` of ``MODEL.LA.PVT_LA_SR_RATIOS`` or the string
    ``'2111'`` (one digit per stage), and a sequence of ints. Raises ValueError naming the value.
    """
    if isinstance(value, (str, int)):
        text = str(value)
        if (len(text) != num_stages) or (not text.isdigit()) or ('0' in text):
            raise ValueError(
                f'MODEL.LA.PVT_LA_SR_RATIOS={value!r}: expected {num_stages} digits from 1 to 9, one per stage '
                f'(e.g. {"1" * num_stages})')
        return tuple(int(c) for c in text)
    ratios = tuple(int(r) for r in value)
    if (len(ratios) != num_stages) or (min(ratios) < 1):
        raise ValueError(f'la_sr_ratios={list(value)}: expected {num_stages} ratios >= 1, one per stage')
    return ratios


def check_stage_geometry(
        name: str, img_size: Tuple[int, int], stage: int, grid: Tuple[int, int], kinds: Sequence[str],
        la_sr_ratio: int, linear: bool) -> None:
    """Raise ValueError naming the image size, the stage map and the ratio when the L blocks of this
    stage reduce keys/values with a stride that does not divide the stage map: their positional
    encoding has one vector per reduced cell. (S blocks floor the reduced map like the original PVT.)"""
    reduces = any(kind != PVT_SOFTMAX_KIND for kind in kinds) and (not linear)
    if reduces and ((grid[0] % la_sr_ratio) or (grid[1] % la_sr_ratio)):
        raise ValueError(
            f'{name}: at image size {img_size[0]}x{img_size[1]} stage {stage + 1} has a {grid[0]}x{grid[1]} map, '
            f'which the spatial-reduction ratio {la_sr_ratio} of its focused-linear blocks '
            f'(MODEL.LA.PVT_LA_SR_RATIOS) does not divide')


class StagePlan:
    """What PVT v1 and PVTv2 share between their constructor arguments and their stages of blocks.

    Checks that `embed_dims`, `num_heads`, `mlp_ratios`, `sr_ratios` and `depths` have one entry per
    stage, parses `la_sr_ratios` (:func:`parse_sr_ratios`) into ``la_sr`` and resolves `attn_type` into
    ``kinds[i][j]``, the attention kind of block j of stage i (L blocks: `linear_kind`). Errors start with
    `name` ('PVT', 'PVTv2'); `linear` is PVTv2's linear mode. The other arguments are the constructors'
    and go to every :class:`Block` of :meth:`blocks`.
    """

    def __init__(
            self, name: str, *, depths: Sequence[int], embed_dims: Sequence[int], num_heads: Sequence[int],
            mlp_ratios: Sequence[float], sr_ratios: Sequence[int], la_sr_ratios: Union[str, int, Sequence[int]],
            attn_type: str, linear_kind: str, qkv_bias: bool, qk_scale: Optional[float], drop_rate: float,
            attn_drop_rate: float, drop_path_rate: float, norm_layer: Callable[[int], nn.Module],
            focusing_factor: int, kernel_size: int, linear: bool = False):
        num_stages = len(depths)
        if not (len(embed_dims) == len(num_heads) == len(mlp_ratios) == len(sr_ratios) == num_stages):
            raise ValueError(
                f'{name}: embed_dims {list(embed_dims)}, num_heads {list(num_heads)}, mlp_ratios {list(mlp_ratios)}, '
                f'sr_ratios {list(sr_ratios)} and depths {list(depths)} must have one entry per stage')
        self.name, self.num_stages, self.linear = name, num_stages, linear
        self.depths, self.embed_dims, self.num_heads = depths, embed_dims, num_heads
        self.mlp_ratios, self.sr_ratios = mlp_ratios, sr_ratios
        self.la_sr = parse_sr_ratios(la_sr_ratios, num_stages)
        self.kinds = block_kinds(attn_type, depths, letter_kinds(linear_kind, PVT_SOFTMAX_KIND))
        self.drop_path = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.block_options = dict(qkv_bias=qkv_bias, drop=drop_rate, attn_drop=attn_drop_rate, norm_layer=norm_layer)
        self.la_options = dict(focusing_factor=focusing_factor, kernel_size=kernel_size, qk_scale=qk_scale)

    def check_geometry(self, img_size: Tuple[int, int], stage: int, grid: Tuple[int, int]) -> None:
        """:func:`check_stage_geometry` for the L blocks of `stage` on its `grid` map."""
        check_stage_geometry(self.name, img_size, stage, grid, self.kinds[stage], self.la_sr[stage], self.linear)

    def blocks(self, stage: int, grid: Tuple[int, int],
               mlp_layer: Optional[Callable[[int, int], nn.Module]] = None) -> nn.ModuleList:
        """The blocks of `stage` on its `grid` map, stochastic depth rising linearly over all blocks."""
        first = sum(self.depths[:stage])
        return nn.ModuleList([
            Block(dim=self.embed_dims[stage], num_heads=self.num_heads[stage], grid_size=grid,
                  mlp_ratio=self.mlp_ratios[stage], drop_path=self.drop_path[first + j], attn_kind=kind,
                  attn_options=pvt_attention_options(
                      kind, self.sr_ratios[stage], self.la_sr[stage], self.linear, **self.la_options),
                  mlp_layer=mlp_layer, **self.block_options)
            for j, kind in enumerate(self.kinds[stage])])


class PyramidBackbone(Backbone):
    """Base of PVT v1 and PVTv2: stages of :class:`Block` (from a :class:`StagePlan`) on token maps
    ``grids[i]`` that shrink stage by stage; stage i is feature level i, its modules are named
    ``{patch_embed, block, pos_embed, norm}{i + 1}``."""
    first_conv = 'patch_embed1.proj'  # timm's pretrained_cfg name of the input layer
    grids: List[Tuple[int, int]]

    @property
    def num_stages(self) -> int:
        return len(self.grids)

    def _set_feature_info(self, embed_dims: Sequence[int], module: str) -> None:
        self.feature_info = [dict(num_chs=dim, reduction=4 * 2 ** i, module=f'{module}{i + 1}')
                             for i, dim in enumerate(embed_dims)]

    def prune_levels(self, last: int) -> None:
        for i in range(last + 1, self.num_stages):
            for name in ('patch_embed', 'block', 'pos_embed', 'norm'):
                if hasattr(self, f'{name}{i + 1}'):
                    delattr(self, f'{name}{i + 1}')
        self.grids = self.grids[:last + 1]


class PyramidVisionTransformer(PyramidBackbone):
    """PVT v1 whose blocks use focused linear (L) or spatial-reduction softmax (S) attention.

    Args:
        img_size: build input size (int or (H, W)): it sizes ``pos_embed{i}`` and the positional
            encodings; the model runs at any size of at least ``patch_size · 2^(stages-1)``.
        patch_size: stride of the stage-1 patch embedding (later stages downsample by 2).
        embed_dims, num_heads, mlp_ratios, depths: per-stage width, heads, MLP ratio and depth.
        sr_ratios: key/value reduction ratio of the S blocks per stage.
        la_sr_ratios: key/value reduction ratio of the L blocks per stage, '1111' (official: no
            reduction, global FLA) or an int / sequence; see :func:`parse_sr_ratios`.
        attn_type: one letter per stage (``L``/``S``/``M``) plus the ``M`` block count, e.g. 'LLMS2'.
        linear_kind: the attention kind of the L blocks (``MODEL.LA.LINEAR_KIND``: FLatten's
            ``focused_linear`` or an ablation-zoo kind).
        class_token: the original PVT v1 head: a class token joins the tokens of the last stage,
            the final ``norm`` is applied and the head reads the class token. Off (the FLatten
            layout): the head averages the last stage's tokens and ``norm`` is **created but never
            applied** (official FLatten-PVT quirk: docs/differences.md, "PVT v1's unused final norm"),
            kept so official checkpoints load strictly; it receives no gradient, so DDP needs
            ``find_unused_parameters``.
        norm_layer: norm of the blocks and of the final ``norm`` (official: LayerNorm eps 1e-6);
            the patch-embedding norms are LayerNorm eps 1e-5 as officially.

    ``forward_features`` returns the last stage's tokens (B, N₄ [+1], C₄), normed only with
    ``class_token``; ``forward_head`` pools them and applies ``head``.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 4,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dims: Sequence[int] = (64, 128, 320, 512),
            num_heads: Sequence[int] = (1, 2, 5, 8),
            mlp_ratios: Sequence[float] = (8, 8, 4, 4),
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.,
            norm_layer: Callable[[int], nn.Module] = partial(nn.LayerNorm, eps=1e-6),
            depths: Sequence[int] = (2, 2, 2, 2),
            sr_ratios: Sequence[int] = (8, 4, 2, 1),
            la_sr_ratios: Union[str, int, Sequence[int]] = '1111',
            attn_type: str = 'LLLL',
            linear_kind: str = 'focused_linear',
            focusing_factor: int = 3,
            kernel_size: int = 5,
            class_token: bool = False,
            use_checkpoint: bool = False,
    ):
        super().__init__()
        stages = StagePlan(
            'PVT', depths=depths, embed_dims=embed_dims, num_heads=num_heads, mlp_ratios=mlp_ratios,
            sr_ratios=sr_ratios, la_sr_ratios=la_sr_ratios, attn_type=attn_type, linear_kind=linear_kind,
            qkv_bias=qkv_bias, qk_scale=qk_scale, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate, norm_layer=norm_layer, focusing_factor=focusing_factor,
            kernel_size=kernel_size)
        num_stages, kinds = stages.num_stages, stages.kinds
        img_size = to_2tuple(img_size)
        self.min_input_size = patch_size * 2 ** (num_stages - 1)
        self.check_size(img_size)
        self.img_size = img_size
        self.num_classes = num_classes
        self.num_features = embed_dims[-1]
        self.head_hidden_size = self.num_features  # timm 1.0: what the classifier reads (no pre-logits)
        self.attn_type = attn_type
        self.class_token = class_token
        if class_token and ((kinds[-1] != [PVT_SOFTMAX_KIND] * depths[-1]) or (sr_ratios[-1] != 1)):
            raise ValueError(
                f'PVT: class_token needs softmax attention without reduction in the last stage (the extra token '
                f'has no place on the map), got attn_type={attn_type!r}, sr_ratios={list(sr_ratios)}')

        self.grids: List[Tuple[int, int]] = self.stage_grids(img_size, patch_size, num_stages)
        for i, grid in enumerate(self.grids):
            stages.check_geometry(img_size, i, grid)
            extra = 1 if (class_token and i == num_stages - 1) else 0
            # own parameters precede the children in the state dict, as the official pos_embed{i}
            pos_embed = nn.Parameter(torch.zeros(1, grid[0] * grid[1] + extra, embed_dims[i]))
            trunc_normal_(pos_embed, std=.02)
            setattr(self, f'pos_embed{i + 1}', pos_embed)
        if class_token:
            self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dims[-1]))
            trunc_normal_(self.cls_token, std=.02)
        self.pos_drop = nn.Dropout(p=drop_rate)

        for i in range(num_stages):
            in_size = img_size if i == 0 else self.grids[i - 1]
            setattr(self, f'patch_embed{i + 1}', PatchEmbed(
                img_size=in_size, patch_size=patch_size if i == 0 else 2,
                in_chans=in_chans if i == 0 else embed_dims[i - 1], embed_dim=embed_dims[i], norm_layer=nn.LayerNorm,
                strict_img_size=False, dynamic_img_pad=True))
            setattr(self, f'block{i + 1}', stages.blocks(i, self.grids[i]))
        # without class_token this norm is never applied (official FLatten-PVT); it stays so that official
        # checkpoints load strictly
        self.norm = norm_layer(self.num_features)
        self.head = self._make_head()
        self._set_feature_info(embed_dims, 'block')
        self._finish_init(use_checkpoint)

    @staticmethod
    def stage_grids(size: Tuple[int, int], patch_size: int, num_stages: int) -> List[Tuple[int, int]]:
        """The token map of every stage for an input of `size`: patches of `patch_size`, then 2×2,
        a partial patch padded (⌈H/p⌉ × ⌈W/p⌉, then halved rounding up)."""
        grid = (ceil_div(size[0], patch_size), ceil_div(size[1], patch_size))
        grids = [grid]
        for _ in range(num_stages - 1):
            grid = (ceil_div(grid[0], 2), ceil_div(grid[1], 2))
            grids.append(grid)
        return grids

    def parameter_grids(self) -> Dict[str, GridSpec]:
        last = self.num_stages - 1
        # the class token joins the last stage's position embedding first (original PVT v1)
        return {f'pos_embed{i + 1}': GridSpec(grid, prefix_tokens=int(self.class_token and i == last))
                for i, grid in enumerate(self.grids)}

    @torch.jit.ignore
    def unused_parameters(self) -> set:
        return set() if self.class_token else {'norm.weight', 'norm.bias'}

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        # the official set; pos_embed{i} are decayed (docs/training.md, "Optimizer and parameter groups")
        return {'cls_token'} if self.class_token else set()

    def run_levels(self, x: torch.Tensor, keep, last: int):
        """Levels are the stages: stage i gives (B, N_i, C_i) tokens of its map (class token first
        in the last stage with ``class_token``). ``forward_features`` returns the last stage's
        tokens, normed only with ``class_token``."""
        B = x.shape[0]
        grids = self.stage_grids((x.shape[-2], x.shape[-1]), self.patch_embed1.patch_size[0], self.num_stages)
        specs = self.parameter_grids()  # each pos_embed's build grid and class-token prefix
        kept = {}
        for i in range(last + 1):
            x = getattr(self, f'patch_embed{i + 1}')(x)  # (B, N_i, C_i)
            name = f'pos_embed{i + 1}'
            if specs[name].prefix_tokens:
                x = torch.cat([self.cls_token.expand(B, -1, -1), x], dim=1)
            pos_embed = resized_tokens(getattr(self, name), specs[name].grid, specs[name].prefix_tokens, grids[i])
            x = self.pos_drop(x + pos_embed)
            x = run_blocks(getattr(self, f'block{i + 1}'), x, self.grad_checkpointing, grids[i])
            if i in keep:
                kept[i] = (x, grids[i])
            if i < last:
                x = x.transpose(1, 2).reshape(B, x.shape[-1], *grids[i])
        return x, kept

    @property
    def pooling(self) -> str:
        return 'token' if self.class_token else 'avg'

    def final_features(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(tokens) if self.class_token else tokens

    def level_norm(self, level: int, tokens: torch.Tensor) -> torch.Tensor:
        # the final norm is applied only with the class token (docs/differences.md, "PVT v1's unused final norm")
        return self.final_features(tokens) if level == self.num_stages - 1 else tokens

    def prune_levels(self, last: int) -> None:
        super().prune_levels(last)
        if self.class_token:  # it joins only the last stage, which is gone
            del self.cls_token
            self.class_token = False

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x[:, 0] if self.class_token else x.mean(dim=1)
        return x if pre_logits else self.head(x)


# ---------------------------------------------------------------------------------------------
# Variants (timm-style entry points)
# ---------------------------------------------------------------------------------------------

# Widths, heads and MLP ratios are shared by every size (docs/numerics.md, "PVT v1 backbone"); sizes differ in
# depth only.
PVT_DEPTHS = {
    'tiny': (2, 2, 2, 2),
    'small': (3, 4, 6, 3),
    'medium': (3, 4, 18, 3),
    'large': (3, 8, 27, 3),
}
# The official FLatten setting of PVT v1 and v2: global focused linear attention in every block.
FLATTEN_MODE = dict(attn_type='LLLL', la_sr_ratios='1111')
# The PVT v1 paper's model: SRA with ratios 8-4-2-1 everywhere, class token, final norm applied.
_SOFTMAX = dict(attn_type='SSSS', sr_ratios=(8, 4, 2, 1), class_token=True)

_MODES = {'flatten': FLATTEN_MODE, 'softmax': _SOFTMAX}  # variant name prefix: attention
# size: descriptions of its FLatten and softmax variants (parameter counts at 1000 classes)
_DESCRIPTIONS = {
    'tiny': ('FLatten-PVT-T (12.2M): global focused linear attention in every block (paper Table 8).',
             'PVT-T baseline (13.2M): spatial-reduction softmax attention, class token (PVT v1 paper).'),
    'small': ('FLatten-PVT-S (21.7M).', 'PVT-S baseline (24.5M).'),
    'medium': ('FLatten-PVT-M (37.2M).', 'PVT-M baseline (44.2M).'),
    'large': ('FLatten-PVT-L (50.6M); its official config file is ``flatten_pvt_b.yaml``.', 'PVT-L baseline (61.4M).'),
}


def register_size_variants(cls: type, family: str, archs: Dict[str, dict], modes: Dict[str, dict],
                           descriptions: Dict[str, Tuple[str, ...]]) -> None:
    """Register ``{mode}_{family}_{size}`` for every size of `descriptions`: the architecture
    ``archs[size]`` with the attention settings ``modes[mode]``; ``descriptions[size]`` holds one
    docstring per mode, in the order of `modes` (PVT v1 and PVTv2 name their variants this way)."""
    register_variants(cls, {
        f'{mode}_{family}_{size}': ({**archs[size], **modes[mode]}, doc)
        for size, docs in descriptions.items() for mode, doc in zip(modes, docs, strict=True)})


# flatten_pvt_tiny ... softmax_pvt_large
register_size_variants(PyramidVisionTransformer, 'pvt', {size: {'depths': d} for size, d in PVT_DEPTHS.items()},
                       _MODES, _DESCRIPTIONS)

