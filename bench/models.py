"""Whole-model speed: inference and training img/s, batch-1 latency and peak memory for a list of configs.

    python -m bench.models --configs configs/flatten_swin_t.yaml configs/swin_t.yaml \\
        --batch-size 8 --dtypes fp32 bf16 --compile --channels-last --memory --json bench/results/models.json

Every (config, variant) of one dtype and one task is timed interleaved (see utils/benchmark.py).
The ``vs`` and ``train vs`` columns (inference and training speed over the first config's, same
variant and dtype, or its eager case where it lacks the variant) are ratios from one run: the
median over repeats of the ratio within each interleaved round (``paired_ratio``). ``%mm`` is the
inference rate in FLOP/s (2 × the model table's MACs) over the fp32 matmul rate measured at
start-up: how close a model gets to the machine's ceiling. ``--gemm-bound`` times each config's
linear layers alone at the shapes they see: ``%mm bound`` is the %mm the model would reach if
everything else (norms, activations, attention cores, reshapes) cost nothing. Peak memory is
measured in a fresh process per case (CPU resident-set high-water mark or the CUDA allocator's peak).

``--null-core`` adds a bound rather than a candidate: each focused-attention module returns its
queries unchanged and skips its DWC (:func:`null_focused_attention`), so the model still runs its
projections, norms, MLPs and softmax stages but its focused attention costs nothing. Its ``train vs``
is the ratio that no faster core or DWC can exceed, and its time difference to the eager or
``--compile-core`` case is what the focused attention costs in that step.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import subprocess
import sys
import types
from dataclasses import dataclass
from typing import Dict, List

import torch

if __package__ in (None, ''):  # run as `python bench/x.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import ConfigError, load_config  # noqa: E402
from models import build_model  # noqa: E402
from models.attention import focused_modules, set_compiled_core, set_fused_attention  # noqa: E402
from utils.benchmark import (  # noqa: E402
    autocast_for,
    exact_cpu_memory_accounting,
    inference_step,
    linear_layers_seconds,
    machine_info,
    matmul_gflops,
    measure,
    median,
    peak_memory_mb,
    prepare_model,
    random_images,
    training_step,
    tune_cpu_allocator,
    write_json,
)
from utils.flops import count_macs  # noqa: E402

TASKS = ('infer', 'train', 'latency')


@dataclass(frozen=True)
class Variant:
    compile: bool = False
    channels_last: bool = False
    reference: bool = False  # the reference (unfused) focused-attention implementation
    compiled_core: bool = False  # eager model, focused cores compiled (--compile-core)
    null_core: bool = False  # eager model, focused attention replaced by a no-op (--null-core): a bound

    @property
    def name(self) -> str:
        parts = ['compiled' if self.compile else 'eager']
        if self.channels_last:
            parts.append('channels_last')
        if self.reference:
            parts.append('reference')
        if self.compiled_core:
            parts.append('core compiled')
        if self.null_core:
            parts.append('null core')
        return '+'.join(parts)

    @property
    def needs_focused(self) -> bool:
        """The variant changes only focused-attention modules: a model without them is skipped."""
        return self.compiled_core or self.null_core


def _return_queries(self, q, k, v, mask, geometry):
    return q


def null_focused_attention(model: torch.nn.Module) -> int:
    """Make the focused attention of `model` free, for ``--null-core``: every focused module's
    :meth:`~models.attention.Attention.mix` returns the queries (no core, no float32 copies under
    autocast) and its DWC is skipped; projections, ``proj`` and everything outside the modules run
    as before. Returns how many modules were changed. The model no longer computes FLatten's
    attention: it is a timing bound, never a model to train."""
    modules = focused_modules(model)
    for module in modules:
        module.mix = types.MethodType(_return_queries, module)
        module.float32_core = False
        module.dwc = None
    return len(modules)


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--configs', nargs='+', default=['configs/flatten_swin_t.yaml', 'configs/swin_t.yaml'])
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--img-size', type=int, default=None, help="default: each config's DATA.IMG_SIZE")
    parser.add_argument('--dtypes', nargs='+', default=['fp32'], choices=['fp32', 'bf16', 'fp16'])
    parser.add_argument('--tasks', nargs='+', default=list(TASKS), choices=TASKS)
    parser.add_argument('--compile', action='store_true', help='also measure torch.compile variants')
    parser.add_argument('--channels-last', action='store_true', help='also measure channels_last variants')
    parser.add_argument('--reference', action='store_true',
                        help='also measure the reference focused-attention implementation (eager only)')
    parser.add_argument('--compile-core', action='store_true',
                        help='also measure eager models whose focused cores are compiled, as main.py '
                             '--compile-core does (models without focused attention are skipped in that variant)')
    parser.add_argument('--null-core', action='store_true',
                        help='also measure eager models whose focused attention returns its queries and skips its '
                             'DWC: the step time no faster core can beat (models without focused attention are '
                             'skipped in that variant)')
    parser.add_argument('--memory', action='store_true', help='peak training and inference memory (subprocesses)')
    parser.add_argument('--gemm-bound', action='store_true',
                        help="time each config's linear layers alone: the %%mm reached if nothing else cost time")
    parser.add_argument('--repeats', type=int, default=7, help='timed repeats per case (median reported)')
    parser.add_argument('--device', default=None, help="'cpu' or 'cuda' (default: cuda when available)")
    parser.add_argument('--json', default=None, metavar='PATH', help='write the results here')
    parser.add_argument('--probe', default=None, help=argparse.SUPPRESS)  # internal: one memory measurement
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error('--repeats must be at least 5 (medians of fewer repeats are noise on a shared machine)')
    return args


def load_model(path: str, variant: Variant, device: torch.device, img_size=None):
    """(model ready to run, config, MACs per image)."""
    opts = ['DATA.IMG_SIZE', str(img_size)] if img_size else None
    cfg = load_config(path, opts)
    model = build_model(cfg)
    if variant.reference:
        set_fused_attention(model, False)
    if variant.compiled_core:
        set_compiled_core(model)
    macs, _ = count_macs(model, (cfg.MODEL.IN_CHANS if 'IN_CHANS' in cfg.MODEL else 3,
                                 cfg.DATA.IMG_SIZE, cfg.DATA.IMG_SIZE))
    if variant.null_core:  # after counting: the bound keeps the MACs of the model it bounds
        null_focused_attention(model)
    return prepare_model(model, device, variant.channels_last, variant.compile), cfg, macs


def probe_memory(spec: dict) -> Dict[str, float]:
    """Run in a fresh process: peak memory of one training iteration and one inference pass."""
    device = torch.device(spec['device'])
    exact_cpu_memory_accounting()
    variant = Variant(**spec['variant'])
    model, cfg, _ = load_model(spec['config'], variant, device, spec['img_size'])
    images = random_images(spec['batch_size'], cfg.DATA.IMG_SIZE, device, variant.channels_last)
    autocast = autocast_for(spec['dtype'], device)
    out = {}
    train = training_step(model, images, cfg.MODEL.NUM_CLASSES, autocast)
    train()  # optimizer state and (compiled) graphs exist before the measured step
    out['train_mb'] = peak_memory_mb(train, device)
    infer = inference_step(model, images, autocast)
    infer()
    out['infer_mb'] = peak_memory_mb(infer, device)
    return out


def memory_in_subprocess(spec: dict) -> Dict[str, float]:
    result = subprocess.run([sys.executable, '-m', 'bench.models', '--probe', json.dumps(spec)],
                            capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if result.returncode != 0:
        raise RuntimeError(f'memory probe failed for {spec}:\n{result.stderr[-2000:]}')
    return json.loads(result.stdout.strip().splitlines()[-1])


def _time_tasks(cases: dict, args, dtype: str, autocast, device) -> dict:
    """{case key: {task: img/s (train, infer) or ms (latency), task_runs: [seconds]}}, every task's
    cases timed interleaved."""
    results = {key: {} for key in cases}
    for task in args.tasks:
        batch = 1 if task == 'latency' else args.batch_size
        fns = {}
        for key, case in cases.items():
            images = random_images(batch, case['cfg'].DATA.IMG_SIZE, device, key[1].channels_last)
            if task == 'train':
                fns[key] = training_step(case['model'], images, case['cfg'].MODEL.NUM_CLASSES, autocast)
            else:
                fns[key] = inference_step(case['model'], images, autocast)
        print(f'[{dtype}] timing {task} of {len(fns)} cases (interleaved, {args.repeats} repeats)', flush=True)
        # compiled cases compile during warm-up: two warm-up calls cover the first call and any recompile
        times = measure({str(i): fn for i, fn in enumerate(fns.values())}, device, repeats=args.repeats)
        for i, key in enumerate(fns):
            seconds = median(times[str(i)])
            results[key][task] = 1000 * seconds if task == 'latency' else batch / seconds
            results[key][task + '_runs'] = times[str(i)]
    return results


def _gemm_bound(cases: dict, results: dict, args, autocast, device, mm: float) -> None:
    """Each config's eager case (always measured): its nn.Linear calls, each timed alone at its shape."""
    for path in args.configs:
        case = cases[(path, Variant())]
        macs = case['macs']
        images = random_images(args.batch_size, case['cfg'].DATA.IMG_SIZE, device)
        seconds, linear_macs = linear_layers_seconds(case['model'], images, autocast, repeats=args.repeats)
        for key in results:
            if key[0] == path:
                results[key].update(linear_ms=1000 * seconds, linear_share=linear_macs / (macs * args.batch_size),
                                    gemm_bound_pct=100 * 2 * macs * args.batch_size / seconds / (mm * 1e9))


def paired_ratio(first_runs: List[float], runs: List[float]) -> float:
    """Speed over the first case's: the median over repeats of first seconds / these seconds, each
    pair from the same interleaved round. A shared machine slows whole rounds down together (one
    round's steps of every case moved by up to 45 % on a 2-core VM), and the per-round ratio cancels that."""
    return median([a / b for a, b in zip(first_runs, runs, strict=True)])


def _rows(cases: dict, results: dict, args, dtype: str, mm: float) -> List[dict]:
    rows = []
    for (path, variant), res in results.items():
        case = cases[(path, variant)]
        # the first config's same variant, or its eager case where it has no such variant (--compile-core
        # or --null-core on a model without focused attention)
        first = results.get((args.configs[0], variant)) or results.get((args.configs[0], Variant()))
        row = dict(config=path, model=case['cfg'].MODEL.NAME, variant=variant.name, dtype=dtype,
                   img_size=case['cfg'].DATA.IMG_SIZE, batch_size=args.batch_size, gmacs=case['macs'] / 1e9, **res)
        if ('infer' in res) and first:
            row['vs_first'] = paired_ratio(first['infer_runs'], res['infer_runs'])
            row['pct_matmul'] = 100 * 2 * case['macs'] * res['infer'] / (mm * 1e9)
        if ('train' in res) and first:
            row['train_vs_first'] = paired_ratio(first['train_runs'], res['train_runs'])
        rows.append(row)
    return rows


def run(args) -> dict:
    device = torch.device(args.device or ('cuda' if torch.cuda.is_available() else 'cpu'))
    if device.type == 'cpu':
        tune_cpu_allocator()
    variants = [Variant(compile=c, channels_last=cl)
                for c, cl in itertools.product([False, True] if args.compile else [False],
                                               [False, True] if args.channels_last else [False])]
    if args.reference:
        variants.append(Variant(reference=True))
    if args.compile_core:
        variants.append(Variant(compiled_core=True))
    if args.null_core:
        variants.append(Variant(null_core=True))
    mm = matmul_gflops(device)
    print(f'fp32 matmul rate: {mm:.1f} GFLOP/s on {device}', flush=True)
    rows = []
    for dtype in args.dtypes:
        autocast = autocast_for(dtype, device)
        cases = {}
        for path, variant in itertools.product(args.configs, variants):
            model, cfg, macs = load_model(path, variant, device, args.img_size)
            if variant.needs_focused and not focused_modules(model):
                continue  # no focused attention: the eager case already measures this model
            cases[(path, variant)] = dict(model=model, cfg=cfg, macs=macs)
        results = _time_tasks(cases, args, dtype, autocast, device)
        if args.memory:
            for key in cases:
                spec = dict(config=key[0], variant=key[1].__dict__, device=str(device), dtype=dtype,
                            batch_size=args.batch_size, img_size=args.img_size)
                results[key].update(memory_in_subprocess(spec))
        if args.gemm_bound:
            _gemm_bound(cases, results, args, autocast, device, mm)
        rows.extend(_rows(cases, results, args, dtype, mm))
        del cases
    return dict(machine=machine_info(device), matmul_gflops=mm, args=vars(args), rows=rows)


def print_table(payload: dict) -> None:
    columns = [('model', '{}', 'model'), ('variant', '{}', 'variant'), ('dtype', '{}', 'dtype'),
               ('infer', '{:.1f}', 'infer img/s'), ('vs_first', '{:.2f}x', 'vs'), ('pct_matmul', '{:.0f}%', '%mm'),
               ('train', '{:.2f}', 'train img/s'), ('train_vs_first', '{:.2f}x', 'train vs'),
               ('latency', '{:.1f}', 'b=1 ms'),
               ('train_mb', '{:.0f}', 'train MiB'), ('infer_mb', '{:.0f}', 'infer MiB'),
               ('linear_share', '{:.0%}', 'linear MACs'), ('linear_ms', '{:.1f}', 'linear ms'),
               ('gemm_bound_pct', '{:.0f}%', '%mm bound')]
    columns = [c for c in columns if any(c[0] in row for row in payload['rows'])]
    cells = [[c[2] for c in columns]] + [[c[1].format(row[c[0]]) if c[0] in row else '-' for c in columns]
                                         for row in payload['rows']]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    for j, r in enumerate(cells):
        print(' | '.join(v.ljust(w) if i < 3 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths, strict=True))))
        if j == 0:
            print('-+-'.join('-' * w for w in widths))
    m = payload['machine']
    print(f"\n{m['cpu'] if m['device'] == 'cpu' else m.get('gpu')}, torch {m['torch']}, {m['torch_threads']} threads, "
          f"batch {payload['args']['batch_size']}, medians of {payload['args']['repeats']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.probe:
        print(json.dumps(probe_memory(json.loads(args.probe))))
        return 0
    try:
        payload = run(args)
    except (ConfigError, FileNotFoundError) as err:
        print(f'ERROR {type(err).__name__}: {err}', file=sys.stderr)
        return 2
    print_table(payload)
    write_json(args.json, payload)
    return 0


if __name__ == '__main__':
    sys.exit(main())
