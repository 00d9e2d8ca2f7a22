"""DeiT / FLatten-DeiT: budget, explicit-attention equivalence, the softmax kind, interface, configs."""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import randomize

import models
from config import load_config
from models.attention import FocusedLinearAttention, SoftmaxAttention, create_attention, list_attention_kinds
from models.deit import FLattenDeiT
from utils.flops import count_macs

DEVICES = ['cpu'] + (['cuda'] if torch.cuda.is_available() else [])

# (variant, config stem, exact parameter count, GMACs at 224² from utils.flops.count_macs)
VARIANTS = [
    ('flatten_deit_tiny_patch16_224', 'flatten_deit_t', 6_153_256, 1.1391),
    ('flatten_deit_small_patch16_224', 'flatten_deit_s', 22_902_376, 4.3591),
    ('flatten_deit_base_patch16_224', 'flatten_deit_b', 88_251_112, 17.0417),
    ('softmax_deit_tiny_patch16_224', 'deit_t', 5_717_416, 1.2537),
    ('softmax_deit_small_patch16_224', 'deit_s', 22_050_664, 4.5989),
    ('softmax_deit_base_patch16_224', 'deit_b', 86_567_656, 17.5638),
]
# Paper / DeiT figures: (params in M, GFLOPs) that the brief asks us to stay within.
PAPER = {
    'flatten_deit_tiny_patch16_224': (6.1, 1.1),
    'softmax_deit_tiny_patch16_224': (5.7, 1.2),
    'softmax_deit_small_patch16_224': (22.1, 4.6),
    'softmax_deit_base_patch16_224': (86.6, 17.6),
}



def _micro(**kwargs) -> FLattenDeiT:
    """A 48×32 input in 8-pixel patches: a non-square 6×4 grid, so a transposed grid would show."""
    args = dict(img_size=(48, 32), patch_size=8, embed_dim=24, depth=2, num_heads=3, num_classes=5,
                drop_path_rate=0.0, attn_type='L')
    args.update(kwargs)
    return FLattenDeiT(**args)


# ---------------------------------------------------------------------------------------------
# Budget
# ---------------------------------------------------------------------------------------------

def test_flatten_deit_tiny_hits_the_paper_budget():
    """Paper Table 8: FLatten-DeiT-T 6.1M / 1.1G, DeiT-T 5.7M / 1.2G (GMACs, utils.flops)."""
    flatten = models.create_model('flatten_deit_tiny_patch16_224')
    params = sum(p.numel() for p in flatten.parameters())
    macs, per_op = count_macs(flatten, (3, 224, 224))
    assert abs(params - 6.1e6) <= 0.1e6 and abs(macs / 1e9 - 1.1) <= 0.05, (params, macs)
    assert 'aten.convolution' in per_op and not any('attention' in op for op in per_op)  # DWC, no softmax

    deit = models.create_model('softmax_deit_tiny_patch16_224')
    deit_macs, _ = count_macs(deit, (3, 224, 224))
    assert abs(sum(p.numel() for p in deit.parameters()) - 5.7e6) <= 0.03 * 5.7e6
    # the same architecture as timm's DeiT-T, so the same count (1.25 GMACs; the paper prints 1.2G)
    assert deit_macs == count_macs(timm.create_model('deit_tiny_patch16_224'), (3, 224, 224))[0]
    assert macs < deit_macs  # linear attention is cheaper than softmax over 197 tokens


@pytest.mark.parametrize('variant, stem, params, gmacs', VARIANTS)
def test_parameter_counts(variant, stem, params, gmacs):
    model = models.create_model(variant)
    assert sum(p.numel() for p in model.parameters()) == params
    if variant in PAPER and variant.startswith('softmax_'):
        assert abs(params / 1e6 - PAPER[variant][0]) <= 0.03 * PAPER[variant][0]


@pytest.mark.slow
@pytest.mark.parametrize('variant, stem, params, gmacs', VARIANTS)
def test_gmacs(variant, stem, params, gmacs):
    macs, _ = count_macs(models.create_model(variant), (3, 224, 224))
    assert macs / 1e9 == pytest.approx(gmacs, abs=1e-4)
    if variant in PAPER:
        assert abs(macs / 1e9 - PAPER[variant][1]) <= 0.05 * PAPER[variant][1]


# ---------------------------------------------------------------------------------------------
# Focused linear attention over the patch grid equals the explicit quadratic form
# ---------------------------------------------------------------------------------------------

def explicit_dwc_matrix(weight: torch.Tensor, grid) -> torch.Tensor:
    """(d, 1, k, k) -> (d, N, N): token i = (i // W, i % W) takes v[j] through the tap at offset
    (row_j − row_i, col_j − col_i) + k//2 when it lies in the kernel (zero padding otherwise)."""
    H, W = grid
    d, _, k, _ = weight.shape
    m = torch.zeros(d, H * W, H * W, dtype=weight.dtype)
    for i in range(H * W):
        for j in range(H * W):
            dy, dx = j // W - i // W + k // 2, j % W - i % W + k // 2
            if (0 <= dy < k) and (0 <= dx < k):
                m[:, i, j] = weight[:, 0, dy, dx]
    return m


def explicit_focused_attention(module: FocusedLinearAttention, x: torch.Tensor, grid) -> torch.Tensor:
    """``proj(Sim V / (Σ_j Sim + n·1e-6) + DWC(V))`` per head with ``Sim = phi_p(Q) phi_p(K + P)ᵀ``
    as an explicit N×N matrix, ``phi_p(r) = ‖r‖ r^p / ‖r^p‖`` on ``r = (ReLU + 1e-6) / softplus(scale)``
    over the full C channels, and one DWC kernel set shared by the heads."""
    B, N, C = x.shape
    h = module.num_heads
    d = C // h
    qkv = x @ module.qkv.weight.T + module.qkv.bias
    q, k, v = qkv[..., :C], qkv[..., C:2 * C] + module.positional_encoding, qkv[..., 2 * C:]
    s = torch.log1p(torch.exp(module.scale))

    def phi(t):
        r = (torch.clamp(t, min=0) + 1e-6) / s
        rp = r ** module.focusing_factor
        return rp / rp.norm(dim=-1, keepdim=True) * r.norm(dim=-1, keepdim=True)

    q, k = phi(q), phi(k)
    m_dwc = explicit_dwc_matrix(module.dwc.weight, grid)
    out = torch.empty_like(v)
    for head in range(h):
        cols = slice(head * d, (head + 1) * d)
        sim = q[..., cols] @ k[..., cols].transpose(-2, -1)  # (B, N, N)
        out[..., cols] = (sim @ v[..., cols]) / (sim.sum(-1, keepdim=True) + N * 1e-6)
        for c in range(d):
            out[..., head * d + c] += v[..., head * d + c] @ m_dwc[c].T + module.dwc.bias[c]
    return out @ module.proj.weight.T + module.proj.bias


def explicit_softmax_attention(module: SoftmaxAttention, x: torch.Tensor, mask=None) -> torch.Tensor:
    """``proj(softmax(q kᵀ / √d + mask) v)`` per head, written out."""
    B, T, C = x.shape
    h = module.num_heads
    d = C // h
    qkv = x @ module.qkv.weight.T + module.qkv.bias
    q, k, v = qkv[..., :C], qkv[..., C:2 * C], qkv[..., 2 * C:]
    out = torch.empty_like(v)
    for head in range(h):
        cols = slice(head * d, (head + 1) * d)
        logits = q[..., cols] @ k[..., cols].transpose(-2, -1) / math.sqrt(d)
        if mask is not None:
            logits = logits + mask[:, head if mask.shape[1] > 1 else 0]
        out[..., cols] = logits.softmax(-1) @ v[..., cols]
    return out @ module.proj.weight.T + module.proj.bias


def _layer_norm(x: torch.Tensor, norm: torch.nn.LayerNorm) -> torch.Tensor:
    mean = x.mean(-1, keepdim=True)
    var = ((x - mean) ** 2).mean(-1, keepdim=True)
    return (x - mean) / torch.sqrt(var + norm.eps) * norm.weight + norm.bias


def explicit_forward(model: FLattenDeiT, images: torch.Tensor) -> torch.Tensor:
    """The whole model with the quadratic attention forms: patches row-major, [class token,]
    [position embedding,] pre-norm blocks, final LN, class token or patch mean, head."""
    B = images.shape[0]
    patch = model.patch_embed.proj
    grid = model.patch_embed.grid_size
    patches = F.unfold(images, patch.kernel_size, stride=patch.stride).transpose(1, 2)  # (B, N, 3·p²) row-major
    x = patches @ patch.weight.flatten(1).T + patch.bias
    if model.cls_token is not None:
        x = torch.cat([model.cls_token.expand(B, -1, -1), x], dim=1)
    if model.pos_embed is not None:
        x = x + model.pos_embed
    for block in model.blocks:
        y = _layer_norm(x, block.norm1)
        if isinstance(block.attn, FocusedLinearAttention):
            x = x + explicit_focused_attention(block.attn, y, grid)
        else:
            x = x + explicit_softmax_attention(block.attn, y)
        y = _layer_norm(x, block.norm2) @ block.mlp.fc1.weight.T + block.mlp.fc1.bias
        y = 0.5 * y * (1 + torch.erf(y / math.sqrt(2)))
        x = x + y @ block.mlp.fc2.weight.T + block.mlp.fc2.bias
    x = _layer_norm(x, model.norm)
    pooled = x[:, 0] if model.cls_token is not None else x.mean(dim=1)
    return pooled @ model.head.weight.T + model.head.bias


@pytest.mark.parametrize('attn_type', ['L', 'M1', 'S'])
def test_model_equals_explicit_quadratic_attention(attn_type):
    """FLatten blocks see exactly the 6×4 grid tokens, row-major, no class token: the DWC's zero
    padding and the positional encoding line up with the patches. Mixed and softmax models too."""
    model = randomize(_micro(attn_type=attn_type), std=0.2).double().eval()
    images = torch.randn(2, 3, 48, 32, dtype=torch.float64)
    with torch.no_grad():
        torch.testing.assert_close(model(images), explicit_forward(model, images), rtol=1e-9, atol=1e-9)


def test_flatten_blocks_have_no_class_token():
    model = _micro(attn_type='L')
    assert model.cls_token is None and model.pos_embed is None and model.global_pool == 'avg'
    assert all(isinstance(block.attn, FocusedLinearAttention) for block in model.blocks)
    assert model.blocks[0].attn.positional_encoding.shape == (1, 6 * 4, 24)
    assert model.forward_features(torch.randn(1, 3, 48, 32)).shape == (1, 24, 24)

    deit = _micro(attn_type='S')
    assert deit.cls_token.shape == (1, 1, 24) and deit.pos_embed.shape == (1, 25, 24) and deit.global_pool == 'token'
    mixed = _micro(attn_type='M1', depth=3)
    assert [type(b.attn) for b in mixed.blocks] == [FocusedLinearAttention, SoftmaxAttention, SoftmaxAttention]
    assert mixed.cls_token is None and mixed.pos_embed is None


# ---------------------------------------------------------------------------------------------
# The 'softmax' attention kind
# ---------------------------------------------------------------------------------------------

def test_softmax_kind_is_registered():
    assert 'softmax' in list_attention_kinds()
    assert isinstance(create_attention('softmax', 16, 2, grid_size=(2, 2)), SoftmaxAttention)


@pytest.mark.parametrize('with_mask', [False, True])
def test_softmax_kind_equals_explicit_softmax(with_mask):
    """T = 3·4 grid tokens plus a class token: softmax attends over whatever tokens it is given."""
    module = randomize(create_attention('softmax', 24, 3, grid_size=(3, 4)), std=0.3).double().eval()
    x = torch.randn(2, 13, 24, dtype=torch.float64)
    mask = None
    if with_mask:
        mask = torch.randn(2, 3, 13, 13, dtype=torch.float64)
        mask[..., 5:] = -1e4  # every query ignores keys 5..12
    with torch.no_grad():
        torch.testing.assert_close(module(x, mask=mask), explicit_softmax_attention(module, x, mask))


@pytest.mark.parametrize('device', DEVICES)
@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
@pytest.mark.parametrize('magnitude', [1.0, 1e2])
def test_softmax_kind_finite_under_autocast(device, dtype, magnitude):
    module = randomize(create_attention('softmax', 32, 2, grid_size=(7, 7)), std=0.2).to(device).eval()
    x = torch.randn(3, 50, 32, device=device) * magnitude
    with torch.autocast(device, dtype=dtype), torch.no_grad():
        out = module(x)
    assert torch.isfinite(out).all()
    if magnitude == 1.0:
        # well-conditioned inputs: close to float32 (at 1e2 the logits reach ~1e4, so any rounding
        # flips the argmax and only finiteness is meaningful)
        with torch.no_grad():
            ref = module(x)
        assert (out.float() - ref).norm() / ref.norm() < 0.05


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_models_finite_under_autocast(dtype):
    for attn_type in ('L', 'S'):
        model = randomize(_micro(attn_type=attn_type), std=0.2).eval()
        with torch.autocast('cpu', dtype=dtype), torch.no_grad():
            out = model(torch.randn(2, 3, 48, 32) * 1e2)
        assert torch.isfinite(out).all(), attn_type


# ---------------------------------------------------------------------------------------------
# DeiT baseline is DeiT
# ---------------------------------------------------------------------------------------------

def test_softmax_deit_loads_deit_weights_and_reproduces_deit():
    """Same state-dict keys, shapes and order as DeiT-T (timm's deit_tiny_patch16_224, the layout
    of the released DeiT checkpoints); loading its weights gives its outputs."""
    torch.manual_seed(0)
    reference = timm.create_model('deit_tiny_patch16_224').eval()
    model = models.create_model('softmax_deit_tiny_patch16_224').eval()
    assert [(k, v.shape) for k, v in model.state_dict().items()] == \
           [(k, v.shape) for k, v in reference.state_dict().items()]
    model.load_state_dict(reference.state_dict(), strict=True)
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Shapes, gradients, interface
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('variant', ['flatten_deit_tiny_patch16_224', 'softmax_deit_tiny_patch16_224'])
@pytest.mark.parametrize('img_size', [224, 160, (224, 160)])
def test_forward_backward_shapes(variant, img_size):
    model = models.create_model(variant, img_size=img_size, num_classes=7)
    H, W = (img_size, img_size) if isinstance(img_size, int) else img_size
    x = torch.randn(2, 3, H, W)
    feats = model.forward_features(x)
    tokens = (H // 16) * (W // 16) + (1 if variant.startswith('softmax') else 0)
    assert feats.shape == (2, tokens, 192)
    out = model.forward_head(feats)
    assert out.shape == (2, 7) and torch.isfinite(out).all()
    out.square().mean().backward()
    assert model.patch_embed.proj.weight.grad.shape == (192, 3, 16, 16)
    if variant.startswith('flatten'):
        assert model.blocks[0].attn.positional_encoding.shape == (1, (H // 16) * (W // 16), 192)


@pytest.mark.parametrize('kwargs', [
    dict(attn_type='L'), dict(attn_type='S'), dict(attn_type='M1'), dict(attn_type='S', global_pool='avg'),
    dict(attn_type='L', use_abs_pos=True), dict(attn_type='S', use_abs_pos=False),
])
def test_every_parameter_receives_a_gradient(kwargs):
    model = randomize(_micro(**kwargs), std=0.2)
    model(torch.randn(2, 3, 48, 32)).logsumexp(-1).mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize('attn_type', ['L', 'S'])
def test_model_interface(attn_type):
    model = _micro(attn_type=attn_type).eval()
    x = torch.randn(2, 3, 48, 32)
    assert model.num_features == 24 and model.num_classes == 5 and model.get_classifier() is model.head
    assert model.forward_head(model.forward_features(x), pre_logits=True).shape == (2, 24)
    assert model(x).shape == (2, 5)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3 and model.head.bias.abs().sum() == 0
    model.reset_classifier(0)
    assert model(x).shape == (2, 24) and model.num_classes == 0
    assert model.no_weight_decay() == {'pos_embed', 'cls_token'}
    assert model.no_weight_decay_keywords() == set()
    if attn_type == 'S':
        assert model.no_weight_decay() <= {name for name, _ in model.named_parameters()}


def test_drop_path_rule_and_layer_norm_eps():
    model = models.create_model('flatten_deit_tiny_patch16_224', drop_path_rate=0.1)
    rates = [getattr(block.drop_path, 'drop_prob', 0.0) for block in model.blocks]
    assert rates[0] == 0.0 and rates[-1] == pytest.approx(0.1) and rates == sorted(rates)
    assert model.norm.eps == 1e-6 and model.blocks[0].norm1.eps == 1e-6


@pytest.mark.parametrize('attn_type', ['L', 'S'])
def test_state_dict_round_trip(attn_type):
    model = randomize(_micro(attn_type=attn_type))
    clone = _micro(attn_type=attn_type)
    clone.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(2, 3, 48, 32)
    with torch.no_grad():
        torch.testing.assert_close(clone.eval()(x), model.eval()(x))


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = _micro(attn_type='M1', depth=3)
    x = torch.randn(2, 3, 48, 32)
    model(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], msg=name)


# ---------------------------------------------------------------------------------------------
# Errors
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('kwargs, message', [
    (dict(img_size=(4, 32)), r'a 4x32 input is too small; every side must be at least 8 pixels'),
    (dict(attn_type='L', global_pool='token'), r"global_pool='token' needs a class token.*'L'"),
    (dict(attn_type='M1', global_pool='token'), r"global_pool='token' needs a class token.*'M1'"),
    (dict(global_pool='max'), r"global_pool='max' is not one of \('token', 'avg'\)"),
    (dict(attn_type='LL'), 'expected 1 stage letters'),
    (dict(attn_type='LLLL'), 'expected 1 stage letters'),
    (dict(attn_type='M'), 'needs an integer suffix'),
    (dict(attn_type='X'), "letter 'X'"),
])
def test_bad_arguments_are_reported_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _micro(**kwargs)


def test_bad_image_size_from_config_names_the_sizes():
    cfg = load_config('configs/flatten_deit_t.yaml', ['DATA.IMG_SIZE', '8'])
    with pytest.raises(ValueError, match='a 8x8 input is too small; every side must be at least 16 pixels'):
        models.build_model(cfg)


# ---------------------------------------------------------------------------------------------
# Configs, registry
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize('variant, stem, params, gmacs', VARIANTS)
def test_config_builds_the_variant(variant, stem, params, gmacs):
    cfg = load_config(f'configs/{stem}.yaml')
    model = models.build_model(cfg)
    assert cfg.MODEL.NAME == variant
    assert [(k, v.shape) for k, v in model.state_dict().items()] == \
           [(k, v.shape) for k, v in models.create_model(variant).state_dict().items()]
    # paper §5.1 / DeiT recipe at the batch-512 LR convention, no clipping
    train, aug = cfg.TRAIN, cfg.AUG
    assert (train.EPOCHS, train.WARMUP_EPOCHS, train.BASE_LR, train.WEIGHT_DECAY) == (300, 20, 5e-4, 0.05)
    assert train.CLIP_GRAD is None and train.OPTIMIZER.NAME == 'adamw' and train.LR_SCHEDULER.NAME == 'cosine'
    assert (aug.AUTO_AUGMENT, aug.MIXUP, aug.CUTMIX, aug.REPROB) == ('rand-m9-mstd0.5-inc1', 0.8, 1.0, 0.25)
    assert (cfg.MODEL.LABEL_SMOOTHING, cfg.MODEL.DROP_PATH_RATE, cfg.DATA.BATCH_SIZE) == (0.1, 0.1, 128)


def test_config_image_size_mixing_and_pooling_keys():
    cfg = load_config('configs/flatten_deit_t.yaml', ['DATA.IMG_SIZE', '256', 'MODEL.LA.ATTN_TYPE', 'M6'])
    model = models.build_model(cfg)
    kinds = [type(block.attn) for block in model.blocks]
    assert kinds == [FocusedLinearAttention] * 6 + [SoftmaxAttention] * 6
    assert model.blocks[0].attn.positional_encoding.shape == (1, 256, 192)
    assert model(torch.randn(1, 3, 256, 256)).shape == (1, 1000)

    cfg = load_config('configs/deit_t.yaml', ['MODEL.DEIT.GLOBAL_POOL', 'avg', 'MODEL.DEIT.ABS_POS_EMBED', 'False',
                                              'MODEL.NUM_CLASSES', '10', 'MODEL.DROP_PATH_RATE', '0.0'])
    model = models.build_model(cfg)
    assert model.cls_token is None and model.pos_embed is None and model.num_classes == 10


def test_deit_type_ignores_la_letters():
    model = models.build_model(load_config('configs/deit_t.yaml', ['MODEL.LA.ATTN_TYPE', 'L']))
    assert model.attn_type == 'S' and all(isinstance(b.attn, SoftmaxAttention) for b in model.blocks)


def test_registered_in_timm_without_shadowing_timm_deit():
    names = [v for v, *_ in VARIANTS]
    assert set(names) <= set(models.list_models()) and set(names) <= set(timm.list_models('*deit*'))
    model = timm.create_model('flatten_deit_tiny_patch16_224', num_classes=7)
    assert isinstance(model, FLattenDeiT) and model.num_classes == 7
    assert not isinstance(timm.create_model('deit_tiny_patch16_224'), FLattenDeiT)
    assert {'deit', 'flatten_deit'} <= set(models.list_model_types())
