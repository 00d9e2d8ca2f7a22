"""The authors' released .pth files: official layout, pickled CfgNode, EMA keys, through the CLI."""
from __future__ import annotations

import re

import pytest
import torch
from conftest import REPO, make_image_folder, read_inventory, run_main
from yacs.config import CfgNode

import models
from config import load_config

ACC = re.compile(r' \* Acc@1 (\d+\.\d+) Acc@5 (\d+\.\d+)')


def official_checkpoint(path, config: str, inventory: str = '', ema: bool = False) -> dict:
    """A file laid out as the official training scripts write it (docs/checkpoints.md, "File layout"): weights with the
    inventory's names, shapes and dtypes (random values, integer buffers included: they are
    rebuilt on load), an optimizer and scheduler state, and the config as a pickled yacs CfgNode."""
    gen = torch.Generator().manual_seed(0)
    if inventory:
        entries = read_inventory(inventory, with_dtype=True)
    else:  # no official code (DeiT): our model's names, shapes and dtypes
        entries = [(k, tuple(v.shape), v.dtype)
                   for k, v in models.build_model(load_config(str(REPO / config))).state_dict().items()]

    def weights():
        return {key: (torch.randint(0, 7, shape, generator=gen) if dtype == torch.int64
                      else torch.randn(shape, generator=gen) * 0.02).to(dtype) for key, shape, dtype in entries}

    cfg = load_config(str(REPO / config)).clone()
    cfg.defrost()
    ckpt = {'model': weights(), 'optimizer': {'state': {}, 'param_groups': []}, 'lr_scheduler': {'t_initial': 375000},
            'max_accuracy': 82.1, 'epoch': 300, 'config': CfgNode(cfg)}
    if ema:
        ckpt.update(state_dict_ema=weights(), max_accuracy_e=82.3)
    torch.save(ckpt, path)
    return ckpt


FAMILIES = [
    ('configs/flatten_swin_t.yaml', 'flatten_swin_t'),
    ('configs/flatten_pvt_t.yaml', 'flatten_pvt_t'),
    ('configs/flatten_pvt_v2_b0.yaml', 'flatten_pvt_v2_b0'),
    ('configs/flatten_cswin_t.yaml', 'flatten_cswin_t'),
    ('configs/flatten_deit_t.yaml', ''),
]


@pytest.fixture(scope='module')
def val_folder(tmp_path_factory):
    return make_image_folder(tmp_path_factory.mktemp('data'), classes=3, train_per_class=2, val_per_class=2)


@pytest.mark.slow
@pytest.mark.parametrize('config, inventory', FAMILIES, ids=[f[0].split('/')[-1][:-5] for f in FAMILIES])
def test_official_checkpoint_evaluates_through_the_cli(tmp_path, val_folder, config, inventory):
    path = tmp_path / 'released.pth'
    official_checkpoint(path, config, inventory, ema=True)
    common = ['--cfg', config, '--data-path', val_folder, '--output', tmp_path / 'out', '--batch-size', '3',
              '--opts', 'DATA.NUM_WORKERS', '0']
    result = run_main(common[:-3] + ['--eval', '--resume', path] + common[-3:])
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    assert len(ACC.findall(result.stdout)) == 1 and 'on the 6 test images' in result.stdout
    # the 1000-class head of the file is kept: the 3 folder classes are its first outputs
    saved = next((tmp_path / 'out').rglob('config_eval.yaml')).read_text()
    assert 'NUM_CLASSES: 1000' in saved
    ema = run_main(common[:-3] + ['--eval-ema', '--resume', path] + common[-3:])
    assert ema.returncode == 0, ema.stderr[-2000:]
    assert 'loading EMA weights' in ema.stdout and len(ACC.findall(ema.stdout)) == 1
