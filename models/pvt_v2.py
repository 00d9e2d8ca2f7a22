"""FLatten-PVTv2: Pyramid Vision Transformer v2 with focused linear attention
(docs/numerics.md, "PVT v2 backbone").

One class builds FLatten-PVTv2 (``attn_type='LLLL'``: focused linear attention over the whole
stage map in every block) and the PVTv2 baseline (``attn_type='SSSS'``, spatial-reduction
softmax attention with ratios 8-4-2-1). PVTv2 keeps the original layout for both: overlapping
patch embeddings, no absolute position embedding, an MLP with a 3×3 depthwise conv, a norm after
every stage and average pooling. State-dict names, shapes and order are those of the official
``PyramidVisionTransformerV2`` of ``flatten_pvt_v2.py``
(``tests/assets/official_state_dicts/flatten_pvt_v2_*.txt``).

``linear=True`` is PVTv2's "linear" mode in every block: keys/values from a 7×7 average pool of
the map (the key/value reduction of :mod:`models.attention.base`) and a ReLU after ``fc1``.
Unlike the official builders, ``img_size`` and ``num_classes`` are honoured: the FLA
``positional_encoding`` is sized from the stage maps of ``img_size``, and a stage map that the
spatial-reduction ratio of its focused-linear blocks does not divide raises a ValueError naming
the sizes. The model runs at any input size (the overlapping patch embeddings follow the conv
arithmetic; the positional encodings are resized to the actual maps, docs/numerics.md, "Any
input size").
"""
from __future__ import annotations

import math
from functools import partial
from typing import Callable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import to_2tuple

from .layers import Backbone, run_blocks
from .pvt import FLATTEN_MODE, PyramidBackbone, StagePlan, register_size_variants

__all__ = ['PyramidVisionTransformerV2']


class OverlapPatchEmbed(nn.Module):
    """Conv(kernel k, stride s, padding k//2), flatten, LayerNorm (eps 1e-5).

    x: (B, C_in, H, W) -> (B, H'·W', C) with ``H' = (H + 2·(k//2) − k) // s + 1``.
    """

    def __init__(self, kernel_size: int, stride: int, in_chans: int, embed_dim: int):
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=kernel_size, stride=stride, padding=kernel_size // 2)
        self.norm = nn.LayerNorm(embed_dim)

    def output_size(self, size: Tuple[int, int]) -> Tuple[int, int]:
        k, s, p = self.proj.kernel_size[0], self.proj.stride[0], self.proj.padding[0]
        return ((size[0] + 2 * p - k) // s + 1, (size[1] + 2 * p - k) // s + 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.norm(self.proj(x).flatten(2).transpose(1, 2))


class DWConv(nn.Module):
    """3×3 depthwise conv over the tokens of a `grid` map (None: the build map ``grid_size``):
    (B, H·W, C) -> (B, H·W, C).

    A module of its own only so that the weight is named ``dwconv.dwconv`` as officially.
    """

    def __init__(self, dim: int, grid_size: Tuple[int, int]):
        super().__init__()
        self.grid_size = tuple(grid_size)
        self.dwconv = nn.Conv2d(dim, dim, 3, 1, 1, bias=True, groups=dim)

    def forward(self, x: torch.Tensor, grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        B, N, C = x.shape
        x = self.dwconv(x.transpose(1, 2).reshape(B, C, *(grid or self.grid_size)))
        return x.flatten(2).transpose(1, 2)


class DepthwiseConvMlp(nn.Module):
    """PVTv2 MLP: fc1, [ReLU in linear mode], 3×3 depthwise conv, GELU, dropout, fc2, dropout.

    timm's ``MlpWithDepthwiseConv`` names its conv ``dwconv`` rather than ``dwconv.dwconv``, so it
    cannot load official checkpoints. x: (B, H·W, C) -> (B, H·W, C).
    """

    def __init__(self, dim: int, hidden_dim: int, grid_size: Tuple[int, int], drop: float = 0.,
                 linear: bool = False):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = DWConv(hidden_dim, grid_size)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)
        self.relu = nn.ReLU() if linear else nn.Identity()

    def forward(self, x: torch.Tensor, grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        x = self.dwconv(self.relu(self.fc1(x)), grid)
        x = self.drop(self.act(x))
        return self.drop(self.fc2(x))


class PyramidVisionTransformerV2(PyramidBackbone):
    """PVTv2 whose blocks use focused linear (L) or spatial-reduction softmax (S) attention.

    Args:
        img_size: build input size (int or (H, W)): it sizes the positional encodings; the model
            runs at any size of at least 32. Stage maps follow the conv arithmetic (224 -> 56, 28,
            14, 7; 200 -> 50, 25, 13, 7).
        embed_dims, num_heads, mlp_ratios, depths: per-stage width, heads, MLP ratio and depth.
        sr_ratios: key/value reduction ratio of the S blocks per stage.
        la_sr_ratios: key/value reduction ratio of the L blocks per stage ('1111' officially);
            see :func:`models.pvt.parse_sr_ratios`.
        attn_type: one letter per stage (``L``/``S``/``M``) plus the ``M`` block count.
        linear_kind: the attention kind of the L blocks (``MODEL.LA.LINEAR_KIND``).
        linear: PVTv2 linear mode in every block (7×7-pooled keys/values, ReLU in the MLP).
        norm_layer: norm of the blocks and of the per-stage ``norm{i}`` (official: LayerNorm eps
            1e-6); the patch-embedding norms are LayerNorm eps 1e-5 as officially.

    ``forward_features`` returns the normed last-stage tokens (B, N₄, C₄); ``forward_head``
    averages them and applies ``head``.
    """

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
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
            depths: Sequence[int] = (3, 4, 6, 3),
            sr_ratios: Sequence[int] = (8, 4, 2, 1),
            la_sr_ratios: Union[str, int, Sequence[int]] = '1111',
            attn_type: str = 'LLLL',
            linear_kind: str = 'focused_linear',
            linear: bool = False,
            focusing_factor: int = 3,
            kernel_size: int = 5,
            use_checkpoint: bool = False,
    ):
        super().__init__()
        stages = StagePlan(
            'PVTv2', depths=depths, embed_dims=embed_dims, num_heads=num_heads, mlp_ratios=mlp_ratios,
            sr_ratios=sr_ratios, la_sr_ratios=la_sr_ratios, attn_type=attn_type, linear_kind=linear_kind,
            qkv_bias=qkv_bias, qk_scale=qk_scale, drop_rate=drop_rate, attn_drop_rate=attn_drop_rate,
            drop_path_rate=drop_path_rate, norm_layer=norm_layer, focusing_factor=focusing_factor,
            kernel_size=kernel_size, linear=linear)
        self.img_size = to_2tuple(img_size)
        self.min_input_size = 4 * 2 ** (stages.num_stages - 1)
        self.check_size(self.img_size)
        self.num_classes = num_classes
        self.num_features = embed_dims[-1]
        self.head_hidden_size = self.num_features  # timm 1.0: what the classifier reads (no pre-logits)
        self.attn_type = attn_type
        self.linear = linear

        size = self.img_size
        self.grids: List[Tuple[int, int]] = []
        for i in range(stages.num_stages):
            patch_embed = OverlapPatchEmbed(
                kernel_size=7 if i == 0 else 3, stride=4 if i == 0 else 2,
                in_chans=in_chans if i == 0 else embed_dims[i - 1], embed_dim=embed_dims[i])
            size = patch_embed.output_size(size)
            self.grids.append(size)
            stages.check_geometry(self.img_size, i, size)
            setattr(self, f'patch_embed{i + 1}', patch_embed)
            setattr(self, f'block{i + 1}', stages.blocks(
                i, size, mlp_layer=partial(DepthwiseConvMlp, grid_size=size, drop=drop_rate, linear=linear)))
            setattr(self, f'norm{i + 1}', norm_layer(embed_dims[i]))
        self.head = self._make_head()
        self._set_feature_info(embed_dims, 'norm')
        self._finish_init(use_checkpoint)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """PVTv2 init (docs/numerics.md, "PVT v2 and linear mode"): every conv, the FLA ``dwc`` and ``sr`` included, is
        normal(0, √(2/fan_out)) with ``fan_out = k·k·out_channels / groups`` and bias 0."""
        Backbone._init_weights(m)
        if isinstance(m, nn.Conv2d):
            fan_out = m.kernel_size[0] * m.kernel_size[1] * m.out_channels // m.groups
            nn.init.normal_(m.weight, 0, math.sqrt(2.0 / fan_out))
            if m.bias is not None:
                nn.init.zeros_(m.bias)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        # the official set names pos_embed{1..4} and cls_token, which PVTv2 does not have
        return set()

    def run_levels(self, x: torch.Tensor, keep, last: int):
        """Levels are the stages, each ending with its norm: stage i gives normed (B, N_i, C_i)
        tokens; ``forward_features`` returns those of the last stage."""
        B = x.shape[0]
        grid = (x.shape[-2], x.shape[-1])
        kept = {}
        for i in range(last + 1):
            patch_embed = getattr(self, f'patch_embed{i + 1}')
            grid = patch_embed.output_size(grid)
            x = run_blocks(getattr(self, f'block{i + 1}'), patch_embed(x), self.grad_checkpointing, grid)
            x = getattr(self, f'norm{i + 1}')(x)
            if i in keep:
                kept[i] = (x, grid)
            if i < last:
                x = x.transpose(1, 2).reshape(B, x.shape[-1], *grid)
        return x, kept

    def final_features(self, tokens: torch.Tensor) -> torch.Tensor:
        return tokens  # every stage ends with its own norm

    def level_norm(self, level: int, tokens: torch.Tensor) -> torch.Tensor:
        return tokens


# ---------------------------------------------------------------------------------------------
# Variants (timm-style entry points)
# ---------------------------------------------------------------------------------------------

_WIDE = dict(embed_dims=(64, 128, 320, 512), num_heads=(1, 2, 5, 8))
# docs/numerics.md, "PVT v2 backbone"; B5 exists in the code only (no config, not in the paper)
PVT_V2_ARCHS = {
    'b0': dict(embed_dims=(32, 64, 160, 256), num_heads=(1, 2, 5, 8), mlp_ratios=(8, 8, 4, 4), depths=(2, 2, 2, 2)),
    'b1': dict(**_WIDE, mlp_ratios=(8, 8, 4, 4), depths=(2, 2, 2, 2)),
    'b2': dict(**_WIDE, mlp_ratios=(8, 8, 4, 4), depths=(3, 4, 6, 3)),
    'b3': dict(**_WIDE, mlp_ratios=(8, 8, 4, 4), depths=(3, 4, 18, 3)),
    'b4': dict(**_WIDE, mlp_ratios=(8, 8, 4, 4), depths=(3, 8, 27, 3)),
    'b5': dict(**_WIDE, mlp_ratios=(4, 4, 4, 4), depths=(3, 6, 40, 3)),
}
_SOFTMAX = dict(attn_type='SSSS', sr_ratios=(8, 4, 2, 1))

_MODES = {'flatten': FLATTEN_MODE, 'softmax': _SOFTMAX}  # variant name prefix: attention
# size: descriptions of its FLatten and softmax variants (parameter counts at 1000 classes)
_DESCRIPTIONS = {
    'b0': ('FLatten-PVTv2-B0 (3.6M): global focused linear attention in every block (paper Table 8).',
           'PVTv2-B0 baseline (3.7M; Table 8 prints 3.4M): spatial-reduction softmax attention.'),
    'b1': ('FLatten-PVTv2-B1 (12.9M).', 'PVTv2-B1 baseline (14.0M; Table 8 prints 13.1M).'),
    'b2': ('FLatten-PVTv2-B2 (22.5M; the paper prints 22.6).', 'PVTv2-B2 baseline (25.4M).'),
    'b3': ('FLatten-PVTv2-B3 (38.3M).', 'PVTv2-B3 baseline (45.2M).'),
    'b4': ('FLatten-PVTv2-B4 (51.8M).', 'PVTv2-B4 baseline (62.6M).'),
    'b5': ('FLatten-PVTv2-B5: in the official code, without config or reported result.', 'PVTv2-B5 baseline (82.0M).'),
}
# flatten_pvt_v2_b0 ... softmax_pvt_v2_b5
register_size_variants(PyramidVisionTransformerV2, 'pvt_v2', PVT_V2_ARCHS, _MODES, _DESCRIPTIONS)

