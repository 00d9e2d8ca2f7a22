"""Focused linear attention: explicit O(N²) equivalence, golden outputs, AMP, geometry, errors."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from conftest import load_golden, randomize

from models.attention import (
    AttentionOptions,
    FocusedLinearAttention,
    WindowAttention,
    block_kinds,
    create_attention,
    dwc_matrix,
    list_attention_kinds,
    make_dwc,
    parse_attn_type,
    rank_restore_dwc,
)


def explicit_focused_attention(module: FocusedLinearAttention, x: torch.Tensor) -> torch.Tensor:
    """The paper's quadratic form, written independently of the module's helpers:
    ``O = Sim V / (Σ_j Sim + n·1e-6) + DWC(V)`` with ``Sim = phi_p(Q) phi_p(K)ᵀ`` per head,
    ``phi_p(r) = ‖r‖ r^p / ‖r^p‖`` on ``r = (ReLU(x) + 1e-6) / softplus(scale)``, and the DWC as an
    explicit N×N matrix per channel. Then ``proj``."""
    B, N, C = x.shape
    h = module.num_heads
    d = C // h
    qkv = x @ module.qkv.weight.T + module.qkv.bias
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    k = k + module.positional_encoding
    p = module.focusing_factor
    s = torch.log1p(torch.exp(module.scale))

    def phi(t):
        r = (torch.clamp(t, min=0) + 1e-6) / s
        rp = r ** p
        return rp / rp.norm(dim=-1, keepdim=True) * r.norm(dim=-1, keepdim=True)

    q, k = phi(q), phi(k)
    m_dwc = dwc_matrix(module.dwc.weight, module.grid_size)  # (d, N, N)
    out = torch.empty_like(v)
    for head in range(h):
        cols = slice(head * d, (head + 1) * d)
        sim = q[..., cols] @ k[..., cols].transpose(-2, -1)  # (B, N, n)
        out[..., cols] = (sim @ v[..., cols]) / (sim.sum(-1, keepdim=True) + N * 1e-6)
        for c in range(d):
            out[..., head * d + c] += v[..., head * d + c] @ m_dwc[c].T + module.dwc.bias[c]
    return out @ module.proj.weight.T + module.proj.bias


@pytest.mark.parametrize('grid', [(7, 7), (4, 6), (1, 5)])
def test_linear_order_equals_explicit_quadratic_form(grid):
    dim, heads = 24, 3
    module = randomize(FocusedLinearAttention(dim, heads, grid_size=grid)).double().eval()
    x = torch.randn(2, grid[0] * grid[1], dim, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(module(x), explicit_focused_attention(module, x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('grid', [(5, 5), (3, 7)])
def test_dwc_matrix_matches_the_convolution(grid):
    """The DWC shares one kernel set over heads and zero-pads at the grid border (also H ≠ W)."""
    heads, d, k = 2, 4, 5
    conv = randomize(torch.nn.Conv2d(d, d, k, padding=k // 2, groups=d)).double()
    v = torch.randn(3, grid[0] * grid[1], heads * d, dtype=torch.float64)
    m = dwc_matrix(conv.weight, grid)
    explicit = torch.stack([v[..., c] @ m[c % d].T + conv.bias[c % d] for c in range(heads * d)], dim=-1)
    torch.testing.assert_close(rank_restore_dwc(conv, v, heads, grid), explicit)


def test_focused_function_preserves_norm_and_sharpens():
    from models.attention import focused_kernel
    x = torch.rand(4, 10, 16, dtype=torch.float64) + 0.1
    scale = torch.zeros(1, 1, 16, dtype=torch.float64)
    r = (x + 1e-6) / F.softplus(scale)
    out = focused_kernel(x, scale, 3)
    torch.testing.assert_close(out.norm(dim=-1), r.norm(dim=-1))
    # pulled towards the largest axis: the largest coordinate's share of the norm grows
    assert (out.max(-1).values / out.norm(dim=-1) > r.max(-1).values / r.norm(dim=-1)).all()


def test_matches_official_module_golden():
    golden = load_golden('module_swin_fla_w7')
    kw = golden['kwargs']
    module = FocusedLinearAttention(
        kw['dim'], kw['num_heads'], grid_size=kw['window_size'], qkv_bias=kw['qkv_bias'],
        options=AttentionOptions(focusing_factor=kw['focusing_factor'], kernel_size=kw['kernel_size']))
    assert list(module.state_dict()) == list(golden['state_dict'])
    module.load_state_dict(golden['state_dict'], strict=True)
    with torch.no_grad():
        torch.testing.assert_close(module.eval()(golden['input']), golden['output'], rtol=0, atol=1e-5)


@pytest.mark.parametrize('fused', [True, False])
def test_dwc_runs_in_float32_under_cpu_autocast(fused):
    """bfloat16 values in, the float32 convolution of those values out, gradients to v and the kernels."""
    conv = randomize(make_dwc(8, 5))
    v = torch.randn(2, 30, 16).bfloat16().requires_grad_(True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = rank_restore_dwc(conv, v, 2, (5, 6), fused)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, rank_restore_dwc(conv, v.float(), 2, (5, 6), fused), rtol=0, atol=0)
    out.sum().backward()
    assert v.grad.dtype == torch.bfloat16 and conv.weight.grad.abs().sum() > 0


def test_mask_is_ignored_like_the_official_module():
    module = randomize(FocusedLinearAttention(16, 2, grid_size=(4, 4))).eval()
    x = torch.randn(4, 16, 16)
    mask = torch.full((2, 16, 16), -100.0)
    with torch.no_grad():
        torch.testing.assert_close(module(x, mask=mask), module(x))


@pytest.mark.parametrize('kind', ['focused_linear', 'window_softmax'])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
@pytest.mark.parametrize('magnitude', [1.0, 1e2])
def test_outputs_finite_under_autocast(kind, dtype, magnitude):
    module = randomize(create_attention(kind, 32, 2, grid_size=(7, 7)), std=0.2).eval()
    x = torch.randn(3, 49, 32) * magnitude
    with torch.autocast('cpu', dtype=dtype), torch.no_grad():
        out = module(x)
    assert torch.isfinite(out).all()
    if magnitude == 1.0:
        # well-conditioned inputs: close to float32 (at 1e2 the softmax logits reach ~1e4 and any
        # rounding flips the argmax, so only finiteness is meaningful there)
        with torch.no_grad():
            ref = module(x)
        assert (out.float() - ref).norm() / ref.norm() < 0.05


@pytest.mark.parametrize('kind', list_attention_kinds())
def test_gradients_reach_every_parameter(kind):
    module = randomize(create_attention(kind, 16, 2, grid_size=(4, 5)))
    # token kinds take (B, N, C); qkv kinds (CSwin) take the block's stacked projections (3, B, N, C)
    shape = (3, 2, 20, 16) if module.projections == 'block' else (2, 20, 16)
    module(torch.randn(shape)).square().mean().backward()
    for name, param in module.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


def test_window_attention_matches_explicit_softmax_with_bias_and_mask():
    module = randomize(WindowAttention(16, 2, grid_size=(3, 4)), std=0.2).double().eval()
    B_, N, C = 4, 12, 16
    x = torch.randn(B_, N, C, dtype=torch.float64)
    mask = torch.zeros(2, N, N, dtype=torch.float64)
    mask[1, :, N // 2:] = -100.0
    qkv = (x @ module.qkv.weight.T + module.qkv.bias).view(B_, N, 3, 2, 8).permute(2, 0, 3, 1, 4)
    q, k, v = qkv
    bias = module.relative_position_bias_table[module.relative_position_index.view(-1)].view(N, N, 2).permute(2, 0, 1)
    logits = (q * 8 ** -0.5) @ k.transpose(-2, -1) + bias + mask.repeat(2, 1, 1)[:, None]
    expected = (logits.softmax(-1) @ v).transpose(1, 2).reshape(B_, N, C) @ module.proj.weight.T + module.proj.bias
    with torch.no_grad():
        torch.testing.assert_close(module(x, mask=mask), expected)


def test_relative_position_index_layout():
    from models.attention import relative_position_index
    index = relative_position_index((7, 7))
    assert index.shape == (49, 49) and index.dtype == torch.int64
    assert index.min() == 0 and index.max() == 13 * 13 - 1
    # token 0 at (0,0) vs token 48 at (6,6): Δ = (−6, −6) -> (0)·13 + 0
    assert index[0, 48] == 0 and index[48, 0] == 12 * 13 + 12 and index[10, 10] == 6 * 13 + 6


def test_attention_modules_do_not_print(capsys):
    module = create_attention('focused_linear', 16, 2, grid_size=(4, 4))
    module(torch.randn(1, 16, 16))
    module.eval()
    assert capsys.readouterr().out == ''


@pytest.mark.parametrize('attn_type, depths, expected', [
    ('LLSS', (2, 2, 2, 2), [['L', 'L'], ['L', 'L'], ['S', 'S'], ['S', 'S']]),
    ('LLMS2', (1, 1, 4, 1), [['L'], ['L'], ['L', 'L', 'S', 'S'], ['S']]),
    ('MS1', (3, 2), [['L', 'S', 'S'], ['S', 'S']]),
])
def test_block_kinds(attn_type, depths, expected):
    assert block_kinds(attn_type, depths, {'L': 'L', 'S': 'S'}) == expected


@pytest.mark.parametrize('attn_type, message', [
    ('LLS', 'expected 4 stage letters'),
    ('LLMS', 'needs an integer suffix'),
    ('llss', 'expected 4 stage letters'),
    ('LLXS', "letter 'X'"),
])
def test_bad_attn_type_names_the_string(attn_type, message):
    with pytest.raises(ValueError, match=message):
        block_kinds(attn_type, (1, 1, 1, 1), {'L': 'focused_linear', 'S': 'window_softmax'})
    assert parse_attn_type('LLSS', 4) == ('LLSS', 0)


def test_unknown_attention_kind_lists_known():
    with pytest.raises(KeyError, match='focused_linear'):
        create_attention('hydra_typo', 16, 2, grid_size=(4, 4))
    with pytest.raises(ValueError, match='not divisible by num_heads'):
        create_attention('focused_linear', 18, 4, grid_size=(4, 4))


def _kind_input(module, shape):
    return torch.randn((3,) + shape if module.projections == 'block' else shape, dtype=torch.float64)


@pytest.mark.parametrize('kind, options, grid', [
    ('focused_linear', AttentionOptions(), (7, 7)),
    ('focused_linear', AttentionOptions(), (4, 6)),
    ('focused_linear', AttentionOptions(projections='q_kv', sr_ratio=2), (8, 8)),
    ('focused_linear', AttentionOptions(projections='q_kv', linear=True), (14, 14)),
    ('focused_linear', AttentionOptions(projections='block', lepe=True), (6, 6)),
    ('focused_linear', AttentionOptions(projections='block', lepe=True, window=(6, 2)), (6, 6)),
])
@pytest.mark.parametrize('chunk', [1 << 18, 40])
def test_fused_path_equals_the_reference_in_float64(kind, options, grid, chunk, monkeypatch):
    """Forward values and every parameter gradient of the fused implementation equal the
    step-by-step reference (float64, so any algebraic slip would show far above rounding), with
    one chunk and with many (batch groups and token slices, as at large resolutions)."""
    from models.attention import set_fused_attention
    monkeypatch.setattr('models.attention.fused.FUSED_CHUNK_ELEMENTS', chunk)
    module = randomize(create_attention(kind, 24, 3, grid_size=grid, options=options)).double()
    x = _kind_input(module, (2, grid[0] * grid[1], 24)).requires_grad_()
    results = []
    for fused in (False, True):
        assert set_fused_attention(module, fused) == 1
        module.zero_grad()
        x.grad = None
        out = module(x)
        (out * torch.linspace(-1, 1, out.numel(), dtype=torch.float64).view_as(out)).sum().backward()
        results.append((out.detach(), x.grad.clone(), {n: p.grad.clone() for n, p in module.named_parameters()}))
    (ref_out, ref_dx, ref_grads), (out, dx, grads) = results
    torch.testing.assert_close(out, ref_out)
    torch.testing.assert_close(dx, ref_dx)
    for name in ref_grads:
        torch.testing.assert_close(grads[name], ref_grads[name], msg=name)


def test_fused_path_matches_golden_too():
    golden = load_golden('module_swin_fla_w7')
    kw = golden['kwargs']
    module = FocusedLinearAttention(kw['dim'], kw['num_heads'], grid_size=kw['window_size'])
    module.load_state_dict(golden['state_dict'])
    assert module.fused
    with torch.no_grad():
        torch.testing.assert_close(module.eval()(golden['input']), golden['output'], rtol=0, atol=1e-5)


@pytest.mark.parametrize('focusing_factor', [1, 3])
@pytest.mark.parametrize('chunk', [1 << 18, 20])
def test_fused_backward_passes_gradcheck(focusing_factor, chunk, monkeypatch):
    """The fused path's hand-written backward against finite differences (independent of the
    reference), for q, k, v, the temperature and the positional encoding, with keys fewer than
    queries (PVT's reduced keys) and in one chunk or many."""
    from models.attention import core
    monkeypatch.setattr('models.attention.fused.FUSED_CHUNK_ELEMENTS', chunk)
    g = torch.Generator().manual_seed(0)
    B, N, n, C, heads = 2, 6, 4, 8, 2
    inputs = [torch.randn(shape, generator=g, dtype=torch.float64, requires_grad=True)
              for shape in [(B, N, C), (B, n, C), (B, n, C), (1, 1, C), (1, n, C)]]

    def fn(q, k, v, scale, pe):
        return core.focused_linear_attention(q, k, v, scale, pe, heads, focusing_factor, fused=True)

    assert torch.autograd.gradcheck(fn, inputs)
    # an expanded (stride-0) output gradient, as from out.sum(), gives the reference's gradients
    grads = [torch.autograd.grad(core.focused_linear_attention(*inputs, heads, focusing_factor, fused=fused).sum(),
                                 inputs) for fused in (True, False)]
    for fused_grad, ref_grad in zip(*grads, strict=True):
        torch.testing.assert_close(fused_grad, ref_grad)


def test_fused_backward_is_finite_for_all_negative_tokens_in_float32():
    """A token whose projections are all ≤ 0 has r = eps/s ≈ 1e-6 in every channel, so ‖r^p‖³
    underflows float32; the fused backward must still match the reference's finite gradients."""
    from models.attention import core
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 9, 12, generator=g) for _ in range(3))
    q[0, 3], k[1, 5] = -q[0, 3].abs(), -k[1, 5].abs()
    scale, pe = torch.zeros(1, 1, 12), torch.zeros(1, 9, 12)
    grads = []
    for fused in (True, False):
        inputs = [t.clone().requires_grad_() for t in (q, k, v, scale, pe)]
        out = core.focused_linear_attention(*inputs, 3, 3, fused=fused)
        grads.append(torch.autograd.grad((out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum(), inputs))
    for fused_grad, ref_grad in zip(*grads, strict=True):
        assert torch.isfinite(fused_grad).all()
        torch.testing.assert_close(fused_grad, ref_grad, rtol=1e-4, atol=1e-5)
