"""tools.export: torch.export and ONNX (onnxruntime) give the eager model's logits, at dynamic sizes
where the family supports them (DeiT, PVTv2 here; PVT in docs/export.md) and at a static size for
Swin; one-line errors."""
from __future__ import annotations

import pytest
import torch

from models.registry import create_model
from tools import export as tool

# small variants of the full models: the same code paths at a fraction of the tracing time. PVT v1 is
# left to docs/export.md's measurement: even at depth 1 its dynamic trace takes ~90 s on 2 cores.
SMALL = {
    'flatten_deit_tiny_patch16_224': dict(depth=2),
    'softmax_deit_tiny_patch16_224': dict(depth=2),
    'flatten_pvt_v2_b0': dict(depths=(1, 1, 1, 1)),
}
SIZES = [(224, 224), (288, 288), (256, 352)]


def small(name: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return create_model(name, **SMALL.get(name, {})).eval()


@pytest.mark.parametrize('name', sorted(SMALL))
def test_torch_export_dynamic_sizes_match_eager(name, tmp_path):
    model = small(name)
    out = str(tmp_path / 'model.pt2')
    info = tool.export(model, 'export', out)
    assert info['min_size'] == 2 * model.min_input_size and info['max_size'] == 2048
    rows = tool.check(model, 'export', out, SIZES)  # one program, three sizes, batch 2
    assert [(r['height'], r['width']) for r in rows] == SIZES
    assert max(r['max_rel'] for r in rows) <= 1e-4, rows


def test_onnx_dynamic_cli_prints_parity_table(tmp_path, capsys):
    out = tmp_path / 'deit.onnx'
    rc = tool.main(['--model', 'softmax_deit_tiny_patch16_224', '--format', 'onnx', str(out),
                    '--check-sizes', '224', '256x352'])
    text = capsys.readouterr().out
    assert rc == 0, text
    assert out.stat().st_size > 20e6  # 5.7M float32 parameters
    assert 'dynamic batch, height and width 32..2048, opset' in text
    lines = [line for line in text.splitlines() if line.startswith('2x')]
    assert [line.split()[0] for line in lines] == ['2x224x224', '2x256x352']
    assert all(float(line.split()[2]) <= 1e-4 for line in lines)


def test_onnx_static_swin_with_shift_mask_matches_eager(tmp_path):
    # the shifted windows of Swin's softmax stages (a 3-D shift mask) and FLatten's focused stages
    torch.manual_seed(0)
    model = create_model('flatten_swin_tiny_patch4_224', depths=(2, 2, 2, 2), embed_dim=32,
                         num_heads=(1, 2, 4, 8)).eval()
    out = str(tmp_path / 'swin.onnx')
    info = tool.export(model, 'onnx', out, static_size=(224, 224))
    assert info['size'] == (224, 224)
    rows = tool.check(model, 'onnx', out, [(224, 224)], batch=3)  # the batch stays dynamic
    assert rows[0]['max_rel'] <= 1e-4, rows


def test_errors_are_one_line(tmp_path, capsys, monkeypatch):
    out = str(tmp_path / 'x.onnx')
    assert tool.main(['--model', 'flatten_nothing', '--format', 'export', out]) == 2
    assert 'flatten_nothing' in capsys.readouterr().err
    assert tool.main(['--model', 'flatten_deit_tiny_patch16_224', '--format', 'export', out, '--min-size', '8']) == 2
    assert "below the model's smallest input, 16" in capsys.readouterr().err
    assert tool.main(['--model', 'flatten_deit_tiny_patch16_224', '--format', 'export', out, '--static', '8']) == 2
    assert '8x8 input is too small' in capsys.readouterr().err
    assert tool.main(['--model', 'flatten_cswin_tiny_224', '--format', 'export', out]) == 2
    assert 'CSWinTransformer cannot be exported at dynamic sizes yet' in capsys.readouterr().err
    real = tool.importlib.util.find_spec
    monkeypatch.setattr(tool.importlib.util, 'find_spec', lambda name: None if name == 'onnxscript' else real(name))
    assert tool.main(['--model', 'flatten_deit_tiny_patch16_224', '--format', 'onnx', out]) == 2
    err = capsys.readouterr().err
    assert err.count('\n') == 1 and 'onnxscript' in err and 'requirements-export.txt' in err
