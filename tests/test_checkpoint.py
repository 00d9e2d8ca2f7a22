"""Checkpoints: atomic writes, round trips, RNG state, clear errors, pretrained adaptation."""
from __future__ import annotations

import os
import random

import numpy as np
import pytest
import torch
from yacs.config import CfgNode

import models
from config import config_from_yaml_text, config_to_yaml, load_config
from models.swin import FLattenSwinTransformer
from utils.checkpoint import (
    CheckpointError,
    atomic_save,
    find_latest_checkpoint,
    load_checkpoint,
    load_model_weights,
    load_pretrained,
    rng_state,
    save_checkpoint,
    set_rng_state,
    torch_load,
)


def _micro(**kwargs):
    args = dict(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=16,
                softmax_window_size=4, attn_type='LS', num_classes=5)
    args.update(kwargs)
    return FLattenSwinTransformer(**args)


def test_atomic_save_leaves_no_temp_files(tmp_path):
    path = tmp_path / 'x.pth'
    atomic_save({'a': torch.ones(3)}, str(path))
    atomic_save({'a': torch.zeros(3)}, str(path))
    assert os.listdir(tmp_path) == ['x.pth']
    assert torch.equal(torch_load(str(path))['a'], torch.zeros(3))


def test_failed_save_keeps_the_previous_file(tmp_path):
    path = tmp_path / 'x.pth'
    atomic_save({'a': torch.ones(3)}, str(path))

    class Unpicklable:
        def __reduce__(self):
            raise RuntimeError('boom')

    with pytest.raises(RuntimeError, match='boom'):
        atomic_save({'a': Unpicklable()}, str(path))
    assert os.listdir(tmp_path) == ['x.pth']
    assert torch.equal(torch_load(str(path))['a'], torch.ones(3))


def test_training_checkpoint_round_trip(tmp_path):
    torch.manual_seed(0)
    model = _micro()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    cfg = load_config(None)
    path = str(tmp_path / 'ckpt_epoch_3.pth')
    save_checkpoint(path, model=model, epoch=4, max_accuracy=55.5, config_yaml=config_to_yaml(cfg), optimizer=opt)
    raw = torch_load(path)
    assert {'model', 'optimizer', 'lr_scheduler', 'max_accuracy', 'epoch', 'config', 'rng'} <= set(raw)
    assert isinstance(raw['config'], str) and config_from_yaml_text(raw['config']) == cfg

    clone = _micro()
    opt2 = torch.optim.AdamW(clone.parameters(), lr=1e-3)
    info = load_checkpoint(path, clone, opt2)
    assert info == {'epoch': 4, 'step': 0, 'max_accuracy': 55.5, 'max_accuracy_ema': 0.0}
    for (k, a), b in zip(model.state_dict().items(), clone.state_dict().values(), strict=True):
        assert torch.equal(a, b), k
    assert opt2.state_dict()['state'][0]['step'] == opt.state_dict()['state'][0]['step']


def test_rng_state_round_trip():
    state = rng_state()
    expected = (torch.rand(3), np.random.rand(3), random.random())
    set_rng_state(state)
    assert torch.equal(torch.rand(3), expected[0])
    assert np.array_equal(np.random.rand(3), expected[1]) and random.random() == expected[2]


def test_auto_resume_picks_the_highest_epoch_not_the_newest_file(tmp_path):
    for epoch in (9, 10, 2):
        atomic_save({}, str(tmp_path / f'ckpt_epoch_{epoch}.pth'))
    atomic_save({}, str(tmp_path / 'max_acc.pth'))
    assert find_latest_checkpoint(str(tmp_path)) == str(tmp_path / 'ckpt_epoch_10.pth')
    assert find_latest_checkpoint(str(tmp_path / 'missing')) is None


def test_official_layout_with_pickled_cfgnode_loads(tmp_path):
    model = _micro()
    cfg = CfgNode({'MODEL': CfgNode({'TYPE': 'flatten_swin'})})
    path = str(tmp_path / 'official.pth')
    torch.save({'model': model.state_dict(), 'optimizer': None, 'max_accuracy': 81.2, 'epoch': 300,
                'config': cfg}, path)
    info = load_checkpoint(path, _micro())
    assert info['max_accuracy'] == 81.2


def test_bad_files_raise_checkpoint_errors_naming_the_file(tmp_path):
    text = tmp_path / 'notes.txt'
    text.write_text('not a checkpoint')
    with pytest.raises(CheckpointError, match='notes.txt'):
        torch_load(str(text))
    good = tmp_path / 'good.pth'
    torch.save({'model': _micro().state_dict()}, good)
    truncated = tmp_path / 'truncated.pth'
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(CheckpointError, match='truncated.pth'):
        load_checkpoint(str(truncated), _micro())
    with pytest.raises(CheckpointError, match='does not exist'):
        torch_load(str(tmp_path / 'missing.pth'))


def test_architecture_mismatch_lists_keys_and_shapes(tmp_path):
    path = tmp_path / 'other.pth'
    torch.save({'model': _micro(embed_dim=32).state_dict()}, path)
    with pytest.raises(CheckpointError) as info:
        load_checkpoint(str(path), _micro())
    message = str(info.value)
    assert 'other.pth' in message
    assert 'mismatched patch_embed.proj.weight: checkpoint [32, 3, 2, 2] vs model [16, 3, 2, 2]' in message


def test_ddp_prefix_is_stripped():
    model = _micro()
    prefixed = {f'module.{k}': v for k, v in model.state_dict().items()}
    load_model_weights(_micro(), prefixed, 'ddp.pth')


def test_pretrained_resizes_positional_encoding_and_bias_tables(tmp_path):
    """224→384-style transfer on a micro model: 32² (16² L grid) → 48² (24² L grid, S window 6)."""
    small = _micro()
    path = tmp_path / 'small.pth'
    torch.save({'model': small.state_dict()}, path)
    large = _micro(img_size=48, window_size=24, softmax_window_size=6, num_classes=5)
    report = load_pretrained(large, str(path))
    resized = set(report.resized)
    assert 'layers.0.blocks.0.attn.positional_encoding' in resized
    assert 'layers.1.blocks.0.attn.relative_position_bias_table' in resized
    assert large.layers[0].blocks[0].attn.positional_encoding.shape == (1, 576, 16)
    assert large.layers[1].blocks[0].attn.relative_position_bias_table.shape == (121, 2)
    assert torch.equal(large.layers[0].blocks[0].attn.qkv.weight, small.layers[0].blocks[0].attn.qkv.weight)
    assert report.reinitialized == []


def test_pretrained_with_other_class_count_reinitialises_the_head(tmp_path):
    path = tmp_path / 'imagenet.pth'
    torch.save({'model': _micro(num_classes=1000).state_dict()}, path)
    model = _micro(num_classes=10)
    report = load_pretrained(model, str(path))
    assert report.reinitialized == ['head'] and model.head.weight.shape == (10, 32)


def test_registered_model_checkpoint_in_official_layout_loads(tmp_path):
    model = models.create_model('flatten_swin_tiny_patch4_224')
    path = tmp_path / 'flatten_swin_t.pth'
    torch.save({'model': model.state_dict()}, path)
    load_checkpoint(str(path), models.create_model('flatten_swin_tiny_patch4_224'))


def test_periodic_checkpoints_are_ordered_by_recorded_progress(tmp_path):
    from utils.checkpoint import periodic_checkpoint_name, periodic_checkpoints, prune_checkpoints
    names = [periodic_checkpoint_name(1, 100), periodic_checkpoint_name(0), periodic_checkpoint_name(1),
             periodic_checkpoint_name(1, 20), periodic_checkpoint_name(10, 5)]
    for name in reversed(names):  # written in another order than the progress they record
        atomic_save({}, str(tmp_path / name))
    order = [os.path.basename(p) for _, p in periodic_checkpoints(str(tmp_path))]
    assert order == ['ckpt_epoch_0.pth', 'ckpt_epoch_1_step_20.pth', 'ckpt_epoch_1_step_100.pth',
                     'ckpt_epoch_1.pth', 'ckpt_epoch_10_step_5.pth']
    prune_checkpoints(str(tmp_path), keep=2)
    assert sorted(os.listdir(tmp_path)) == ['ckpt_epoch_1.pth', 'ckpt_epoch_10_step_5.pth']


def test_latest_valid_checkpoint_skips_unreadable_files(tmp_path, caplog):
    from utils.checkpoint import latest_valid_checkpoint, remove_partial_writes
    model = _micro()
    save_checkpoint(str(tmp_path / 'ckpt_epoch_0.pth'), model=model, epoch=1, max_accuracy=1.0, config_yaml='')
    (tmp_path / 'ckpt_epoch_1.pth').write_bytes(b'garbage')
    (tmp_path / '.ckpt_epoch_2.pth.abc123.tmp').write_bytes(b'half a file')
    path, ckpt = latest_valid_checkpoint(str(tmp_path))
    assert path == str(tmp_path / 'ckpt_epoch_0.pth') and ckpt['epoch'] == 1
    assert 'skipping' in caplog.text and 'ckpt_epoch_1.pth' in caplog.text
    assert remove_partial_writes(str(tmp_path)) == ['.ckpt_epoch_2.pth.abc123.tmp']
