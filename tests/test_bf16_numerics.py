"""bench/bf16_numerics.py on the demo config's model and real Fashion-MNIST test images: every focused-core
call is captured, float32 matches the float64 reference, bf16/fp16 autocast errors are those of rounding the
inputs, and the outputs stay finite for inputs scaled up to 1e4."""
from __future__ import annotations

import json
import os

import pytest
from conftest import FASHION_MNIST_DIR

from bench import bf16_numerics
from models.attention import kinds


def test_micro_run(tmp_path, capsys):
    if not os.path.isdir(FASHION_MNIST_DIR):
        pytest.skip('Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)')
    out = tmp_path / 'numerics.json'
    assert bf16_numerics.main(['--images', '4', '--json', str(out)]) == 0
    payload = json.loads(out.read_text())
    assert len(payload['errors']) == 2  # the demo's two L blocks of stage 1
    for row in payload['errors']:
        assert row['tokens'] == [64, 48]  # 8×8 tokens of width 48
        assert row['float32'] < 1e-5 and 1e-4 < row['bf16 autocast'] < 2e-2 and row['fp16 autocast'] < 5e-3
    assert len(payload['finite']) == 2 * len(bf16_numerics.MAGNITUDES)
    assert all(r['bf16'] and r['fp16'] for r in payload['finite'])
    assert '| **largest** |' in capsys.readouterr().out
    assert kinds.focused_linear_attention is bf16_numerics.focused_linear_attention  # the recorder is removed


def test_bad_options(tmp_path, capsys):
    with pytest.raises(SystemExit):
        bf16_numerics.parse_args(['--checkpoint', str(tmp_path / 'missing.pth')])
    assert 'is not a file' in capsys.readouterr().err
