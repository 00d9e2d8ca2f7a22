"""The attention-kind registry and the stage-letter grammar of ``MODEL.LA.ATTN_TYPE``.

Every attention kind attends over the tokens of one ``H×W`` grid (a Swin window, a PVT stage map,
a DeiT patch grid) and is built through one signature::

    Kind(dim, num_heads, grid_size=(H, W), qkv_bias=True, attn_drop=0., proj_drop=0.,
         options=AttentionOptions())

Token kinds take ``forward(x: (B, H·W, C), mask=None) -> (B, H·W, C)``; a kind whose class sets
``input_is_qkv = True`` (CSwin's, whose projections belong to the block) takes the stacked
``(3, B, H·W, C)`` projections instead. Backbones never import a concrete class: they map their
stage letters to kind names (:func:`block_kinds`) and call :func:`create_attention`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch.nn as nn

__all__ = ['AttentionOptions', 'register_attention', 'create_attention', 'list_attention_kinds',
           'parse_attn_type', 'block_kinds']


@dataclass(frozen=True)
class AttentionOptions:
    """Knobs of the attention kinds that are not geometry (from ``MODEL.LA``)."""
    focusing_factor: int = 3  # power p of the focused function f_p
    kernel_size: int = 5  # depthwise rank-restoration conv (DWC) kernel
    qk_scale: Optional[float] = None  # softmax logit scale; None means head_dim ** -0.5
    sr_ratio: int = 1  # PVT: keys/values from a stride-sr conv of the map (1: no reduction)
    linear: bool = False  # PVTv2 "linear" mode: keys/values from a 7×7 average pool of the map
    window: Optional[Tuple[int, int]] = None  # CSwin: stripe window inside the grid (None: the whole grid)


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


def create_attention(
        kind: str,
        dim: int,
        num_heads: int,
        grid_size: Tuple[int, int],
        qkv_bias: bool = True,
        attn_drop: float = 0.,
        proj_drop: float = 0.,
        options: AttentionOptions = AttentionOptions(),
) -> nn.Module:
    """Build the attention kind `kind` for tokens on a ``grid_size`` grid of width `dim`."""
    if kind not in _ATTENTION_KINDS:
        raise KeyError(f'unknown attention kind {kind!r}; known kinds: {", ".join(list_attention_kinds())}')
    if dim % num_heads:
        raise ValueError(f'attention width {dim} is not divisible by num_heads={num_heads}')
    return _ATTENTION_KINDS[kind](
        dim, num_heads, grid_size=tuple(grid_size), qkv_bias=qkv_bias, attn_drop=attn_drop,
        proj_drop=proj_drop, options=options)


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
