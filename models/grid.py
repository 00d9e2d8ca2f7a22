"""Resolution-dependent parameters declare the 2-D grid they lay out, so they can be resized.

A module that owns such a parameter implements ``parameter_grids() -> {name: GridSpec}`` for its
own (direct) parameters; :func:`collect_parameter_grids` gathers them over a model under their
state-dict names. One rule resizes them, :func:`resize_grid_tensor` (bicubic over the 2-D grid):

* ``utils.checkpoint.load_pretrained`` applies it to a checkpoint tensor of another length
  (224² → 384², another window, a non-square stripe);
* a model run at another input size applies it to its own parameter for the grid of that size
  (:func:`resized_parameter`, cached per size), so both give the same numbers
  (docs/numerics.md, "Any input size").

Code whose control flow depends on the input size runs as a *leaf* under ``torch.fx`` tracing
(:func:`size_dependent`, :func:`resized_tokens`), so torchvision's ``create_feature_extractor``
traces every model and the traced module still works at any size.
"""
from __future__ import annotations

import dataclasses
import weakref
from dataclasses import dataclass
from typing import Dict, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch._guards import detect_fake_mode

__all__ = ['DERIVED_BUFFERS', 'GridSpec', 'collect_parameter_grids', 'resize_grid_tensor', 'resized_parameter',
           'padded_size', 'resized_tokens', 'size_dependent', 'ceil_div', 'symbolic', 'gather_map']


# Buffers derived from the geometry, which the model rebuilds instead of loading them (docs/checkpoints.md,
# "Strict loading and derived buffers").
DERIVED_BUFFERS = ('relative_position_index', 'relative_coords_table', 'attn_mask')


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


def resize_grid_tensor(value: torch.Tensor, spec: GridSpec, source_grid: Tuple[int, int]) -> torch.Tensor:
    """Bicubic resize (``align_corners=False``, PyTorch's A = −0.75) of a tensor laid out on
    `source_grid` to ``spec.grid``, as the official 224→384 fine-tuning does (docs/checkpoints.md,
    "Pretrained weights (load_pretrained)").

    tokens: (1, prefix + h·w, C) -> (1, prefix + H·W, C), prefix tokens untouched;
    table: (h·w, K) -> (H·W, K). Same size in and out returns the values unchanged. Half-precision
    values are interpolated in float32; float32 and float64 in their own precision.
    """
    (h, w), (H, W) = source_grid, spec.grid
    if spec.layout == 'tokens':
        prefix, cells = value[:, :spec.prefix_tokens], value[:, spec.prefix_tokens:]
        image = cells.reshape(1, h, w, -1).permute(0, 3, 1, 2)  # (1, C, h, w), token t at (t // w, t % w)
    else:
        image = value.T.reshape(1, -1, h, w)  # (1, K, h, w)
    if symbolic(H, W) or (h, w) != (H, W):
        work = image if image.dtype in (torch.float32, torch.float64) else image.float()
        image = F.interpolate(work, size=(H, W), mode='bicubic', align_corners=False).to(value.dtype)
    if spec.layout == 'tokens':
        return torch.cat([prefix, image.permute(0, 2, 3, 1).reshape(1, H * W, -1)], dim=1)
    return image.reshape(-1, H * W).T


# resized copies of parameters, per parameter (by id, dropped with it) and grid; see resized_parameter
_RESIZED: Dict[int, Tuple[weakref.ref, Dict[Tuple[int, int], Tuple[torch.Tensor, torch.Tensor]]]] = {}


def _resize_cache(param: torch.Tensor) -> Dict[Tuple[int, int], Tuple[torch.Tensor, torch.Tensor]]:
    key = id(param)
    entry = _RESIZED.get(key)
    if (entry is None) or (entry[0]() is not param):
        entry = _RESIZED[key] = (weakref.ref(param, lambda _, key=key: _RESIZED.pop(key, None)), {})
    return entry[1]


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (a.device == b.device) and (a.dtype == b.dtype) and (a.shape == b.shape) and torch.equal(a, b)


def resized_parameter(param: torch.Tensor, spec: GridSpec, grid: Tuple[int, int]) -> torch.Tensor:
    """`param`, laid out on ``spec.grid``, resized to `grid` by :func:`resize_grid_tensor`; `param`
    itself when `grid` is ``spec.grid``.

    Without gradients to record (inference, or a frozen parameter) the result is cached per
    parameter and grid, beside a copy of the values it was computed from, and recomputed once the
    parameter holds other values. The values are compared, not the parameter's version counter: torch's
    fused optimizers (AdamW ``fused=True``, this repository's default) update parameters in place
    without bumping it, so a cache filled by one evaluation would otherwise serve the next one, after
    more training, stale tables. In training it is recomputed every call, so gradients reach the
    parameter; under fake tensors (shape-only FLOP counting) nothing is cached. The cache is not part of
    the model: it is neither saved nor copied, and goes with the parameter.
    """
    if symbolic(*grid):  # traced with dynamic sizes: always resized (bicubic at the same size is the identity)
        return resize_grid_tensor(param, dataclasses.replace(spec, grid=tuple(grid)), spec.grid)
    grid = (int(grid[0]), int(grid[1]))
    if grid == spec.grid:
        return param
    target = dataclasses.replace(spec, grid=grid)
    if ((torch.is_grad_enabled() and param.requires_grad) or torch.compiler.is_compiling()
            or (detect_fake_mode() is not None)):
        return resize_grid_tensor(param, target, spec.grid)
    cache = _resize_cache(param)
    source = param.detach()
    hit = cache.get(grid)
    if (hit is None) or not _same(hit[0], source):
        hit = cache[grid] = (source.clone(), resize_grid_tensor(source, target, spec.grid))
    return hit[1]


def symbolic(*sizes) -> bool:
    """Whether any of `sizes` is symbolic (a ``torch.SymInt``): the model is being traced with dynamic
    shapes (``torch.export``, the ONNX exporter, ``torch.compile`` with dynamic sizes). Size-dependent
    code then takes a branch-free form valid at every size (resize to a possibly equal size), where
    eager code compares sizes and skips the work; the two agree to float rounding (docs/export.md)."""
    return any(isinstance(size, torch.SymInt) for size in sizes)


def padded_size(size: Tuple[int, int], window: Tuple[int, int]) -> Tuple[int, int]:
    """`size` rounded up to whole `window` tiles (Swin's windows, CSwin's stripes). Written without
    negative floor divisions: the ONNX exporter turns a symbolic ``//`` into ONNX's ``Div``, which
    truncates toward zero."""
    return tuple((side + tile - 1) // tile * tile for side, tile in zip(size, window, strict=True))


def gather_map(tokens: torch.Tensor, size: Tuple[int, int], rows: torch.Tensor, cols: torch.Tensor,
               dim: int = 1) -> torch.Tensor:
    """The tokens of a row-major ``H×W`` map (along `dim` of `tokens`) at the positions ``(rows, cols)``,
    two integer tensors broadcast together and flattened in that order; a position past the map gives
    zeros. The traced (symbolic-size) forwards of Swin and CSwin pad, roll, merge and cut windows with it,
    instead of comparing sizes (docs/export.md): indices are clamped into the map, then masked."""
    H, W = size
    index = (rows.clamp(max=H - 1) * W + cols.clamp(max=W - 1)).reshape(-1)
    shape = [1] * tokens.dim()
    shape[dim] = -1
    outside = ((rows >= H) | (cols >= W)).reshape(shape)
    return torch.where(outside, torch.zeros((), dtype=tokens.dtype, device=tokens.device),
                       tokens.index_select(dim, index))


def ceil_div(size: int, step: int) -> int:
    """⌈size / step⌉, also for a traced size (torch.fx, torch.export). Written as the padding of timm's
    ``PatchEmbed`` and a strided conv compute it, so that under torch.export the token map the model
    computes and the one the conv produces are the same symbolic expression (else reshapes between
    them cannot be proven valid at every size)."""
    return (size + (step - size % step) % step) // step


def resized_tokens(param: torch.Tensor, build_grid: Tuple[int, int], prefix_tokens: int,
                   grid: Tuple[int, int]) -> torch.Tensor:
    """A (1, prefix + H·W, C) position embedding built for `build_grid`, for the `grid` map
    (:func:`resized_parameter`). A leaf under torch.fx: modules that call it register it with
    ``torch.fx.wrap('resized_tokens')``."""
    return resized_parameter(param, GridSpec(tuple(build_grid), prefix_tokens=prefix_tokens), grid)


def size_dependent(module: nn.Module, *args):
    """``module.size_dependent_forward(*args)``: a forward whose control flow depends on the input
    size (padding, windows, cached masks and encodings). Modules that call it register it with
    ``torch.fx.wrap('size_dependent')``, so a traced model records the call as one node and runs
    it with the actual sizes."""
    return module.size_dependent_forward(*args)
