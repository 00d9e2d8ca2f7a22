"""--pretrained: resolution transfer of every grid-shaped parameter, class-count transfer, errors."""
from __future__ import annotations

import math

import pytest
import torch

import models
from models.cswin import CSWinTransformer
from models.deit import FLattenDeiT
from models.grid import GridSpec, collect_parameter_grids
from models.pvt import PyramidVisionTransformer
from models.swin import FLattenSwinTransformer
from utils.checkpoint import CheckpointError, infer_source_grid, load_pretrained, resize_grid_tensor


def smooth(rows: int, cols: int, channels: int = 3) -> torch.Tensor:
    """A smooth function of position sampled at the cell centres of a rows×cols grid over [0, 1]²,
    one phase per channel: (rows·cols, channels), row-major."""
    y = (torch.arange(rows, dtype=torch.float64) + 0.5) / rows
    x = (torch.arange(cols, dtype=torch.float64) + 0.5) / cols
    yy, xx = torch.meshgrid(y, x, indexing='ij')
    phases = torch.arange(channels, dtype=torch.float64)[:, None, None]
    values = torch.sin(2 * math.pi * yy + phases) * torch.cos(math.pi * xx) + 0.5 * xx ** 2
    return values.reshape(channels, -1).T


@pytest.mark.parametrize('small, large', [((14, 14), (24, 24)), ((56, 56), (96, 96)), ((28, 4), (42, 6))])
def test_resize_is_a_true_bicubic_resize_of_the_grid(small, large):
    """A smooth function sampled on the small grid resizes to (nearly) the same function sampled on
    the large grid, for square grids and for CSwin-like stripes; a nearest-neighbour copy (what a
    wrong layout or a 1-D resize would amount to) is several times further off."""
    spec = GridSpec(large)
    pe = smooth(*small).unsqueeze(0)  # (1, h·w, C)
    resized = resize_grid_tensor(pe, spec, small)
    expected = smooth(*large).unsqueeze(0)
    assert resized.shape == expected.shape
    error = (resized - expected).abs()
    image = pe.reshape(1, *small, -1).permute(0, 3, 1, 2)
    nearest = torch.nn.functional.interpolate(image, size=large, mode='nearest').permute(0, 2, 3, 1).reshape(1, -1, 3)
    # the worst cells are at the border, where the small grid's samples end half a cell earlier
    assert error.max() < 0.08 and error.mean() < 0.02, (error.max(), error.mean())
    assert error.mean() < (nearest - expected).abs().mean() / 4


def test_resize_same_size_is_identity_and_keeps_prefix_tokens():
    pe = torch.randn(1, 1 + 49, 8)
    spec = GridSpec((7, 7), prefix_tokens=1)
    assert torch.equal(resize_grid_tensor(pe, spec, (7, 7)), pe)
    larger = resize_grid_tensor(pe, GridSpec((10, 10), prefix_tokens=1), (7, 7))
    assert larger.shape == (1, 101, 8) and torch.equal(larger[:, 0], pe[:, 0])


def test_relative_position_bias_tables_resize_as_images():
    table = smooth(13, 13, channels=4)  # (169, heads)
    resized = resize_grid_tensor(table, GridSpec((23, 23), layout='table'), (13, 13))
    assert resized.shape == (529, 4)
    assert (resized - smooth(23, 23, channels=4)).abs().mean() < 0.02


@pytest.mark.parametrize('length, spec, expected', [
    (3136, GridSpec((96, 96)), (56, 56)),
    (112, GridSpec((42, 6)), (28, 4)),
    (169, GridSpec((23, 23), layout='table'), (13, 13)),
    (13 * 25, GridSpec((13, 25), layout='table'), (13, 25)),
])
def test_source_grid_is_inferred_by_aspect_ratio(length, spec, expected):
    assert infer_source_grid(length, spec, 'key') == expected


def test_source_grid_that_cannot_be_inferred_names_the_key():
    with pytest.raises(CheckpointError, match='layers.0.pe: cannot tell the grid of the checkpoint.s 50 cells'):
        infer_source_grid(50, GridSpec((8, 8)), 'layers.0.pe')


def _save(model, path) -> str:
    torch.save({'model': model.state_dict()}, path)
    return str(path)


def _micro_swin(img_size=32, **kwargs):
    args = dict(img_size=img_size, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(1, 2), attn_type='LS',
                window_size=img_size // 2, softmax_window_size=img_size // 4, num_classes=5, ape=True)
    args.update(kwargs)
    return FLattenSwinTransformer(**args)


def test_every_grid_parameter_of_a_micro_swin_is_resized(tmp_path):
    small = _micro_swin(32)
    large = _micro_swin(48)
    report = load_pretrained(large, _save(small, tmp_path / 'small.pth'))
    grids = collect_parameter_grids(large)
    assert sorted(report.resized) == sorted(grids)  # absolute_pos_embed, positional_encodings, bias tables
    assert report.reinitialized == [] and large.absolute_pos_embed.shape == (1, 576, 16)
    assert torch.equal(large.layers[1].blocks[0].attn.relative_position_index,
                       _micro_swin(48).layers[1].blocks[0].attn.relative_position_index)  # rebuilt, not loaded


def test_pvt_position_embeddings_with_a_class_token(tmp_path):
    arch = dict(embed_dims=(8, 16, 24, 32), num_heads=(1, 1, 1, 1), mlp_ratios=(1, 1, 1, 1), depths=(1, 1, 1, 1),
                attn_type='SSSS', class_token=True, num_classes=3)
    small, large = PyramidVisionTransformer(img_size=64, **arch), PyramidVisionTransformer(img_size=96, **arch)
    report = load_pretrained(large, _save(small, tmp_path / 'pvt.pth'))
    assert set(report.resized) == {'pos_embed1', 'pos_embed2', 'pos_embed3', 'pos_embed4'}
    assert large.pos_embed4.shape == (1, 1 + 9, 32)
    assert torch.equal(large.pos_embed4[:, 0], small.pos_embed4[:, 0])  # the class-token slot is kept


def test_flatten_pvt_with_spatial_reduction(tmp_path):
    arch = dict(embed_dims=(8, 16, 24, 32), num_heads=(1, 1, 1, 1), mlp_ratios=(1, 1, 1, 1), depths=(1, 1, 1, 1),
                la_sr_ratios='2111', num_classes=3)
    small, large = PyramidVisionTransformer(img_size=64, **arch), PyramidVisionTransformer(img_size=128, **arch)
    load_pretrained(large, _save(small, tmp_path / 'pvt.pth'))
    assert large.block1[0].attn.positional_encoding.shape == (1, 16 * 16, 8)  # (32/2)² reduced key grid


def test_deit_position_embedding_and_focused_encodings(tmp_path):
    arch = dict(patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=4)
    for attn_type in ('S', 'L'):
        small, large = (FLattenDeiT(img_size=s, attn_type=attn_type, **arch) for s in (32, 48))
        report = load_pretrained(large, _save(small, tmp_path / f'deit_{attn_type}.pth'))
        assert sorted(report.resized) == sorted(collect_parameter_grids(large)) and report.resized


def test_cswin_stripe_encodings_resize_as_non_square_grids(tmp_path):
    arch = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(2, 2, 4, 8), split_size=(1, 2, 2, 2),
                attn_type='LLSS', num_classes=3)
    small = CSWinTransformer(img_size=64, la_split_size='4-8-4-2', **arch)  # stage 1: 16x16 map, 16x4 stripes
    large = CSWinTransformer(img_size=96, la_split_size='6-12-6-3', **arch)  # 24x24 map, 24x6 stripes
    report = load_pretrained(large, _save(small, tmp_path / 'cswin.pth'))
    stripe = large.stage1[0].attns[0].positional_encoding
    assert stripe.shape == (1, 24 * 6, 8) and 'stage1.0.attns.0.positional_encoding' in report.resized
    assert large.stage1[0].attns[1].positional_encoding.shape == (1, 6 * 24, 8)


def test_width_mismatch_is_an_error_not_a_resize(tmp_path):
    path = _save(_micro_swin(32, embed_dim=32), tmp_path / 'wide.pth')
    message = r'mismatched absolute_pos_embed: checkpoint \[1, 256, 32\] vs model \[1, 576, 16\]'
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(_micro_swin(48), path)


@pytest.mark.slow
@pytest.mark.parametrize('small_name, large_name, expected', [
    # docs/checkpoints.md, "Pretrained weights (load_pretrained)": FLatten-Swin-B 224 → 384
    ('flatten_swin_base_patch4_224', 'flatten_swin_base_patch4_384', {
        'layers.0.blocks.0.attn.positional_encoding': ((1, 3136, 128), (1, 9216, 128)),
        'layers.1.blocks.1.attn.positional_encoding': ((1, 784, 256), (1, 2304, 256)),
        'layers.2.blocks.0.attn.relative_position_bias_table': ((169, 16), (529, 16)),
        'layers.3.blocks.1.attn.relative_position_bias_table': ((169, 32), (529, 32))}),
    # docs/checkpoints.md, "Pretrained weights (load_pretrained)": FLatten-CSwin-B 224 → 384
    ('flatten_cswin_base_224', 'flatten_cswin_base_384', {
        'stage1.0.attns.0.positional_encoding': ((1, 3136, 96), (1, 9216, 96)),
        'stage2.5.attns.0.positional_encoding': ((1, 784, 192), (1, 2304, 192))}),
])
def test_official_224_to_384_transfers(tmp_path, small_name, large_name, expected):
    small = models.create_model(small_name)
    # a smooth function on the stage-1 grid of the first block: it must arrive as the same function
    first = next(iter(expected))
    with torch.no_grad():
        small.state_dict()[first].copy_(smooth(56, 56, channels=small.state_dict()[first].shape[-1]).unsqueeze(0))
    path = _save(small, tmp_path / 'small.pth')
    large = models.create_model(large_name)
    report = load_pretrained(large, path)
    counts = {'flatten_swin_base_patch4_384': 4 + 20, 'flatten_cswin_base_384': 9}
    assert len(report.resized) == counts[large_name] and report.dropped == [] and report.reinitialized == []
    own = large.state_dict()
    for key, (before, after) in expected.items():
        assert tuple(small.state_dict()[key].shape) == before and tuple(own[key].shape) == after
    assert (own[first][0] - smooth(96, 96, channels=own[first].shape[-1])).abs().max() < 0.02
    for key, value in small.state_dict().items():
        if key not in report.resized and 'relative_position_index' not in key and 'attn_mask' not in key:
            assert torch.equal(own[key], value), key
