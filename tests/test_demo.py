"""The README demos: micro FLatten-Swin on the real Fashion-MNIST (≥ 85% top-1 on the 10k test images), and its
segmentation demo on Fashion-MNIST canvases."""
from __future__ import annotations

import json
import re

import pytest
from conftest import run_main


@pytest.mark.slow
def test_demo_reaches_85_percent(tmp_path, fashion_mnist_dir):
    result = run_main(['--cfg', 'configs/demo/flatten_swin_fmnist.yaml', '--output', tmp_path], timeout=1200,
                      threads=None)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / 'flatten_swin_micro_fmnist' / 'default'
    records = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    assert len(records) == 3 and records[-1]['val_count'] == 10000
    final = float(re.findall(r' \* Acc@1 (\S+)', result.stdout)[-1])
    assert final >= 85.0, f'demo top-1 {final:.2f}% < 85%'
    assert {'ckpt_epoch_2.pth', 'max_acc.pth', 'log_rank0.txt', 'config.yaml'} <= {p.name for p in run.iterdir()}
    assert list((run / 'tensorboard').glob('events.out.tfevents.*'))


@pytest.mark.slow
def test_segmentation_demo_config_as_shipped_learns_and_eval_resume_reproduces_its_miou(tmp_path, fashion_mnist_dir):
    # the shipped demo config on its own data (written in the ADE20K layout on first use), cut to one
    # evaluation period of 250 updates and 50 validation canvases; the full run's figures are in
    # docs/segmentation.md, "The demo"
    short = ['--opts', 'TRAIN.ITERS', '250', 'TRAIN.EVAL_PERIOD', '250', 'TRAIN.WARMUP_ITERS', '10',
             'DATA.VAL_SUBSET', '50']
    common = ['--cfg', 'configs/demo/seg_flatten_swin_fmnist.yaml', '--output', tmp_path]
    trained = run_main(common + short, timeout=1200, threads=None)
    assert trained.returncode == 0, trained.stdout[-3000:] + trained.stderr[-3000:]
    assert (tmp_path / 'datasets' / 'fmnist_canvases' / 'seg_demo.json').exists()
    logged = re.findall(r' \* mIoU (\S+) mAcc \S+ aAcc \S+', trained.stdout)
    # predicting the background everywhere scores at most 100/11 = 9.1: above it, garments are segmented
    assert len(logged) == 1 and float(logged[0]) > 100 / 11, logged
    assert 'Ankle boot' in trained.stdout  # the per-class table names the classes
    run = tmp_path / 'upernet_flatten_swin_micro_fmnist' / 'default'
    evaluated = run_main(common + ['--eval', '--resume', run / 'ckpt_epoch_0.pth', '--tag', 'eval'] + short,
                         timeout=600, threads=None)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    assert re.findall(r' \* mIoU (\S+) mAcc \S+ aAcc \S+', evaluated.stdout) == logged
