"""Focused-attention numerics under reduced precision, on the activations of a trained model.

    python -m bench.bf16_numerics --models configs/demo/flatten_swin_fmnist.yaml \\
        --checkpoint output/flatten_swin_micro_fmnist/default/max_acc.pth --json bench/results/bf16_numerics.json

The model of the config `--models` (one) is loaded from `--checkpoint` (a run of main.py) and runs
`--images` test images of its dataset. Every call of the focused core (``focused_linear_attention``)
records its q, k, v, temperature and positional encoding: the real activations of a trained model, not
random ones. For each call the core is then computed four ways:

* ``float64``: the reference implementation in float64, the ground truth;
* ``float32``: the fused path in float32, what training without autocast computes;
* ``bf16 autocast`` / ``fp16 autocast``: what the attention module computes under that autocast. The
  projections hand the core q, k, v rounded to the autocast dtype, and the core runs in float32
  (docs/numerics.md, "Mixed precision"). So the inputs are rounded to bf16 / fp16 and the fused core is
  run under autocast.

The table gives, per module, ``‖out − ref‖ / ‖ref‖`` over the images, and the largest over all modules.
A second table scales every captured input by 1, 10, 100, 1e3 and 1e4 and reports whether the outputs
stay finite. Without `--checkpoint` the model keeps its initial weights (for tests).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Dict, List

import torch

if __package__ in (None, ''):  # run as `python bench/x.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from config import load_config  # noqa: E402
from data import build_dataset  # noqa: E402
from models import build_model  # noqa: E402
from models.attention import kinds  # noqa: E402
from models.attention.core import focused_linear_attention  # noqa: E402
from utils.benchmark import machine_info, write_json  # noqa: E402
from utils.checkpoint import load_pretrained  # noqa: E402

MAGNITUDES = (1.0, 1e1, 1e2, 1e3, 1e4)
LOW = {'bf16': torch.bfloat16, 'fp16': torch.float16}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0], parents=[common.shared_arguments(
        ['configs/demo/flatten_swin_fmnist.yaml'])])
    parser.add_argument('--checkpoint', default='', help='weights from a run of main.py (default: initial weights)')
    parser.add_argument('--images', type=int, default=64, help='test images to run')
    parser.add_argument('--data-path', default='', help='DATA.DATA_PATH of the config (default: its own)')
    args = parser.parse_args(argv)
    common.check_one_config(parser, args, 'its dataset gives the images')
    if args.images < 1:
        parser.error('--images must be at least 1')
    if args.checkpoint and not os.path.isfile(args.checkpoint):
        parser.error(f'--checkpoint {args.checkpoint!r} is not a file')
    return args


@contextlib.contextmanager
def recording(calls: List[dict]):
    """Record the inputs of every focused-core call the attention kinds make."""
    def record(q, k, v, scale, positional_encoding, num_heads, focusing_factor, fused=True, compiled=False):
        calls.append(dict(q=q.detach().float(), k=k.detach().float(), v=v.detach().float(),
                          scale=scale.detach().float(), pe=positional_encoding.detach().float(),
                          num_heads=num_heads, p=focusing_factor))
        return focused_linear_attention(q, k, v, scale, positional_encoding, num_heads, focusing_factor, fused,
                                        compiled=compiled)
    kinds.focused_linear_attention = record
    try:
        yield
    finally:
        kinds.focused_linear_attention = focused_linear_attention


def core(call: dict, dtype: torch.dtype, fused: bool, scale_inputs: float = 1.0, low: str = '') -> torch.Tensor:
    q, k, v = (call[name].to(dtype) * scale_inputs for name in ('q', 'k', 'v'))
    args = (call['scale'].to(dtype), call['pe'].to(dtype) * scale_inputs, call['num_heads'], call['p'])
    if not low:
        return focused_linear_attention(q, k, v, *args, fused=fused)
    # as the module under autocast: inputs rounded by the projections, then its float32 core
    q, k, v = (t.to(LOW[low]).float() for t in (q, k, v))
    return focused_linear_attention(q, k, v, *args, fused=fused)


def relative_error(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref).norm() / ref.norm())


def measure(calls: List[dict]) -> Dict[str, list]:
    errors, finite = [], []
    for i, call in enumerate(calls):
        ref = core(call, torch.float64, fused=False)
        row = dict(call=i, tokens=tuple(call['q'].shape[1:]), ref_max=float(ref.abs().max()),
                   float32=relative_error(core(call, torch.float32, True), ref))
        for low in LOW:
            row[f'{low} autocast'] = relative_error(core(call, torch.float32, True, low=low), ref)
        errors.append(row)
        for magnitude in MAGNITUDES:
            finite.append(dict(call=i, magnitude=magnitude, **{
                low: bool(torch.isfinite(core(call, torch.float32, True, magnitude, low=low)).all()) for low in LOW}))
    return dict(errors=errors, finite=finite)


LOW_COLUMNS = [('call', 'core call'), ('tokens', 'tokens × C'), ('float32', 'float32', '{:.1e}'),
               ('bf16 autocast', 'bf16 autocast', '{:.1e}'), ('fp16 autocast', 'fp16 autocast', '{:.1e}')]
FINITE_COLUMNS = [('magnitude', 'input scale', '{:g}'), ('bf16', 'bf16 finite'), ('fp16', 'fp16 finite')]


def print_tables(result: dict) -> None:
    errors = [dict(row, tokens=f'{row["tokens"][0]} × {row["tokens"][1]}') for row in result['errors']]
    worst = {key: max(row[key] for row in errors) for key in ('float32', 'bf16 autocast', 'fp16 autocast')}
    print('\n' + common.format_table(errors + [dict(worst, call='**largest**')], LOW_COLUMNS))
    finite = []
    for magnitude in MAGNITUDES:
        rows = [r for r in result['finite'] if r['magnitude'] == magnitude]
        finite.append(dict(magnitude=magnitude, **{low: f'{sum(r[low] for r in rows)}/{len(rows)}' for low in LOW}))
    print('\n' + common.format_table(finite, FINITE_COLUMNS))


def main(argv=None) -> int:
    args = parse_args(argv)
    (path,) = args.models
    cfg = load_config(path, ['DATA.DATA_PATH', args.data_path] if args.data_path else [])
    model = build_model(cfg).eval()
    if args.checkpoint:
        load_pretrained(model, args.checkpoint)
    dataset, _ = build_dataset(False, cfg)
    images = torch.stack([dataset[i][0] for i in range(min(args.images, len(dataset)))])
    calls: List[dict] = []
    with recording(calls), torch.no_grad():
        model(images)
    if not calls:
        print(f'{path}: the model makes no focused-attention call', file=sys.stderr)
        return 1
    with torch.no_grad():
        result = measure(calls)
    print_tables(result)
    write_json(args.json, dict(machine=machine_info(torch.device('cpu')), args=vars(args), **result))
    return 0


if __name__ == '__main__':
    sys.exit(main())
