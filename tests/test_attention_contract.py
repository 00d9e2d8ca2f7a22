"""The one attention contract (models/attention/base.py): every attention kind in every backbone family.

Each (kind × family) pair is built at micro size through the backbone's own constructor, with the
kind in the L stages by ``linear_kind`` (``MODEL.LA.LINEAR_KIND``) and, for ``softmax``, all stages
S; then one forward and backward pass must give a finite output and a gradient to every parameter
the model uses. The layouts exercised: fused qkv over windows (Swin) and the patch grid (DeiT),
separate q / kv with key/value reduction (PVT ``la_sr_ratios`` 2) and PVTv2's 7×7-pooled linear
mode, and the block's stacked projections over two stripe branches plus LePE (CSwin).
"""
from __future__ import annotations

import pytest
import torch
from conftest import randomize
from timm.layers import DropPath

from models.attention import LINEAR_KINDS, Attention, AttentionOptions, create_attention, set_fused_attention
from models.cswin import CSWinTransformer
from models.deit import FLattenDeiT
from models.pvt import PyramidVisionTransformer
from models.pvt_v2 import PyramidVisionTransformerV2
from models.swin import FLattenSwinTransformer

KINDS = ('softmax',) + LINEAR_KINDS
_PVT = dict(img_size=64, embed_dims=(16, 16, 24, 32), num_heads=(1, 2, 2, 4), mlp_ratios=(2, 2, 2, 2),
            depths=(1, 1, 1, 1), num_classes=5)


def _swin(kind):
    return FLattenSwinTransformer(
        img_size=32, patch_size=4, embed_dim=16, depths=(2, 1), num_heads=(2, 4), window_size=4,
        softmax_window_size=4, num_classes=5,
        attn_type='SS' if kind == 'softmax' else 'LL', linear_kind='focused_linear' if kind == 'softmax' else kind)


def _deit(kind):
    return FLattenDeiT(img_size=32, patch_size=8, embed_dim=24, depth=2, num_heads=2, num_classes=5,
                       attn_type='S' if kind == 'softmax' else 'L', linear_kind='focused_linear'
                       if kind == 'softmax' else kind)


def _letters(kind, stages=4):
    return dict(attn_type=('S' if kind == 'softmax' else 'L') * stages,
                linear_kind='focused_linear' if kind == 'softmax' else kind)


FAMILIES = {
    'deit': _deit,
    'swin': _swin,
    'pvt': lambda kind: PyramidVisionTransformer(**_PVT, la_sr_ratios='2111', **_letters(kind)),
    'pvt_v2': lambda kind: PyramidVisionTransformerV2(**_PVT, la_sr_ratios='2111', **_letters(kind)),
    'pvt_v2_linear': lambda kind: PyramidVisionTransformerV2(**_PVT, linear=True, **_letters(kind)),
    'cswin': lambda kind: CSWinTransformer(
        img_size=64, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 4), split_size=(2, 2, 2, 2),
        la_split_size=(4, 2, 2, 2), num_classes=5, **_letters(kind)),
}


@pytest.mark.parametrize('family', sorted(FAMILIES))
@pytest.mark.parametrize('kind', KINDS)
def test_every_kind_trains_in_every_backbone(family, kind):
    torch.manual_seed(0)
    model = randomize(FAMILIES[family](kind), std=0.1)
    for module in model.modules():  # no stochastic depth: every path must carry a gradient
        if isinstance(module, DropPath):
            module.drop_prob = 0.
    modules = [m for m in model.modules() if isinstance(m, Attention)]
    softmax = 'window_softmax' if family == 'swin' else 'softmax'
    assert {m.kind for m in modules} == {softmax if kind == 'softmax' else kind}
    size = model.img_size
    out = model(torch.randn(2, 3, *size))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    out.square().sum().backward()
    unused = model.unused_parameters()
    for name, param in model.named_parameters():
        if name not in unused:
            assert param.grad is not None and torch.isfinite(param.grad).all(), f'{family}/{kind}: {name}'
            assert param.grad.abs().sum() > 0, f'{family}/{kind}: {name} gets a zero gradient'


def test_cswin_layout_runs_stripes_and_lepe_in_every_kind():
    """The CSwin micro model above really uses two stripe branches with LePE in its L stages."""
    model = FAMILIES['cswin']('hydra')
    branches = model.stage1[0].attns
    assert [a.window for a in branches] == [(16, 4), (4, 16)]
    assert all(a.get_v is not None and a.projections == 'block' for a in branches)


@pytest.mark.parametrize('kind', KINDS)
def test_stripe_windows_are_shared_code(kind):
    """A kind on stripe windows equals the same kind, built for one window, run on each window alone."""
    grid, window = (4, 6), (4, 2)
    options = AttentionOptions(projections='block', lepe=True)
    torch.manual_seed(0)
    windowed = randomize(create_attention(kind, 8, 2, grid, options=AttentionOptions(
        projections='block', lepe=True, window=window))).double().eval()
    single = create_attention(kind, 8, 2, window, options=options).double().eval()
    single.load_state_dict(windowed.state_dict(), strict=True)
    qkv = torch.randn(3, 2, grid[0] * grid[1], 8, dtype=torch.float64)
    columns = torch.arange(grid[0] * grid[1]).view(grid)
    with torch.no_grad():
        out = windowed(qkv)
        for c0 in range(0, grid[1], window[1]):
            idx = columns[:, c0:c0 + window[1]].flatten()
            torch.testing.assert_close(out[:, idx], single(qkv[:, :, idx]))


def test_fast_path_is_selected_through_the_contract():
    model = FAMILIES['pvt']('focused_linear')
    modules = [m for m in model.modules() if isinstance(m, Attention)]
    assert set_fused_attention(model, False) == len(modules) and not any(m.fused for m in modules)
    assert set_fused_attention(model, True) == len(modules) and all(m.fused for m in modules)


@pytest.mark.parametrize('options, message', [
    (AttentionOptions(projections='fused'), r"projections='fused' is not one of"),
    (AttentionOptions(sr_ratio=2), r"key/value reduction needs projections='q_kv'"),
    (AttentionOptions(projections='block', window=(3, 3)), r'window 3x3 does not tile the 4x4 map'),
])
def test_bad_layouts_are_refused_at_construction(options, message):
    with pytest.raises(ValueError, match=message):
        create_attention('focused_linear', 8, 2, (4, 4), options=options)
