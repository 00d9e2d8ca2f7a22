"""Whole-model speed: inference and training img/s, batch-1 latency and peak memory for a list of models.

    python -m bench.models --models configs/flatten_swin_t.yaml configs/swin_t.yaml \\
        --batch-size 8 --dtypes fp32 bf16 --compile --channels-last --memory --json bench/results/models.json

Every (model, variant) of one dtype and one task is timed interleaved (see utils/benchmark.py).
The ``vs`` and ``train vs`` columns (inference and training speed over the first model's, same
variant and dtype, or its eager case where it lacks the variant) are ratios from one run: the
median over repeats of the ratio within each interleaved round (``paired_ratio``). ``%mm`` is the
inference rate in FLOP/s (2 × the model table's MACs) over the fp32 matmul rate measured at
start-up: how close a model gets to the machine's ceiling. ``--gemm-bound`` times each model's
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
import os
import sys
import types
from dataclasses import dataclass
from typing import List

import torch

if __package__ in (None, ''):  # run as `python bench/x.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from models.attention import focused_modules, set_compiled_core, set_fused_attention  # noqa: E402
from utils.benchmark import (  # noqa: E402
    autocast_for,
    inference_step,
    linear_layers_seconds,
    machine_info,
    matmul_gflops,
    measure,
    median,
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
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0], parents=[common.shared_arguments(
        ['configs/flatten_swin_t.yaml', 'configs/swin_t.yaml'], dtypes=['fp32'], repeats=7, device=True,
        memory_probe=True)])
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--img-size', type=int, default=None, help="default: each model's own")
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
                        help="time each model's linear layers alone: the %%mm reached if nothing else cost time")
    args = parser.parse_args(argv)
    # medians of fewer repeats are noise on a shared machine
    common.check_minimums(parser, args, repeats=5, batch_size=1)
    return args


def load_model(text: str, variant: Variant, device: torch.device, img_size=None) -> dict:
    """One case: the model of `text` ready to run, its name, image size, classes and MACs per image."""
    spec = common.model_spec(text)
    model = spec.build(**({'img_size': img_size} if img_size else {}))
    if variant.reference:
        set_fused_attention(model, False)
    if variant.compiled_core:
        set_compiled_core(model)
    size = common.input_size(model)
    macs, _ = count_macs(model, (3, size, size))
    if variant.null_core:  # after counting: the bound keeps the MACs of the model it bounds
        null_focused_attention(model)
    return dict(model=prepare_model(model, device, variant.channels_last, variant.compile), name=spec.name,
                img_size=size, num_classes=model.num_classes, macs=macs)


def memory_steps(spec: dict, device: torch.device):
    """The --probe side: one training iteration ('train') and one inference pass ('infer')."""
    variant = Variant(**spec['variant'])
    case = load_model(spec['model'], variant, device, spec['img_size'])
    images = random_images(spec['batch_size'], case['img_size'], device, variant.channels_last)
    autocast = autocast_for(spec['dtype'], device)

    def step_for(task: str):
        if task == 'train':
            return training_step(case['model'], images, case['num_classes'], autocast)
        return inference_step(case['model'], images, autocast)
    return step_for


def _time_tasks(cases: dict, args, dtype: str, autocast, device) -> dict:
    """{case key: {task: img/s (train, infer) or ms (latency), task_runs: [seconds]}}, every task's
    cases timed interleaved."""
    results = {key: {} for key in cases}
    for task in args.tasks:
        batch = 1 if task == 'latency' else args.batch_size
        fns = {}
        for key, case in cases.items():
            images = random_images(batch, case['img_size'], device, key[1].channels_last)
            if task == 'train':
                fns[key] = training_step(case['model'], images, case['num_classes'], autocast)
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
    """Each model's eager case (always measured): its nn.Linear calls, each timed alone at its shape."""
    for path in args.models:
        case = cases[(path, Variant())]
        macs = case['macs']
        images = random_images(args.batch_size, case['img_size'], device)
        seconds, linear_macs = linear_layers_seconds(case['model'], images, autocast, repeats=args.repeats)
        for key in results:
            if key[0] == path:
                results[key].update(linear_ms=1000 * seconds, linear_share=linear_macs / (macs * args.batch_size),
                                    gemm_bound_pct=100 * 2 * macs * args.batch_size / seconds / (mm * 1e9))


def _memory(cases: dict, results: dict, args, dtype: str, device) -> None:
    """Peak training and inference memory of every case, each in a fresh process, one at a time."""
    probes = {str(i): dict(model=path, variant=variant.__dict__, device=str(device), dtype=dtype,
                           batch_size=args.batch_size, img_size=args.img_size, cases=['train', 'infer'])
              for i, (path, variant) in enumerate(cases)}
    for key, peaks in zip(cases, common.probe_in_fresh_processes('bench.models', probes).values(), strict=True):
        for task, peak in peaks.items():
            if 'error' in peak:
                raise RuntimeError(f'{task} memory probe of {key[0]} ({key[1].name}): {peak["error"]}')
            results[key][f'{task}_mb'] = peak['mb']


def paired_ratio(first_runs: List[float], runs: List[float]) -> float:
    """Speed over the first case's: the median over repeats of first seconds / these seconds, each
    pair from the same interleaved round. A shared machine slows whole rounds down together (one
    round's steps of every case moved by up to 45 % on a 2-core VM), and the per-round ratio cancels that."""
    return median([a / b for a, b in zip(first_runs, runs, strict=True)])


def _rows(cases: dict, results: dict, args, dtype: str, mm: float) -> List[dict]:
    rows = []
    for (path, variant), res in results.items():
        case = cases[(path, variant)]
        # the first model's same variant, or its eager case where it has no such variant (--compile-core
        # or --null-core on a model without focused attention)
        first = results.get((args.models[0], variant)) or results.get((args.models[0], Variant()))
        row = dict(config=path, model=case['name'], variant=variant.name, dtype=dtype,
                   img_size=case['img_size'], batch_size=args.batch_size, gmacs=case['macs'] / 1e9, **res)
        if ('infer' in res) and first:
            row['vs_first'] = paired_ratio(first['infer_runs'], res['infer_runs'])
            row['pct_matmul'] = 100 * 2 * case['macs'] * res['infer'] / (mm * 1e9)
        if ('train' in res) and first:
            row['train_vs_first'] = paired_ratio(first['train_runs'], res['train_runs'])
        rows.append(row)
    return rows


def run(args) -> dict:
    device = common.pick_device(args.device)
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
        for path, variant in itertools.product(args.models, variants):
            case = load_model(path, variant, device, args.img_size)
            if variant.needs_focused and not focused_modules(case['model']):
                continue  # no focused attention: the eager case already measures this model
            cases[(path, variant)] = case
        results = _time_tasks(cases, args, dtype, autocast, device)
        if args.memory:
            _memory(cases, results, args, dtype, device)
        if args.gemm_bound:
            _gemm_bound(cases, results, args, autocast, device, mm)
        rows.extend(_rows(cases, results, args, dtype, mm))
        del cases
    return dict(machine=machine_info(device), matmul_gflops=mm, args=vars(args), rows=rows)


COLUMNS = [('model', 'model'), ('variant', 'variant'), ('dtype', 'dtype'), ('infer', 'infer img/s', '{:.1f}'),
           ('vs_first', 'vs', '{:.2f}x'), ('pct_matmul', '%mm', '{:.0f}%'), ('train', 'train img/s', '{:.2f}'),
           ('train_vs_first', 'train vs', '{:.2f}x'), ('latency', 'b=1 ms', '{:.1f}'),
           ('train_mb', 'train MiB', '{:.0f}'), ('infer_mb', 'infer MiB', '{:.0f}'),
           ('linear_share', 'linear MACs', '{:.0%}'), ('linear_ms', 'linear ms', '{:.1f}'),
           ('gemm_bound_pct', '%mm bound', '{:.0f}%')]


def print_table(payload: dict) -> None:
    columns = [c for c in COLUMNS if any(c[0] in row for row in payload['rows'])]
    print(common.format_table(payload['rows'], columns))
    print(f"\n{common.describe_machine(payload['machine'])}, batch {payload['args']['batch_size']}, "
          f"medians of {payload['args']['repeats']}")


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.probe:
        return common.answer_probe(args.probe, memory_steps)
    payload = run(args)
    print_table(payload)
    write_json(args.json, payload)
    return 0


if __name__ == '__main__':
    sys.exit(main())
