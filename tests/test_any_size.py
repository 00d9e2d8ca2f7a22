"""Every backbone runs at input sizes other than the one it was built for (docs/numerics.md, "Any input size").

A model built at size s₀ and run at size s must equal the model built for s and loaded through
``load_pretrained`` from the s₀ weights: both resize every position-dependent parameter with the
same bicubic rule, the first on the fly (cached per size), the second once, on loading. Three sizes
per family, square, non-square and one that needs padding (a partial patch, an odd map before a
merge, a map that windows or stripes do not divide).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Dict, List, Tuple

import pytest
import torch
import torch.nn as nn

from models.attention import Attention
from models.cswin import CSWinTransformer
from models.deit import FLattenDeiT
from models.grid import GridSpec, _resize_cache, resize_grid_tensor, resized_parameter
from models.pvt import PyramidVisionTransformer
from models.pvt_v2 import PyramidVisionTransformerV2
from models.swin import FLattenSwinTransformer
from utils.checkpoint import load_pretrained

Size = Tuple[int, int]

_SWIN = dict(patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=16, softmax_window_size=4,
             attn_type='LS', num_classes=5, drop_path_rate=0.0)
_CSWIN = dict(embed_dim=16, depths=(1, 1, 2, 1), num_heads=(2, 2, 4, 8), split_size=(1, 2, 2, 2), num_classes=5)
_PVT = dict(embed_dims=(16, 32, 40, 64), num_heads=(1, 2, 5, 8), mlp_ratios=(2, 2, 2, 2), depths=(1, 2, 1, 1),
            num_classes=5)
_DEIT = dict(patch_size=8, embed_dim=24, depth=2, num_heads=3, num_classes=5, drop_path_rate=0.0)

# name: (class, build size, constructor arguments, extra arguments of the model built at another size); square
# build sizes, as every released checkpoint (load_pretrained infers a square source grid)
FAMILIES: Dict[str, Tuple[Callable[..., nn.Module], Size, dict, dict]] = {
    # the model built at another size keeps its L blocks global by a window larger than any map
    'swin': (FLattenSwinTransformer, (32, 32), _SWIN, dict(window_size=10 ** 3)),
    'swin_ape': (FLattenSwinTransformer, (32, 32), dict(_SWIN, ape=True), dict(window_size=10 ** 3)),
    'swin_softmax': (FLattenSwinTransformer, (32, 32), dict(_SWIN, attn_type='SS'), {}),
    'cswin': (CSWinTransformer, (64, 64), _CSWIN, {}),
    'pvt': (PyramidVisionTransformer, (64, 64), _PVT, {}),
    'pvt_softmax': (PyramidVisionTransformer, (64, 64),
                    dict(_PVT, attn_type='SSSS', sr_ratios=(8, 4, 2, 1), class_token=True), {}),
    'pvt_v2': (PyramidVisionTransformerV2, (64, 64), _PVT, {}),
    'pvt_v2_linear': (PyramidVisionTransformerV2, (64, 64), dict(_PVT, linear=True), {}),
    'deit': (FLattenDeiT, (40, 40), dict(_DEIT, attn_type='L'), {}),
    'deit_softmax': (FLattenDeiT, (40, 40), dict(_DEIT, attn_type='S'), {}),
}
# per family: square, non-square, and one that needs padding
SIZES: Dict[type, List[Size]] = {
    FLattenSwinTransformer: [(48, 48), (40, 56), (36, 50)],  # 36x50: 18x25 map, odd before the merge, 9x13 not
    # in 4-windows
    CSWinTransformer: [(96, 96), (64, 96), (80, 112)],  # 80x112: stage-3 map 5x7 not in 2-wide stripes
    PyramidVisionTransformer: [(96, 96), (64, 128), (72, 100)],  # 72x100: a partial 2x2 patch at stage 2
    PyramidVisionTransformerV2: [(96, 96), (64, 128), (72, 100)],  # overlapping convolutions: any size
    FLattenDeiT: [(64, 64), (32, 48), (50, 37)],  # 50x37: partial 8x8 patches
}
CASES = [(name, size) for name, (cls, *_) in FAMILIES.items() for size in SIZES[cls]]


def _randomised(model: nn.Module, seed: int = 0) -> nn.Module:
    """Every parameter drawn at random (positional encodings start at zero, so a wrong resize of
    them would not show), the model in eval mode."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.copy_(0.3 * torch.randn(param.shape, generator=generator))
    return model.eval()


def _build(name: str, size: Size = None) -> nn.Module:
    cls, build_size, kwargs, elsewhere = FAMILIES[name]
    torch.manual_seed(0)
    if size is None:
        return cls(img_size=build_size, **kwargs)
    return cls(img_size=size, **{**kwargs, **elsewhere})


@pytest.mark.parametrize('name, size', CASES, ids=[f'{n}-{h}x{w}' for n, (h, w) in CASES])
def test_running_at_another_size_equals_the_model_built_for_it(name, size, tmp_path):
    model = _randomised(_build(name))
    path = tmp_path / 'weights.pth'
    torch.save({'model': model.state_dict()}, path)
    rebuilt = _build(name, size).eval()
    report = load_pretrained(rebuilt, str(path))
    x = torch.randn(2, 3, *size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        out, expected = model(x), rebuilt(x)
    assert out.shape == (2, 5)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    # every parameter whose shape depends on the size went through the resize rule
    own, built = model.state_dict(), rebuilt.state_dict()
    assert set(report.resized) == {key for key, value in built.items()
                                   if (value.shape != own[key].shape) and not key.endswith('attn_mask')}


@pytest.mark.parametrize('name', list(FAMILIES))
def test_build_size_runs_the_parameters_themselves(name):
    """At the build size nothing is resized or cached: the parameters are used as they are."""
    model = _randomised(_build(name))
    with torch.no_grad():
        model(torch.randn(1, 3, *FAMILIES[name][1]))
    assert not any(_resize_cache(param) for param in model.parameters())


def test_resized_parameters_are_cached_per_size_and_follow_updates():
    module = _randomised(_build('deit')).blocks[0].attn
    spec, param = GridSpec(module.key_grid), module.positional_encoding
    with torch.no_grad():
        first = resized_parameter(param, spec, (8, 5))
        assert resized_parameter(param, spec, (8, 5)) is first
        other = resized_parameter(param, spec, (4, 4))
        assert other.shape == (1, 16, module.dim)
        param.add_(1.0)  # an optimizer step changes the parameter in place
        updated = resized_parameter(param, spec, (8, 5))
    assert updated is not first
    torch.testing.assert_close(updated, first + 1.0)  # bicubic weights sum to one


@pytest.mark.parametrize('impl', ['fused', 'foreach'])
def test_an_optimizer_step_between_evaluations_refreshes_the_resized_tables(impl):
    """torch's fused AdamW (the default here) updates parameters without bumping their version counter:
    an evaluation after more training must not reuse the tables resized for the previous one."""
    module = _randomised(_build('deit')).blocks[0].attn
    spec, param = GridSpec(module.key_grid), module.positional_encoding
    with torch.no_grad():
        before = resized_parameter(param, spec, (8, 5)).clone()
    version = param._version
    optimizer = torch.optim.AdamW([param], lr=0.1, **{impl: True})
    param.grad = torch.ones_like(param)
    optimizer.step()
    if impl == 'fused':
        assert param._version == version  # why the cache compares values
    with torch.no_grad():
        after = resized_parameter(param, spec, (8, 5))
    assert not torch.equal(after, before)
    torch.testing.assert_close(after, resize_grid_tensor(param.detach(), dataclasses.replace(spec, grid=(8, 5)),
                                                         spec.grid), rtol=0, atol=0)


@pytest.mark.parametrize('name', ['swin', 'cswin', 'pvt', 'pvt_v2', 'deit'])
def test_training_at_another_size_reaches_every_positional_encoding(name):
    model = _randomised(_build(name)).train()
    size = SIZES[FAMILIES[name][0]][2]
    model(torch.randn(2, 3, *size)).square().mean().backward()
    encodings = {n: m.positional_encoding for n, m in model.named_modules()
                 if isinstance(m, Attention) and m.uses_positional_encoding}
    assert encodings
    for module_name, param in encodings.items():
        assert (param.grad is not None) and (param.grad.abs().sum() > 0), module_name


def test_swin_global_blocks_follow_the_map_unless_fixed():
    model = _randomised(_build('swin'))
    fixed = _randomised(FLattenSwinTransformer(img_size=32, **_SWIN, fixed_window=True))
    block, fixed_block = model.layers[0].blocks[0], fixed.layers[0].blocks[0]
    assert block.global_attention and not fixed_block.global_attention
    assert block.window_for((24, 20)) == ((24, 20), 0)
    assert fixed_block.window_for((24, 20)) == ((16, 16), 0) and fixed.layers[0].blocks[1].window_for((24, 20))[1] == 8
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(model(x), fixed(x))  # the same model at the build size
        bigger = torch.randn(1, 3, 48, 40)
        assert not torch.allclose(model(bigger), fixed(bigger))


def test_window_softmax_refuses_another_window():
    block = _build('swin_softmax').layers[0].blocks[0]
    with pytest.raises(ValueError, match='learned for the 4x4 window, got a 6x6 one'):
        block.attn(torch.randn(1, 36, 16), grid=(6, 6))
