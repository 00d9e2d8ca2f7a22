"""The timm model interface of every registered model, at a size that is neither the build size nor
square: forward_features, forward_head, features_only / feature_info, forward_intermediates,
prune_intermediate_layers, gradient checkpointing, gradients with a new head, and tracing by
torchvision's create_feature_extractor (torch.fx).

The sweep over all registered models is `slow` (full-size models); one micro model per family runs
the same checks in the fast suite.
"""
from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn as nn
from torchvision.models.feature_extraction import create_feature_extractor, get_graph_node_names

import models
from models.cswin import CSWinTransformer
from models.deit import FLattenDeiT
from models.layers import Backbone
from models.pvt import PyramidVisionTransformer
from models.pvt_v2 import PyramidVisionTransformerV2
from models.swin import FLattenSwinTransformer

SIZE = (96, 64)  # not a build size, not square
_PVT = dict(embed_dims=(16, 32, 40, 64), num_heads=(1, 2, 5, 8), mlp_ratios=(2, 2, 2, 2), depths=(1, 2, 1, 1))
MICRO = {
    'swin': lambda **kw: FLattenSwinTransformer(
        img_size=64, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 2, 4), window_size=16, attn_type='LLSS',
        **kw),
    'cswin': lambda **kw: CSWinTransformer(
        img_size=64, embed_dim=16, depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 8), split_size=(1, 2, 2, 2), **kw),
    'pvt': lambda **kw: PyramidVisionTransformer(img_size=64, **_PVT, **kw),
    'pvt_class_token': lambda **kw: PyramidVisionTransformer(
        img_size=64, **_PVT, attn_type='SSSS', sr_ratios=(8, 4, 2, 1), class_token=True, **kw),
    'pvt_v2': lambda **kw: PyramidVisionTransformerV2(img_size=64, **_PVT, **kw),
    'deit': lambda **kw: FLattenDeiT(img_size=32, patch_size=8, embed_dim=24, depth=4, num_heads=3, **kw),
    'deit_softmax': lambda **kw: FLattenDeiT(img_size=32, patch_size=8, embed_dim=24, depth=4, num_heads=3,
                                             attn_type='S', **kw),
}


def _images(batch: int = 2) -> torch.Tensor:
    return torch.randn(batch, 3, *SIZE, generator=torch.Generator().manual_seed(0))


def check_features(model: Backbone) -> None:
    """forward_features, feature_info and forward_intermediates agree, at SIZE."""
    model.eval()
    x = _images()
    with torch.no_grad():
        tokens = model.forward_features(x)
        final, intermediates = model.forward_intermediates(x)
    assert tokens.shape[-1] == model.num_features
    assert torch.equal(final, tokens)
    hierarchical = not isinstance(model, FLattenDeiT)
    assert len(model.feature_info) == 4 if hierarchical else len(model.feature_info) >= 3
    for info, feature in zip(model.feature_info, intermediates, strict=True):
        grid = tuple(math.ceil(side / info['reduction']) for side in SIZE)
        assert feature.shape == (2, info['num_chs'], *grid), info
        assert model.get_submodule(info['module']) is not None
    # the last level is the final tokens as a map, before the final norm (timm: norm=True applies it)
    with torch.no_grad():
        normed = model.forward_intermediates(x, indices=1, norm=True, intermediates_only=True)[0]
    spatial = tokens[:, tokens.shape[1] - normed.shape[2] * normed.shape[3]:]
    torch.testing.assert_close(normed, spatial.transpose(1, 2).reshape(normed.shape), rtol=0, atol=0)


def check_gradients(model: Backbone, compare_without_checkpointing: bool = True) -> None:
    """With a new 42-class head, every trainable parameter gets a gradient, with gradient
    checkpointing on; checkpointing leaves the output (and, compared, the gradients) unchanged."""
    model.reset_classifier(42)
    model.eval()  # no dropout / stochastic depth: runs must agree exactly
    for name, param in model.named_parameters():  # PVT v1's unused final norm: frozen, not dropped
        param.requires_grad_(name not in model.unused_parameters())
    x = _images()
    if compare_without_checkpointing:
        plain = model(x)
        plain.square().mean().backward()
        grads = {name: p.grad.clone() for name, p in model.named_parameters() if p.requires_grad}
        model.zero_grad(set_to_none=True)
    else:
        with torch.no_grad():
            plain = model(x)
    model.set_grad_checkpointing(True)
    out = model(x)
    out.square().mean().backward()
    model.set_grad_checkpointing(False)
    assert out.shape == (2, 42)
    torch.testing.assert_close(out, plain, rtol=1e-6, atol=1e-6)
    missing = [name for name, p in model.named_parameters() if p.requires_grad and (p.grad is None)]
    assert not missing, missing
    if compare_without_checkpointing:
        for name, param in model.named_parameters():
            if param.requires_grad:
                torch.testing.assert_close(param.grad, grads[name], rtol=1e-4, atol=1e-6, msg=name)


def check_pruning(model: Backbone) -> None:
    """prune_intermediate_layers keeps the features of the levels asked for and drops the rest."""
    model.eval()
    x = _images()
    with torch.no_grad():
        before = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        kept = model.prune_intermediate_layers([0, 1])
        after = model.forward_intermediates(x, indices=kept, intermediates_only=True)
    assert kept == [0, 1] and len(model.feature_info) == 2
    assert model.num_features == model.feature_info[-1]['num_chs']
    assert isinstance(model.get_classifier(), nn.Identity)
    for a, b in zip(before, after, strict=True):
        assert torch.equal(a, b)


def check_fx_trace(model: Backbone) -> None:
    """torchvision's create_feature_extractor (torch.fx) traces the model, and the traced module
    gives the model's outputs, at the traced size and at others (size-dependent code is a leaf)."""
    model.eval()
    _, nodes = get_graph_node_names(model)
    level = model.feature_info[-1]['module']
    traced = create_feature_extractor(model, return_nodes={nodes[-1]: 'logits', level: 'level'})
    for size in (SIZE, (64, 96), (72, 70)):
        x = torch.randn(1, 3, *size)
        with torch.no_grad():
            out = traced(x)
            assert torch.equal(out['logits'], model(x))
            tokens = model.forward_intermediates(x, indices=[-1], output_fmt='NLC', intermediates_only=True)[0]
        assert torch.equal(out['level'][:, out['level'].shape[1] - tokens.shape[1]:], tokens)


@pytest.mark.parametrize('name', list(MICRO))
def test_micro_models_follow_the_timm_interface(name):
    torch.manual_seed(0)
    check_features(MICRO[name](num_classes=5))
    check_gradients(MICRO[name](num_classes=5))
    check_pruning(MICRO[name](num_classes=5))
    check_fx_trace(MICRO[name](num_classes=5))


def test_reset_classifier_keeps_the_pooling():
    model = MICRO['deit_softmax']()
    model.reset_classifier(3, global_pool='token')
    assert model.head.out_features == 3
    with pytest.raises(ValueError, match=r"pools with 'token'.*global_pool='avg'"):
        model.reset_classifier(3, global_pool='avg')


def test_forward_intermediates_rejects_unknown_formats_and_indices():
    model = MICRO['swin']().eval()
    with pytest.raises(ValueError, match=r"output_fmt='NHWC' is not one of \('NCHW', 'NLC'\)"):
        model.forward_intermediates(_images(), output_fmt='NHWC')
    with torch.no_grad():
        tokens = model.forward_intermediates(_images(), indices=[-1], output_fmt='NLC', intermediates_only=True)[0]
    assert tokens.shape == (2, 3 * 2, model.num_features)
    with pytest.raises(AssertionError):  # timm's own check of the indices
        model.forward_intermediates(_images(), indices=[7])


FAST = ['flatten_pvt_v2_b0', 'softmax_pvt_v2_b0', 'flatten_deit_tiny_patch16_224']


def check_features_only(name: str) -> None:
    """timm's features_only wrapper over the registered model `name`, at SIZE."""
    features = timm.create_model(name, features_only=True)
    assert features.pretrained_cfg['input_size'][0] == 3 and not features.pretrained_cfg['fixed_input_size']
    with torch.no_grad():
        maps = features.eval()(_images(1))
    assert len(maps) >= 3 and len(maps) == len(features.feature_info.channels())
    for feature, channels, reduction in zip(maps, features.feature_info.channels(), features.feature_info.reduction(),
                                            strict=True):
        assert feature.shape == (1, channels, *(math.ceil(side / reduction) for side in SIZE))


@pytest.mark.parametrize('name', FAST)
def test_timm_create_model_features_only(name):
    check_features_only(name)


@pytest.mark.slow
@pytest.mark.parametrize('name', models.list_models())
def test_registered_model_follows_the_timm_interface(name):
    """Every registered model: features, features_only, gradients under checkpointing, fx tracing."""
    torch.manual_seed(0)
    model = models.create_model(name)
    check_features(model)
    check_fx_trace(model)
    check_gradients(model, compare_without_checkpointing=False)
    check_features_only(name)


def test_every_variant_has_a_registered_pretrained_cfg_and_head_hidden_size():
    """timm's registry knows every variant's pretrained cfg by name (the authors' released variants also under
    '.official_in1k'), and every model exposes timm 1.0's head_hidden_size (built without weight initialisation:
    1.4 s for all)."""
    from timm.models import get_pretrained_cfg

    from models.registry import OFFICIAL_IN1K
    from tools.model_table import skip_weight_init
    assert OFFICIAL_IN1K <= set(models.list_models())
    for name in models.list_models():
        cfg = get_pretrained_cfg(name)
        assert cfg is not None and cfg.architecture == name, name
        assert (cfg.tag == 'official_in1k') == (name in OFFICIAL_IN1K), name
        size = models.registry.variant_spec(name).arch.get('img_size', 224)
        assert cfg.input_size == (3, size, size) and not cfg.fixed_input_size and cfg.num_classes == 1000, name
        assert not cfg.has_weights  # no download is named: pretrained=True reads a file the caller gives
        if name in OFFICIAL_IN1K:
            assert get_pretrained_cfg(f'{name}.official_in1k') == cfg
            assert 'LeapLabTHU/FLatten-Transformer' in cfg.origin_url
        with skip_weight_init():
            model = timm.create_model(name)
        assert model.head_hidden_size == model.num_features == model.head.in_features, name
    assert timm.create_model('flatten_pvt_v2_b0.official_in1k').pretrained_cfg['tag'] == 'official_in1k'


def test_pretrained_true_loads_the_file_the_cfg_names(tmp_path):
    """As for timm's own models: pretrained=True with pretrained_cfg_overlay=dict(file=...) loads that file."""
    from safetensors.torch import save_file
    kwargs = dict(img_size=32, embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1), window_size=8,
                  num_classes=10)
    torch.manual_seed(0)
    model = timm.create_model('flatten_swin_tiny_patch4_224', **kwargs).eval()
    path = tmp_path / 'model.safetensors'
    save_file({key: value.contiguous() for key, value in model.state_dict().items()}, str(path))
    torch.manual_seed(1)
    loaded = timm.create_model('flatten_swin_tiny_patch4_224', pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(path)), **kwargs).eval()
    images = torch.randn(2, 3, 32, 40)
    with torch.no_grad():
        assert torch.equal(loaded(images), model(images))


# registered variants, reduced: set_input_size rebuilds through the constructor arguments create_model records
RESIZABLE = {
    'flatten_deit_tiny_patch16_224': dict(depth=2),
    'flatten_pvt_tiny': dict(depths=(1, 1, 1, 1)),
    'flatten_pvt_v2_b0': dict(depths=(1, 1, 1, 1)),
    'flatten_swin_tiny_patch4_224': dict(depths=(2, 2, 2, 2), embed_dim=16, num_heads=(1, 1, 2, 2)),
    'flatten_cswin_tiny_224': dict(depths=(1, 1, 2, 1), embed_dim=16, num_heads=(2, 2, 2, 2)),
}


def _resizable(name: str, **kwargs) -> Backbone:
    torch.manual_seed(0)
    return models.create_model(name, **RESIZABLE[name], **kwargs).eval()


@pytest.mark.parametrize('name', sorted(RESIZABLE))
def test_set_input_size_equals_pretrained_loading_into_a_model_built_at_that_size(name, tmp_path):
    from utils.checkpoint import load_pretrained
    model = _resizable(name)
    path = tmp_path / 'weights.pth'
    torch.save({'model': model.state_dict()}, path)
    x = torch.randn(2, 3, 288, 256, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = model(x)
    model.set_input_size((288, 256))
    assert model.img_size == (288, 256) and model.build_args['img_size'] == (288, 256)
    assert timm.models._input.get_model_input_config(model)['input_size'] == (3, 288, 256)
    assert model.pretrained_cfg['input_size'] == (3, 224, 224)  # it still describes the source weights
    built = models.create_model(name, **model.build_args).eval()  # built at 288x256 (Swin: scaled windows)
    load_pretrained(built, str(path))
    assert {k: v.shape for k, v in built.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}
    with torch.no_grad():
        after, rebuilt = model(x), built(x)
    torch.testing.assert_close(after, rebuilt, rtol=0, atol=0)
    if 'swin' not in name:  # the same windows and stripes: what the model computed at that size before
        torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-5)


def test_swin_set_input_size_scales_the_windows_like_timm_and_keeps_switches():
    from models.attention import set_fused_attention
    model = _resizable('flatten_swin_tiny_patch4_224')
    set_fused_attention(model, False)
    model.set_grad_checkpointing(True)
    model.train()
    rng = torch.get_rng_state()
    model.set_input_size(384)  # 224² -> 384²: the windows of the official 384² models, (96, 12)
    assert torch.equal(torch.get_rng_state(), rng)  # a seeded script draws the same numbers afterwards
    official = models.create_model('flatten_swin_tiny_patch4_224', **RESIZABLE['flatten_swin_tiny_patch4_224'],
                                   img_size=384, window_size=96, softmax_window_size=12)
    assert {k: v.shape for k, v in model.state_dict().items()} == {k: v.shape for k, v in official.state_dict().items()}
    assert model.training and all(layer.grad_checkpointing for layer in model.layers)
    assert not any(module.fused for module in model.modules() if hasattr(module, 'fused'))
    # with the S window kept at 7 (an explicit argument), the model computes what it computed at 384² before
    kept = _resizable('flatten_swin_tiny_patch4_224')
    x = torch.randn(1, 3, 384, 384, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        before = kept(x)
        kept.set_input_size(384, softmax_window_size=7)
        torch.testing.assert_close(kept(x), before, rtol=1e-5, atol=1e-5)


def test_set_input_size_errors_name_the_problem():
    model = _resizable('flatten_pvt_v2_b0')
    with pytest.raises(ValueError, match='too small'):
        model.set_input_size(16)
    with pytest.raises(ValueError, match='built from the class directly'):
        MICRO['deit']().set_input_size(64)
    model.prune_intermediate_layers(indices=(0, 1))
    with pytest.raises(ValueError, match='pruned'):
        model.set_input_size(256)
