"""tools/attention_rank.py and tools/attention_maps.py: the paper's rank (Fig. 5) and entropy (Figs. 3/8)
claims, checked on random initialisations and planted structure."""
from __future__ import annotations

import math
import re

import torch

from models.attention.analysis import entropy, equivalent_matrices, query_distributions
from tools import attention_maps, attention_rank
from tools.common import load_image, load_model


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
    assert attention_rank.main(['--cfg', 'configs/flatten_pvt_t.yaml']) == 2
    assert 'cover Swin and DeiT configs' in capsys.readouterr().err
    assert attention_rank.main(['--cfg', 'configs/flatten_deit_t.yaml', '--image', str(tmp_path / 'none.png')]) == 2
    assert 'none.png' in capsys.readouterr().err
    assert attention_rank.main(['--cfg', 'configs/flatten_deit_t.yaml', '--resume', str(tmp_path / 'no.pth')]) == 2
    assert "checkpoint '" in capsys.readouterr().err
