"""Fused vs reference focused linear attention: the module alone and the whole model.

    python -m bench.fast_path --json bench/results/fast_path.json

Module cases are FLatten-Swin-T's focused-attention layers at batch 8 (stage 1: 56×56 tokens,
C=96, 3 heads; stage 2: 28×28, C=192, 6 heads), forward and forward+backward. Whole-model cases are
the inference forward of a config and the peak memory of one training iteration, measured in a fresh
process per implementation. Fused and reference are timed interleaved; ratios are reference/fused time.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import torch

if __package__ in (None, ''):  # run as `python bench/x.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from config import load_config  # noqa: E402
from models import build_model  # noqa: E402
from models.attention import AttentionOptions, FocusedLinearAttention, set_fused_attention  # noqa: E402
from utils.benchmark import (  # noqa: E402
    exact_cpu_memory_accounting,
    inference_step,
    machine_info,
    measure,
    median,
    peak_memory_mb,
    random_images,
    tune_cpu_allocator,
    write_json,
)

# (name, dim, heads, grid): FLatten-Swin-T's focused stages at 224²
MODULE_CASES = [('swin_t stage 1', 96, 3, 56), ('swin_t stage 2', 192, 6, 28)]
IMPLEMENTATIONS = ('fused', 'reference')


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--config', default='configs/flatten_swin_t.yaml', help='whole-model config')
    parser.add_argument('--batch-size', type=int, default=8)
    parser.add_argument('--repeats', type=int, default=9)
    parser.add_argument('--skip-model', action='store_true', help='module cases only')
    parser.add_argument('--json', default=None, metavar='PATH')
    parser.add_argument('--probe', default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.repeats < 5:
        parser.error('--repeats must be at least 5')
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


def probe(spec: dict) -> dict:
    """In a fresh process: peak memory of one forward+backward pass with one implementation
    (activations saved for backward and the transient buffers; gradients are already allocated)."""
    device = torch.device(spec['device'])
    exact_cpu_memory_accounting()
    cfg = load_config(spec['config'])
    model = build_model(cfg).to(device).train()
    set_fused_attention(model, spec['impl'] == 'fused')
    images = random_images(spec['batch_size'], cfg.DATA.IMG_SIZE, device)

    def step():
        model(images).sum().backward()
    step()  # gradients exist before the measured pass
    return {'train_mb': peak_memory_mb(step, device)}


def model_rows(config: str, batch_size: int, repeats: int, device: torch.device):
    cfg = load_config(config)
    model = build_model(cfg).to(device)
    images = random_images(batch_size, cfg.DATA.IMG_SIZE, device)
    infer = inference_step(model, images)

    def with_impl(fused):
        def fn():
            set_fused_attention(model, fused)
            return infer()
        return fn

    times = measure({impl: with_impl(impl == 'fused') for impl in IMPLEMENTATIONS}, device, repeats=repeats)
    fused, ref = median(times['fused']), median(times['reference'])
    rows = [dict(case=f'model {cfg.MODEL.NAME}', task='inference', fused_ms=1000 * fused, reference_ms=1000 * ref,
                 speedup=ref / fused, fused_runs=times['fused'], reference_runs=times['reference'])]
    memory = {}
    for impl in IMPLEMENTATIONS:
        spec = dict(config=config, impl=impl, device=str(device), batch_size=batch_size)
        result = subprocess.run([sys.executable, '-m', 'bench.fast_path', '--probe', json.dumps(spec)],
                                capture_output=True, text=True, check=True,
                                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        memory[impl] = json.loads(result.stdout.strip().splitlines()[-1])['train_mb']
    rows.append(dict(case=f'model {cfg.MODEL.NAME}', task='train peak MiB', fused_mb=memory['fused'],
                     reference_mb=memory['reference'], ratio=memory['fused'] / memory['reference']))
    return rows


def main(argv=None) -> int:
    args = parse_args(argv)
    device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    if args.probe:
        print(json.dumps(probe(json.loads(args.probe))))
        return 0
    if device.type == 'cpu':
        tune_cpu_allocator()
    rows = module_rows(args.batch_size, args.repeats, device)
    if not args.skip_model:
        rows += model_rows(args.config, args.batch_size, args.repeats, device)
    print(f'{"case":<44} {"task":<17} {"fused":>10} {"reference":>10} {"ratio":>7}')
    for row in rows:
        if 'speedup' in row:
            print(f'{row["case"]:<44} {row["task"]:<17} {row["fused_ms"]:>8.1f}ms {row["reference_ms"]:>8.1f}ms '
                  f'{row["speedup"]:>6.2f}x')
        else:
            print(f'{row["case"]:<44} {row["task"]:<17} {row["fused_mb"]:>7.0f}MiB {row["reference_mb"]:>7.0f}MiB '
                  f'{row["ratio"]:>6.2f}x')
    print(f'batch {args.batch_size}, medians of {args.repeats} interleaved repeats; ratio = reference / fused time '
          '(memory: fused / reference)')
    write_json(args.json, dict(machine=machine_info(device), args=vars(args), rows=rows))
    return 0


if __name__ == '__main__':
    sys.exit(main())
