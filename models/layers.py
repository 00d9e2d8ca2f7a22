"""What the backbones share: the classifier interface, the pre-norm block, the block loop.

Every model here is a :class:`Backbone`: ``forward_features`` (tokens) → ``forward_head`` (pool and
classify), with ``num_classes``, ``num_features``, ``reset_classifier``, ``get_classifier``,
``no_weight_decay[_keywords]`` and ``set_grad_checkpointing`` (the timm interface), and the feature
interface of timm's hierarchical models for detection and segmentation: ``feature_info``,
``forward_intermediates`` and ``prune_intermediate_layers`` (so ``timm.create_model(name,
features_only=True)`` works through timm's ``FeatureGetterNet``).
"""
from __future__ import annotations

from typing import Any, Callable, Collection, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
import torch.utils.checkpoint
from timm.layers import DropPath, Mlp, to_2tuple, trunc_normal_
from timm.models._features import feature_take_indices
from timm.models._input import update_model_input_size

from .attention import AttentionOptions, create_attention
from .grid import DERIVED_BUFFERS, collect_parameter_grids, resize_grid_tensor

__all__ = ['Backbone', 'Block', 'run_blocks', 'Levels', 'OUTPUT_FORMATS']


def check_size(name: str, size: Tuple[int, int], min_input_size: int) -> None:
    """Raise ValueError naming `size` when a side is below `min_input_size`, the model's total
    stride: smaller inputs would leave the last stage without a single whole-image token."""
    if min(size) < min_input_size:
        raise ValueError(
            f'{name}: a {size[0]}x{size[1]} input is too small; every side must be at least '
            f'{min_input_size} pixels (the total stride of its patching and downsampling)')


def check_input(name: str, x: torch.Tensor, min_input_size: int) -> None:
    """:func:`check_size` for the image batch x; a leaf under torch.fx (the test needs the actual size)."""
    check_size(name, tuple(x.shape[-2:]), min_input_size)


torch.fx.wrap('check_input')

# Levels: the tokens of the last level run, and {level: (tokens, (H, W) map)} of the levels asked for
Levels = Tuple[torch.Tensor, Dict[int, Tuple[torch.Tensor, Tuple[int, int]]]]
# layouts of forward_intermediates: feature maps (B, C, H, W) or tokens (B, H·W, C)
OUTPUT_FORMATS = ('NCHW', 'NLC')


def run_blocks(blocks: Iterable[nn.Module], x: torch.Tensor, checkpointing: bool = False, *args) -> torch.Tensor:
    """Apply ``block(x, *args)`` for `blocks` in order (`args`: the token map's size, for example);
    with `checkpointing` (and grads enabled) each block recomputes its activations in the backward
    pass instead of storing them (TRAIN.USE_CHECKPOINT)."""
    for block in blocks:
        if checkpointing and torch.is_grad_enabled():
            x = torch.utils.checkpoint.checkpoint(block, x, *args, use_reentrant=False)
        else:
            x = block(x, *args)
    return x


class Block(nn.Module):
    """Pre-norm transformer block over one token grid (DeiT, PVT, PVTv2):
    ``x + DropPath(Attn(LN₁(x)))``, then ``x + DropPath(MLP(LN₂(x)))``.

    The attention is the registered kind `attn_kind` (built by name); `mlp_layer(dim, hidden)`
    replaces the GELU MLP by one that also takes the map size, ``mlp(x, grid)`` (PVTv2's
    depthwise-conv MLP). State-dict names are the official ``norm1, attn, norm2, mlp``.
    x: (B, T, C) on the `grid` map (None: the build map ``grid_size``) -> (B, T, C).
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
        self.mlp_takes_grid = mlp_layer is not None
        if mlp_layer is None:
            self.mlp = Mlp(in_features=dim, hidden_features=hidden, act_layer=nn.GELU, drop=drop)
        else:
            self.mlp = mlp_layer(dim, hidden)

    def forward(self, x: torch.Tensor, grid: Optional[Tuple[int, int]] = None) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), grid=grid))
        h = self.norm2(x)
        return x + self.drop_path(self.mlp(h, grid) if self.mlp_takes_grid else self.mlp(h))


class Backbone(nn.Module):
    """Base of every model: the classifier interface and the shared weight init.

    Subclasses set ``img_size`` (H, W), ``min_input_size``, ``num_classes``, ``num_features`` and
    ``feature_info``, create ``head`` with :meth:`_make_head` and end their constructor with
    :meth:`_finish_init`. ``forward_head`` averages the tokens by default (those with a class token
    override it). Those with their own block containers override :meth:`set_grad_checkpointing`.

    The forward pass is written once per family as :meth:`run_levels`: the model runs *feature
    level* by feature level (a stage of a hierarchical model, a block of DeiT), and
    ``forward_features`` and ``forward_intermediates`` both read its result, so the features of a
    level are the same tensors in both. ``feature_info[i]`` describes level i (``num_chs``,
    ``reduction``: its stride in pixels, ``module``: where it ends).
    """
    img_size: Tuple[int, int]  # the build size: it sizes the position-dependent tensors
    min_input_size: int  # the smallest side an input may have (the total stride)
    num_classes: int
    num_features: int
    feature_info: List[Dict[str, Any]]
    grad_checkpointing: bool = False

    @property
    def pooling(self) -> str:
        """How ``forward_head`` pools the tokens: 'avg' (their mean) here; 'token' in models that
        read a class token."""
        return 'avg'

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

    def reset_classifier(self, num_classes: int, global_pool: Optional[str] = None) -> None:
        """Replace the head with a freshly initialised one for `num_classes` (0: no head).

        `global_pool` (timm's argument) may only name the pooling the model was built with
        (``pooling``: 'avg', or 'token' with a class token); the pooling is part of the architecture
        here, so another value raises ValueError.
        """
        if global_pool not in (None, self.pooling):
            raise ValueError(f'{type(self).__name__} pools with {self.pooling!r} (set when it is built); '
                             f'reset_classifier cannot change it to global_pool={global_pool!r}')
        self.num_classes = num_classes
        self.head = self._make_head()
        if num_classes > 0:
            self._init_weights(self.head)

    # -- input size ----------------------------------------------------------------------------

    # per-module switches that set_input_size carries over to the rebuilt modules
    CARRIED_SWITCHES = ('grad_checkpointing', 'fused', 'compiled_core')

    def input_size_args(self, img_size: Tuple[int, int]) -> Dict[str, Any]:
        """Constructor arguments besides ``img_size`` that :meth:`set_input_size` changes for a new
        build size (Swin: its windows); none by default."""
        return {}

    @torch.jit.ignore
    def set_input_size(self, img_size: Union[int, Tuple[int, int]], **arch: Any) -> None:
        """Make `img_size` the build size, in place, as timm's models do (docs/models.md, timm's
        interface).

        The model is rebuilt from its constructor arguments (those ``create_model`` recorded) with
        ``img_size`` and :meth:`input_size_args` (Swin scales its windows with the patch grid, as timm's
        Swin does), plus `arch` overrides. Its weights are carried over: position-dependent tensors
        resized as ``--pretrained`` resizes them, buffers derived from the geometry rebuilt. The new
        modules replace the old ones (hooks on them are not carried over), on the same device and
        dtype, in the same train/eval mode, with the per-module switches of ``CARRIED_SWITCHES``.
        ``pretrained_cfg`` keeps describing the source weights; timm's model traits record the size.
        The global random state is left as it was. Raises ValueError for a size below
        ``min_input_size``, or a model ``create_model`` did not build whole (built from the class
        directly, or pruned to fewer levels).
        """
        img_size = to_2tuple(img_size)
        self.check_size(img_size)
        build_args = getattr(self, 'build_args', None)
        if build_args is None:
            raise ValueError(f'{type(self).__name__}.set_input_size needs the constructor arguments that '
                             f'models.create_model records; this model was built from the class directly')
        args = {**build_args, 'num_classes': self.num_classes, **self.input_size_args(img_size), **arch,
                'img_size': img_size}
        with torch.random.fork_rng(devices=[]):  # its initialisation leaves the seed stream as it was
            rebuilt = type(self)(**args)
        # buffers the geometry derives (relative position index, shift mask) come from the rebuilt model
        state = {key: value for key, value in self.state_dict().items() if not key.endswith(DERIVED_BUFFERS)}
        own = rebuilt.state_dict()
        if state.keys() != {key for key in own if not key.endswith(DERIVED_BUFFERS)}:
            raise ValueError(f'{type(self).__name__}.set_input_size: the model no longer has the modules its '
                             f'constructor builds (pruned to fewer levels?), so it cannot be rebuilt in place')
        old_grids = collect_parameter_grids(self)
        for key, spec in collect_parameter_grids(rebuilt).items():
            if state[key].shape != own[key].shape:
                state[key] = resize_grid_tensor(state[key], spec, old_grids[key].grid)
        state.update({key: value for key, value in own.items() if key.endswith(DERIVED_BUFFERS)})
        rebuilt.load_state_dict(state)
        reference = next(self.parameters())
        rebuilt.to(device=reference.device, dtype=reference.dtype).train(self.training)
        old_modules = dict(self.named_modules())
        for name, module in rebuilt.named_modules():
            old = old_modules.get(name)
            for switch in self.CARRIED_SWITCHES:
                if (type(old) is type(module)) and hasattr(old, switch):
                    setattr(module, switch, getattr(old, switch))
        for key, value in rebuilt.__dict__.items():  # hooks and timm's cfgs on this module stay
            if (not key.startswith('_')) or (key in ('_parameters', '_buffers', '_modules',
                                                     '_non_persistent_buffers_set')):
                self.__dict__[key] = value
        self.build_args = args
        update_model_input_size(self, img_size)

    def check_size(self, size: Tuple[int, int]) -> None:
        """Raise ValueError naming `size` when a side is below ``min_input_size`` (:func:`check_size`)."""
        check_size(type(self).__name__, size, self.min_input_size)

    def check_input_size(self, x: torch.Tensor) -> None:
        """Refuse an input too small for the model's patching (:meth:`check_size`). Any larger size
        runs: position-dependent tensors are resized to it (docs/numerics.md, "Any input size")."""
        check_input(type(self).__name__, x, self.min_input_size)

    # -- feature levels ------------------------------------------------------------------------

    def run_levels(self, x: torch.Tensor, keep: Collection[int], last: int) -> Levels:
        """Run levels 0..`last` on the image batch x; return the tokens of level `last` and the
        tokens and map size of the levels in `keep`. Each family's own forward pass."""
        raise NotImplementedError(f'{type(self).__name__} does not define run_levels()')

    def final_features(self, tokens: torch.Tensor) -> torch.Tensor:
        """``forward_features`` from the tokens of the last level: the final norm by default."""
        return self.norm(tokens)

    def level_norm(self, level: int, tokens: torch.Tensor) -> torch.Tensor:
        """What ``forward_intermediates(norm=True)`` applies to a level: the final norm, which is
        sized for (and applied to) the last level only, by default."""
        return self.norm(tokens) if level == len(self.feature_info) - 1 else tokens

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, in_chans, H, W), any size of at least ``min_input_size`` -> the final tokens
        (B, T, num_features)."""
        self.check_input_size(x)
        tokens, _ = self.run_levels(x, (), len(self.feature_info) - 1)
        return self.final_features(tokens)

    def forward_intermediates(
            self,
            x: torch.Tensor,
            indices: Optional[Union[int, Sequence[int]]] = None,
            norm: bool = False,
            stop_early: bool = False,
            output_fmt: str = 'NCHW',
            intermediates_only: bool = False,
    ) -> Union[List[torch.Tensor], Tuple[torch.Tensor, List[torch.Tensor]]]:
        """The features of the levels `indices` (None: all; an int n: the last n; negative indices
        count from the end), as timm's models define it.

        Each is (B, C, H, W) (``output_fmt='NCHW'``) or (B, H·W, C) (``'NLC'``), class tokens left
        out; `norm` applies :meth:`level_norm`. Returns the list, with `intermediates_only`, else
        ``(final, list)`` where ``final`` is ``forward_features(x)``, or the unnormed tokens of the
        last level asked for when `stop_early` skipped the rest.
        """
        if output_fmt not in OUTPUT_FORMATS:
            raise ValueError(f'output_fmt={output_fmt!r} is not one of {OUTPUT_FORMATS}')
        self.check_input_size(x)
        num_levels = len(self.feature_info)
        take, max_index = feature_take_indices(num_levels, indices)
        last = max_index if (stop_early or intermediates_only) else num_levels - 1
        tokens, kept = self.run_levels(x, set(take), last)
        intermediates = [self._format_level(i, *kept[i], norm, output_fmt) for i in take]
        if intermediates_only:
            return intermediates
        return (self.final_features(tokens) if last == num_levels - 1 else tokens), intermediates

    def _format_level(self, level: int, tokens: torch.Tensor, grid: Tuple[int, int], norm: bool,
                      output_fmt: str) -> torch.Tensor:
        if norm:
            tokens = self.level_norm(level, tokens)
        H, W = grid
        tokens = tokens[:, tokens.shape[1] - H * W:]  # a class token comes first
        if output_fmt == 'NLC':
            return tokens
        return tokens.transpose(1, 2).reshape(tokens.shape[0], -1, H, W).contiguous()

    def prune_levels(self, last: int) -> None:
        """Delete the modules that only levels after `last` use. Each family's own."""
        raise NotImplementedError(f'{type(self).__name__} does not define prune_levels()')

    def prune_intermediate_layers(self, indices: Union[int, Sequence[int]] = 1, prune_norm: bool = False,
                                  prune_head: bool = True) -> List[int]:
        """Keep only what the levels `indices` need (timm's convention); returns the levels kept.

        The final norm goes with `prune_norm` or when the last level goes; the head with
        `prune_head`. ``num_features`` becomes the width of the last level kept.
        """
        take, max_index = feature_take_indices(len(self.feature_info), indices)
        pruned_end = max_index < len(self.feature_info) - 1
        if pruned_end:
            self.prune_levels(max_index)
            self.feature_info = self.feature_info[:max_index + 1]
            self.num_features = self.feature_info[-1]['num_chs']
        if (prune_norm or pruned_end) and isinstance(getattr(self, 'norm', None), nn.Module):
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0)
        return take

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        """x: tokens (B, T, C) from ``forward_features`` -> logits (B, num_classes), or with `pre_logits`
        their mean (B, C)."""
        x = x.mean(dim=1)
        return x if pre_logits else self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
