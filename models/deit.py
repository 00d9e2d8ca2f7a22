"""DeiT and FLatten-DeiT: one plain ViT whose blocks take their attention kind by name (paper Table 9).

One class builds both FLatten-DeiT (``attn_type='L'``: focused linear attention in all 12 blocks)
and the DeiT baseline (``attn_type='S'``: global softmax attention, the model of Touvron et al.).
The model is a single "stage" of ``depth`` blocks at the patch-grid resolution, so
``MODEL.LA.ATTN_TYPE`` is one letter: ``L``, ``S`` or ``M<k>`` (first k blocks L, the rest S).

**Design of FLatten-DeiT** (no official code exists: docs/numerics.md, "FLatten-DeiT (no official
code)"). The paper's Table 9 runs focused linear attention over the 14×14 patch grid ("win 14×14"),
and Fig. 5 shows its equivalent attention map as 196×196. The DWC (rank restoration) is a
zero-padded 5×5 conv over that grid, so a class token, which has no grid position, cannot take part
in it. Choices:

* **No class token: classify from the mean of the final-normed patch tokens** (global average
  pooling, ``global_pool='avg'``). Every block then attends over exactly the H·W grid tokens
  with the unchanged FLatten module (``focused_linear``, the one FLatten-Swin uses), with no
  softmax path and no special case in the attention. This is how every other FLatten backbone
  classifies (Swin, PVT, CSwin), and CPVT (Chu et al., 2021) found average pooling at least as
  good as the class token for DeiT once position comes from convolutions. The alternative, a
  class token that attends through a separate softmax path, would put a softmax in every block
  of a model meant to be linear and adds a second attention code path for one token.
* **No absolute position embedding.** Each FLA block already owns a learned per-position key
  encoding (``positional_encoding``, H·W × C) and its zero-padded DWC injects absolute position
  (the CPVT argument), so DeiT's extra 196×192 table before block 0 would be redundant. Dropping
  it also keeps the budget: with it FLatten-DeiT-T has 6.19M parameters; without it 6.153M
  (paper 6.1M), and 1.14 GMACs (paper 1.1G). 6.153M is the floor for any design that keeps DeiT-T
  and the FLatten module's own parameters (per block: 196×192 positional encoding, scale, 5×5
  DWC), so at the paper's one-decimal precision it prints 6.2; only a smaller FLatten module
  (e.g. a 3×3 DWC: 6.141M) would print 6.1.

Both choices are constructor arguments (``global_pool``, ``use_abs_pos``; ``MODEL.DEIT.GLOBAL_POOL``
/ ``ABS_POS_EMBED``) whose default follows the blocks: a model with any L block defaults to average
pooling without a position table; an all-softmax model is DeiT, with class token and position
embedding. A class token is refused when any block is L, because the L blocks need the token
sequence to be exactly the grid.

**DeiT baseline.** State-dict names, shapes and order equal those of the released DeiT models
(timm ``VisionTransformer``: ``cls_token``, ``pos_embed``, ``patch_embed.proj``,
``blocks.i.{norm1, attn.qkv, attn.proj, norm2, mlp.fc1, mlp.fc2}``, ``norm``, ``head``), and the
LayerNorm eps is DeiT's 1e-6, so DeiT checkpoints load strictly and reproduce DeiT's outputs.

**Any input size** (docs/numerics.md, "Any input size"): a partial patch is padded, and
``pos_embed`` and every block's positional encoding are resized to the actual patch grid with the
rule of ``--pretrained``, cached per size.
"""
from __future__ import annotations

from functools import partial
from typing import Dict, Optional, Tuple, Union

import torch
import torch.nn as nn
from timm.layers import PatchEmbed, to_2tuple, trunc_normal_

from .attention import AttentionOptions, block_kinds, letter_kinds
from .grid import GridSpec, ceil_div, resized_tokens
from .layers import Backbone, Block, run_blocks
from .registry import register_variants

__all__ = ['FLattenDeiT']

torch.fx.wrap('resized_tokens')

GLOBAL_POOLS = ('token', 'avg')


class FLattenDeiT(Backbone):
    """DeiT (a plain ViT) whose blocks use focused linear (L) or global softmax (S) attention.

    Args:
        img_size: build input size (int or (H, W)); position tensors are sized from it. The model
            runs at any size of at least ``patch_size`` (a partial patch is padded).
        attn_type: ``'L'``, ``'S'`` or ``'M<k>'`` (first k blocks L, the rest S).
        global_pool: ``'token'`` (class token, DeiT) or ``'avg'`` (mean of the patch tokens);
            None picks ``'avg'`` when any block is L, else ``'token'``.
        use_abs_pos: add DeiT's learned absolute position embedding after the patch embedding;
            None picks it only for all-softmax models (see the module docstring).
        focusing_factor, kernel_size: focused-attention power p and DWC kernel of the L blocks.

    ``forward_features`` returns the final-normed tokens (B, T, C), class token first when there
    is one; ``forward_head`` pools them and applies ``head``.
    """
    first_conv = 'patch_embed.proj'  # timm's pretrained_cfg name of the input layer

    def __init__(
            self,
            img_size: Union[int, Tuple[int, int]] = 224,
            patch_size: int = 16,
            in_chans: int = 3,
            num_classes: int = 1000,
            embed_dim: int = 192,
            depth: int = 12,
            num_heads: int = 3,
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            qk_scale: Optional[float] = None,
            drop_rate: float = 0.,
            attn_drop_rate: float = 0.,
            drop_path_rate: float = 0.1,
            attn_type: str = 'L',
            linear_kind: str = 'focused_linear',
            focusing_factor: int = 3,
            kernel_size: int = 5,
            global_pool: Optional[str] = None,
            use_abs_pos: Optional[bool] = None,
            use_checkpoint: bool = False,
    ):
        super().__init__()
        img_size = to_2tuple(img_size)
        self.min_input_size = patch_size
        self.check_size(img_size)
        kinds = block_kinds(attn_type, (depth,), letter_kinds(linear_kind))[0]
        has_linear = linear_kind in kinds
        if global_pool is None:
            global_pool = 'avg' if has_linear else 'token'
        if global_pool not in GLOBAL_POOLS:
            raise ValueError(f'DeiT: global_pool={global_pool!r} is not one of {GLOBAL_POOLS}')
        if (global_pool == 'token') and has_linear:
            raise ValueError(
                f'DeiT: global_pool=\'token\' needs a class token, but ATTN_TYPE {attn_type!r} has focused linear (L) '
                f'blocks, whose DWC needs the tokens to be exactly the patch grid; use global_pool=\'avg\'')
        if use_abs_pos is None:
            use_abs_pos = not has_linear
        self.img_size = img_size
        self.num_classes = num_classes
        self.num_features = self.embed_dim = embed_dim
        self.head_hidden_size = self.num_features  # timm 1.0: what the classifier reads (no pre-logits)
        self.attn_type = attn_type
        self.global_pool = global_pool
        self.grad_checkpointing = False
        norm_layer = partial(nn.LayerNorm, eps=1e-6)  # DeiT's eps, so its checkpoints reproduce

        self.patch_embed = PatchEmbed(img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim,
                                      strict_img_size=False, dynamic_img_pad=True)
        self.grid = grid = self.patch_embed.dynamic_feat_size(img_size)
        self.num_prefix_tokens = 1 if global_pool == 'token' else 0
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim)) if self.num_prefix_tokens else None
        num_tokens = grid[0] * grid[1] + self.num_prefix_tokens
        self.pos_embed = nn.Parameter(torch.zeros(1, num_tokens, embed_dim)) if use_abs_pos else None
        self.pos_drop = nn.Dropout(p=drop_rate)

        options = AttentionOptions(focusing_factor=focusing_factor, kernel_size=kernel_size, qk_scale=qk_scale)
        dpr = torch.linspace(0, drop_path_rate, depth).tolist()
        self.blocks = nn.ModuleList([
            Block(
                dim=embed_dim, num_heads=num_heads, grid_size=grid, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
                drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i], norm_layer=norm_layer,
                attn_kind=kinds[i], attn_options=options)
            for i in range(depth)])
        self.norm = norm_layer(embed_dim)
        self.head = self._make_head()
        self.feature_info = [dict(num_chs=embed_dim, reduction=patch_size, module=f'blocks.{i}') for i in range(depth)]

        for token in (self.pos_embed, self.cls_token):
            if token is not None:
                trunc_normal_(token, std=.02)
        self._finish_init(use_checkpoint)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        return {'pos_embed', 'cls_token'}

    def parameter_grids(self) -> Dict[str, GridSpec]:
        if self.pos_embed is None:
            return {}
        return {'pos_embed': GridSpec(self.grid, prefix_tokens=self.num_prefix_tokens)}

    @property
    def pooling(self) -> str:
        return self.global_pool

    def run_levels(self, x: torch.Tensor, keep, last: int):
        """Levels are the blocks, all on the ⌈H/p⌉ × ⌈W/p⌉ patch grid: block i gives (B, [1 +] N, C)
        tokens, class token first; ``forward_features`` final-norms those of the last block."""
        patch = self.patch_embed.patch_size
        grid = (ceil_div(x.shape[-2], patch[0]), ceil_div(x.shape[-1], patch[1]))  # a partial patch is padded
        x = self.patch_embed(x)
        if self.cls_token is not None:
            x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        if self.pos_embed is not None:
            x = x + resized_tokens(self.pos_embed, self.grid, self.num_prefix_tokens, grid)
        x = self.pos_drop(x)
        kept = {}
        for i, block in enumerate(self.blocks[:last + 1]):
            x = run_blocks((block,), x, self.grad_checkpointing, grid)
            if i in keep:
                kept[i] = (x, grid)
        return x, kept

    def level_norm(self, level: int, tokens: torch.Tensor) -> torch.Tensor:
        return self.norm(tokens)  # every block has the width of the final norm (timm's ViT convention)

    def prune_levels(self, last: int) -> None:
        self.blocks = self.blocks[:last + 1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """x: (B, T, C) from :meth:`forward_features` -> logits (B, num_classes) or pooled (B, C)."""
        x = x[:, 0] if self.global_pool == 'token' else x.mean(dim=1)
        return x if pre_logits else self.head(x)


# ---------------------------------------------------------------------------------------------
# Variants (timm-style entry points)
# ---------------------------------------------------------------------------------------------

_TINY = dict(embed_dim=192, depth=12, num_heads=3)
_SMALL = dict(embed_dim=384, depth=12, num_heads=6)
_BASE = dict(embed_dim=768, depth=12, num_heads=12)
_FLATTEN = dict(attn_type='L')
_SOFTMAX = dict(attn_type='S')

# name: (architecture, description with the parameter count at 1000 classes)
register_variants(FLattenDeiT, {
    'flatten_deit_tiny_patch16_224': (
        {**_TINY, **_FLATTEN},
        'FLatten-DeiT-T (6.15M, 1.14 GMACs): focused linear attention in all 12 blocks (paper Table 9).'),
    'flatten_deit_small_patch16_224': (
        {**_SMALL, **_FLATTEN}, 'FLatten-DeiT-S (22.9M): DeiT-S with focused linear attention in every block.'),
    'flatten_deit_base_patch16_224': (
        {**_BASE, **_FLATTEN}, 'FLatten-DeiT-B (88.3M): DeiT-B with focused linear attention in every block.'),
    'softmax_deit_tiny_patch16_224': (
        {**_TINY, **_SOFTMAX}, 'DeiT-T baseline (5.7M): class token, absolute position embedding, softmax attention.'),
    'softmax_deit_small_patch16_224': ({**_SMALL, **_SOFTMAX}, 'DeiT-S baseline (22.1M).'),
    'softmax_deit_base_patch16_224': ({**_BASE, **_SOFTMAX}, 'DeiT-B baseline (86.6M).'),
})

