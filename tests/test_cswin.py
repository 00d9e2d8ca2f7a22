"""FLatten-CSwin: official inventories and goldens, explicit O(N²) forms, stripe windows, Table 8, errors."""
from __future__ import annotations

import pytest
import timm
import torch
from conftest import ASSETS, REPO, load_golden, randomize, read_inventory

import models
from config import config_to_yaml, load_config
from models.attention import (
    Attention,
    AttentionOptions,
    FocusedLinearAttention,
    SoftmaxAttention,
    create_attention,
    dwc_matrix,
    resolve_window,
    stripe_partition,
    stripe_reverse,
)
from models.cswin import CSWinTransformer, branch_windows, parse_split_sizes, stage_resolutions


def cswin_attention(kind: str, dim: int, heads: int, grid_size, window=None, **kw):
    """An attention kind with CSwin's layout (the block's stacked projections, stripe `window`, LePE)."""
    options = AttentionOptions(projections='block', lepe=True, window=window, **kw)
    return create_attention(kind, dim, heads, grid_size, options=options)

# (inventory = config stem, registered variant, parameter count from docs/numerics.md, "Parameter counts")
OFFICIAL = [
    ('flatten_cswin_t', 'flatten_cswin_tiny_224', 21_201_768),
    ('flatten_cswin_s', 'flatten_cswin_small_224', 35_451_752),
    ('flatten_cswin_b', 'flatten_cswin_base_224', 74_867_032),
    ('flatten_cswin_b_384', 'flatten_cswin_base_384', 78_369_112),
]
# Paper Table 8: (variant, config, image size, params as printed, GFLOPs)
TABLE8_FLATTEN = [
    ('flatten_cswin_tiny_224', 'flatten_cswin_t', 224, '21', 4.3),
    ('flatten_cswin_small_224', 'flatten_cswin_s', 224, '35', 6.9),
    ('flatten_cswin_base_224', 'flatten_cswin_b', 224, '75', 15.0),
    ('flatten_cswin_base_384', 'flatten_cswin_b_384', 384, '78', 46.4),
]
TABLE8_BASELINES = [
    ('softmax_cswin_tiny_224', 'cswin_t', 224, '23', 4.3),
    ('softmax_cswin_small_224', 'cswin_s', 224, '35', 6.9),
    ('softmax_cswin_base_224', 'cswin_b', 224, '78', 15.0),
    ('softmax_cswin_base_384', 'cswin_b_384', 384, '78', 47.0),
]


def _params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _inventory(model: torch.nn.Module) -> list:
    return [(k, tuple(v.shape)) for k, v in model.state_dict().items()]



def _official_kwargs(kwargs: dict) -> dict:
    """The official CSWinTransformer arguments in this constructor's names."""
    kwargs = dict(kwargs)
    kwargs['depths'] = kwargs.pop('depth')
    assert kwargs.pop('patch_size') == 4  # the official stem is always the 7×7 stride-4 conv
    return kwargs


def _mini(**kwargs) -> CSWinTransformer:
    """A 64² model: stage maps 16, 8, 4, 2; global L stages, two-branch S stage 3, global stage 4."""
    args = dict(img_size=64, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 8), split_size=(1, 2, 2, 2),
                num_classes=5)
    args.update(kwargs)
    return CSWinTransformer(**args)


# ---------------------------------------------------------------------------------------------
# Official layout and numerical identity
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('inventory, variant, params', OFFICIAL)
def test_variant_matches_official_inventory(inventory, variant, params):
    model = models.create_model(variant)
    assert _inventory(model) == read_inventory(inventory)
    assert _params(model) == params


@pytest.mark.parametrize('inventory, variant, params', OFFICIAL)
def test_config_builds_the_official_model(inventory, variant, params):
    for path in (REPO / 'configs' / f'{inventory}.yaml', ASSETS / 'official_cfgs' / f'{inventory}.yaml'):
        model = models.build_model(load_config(str(path)))
        assert _inventory(model) == read_inventory(inventory), path
        assert _params(model) == params


# The official CSwin runs add an EMA through main_ema.py's flags (docs/training.md, "Official configuration
# files"); our configs hold it as keys.
OFFICIAL_EMA_DECAY = {'flatten_cswin_t': '0.99984', 'flatten_cswin_s': '0.99984', 'flatten_cswin_b': '0.99982',
                      'flatten_cswin_b_384': '0.99982'}


def test_project_cswin_configs_equal_the_official_runs():
    for name, *_ in OFFICIAL:
        ours = load_config(str(REPO / 'configs' / f'{name}.yaml'))
        ema = ['TRAIN.EMA.ENABLE', 'True', 'TRAIN.EMA.DECAY', OFFICIAL_EMA_DECAY[name]]
        official = load_config(str(ASSETS / 'official_cfgs' / f'{name}.yaml'), ema)
        assert config_to_yaml(ours) == config_to_yaml(official), name


def test_official_checkpoint_loads_strictly():
    model = models.create_model('flatten_cswin_tiny_224')
    model.load_state_dict({k: torch.zeros(shape) for k, shape in read_inventory('flatten_cswin_t')}, strict=True)


def test_matches_official_golden_model():
    golden = load_golden('cswin_mini_LLSS')
    model = CSWinTransformer(**_official_kwargs(golden['kwargs'])).eval()
    assert list(model.state_dict()) == list(golden['state_dict'])
    model.load_state_dict(golden['state_dict'], strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(golden['input']), golden['output'], rtol=0, atol=1e-5)


def test_matches_official_module_golden():
    golden = load_golden('module_cswin_fla_global')
    kw = golden['kwargs']
    assert (kw['idx'], kw['split_size']) == (-1, kw['resolution'])  # the whole map is one window
    module = cswin_attention('focused_linear', kw['dim'], kw['num_heads'], (kw['resolution'], kw['resolution']),
                             focusing_factor=kw['focusing_factor'], kernel_size=kw['kernel_size'])
    assert module.projections == 'block'
    assert list(module.state_dict()) == list(golden['state_dict'])
    module.load_state_dict(golden['state_dict'], strict=True)
    with torch.no_grad():
        torch.testing.assert_close(module.eval()(golden['input']), golden['output'], rtol=0, atol=1e-5)


def test_official_block_layout():
    """Stages 1–2 single-branch global FLA, stage 3 two stripe branches (idx 0 / 1), stage 4 global."""
    model = models.create_model('flatten_cswin_tiny_224')
    first, third, last = model.stage1[0], model.stage3[0], model.stage4[0]
    assert [a.kind for a in first.attns] == ['focused_linear']
    assert (first.attns[0].window, first.attns[0].dim, first.attns[0].num_heads) == ((56, 56), 64, 2)
    assert model.stage2[3].attns[0].window == (28, 28)
    assert [a.kind for a in third.attns] == ['softmax'] * 2
    assert [a.window for a in third.attns] == [(14, 7), (7, 14)]
    assert [(a.dim, a.num_heads) for a in third.attns] == [(128, 4), (128, 4)]
    assert (len(last.attns), last.attns[0].window) == (1, (7, 7))


# ---------------------------------------------------------------------------------------------
# The attention kinds against explicit O(N²) forms (float64, independent of the module code)
# ---------------------------------------------------------------------------------------------

def _window_tokens(grid, window):
    """Per window (official order), the row-major global indices of its tokens, and each token's
    row-major position inside its window."""
    H, W = grid
    H_sp, W_sp = window
    rows, cols = torch.meshgrid(torch.arange(H), torch.arange(W), indexing='ij')
    rows, cols = rows.flatten(), cols.flatten()
    window_id = (rows // H_sp) * (W // W_sp) + cols // W_sp
    local = (rows % H_sp) * W_sp + cols % W_sp
    members = [torch.nonzero(window_id == w).squeeze(1) for w in range((H // H_sp) * (W // W_sp))]
    return members, local


def _phi(t, scale, p):
    r = (torch.clamp(t, min=0) + 1e-6) / torch.log1p(torch.exp(scale))
    rp = r ** p
    return rp / rp.norm(dim=-1, keepdim=True) * r.norm(dim=-1, keepdim=True)


def _lepe_and_dwc(v, conv, window, channel_of):
    """Σ_j M[c, i, j] v[j, c] + bias[c] with M the conv as an explicit n×n matrix per channel."""
    m = dwc_matrix(conv.weight, window)[channel_of]  # (C, n, n)
    return torch.einsum('cij,bjc->bic', m, v) + conv.bias[channel_of]


def explicit_cswin_fla(module: FocusedLinearAttention, qkv: torch.Tensor) -> torch.Tensor:
    """``Sim V / (Σ_j Sim + n·1e-6) + DWC(V) + LePE(V)`` with ``Sim = phi_p(Q) phi_p(K+P)ᵀ`` per head,
    computed window by window from token coordinates; DWC (shared over heads) and LePE (per channel)
    as explicit zero-padded n×n matrices on the window grid."""
    q, k, v = qkv
    C, h = q.shape[-1], module.num_heads
    d = C // h
    members, local = _window_tokens(module.grid_size, module.window)
    k = k + module.positional_encoding[0, local]
    q, k = _phi(q, module.scale, module.focusing_factor), _phi(k, module.scale, module.focusing_factor)
    out = torch.zeros_like(v)
    for idx in members:
        assert torch.equal(local[idx], torch.arange(len(idx)))  # window tokens are row-major
        qw, kw, vw = q[:, idx], k[:, idx], v[:, idx]
        n = len(idx)
        for head in range(h):
            cols = slice(head * d, (head + 1) * d)
            sim = qw[..., cols] @ kw[..., cols].transpose(-2, -1)
            out[:, idx, cols] = (sim @ vw[..., cols]) / (sim.sum(-1, keepdim=True) + n * 1e-6)
        channels = torch.arange(C)
        out[:, idx] += _lepe_and_dwc(vw, module.dwc, module.window, channels % d)
        out[:, idx] += _lepe_and_dwc(vw, module.get_v, module.window, channels)
    return out


def explicit_lepe_softmax(module: SoftmaxAttention, qkv: torch.Tensor) -> torch.Tensor:
    """``softmax(q kᵀ d^-½) v + LePE(V)`` per window and head, from token coordinates."""
    q, k, v = qkv
    C, h = q.shape[-1], module.num_heads
    d = C // h
    members, _ = _window_tokens(module.grid_size, module.window)
    out = torch.zeros_like(v)
    for idx in members:
        for head in range(h):
            cols = slice(head * d, (head + 1) * d)
            logits = q[:, idx, cols] @ k[:, idx, cols].transpose(-2, -1) * d ** -0.5
            out[:, idx, cols] = logits.softmax(-1) @ v[:, idx, cols]
        out[:, idx] += _lepe_and_dwc(v[:, idx], module.get_v, module.window, torch.arange(C))
    return out


GEOMETRIES = [  # (grid, window): global, non-square global, vertical / horizontal stripes, small blocks
    ((7, 7), None), ((4, 6), None), ((8, 6), (8, 2)), ((8, 6), (2, 6)), ((6, 6), (3, 2)),
]


@pytest.mark.parametrize('grid, window', GEOMETRIES)
def test_focused_attention_equals_explicit_quadratic_form(grid, window):
    dim, heads = 24, 3
    module = randomize(cswin_attention('focused_linear', dim, heads, grid, window))
    module = module.double().eval()
    qkv = torch.randn(3, 2, grid[0] * grid[1], dim, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(module(qkv), explicit_cswin_fla(module, qkv), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('grid, window', GEOMETRIES)
def test_lepe_softmax_equals_explicit_form(grid, window):
    module = randomize(cswin_attention('softmax', 16, 2, grid, window), std=0.2)
    module = module.double().eval()
    assert [name for name, _ in module.named_parameters()] == ['get_v.weight', 'get_v.bias']
    qkv = torch.randn(3, 2, grid[0] * grid[1], 16, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(module(qkv), explicit_lepe_softmax(module, qkv), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize('window', [(8, 2), (2, 6), (4, 3)])
def test_windowed_focused_attention_is_the_global_module_on_each_window(window):
    """split < resolution: every stripe is attended on its own, exactly as a global module built for
    the stripe's shape and run on that stripe alone (sums, normaliser, DWC border, positional encoding)."""
    grid, dim, heads = (8, 6), 16, 2
    windowed = randomize(cswin_attention('focused_linear', dim, heads, grid, window))
    single = cswin_attention('focused_linear', dim, heads, window)
    single.load_state_dict(windowed.state_dict(), strict=True)
    qkv = torch.randn(3, 2, grid[0] * grid[1], dim)
    members, _ = _window_tokens(grid, window)
    with torch.no_grad():
        out = windowed.eval()(qkv)
        for idx in members:
            torch.testing.assert_close(out[:, idx], single.eval()(qkv[:, :, idx]))


def test_windowed_focused_attention_trains():
    module = randomize(cswin_attention('focused_linear', 16, 2, (8, 6), (8, 2)))
    assert module.positional_encoding.shape == (1, 16, 16)
    module(torch.randn(3, 2, 48, 16)).square().mean().backward()
    for name, param in module.named_parameters():
        assert (param.grad is not None) and (param.grad.abs().sum() > 0), name


@pytest.mark.parametrize('kind', ['focused_linear', 'softmax'])
@pytest.mark.parametrize('dtype', [torch.bfloat16, torch.float16])
def test_attention_finite_under_autocast(kind, dtype):
    module = randomize(cswin_attention(kind, 32, 2, (8, 8), (8, 2)), std=0.2).eval()
    qkv = torch.randn(3, 2, 64, 32) * 100
    with torch.autocast('cpu', dtype=dtype), torch.no_grad():
        out = module(qkv)
    assert torch.isfinite(out).all()


def test_stripe_partition_round_trip_and_order():
    x = torch.arange(2 * 24).float().view(2, 24, 1)  # token index as the value, 4×6 map
    windows = stripe_partition(x, (4, 6), (4, 2))
    assert windows.shape == (6, 8, 1)
    # batch 0, second window: columns 2–3, row-major inside the stripe
    assert windows[1, :, 0].tolist() == [2, 3, 8, 9, 14, 15, 20, 21]
    torch.testing.assert_close(stripe_reverse(windows, (4, 6), (4, 2)), x)


def test_window_must_tile_the_grid():
    assert resolve_window((8, 6), None) == (8, 6)
    with pytest.raises(ValueError, match='window 8x4 does not tile the 8x6 map'):
        cswin_attention('focused_linear', 16, 2, (8, 6), (8, 4))


# ---------------------------------------------------------------------------------------------
# Stripe geometry of the model
# ---------------------------------------------------------------------------------------------

def test_stage_resolutions_follow_the_convolutions():
    assert stage_resolutions((224, 224), 4) == [(56, 56), (28, 28), (14, 14), (7, 7)]
    assert stage_resolutions((384, 384), 4) == [(96, 96), (48, 48), (24, 24), (12, 12)]
    assert stage_resolutions((100, 60), 4) == [(25, 15), (13, 8), (7, 4), (4, 2)]


def test_branch_rules():
    assert branch_windows((14, 14), 7, last_stage=False) == [(14, 7), (7, 14)]
    assert branch_windows((14, 14), 14, last_stage=False) == [None]  # split == resolution: one branch
    assert branch_windows((14, 14), 56, last_stage=False) == [None]  # larger split: clamped to global
    assert branch_windows((7, 7), 1, last_stage=True) == [None]
    assert parse_split_sizes('56-28-14-7', 4, 'key') == (56, 28, 14, 7)


def test_windowed_la_stages_build_and_train():
    """LA splits smaller than the stage maps (the official code crashes: docs/differences.md, "CSwin with an LA
    split smaller than the map"): stripe FLA."""
    model = _mini(la_split_size='8-4-2-2')
    attns = model.stage1[0].attns
    assert [a.window for a in attns] == [(16, 8), (8, 16)]
    assert [tuple(a.positional_encoding.shape) for a in attns] == [(1, 128, 8), (1, 128, 8)]
    assert [a.window for a in model.stage2[0].attns] == [(8, 4), (4, 8)]
    model(torch.randn(2, 3, 64, 64)).logsumexp(-1).mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name


@pytest.mark.slow
def test_official_crashing_la_split_runs_at_full_size():
    cfg = load_config('configs/flatten_cswin_t.yaml', ['MODEL.LA.CSWIN_LA_SPLIT_SIZE', '7-7-7-7'])
    model = models.build_model(cfg).eval()
    assert [a.window for a in model.stage1[0].attns] == [(56, 7), (7, 56)]
    with torch.no_grad():
        assert torch.isfinite(model(torch.randn(1, 3, 224, 224))).all()


def test_mixed_stage_takes_each_block_split_from_its_letter():
    model = _mini(attn_type='LLMS1', la_split_size=None)
    assert [a.kind for a in model.stage3[0].attns] == ['focused_linear']  # global L
    assert [a.kind for a in model.stage3[1].attns] == ['softmax'] * 2  # S split 2
    assert model(torch.randn(1, 3, 64, 64)).shape == (1, 5)


@pytest.mark.parametrize('img_size', [96, 160, (64, 96)])
def test_other_image_sizes_and_class_counts(img_size):
    model = _mini(img_size=img_size, num_classes=11, split_size=(1, 1, 1, 1)).eval()
    size = (img_size, img_size) if isinstance(img_size, int) else img_size
    H, W = stage_resolutions(size, 4)[0]
    assert model.stage1[0].attns[0].positional_encoding.shape == (1, H * W, 16)
    with torch.no_grad():
        assert model(torch.randn(1, 3, *size)).shape == (1, 11)


def test_config_honours_image_size_classes_and_channels():
    cfg = load_config('configs/flatten_cswin_t.yaml', [
        'DATA.IMG_SIZE', '448', 'MODEL.NUM_CLASSES', '10', 'MODEL.SWIN.IN_CHANS', '1',
        'MODEL.LA.CSWIN_LA_SPLIT_SIZE', '112-56-28-14', 'TRAIN.USE_CHECKPOINT', 'True'])
    model = models.build_model(cfg)
    assert model.stage1[0].attns[0].positional_encoding.shape == (1, 112 * 112, 64)
    assert [a.window for a in model.stage3[0].attns] == [(28, 7), (7, 28)]
    assert model.stage1_conv_embed[0].in_channels == 1 and model.num_classes == 10
    assert model.head.out_features == 10 and model.grad_checkpointing


def test_softmax_types_ignore_la_keys():
    cfg = load_config('configs/cswin_t.yaml', ['MODEL.LA.ATTN_TYPE', 'LLLL'])
    model = models.build_model(cfg)
    assert model.attn_type == 'SSSS'
    assert {a.kind for a in model.modules() if isinstance(a, Attention)} == {'softmax'}


# ---------------------------------------------------------------------------------------------
# Parameters and FLOPs against the paper's Table 8
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('variant, config, size, params, gflops', TABLE8_FLATTEN)
def test_flatten_params_at_the_paper_precision(variant, config, size, params, gflops):
    assert f'{_params(models.create_model(variant)) / 1e6:.0f}' == params


@pytest.mark.parametrize('variant, config, size, params, gflops', TABLE8_BASELINES)
def test_baseline_params_within_3_percent(variant, config, size, params, gflops):
    model = models.create_model(variant)
    assert abs(_params(model) - float(params) * 1e6) / (float(params) * 1e6) <= 0.03
    from_cfg = models.build_model(load_config(f'configs/{config}.yaml'))
    assert _inventory(from_cfg) == _inventory(model)

# GMACs against Table 8 for every config: tests/test_model_table.py


# ---------------------------------------------------------------------------------------------
# Interface, registry, training utilities
# ---------------------------------------------------------------------------------------------

def test_model_interface():
    model = _mini().eval()
    x = torch.randn(2, 3, 64, 64)
    feats = model.forward_features(x)
    assert feats.shape == (2, 4, 128) and model.num_features == 128
    assert model.forward_head(feats, pre_logits=True).shape == (2, 128)
    assert model(x).shape == (2, 5) and model.get_classifier() is model.head
    model.reset_classifier(3)  # broken in the official CSwin (docs/differences.md, "Broken or missing helpers")
    assert model(x).shape == (2, 3) and model.num_classes == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, 128)
    assert model.no_weight_decay() == set() and model.no_weight_decay_keywords() == set()


def test_every_parameter_learns_and_state_dict_round_trips():
    model = _mini(drop_path_rate=0.1)
    model(torch.randn(2, 3, 64, 64)).logsumexp(-1).mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
    clone = _mini()
    clone.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        torch.testing.assert_close(clone.eval()(x), model.eval()(x))


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = _mini()
    x = torch.randn(2, 3, 64, 64)
    model(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], msg=name)


def test_model_finite_under_autocast():
    model = randomize(_mini(la_split_size='8-4-2-2'), std=0.1).eval()
    with torch.autocast('cpu', dtype=torch.bfloat16), torch.no_grad():
        out = model(torch.randn(2, 3, 64, 64))
    assert torch.isfinite(out).all()


def test_registered_here_and_in_timm():
    names = [v for _, v, _ in OFFICIAL] + [v for v, *_ in TABLE8_BASELINES]
    assert set(names) <= set(models.list_models()) and set(names) <= set(timm.list_models('*cswin*'))
    model = timm.create_model('flatten_cswin_tiny_224', num_classes=7)
    assert isinstance(model, CSWinTransformer) and model.num_classes == 7
    for model_type in ('FLatten_CSWin_64_24181_tiny_224', 'FLatten_CSWin_64_24322_small_224',
                       'FLatten_CSWin_96_36292_base_224', 'FLatten_CSWin_96_36292_base_384',
                       'CSWin_64_12211_tiny_224', 'CSWin_64_24322_small_224', 'CSWin_96_24322_base_224',
                       'CSWin_96_24322_base_384'):
        assert model_type in models.list_model_types()


def test_pretrained_224_weights_load_into_384(tmp_path):
    """Spec §4.3: only the 9 FLA positional encodings of stages 1–2 depend on the resolution."""
    from utils.checkpoint import load_pretrained
    source = models.create_model('flatten_cswin_base_224')
    target = models.create_model('flatten_cswin_base_384')
    torch.save({'model': source.state_dict()}, tmp_path / 'b224.pth')
    report = load_pretrained(target, str(tmp_path / 'b224.pth'))
    assert len(report.resized) == 9 and all(k.endswith('positional_encoding') for k in report.resized)
    assert target.stage1[0].attns[0].positional_encoding.shape == (1, 96 * 96, 96)
    torch.testing.assert_close(target.stage3[0].qkv.weight, source.stage3[0].qkv.weight)


# ---------------------------------------------------------------------------------------------
# Errors name the bad thing, at construction
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kwargs, message', [
    # S stripes that do not tile a map are padded; an input below the total stride is an error
    (dict(img_size=16), r'a 16x16 input is too small; every side must be at least 32 pixels'),
    (dict(la_split_size='6-8-4-2'), r'CSWIN_LA_SPLIT_SIZE entry 6 does not tile the 16x16 map'),
    (dict(la_split_size='8-4-2'), r"CSWIN_LA_SPLIT_SIZE='8-4-2': expected 4 positive stripe sizes"),
    (dict(la_split_size='8-4-x-2'), 'expected 4 positive stripe sizes'),
    (dict(split_size=(1, 2, 0, 2)), 'split_size=.*expected 4 positive'),
    (dict(num_heads=(1, 2, 4, 8), la_split_size='8-4-2-2'), 'need an even dim and num_heads'),
    (dict(depths=(1, 1), num_heads=(2,)), 'same length'),
    (dict(attn_type='LLS'), 'expected 4 stage letters'),
    (dict(attn_type='LLXS'), "letter 'X'"),
])
def test_bad_geometry_is_reported_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _mini(**kwargs)


def test_bad_config_names_the_key_and_sizes():
    cfg = load_config('configs/flatten_cswin_t.yaml', ['DATA.IMG_SIZE', '384'])
    with pytest.raises(ValueError, match=r'MODEL.LA.CSWIN_LA_SPLIT_SIZE entry 56 does not tile the 96x96 map'):
        models.build_model(cfg)


def test_too_small_input_is_a_clear_error():
    with pytest.raises(ValueError, match='a 31x64 input is too small; every side must be at least 32 pixels'):
        _mini()(torch.randn(1, 3, 31, 64))

