"""configs/ablation/*.yaml (paper Tables 3–7 on DeiT-T and Swin-T; Tables 3–4 also on PVT-T and CSwin-T):
each builds the model it names."""
from __future__ import annotations

from pathlib import Path

import pytest

from config import load_config
from models import build_model

ABLATION = sorted(Path('configs/ablation').glob('*.yaml'))


def _kinds(model):
    return [type(m).kind for m in model.modules() if hasattr(type(m), 'kind')]


def test_every_table_has_configs():
    tables = {path.name.split('_')[0] for path in ABLATION}
    assert tables == {'table3', 'table4', 'table5', 'table6', 'table7'}
    assert len(ABLATION) == 34
    for backbone in ('deit_t', 'swin_t', 'pvt_t', 'cswin_t'):  # Table 3's 4 kinds and Table 4's 2 rungs each
        assert len([p for p in ABLATION if p.stem.startswith('table3_' + backbone)]) == 4, backbone
        assert len([p for p in ABLATION if p.stem.startswith('table4_' + backbone)]) == 2, backbone


@pytest.mark.parametrize('path', ABLATION, ids=lambda p: p.stem)
def test_ablation_config_builds_what_it_names(path):
    cfg = load_config(str(path))
    model = build_model(cfg)
    kinds = _kinds(model)
    params = sum(p.numel() for p in model.parameters()) / 1e6
    stem = path.stem
    if stem.startswith(('table3', 'table4')):
        kind = stem.split('_t_')[1]
        assert kind in kinds and 'focused_linear' not in kinds
        assert cfg.MODEL.LA.LINEAR_KIND == kind and cfg.MODEL.NAME == stem.split('_', 1)[1]
        if '_deit_' in stem or '_pvt_' in stem:
            assert set(kinds) == {kind}  # every DeiT block; every PVT-T block (LLLL)
            assert len(kinds) == (12 if '_deit_' in stem else 8)  # DeiT-T depth 12; PVT-T depths 2-2-2-2
        elif '_swin_' in stem:
            assert kinds.count(kind) == 4 and kinds.count('window_softmax') == 8  # Swin-T stages 1-2 of LLSS
        else:  # CSwin-T (LLSS, depths 2-4-18-1): stages 1-2 global (one branch), LePE stripes in stage 3
            assert kinds.count(kind) == 6 and kinds.count('softmax') == 2 * 18 + 1
    elif stem.startswith('table5'):
        p = int(stem.rsplit('_p', 1)[1])
        assert {m.focusing_factor for m in model.modules() if type(m).__name__ == 'FocusedLinearAttention'} == {p}
    elif stem.startswith('table6'):
        window = int(stem.rsplit('_w', 1)[1])
        assert {b.window_size for b in model.layers[0].blocks} == {window}
        assert {b.window_size for b in model.layers[1].blocks} == {window}
        assert {b.shift_size for b in model.layers[0].blocks} == ({0, window // 2} if window < 56 else {0})
        assert 28 < params < 30  # Table 6: 29M whatever the window
    else:
        letters = stem.rsplit('_', 1)[1]
        per_stage = [{type(b.attn).kind for b in layer.blocks} for layer in model.layers]
        assert per_stage == [{'focused_linear'} if c == 'L' else {'window_softmax'} for c in letters]
        assert 28.5 < params < 30.5  # Table 7: 29–30M
