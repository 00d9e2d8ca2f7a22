"""Where one query looks: softmax vs vanilla linear vs focused linear attention (paper Figs. 3 and 8).

    python -m tools.attention_maps --cfg configs/flatten_deit_t.yaml [--resume CKPT] [--image FILE] \\
        [--block blocks.11.attn] [--query ROW COL] [--png maps.png]

Every backbone works (DeiT, PVT, PVTv2, Swin, CSwin). For one attention module on the image (Swin:
its first window; CSwin: its first stripe window; DeiT, PVT: the whole map), the module's own q and k
(positional encoding included) give the query's distribution over the keys under the three
formulations (models/attention/analysis.py, averaged over the heads). The query is a cell of the
module's query grid (``module.window``, its centre by default); the map is drawn on its key grid
(``module.key_grid``: PVT's reduced or 7×7 pooled map, else the query grid); class-token keys count
in the entropy but are not drawn. Saves the image with the query marked and the three maps as a PNG
grid, and prints each map's entropy in nats (log n is uniform over the n keys).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Dict, NamedTuple, Optional, Sequence, Tuple

import torch

if __package__ in (None, ''):  # run as `python tools/x.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.attention.analysis import FORMS, entropy, query_distributions, token_projections  # noqa: E402
from tools.common import TOOL_ERRORS, add_model_arguments, attention_inputs, model_and_image, save_figure  # noqa: E402

TITLES = {'softmax': 'Softmax', 'linear': 'Linear (ReLU)', 'focused': 'Focused linear'}


class QueryMaps(NamedTuple):
    """One query's distributions over the keys of its module, as :func:`maps_for` returns them."""
    block: str
    grid: Tuple[int, int]  # the query grid (module.window)
    query: Tuple[int, int]  # (row, col) on it
    maps: Dict[str, torch.Tensor]  # {form: key_grid map of the query's distribution}
    entropies: Dict[str, float]  # {form: entropy in nats over all keys}
    key_grid: Tuple[int, int]  # the grid of the drawn keys (module.key_grid)
    num_keys: int  # n, class tokens included
    map_grid: Tuple[int, int]  # the token map the query window lies on (module.grid_size)


def maps_for(model, image, block: Optional[str], query) -> QueryMaps:
    """The maps of `query` ((row, col) on the query grid; None: its centre) in module `block` (None: the
    last one) on `image`. Raises ValueError naming a bad block or query."""
    inputs = attention_inputs(model, image)
    names = [name for name, _, _ in inputs]
    if block is None:
        block = names[-1]
    if block not in names:
        raise ValueError(f'--block {block!r} is not an analysable attention block; choose one of {names}')
    _, module, tokens = inputs[names.index(block)]
    H, W = module.window
    row, col = query if query is not None else (H // 2, W // 2)
    if not (0 <= row < H and 0 <= col < W):
        raise ValueError(f'--query {row} {col} is outside the {H}x{W} token grid of {block}')
    q, k, _ = token_projections(module, tokens)
    Hk, Wk = module.key_grid
    query_prefix, key_prefix = q.shape[0] - H * W, k.shape[0] - Hk * Wk  # class tokens come first
    if query_prefix < 0 or key_prefix < 0:
        raise ValueError(f'{block}: {q.shape[0]} queries and {k.shape[0]} keys do not cover its {H}x{W} query '
                         f'and {Hk}x{Wk} key grids')
    dists = query_distributions(q[query_prefix + row * W + col], k, module.num_heads, getattr(module, 'scale', None),
                                getattr(module, 'focusing_factor', 3))
    return QueryMaps(block, (H, W), (row, col), {f: p[key_prefix:].reshape(Hk, Wk) for f, p in dists.items()},
                     {f: entropy(p) for f, p in dists.items()}, (Hk, Wk), k.shape[0], tuple(module.grid_size))


def plot(image, result: QueryMaps, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    (row, col), (H, W), (Hk, Wk) = result.query, result.grid, result.key_grid
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.4))
    picture = image[0].permute(1, 2, 0)
    picture = (picture - picture.min()) / (picture.max() - picture.min() + 1e-12)
    axes[0].imshow(picture.numpy())
    # the first window lies at the top-left of the token map
    scale_y, scale_x = image.shape[2] / result.map_grid[0], image.shape[3] / result.map_grid[1]
    axes[0].add_patch(matplotlib.patches.Rectangle((col * scale_x, row * scale_y), scale_x, scale_y,
                                                   fill=False, edgecolor='red', linewidth=2))
    axes[0].set_title(f'query {result.query} of {result.block}', fontsize=9)
    # the query's position on the key grid (the same area of the window)
    marker = ((col + 0.5) * Wk / W - 0.5, (row + 0.5) * Hk / H - 0.5)
    for ax, form in zip(axes[1:], FORMS, strict=True):
        ax.imshow(result.maps[form].numpy(), cmap='viridis')
        ax.plot(*marker, 'r+', markersize=10)
        ax.set_title(f'{TITLES[form]}: H = {result.entropies[form]:.2f} nats', fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    save_figure(fig, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_model_arguments(parser)
    parser.add_argument('--block', default=None, help='attention module name (default: the last analysable one)')
    parser.add_argument('--query', type=int, nargs=2, default=None, metavar=('ROW', 'COL'),
                        help='query token on the block\'s query grid (default: the centre)')
    parser.add_argument('--png', default='attention_maps.png', metavar='PATH')
    args = parser.parse_args(argv)
    try:
        model, _, image = model_and_image(args)
        result = maps_for(model, image, args.block, args.query)
    except TOOL_ERRORS as err:
        print(f'ERROR {type(err).__name__}: {err}', file=sys.stderr)
        return 2
    (H, W), (Hk, Wk) = result.grid, result.key_grid
    keys = '' if (Hk, Wk) == (H, W) else f', keys on a {Hk}x{Wk} grid'
    print(f'{result.block}: query {result.query} on a {H}x{W} grid{keys} '
          f'(uniform entropy {math.log(result.num_keys):.3f})')
    for form in FORMS:
        print(f'  {TITLES[form]:<15} entropy {result.entropies[form]:.3f} nats')
    plot(image, result, args.png)
    return 0


if __name__ == '__main__':
    sys.exit(main())
