"""The ablation zoo (models/attention/zoo.py): each kind against an explicit O(N²) form, inside Swin
and DeiT through MODEL.LA.LINEAR_KIND, and the model contract of the registry-wide tests."""
from __future__ import annotations

import math

import pytest
import torch
from conftest import assert_model_contract, randomize

from config import load_config
from models import build_model
from models.attention import LINEAR_KINDS, AttentionOptions, create_attention, dwc_matrix

ZOO = [kind for kind in LINEAR_KINDS if kind != 'focused_linear']  # FLatten's own tests are in test_attention.py
GRID = (5, 6)  # non-square on purpose



def _dwc(module, v: torch.Tensor) -> torch.Tensor:
    """The shared-per-head DWC as explicit N×N matrices (paper Eq. 11)."""
    h = module.num_heads
    d = v.shape[-1] // h
    m = dwc_matrix(module.dwc.weight, module.grid_size)  # (d, N, N)
    out = torch.empty_like(v)
    for c in range(v.shape[-1]):
        out[..., c] = v[..., c] @ m[c % d].T + module.dwc.bias[c % d]
    return out


def _per_head(q, k, v, h, sim_fn, normalise=True, eps=0.0):
    """Σ_j Sim(q_i, k_j) v_j [/ Σ_j Sim(q_i, k_j)] per head, with the N×N Sim built explicitly."""
    d = q.shape[-1] // h
    out = torch.empty_like(v)
    for head in range(h):
        cols = slice(head * d, (head + 1) * d)
        sim = sim_fn(q[..., cols], k[..., cols])  # (B, N, n)
        num = sim @ v[..., cols]
        out[..., cols] = num / (sim.sum(-1, keepdim=True) + eps) if normalise else num
    return out


def explicit(module, q, k, v):
    """Each kind's attention output (before proj) written as an N×N matrix times V."""
    kind, h = module.kind, module.num_heads
    if kind in ('vanilla_linear', 'focused_only', 'dwc_only'):
        k = k + module.positional_encoding
        if kind == 'focused_only':
            s = torch.log1p(torch.exp(module.scale))
            p = module.focusing_factor

            def phi(t):
                r = (t.clamp(min=0) + 1e-6) / s
                return r ** p / (r ** p).norm(dim=-1, keepdim=True) * r.norm(dim=-1, keepdim=True)
        else:
            def phi(t):
                return t.clamp(min=0) + 1e-6
        n = k.shape[1]
        out = _per_head(phi(q), phi(k), v, h, lambda a, b: a @ b.transpose(-2, -1), eps=n * 1e-6)
        return out + _dwc(module, v) if kind == 'dwc_only' else out
    if kind == 'hydra':
        qn, kn = q / q.norm(dim=-1, keepdim=True), k / k.norm(dim=-1, keepdim=True)
        # one head per channel c: Sim_c(i, j) = q̂_ic k̂_jc, unnormalised
        return torch.einsum('bic,bjc,bjc->bic', qn, kn, v)
    if kind == 'efficient':
        d = q.shape[-1] // h
        out = torch.empty_like(v)
        for head in range(h):
            cols = slice(head * d, (head + 1) * d)
            sim = q[..., cols].softmax(-1) @ k[..., cols].softmax(-2).transpose(-2, -1)
            assert torch.allclose(sim.sum(-1), torch.ones_like(sim.sum(-1)))  # rows already sum to one
            out[..., cols] = sim @ v[..., cols]
        return out
    if kind == 'angular':
        def sim(a, b):
            a, b = a / a.norm(dim=-1, keepdim=True), b / b.norm(dim=-1, keepdim=True)
            return 0.5 + (a @ b.transpose(-2, -1)) / math.pi
        return _per_head(q, k, v, h, sim) + _dwc(module, v)
    if kind == 'relu_linear':
        B, N, C = q.shape
        maps = torch.cat([q, k, v], -1).transpose(1, 2).reshape(B, 3 * C, *module.grid_size)
        qa, ka, va = module.aggreg(maps).reshape(B, 3 * C, N).transpose(1, 2).chunk(3, -1)

        def relu_sim(a, b):
            return a.clamp(min=0) @ b.clamp(min=0).transpose(-2, -1)
        return torch.cat([_per_head(q, k, v, h, relu_sim, eps=1e-15),
                          _per_head(qa, ka, va, h, relu_sim, eps=1e-15)], -1)
    raise AssertionError(f'no explicit form for {kind}')


@pytest.mark.parametrize('kind', ZOO)
def test_linear_order_equals_explicit_quadratic_form(kind):
    torch.manual_seed(0)
    module = randomize(create_attention(kind, 12, 3, GRID, options=AttentionOptions(kernel_size=3))).double()
    x = torch.randn(2, GRID[0] * GRID[1], 12, dtype=torch.float64)
    q, k, v = module.qkv(x).unflatten(-1, (3, 12)).unbind(dim=2)
    torch.testing.assert_close(module.attend(q, k, v), explicit(module, q, k, v), rtol=1e-10, atol=1e-10)
    out = module(x)
    assert out.shape == x.shape
    out.square().sum().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f'{kind}: {name} gets no gradient'


@pytest.mark.parametrize('kind', ZOO)
def test_finite_under_autocast(kind):
    module = create_attention(kind, 16, 2, GRID)
    x = torch.randn(2, GRID[0] * GRID[1], 16) * 100
    for dtype in (torch.bfloat16, torch.float16):
        with torch.autocast('cpu', dtype=dtype):
            assert torch.isfinite(module(x)).all(), (kind, dtype)


SWIN_MICRO = ['DATA.IMG_SIZE', '32', 'MODEL.NUM_CLASSES', '10', 'MODEL.SWIN.PATCH_SIZE', '2',
              'MODEL.SWIN.EMBED_DIM', '16', 'MODEL.SWIN.DEPTHS', '[2, 2]', 'MODEL.SWIN.NUM_HEADS', '[1, 2]',
              'MODEL.SWIN.WINDOW_SIZE', '8', 'MODEL.SWIN.SOFTMAX_WINDOW_SIZE', '4', 'MODEL.LA.ATTN_TYPE', 'LS']
DEIT_MICRO = ['DATA.IMG_SIZE', '32', 'MODEL.NUM_CLASSES', '10', 'MODEL.DEIT.PATCH_SIZE', '4',
              'MODEL.DEIT.EMBED_DIM', '24', 'MODEL.DEIT.DEPTH', '2', 'MODEL.DEIT.NUM_HEADS', '3']


@pytest.mark.parametrize('family', ['swin', 'deit'])
@pytest.mark.parametrize('kind', ZOO)
def test_zoo_members_pass_the_model_contract(family, kind):
    """MODEL.LA.LINEAR_KIND puts the kind in every L block (Swin: shifted 8×8 windows of a 16×16
    map, so the ignored shift mask is exercised too); the model passes the registry-wide checks."""
    path, opts = (('configs/flatten_swin_t.yaml', SWIN_MICRO) if family == 'swin' else
                  ('configs/flatten_deit_t.yaml', DEIT_MICRO))
    cfg = load_config(path, opts + ['MODEL.LA.LINEAR_KIND', kind])

    def make():
        torch.manual_seed(0)
        return build_model(cfg)
    model = make()
    kinds = {type(m).kind for m in model.modules() if hasattr(type(m), 'kind')}
    assert kind in kinds and 'focused_linear' not in kinds
    assert_model_contract(make, 32, num_classes=10)


def test_unknown_linear_kind_names_the_key_and_the_choices():
    cfg = load_config('configs/flatten_swin_t.yaml', SWIN_MICRO + ['MODEL.LA.LINEAR_KIND', 'performer'])
    with pytest.raises(ValueError, match=r"MODEL.LA.LINEAR_KIND='performer' is not one of .*hydra"):
        build_model(cfg)


def test_relu_linear_doubles_proj_input_and_hydra_ignores_heads():
    relu = create_attention('relu_linear', 16, 2, GRID)
    assert relu.proj.in_features == 32
    hydra2, hydra4 = (randomize(create_attention('hydra', 16, h, GRID)) for h in (2, 4))
    x = torch.randn(1, 30, 16)
    torch.testing.assert_close(hydra2(x), hydra4(x))
