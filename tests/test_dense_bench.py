"""bench/dense.py on micro sizes: one row per (pair, size, dtype) in the JSON and the markdown table, times
and peak memory of both models of a pair, the backbone's token shapes, and failing cases reported, not hidden.
(Speed itself is measured by running the bench, not here.)"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench import dense
from bench.common import SIDES

REPO = Path(__file__).resolve().parents[1]


def table_rows(text: str):
    """The cells of the markdown table's body rows (header and separator checked and dropped)."""
    lines = [line for line in text.splitlines() if line.startswith('|')]
    header = [c.strip() for c in lines[0].strip('|').split('|')]
    assert header == ['pair', 'size (HxW)', 'dtype', 'FLatten ms', 'baseline ms', 'ratio', 'FLatten MiB',
                      'baseline MiB']
    assert set(lines[1].replace('|', '').replace(':', '')) == {'-'}
    return [[c.strip() for c in line.strip('|').split('|')] for line in lines[2:]]


def test_micro_run_times_and_measures_both_models_of_each_case(tmp_path, capsys):
    threads = torch.get_num_threads()
    out = tmp_path / 'dense.json'
    assert dense.main(['--micro', '--models', 'pvt', '--threads', '1', '--json', str(out)]) == 0
    assert torch.get_num_threads() == threads  # the in-process run gives the threads back
    payload = json.loads(out.read_text())
    rows = payload['rows']
    expected = [('pvt', [h, w], dtype) for h, w in ((64, 96), (96, 64)) for dtype in ('fp32', 'bf16')]
    assert [(r['pair'], r['size'], r['dtype']) for r in rows] == expected
    for row in rows:
        assert not [key for key in row if key.endswith('error')], row
        assert (row['flatten_model'], row['baseline_model']) == ('flatten_pvt_tiny', 'softmax_pvt_tiny')
        for side in SIDES:
            runs = row[f'{side}_runs']
            assert len(runs) == 3 and all(t > 0 for t in runs)
            assert row[f'{side}_ms'] == pytest.approx(1000 * sorted(runs)[1])
            assert row[f'{side}_mb'] > 0
        assert row['ratio'] == pytest.approx(row['flatten_ms'] / row['baseline_ms'])
        # backbone tokens at stride 32, width 512; PVT v1's softmax model keeps its class token
        h, w = row['size']
        assert row['flatten_shape'] == [1, (h // 32) * (w // 32), 512]
        assert row['baseline_shape'] == [1, (h // 32) * (w // 32) + 1, 512]
    assert payload['machine']['torch_threads'] == 1 and payload['args']['sizes'] == ['64x96', '96x64']
    assert payload['args']['repeats'] == 3

    cells = table_rows(capsys.readouterr().out)
    assert [c[:3] for c in cells] == [['FLatten-PVT-T vs PVT-T', f'{h}x{w}', dtype] for _, (h, w), dtype in expected]
    for cell, row in zip(cells, rows, strict=True):
        assert float(cell[3]) == pytest.approx(row['flatten_ms'], abs=0.051)
        assert float(cell[4]) == pytest.approx(row['baseline_ms'], abs=0.051)
        assert float(cell[5]) == pytest.approx(row['ratio'], abs=0.0051)
        assert float(cell[6]) == pytest.approx(row['flatten_mb'], abs=0.51)
        assert float(cell[7]) == pytest.approx(row['baseline_mb'], abs=0.51)


def test_a_failing_case_is_reported_with_its_error(tmp_path, capsys):
    # below the total stride (32) every four-stage backbone raises: the row says so and the run fails
    out = tmp_path / 'dense.json'
    assert dense.main(['--models', 'swin', '--sizes', '16x16', '--dtypes', 'fp32', '--no-memory', '--threads', '1',
                       '--json', str(out)]) == 1
    (row,) = json.loads(out.read_text())['rows']
    for side in SIDES:
        assert row[f'{side}_error'].startswith('ValueError') and '16' in row[f'{side}_error']
        assert f'{side}_ms' not in row
    assert 'ratio' not in row
    text = capsys.readouterr().out
    assert table_rows(text) == [['FLatten-Swin-T vs Swin-T', '16x16', 'fp32', 'error', 'error', '-', 'error',
                                'error']]
    assert 'ERROR FLatten-Swin-T vs Swin-T 16x16 fp32 flatten_error: ValueError' in text


@pytest.mark.parametrize('argv', [['--repeats', '2'], ['--sizes', '512'], ['--sizes', '0x64'], ['--warmup', '0'],
                                  ['--models', 'resnet']])
def test_bad_arguments_are_rejected(argv):
    with pytest.raises(SystemExit):
        dense.parse_args(argv)


def test_defaults_are_the_dense_sizes_of_the_three_pairs():
    args = dense.parse_args([])
    assert args.sizes == [(512, 2048), (800, 1333)] and args.models == ['swin', 'pvt', 'cswin']
    assert args.dtypes == ['fp32', 'bf16'] and args.repeats == 5
    assert dense.parse_args(['--sizes', '800×1333']).sizes == [(800, 1333)]


def test_runs_as_a_script():
    result = subprocess.run([sys.executable, 'bench/dense.py', '--help'], cwd=REPO, capture_output=True, text=True,
                            timeout=120)
    assert result.returncode == 0 and '--micro' in result.stdout, result.stderr
