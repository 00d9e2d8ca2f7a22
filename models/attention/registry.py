"""The attention-kind registry and the stage-letter grammar of ``MODEL.LA.ATTN_TYPE``.

Every attention kind is a subclass of :class:`~.base.Attention` (the one contract: the kind
defines how tokens mix, the shared base the projections, key/value reduction, stripe windows and
extras) and is built through one signature::

    create_attention(kind, dim, num_heads, grid_size=(H, W), qkv_bias=True, attn_drop=0., proj_drop=0.,
                     options=AttentionOptions(projections=..., sr_ratio=..., window=..., lepe=...))

Backbones never import a concrete class: they map their stage letters to kind names
(:func:`block_kinds`), set the layout fields of the options, and call :func:`create_attention`.
"""
from __future__ import annotations

import re
from typing import Callable, Dict, List, Sequence, Tuple

import torch.nn as nn

__all__ = ['LINEAR_KINDS', 'register_attention', 'create_attention', 'list_attention_kinds', 'parse_attn_type',
           'block_kinds', 'letter_kinds']

# The kinds MODEL.LA.LINEAR_KIND may put in the L stages of every backbone (FLatten's is the default;
# the others are the ablation zoo of .zoo).
LINEAR_KINDS = ('focused_linear', 'vanilla_linear', 'focused_only', 'dwc_only', 'hydra', 'efficient', 'angular',
                'relu_linear')


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


def create_attention(kind: str, dim: int, num_heads: int, grid_size: Tuple[int, int], **kwargs) -> nn.Module:
    """Build the attention kind `kind` for tokens on a ``grid_size`` grid of width `dim`; `kwargs`
    are the remaining arguments of :class:`~.base.Attention` (``qkv_bias``, ``attn_drop``,
    ``proj_drop``, ``options``)."""
    if kind not in _ATTENTION_KINDS:
        raise KeyError(f'unknown attention kind {kind!r}; known kinds: {", ".join(list_attention_kinds())}')
    return _ATTENTION_KINDS[kind](dim, num_heads, grid_size=tuple(grid_size), **kwargs)


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


def letter_kinds(linear_kind: str, softmax_kind: str = 'softmax') -> Dict[str, str]:
    """The stage letters every backbone understands: ``L`` -> `linear_kind` (``MODEL.LA.LINEAR_KIND``),
    ``S`` -> the backbone's softmax kind. Raises ValueError naming the key and the choices."""
    if linear_kind not in LINEAR_KINDS:
        raise ValueError(f'MODEL.LA.LINEAR_KIND={linear_kind!r} is not one of {list(LINEAR_KINDS)}')
    return {'L': linear_kind, 'S': softmax_kind}
