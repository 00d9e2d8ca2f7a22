"""The README demos: micro FLatten-Swin on the real Fashion-MNIST (≥ 85% top-1 on the 10k test images), and its
segmentation demo on Fashion-MNIST canvases."""
from __future__ import annotations

import json
import re

import pytest
import timm
import torch
from conftest import FASHION_MNIST_DIR, fashion_mnist_samples, run_main, start_early

from config import load_config
from models import build_model
from tools.export_weights import main as export_weights_main
from utils.checkpoint import torch_load

start_early('test_demo_reaches_85_percent', ['--cfg', 'configs/demo/flatten_swin_fmnist.yaml'], needs=FASHION_MNIST_DIR)


@pytest.mark.slow
def test_demo_reaches_85_percent(fashion_mnist_dir, early_run):
    code, stdout, output = early_run  # the README's demo command, run while the other tests ran
    assert code == 0, stdout[-3000:]
    run = output / 'flatten_swin_micro_fmnist' / 'default'
    records = [json.loads(line) for line in (run / 'metrics.jsonl').read_text().splitlines()]
    assert len(records) == 3 and records[-1]['val_count'] == 10000
    final = float(re.findall(r' \* Acc@1 (\S+)', stdout)[-1])
    assert final >= 85.0, f'demo top-1 {final:.2f}% < 85%'
    assert {'ckpt_epoch_2.pth', 'max_acc.pth', 'log_rank0.txt', 'config.yaml'} <= {p.name for p in run.iterdir()}
    assert list((run / 'tensorboard').glob('events.out.tfevents.*'))
    # the trained demo in timm's hub layout (tools.export_weights), read back by timm: the checkpoint's logits
    hub = output / 'hub'
    assert export_weights_main([str(run / 'max_acc.pth'), str(hub)]) == 0
    config = json.loads((hub / 'config.json').read_text())
    ours = build_model(load_config(str(run / 'config.yaml')))
    ours.load_state_dict(torch_load(str(run / 'max_acc.pth'))['model'])
    overlay = timm.create_model(config['architecture'], pretrained=True, **config['model_args'],
                                pretrained_cfg_overlay=dict(file=str(hub / 'model.safetensors')))
    glyphs = torch.from_numpy(fashion_mnist_samples(1)[0]).float().div(255)  # one test glyph per class
    images = torch.nn.functional.interpolate(glyphs[:, None].expand(-1, 3, -1, -1), size=32, mode='bilinear')
    with torch.no_grad():
        expected = ours.eval()(images)
        for model in (overlay, timm.create_model(f'local-dir:{hub}', pretrained=True)):
            assert torch.equal(model.eval()(images), expected)


# the shipped segmentation demo config on its own data (written in the ADE20K layout on first use), cut to
# one evaluation period of 250 updates and 50 validation canvases; the full run's figures are in
# docs/segmentation.md, "The demo"
SEG_DEMO = ['--cfg', 'configs/demo/seg_flatten_swin_fmnist.yaml']
SEG_SHORT = ['--opts', 'TRAIN.ITERS', '250', 'TRAIN.EVAL_PERIOD', '250', 'TRAIN.WARMUP_ITERS', '10',
             'DATA.VAL_SUBSET', '50']
start_early('test_segmentation_demo_config_as_shipped_learns_and_eval_resume_reproduces_its_miou', SEG_DEMO + SEG_SHORT,
            needs=FASHION_MNIST_DIR)


@pytest.mark.slow
def test_segmentation_demo_config_as_shipped_learns_and_eval_resume_reproduces_its_miou(fashion_mnist_dir, early_run):
    code, stdout, output = early_run
    assert code == 0, stdout[-3000:]
    assert (output / 'datasets' / 'fmnist_canvases' / 'seg_demo.json').exists()
    logged = re.findall(r' \* mIoU (\S+) mAcc \S+ aAcc \S+', stdout)
    # predicting the background everywhere scores at most 100/11 = 9.1: above it, garments are segmented
    assert len(logged) == 1 and float(logged[0]) > 100 / 11, logged
    assert 'Ankle boot' in stdout  # the per-class table names the classes
    run = output / 'upernet_flatten_swin_micro_fmnist' / 'default'
    evaluated = run_main(SEG_DEMO + ['--output', output, '--eval', '--resume', run / 'ckpt_epoch_0.pth',
                                     '--tag', 'eval'] + SEG_SHORT, timeout=600, threads=None)
    assert evaluated.returncode == 0, evaluated.stdout[-3000:] + evaluated.stderr[-3000:]
    assert re.findall(r' \* mIoU (\S+) mAcc \S+ aAcc \S+', evaluated.stdout) == logged
