"""FLatten-Swin: official inventories, golden outputs, registry, interface and geometry errors."""
from __future__ import annotations

import pytest
import timm
import torch
from conftest import load_golden, read_inventory

import models
from config import load_config
from models.registry import UnknownModelError
from models.swin import FLattenSwinTransformer, hard_mask, shifted_window_mask, window_partition, window_reverse

# (inventory, registered variant, parameter count from docs/numerics.md, "Parameter counts")
OFFICIAL = [
    ('flatten_swin_t', 'flatten_swin_tiny_patch4_224', 29_192_384),
    ('flatten_swin_s', 'flatten_swin_small_patch4_224', 50_510_288),
    ('flatten_swin_b', 'flatten_swin_base_patch4_224', 88_972_488),
    ('flatten_swin_b_384', 'flatten_swin_base_patch4_384', 91_433_928),
]
# Swin v1 baselines (Swin paper: 28M / 50M / 88M); the counts are those of the official Swin code.
BASELINES = [
    ('softmax_swin_tiny_patch4_window7_224', 'configs/swin_t.yaml', 28_288_354),
    ('softmax_swin_small_patch4_window7_224', 'configs/swin_s.yaml', 49_606_258),
    ('softmax_swin_base_patch4_window7_224', 'configs/swin_b.yaml', 87_768_224),
    ('softmax_swin_base_patch4_window12_384', 'configs/swin_b_384.yaml', 87_903_584),
]


@pytest.mark.parametrize('inventory, variant, params', OFFICIAL)
def test_state_dict_matches_official_inventory(inventory, variant, params):
    model = models.create_model(variant)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == read_inventory(inventory)
    assert sum(p.numel() for p in model.parameters()) == params


@pytest.mark.parametrize('inventory, variant, params', OFFICIAL)
def test_config_builds_the_same_model(inventory, variant, params):
    cfg = load_config(f'configs/{inventory}.yaml')
    model = models.build_model(cfg)
    assert [(k, tuple(v.shape)) for k, v in model.state_dict().items()] == read_inventory(inventory)


def test_official_checkpoint_with_buffers_loads_strictly():
    """A state dict in the official layout (persistent relative_position_index / attn_mask) loads."""
    model = models.create_model('flatten_swin_tiny_patch4_224')
    fake = {k: torch.zeros(shape) for k, shape in read_inventory('flatten_swin_t')}
    for key in fake:
        if key.endswith('relative_position_index'):
            fake[key] = model.state_dict()[key].clone()
    model.load_state_dict(fake, strict=True)


@pytest.mark.parametrize('name', ['swin_mini_LLSS_w56', 'swin_mini_LLMS2_w7'])
def test_matches_official_golden_model(name):
    golden = load_golden(name)
    model = FLattenSwinTransformer(**golden['kwargs']).eval()
    assert list(model.state_dict()) == list(golden['state_dict'])
    model.load_state_dict(golden['state_dict'], strict=True)
    with torch.no_grad():
        torch.testing.assert_close(model(golden['input']), golden['output'], rtol=0, atol=1e-5)


def test_golden_llms2_layout():
    """M stage: 2 L blocks then S blocks; shifted L blocks keep the (ignored) mask buffer."""
    model = FLattenSwinTransformer(**load_golden('swin_mini_LLMS2_w7')['kwargs'])
    kinds = [type(block.attn).__name__ for block in model.layers[2].blocks]
    assert kinds == ['FocusedLinearAttention'] * 2 + ['WindowAttention'] * 2
    assert model.layers[0].blocks[1].attn_mask.shape == (64, 49, 49)
    assert model.layers[0].blocks[1].shift_size == 3


def test_global_windows_are_clamped_and_unshifted():
    model = models.create_model('flatten_swin_tiny_patch4_224')
    block = model.layers[0].blocks[1]
    assert (block.window_size, block.shift_size, block.attn_mask) == (56, 0, None)
    assert model.layers[1].blocks[1].window_size == 28
    assert (model.layers[2].blocks[1].window_size, model.layers[2].blocks[1].shift_size) == (7, 3)
    assert model.layers[3].blocks[1].attn_mask is None


@pytest.mark.parametrize('variant, config, params', BASELINES)
def test_softmax_baselines(variant, config, params):
    model = models.create_model(variant)
    assert sum(p.numel() for p in model.parameters()) == params
    assert all(type(b.attn).__name__ == 'WindowAttention' for layer in model.layers for b in layer.blocks)
    from_cfg = models.build_model(load_config(config))
    assert [(k, v.shape) for k, v in from_cfg.state_dict().items()] == \
           [(k, v.shape) for k, v in model.state_dict().items()]


def test_swin_type_ignores_la_letters():
    cfg = load_config('configs/swin_t.yaml', ['MODEL.LA.ATTN_TYPE', 'LLLL'])
    model = models.build_model(cfg)
    assert model.attn_type == 'SSSS'


def test_registered_in_timm():
    swin_variants = [name for name in models.list_models() if 'swin' in name and 'cswin' not in name]
    assert len(swin_variants) == 8
    assert set(swin_variants) <= set(timm.list_models('*swin*'))
    model = timm.create_model('flatten_swin_tiny_patch4_224', num_classes=7)
    assert isinstance(model, FLattenSwinTransformer) and model.num_classes == 7
    # timm's own Swin is untouched
    assert 'swin_tiny_patch4_window7_224' in timm.list_models()
    assert not isinstance(timm.create_model('swin_tiny_patch4_window7_224'), FLattenSwinTransformer)


def test_unknown_names_list_known_ones():
    with pytest.raises(UnknownModelError, match='flatten_swin_tiny_patch4_224'):
        models.create_model('flatten_swin_tiny_patch4_244')
    cfg = load_config(None, ['MODEL.TYPE', 'flaten_swin'])
    with pytest.raises(UnknownModelError, match="unknown MODEL.TYPE 'flaten_swin'.*Close matches: flatten_swin"):
        models.build_model(cfg)


def test_pretrained_flag_without_a_file_is_refused_with_advice():
    for create in (models.create_model, timm.create_model):
        with pytest.raises(ValueError, match='pretrained_cfg_overlay=dict.file=PATH.*load_pretrained'):
            create('flatten_swin_tiny_patch4_224', pretrained=True)
    with pytest.raises(ValueError, match='names no download'):
        timm.create_model('flatten_swin_tiny_patch4_224.official_in1k', pretrained=True)


def _micro(**kwargs) -> FLattenSwinTransformer:
    args = dict(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=16,
                softmax_window_size=4, attn_type='LS', num_classes=5, drop_path_rate=0.0)
    args.update(kwargs)
    return FLattenSwinTransformer(**args)


def test_model_interface():
    model = _micro().eval()
    x = torch.randn(2, 3, 32, 32)
    feats = model.forward_features(x)
    assert feats.shape == (2, 64, 32) and model.num_features == 32
    assert model.forward_head(feats, pre_logits=True).shape == (2, 32)
    assert model(x).shape == (2, 5)
    model.reset_classifier(3)
    assert model(x).shape == (2, 3) and model.num_classes == 3
    model.reset_classifier(0)
    assert model(x).shape == (2, 32)
    assert model.no_weight_decay_keywords() == {'relative_position_bias_table'}


def test_every_parameter_learns_and_state_dict_round_trips():
    model = _micro(ape=True)
    model(torch.randn(2, 3, 32, 32)).logsumexp(-1).mean().backward()
    for name, param in model.named_parameters():
        assert param.grad is not None, name
    clone = _micro(ape=True)
    clone.load_state_dict(model.state_dict(), strict=True)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clone.eval()(x), model.eval()(x))


def test_gradient_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = _micro()
    x = torch.randn(2, 3, 32, 32)
    model(x).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing(True)
    model(x).sum().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, grads[name], msg=name)


def test_window_partition_round_trip_and_mask():
    x = torch.randn(2, 8, 8, 3)
    windows = window_partition(x, 4)
    assert windows.shape == (8, 4, 4, 3)
    torch.testing.assert_close(window_reverse(windows, 4, 8, 8), x)
    mask = shifted_window_mask((8, 8), 4, 2)
    assert mask.shape == (4, 16, 16)
    assert (mask[0] == 0).all()  # the top-left window holds one region only
    assert set(mask.unique().tolist()) == {-100.0, 0.0}


@pytest.mark.parametrize('dtype', [torch.float32, torch.float64])
def test_hard_mask_changes_no_result_of_a_shifted_block(dtype):
    """The block adds the shift mask with −inf where the buffer (and the official code) holds −100:
    the output and every gradient are those of the −100 mask, and the buffer itself is unchanged."""
    torch.manual_seed(0)
    model = models.create_model('softmax_swin_tiny_patch4_window7_224', img_size=56, depths=(2,), num_heads=(2,),
                                embed_dim=32, num_classes=4, attn_type='S').to(dtype)
    block = model.layers[0].blocks[1]
    assert block.shift_size > 0 and set(block.attn_mask.unique().tolist()) == {-100.0, 0.0}
    hard = block.shift_mask((14, 14), block.shift_size, torch.device('cpu'))
    assert torch.equal(hard, hard_mask(block.attn_mask)) and set(hard.unique().tolist()) == {float('-inf'), 0.0}
    x = torch.randn(2, 196, 32, dtype=dtype, requires_grad=True)
    results = []
    for mask in (hard, block.attn_mask):
        block.shift_mask = lambda *args, mask=mask: mask
        out = block(x, (14, 14))
        out.square().sum().backward()
        results.append([out.detach()] + [t.grad.clone() for t in (x, *block.parameters())])
        x.grad = None
        block.zero_grad()
    del block.shift_mask
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)
    assert set(block.attn_mask.unique().tolist()) == {-100.0, 0.0}


@pytest.mark.parametrize('kwargs, message', [
    # sizes that do not divide into patches, windows or merges are padded; only too small is an error
    (dict(img_size=3), r'a 3x3 input is too small; every side must be at least 4 pixels'),
    (dict(depths=(2, 2), num_heads=(1,)), 'same length'),
    (dict(attn_type='LLSS'), 'expected 2 stage letters'),
])
def test_bad_geometry_is_reported_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _micro(**kwargs)

