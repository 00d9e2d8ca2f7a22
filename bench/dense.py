"""Backbone forward time and peak memory at dense-prediction input sizes: FLatten vs softmax pairs.

    python -m bench.dense --pairs swin pvt cswin --sizes 512x2048 800x1333 --dtypes fp32 bf16 \\
        --repeats 5 --json bench/results/dense_cpu.json

Every model is a registered variant built at 224² and run, batch 1, at the detection/segmentation
sizes (H×W) its any-size support accepts (docs/numerics.md, "Any input size"). A case is
``model.forward_features(x)`` (the tokens, no head) in eval mode under ``torch.inference_mode()``,
in float32 or under bf16/fp16 autocast. The two models of a pair are timed interleaved (see
utils/benchmark.py), so ``ratio`` (FLatten time / baseline time: below 1, FLatten is faster) comes
from one run. The first call at a size resizes and caches the position-dependent parameters: it is
the first warm-up call, never timed. Peak memory is that of one warm forward above what was
allocated before it, measured in a fresh process per model (all its cases, one after the other;
the two processes of a pair run side by side).
A case that raises is recorded with its error text instead of numbers, and the exit status is 1.

``--micro`` runs tiny sizes (a few seconds per pair, for tests).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
from typing import Callable, Dict, List, Tuple

import torch

if __package__ in (None, ''):  # run as `python bench/x.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from models import create_model, list_families  # noqa: E402
from models.registry import variant_spec  # noqa: E402
from utils.benchmark import (  # noqa: E402
    autocast_for,
    exact_cpu_memory_accounting,
    machine_info,
    measure,
    median,
    peak_memory_mb,
    prepare_model,
    tune_cpu_allocator,
    write_json,
)


def family_pairs() -> Dict[str, Tuple[str, str, str, str]]:
    """Family -> (FLatten label, FLatten variant, baseline label, baseline variant): the smallest FLatten
    variant of every registered family and its smallest softmax baseline (both built at 224²)."""
    pairs = {}
    for family, names in list_families().items():
        flatten = next(n for n in names if n.startswith('flatten_'))
        baseline = next(n for n in names if n.startswith('softmax_'))
        pairs[family] = (variant_spec(flatten).label, flatten, variant_spec(baseline).label, baseline)
    return pairs


PAIRS = family_pairs()
DEFAULT_PAIRS = ['swin', 'pvt', 'cswin']
DENSE_SIZES = ['512x2048', '800x1333']  # ADE20K/Cityscapes-style crop; COCO's 1333×800 short-side resize
MICRO_SIZES = ['64x96', '96x64']
SIDES = ('flatten', 'baseline')

Size = Tuple[int, int]


def parse_size(text: str) -> Size:
    """'HxW' (or 'H×W') -> (H, W)."""
    try:
        h, w = (int(v) for v in text.lower().replace('×', 'x').split('x'))
    except ValueError:
        raise argparse.ArgumentTypeError(f'size {text!r} is not HxW (e.g. 512x2048)') from None
    if h <= 0 or w <= 0:
        raise argparse.ArgumentTypeError(f'size {text!r} must be positive')
    return h, w


def size_name(size: Size) -> str:
    return f'{size[0]}x{size[1]}'


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--pairs', nargs='+', default=DEFAULT_PAIRS, choices=list(PAIRS))
    parser.add_argument('--sizes', nargs='+', type=parse_size, default=None, metavar='HxW',
                        help=f'input sizes, height x width (default: {" ".join(DENSE_SIZES)}; '
                             f'--micro: {" ".join(MICRO_SIZES)})')
    parser.add_argument('--dtypes', nargs='+', default=['fp32', 'bf16'], choices=['fp32', 'bf16', 'fp16'])
    parser.add_argument('--repeats', type=int, default=None, help='timed repeats per case (median reported; '
                        'default 5, --micro 3)')
    parser.add_argument('--warmup', type=int, default=1,
                        help='untimed calls per model and case before the calibration call (at least 1: the '
                             'first call at a size builds the per-size caches)')
    parser.add_argument('--threads', type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument('--no-memory', dest='memory', action='store_false', help='skip the peak-memory probes')
    parser.add_argument('--micro', action='store_true', help='tiny sizes and 3 repeats: runs in seconds (tests)')
    parser.add_argument('--device', default=None, help="'cpu' or 'cuda' (default: cuda when available)")
    parser.add_argument('--json', default=None, metavar='PATH', help='write the results here')
    parser.add_argument('--probe', default=None, help=argparse.SUPPRESS)  # internal: one model's memory
    args = parser.parse_args(argv)
    if args.sizes is None:
        args.sizes = [parse_size(s) for s in (MICRO_SIZES if args.micro else DENSE_SIZES)]
    if args.repeats is None:
        args.repeats = 3 if args.micro else 5
    if args.repeats < 3:
        parser.error('--repeats must be at least 3 (the median of fewer is one sample)')
    if args.warmup < 1:
        parser.error('--warmup must be at least 1')
    if args.threads is not None and args.threads < 1:
        parser.error('--threads must be at least 1')
    args.pairs = list(dict.fromkeys(args.pairs))
    return args


def forward_features(model: torch.nn.Module, images: torch.Tensor,
                     autocast: Callable[[], contextlib.AbstractContextManager]) -> Callable[[], torch.Tensor]:
    """A closure running the backbone alone (tokens, no head): eval mode, no autograd."""
    model.eval()

    def step():
        with torch.inference_mode(), autocast():
            return model.forward_features(images)
    return step


def build(name: str, device: torch.device) -> torch.nn.Module:
    torch.manual_seed(0)
    return prepare_model(create_model(name, num_classes=0), device).eval()


def error_text(err: BaseException) -> str:
    return f'{type(err).__name__}: {err}'


# ---------------------------------------------------------------------------------------------
# Peak memory: one fresh process per model
# ---------------------------------------------------------------------------------------------

def probe_memory(spec: dict) -> Dict[str, dict]:
    """Run in a fresh process: for each case ``[H, W, dtype]``, the peak MiB of one forward after a
    warm-up forward (``{'HxW/dtype': {'mb': ...} or {'error': ...}}``)."""
    device = torch.device(spec['device'])
    if spec.get('threads'):
        torch.set_num_threads(spec['threads'])
    exact_cpu_memory_accounting()
    model = build(spec['model'], device)
    out = {}
    for h, w, dtype in spec['cases']:
        key = f'{h}x{w}/{dtype}'
        try:
            images = torch.randn(1, 3, h, w, device=device)
            step = forward_features(model, images, autocast_for(dtype, device))
            step()  # per-size caches exist before the measured call
            out[key] = {'mb': peak_memory_mb(step, device)}
        except Exception as err:  # noqa: BLE001 - reported in the results, as the timing side does
            out[key] = {'error': error_text(err)}
        finally:
            images = step = None
    return out


def memory_in_subprocesses(specs: Dict[str, dict]) -> Dict[str, Dict[str, dict]]:
    """:func:`probe_memory` of every spec, each in its own process, all started at once (a process's
    peak is its own: running them side by side changes their speed, not their memory)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    procs = {key: subprocess.Popen([sys.executable, '-m', 'bench.dense', '--probe', json.dumps(spec)], cwd=root,
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for key, spec in specs.items()}
    results = {}
    for key, proc in procs.items():
        stdout, stderr = proc.communicate()
        if proc.returncode == 0:
            results[key] = json.loads(stdout.strip().splitlines()[-1])
            continue
        sys.stderr.write(f'memory probe of {specs[key]["model"]} failed:\n{stderr[-3000:]}\n')
        last = (stderr.strip().splitlines() or ['(no output)'])[-1]
        message = f'memory probe exited with status {proc.returncode}: {last}'
        results[key] = {f'{h}x{w}/{dtype}': {'error': message} for h, w, dtype in specs[key]['cases']}
    return results


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------

def time_case(models: Dict[str, torch.nn.Module], size: Size, dtype: str, args, device: torch.device) -> dict:
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
            row[f'{side}_error'] = error_text(err)
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


def run_pair(pair: str, args, device: torch.device) -> List[dict]:
    flatten_label, flatten_name, baseline_label, baseline_name = PAIRS[pair]
    names = dict(flatten=flatten_name, baseline=baseline_name)
    models = {side: build(name, device) for side, name in names.items()}
    rows = []
    for size in args.sizes:
        for dtype in args.dtypes:
            print(f'[{pair}] {size_name(size)} {dtype}: timing {flatten_name} and {baseline_name} '
                  f'(interleaved, {args.repeats} repeats)', flush=True)
            row = dict(pair=pair, label=f'{flatten_label} vs {baseline_label}', flatten_model=flatten_name,
                       baseline_model=baseline_name, size=list(size), dtype=dtype)
            row.update(time_case(models, size, dtype, args, device))
            rows.append(row)
    del models
    if args.memory:
        cases = [[*row['size'], row['dtype']] for row in rows]
        print(f'[{pair}] peak memory of {" and ".join(names.values())} (a fresh process each)', flush=True)
        specs = {side: dict(model=name, cases=cases, device=str(device), threads=args.threads)
                 for side, name in names.items()}
        for side, memory in memory_in_subprocesses(specs).items():
            for row in rows:
                result = memory[f'{size_name(row["size"])}/{row["dtype"]}']
                if 'mb' in result:
                    row[f'{side}_mb'] = result['mb']
                else:
                    row[f'{side}_memory_error'] = result['error']
    return rows


def run(args) -> dict:
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cpu':
        tune_cpu_allocator()
    load_start = os.getloadavg()
    rows = []
    for pair in args.pairs:
        rows.extend(run_pair(pair, args, device))
    return dict(machine=machine_info(device), load_average=dict(start=load_start, end=os.getloadavg()),
                args=dict(vars(args), sizes=[size_name(s) for s in args.sizes]), rows=rows)


def has_errors(row: dict) -> bool:
    return any(key.endswith('error') for key in row)


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

COLUMNS = [('label', '{}', 'pair'), ('size', '{}', 'size (HxW)'), ('dtype', '{}', 'dtype'),
           ('flatten_ms', '{:.1f}', 'FLatten ms'), ('baseline_ms', '{:.1f}', 'baseline ms'),
           ('ratio', '{:.2f}', 'ratio'), ('flatten_mb', '{:.0f}', 'FLatten MiB'),
           ('baseline_mb', '{:.0f}', 'baseline MiB')]


def table_cells(row: dict) -> List[str]:
    cells = []
    for key, fmt, _ in COLUMNS:
        if key == 'size':
            cells.append(size_name(row['size']))
        elif key in row:
            cells.append(fmt.format(row[key]))
        else:
            side = key.split('_')[0]
            failed = f'{side}_error' in row or (key.endswith('_mb') and f'{side}_memory_error' in row)
            cells.append('error' if failed else '-')
    return cells


def format_table(payload: dict) -> str:
    lines = ['| ' + ' | '.join(c[2] for c in COLUMNS) + ' |',
             '|' + '|'.join('---' if i < 3 else '---:' for i in range(len(COLUMNS))) + '|']
    lines += ['| ' + ' | '.join(table_cells(row)) + ' |' for row in payload['rows']]
    m, a, load = payload['machine'], payload['args'], payload['load_average']
    where = m['cpu'] if m['device'] == 'cpu' else m.get('gpu')
    lines.append('')
    lines.append(f"{where}, {m['cpu_count']} cores, torch {m['torch']}, {m['torch_threads']} threads, batch 1, "
                 f"medians of {a['repeats']} interleaved repeats after {a['warmup']} warm-up + 1 calibration call; "
                 f"ratio = FLatten / baseline time; load average {load['start'][0]:.1f} -> {load['end'][0]:.1f}")
    errors = [(row, key, row[key]) for row in payload['rows'] for key in sorted(row) if key.endswith('error')]
    for row, key, text in errors:
        lines.append(f"ERROR {row['label']} {size_name(row['size'])} {row['dtype']} {key}: {text}")
    return '\n'.join(lines)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(probe_memory(json.loads(args.probe))))
        return 0
    threads = torch.get_num_threads()
    try:
        if args.threads is not None:
            torch.set_num_threads(args.threads)
        payload = run(args)
    finally:
        torch.set_num_threads(threads)  # main() also runs in-process (tests)
    print(format_table(payload))
    write_json(args.json, payload)
    return 1 if any(has_errors(row) for row in payload['rows']) else 0


if __name__ == '__main__':
    sys.exit(main())
