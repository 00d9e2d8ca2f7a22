"""Exact resume: SIGKILL a CPU training run at several points, restart the same command, and get
bit-identical final weights, optimizer state, EMA and RNG state to an uninterrupted run."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Optional

import pytest
import torch
from conftest import MICRO_YAML, REPO, make_image_folder

# Everything random on: RandAugment, random erasing, Mixup/CutMix, drop path, 2 loader workers, EMA,
# a checkpoint every 2 updates (8 updates per epoch).
RANDOM_EVERYTHING = ['AUG.AUTO_AUGMENT', 'rand-m9-mstd0.5-inc1', 'AUG.REPROB', '0.25', 'AUG.MIXUP', '0.8',
                     'AUG.CUTMIX', '1.0', 'MODEL.DROP_PATH_RATE', '0.1', 'DATA.NUM_WORKERS', '2',
                     'DATA.BATCH_SIZE', '8', 'TRAIN.EPOCHS', '3', 'TRAIN.WARMUP_EPOCHS', '1', 'TRAIN.CKPT_STEPS', '2',
                     'TRAIN.EMA.ENABLE', 'True', 'TRAIN.EMA.DECAY', '0.9', 'MODEL.SWIN.EMBED_DIM', '32',
                     'PRINT_FREQ', '1']


def _command(cfg: Path, data: Path, output: Path) -> list:
    return [sys.executable, str(REPO / 'main.py'), '--cfg', str(cfg), '--data-path', str(data), '--output',
            str(output), '--opts'] + RANDOM_EVERYTHING


def _run(command: list, log: Path, kill_when: Optional[Callable[[str], bool]] = None, timeout: float = 300) -> bool:
    """Run `command` with its output in `log`; SIGKILL it as soon as ``kill_when(log text)`` holds.
    Returns True if it was killed, False if it finished (successfully)."""
    env = dict(os.environ, PYTHONUNBUFFERED='1', OMP_NUM_THREADS='1')
    with open(log, 'w') as out:
        process = subprocess.Popen(command, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
    deadline = time.time() + timeout
    while process.poll() is None:
        if (kill_when is not None) and kill_when(log.read_text()):
            process.send_signal(signal.SIGKILL)
            process.wait()
            return True
        if time.time() > deadline:
            process.kill()
            raise AssertionError(f'{command} did not finish in {timeout}s:\n{log.read_text()[-3000:]}')
        time.sleep(0.0005)
    assert process.returncode == 0, log.read_text()[-3000:]
    return False


def _partial(name: str) -> bool:
    """A checkpoint being written: utils.checkpoint.atomic_save's temp file."""
    return name.startswith('.ckpt') and name.endswith('.tmp')


def _tensors(ckpt: dict) -> dict:
    """Every tensor of a checkpoint, flattened to dotted names (model, optimizer state, EMA, RNG)."""
    out = {}

    def walk(prefix, value):
        if isinstance(value, torch.Tensor):
            out[prefix] = value
        elif isinstance(value, dict):
            for key, item in value.items():
                walk(f'{prefix}.{key}', item)
        elif isinstance(value, (list, tuple)):
            for i, item in enumerate(value):
                walk(f'{prefix}.{i}', item)
    for key in ('model', 'optimizer', 'state_dict_ema', 'rng'):
        walk(key, ckpt[key])
    return out


@pytest.mark.slow
def test_sigkill_anywhere_then_resume_is_bit_identical(tmp_path):
    data = make_image_folder(tmp_path / 'data', classes=4, train_per_class=16, val_per_class=4)
    cfg = tmp_path / 'micro.yaml'
    cfg.write_text(MICRO_YAML)

    reference = tmp_path / 'reference'
    assert not _run(_command(cfg, data, reference), tmp_path / 'reference.log')

    interrupted = tmp_path / 'interrupted'
    run_dir = interrupted / 'micro' / 'default'
    command = _command(cfg, data, interrupted)
    # 1. mid-epoch, between checkpoints (after the 6th batch of epoch 0; the last file is at update 4)
    assert _run(command, tmp_path / 'kill1.log', lambda log: 'Train: [0/3][5/8]' in log)
    # 2. during the evaluation at the end of epoch 1
    assert _run(command, tmp_path / 'kill2.log', lambda log: 'Test: [0/' in log.split('Train: [1/3][7/8]')[-1]
                if 'Train: [1/3][7/8]' in log else False)
    # 3. during a checkpoint write: the moment a temp file appears (retried until one is caught)
    caught = False
    for attempt in range(6):
        killed = _run(command, tmp_path / f'kill3_{attempt}.log',
                      lambda log: any(_partial(n) for n in os.listdir(run_dir)))
        if not killed:
            break
        caught = caught or any(_partial(n) for n in os.listdir(run_dir))
        if caught:
            break
    assert caught, 'no checkpoint write was interrupted'
    # 4. the same command again, to the end
    assert not _run(command, tmp_path / 'final.log')
    final_log = (tmp_path / 'final.log').read_text()
    assert 'the remains of a checkpoint write that was interrupted' in final_log
    assert 'resuming from' in final_log

    expected = torch.load(reference / 'micro' / 'default' / 'ckpt_epoch_2.pth', weights_only=True)
    actual = torch.load(run_dir / 'ckpt_epoch_2.pth', weights_only=True)
    assert (actual['epoch'], actual['step']) == (expected['epoch'], expected['step']) == (3, 0)
    assert actual['max_accuracy'] == expected['max_accuracy']
    assert actual['max_accuracy_e'] == expected['max_accuracy_e']
    expected_tensors, actual_tensors = _tensors(expected), _tensors(actual)
    assert expected_tensors.keys() == actual_tensors.keys()
    different = [k for k in expected_tensors if not torch.equal(expected_tensors[k], actual_tensors[k])]
    assert not different, different[:10]
    # the metrics log has each epoch once, as in the uninterrupted run
    epochs = [line.split(',')[0] for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    assert epochs == ['{"epoch": 0', '{"epoch": 1', '{"epoch": 2']


@pytest.mark.slow
def test_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    from conftest import run_main
    data = make_image_folder(tmp_path / 'data')
    cfg = tmp_path / 'micro.yaml'
    cfg.write_text(MICRO_YAML)
    common = ['--cfg', cfg, '--data-path', data, '--output', tmp_path / 'out']
    assert run_main(common).returncode == 0  # 2 epochs: ckpt_epoch_0.pth, ckpt_epoch_1.pth
    run_dir = tmp_path / 'out' / 'micro' / 'default'
    newest = run_dir / 'ckpt_epoch_1.pth'
    newest.write_bytes(newest.read_bytes()[:1000])  # a copy cut short / a full disk
    result = run_main(common + ['--opts', 'TRAIN.EPOCHS', '3'])
    assert result.returncode == 0, result.stderr
    assert f'auto-resume: skipping {newest}' in result.stdout
    assert f'resuming from {run_dir / "ckpt_epoch_0.pth"}' in result.stdout
    assert 'Train: [1/3]' in result.stdout and 'Train: [0/3]' not in result.stdout
    assert torch.load(run_dir / 'ckpt_epoch_2.pth', weights_only=True)['epoch'] == 3
