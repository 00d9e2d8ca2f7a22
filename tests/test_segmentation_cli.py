"""main.py with a segmentation config: train, evaluate, resume, DDP and bad input, on ADE20K-layout folders."""
from __future__ import annotations

import json
import os
import re
import signal
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import REPO, run_main, write_ade20k_split
from PIL import Image
from test_preemption import _finish, _signal_until_exit, _start, _wait_for

from utils.preemption import EXIT_PREEMPTED

TORCHRUN = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']


@pytest.fixture
def ade(tmp_path: Path) -> Path:
    """6 training and 5 validation images (a prime count: two ranks hold 3 and 2) of 40x30 pixels, 4 classes."""
    root = tmp_path / 'ADEChallengeData2016'
    write_ade20k_split(root, 'train', 6, size=(40, 30), classes=4)
    write_ade20k_split(root, 'val', 5, size=(40, 30), classes=4, seed=1)
    return root


def _miou_lines(text: str) -> list:
    return re.findall(r' \* mIoU \S+ mAcc \S+ aAcc \S+', text)


def test_trains_by_iterations_and_eval_resume_reproduces_the_logged_miou(tmp_path, seg_micro_cfg, ade):
    out = tmp_path / 'out'
    common = ['--cfg', seg_micro_cfg, '--data-path', ade, '--device', 'cpu']
    trained = run_main(common + ['--output', out])
    assert trained.returncode == 0, trained.stdout + trained.stderr
    run_dir = out / 'seg_micro' / 'default'
    assert 'Train: [iter 4/4]' in trained.stdout and 'start training: epoch 0 update 0 of 2 epochs x 2 updates' \
        in trained.stdout
    assert {'ckpt_epoch_0.pth', 'ckpt_epoch_1.pth', 'config.yaml', 'metrics.jsonl'} <= set(os.listdir(run_dir))
    lines = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    assert [line['epoch'] for line in lines] == [0, 1] and len(lines[1]['val_IoU']) == 4
    assert 'val_confusion_matrix' not in lines[1]

    evaluated = run_main(common + ['--output', tmp_path / 'eval', '--eval', '--resume', run_dir / 'ckpt_epoch_1.pth'])
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    assert _miou_lines(evaluated.stdout) == _miou_lines(trained.stdout)[-1:]
    record = json.loads(next((tmp_path / 'eval').rglob('eval_metrics.json')).read_text())
    assert record['val']['mIoU'] == lines[1]['val_mIoU'] and record['val']['count'] == 5
    matrix = np.array(record['val']['confusion_matrix'])
    assert matrix.shape == (4, 4) and matrix.sum() == sum(
        (np.asarray(Image.open(p)) > 0).sum() for p in (ade / 'annotations' / 'validation').glob('*.png'))


@pytest.mark.slow
def test_sigkill_and_sigterm_mid_run_then_the_same_command_ends_bit_identical(tmp_path, seg_micro_cfg, ade):
    # 12 iterations in 2 periods, a checkpoint after every update, 2 loader workers (their random crops,
    # flips and photometric draws must resume too); the reference runs uninterrupted in its own process
    opts = ['--opts', 'TRAIN.ITERS', '12', 'TRAIN.EVAL_PERIOD', '6', 'TRAIN.CKPT_STEPS', '1',
            'TRAIN.KEEP_CKPTS', '3', 'DATA.NUM_WORKERS', '2', 'PRINT_FREQ', '1']
    args = ['--cfg', seg_micro_cfg, '--data-path', ade, '--device', 'cpu']
    _finish([sys.executable, str(REPO / 'main.py')] + args + ['--output', tmp_path / 'whole'] + opts,
            tmp_path / 'whole.log')
    command = [sys.executable, str(REPO / 'main.py')] + args + ['--output', tmp_path / 'cut'] + opts
    run_dir = tmp_path / 'cut' / 'seg_micro' / 'default'

    killed = _start(command, tmp_path / 'kill.log')  # 1. SIGKILL once iteration 3's checkpoint is on disk
    _wait_for(killed, tmp_path / 'kill.log', 'saved ckpt_epoch_0_step_3.pth')
    killed.kill()
    assert killed.wait() == -signal.SIGKILL
    assert not (run_dir / 'ckpt_epoch_1.pth').exists()

    stopped = _start(command, tmp_path / 'term.log')  # 2. SIGTERM in the second period
    _wait_for(stopped, tmp_path / 'term.log', 'Train: [iter 8/12]')
    _signal_until_exit(stopped, stopped.pid, signal.SIGTERM)
    text = (tmp_path / 'term.log').read_text()
    assert stopped.returncode == EXIT_PREEMPTED, text[-3000:]
    assert 'resuming from' in text and 'Traceback' not in text
    where = re.search(r"stopped by SIGTERM \(.*\) after iteration (\d+) of 12; "
                      r"saved (ckpt_epoch_1_step_\d+\.pth)", text)
    assert where and 8 <= int(where.group(1)) < 12, text[-3000:]
    assert torch.load(run_dir / where.group(2), weights_only=True)['step'] == int(where.group(1)) - 6

    final = _finish(command, tmp_path / 'final.log')  # 3. the same command again
    assert f'resuming from {run_dir / where.group(2)}' in final
    one = torch.load(tmp_path / 'whole' / 'seg_micro' / 'default' / 'ckpt_epoch_1.pth', weights_only=True)
    two = torch.load(run_dir / 'ckpt_epoch_1.pth', weights_only=True)
    for key in ('model', 'optimizer', 'lr_scheduler', 'rng'):
        assert _equal(one[key], two[key]), key
    assert _miou_lines(final)[-1] == _miou_lines((tmp_path / 'whole.log').read_text())[-1]


def _equal(a, b) -> bool:
    if isinstance(a, dict):
        return a.keys() == b.keys() and all(_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return len(a) == len(b) and all(_equal(x, y) for x, y in zip(a, b, strict=True))
    return torch.equal(a, b) if isinstance(a, torch.Tensor) else a == b


def test_bf16_autocast_trains_and_evaluates(tmp_path, seg_micro_cfg, ade):
    result = run_main(['--cfg', seg_micro_cfg, '--data-path', ade, '--device', 'cpu', '--output', tmp_path,
                       '--amp-dtype', 'bf16'])
    assert result.returncode == 0, result.stdout + result.stderr
    losses = [float(x) for x in re.findall(r'\tloss (\S+) ', result.stdout)]
    assert len(losses) == 4 and all(np.isfinite(losses)) and len(_miou_lines(result.stdout)) == 2


@pytest.mark.slow
def test_two_gloo_ranks_evaluate_the_same_confusion_matrix_and_train_like_one_process(tmp_path, seg_micro_cfg, ade):
    # no dropout: the two runs must draw the same randomness; BatchNorm is synchronised over the ranks
    common = ['--cfg', seg_micro_cfg, '--data-path', ade, '--device', 'cpu']
    no_dropout = ['--opts', 'SEG.DROPOUT', '0.0']
    single = run_main(common + ['--output', tmp_path / 'one', '--batch-size', '4'] + no_dropout)
    assert single.returncode == 0, single.stdout + single.stderr
    double = run_main(common + ['--output', tmp_path / 'two', '--batch-size', '2'] + no_dropout, launcher=TORCHRUN)
    assert double.returncode == 0, double.stdout + double.stderr
    one = torch.load(tmp_path / 'one' / 'seg_micro' / 'default' / 'ckpt_epoch_1.pth', weights_only=True)
    two = torch.load(tmp_path / 'two' / 'seg_micro' / 'default' / 'ckpt_epoch_1.pth', weights_only=True)
    assert one['model'].keys() == two['model'].keys()
    for key, value in one['model'].items():
        torch.testing.assert_close(two['model'][key].float(), value.float(), rtol=1e-4, atol=1e-5, msg=key)
    first = torch.load(tmp_path / 'one' / 'seg_micro' / 'default' / 'ckpt_epoch_0.pth', weights_only=True)
    assert any(not torch.equal(first['model'][k], v) for k, v in one['model'].items() if 'decoder' in k)

    # evaluation of one checkpoint: 2 ranks (3 + 2 images) give exactly the matrix of 1 process
    ckpt = tmp_path / 'one' / 'seg_micro' / 'default' / 'ckpt_epoch_1.pth'
    evals = {}
    for name, launcher in (('eval1', None), ('eval2', TORCHRUN)):
        result = run_main(common + ['--output', tmp_path / name, '--eval', '--resume', ckpt], launcher=launcher)
        assert result.returncode == 0, result.stdout + result.stderr
        evals[name] = json.loads(next((tmp_path / name).rglob('eval_metrics.json')).read_text())['val']
    assert evals['eval2']['confusion_matrix'] == evals['eval1']['confusion_matrix']
    assert evals['eval2']['count'] == evals['eval1']['count'] == 5


def _resize_label(root: Path) -> str:
    path = root / 'annotations' / 'validation' / 'ADE_val_00000003.png'
    Image.fromarray(np.ones((10, 10), dtype=np.uint8), mode='L').save(path)
    return 'ADE_val_00000003.png is 10x10 (WxH) but its image is 40x30'


def _rgb_label(root: Path) -> str:
    path = root / 'annotations' / 'validation' / 'ADE_val_00000001.png'
    Image.fromarray(np.zeros((30, 40, 3), dtype=np.uint8)).save(path)
    return 'ADE_val_00000001.png is a RGB image'


def _value_out_of_range(root: Path) -> str:
    path = root / 'annotations' / 'validation' / 'ADE_val_00000002.png'
    Image.fromarray(np.full((30, 40), 9, dtype=np.uint8), mode='L').save(path)
    return 'ADE_val_00000002.png holds values [9]'


def _image_without_label(root: Path) -> str:
    os.remove(root / 'annotations' / 'training' / 'ADE_train_00000004.png')
    return 'ADE_train_00000004.jpg has no'


def _empty_split(root: Path) -> str:
    for kind in ('images', 'annotations'):
        for path in (root / kind / 'validation').iterdir():
            path.unlink()
    return 'validation holds no image'


@pytest.mark.parametrize('spoil', [_resize_label, _rgb_label, _value_out_of_range, _image_without_label,
                                   _empty_split])
def test_bad_data_is_named_with_exit_code_2_and_nothing_in_the_run_folder_is_lost(tmp_path, seg_micro_cfg, ade, spoil):
    run_dir = tmp_path / 'out' / 'seg_micro' / 'default'
    run_dir.mkdir(parents=True)
    (run_dir / 'ckpt_epoch_0.pth').write_bytes(b'an earlier run')
    message = spoil(ade)
    result = run_main(['--cfg', seg_micro_cfg, '--data-path', ade, '--device', 'cpu', '--output', tmp_path / 'out'])
    assert result.returncode == 2, result.stdout + result.stderr
    assert message in result.stdout + result.stderr and 'Traceback' not in result.stdout + result.stderr
    # labels are checked as they are read (validation after the first period): no checkpoint is written
    # over or beside what the folder held
    assert sorted(p.name for p in run_dir.glob('*.pth')) == ['ckpt_epoch_0.pth']
    assert (run_dir / 'ckpt_epoch_0.pth').read_bytes() == b'an earlier run'
