"""bench/gpu_suite.py at its micro size on the CPU: every check runs and passes, both pairs are timed in both
modes, and failures (a wrong result, a check that raises, a throughput case that raises) are recorded, not
hidden, and give exit status 1. (The compile cases are too slow for a CPU test: only their selection is checked.)"""
from __future__ import annotations

import json
import statistics

import pytest
import torch

from bench import gpu_suite
from bench.common import SIDES
from models.attention import fused

CHECKS = ['fused_vs_reference/core', 'fused_vs_reference/swin', 'fused_vs_reference/deit', 'autocast_bf16/swin',
          'autocast_bf16/deit', 'autocast_fp16/swin', 'autocast_fp16/deit', 'fp16_train_step/swin',
          'fp16_train_step/deit', 'channels_last/swin', 'channels_last/deit']
CASES = [(pair, mode) for pair in ('swin', 'deit') for mode in ('inference', 'training')]
MICRO = ['--micro', '--no-compile', '--device', 'cpu']


def split_cells(line: str):
    return [c.strip() for c in line.strip('|').split('|')]


def table(text: str, first_title: str):
    """Body rows (cells) of the markdown table whose first column is titled `first_title`."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith('|') and split_cells(line)[0] == first_title)
    body = []
    for line in lines[start + 2:]:
        if not line.startswith('|'):
            break
        body.append(split_cells(line))
    return body


def test_micro_run_passes_every_check_and_times_both_pairs(tmp_path, capsys):
    out = tmp_path / 'g.json'
    assert gpu_suite.main(MICRO + ['--json', str(out)]) == 0
    payload = json.loads(out.read_text())
    assert set(payload) == {'machine', 'args', 'checks', 'throughput', 'seconds'}
    assert payload['machine']['device'] == 'cpu' and payload['seconds'] > 0
    assert payload['args']['compile'] is False and payload['args']['batch'] == 4

    checks = payload['checks']
    assert [c['name'] for c in checks] == CHECKS
    for check in checks:
        assert check['passed'] is True, check
        assert check['detail'] and check['seconds'] >= 0
    details = {c['name']: c['detail'] for c in checks}
    assert '2 token chunks' in details['fused_vs_reference/core']  # the chunked fused path, not one chunk
    assert '0 of them unmoved' in details['fp16_train_step/swin']

    rows = payload['throughput']
    assert [(r['pair'], r['mode']) for r in rows] == CASES
    for row in rows:
        assert (row['compiled'], row['dtype'], row['batch']) == (False, 'fp32', 4)
        assert 'error' not in row and 'skipped' not in row
        for side in SIDES:
            runs = row[f'{side}_runs']
            assert len(runs) == 3 and all(t > 0 for t in runs)
            assert row[f'{side}_img_s'] == pytest.approx(4 / statistics.median(runs))
            assert row[f'{side}_img_s'] > 0
        assert row['ratio'] == pytest.approx(row['flatten_img_s'] / row['baseline_img_s'])

    text = capsys.readouterr().out
    assert [c[:2] for c in table(text, 'check')] == [[name, 'yes'] for name in CHECKS]
    cells = table(text, 'pair')
    assert [(c[0], c[1], c[2]) for c in cells] == [
        ('FLatten-Swin-T vs Swin-T' if pair == 'swin' else 'FLatten-DeiT-T vs DeiT-T', mode, 'no')
        for pair, mode in CASES]
    for cell, row in zip(cells, rows, strict=True):
        assert float(cell[5]) == pytest.approx(row['flatten_img_s'], abs=0.051)
        assert float(cell[7]) == pytest.approx(row['ratio'], abs=0.0051)
    assert f'elapsed {payload["seconds"]:.1f} s' in text


def test_failures_are_recorded_and_give_status_1(tmp_path, monkeypatch, capsys):
    """A fused core 10% off fails the comparisons (passed=False, no exception); a check and a
    throughput case that raise carry their error text; the other checks and cases still run."""
    fused_forward = fused._fused_forward

    def off_by_ten_percent(*args, **kwargs):
        out, summaries = fused_forward(*args, **kwargs)
        return out * 1.1, summaries

    class BrokenScaler:
        def __init__(self, *args, **kwargs):
            raise RuntimeError('no scaler today')

    def broken_training_step(*args, **kwargs):
        raise RuntimeError('training step broken')

    monkeypatch.setattr(fused, '_fused_forward', off_by_ten_percent)
    monkeypatch.setattr(torch.amp, 'GradScaler', BrokenScaler)
    monkeypatch.setattr(gpu_suite, 'training_step', broken_training_step)
    out = tmp_path / 'g.json'
    assert gpu_suite.main(MICRO + ['--json', str(out)]) == 1
    payload = json.loads(out.read_text())
    checks = {c['name']: c for c in payload['checks']}
    assert list(checks) == CHECKS
    failed = {name for name, c in checks.items() if not c['passed']}
    assert failed == {'fused_vs_reference/core', 'fused_vs_reference/swin', 'fused_vs_reference/deit',
                      'fp16_train_step/swin', 'fp16_train_step/deit'}
    assert 'out max abs diff' in checks['fused_vs_reference/core']['detail']
    assert checks['fp16_train_step/deit']['detail'] == 'RuntimeError: no scaler today'

    rows = {(r['pair'], r['mode']): r for r in payload['throughput']}
    for pair in ('swin', 'deit'):
        assert rows[pair, 'training']['error'] == 'RuntimeError: training step broken'
        assert rows[pair, 'inference']['ratio'] > 0 and 'error' not in rows[pair, 'inference']
    text = capsys.readouterr().out
    assert ['fp16_train_step/swin', 'NO', 'RuntimeError: no scaler today'] in table(text, 'check')
    assert 'ERROR FLatten-DeiT-T vs DeiT-T training compiled=False: RuntimeError: training step broken' in text


def test_cases_past_the_time_budget_are_skipped_not_failed(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(gpu_suite, 'checks_to_run', lambda args: {})
    out = tmp_path / 'g.json'
    assert gpu_suite.main(MICRO + ['--budget-s', '0', '--json', str(out)]) == 0
    rows = json.loads(out.read_text())['throughput']
    assert [(r['pair'], r['mode']) for r in rows] == CASES
    assert all(r['skipped'].startswith('time budget') and 'ratio' not in r for r in rows)
    assert all(c[5:] == ['skipped', '-', '-'] for c in table(capsys.readouterr().out, 'pair'))


def test_compile_cases_are_selected_unless_no_compile():
    names = list(gpu_suite.checks_to_run(gpu_suite.parse_args(['--micro'])))
    assert names == CHECKS + ['compile_vs_eager/swin', 'compile_vs_eager/deit']
    assert list(gpu_suite.checks_to_run(gpu_suite.parse_args(['--micro', '--no-compile']))) == CHECKS


def test_defaults_of_the_full_and_micro_sizes():
    full, micro = gpu_suite.parse_args([]), gpu_suite.parse_args(['--micro'])
    assert (full.batch, full.dtypes, full.repeats, full.warmup, full.compile) == (64, ['bf16'], 5, 2, True)
    assert (micro.batch, micro.dtypes, micro.repeats) == (4, ['fp32'], 3)
    assert gpu_suite.parse_args(['--batch', '128', '--dtypes', 'fp16']).batch == 128


@pytest.mark.parametrize('argv, message', [
    (['--batch', '0'], '--batch must be at least 1'),
    (['--repeats', '2'], '--repeats must be at least 3'),
    (['--warmup', '0'], '--warmup must be at least 1'),
    (['--budget-s', '-1'], '--budget-s must not be negative'),
    (['--dtypes', 'fp8'], 'invalid choice'),
])
def test_bad_option_values_are_refused(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_info:
        gpu_suite.parse_args(argv)
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_compare_is_relative_to_the_reference_and_fails_on_nan():
    ref = torch.tensor([100.0, -2.0])
    assert gpu_suite.compare('x', ref + 0.005, ref, 1e-4)[0]  # 5e-3 <= 1e-4 x 100
    assert not gpu_suite.compare('x', ref + 0.02, ref, 1e-4)[0]
    small = torch.tensor([0.1, -0.2])
    assert gpu_suite.compare('x', small + 1e-5, small, 1e-4)[0]  # 1e-5 <= 1e-4 x 0.2
    assert not gpu_suite.compare('x', small + 3e-5, small, 1e-4)[0]
    assert not gpu_suite.compare('x', torch.tensor([float('nan'), -0.2]), small, 1e-4)[0]
    assert not gpu_suite.compare('x', torch.tensor([1e-9]), torch.zeros(1), 1e-4)[0]
    assert gpu_suite.compare('x', torch.zeros(1), torch.zeros(1), 1e-4)[0]
    ok, detail = gpu_suite.compare('x', small[:1], small, 1e-4)
    assert not ok and 'shape' in detail
