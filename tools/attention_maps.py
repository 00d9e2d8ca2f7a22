"""Where one query looks: softmax vs vanilla linear vs focused linear attention (paper Figs. 3 and 8).

    python -m tools.attention_maps --cfg configs/flatten_deit_t.yaml [--resume CKPT] [--image FILE] \\
        [--block blocks.11.attn] [--query ROW COL] [--png maps.png]

For one attention block on the image (Swin: its first window; DeiT: the whole grid), the block's own
q and k (positional encoding included) give the query's distribution over the keys under the three
formulations (models/attention/analysis.py, averaged over the heads). Saves the image with the query
marked and the three maps as a PNG grid, and prints each map's entropy in nats (log N is uniform).
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional, Sequence

if __package__ in (None, ''):  # run as `python tools/x.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.attention.analysis import FORMS, entropy, query_distributions, token_projections  # noqa: E402
from tools.common import TOOL_ERRORS, add_model_arguments, attention_inputs, model_and_image, save_figure  # noqa: E402

TITLES = {'softmax': 'Softmax', 'linear': 'Linear (ReLU)', 'focused': 'Focused linear'}


def maps_for(model, image, block: Optional[str], query):
    """(block name, grid, query index, {form: (H, W) map}, {form: entropy})."""
    inputs = attention_inputs(model, image)
    names = [name for name, _, _ in inputs]
    if block is None:
        block = names[-1]
    if block not in names:
        raise ValueError(f'--block {block!r} is not an analysable attention block; choose one of {names}')
    _, module, tokens = inputs[names.index(block)]
    H, W = module.grid_size
    row, col = query if query is not None else (H // 2, W // 2)
    if not (0 <= row < H and 0 <= col < W):
        raise ValueError(f'--query {row} {col} is outside the {H}x{W} token grid of {block}')
    q, k, _ = token_projections(module, tokens)
    index = row * W + col
    dists = query_distributions(q[index], k, module.num_heads, getattr(module, 'scale', None),
                                getattr(module, 'focusing_factor', 3))
    return block, (H, W), (row, col), {f: p.reshape(H, W) for f, p in dists.items()}, \
        {f: entropy(p) for f, p in dists.items()}


def plot(image, grid, query, maps, entropies, block: str, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 4, figsize=(13, 3.4))
    picture = image[0].permute(1, 2, 0)
    picture = (picture - picture.min()) / (picture.max() - picture.min() + 1e-12)
    axes[0].imshow(picture.numpy())
    scale_y, scale_x = image.shape[2] / grid[0], image.shape[3] / grid[1]
    axes[0].add_patch(matplotlib.patches.Rectangle((query[1] * scale_x, query[0] * scale_y), scale_x, scale_y,
                                                   fill=False, edgecolor='red', linewidth=2))
    axes[0].set_title(f'query {query} of {block}', fontsize=9)
    for ax, form in zip(axes[1:], FORMS, strict=True):
        ax.imshow(maps[form].numpy(), cmap='viridis')
        ax.plot(query[1], query[0], 'r+', markersize=10)
        ax.set_title(f'{TITLES[form]}: H = {entropies[form]:.2f} nats', fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    save_figure(fig, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_model_arguments(parser)
    parser.add_argument('--block', default=None, help='attention module name (default: the last analysable one)')
    parser.add_argument('--query', type=int, nargs=2, default=None, metavar=('ROW', 'COL'),
                        help='query token on the block grid (default: the centre)')
    parser.add_argument('--png', default='attention_maps.png', metavar='PATH')
    args = parser.parse_args(argv)
    try:
        model, _, image = model_and_image(args)
        block, grid, query, maps, entropies = maps_for(model, image, args.block, args.query)
    except TOOL_ERRORS as err:
        print(f'ERROR {type(err).__name__}: {err}', file=sys.stderr)
        return 2
    print(f'{block}: query {query} on a {grid[0]}x{grid[1]} grid (uniform entropy {math.log(grid[0] * grid[1]):.3f})')
    for form in FORMS:
        print(f'  {TITLES[form]:<15} entropy {entropies[form]:.3f} nats')
    plot(image, grid, query, maps, entropies, block, args.png)
    return 0


if __name__ == '__main__':
    sys.exit(main())
