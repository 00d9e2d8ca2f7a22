"""Fused vs reference focused linear attention: the module alone and the whole model.

    python -m bench.fast_path --models configs/flatten_swin_t.yaml --json bench/results/fast_path.json

Module cases are FLatten-Swin-T's focused-attention layers at batch 8 (stage 1: 56×56 tokens,
C=96, 3 heads; stage 2: 28×28, C=192, 6 heads), forward and forward+backward. Whole-model cases are
the inference forward of each of ``--models`` and the peak memory of one training iteration, measured
in a fresh process per implementation. Fused and reference are timed interleaved; ratios are
reference/fused time.
"""
from __future__ import annotations

import argparse
import os
import sys

import torch

if __package__ in (None, ''):  # run as `python bench/x.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from models.attention import AttentionOptions, FocusedLinearAttention, set_fused_attention  # noqa: E402
from utils.benchmark import (  # noqa: E402
    inference_step,
    machine_info,
    measure,
    median,
    random_images,
    tune_cpu_allocator,
    write_json,
)

# (name, dim, heads, grid): FLatten-Swin-T's focused stages at 224²
MODULE_CASES = [('swin_t stage 1', 96, 3, 56), ('swin_t stage 2', 192, 6, 28)]
IMPLEMENTATIONS = ('fused', 'reference')


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0], parents=[common.shared_arguments(
        ['configs/flatten_swin_t.yaml'], repeats=9, device=True, memory_probe=True)])
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--skip-model', action='store_true', help='module cases only')
    args = parser.parse_args(argv)
    common.check_minimums(parser, args, repeats=5, batch_size=1)
    return args


def module_rows(batch_size: int, repeats: int, device: torch.device):
    rows = []
    for name, dim, heads, grid in MODULE_CASES:
        torch.manual_seed(0)
        module = FocusedLinearAttention(dim, heads, (grid, grid), options=AttentionOptions()).to(device)
        x = torch.randn(batch_size, grid * grid, dim, device=device)
        x_grad = x.clone().requires_grad_(True)

        def forward(fused, module=module, x=x):
            def fn():
                module.fused = fused
                with torch.no_grad():
                    return module(x)
            return fn

        def forward_backward(fused, module=module, x_grad=x_grad):
            def fn():
                module.fused = fused
                module(x_grad).sum().backward()
            return fn

        for task, make in (('forward', forward), ('forward+backward', forward_backward)):
            times = measure({impl: make(impl == 'fused') for impl in IMPLEMENTATIONS}, device, repeats=repeats)
            fused, ref = median(times['fused']), median(times['reference'])
            rows.append(dict(case=f'module {name}', task=task, fused_ms=1000 * fused, reference_ms=1000 * ref,
                             speedup=ref / fused, fused_runs=times['fused'], reference_runs=times['reference']))
    return rows


def memory_steps(spec: dict, device: torch.device):
    """The --probe side: one forward+backward pass with one implementation (activations saved for
    backward and the transient buffers; gradients already exist after the warm-up pass)."""
    model = common.model_spec(spec['model']).build().to(device).train()
    set_fused_attention(model, spec['impl'] == 'fused')
    images = random_images(spec['batch_size'], common.input_size(model), device)

    def step_for(case: str):
        def step():
            model(images).sum().backward()
        return step
    return step_for


def model_rows(text: str, batch_size: int, repeats: int, device: torch.device):
    spec = common.model_spec(text)
    model = spec.build().to(device)
    images = random_images(batch_size, common.input_size(model), device)
    infer = inference_step(model, images)

    def with_impl(fused):
        def fn():
            set_fused_attention(model, fused)
            return infer()
        return fn

    times = measure({impl: with_impl(impl == 'fused') for impl in IMPLEMENTATIONS}, device, repeats=repeats)
    fused, ref = median(times['fused']), median(times['reference'])
    rows = [dict(case=f'model {spec.name}', task='inference', fused_ms=1000 * fused, reference_ms=1000 * ref,
                 speedup=ref / fused, fused_runs=times['fused'], reference_runs=times['reference'])]
    probes = {impl: dict(model=text, impl=impl, device=str(device), batch_size=batch_size, cases=['train'])
              for impl in IMPLEMENTATIONS}
    memory = {}
    for impl, result in common.probe_in_fresh_processes('bench.fast_path', probes).items():
        if 'error' in result['train']:
            raise RuntimeError(f'{impl} memory probe of {text}: {result["train"]["error"]}')
        memory[impl] = result['train']['mb']
    rows.append(dict(case=f'model {spec.name}', task='train peak MiB', fused_mb=memory['fused'],
                     reference_mb=memory['reference'], ratio=memory['fused'] / memory['reference']))
    return rows


COLUMNS = [('case', 'case'), ('task', 'task'), ('fused_ms', 'fused ms', '{:.1f}'),
           ('reference_ms', 'reference ms', '{:.1f}'), ('fused_mb', 'fused MiB', '{:.0f}'),
           ('reference_mb', 'reference MiB', '{:.0f}'), ('ratio', 'ratio', '{:.2f}x')]


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.probe:
        return common.answer_probe(args.probe, memory_steps)
    device = common.pick_device(args.device)
    if device.type == 'cpu':
        tune_cpu_allocator()
    rows = module_rows(args.batch_size, args.repeats, device)
    if not args.skip_model:
        for text in args.models:
            rows += model_rows(text, args.batch_size, args.repeats, device)
    print(common.format_table([dict(row, ratio=row.get('speedup', row.get('ratio'))) for row in rows], COLUMNS))
    print(f'batch {args.batch_size}, medians of {args.repeats} interleaved repeats; ratio = reference / fused time '
          '(memory: fused / reference)')
    write_json(args.json, dict(machine=machine_info(device), args=vars(args), rows=rows))
    return 0


if __name__ == '__main__':
    sys.exit(main())
