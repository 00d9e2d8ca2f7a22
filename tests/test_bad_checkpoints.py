"""Bad checkpoint files through the CLI: one clear error naming the file, exit 2, nothing overwritten."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import run_main

from models.swin import FLattenSwinTransformer


def _micro(**kwargs) -> FLattenSwinTransformer:
    """The architecture of tests/conftest.py's MICRO_YAML (3 classes), with overrides."""
    args = dict(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(1, 2), window_size=16,
                softmax_window_size=4, attn_type='LS', num_classes=3)
    args.update(kwargs)
    return FLattenSwinTransformer(**args)


def _bad_files(folder: Path) -> dict:
    folder.mkdir()
    text = folder / 'notes.txt'
    text.write_text('these are my notes, not weights')
    good = folder / 'good.pth'
    torch.save({'model': _micro().state_dict(), 'epoch': 1}, good)
    truncated = folder / 'truncated.pth'
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    other_arch = folder / 'deeper.pth'
    torch.save({'model': _micro(depths=(2, 4)).state_dict()}, other_arch)
    other_size = folder / 'wider.pth'
    torch.save({'model': _micro(embed_dim=32, num_heads=(2, 4)).state_dict()}, other_size)
    return {
        'not a checkpoint': (text, 'cannot read checkpoint'),
        'truncated': (truncated, 'cannot read checkpoint'),
        'other architecture': (other_arch, 'unexpected layers.1.blocks.2.norm1.weight [32]'),
        'other size': (other_size,
                       'mismatched patch_embed.proj.weight: checkpoint [32, 3, 2, 2] vs model [16, 3, 2, 2]'),
    }


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob('*') if p.is_file()}


@pytest.fixture(scope='module')
def finished_run(tmp_path_factory):
    """A completed 1-epoch run whose folder must survive every failing command below."""
    from conftest import MICRO_YAML, make_image_folder
    root = tmp_path_factory.mktemp('run')
    data = make_image_folder(root / 'data')
    cfg = root / 'micro.yaml'
    cfg.write_text(MICRO_YAML)
    result = run_main(['--cfg', cfg, '--data-path', data, '--output', root / 'out', '--opts', 'TRAIN.EPOCHS', '1'])
    assert result.returncode == 0, result.stderr
    return {'cfg': cfg, 'data': data, 'out': root / 'out', 'bad': _bad_files(root / 'bad')}


@pytest.mark.parametrize('case', ['not a checkpoint', 'truncated', 'other architecture', 'other size'])
@pytest.mark.parametrize('mode', ['--resume', '--eval --resume', '--pretrained'])
def test_bad_file_is_one_clear_error(finished_run, tmp_path, case, mode):
    path, message = finished_run['bad'][case]
    run_dir = finished_run['out'] / 'micro' / 'default'
    # training modes get a fresh run folder (an existing run would be auto-resumed instead)
    output = finished_run['out'] if mode == '--eval --resume' else tmp_path / 'fresh'
    before = _snapshot(run_dir)
    result = run_main(['--cfg', finished_run['cfg'], '--data-path', finished_run['data'], '--output', output]
                      + mode.split() + [path])
    assert result.returncode == 2
    output_text = result.stdout + result.stderr
    assert str(path) in output_text and message in output_text, output_text[-2000:]
    assert 'Traceback' not in output_text
    after = _snapshot(run_dir)
    for name, content in before.items():
        if name.name.startswith('log_rank'):
            assert after[name].startswith(content)  # the log only grows
        else:
            assert after[name] == content, f'{name} was modified'
    if mode != '--eval --resume':
        written = {p.name for p in (tmp_path / 'fresh').rglob('*') if p.is_file()}
        assert written <= {'log_rank0.txt'}, written

