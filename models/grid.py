"""Resolution-dependent parameters declare the 2-D grid they lay out, so checkpoints can be resized.

A module that owns such a parameter implements ``parameter_grids() -> {name: GridSpec}`` for its
own (direct) parameters; :func:`collect_parameter_grids` gathers them over a model under their
state-dict names. ``utils.checkpoint.load_pretrained`` then bicubic-resizes a checkpoint tensor of
another length over that grid (224² → 384², another window, a non-square stripe).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Tuple

import torch.nn as nn

__all__ = ['GridSpec', 'collect_parameter_grids']


@dataclass(frozen=True)
class GridSpec:
    """The grid of one parameter.

    * ``layout='tokens'``: shape (1, prefix_tokens + H·W, C); grid tokens row-major after
      ``prefix_tokens`` that are not on the grid (a class token), which are kept as they are.
    * ``layout='table'``: shape (H·W, K); row ``r`` is grid cell ``(r // W, r % W)`` (Swin's
      relative position bias table, whose grid is (2h−1)×(2w−1) for an h×w window).
    """
    grid: Tuple[int, int]
    layout: str = 'tokens'
    prefix_tokens: int = 0

    def __post_init__(self) -> None:
        if self.layout not in ('tokens', 'table'):
            raise ValueError(f"GridSpec layout must be 'tokens' or 'table', got {self.layout!r}")


def collect_parameter_grids(model: nn.Module) -> Dict[str, GridSpec]:
    """``{state-dict key: GridSpec}`` for every parameter whose module declares its grid."""
    grids = {}
    for prefix, module in model.named_modules():
        declare = getattr(module, 'parameter_grids', None)
        if declare is None:
            continue
        for name, spec in declare().items():
            grids[f'{prefix}.{name}' if prefix else name] = spec
    return grids
