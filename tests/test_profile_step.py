"""bench/profile_step.py at micro size: the categories add up, the focused core is found in the FLatten
model only, and bad options are refused."""
from __future__ import annotations

import json

import pytest

from bench import profile_step

MICRO = ['--models', 'flatten_deit_tiny_patch16_224:softmax_deit_tiny_patch16_224', '--overrides',
         'img_size=32,patch_size=4,embed_dim=64,depth=2,num_heads=2,num_classes=10', '--batch', '2', '--steps', '1',
         '--warmup', '1', '--dtypes', 'fp32']


def test_micro_profile(tmp_path, capsys):
    out = tmp_path / 'profile.json'
    assert profile_step.main(MICRO + ['--json', str(out)]) == 0
    flatten, softmax = json.loads(out.read_text())['rows']
    assert set(flatten['categories']) == set(profile_step.CATEGORIES)
    for row in (flatten, softmax):
        assert row['img_size'] == 32 and 0 < sum(row['categories'].values()) <= row['step_ms']
        assert row['categories']['GEMM'] > 0 and row['categories']['optimizer'] > 0
    for category in ('focused core fwd', 'focused core bwd', 'DWC fwd'):
        assert flatten['categories'][category] > 0 and softmax['categories'][category] == 0
    assert softmax['categories']['softmax'] > 0
    table = [line.strip('|').split('|') for line in capsys.readouterr().out.splitlines() if line.startswith('|')]
    assert 'focused core bwd' in [cells[0].strip() for cells in table]
    # the labelled ranges are removed again
    from models.attention import fused
    assert not hasattr(fused._fused_forward, '__wrapped__')


def test_overrides_parse():
    assert profile_step.parse_overrides('img_size=32,depths=(2, 2),drop=0.5,attn_type=LS') == dict(
        img_size=32, depths=(2, 2), drop=0.5, attn_type='LS')


@pytest.mark.parametrize('argv, message', [
    (['--models', 'nope:softmax_deit_tiny_patch16_224'], "unknown model 'nope'"),
    (['--overrides', 'img_size'], 'is not name=value'),
    (['--steps', '0'], '--steps must be at least 1')])
def test_bad_options(argv, message, capsys):
    with pytest.raises(SystemExit):
        profile_step.parse_args(argv)
    assert message in capsys.readouterr().err
