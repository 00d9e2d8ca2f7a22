"""The README demo: micro FLatten-Swin on the real Fashion-MNIST, ≥ 85% top-1 on the 10k test images."""
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
