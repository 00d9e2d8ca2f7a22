"""Bad input through the CLI: one error paragraph naming the bad thing, exit code 2, no traceback,
nothing in the output folder overwritten. Every case here is a row of the "What happens when…" table
in docs/robustness.md (checked below)."""
from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest
import torch
from conftest import MICRO_YAML, REPO, make_image_folder, run_main

from utils.distributed import DeviceError, _pick_device


def _remove_val(data: Path, args: list) -> None:
    shutil.rmtree(data / 'val')


def _empty_class(data: Path, args: list) -> None:
    (data / 'train' / 'class_9').mkdir()


def _renamed_val_class(data: Path, args: list) -> None:
    (data / 'val' / 'class_2').rename(data / 'val' / 'class_x')


def _corrupt_image(data: Path, args: list) -> None:
    (data / 'train' / 'class_0' / '3.png').write_bytes(b'this is not a png')


def _missing_data_path(data: Path, args: list) -> None:
    index = args.index('--data-path')
    del args[index:index + 2]


def _output_is_a_file(data: Path, args: list) -> None:
    blocker = data.parent / 'a_file'
    blocker.write_text('not a folder')
    args[args.index('--output') + 1] = str(blocker)


# docs/robustness.md row -> (extra arguments, change to the data or arguments, what the message must say)
CASES = {
    'unknown config key': (['--opts', 'MODEL.DROP_PATH', '0.1'], None,
                           "unknown config key 'MODEL.DROP_PATH'. Did you mean: MODEL.DROP_PATH_RATE"),
    'wrong value type': (['--opts', 'TRAIN.EPOCHS', 'many'], None, "wrong value type for 'TRAIN.EPOCHS'"),
    'unknown model name': (['--opts', 'MODEL.TYPE', 'flaten_swin'], None,
                           "unknown MODEL.TYPE 'flaten_swin'. Close matches: flatten_swin"),
    'missing --data-path': ([], _missing_data_path, "DATA.DATASET='imagenet' needs --data-path"),
    'no train/ or val/ folder': ([], _remove_val, 'has no val/ folder'),
    'empty class folder': ([], _empty_class, 'Found no valid file for the classes class_9'),
    'train and val class sets differ': ([], _renamed_val_class, "only in train: ['class_2']; only in val: ['class_x']"),
    'corrupt or non-image file': ([], _corrupt_image, 'cannot read image'),
    'batch larger than the dataset': (['--batch-size', '64'], None,
                                      'DATA.BATCH_SIZE=64 is larger than the 24 training images'),
    'odd batch with Mixup': (['--batch-size', '5', '--opts', 'AUG.MIXUP', '0.8'], None,
                             'DATA.BATCH_SIZE=5 is odd, but Mixup/CutMix pair up the samples'),
    'image size below the total stride': (['--opts', 'DATA.IMG_SIZE', '3'], None,
                                          'a 3x3 input is too small; every side must be at least 4 pixels'),
    '--resume of a missing file': (['--resume', 'missing.pth'], None, "checkpoint 'missing.pth' does not exist"),
    'output folder not writable': ([], _output_is_a_file, 'cannot be created or written'),
    'value out of range': (['--opts', 'TRAIN.EPOCHS', '-1'], None,
                           'TRAIN.EPOCHS=-1 (from --opts) is out of range: expected an integer >= 1'),
}


def _snapshot(folder: Path) -> dict:
    return {p.relative_to(folder): p.read_bytes() for p in folder.rglob('*') if p.is_file()}


@pytest.mark.parametrize('case', list(CASES))
def test_bad_input_is_one_clear_error(tmp_path, case):
    extra, change, message = CASES[case]
    data = make_image_folder(tmp_path / 'data')
    cfg = tmp_path / 'micro.yaml'
    cfg.write_text(MICRO_YAML)
    # an earlier run's folder that the failing command points at
    run_dir = tmp_path / 'out' / 'micro' / 'default'
    run_dir.mkdir(parents=True)
    (run_dir / 'config.yaml').write_text('the earlier run\'s config\n')
    (run_dir / 'metrics.jsonl').write_text('{"epoch": 0}\n')
    torch.save({'weights': torch.ones(2)}, run_dir / 'max_acc.pth')
    before = _snapshot(run_dir)
    args = ['--cfg', str(cfg), '--data-path', str(data), '--output', str(tmp_path / 'out')] + extra
    if change is not None:
        change(data, args)
    result = run_main(args)
    text = result.stdout + result.stderr
    assert result.returncode == 2, text[-3000:]
    assert message in text, text[-3000:]
    assert 'Traceback' not in text
    errors = [line for line in text.splitlines() if 'ERROR' in line]
    assert len(errors) == 1, errors  # one message
    after = _snapshot(run_dir)
    for name, content in before.items():
        assert after.get(name) == content or any(
            other.name.startswith(f'{name.name}.') and data_ == content for other, data_ in after.items()), name
    for name, content in after.items():
        if name.name.startswith('log_rank') and name in before:
            assert content.startswith(before[name])


def test_skip_corrupt_trains_past_an_unreadable_image(tmp_path):
    data = make_image_folder(tmp_path / 'data')
    _corrupt_image(data, [])
    cfg = tmp_path / 'micro.yaml'
    cfg.write_text(MICRO_YAML)
    result = run_main(['--cfg', cfg, '--data-path', data, '--output', tmp_path / 'out', '--opts',
                       'DATA.SKIP_CORRUPT', 'True', 'TRAIN.EPOCHS', '1'])
    assert result.returncode == 0, result.stderr
    assert f'skipping unreadable image {data / "train" / "class_0" / "3.png"}' in result.stdout


def test_more_processes_than_gpus_is_refused(monkeypatch):
    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    with pytest.raises(DeviceError, match='4 processes were started on this machine but only 2 CUDA device'):
        _pick_device('cuda', local_rank=3, local_world_size=4)
    with pytest.raises(DeviceError, match='only 2 CUDA device'):
        _pick_device('cuda:5', local_rank=0, local_world_size=1)
    with pytest.raises(DeviceError, match="'gpu0' is not a device"):
        _pick_device('gpu0', local_rank=0, local_world_size=1)


def test_bare_cuda_picks_an_indexed_device(monkeypatch):
    """torch.cuda.set_device refuses torch.device('cuda') (no index): a single process asking for 'cuda'
    must hand it the current GPU's index (seen on a real GPU: torchrun --nproc_per_node=1 failed)."""
    chosen = []

    def set_device(device):
        if torch.device(device).index is None:
            raise ValueError(f'Expected a torch.device with a specified index or an integer, but got:{device}')
        chosen.append(device)

    monkeypatch.setattr(torch.cuda, 'is_available', lambda: True)
    monkeypatch.setattr(torch.cuda, 'device_count', lambda: 2)
    monkeypatch.setattr(torch.cuda, 'current_device', lambda: 1)
    monkeypatch.setattr(torch.cuda, 'set_device', set_device)
    assert _pick_device('cuda', local_rank=0, local_world_size=1) == torch.device('cuda', 1)
    assert _pick_device('', local_rank=0, local_world_size=1) == torch.device('cuda', 1)
    assert _pick_device('cuda', local_rank=1, local_world_size=2) == torch.device('cuda', 1)
    assert _pick_device('cuda:0', local_rank=0, local_world_size=1) == torch.device('cuda', 0)
    assert chosen == [torch.device('cuda', 1)] * 3 + [torch.device('cuda', 0)]


def test_robustness_table_lists_every_case():
    page = (REPO / 'docs' / 'robustness.md').read_text()
    section = page.split('## What happens when')[1].split('\n## ')[0]
    rows = re.findall(r'^\| ([^|]+?) \|', section, flags=re.MULTILINE)
    listed = {row.strip() for row in rows} - {'input', '---'}
    assert set(CASES) | {'more processes than GPUs (CUDA)', 'a rank crashes in DDP',
                         'non-finite loss', 'SIGTERM or SIGUSR1 (pre-emption)'} == listed
