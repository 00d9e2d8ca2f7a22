"""tools/attention_rank.py and tools/attention_maps.py: the paper's rank (Fig. 5) and entropy (Figs. 3/8)
claims, checked on random initialisations and planted structure, on every backbone's attention layout."""
from __future__ import annotations

import copy
import json
import math
import re

import pytest
import torch
import torch.nn as nn

from models.attention import AttentionOptions, create_attention, stripe_partition
from models.attention.analysis import entropy, equivalent_matrices, query_distributions, token_projections
from tools import attention_maps, attention_rank
from tools.common import attention_inputs, load_image, load_model

# micro geometry of the PVT-T and CSwin-T configs: a 64² image gives 16/8/4/2 stage maps; CSwin's L stripes
# of width 4 tile the 16² and 8² maps (two branches each), its S splits cover the 4² map (global)
PVT_T = ['--cfg', 'configs/flatten_pvt_t.yaml', '--image', 'noise', '--opts', 'DATA.IMG_SIZE', '64']
CSWIN_T = ['--cfg', 'configs/flatten_cswin_t.yaml', '--image', 'noise', '--opts', 'DATA.IMG_SIZE', '64']
CSWIN_STRIPES = ['MODEL.LA.CSWIN_LA_SPLIT_SIZE', '4-4-4-2']


def test_rank_tool_on_random_init_flatten_deit_t():
    """Softmax full rank (196), vanilla linear ≤ head dim (64), FLatten with its DWC full rank again."""
    torch.manual_seed(0)
    model, cfg = load_model('configs/flatten_deit_t.yaml')
    rows = attention_rank.block_ranks(model, load_image(cfg, 'noise'))
    assert len(rows) == 12
    for row in rows:
        assert row['tokens'] == 196 and row['head_dim'] == 64
        assert row['softmax']['min'] == 196, row
        assert row['linear']['max'] <= 64, row
        assert row['focused']['min'] == 196, row


def test_equivalent_focused_matrix_reproduces_the_module():
    """The N×N focused matrix (Sim/Z + M_DWC) applied to V is what the module computes (DWC bias aside),
    so the ranks are those of the real operator."""
    torch.manual_seed(0)
    model, cfg = load_model('configs/flatten_deit_t.yaml', ['MODEL.DEIT.DEPTH', '1'])
    attn = model.blocks[0].attn
    with torch.no_grad():
        attn.dwc.weight.normal_()
        attn.scale.normal_()
        attn.positional_encoding.normal_()
    x = torch.randn(196, 192)
    matrices = equivalent_matrices(attn, x)
    q, k, v = attn.qkv(x.double().float()).chunk(3, dim=-1)
    with torch.no_grad():
        out = attn(x[None]) - attn.proj.bias
        pre_proj = torch.linalg.lstsq(attn.proj.weight.double(), out[0].double().T).solution.T  # (N, C)
    d, h = 64, 3
    for head in range(h):
        c = head * d  # the matrix folds channel 0 of each head's DWC
        expected = matrices['focused'][head] @ v[:, c].double() + attn.dwc.bias[0].double()
        torch.testing.assert_close(pre_proj[:, c], expected, rtol=1e-3, atol=1e-3)


def test_entropy_ordering_with_planted_similar_keys():
    """Fig. 3: a query with a few near-duplicate keys among random ones; softmax and focused linear
    attention concentrate on them, vanilla (ReLU) linear attention stays spread out."""
    gen = torch.Generator().manual_seed(0)
    n, C = 196, 64
    for trial in range(5):
        q = 2 * torch.randn(C, generator=gen)
        k = 2 * torch.randn(n, C, generator=gen)
        similar = torch.randperm(n, generator=gen)[:5]
        k[similar] = q + 0.3 * torch.randn(5, C, generator=gen)
        dists = query_distributions(q, k, num_heads=1)
        h = {form: entropy(p) for form, p in dists.items()}
        assert h['softmax'] < h['linear'] and h['focused'] < h['linear'], (trial, h)
        assert h['linear'] > 0.9 * math.log(n)  # vanilla linear is close to uniform
        for p in dists.values():
            torch.testing.assert_close(p.sum(), torch.tensor(1.0, dtype=p.dtype))
            assert p[similar].sum() > 0  # and every form does see the planted keys


def test_maps_tool_writes_png_and_prints_entropies(tmp_path, capsys):
    png = tmp_path / 'maps.png'
    assert attention_maps.main(['--cfg', 'configs/flatten_deit_t.yaml', '--opts', 'MODEL.DEIT.DEPTH', '2',
                                '--query', '3', '4', '--png', str(png)]) == 0
    out = capsys.readouterr().out
    assert 'blocks.1.attn: query (3, 4) on a 14x14 grid' in out
    assert len(re.findall(r'entropy \d+\.\d+ nats', out)) == 3
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'


def test_tools_name_bad_input(capsys, tmp_path):
    assert attention_maps.main(['--cfg', 'configs/flatten_deit_t.yaml', '--opts', 'MODEL.DEIT.DEPTH', '1',
                                '--block', 'blocks.7.attn', '--png', str(tmp_path / 'x.png')]) == 2
    assert "--block 'blocks.7.attn' is not an analysable attention block" in capsys.readouterr().err
    assert attention_maps.main(['--cfg', 'configs/flatten_deit_t.yaml', '--opts', 'MODEL.DEIT.DEPTH', '1',
                                '--query', '14', '0', '--png', str(tmp_path / 'x.png')]) == 2
    assert 'outside the 14x14 token grid' in capsys.readouterr().err
    assert attention_maps.main([*PVT_T, '--block', 'block1.0.attn', '--query', '0', '16', '--png',
                                str(tmp_path / 'x.png')]) == 2
    assert 'outside the 16x16 token grid of block1.0.attn' in capsys.readouterr().err
    assert attention_rank.main(['--cfg', 'configs/flatten_deit_t.yaml', '--image', str(tmp_path / 'none.png')]) == 2
    assert 'none.png' in capsys.readouterr().err
    assert attention_rank.main(['--cfg', 'configs/flatten_deit_t.yaml', '--resume', str(tmp_path / 'no.pth')]) == 2
    assert "checkpoint '" in capsys.readouterr().err


def test_inputs_name_a_model_without_attention():
    with pytest.raises(ValueError, match='analysis tools cover DeiT, PVT, PVTv2, Swin and CSwin configs'):
        attention_inputs(nn.Sequential(nn.Flatten(), nn.Linear(12, 2)), torch.randn(1, 3, 2, 2))
    with pytest.raises(TypeError, match='not an attention module'):
        equivalent_matrices(nn.Linear(4, 4), torch.randn(1, 2, 4))


def _randomise(attn: nn.Module) -> None:
    """Non-trivial extras: random temperature, positional encoding and conv kernels (zero at init)."""
    with torch.no_grad():
        for name in ('scale', 'positional_encoding'):
            if getattr(attn, name, None) is not None:
                getattr(attn, name).normal_()
        for conv in (attn.dwc, attn.get_v):
            if conv is not None:
                conv.weight.normal_()
                conv.bias.normal_()


def _pre_proj_output(attn: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The module's own float64 forward on x, before proj (its output where the block owns proj)."""
    attn = copy.deepcopy(attn).double()
    if attn.proj is None:
        with torch.no_grad():
            return attn(x.double())
    captured = []
    attn.proj.register_forward_pre_hook(lambda mod, args: captured.append(args[0]))
    with torch.no_grad():
        attn(x.double())
    return captured[0]


PVT_REDUCED = dict(projections='q_kv', sr_ratio=2)  # 8x8 map, keys on the 4x4 reduced map: N = 64, n = 16
CSWIN_STRIPE = dict(projections='block', window=(8, 2), lepe=True)  # 8x8 map, first stripe of 8x2 tokens


@pytest.mark.parametrize('kind, layout', [
    ('focused_linear', PVT_REDUCED), ('focused_linear', CSWIN_STRIPE), ('softmax', PVT_REDUCED),
    ('softmax', CSWIN_STRIPE), ('vanilla_linear', PVT_REDUCED), ('window_softmax', dict(projections='qkv')),
], ids=['focused-pvt-sr2', 'focused-cswin-stripe', 'softmax-pvt-sr2', 'softmax-cswin-stripe', 'linear-pvt-sr2',
        'window-softmax-swin'])
def test_equivalent_matrix_reproduces_reduced_and_striped_modules(kind, layout):
    """float64: the N×n matrix of the module's own formulation (focused: Sim/Z + M_DWC R; vanilla linear;
    softmax, with Swin's relative position bias) plus LePE's matrix, applied to V of the first window, is
    the module's attention output there (before proj), up to the conv biases."""
    torch.manual_seed(0)
    dim, heads, grid = 32, 2, (8, 8)
    attn = create_attention(kind, dim, heads, grid, options=AttentionOptions(**layout)).eval()
    _randomise(attn)
    tokens = torch.randn(1, 64, dim)
    x = torch.stack([tokens, torch.randn_like(tokens), torch.randn_like(tokens)]) if attn.projections == 'block' \
        else tokens
    matrices = equivalent_matrices(attn, x)
    _, k, v = token_projections(attn, x)
    N, n = attn.window[0] * attn.window[1], attn.key_grid[0] * attn.key_grid[1]
    form = {'focused_linear': 'focused', 'vanilla_linear': 'linear'}.get(kind, 'softmax')
    assert matrices[form].shape == (heads, N, n) and v.shape == (n, dim)
    assert ('lepe' in matrices) == (attn.get_v is not None)
    out = _pre_proj_output(attn, x)[0]
    if attn.window != attn.grid_size:  # the first stripe window of the map
        out = stripe_partition(out[None], attn.grid_size, attn.window)[0]
    assert out.shape == (N, dim)
    d = dim // heads
    for head in range(heads):
        c = head * d  # the matrices fold channel 0 of each head's DWC and LePE channel c
        expected = matrices[form][head] @ v[:, c]
        if attn.dwc is not None:
            expected = expected + attn.dwc.bias[0].double()
        if attn.get_v is not None:
            expected = expected + matrices['lepe'][head] @ v[:, c] + attn.get_v.bias[c].double()
        torch.testing.assert_close(out[:, c], expected, rtol=1e-9, atol=1e-9)


def _json_rows(tmp_path, argv):
    path = tmp_path / 'ranks.json'
    assert attention_rank.main([*argv, '--json', str(path)]) == 0
    return json.loads(path.read_text())


def test_rank_tool_on_flatten_pvt_t(tmp_path, capsys):
    """Every block of FLatten-PVT-T: softmax and focused + DWC full rank, vanilla linear ≤ d; with the
    keys reduced (sr 2 in stages 1-2) the matrices are N×n and full rank is n."""
    rows = _json_rows(tmp_path, PVT_T)
    assert [r['block'] for r in rows] == [f'block{i}.{j}.attn' for i in range(1, 5) for j in range(2)]
    for row in rows:
        assert row['kind'] == 'focused_linear' and row['keys'] == row['tokens'] and row['head_dim'] == 64
        assert row['softmax']['min'] == row['focused']['min'] == row['tokens'], row
        assert row['linear']['max'] <= 64 and 'focused_lepe' not in row
    assert rows[0]['tokens'] == 256 and rows[0]['linear']['max'] == 64  # 16x16 map: rank capped by d
    reduced = _json_rows(tmp_path, PVT_T + ['MODEL.LA.PVT_LA_SR_RATIOS', '2211'])
    shapes = [(256, 64)] * 2 + [(64, 16)] * 2 + [(16, 16)] * 2 + [(4, 4)] * 2  # (N, n) of stages 1-4
    assert [(r['tokens'], r['keys']) for r in reduced] == shapes
    for row in reduced:
        assert row['softmax']['min'] == row['focused']['min'] == row['keys'], row
    out = capsys.readouterr().out
    assert re.search(r'block1\.0\.attn\s+256\s+64\s+64\s+64\s+64\s+64', out), out


def test_rank_tool_on_flatten_cswin_t(tmp_path, capsys):
    """FLatten-CSwin-T (LLSS): stripe windows of the L stages (two branches per block) and the global S
    stages; vanilla linear ≤ d where a stripe has more tokens than d, focused + DWC (and + LePE) full rank."""
    rows = _json_rows(tmp_path, CSWIN_T + CSWIN_STRIPES)
    kinds = [r['kind'] for r in rows]
    assert kinds == ['focused_linear'] * (2 * 2 + 4 * 2) + ['softmax'] * (18 + 1)
    assert [r['tokens'] for r in rows[:4]] == [64] * 4 and rows[0]['head_dim'] == 32  # 16x4 and 4x16 stripes
    for row in rows:
        assert row['keys'] == row['tokens']
        assert row['softmax']['min'] == row['focused']['min'] == row['focused_lepe']['min'] == row['tokens'], row
        assert row['linear']['max'] <= 32
    assert rows[0]['linear']['max'] == 32 < rows[0]['tokens']
    out = capsys.readouterr().out
    assert '+LePE' in out and 'stage1.0.attns.1' in out
    plain = _json_rows(tmp_path, CSWIN_T)  # the config's global L stages: one branch per block
    assert [r['block'] for r in plain[:3]] == ['stage1.0.attns.0', 'stage1.1.attns.0', 'stage2.0.attns.0']
    assert plain[0]['tokens'] == 256 and plain[0]['focused']['min'] == 256 and plain[0]['linear']['max'] <= 32


@pytest.mark.parametrize('argv, block, expected', [
    (PVT_T, 'block1.1.attn', 'block1.1.attn: query (8, 8) on a 16x16 grid (uniform entropy 5.545)'),
    (PVT_T + ['MODEL.LA.PVT_LA_SR_RATIOS', '2211'], None,
     'block4.1.attn: query (1, 1) on a 2x2 grid (uniform entropy 1.386)'),
    (PVT_T + ['MODEL.LA.PVT_LA_SR_RATIOS', '2211'], 'block1.0.attn',
     'block1.0.attn: query (8, 8) on a 16x16 grid, keys on a 8x8 grid (uniform entropy 4.159)'),
    (CSWIN_T + CSWIN_STRIPES, 'stage1.0.attns.0', 'stage1.0.attns.0: query (8, 2) on a 16x4 grid'),
    (CSWIN_T + CSWIN_STRIPES, 'stage2.0.attns.1', 'stage2.0.attns.1: query (2, 4) on a 4x8 grid'),
    (CSWIN_T, None, 'stage4.0.attns.0: query (1, 1) on a 2x2 grid'),
], ids=['pvt', 'pvt-sr-last', 'pvt-sr-reduced', 'cswin-vertical-stripe', 'cswin-horizontal-stripe', 'cswin-last'])
def test_maps_tool_on_flatten_pvt_t_and_cswin_t(tmp_path, capsys, argv, block, expected):
    """The centre query of the module's query grid (its first stripe window for CSwin), the map on its
    key grid (PVT's reduced map)."""
    png = tmp_path / 'maps.png'
    assert attention_maps.main([*argv, *(['--block', block] if block else []), '--png', str(png)]) == 0
    out = capsys.readouterr().out
    assert expected in out, out
    assert len(re.findall(r'entropy \d+\.\d+ nats', out)) == 3
    assert png.read_bytes()[:8] == b'\x89PNG\r\n\x1a\n'
