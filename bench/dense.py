"""Backbone forward time and peak memory at dense-prediction input sizes: FLatten vs softmax pairs.

    python -m bench.dense --models swin pvt cswin --sizes 512x2048 800x1333 --dtypes fp32 bf16 \\
        --repeats 5 --json bench/results/dense_cpu.json

Every model is built at 224² and run, batch 1, at the detection/segmentation sizes (H×W) its any-size
support accepts (docs/numerics.md, "Any input size"). A case is ``model.forward_features(x)`` (the
tokens, no head) in eval mode under ``torch.inference_mode()``, in float32 or under bf16/fp16 autocast.
The two models of a pair are timed interleaved (see utils/benchmark.py), so ``ratio`` (FLatten time /
baseline time: below 1, FLatten is faster) comes from one run. The first call at a size resizes and
caches the position-dependent parameters: it is the first warm-up call, never timed. Peak memory is
that of one warm forward above what was allocated before it, measured in a fresh process per model
(all its cases, one after the other; the two processes of a pair run side by side).
A case that raises is recorded with its error text instead of numbers, and the exit status is 1.

``--micro`` runs tiny sizes (a few seconds per pair, for tests).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Callable, List, Tuple

import torch

if __package__ in (None, ''):  # run as `python bench/x.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from utils.benchmark import (  # noqa: E402
    autocast_for,
    machine_info,
    measure,
    median,
    prepare_model,
    tune_cpu_allocator,
    write_json,
)
from utils.misc import parse_size  # noqa: E402

PAIRS = common.family_pairs()  # every family has a dense-size pair
DEFAULT_PAIRS = ['swin', 'pvt', 'cswin']
DENSE_SIZES = ['512x2048', '800x1333']  # ADE20K/Cityscapes-style crop; COCO's 1333×800 short-side resize
MICRO_SIZES = ['64x96', '96x64']

Size = Tuple[int, int]


def size_name(size: Size) -> str:
    return f'{size[0]}x{size[1]}'


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0], parents=[common.shared_arguments(
        DEFAULT_PAIRS, pairs=True, dtypes=['fp32', 'bf16'], repeats=None, warmup=1, threads=None, device=True,
        memory_probe=True)])
    parser.add_argument('--sizes', nargs='+', type=parse_size, default=None, metavar='HxW',
                        help=f'input sizes, height x width (default: {" ".join(DENSE_SIZES)}; '
                             f'--micro: {" ".join(MICRO_SIZES)})')
    parser.add_argument('--no-memory', dest='memory', action='store_false', help='skip the peak-memory probes')
    parser.add_argument('--micro', action='store_true', help='tiny sizes and 3 repeats (not 5): runs in seconds '
                        '(tests)')
    args = parser.parse_args(argv)
    if args.sizes is None:
        args.sizes = [parse_size(s) for s in (MICRO_SIZES if args.micro else DENSE_SIZES)]
    if args.repeats is None:
        args.repeats = 3 if args.micro else 5
    # --warmup counts the first call at a size, which builds the per-size caches
    common.check_minimums(parser, args, repeats=3, warmup=1)
    args.models = list(dict.fromkeys(args.models))
    return args


def forward_features(model: torch.nn.Module, images: torch.Tensor,
                     autocast: Callable[[], contextlib.AbstractContextManager]) -> Callable[[], torch.Tensor]:
    """A closure running the backbone alone (tokens, no head): eval mode, no autograd."""
    model.eval()

    def step():
        with torch.inference_mode(), autocast():
            return model.forward_features(images)
    return step


def build(spec: common.ModelSpec, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return prepare_model(spec.build(num_classes=0), device).eval()


def memory_steps(spec: dict, device: torch.device):
    """The --probe side: one forward of the model at each case ``'HxW/dtype'``."""
    model = build(common.model_spec(spec['model']), device)

    def step_for(case: str):
        size, dtype = case.split('/')
        images = torch.randn(1, 3, *parse_size(size), device=device)
        return forward_features(model, images, autocast_for(dtype, device))
    return step_for


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def time_case(models: dict, size: Size, dtype: str, args, device: torch.device) -> dict:
    """One (pair, size, dtype) row's timing fields: the first call of each model (the first warm-up)
    checks it runs and records its output shape; those that run are then timed interleaved."""
    autocast = autocast_for(dtype, device)
    images = torch.randn(1, 3, *size, device=device)
    row, steps = {}, {}
    for side, model in models.items():
        step = forward_features(model, images, autocast)
        try:
            tokens = step()
        except Exception as err:  # noqa: BLE001 - the row carries the error text, the run goes on
            row[f'{side}_error'] = common.error_text(err)
            print(f'  {side}: {row[f"{side}_error"]}', file=sys.stderr, flush=True)
            continue
        row[f'{side}_shape'] = list(tokens.shape)
        del tokens
        steps[side] = step
    if steps:
        times = measure(steps, device, repeats=args.repeats, warmup=args.warmup - 1,
                        min_repeat_s=0.0 if args.micro else 0.3)
        for side, runs in times.items():
            row[f'{side}_ms'] = 1000 * median(runs)
            row[f'{side}_runs'] = runs
    if 'flatten_ms' in row and 'baseline_ms' in row:
        row['ratio'] = row['flatten_ms'] / row['baseline_ms']
    return row


def run_pair(pair: common.ModelPair, args, device: torch.device) -> List[dict]:
    specs = pair.sides()
    models = {side: build(spec, device) for side, spec in specs.items()}
    rows = []
    for size in args.sizes:
        for dtype in args.dtypes:
            print(f'[{pair.name}] {size_name(size)} {dtype}: timing {pair.flatten.name} and {pair.baseline.name} '
                  f'(interleaved, {args.repeats} repeats)', flush=True)
            row = dict(pair=pair.name, label=pair.label, flatten_model=pair.flatten.name,
                       baseline_model=pair.baseline.name, size=list(size), dtype=dtype)
            row.update(time_case(models, size, dtype, args, device))
            rows.append(row)
    del models
    if args.memory:
        cases = [f'{size_name(row["size"])}/{row["dtype"]}' for row in rows]
        print(f'[{pair.name}] peak memory of {pair.flatten.name} and {pair.baseline.name} (a fresh process each)',
              flush=True)
        probes = {side: dict(model=spec.text, cases=cases, device=str(device), threads=args.threads)
                  for side, spec in specs.items()}
        for side, memory in common.probe_in_fresh_processes('bench.dense', probes, at_once=len(probes)).items():
            for row, case in zip(rows, cases, strict=True):
                if 'mb' in memory[case]:
                    row[f'{side}_mb'] = memory[case]['mb']
                else:
                    row[f'{side}_memory_error'] = memory[case]['error']
    return rows


def run(args) -> dict:
    device = common.pick_device(args.device)
    if device.type == 'cpu':
        tune_cpu_allocator()
    load_start = os.getloadavg()
    rows = []
    for text in args.models:
        rows.extend(run_pair(common.model_pair(text), args, device))
    return dict(machine=machine_info(device), load_average=dict(start=load_start, end=os.getloadavg()),
                args=dict(vars(args), sizes=[size_name(s) for s in args.sizes]), rows=rows)


def has_errors(row: dict) -> bool:
    return any(key.endswith('error') for key in row)


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

COLUMNS = [('label', 'pair'), ('size', 'size (HxW)'), ('dtype', 'dtype'), ('flatten_ms', 'FLatten ms', '{:.1f}'),
           ('baseline_ms', 'baseline ms', '{:.1f}'), ('ratio', 'ratio', '{:.2f}'),
           ('flatten_mb', 'FLatten MiB', '{:.0f}'), ('baseline_mb', 'baseline MiB', '{:.0f}')]


def table_row(row: dict) -> dict:
    """`row` as the table shows it: the size as HxW, 'error' where a side's case or memory probe failed."""
    shown = dict(row, size=size_name(row['size']))
    for side in common.SIDES:
        if f'{side}_error' in row:
            shown[f'{side}_ms'] = shown[f'{side}_mb'] = 'error'
        elif f'{side}_memory_error' in row:
            shown[f'{side}_mb'] = 'error'
    return shown


def format_report(payload: dict) -> str:
    a, load = payload['args'], payload['load_average']
    lines = [common.format_table([table_row(row) for row in payload['rows']], COLUMNS), '',
             f"{common.describe_machine(payload['machine'])}, batch 1, medians of {a['repeats']} interleaved repeats "
             f"after {a['warmup']} warm-up + 1 calibration call; ratio = FLatten / baseline time; "
             f"load average {load['start'][0]:.1f} -> {load['end'][0]:.1f}"]
    for row in payload['rows']:
        for key in sorted(k for k in row if k.endswith('error')):
            lines.append(f"ERROR {row['label']} {size_name(row['size'])} {row['dtype']} {key}: {row[key]}")
    return '\n'.join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.probe:
        return common.answer_probe(args.probe, memory_steps)
    with common.torch_threads(args.threads):
        payload = run(args)
    print(format_report(payload))
    write_json(args.json, payload)
    return 1 if any(has_errors(row) for row in payload['rows']) else 0


if __name__ == '__main__':
    sys.exit(main())
