"""tools/model_table.py: every config's params and GMACs against the paper's Tables 8, 1 and 2."""
from __future__ import annotations

import copy
import json

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensor

import models
from tools.model_table import PAPER_TABLE8, default_configs, format_table, main, params_match
from utils.flops import count_layer_macs, count_macs

# Table 8 figures that a faithful model cannot reproduce, with the reason (see the README).
KNOWN_PARAM_MISMATCHES = {
    # 22,548,264 parameters (official code; docs/numerics.md, "Parameter counts") print as 22.5; the paper's
    # 22.6 is double rounding
    'flatten_pvt_v2_b2',
    # no official code: our design has 6,153,256 (6.2 at one decimal), inside the 6.1M ± 0.1M
    # budget; every design that keeps DeiT-T's width/depth, a per-block positional encoding and the
    # shared DWC has at least this many (see models/deit.py)
    'flatten_deit_t',
}


# Softmax baselines whose Table 8 figure is not the original architecture's (see the README).
KNOWN_BASELINE_MISMATCHES = {
    # the original PVTv2-B0/B1 have 3.67M / 14.01M parameters (PVTv2 paper, timm, our model);
    # Table 8 prints 3.4M / 13.1M, the figures of PVTv2's first arXiv version
    'pvt_v2_b0', 'pvt_v2_b1',
}


def test_params_match_uses_the_printed_precision():
    assert params_match(29_192_384, '29') and params_match(12_150_504, '12.2')
    assert not params_match(22_548_264, '22.6') and params_match(22_548_264, '22.5')


def test_every_table8_row_has_a_config():
    stems = {p.stem for p in default_configs()}
    assert set(PAPER_TABLE8) <= stems, sorted(set(PAPER_TABLE8) - stems)


@pytest.mark.parametrize('name', ['flatten_pvt_tiny', 'flatten_swin_tiny_patch4_224'])
def test_counting_on_fake_tensors_equals_a_real_forward_and_leaves_the_model_real(name):
    # a non-square size the models were not built at: PVT resizes (and caches) its position tables,
    # Swin pads to whole windows and caches its shifted-window masks
    model = models.create_model(name).eval()
    untouched = copy.deepcopy(model)
    size = (3, 160, 224)
    fake, fake_ops = count_macs(model, size, fake=True)  # first, so that its pass would fill the caches
    fake_layers = count_layer_macs(model, size, fake=True)
    real, real_ops = count_macs(model, size)
    assert fake == real > 0 and fake_ops == real_ops
    assert fake_layers == count_layer_macs(model, size)
    images = torch.randn(1, *size)
    with torch.no_grad():
        after = model(images)
        assert not isinstance(after, FakeTensor) and torch.equal(after, untouched(images))


@pytest.mark.slow
def test_table8(tmp_path, capsys):
    out = tmp_path / 'table.json'
    assert main(['--table', '8', '--json', str(out)]) == 0
    rows = {row['config']: row for row in json.loads(out.read_text())}
    printed = capsys.readouterr().out
    assert format_table(list(rows.values())).splitlines()[0] in printed
    for stem, row in rows.items():
        if stem not in PAPER_TABLE8:
            continue
        paper_params = float(row['paper_params_m']) * 1e6
        if stem.startswith('flatten_'):
            # FLatten rows: parameters at the paper's precision, FLOPs within 5%
            if stem not in KNOWN_PARAM_MISMATCHES:
                assert row['params_match'], (stem, row['params'], row['paper_params_m'])
            assert abs(row['flops_delta_pct']) <= 5.0, (stem, row['gmacs'], row['paper_gflops'])
        elif stem not in KNOWN_BASELINE_MISMATCHES:
            # softmax baselines: parameters within 3% of the paper
            assert abs(row['params'] - paper_params) / paper_params <= 0.03, (stem, row['params'])


# Table 1 FLOPs our counter cannot reproduce (docs/segmentation.md, "Parameters and FLOPs against Table 1"):
# 128.3G against 169G; the PVT-T row, same decoder, matches to -0.2 %
KNOWN_TABLE1_FLOP_MISMATCHES = {'fpn_flatten_pvt_t'}


@pytest.mark.slow
def test_table1(tmp_path):
    """Three Table 1 rows at 512×2048 (counted on fake tensors): params within 3 %, FLOPs within 5 %
    except the known mismatch."""
    from tools.model_table import PAPER_TABLE1, segmentation_configs
    out = tmp_path / 'table1.json'
    chosen = [p for p in segmentation_configs() if p.stem in ('fpn_pvt_t', 'fpn_flatten_pvt_t', 'upernet_swin_t')]
    assert main([*map(str, chosen), '--json', str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 3
    for row in rows:
        stem = row['config']
        assert row['params_match'], (stem, row['params'], PAPER_TABLE1[stem])
        assert (abs(row['flops_delta_pct']) <= 5.0) != (stem in KNOWN_TABLE1_FLOP_MISMATCHES), (stem, row['gmacs'])


# Table 2 FLOPs our counter cannot reproduce (docs/detection.md, "The models"): 211.7G against 244G, the same
# backbone gap as Table 1's Semantic FPN row; the PVT-T rows, same heads, match to -0.2 %
KNOWN_TABLE2_FLOP_MISMATCHES = {'mask_rcnn_flatten_pvt_t_1x', 'mask_rcnn_flatten_pvt_t_3x'}


def _check_table2_rows(rows: list) -> None:
    from tools.model_table import PAPER_TABLE2
    for row in rows:
        stem = row['config']
        assert row['task'] == 'detection' and row['input'] == '1280x800'
        assert row['params_match'], (stem, row['params'], PAPER_TABLE2[stem])
        assert (abs(row['flops_delta_pct']) <= 5.0) != (stem in KNOWN_TABLE2_FLOP_MISMATCHES), (stem, row['gmacs'])
        assert row['layer_gmacs'] < row['gmacs']  # attention products and the mask heads' deconvolutions


def test_table2_cascade_row(tmp_path):
    """One Table 2 row, counted as mmdet's get_flops counts (forward_dummy at 1280×800, fake tensors): FLatten-Swin-T
    Cascade Mask R-CNN, params within 3 %, FLOPs within 5 % (all rows: test_table2; the Mask R-CNN counting path
    on a micro model: tests/test_detection.py)."""
    from tools.model_table import detection_configs
    out = tmp_path / 'table2.json'
    chosen = [p for p in detection_configs() if p.stem == 'cascade_mask_rcnn_flatten_swin_t_3x']
    assert main([*map(str, chosen), '--json', str(out)]) == 0
    rows = json.loads(out.read_text())
    assert len(rows) == 1
    _check_table2_rows(rows)


@pytest.mark.slow
def test_table2(tmp_path):
    from tools.model_table import PAPER_TABLE2
    out = tmp_path / 'table2.json'
    assert main(['--table', '2', '--json', str(out)]) == 0
    rows = json.loads(out.read_text())
    assert {row['config'] for row in rows} == set(PAPER_TABLE2)
    _check_table2_rows(rows)
