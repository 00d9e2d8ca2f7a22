"""Where a training step's time goes: torch.profiler breakdown, FLatten model vs its softmax baseline.

    python -m bench.profile_step --models flatten_swin_tiny_patch4_224:softmax_swin_tiny_patch4_window7_224 \\
        --batch 8 --dtypes fp32 bf16 --steps 3 --json bench/results/profile_step_cpu.json

One step is forward, cross-entropy, backward and an AdamW step (``utils.benchmark.training_step``), in
float32 or under bf16/fp16 autocast, at the model's build size. After ``--warmup`` steps, ``--steps``
steps run under ``torch.profiler`` and every operator's *self* time (its own, children excluded) is put
in one category, so the categories add up to the profiled time:

* ``focused core fwd`` / ``focused core bwd``: everything inside the fused focused attention's chunked
  forward and its hand-written backward (``models.attention.core``), its matmuls included; with
  ``--compile-core``, its compiled forward and backward graphs;
* ``DWC fwd`` / ``DWC bwd``: the rank-restoration depthwise conv (``rank_restore_dwc``) and, in the
  backward, every convolution's gradient (the DWC's and the patch embedding's, input and weight; the
  compiled DWC weight gradient with ``--compile-core``);
* ``GEMM``: the other matmuls (linear layers, softmax attention), forward and backward;
* ``softmax`` (softmax or fused scaled-dot-product attention), ``norms`` (LayerNorm), ``GELU``: those
  ops and their gradients;
* ``optimizer``: the whole AdamW step; ``copies``: copy_, clone, cat, contiguous, roll, index ops;
* ``other``: the rest (element-wise ops, reductions, the loss, autograd bookkeeping).

The table gives ms per step for each category and both models of a pair, side by side (``--models``:
pairs, by default FLatten-Swin-T and Swin-T), and the JSON also lists the
15 costliest operators of each. Profiling adds overhead: compare categories, not totals, with bench/models.py.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import os
import sys
import time
from typing import Callable, Dict, List

import torch

if __package__ in (None, ''):  # run as `python bench/x.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from models.attention import base, compiled, fused, set_compiled_core  # noqa: E402
from utils.benchmark import (  # noqa: E402
    autocast_for,
    machine_info,
    random_images,
    training_step,
    tune_cpu_allocator,
    write_json,
)

CATEGORIES = ['focused core fwd', 'focused core bwd', 'DWC fwd', 'DWC bwd', 'GEMM', 'softmax', 'norms', 'GELU',
              'optimizer', 'copies', 'other']
# ranges (record_function labels or autograd node names) -> category, checked from the innermost ancestor out
_RANGES = [('focused core fwd', 'focused core fwd'), ('focused core bwd', 'focused core bwd'),
           ('DWC fwd', 'DWC fwd'), ('Optimizer.step', 'optimizer'), ('ConvolutionBackward', 'DWC bwd'),
           ('_DepthwiseConvBackward', 'DWC bwd'), ('CompiledFunctionBackward', 'focused core bwd'),
           ('NativeLayerNormBackward', 'norms'), ('GeluBackward', 'GELU'), ('SoftmaxBackward', 'softmax'),
           ('ScaledDotProduct', 'softmax')]
_OPS = {'aten::mm': 'GEMM', 'aten::bmm': 'GEMM', 'aten::addmm': 'GEMM', 'aten::baddbmm': 'GEMM',
        'aten::_softmax': 'softmax', 'aten::_softmax_backward_data': 'softmax',
        'aten::native_layer_norm': 'norms', 'aten::native_layer_norm_backward': 'norms',
        'aten::gelu': 'GELU', 'aten::gelu_backward': 'GELU', 'aten::convolution_backward': 'DWC bwd',
        'aten::copy_': 'copies', 'aten::clone': 'copies', 'aten::cat': 'copies', 'aten::contiguous': 'copies',
        'aten::roll': 'copies', 'aten::index': 'copies', 'aten::index_put_': 'copies',
        'aten::constant_pad_nd': 'copies'}


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0], parents=[common.shared_arguments(
        ['swin'], pairs=True, dtypes=['fp32', 'bf16'], warmup=2, threads=None)])
    parser.add_argument('--batch', type=int, default=8)
    parser.add_argument('--steps', type=int, default=3, help='profiled steps')
    parser.add_argument('--overrides', default='', help='constructor overrides for both models, e.g. '
                        '"img_size=32,num_classes=10" (ints, floats and tuples of ints)')
    parser.add_argument('--compile-core', action='store_true',
                        help='compile the focused cores for training, as --compile-core does (models.attention.core)')
    args = parser.parse_args(argv)
    common.check_minimums(parser, args, batch=1, steps=1, warmup=0)
    try:
        args.kwargs = parse_overrides(args.overrides)
    except ValueError as err:
        parser.error(str(err))
    return args


def parse_overrides(text: str) -> dict:
    """'a=1,b=(2,2),c=0.5,d=LS' -> {'a': 1, 'b': (2, 2), 'c': 0.5, 'd': 'LS'} (commas inside () kept)."""
    parts, depth, current = [], 0, ''
    for ch in text.replace(' ', ''):
        depth += (ch == '(') - (ch == ')')
        if ch == ',' and depth == 0:
            parts.append(current)
            current = ''
        else:
            current += ch
    parts.append(current)
    out = {}
    for part in filter(None, parts):
        if '=' not in part:
            raise ValueError(f'--overrides item {part!r} is not name=value')
        name, value = part.split('=', 1)
        out[name] = _value(value)
    return out


def _value(text: str):
    if text.startswith('('):
        return tuple(int(v) for v in text.strip('()').split(',') if v)
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


@contextlib.contextmanager
def labelled_ranges():
    """Wrap the focused core's forward and backward and the DWC in record_function ranges."""
    patched = [(fused, '_fused_forward', 'focused core fwd'), (fused, '_fused_backward', 'focused core bwd'),
               (compiled, 'compiled_focused_core', 'focused core fwd'), (base, 'rank_restore_dwc', 'DWC fwd')]
    originals = [getattr(module, name) for module, name, _ in patched]
    for (module, name, label), original in zip(patched, originals, strict=True):
        setattr(module, name, _in_range(original, label))
    try:
        yield
    finally:
        for (module, name, _), original in zip(patched, originals, strict=True):
            setattr(module, name, original)


def _in_range(fn: Callable, label: str) -> Callable:
    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with torch.profiler.record_function(label):
            return fn(*args, **kwargs)
    return wrapped


def categorise(event) -> str:
    node = event.cpu_parent
    while node is not None:  # innermost labelled ancestor first
        for key, category in _RANGES:
            if key in node.name:
                return category
        node = node.cpu_parent
    if 'scaled_dot_product' in event.name:  # fused softmax attention, forward and backward
        return 'softmax'
    return _OPS.get(event.name, 'other')


def profile(spec: common.ModelSpec, args, dtype: str) -> dict:
    torch.manual_seed(0)
    model = spec.build(**args.kwargs)
    if args.compile_core:
        set_compiled_core(model)
    size = common.input_size(model)
    step = training_step(model, random_images(args.batch, size, torch.device('cpu')), model.num_classes,
                         autocast_for(dtype, torch.device('cpu')))
    # warm up under a profiler too: a compiled core compiled outside one recompiles inside (dynamo
    # guards on the profiler's dispatch mode), and that compile would be counted as the core's forward
    with labelled_ranges(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]):
        for _ in range(args.warmup):
            step()
    with labelled_ranges(), torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        start = time.perf_counter()
        for _ in range(args.steps):
            step()
        seconds = time.perf_counter() - start
    per_category = dict.fromkeys(CATEGORIES, 0.0)
    per_op: Dict[str, float] = {}
    for event in prof.events():
        if event.device_type != torch.autograd.DeviceType.CPU:
            continue
        ms = event.self_cpu_time_total / 1000 / args.steps
        per_category[categorise(event)] += ms
        per_op[event.name] = per_op.get(event.name, 0.0) + ms
    top = sorted(per_op.items(), key=lambda kv: -kv[1])[:15]
    return dict(model=spec.name, dtype=dtype, batch=args.batch, img_size=size, step_ms=1000 * seconds / args.steps,
                categories=per_category, top_ops=[dict(op=k, ms=v) for k, v in top])


def print_table(rows: List[dict], pair: List[str]) -> None:
    """One table per dtype: the categories of both models of `pair`, side by side."""
    columns = [('category', 'category'), ('flatten', pair[0], '{:.1f}'), ('baseline', pair[1], '{:.1f}')]
    for dtype in dict.fromkeys(r['dtype'] for r in rows):
        a, b = (next(r for r in rows if r['model'] == m and r['dtype'] == dtype) for m in pair)
        lines = [dict(category=c, flatten=a['categories'][c], baseline=b['categories'][c]) for c in CATEGORIES]
        lines.append(dict(category='**sum**', flatten=sum(a['categories'].values()),
                          baseline=sum(b['categories'].values())))
        lines.append(dict(category='wall (profiler on)', flatten=a['step_ms'], baseline=b['step_ms']))
        print(f'\n{dtype}, batch {a["batch"]}, ms per step (profiled)\n')
        print(common.format_table(lines, columns))


def main(argv=None) -> int:
    args = parse_args(argv)
    tune_cpu_allocator()
    rows = []
    with common.torch_threads(args.threads):
        for text in args.models:
            pair = common.model_pair(text)
            pair_rows = []
            for dtype in args.dtypes:
                for spec in (pair.flatten, pair.baseline):
                    pair_rows.append(profile(spec, args, dtype))
                    print(f'{spec.name} {dtype}: {pair_rows[-1]["step_ms"]:.0f} ms/step under the profiler', flush=True)
            print_table(pair_rows, [pair.flatten.name, pair.baseline.name])
            rows += pair_rows
    write_json(args.json, dict(machine=machine_info(torch.device('cpu')), args=vars(args), rows=rows))
    return 0


if __name__ == '__main__':
    sys.exit(main())
