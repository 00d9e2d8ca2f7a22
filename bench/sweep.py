"""Resolution sweep: time vs number of tokens, focused linear vs softmax attention, with a log-log plot.

    python -m bench.sweep --json bench/results/sweep.json --png bench/results/sweep.png

Part 1, the attention module alone at batch 1 (dim 96, 3 heads, FLatten-Swin-T's stage-1 width):
global focused linear attention (FocusedLinearAttention over the whole grid) against global softmax
attention (SoftmaxAttention, PyTorch's fused SDPA kernel) on square grids of side 14 → 112
(196 → 12,544 tokens; each step 4× the tokens). Part 2, whole models at batch 1 for image sizes
224 → 896, ``--models`` (by default FLatten-DeiT-T and DeiT-T, global attention, and FLatten-Swin-T and
Swin-T, windows). At each size the candidates are timed interleaved (medians of --repeats).
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

if __package__ in (None, ''):  # run as `python bench/x.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from models.attention import AttentionOptions, FocusedLinearAttention, SoftmaxAttention  # noqa: E402
from utils.benchmark import (  # noqa: E402
    inference_step,
    machine_info,
    measure,
    median,
    random_images,
    tune_cpu_allocator,
    write_json,
)

MODELS = ['configs/flatten_deit_t.yaml', 'configs/deit_t.yaml', 'configs/flatten_swin_t.yaml', 'configs/swin_t.yaml']


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0], parents=[common.shared_arguments(
        MODELS, repeats=5, device=True)])
    parser.add_argument('--sides', type=int, nargs='+', default=[14, 28, 56, 112],
                        help='module part: grid sides (tokens = side²)')
    parser.add_argument('--dim', type=int, default=96)
    parser.add_argument('--heads', type=int, default=3)
    parser.add_argument('--img-sizes', type=int, nargs='+', default=[224, 448, 896], help='model part: image sizes')
    parser.add_argument('--skip-models', action='store_true', help='the module part only')
    parser.add_argument('--png', default=None, metavar='PATH', help='log-log plot of time vs tokens')
    args = parser.parse_args(argv)
    common.check_minimums(parser, args, repeats=5)
    return args


def module_sweep(args, device: torch.device):
    rows = []
    for side in args.sides:
        torch.manual_seed(0)
        options = AttentionOptions()
        modules = {'focused_linear': FocusedLinearAttention(args.dim, args.heads, (side, side), options=options),
                   'softmax': SoftmaxAttention(args.dim, args.heads, (side, side), options=options)}
        x = torch.randn(1, side * side, args.dim, device=device)
        fns = {name: inference_step(module.to(device), x) for name, module in modules.items()}
        times = measure(fns, device, repeats=args.repeats, warmup=1)
        for name in modules:
            rows.append(dict(part='module', attention=name, tokens=side * side, ms=1000 * median(times[name]),
                             runs=times[name]))
        print(f'module  {side * side:>6} tokens: ' + '  '.join(
            f'{name} {1000 * median(times[name]):8.2f} ms' for name in modules), flush=True)
    return rows


def model_sweep(args, device: torch.device):
    rows = []
    for img_size in args.img_sizes:
        fns, labels = {}, {}
        for path in args.models:
            spec = common.model_spec(path)
            try:
                model = spec.build(img_size=img_size).to(device)
            except ValueError as err:  # a size the windows do not tile
                print(f'skip {path} at {img_size}: {err}')
                continue
            patch = model.feature_info[0]['reduction']  # the patch size: stride of the first level
            fns[path] = inference_step(model, random_images(1, img_size, device))
            labels[path] = (spec.name, (img_size // patch) ** 2)
        times = measure(fns, device, repeats=args.repeats, warmup=1)
        for path, (name, tokens) in labels.items():
            rows.append(dict(part='model', model=name, config=path, img_size=img_size, tokens=tokens,
                             ms=1000 * median(times[path]), runs=times[path]))
        print(f'models {img_size}²: ' + '  '.join(f'{labels[p][0]} {1000 * median(times[p]):.1f} ms' for p in labels),
              flush=True)
    return rows


def growth(rows, key: str):
    """For each series, time(next size) / time(size) and tokens(next) / tokens(size)."""
    series = {}
    for row in rows:
        series.setdefault(row[key], []).append(row)
    out = {}
    for name, points in series.items():
        points = sorted(points, key=lambda r: r['tokens'])
        out[name] = [dict(tokens=(a['tokens'], b['tokens']), token_ratio=b['tokens'] / a['tokens'],
                          time_ratio=b['ms'] / a['ms']) for a, b in zip(points, points[1:], strict=False)]
    return out


def plot(rows, path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    parts = [p for p in ('module', 'model') if any(r['part'] == p for r in rows)]
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 4.5), squeeze=False)
    for ax, part in zip(axes[0], parts, strict=True):
        key = 'attention' if part == 'module' else 'model'
        for name in dict.fromkeys(r[key] for r in rows if r['part'] == part):
            points = sorted((r['tokens'], r['ms']) for r in rows if r['part'] == part and r[key] == name)
            style = '-' if ('flatten' in name or name == 'focused_linear') else '--'
            ax.plot(*zip(*points, strict=True), style, marker='o', label=name)
        ax.set_xscale('log')
        ax.set_yscale('log')
        ax.set_xlabel('tokens (first stage)' if part == 'model' else 'tokens')
        ax.set_ylabel('ms per image (batch 1)')
        ax.set_title('attention module alone' if part == 'module' else 'whole models')
        ax.grid(True, which='both', alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f'wrote {path}')


GROWTH_COLUMNS = [('part', 'part'), ('series', 'series'), ('tokens', 'tokens'),
                  ('token_ratio', 'tokens x', '{:.0f}'), ('time_ratio', 'time x', '{:.2f}')]


def main(argv=None) -> int:
    args = parse_args(argv)
    device = common.pick_device(args.device)
    if device.type == 'cpu':
        tune_cpu_allocator()
    rows = module_sweep(args, device)
    if not args.skip_models:
        rows += model_sweep(args, device)
    ratios = {'module': growth([r for r in rows if r['part'] == 'module'], 'attention'),
              'model': growth([r for r in rows if r['part'] == 'model'], 'model')}
    print('\ntime growth per step:\n')
    print(common.format_table([dict(step, part=part, series=name, tokens=f'{step["tokens"][0]}→{step["tokens"][1]}')
                        for part, series in ratios.items() for name, steps in series.items() for step in steps],
                       GROWTH_COLUMNS))
    write_json(args.json, dict(machine=machine_info(device), args=vars(args), rows=rows, growth=ratios))
    if args.png:
        plot(rows, args.png)
    return 0


if __name__ == '__main__':
    sys.exit(main())
