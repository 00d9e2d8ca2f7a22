"""main.py end to end on CPU: train → checkpoint → evaluate → resume; outputs; exit codes."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from conftest import run_main

ACC = re.compile(r' \* Acc@1 (\d+\.\d+) Acc@5 (\d+\.\d+)')


def _run_dir(output: Path) -> Path:
    return output / 'micro' / 'default'


def test_train_evaluate_resume(tmp_path, image_folder, micro_cfg):
    out = tmp_path / 'out'
    train = run_main(['--cfg', micro_cfg, '--data-path', image_folder, '--output', out])
    assert train.returncode == 0, train.stdout + train.stderr
    run = _run_dir(out)
    files = {p.name for p in run.iterdir()}
    assert {'ckpt_epoch_0.pth', 'ckpt_epoch_1.pth', 'max_acc.pth', 'config.yaml', 'log_rank0.txt',
            'metrics.jsonl', 'tensorboard'} <= files
    assert list((run / 'tensorboard').glob('events.out.tfevents.*'))
    records = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    assert [r['epoch'] for r in records] == [0, 1] and records[1]['val_count'] == 9
    # per-iteration progress with ETA, on the console and in the log file
    assert re.search(r'Train: \[1/2\]\[\d+/6\]\teta 0:00:\d\d lr', train.stdout)
    assert 'Train: [1/2]' in (run / 'log_rank0.txt').read_text()

    trained_acc = ACC.findall(train.stdout)[-1]
    ckpt = torch.load(run / 'ckpt_epoch_1.pth', weights_only=True)
    assert ckpt['epoch'] == 2 and isinstance(ckpt['config'], str)
    assert {'model', 'optimizer', 'lr_scheduler', 'max_accuracy', 'epoch', 'config', 'scaler', 'rng'} <= set(ckpt)

    evaluation = run_main(['--cfg', micro_cfg, '--data-path', image_folder, '--output', tmp_path / 'eval',
                           '--eval', '--resume', run / 'ckpt_epoch_1.pth'])
    assert evaluation.returncode == 0, evaluation.stderr
    assert ACC.findall(evaluation.stdout) == [trained_acc]
    assert f'{records[1]["val_acc1"]:.3f}' == trained_acc[0]

    # the same command with more epochs continues from epoch 2 (auto-resume), not from scratch
    resumed = run_main(['--cfg', micro_cfg, '--data-path', image_folder, '--output', out,
                        '--opts', 'TRAIN.EPOCHS', '3'])
    assert resumed.returncode == 0, resumed.stderr
    assert 'resuming from' in resumed.stdout and 'Train: [0/3]' not in resumed.stdout
    assert 'Train: [2/3]' in resumed.stdout
    assert len((run / 'metrics.jsonl').read_text().splitlines()) == 3
    # and once complete, re-running reports the final accuracy instead of training again
    again = run_main(['--cfg', micro_cfg, '--data-path', image_folder, '--output', out, '--opts', 'TRAIN.EPOCHS', '3'])
    assert again.returncode == 0 and 'already completed all 3 epochs' in again.stdout
    assert ACC.findall(again.stdout) == ACC.findall(resumed.stdout)[-1:] and 'Train:' not in again.stdout


def test_learns_on_an_easy_dataset(tmp_path, micro_cfg):
    """Colour-coded classes: a few epochs must beat chance by a wide margin."""
    from conftest import make_image_folder
    data = make_image_folder(tmp_path / 'data', classes=3, train_per_class=24, val_per_class=10)
    result = run_main(['--cfg', micro_cfg, '--data-path', data, '--output', tmp_path / 'out',
                       '--opts', 'TRAIN.EPOCHS', '4', 'DATA.BATCH_SIZE', '8'])
    assert result.returncode == 0, result.stderr
    assert float(ACC.findall(result.stdout)[-1][0]) >= 80.0


def test_ema_amp_accumulation_and_checkpointing_flags(tmp_path, image_folder, micro_cfg):
    out = tmp_path / 'out'
    result = run_main(['--cfg', micro_cfg, '--data-path', image_folder, '--output', out, '--model-ema',
                       '--model-ema-decay', '0.9', '--amp-dtype', 'bf16', '--accumulation-steps', '2',
                       '--use-checkpoint', '--opts', 'TRAIN.EPOCHS', '1'])
    assert result.returncode == 0, result.stdout + result.stderr
    assert ' * EMA Acc@1' in result.stdout
    run = _run_dir(out)
    ckpt = torch.load(run / 'ckpt_epoch_0.pth', weights_only=True)
    assert 'state_dict_ema' in ckpt and 'max_accuracy_e' in ckpt
    assert 'max_ema_acc.pth' in {p.name for p in run.iterdir()}
    config = (run / 'config.yaml').read_text()
    assert 'AMP: true' in config and 'AMP_DTYPE: bf16' in config and 'ACCUMULATION_STEPS: 2' in config
    # 6 batches of 4 with 2-step accumulation: 3 optimizer updates, LR scaled by 4·1·2/512
    assert 'start training: epoch 0 update 0 of 1 epochs x 3 updates' in result.stdout
    assert 'BASE_LR: 6.25e-05' in config


def test_throughput_mode(tmp_path, image_folder, micro_cfg):
    result = run_main(['--cfg', micro_cfg, '--data-path', image_folder, '--output', tmp_path / 'out', '--throughput'])
    assert result.returncode == 0, result.stderr
    assert re.search(r'batch_size 4 throughput \d+', result.stdout)


@pytest.mark.slow
def test_compile_and_channels_last(tmp_path, image_folder, micro_cfg):
    """--compile --channels-last trains, evaluates and checkpoints on CPU; the checkpoint keeps the
    plain parameter names (no ``_orig_mod.``) and evaluates to the logged accuracy without the flags."""
    out = tmp_path / 'out'
    result = run_main(['--cfg', micro_cfg, '--data-path', image_folder, '--output', out, '--compile',
                       '--channels-last', '--opts', 'TRAIN.EPOCHS', '1'], threads=None, fresh_process=True)
    assert result.returncode == 0, result.stdout + result.stderr
    run = _run_dir(out)
    config = (run / 'config.yaml').read_text()
    assert 'COMPILE: true' in config and 'CHANNELS_LAST: true' in config
    ckpt = torch.load(run / 'ckpt_epoch_0.pth', weights_only=True)
    assert not [k for k in ckpt['model'] if '_orig_mod' in k]
    logged = ACC.findall(result.stdout)[-1]
    check = run_main(['--cfg', micro_cfg, '--data-path', image_folder, '--output', tmp_path / 'eval', '--eval',
                      '--resume', run / 'ckpt_epoch_0.pth'])
    assert check.returncode == 0, check.stderr
    assert ACC.findall(check.stdout)[-1] == logged
