"""bench/ and utils/benchmark.py: the timer interleaves, memory probes see allocations, the scripts
write the tables and files they promise (on micro sizes: speed itself is measured in bench/, not here)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import MICRO_YAML

from bench import models as bench_models
from bench import sweep as bench_sweep
from utils.benchmark import measure


def test_measure_interleaves_candidates_and_reports_each_repeat():
    calls = []
    times = measure({'a': lambda: calls.append('a'), 'b': lambda: calls.append('b')}, torch.device('cpu'),
                    repeats=5, warmup=1, min_repeat_s=0.0)
    assert set(times) == {'a', 'b'} and all(len(v) == 5 for v in times.values())
    timed = calls[4:]  # 1 warm-up + 1 calibration call each
    assert timed == ['a', 'b'] * 5


_TRANSIENT_PEAK = """
import torch
from utils.benchmark import exact_cpu_memory_accounting, peak_memory_mb
exact_cpu_memory_accounting()

def allocate():
    x = torch.ones(50 * 2 ** 20)  # 200 MiB, freed on return
    return float(x[0])

print(peak_memory_mb(allocate, torch.device('cpu')))
"""


def test_peak_memory_sees_a_transient_allocation():
    # in a fresh process, as peak_memory_mb asks: in the suite's process, what earlier tests left
    # allocated or cached moves the resident set under it (it failed after tests/test_swin.py)
    result = subprocess.run([sys.executable, '-c', _TRANSIENT_PEAK], capture_output=True, text=True, check=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    peak = float(result.stdout.strip().splitlines()[-1])
    assert 150 < peak < 280, peak


def test_models_bench_writes_one_row_per_case(tmp_path, capsys):
    cfg = tmp_path / 'micro.yaml'
    cfg.write_text(MICRO_YAML)
    out = tmp_path / 'models.json'
    assert bench_models.main(['--models', str(cfg), '--batch-size', '2',
                              '--reference', '--gemm-bound', '--repeats', '5', '--json', str(out)]) == 0
    payload = json.loads(out.read_text())
    rows = payload['rows']
    assert [(r['model'], r['variant']) for r in rows] == [('micro', 'eager'), ('micro', 'eager+reference')]
    for row in rows:
        assert row['infer'] > 0 and row['train'] > 0 and row['latency'] > 0 and len(row['infer_runs']) == 5
        assert row['gmacs'] > 0 and row['pct_matmul'] > 0
        # the linear layers are part of the model: their share of its MACs is in (0, 1], and the rate
        # with everything else free is above the measured one (same MACs, less time)
        assert 0 < row['linear_share'] <= 1 and row['linear_ms'] > 0
        assert row['gemm_bound_pct'] > row['pct_matmul']
    # one config: each variant is compared with the first config's same variant, itself
    assert all(row['vs_first'] == 1.0 and row['train_vs_first'] == 1.0 for row in rows)
    assert payload['matmul_gflops'] > 0 and payload['machine']['torch'] == torch.__version__
    table = capsys.readouterr().out
    assert 'infer img/s' in table and 'micro' in table


def test_paired_ratio_is_the_median_of_per_round_ratios():
    # twice as fast in every round, rounds 2 and 4 slower for both cases: exactly 2
    assert bench_models.paired_ratio([2.0, 3.0, 2.0, 3.0, 2.0], [1.0, 1.5, 1.0, 1.5, 1.0]) == 2.0
    # the rounds pair the runs: per-round ratios 1, 2, 3, 1, 1 give 1, where the medians' ratio is 3
    first, second = [1.0, 2.0, 3.0, 4.0, 5.0], [1.0, 1.0, 1.0, 4.0, 5.0]
    assert bench_models.paired_ratio(first, second) == 1.0
    assert bench_models.paired_ratio(first, second[::-1]) == 3.0  # ratios 0.2, 0.5, 3, 4, 5
    with pytest.raises(ValueError):
        bench_models.paired_ratio(first, second[:4])


def test_models_bench_rejects_too_few_repeats():
    with pytest.raises(SystemExit):
        bench_models.parse_args(['--repeats', '3'])


def test_sweep_writes_growth_ratios_and_a_plot(tmp_path):
    out, png = tmp_path / 'sweep.json', tmp_path / 'sweep.png'
    assert bench_sweep.main(['--sides', '4', '8', '--dim', '16', '--heads', '2', '--skip-models', '--repeats', '5',
                             '--json', str(out), '--png', str(png)]) == 0
    payload = json.loads(out.read_text())
    assert {r['attention'] for r in payload['rows']} == {'focused_linear', 'softmax'}
    steps = payload['growth']['module']['focused_linear']
    assert steps[0]['tokens'] == [16, 64] and steps[0]['token_ratio'] == 4.0 and steps[0]['time_ratio'] > 0
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def _micro_model(tmp_path, attn_type='LS'):
    from config import load_config
    from models import build_model
    cfg = tmp_path / f'micro_{attn_type}.yaml'
    cfg.write_text(MICRO_YAML.replace('ATTN_TYPE: LS', f'ATTN_TYPE: {attn_type}'))
    return str(cfg), build_model(load_config(str(cfg)))


def test_null_core_leaves_the_projections_and_the_softmax_blocks(tmp_path):
    """--null-core: each focused module becomes proj(Q) (its core and DWC skipped), softmax modules are untouched."""
    from models.attention import FocusedLinearAttention, SoftmaxAttention
    _, model = _micro_model(tmp_path)
    focused = [m for m in model.modules() if isinstance(m, FocusedLinearAttention)]
    softmax = [m for m in model.modules() if isinstance(m, SoftmaxAttention)]
    assert focused and softmax
    inputs = {id(m): torch.randn(2, m.grid_size[0] * m.grid_size[1], m.dim) for m in focused + softmax}
    with torch.no_grad():
        before = {id(m): m(inputs[id(m)]) for m in focused + softmax}
    assert bench_models.null_focused_attention(model) == len(focused)
    with torch.no_grad(), torch.autocast('cpu', dtype=torch.bfloat16):
        for m in focused:
            x = inputs[id(m)]
            assert m.dwc is None
            torch.testing.assert_close(m(x), m.proj(m.qkv(x)[..., :m.dim]))
    with torch.no_grad():
        for m in focused:
            assert not torch.allclose(m(inputs[id(m)]), before[id(m)])  # the attention itself is gone
        for m in softmax:
            torch.testing.assert_close(m(inputs[id(m)]), before[id(m)], rtol=0, atol=0)
    model(torch.randn(2, 3, 32, 32)).sum().backward()  # still trains: gradients reach the projections
    assert all(m.qkv.weight.grad is not None and m.qkv.weight.grad.abs().sum() > 0 for m in focused)


def test_models_bench_null_core_rows_only_for_focused_models(tmp_path):
    flatten_cfg, _ = _micro_model(tmp_path, 'LS')
    softmax_cfg, _ = _micro_model(tmp_path, 'SS')
    out = tmp_path / 'models.json'
    assert bench_models.main(['--models', softmax_cfg, flatten_cfg, '--batch-size', '2', '--tasks', 'train',
                              '--null-core', '--repeats', '5', '--json', str(out)]) == 0
    rows = json.loads(out.read_text())['rows']
    assert [(r['config'], r['variant']) for r in rows] == [
        (softmax_cfg, 'eager'), (flatten_cfg, 'eager'), (flatten_cfg, 'eager+null core')]
    # the bound is compared with the first config's eager case, and keeps the MACs of the model it bounds
    assert rows[2]['train_vs_first'] > 0 and rows[2]['gmacs'] == rows[1]['gmacs']
