"""DDP on CPU (gloo): two processes equal one process with the same global batch."""
from __future__ import annotations

import re
import sys
import time

import pytest
import torch
from conftest import make_image_folder, run_main

DETERMINISTIC = ['AUG.SCALE', '(1.0, 1.0)', 'AUG.RATIO', '(1.0, 1.0)', 'AUG.HFLIP', '0.0', 'AUG.COLOR_JITTER', '0.0',
                 'TRAIN.EPOCHS', '2', 'MODEL.LABEL_SMOOTHING', '0.0']


@pytest.mark.slow
def test_two_gloo_processes_equal_one_process_with_the_same_global_batch(tmp_path, micro_cfg):
    # 25 val images: a prime count, so the two ranks hold 13 and 12 images
    data = make_image_folder(tmp_path / 'data', classes=5, train_per_class=8, val_per_class=5)
    common = ['--cfg', micro_cfg, '--data-path', data, '--device', 'cpu']
    single = run_main(common + ['--output', tmp_path / 'one', '--batch-size', '8', '--opts'] + DETERMINISTIC)
    assert single.returncode == 0, single.stdout + single.stderr
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    double = run_main(common + ['--output', tmp_path / 'two', '--batch-size', '4', '--opts'] + DETERMINISTIC,
                      launcher=launcher)
    assert double.returncode == 0, double.stdout + double.stderr

    one = torch.load(tmp_path / 'one' / 'micro' / 'default' / 'ckpt_epoch_1.pth', weights_only=True)
    two = torch.load(tmp_path / 'two' / 'micro' / 'default' / 'ckpt_epoch_1.pth', weights_only=True)
    assert one['model'].keys() == two['model'].keys()
    for key, value in one['model'].items():
        torch.testing.assert_close(two['model'][key], value, rtol=1e-4, atol=1e-5, msg=key)
    # the weights moved: the comparison is not between two copies of the initialisation
    assert not torch.equal(one['model']['head.weight'], torch.load(
        tmp_path / 'one' / 'micro' / 'default' / 'ckpt_epoch_0.pth', weights_only=True)['model']['head.weight'])

    # distributed evaluation counted each of the 25 images once, and agrees with one process
    acc_one = re.findall(r' \* Acc@1 (\S+)', single.stdout)
    acc_two = re.findall(r' \* Acc@1 (\S+)', double.stdout)
    assert acc_two == acc_one and 'on the 25 test images' in double.stdout
    # only rank 0 writes checkpoints and console output; each rank has its own log file
    run_dir = tmp_path / 'two' / 'micro' / 'default'
    assert (run_dir / 'log_rank0.txt').exists() and (run_dir / 'log_rank1.txt').exists()
    assert double.stdout.count('start training') == 1


@pytest.mark.slow
def test_a_crashing_rank_takes_the_job_down_with_its_message(tmp_path, micro_cfg):
    data = make_image_folder(tmp_path / 'data', classes=2, train_per_class=8, val_per_class=2)
    for image in (data / 'train' / 'class_1').glob('*.png'):  # every rank meets one of these
        image.write_bytes(b'not an image')
    launcher = [sys.executable, '-m', 'torch.distributed.run', '--standalone', '--nproc_per_node=2']
    start = time.time()
    result = run_main(['--cfg', micro_cfg, '--data-path', data, '--output', tmp_path / 'out', '--device', 'cpu',
                       '--batch-size', '2'], launcher=launcher, timeout=300)
    assert result.returncode != 0
    text = result.stdout + result.stderr
    assert 'DataError: cannot read image' in text and 'class_1' in text
    assert time.time() - start < 120  # the job ends; it does not wait for a collective timeout
