"""What the backbones share: the classifier interface, the pre-norm block, the block loop.

Every model here is a :class:`Backbone`: ``forward_features`` (tokens) → ``forward_head`` (pool and
classify), with ``num_classes``, ``num_features``, ``reset_classifier``, ``get_classifier``,
``no_weight_decay[_keywords]`` and ``set_grad_checkpointing`` (the timm interface).
"""
from __future__ import annotations

from typing import Callable, Iterable, Optional, Tuple

import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.layers import DropPath, Mlp, trunc_normal_

from .attention import AttentionOptions, create_attention

__all__ = ['Backbone', 'Block', 'run_blocks']


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, checkpointing: bool = False) -> torch.Tensor:
    """Apply `blocks` in order; with `checkpointing` (and grads enabled) each block recomputes its
    activations in the backward pass instead of storing them (TRAIN.USE_CHECKPOINT)."""
    for block in blocks:
        if checkpointing and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(block, x, use_reentrant=False)
        else:
            x = block(x)
    return x


class Block(nn.Module):
    """Pre-norm transformer block over one token grid (DeiT, PVT, PVTv2):
    ``x + DropPath(Attn(LN₁(x)))``, then ``x + DropPath(MLP(LN₂(x)))``.

    The attention is the registered kind `attn_kind` (built by name); `mlp_layer(dim, hidden)`
    replaces the GELU MLP (PVTv2's depthwise-conv MLP). State-dict names are the official
    ``norm1, attn, norm2, mlp``. x: (B, T, C) -> (B, T, C).
    """

    def __init__(
            self,
            dim: int,
            num_heads: int,
            grid_size: Tuple[int, int],
            mlp_ratio: float = 4.,
            qkv_bias: bool = True,
            drop: float = 0.,
            attn_drop: float = 0.,
            drop_path: float = 0.,
            norm_layer: Callable[[int], nn.Module] = nn.LayerNorm,
            attn_kind: str = 'softmax',
            attn_options: AttentionOptions = AttentionOptions(),
            mlp_layer: Optional[Callable[[int, int], nn.Module]] = None,
    ):
        super().__init__()
        self.norm1 = norm_layer(dim)
        self.attn = create_attention(
            attn_kind, dim, num_heads, grid_size=grid_size, qkv_bias=qkv_bias, attn_drop=attn_drop,
            proj_drop=drop, options=attn_options)
        self.drop_path = DropPath(drop_path) if drop_path > 0. else nn.Identity()
        self.norm2 = norm_layer(dim)
        hidden = int(dim * mlp_ratio)
        if mlp_layer is None:
            self.mlp = Mlp(in_features=dim, hidden_features=hidden, act_layer=nn.GELU, drop=drop)
        else:
            self.mlp = mlp_layer(dim, hidden)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


class Backbone(nn.Module):
    """Base of every model: the classifier interface and the shared weight init.

    Subclasses set ``img_size`` (H, W), ``num_classes`` and ``num_features``, create ``head`` with
    :meth:`_make_head` and end their constructor with :meth:`_finish_init`. They define
    ``forward_features``; ``forward_head`` averages the tokens by default (those with a class token
    override it). Those with their own block containers override :meth:`set_grad_checkpointing`.
    """
    img_size: Tuple[int, int]
    num_classes: int
    num_features: int
    grad_checkpointing: bool = False

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        """Linear: truncated normal std 0.02 and zero bias; LayerNorm: 1 and 0 (all five papers)."""
        if isinstance(m, nn.Linear):
            trunc_normal_(m.weight, std=.02)
            if m.bias is not None:
                nn.init.constant_(m.bias, 0)
        elif isinstance(m, nn.LayerNorm):
            nn.init.constant_(m.bias, 0)
            nn.init.constant_(m.weight, 1.0)

    def _make_head(self) -> nn.Module:
        """The classifier ``num_features -> num_classes`` (Identity for 0 classes), not yet initialised."""
        return nn.Linear(self.num_features, self.num_classes) if self.num_classes > 0 else nn.Identity()

    def _finish_init(self, use_checkpoint: bool) -> None:
        """Last step of every constructor: :meth:`_init_weights` over all modules in registration order
        (this order fixes the random draws of a seeded model), then gradient checkpointing."""
        self.apply(self._init_weights)
        self.set_grad_checkpointing(use_checkpoint)

    @torch.jit.ignore
    def no_weight_decay(self) -> set:
        """Parameter names exempt from weight decay besides 1-D tensors and biases. Empty by default:
        the focused attention's ``scale`` and ``positional_encoding`` are decayed, as in the official
        recipe (docs/differences.md, "Weight decay on scale and positional encodings")."""
        return set()

    @torch.jit.ignore
    def no_weight_decay_keywords(self) -> set:
        return set()

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def unused_parameters(self) -> set:
        """Names of parameters the forward pass never uses (kept for checkpoint compatibility)."""
        return set()

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int) -> None:
        """Replace the head with a freshly initialised one for `num_classes` (0: no head)."""
        self.num_classes = num_classes
        self.head = self._make_head()
        if num_classes > 0:
            self._init_weights(self.head)

    def check_input_size(self, x: torch.Tensor) -> None:
        """Position-dependent tensors are sized from ``img_size``: refuse other inputs clearly."""
        if tuple(x.shape[-2:]) != tuple(self.img_size):
            raise ValueError(
                f'{type(self).__name__} was built for {self.img_size[0]}x{self.img_size[1]} inputs (DATA.IMG_SIZE), '
                f'got {x.shape[-2]}x{x.shape[-1]}')

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """x: tokens (B, T, C) from ``forward_features`` -> logits (B, num_classes), or with `pre_logits`
        their mean (B, C)."""
        x = x.mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
