"""main.py with a detection config: train, evaluate, resume after SIGKILL, 2 ranks and bad input, on a COCO folder."""
from __future__ import annotations

import json
import math
import os
import re
import shutil
import signal
import sys
from pathlib import Path

import pytest
import torch
from conftest import FASHION_MNIST_DIR, REPO, run_main
from test_preemption import _finish, _start, _wait_for
from test_segmentation_cli import TORCHRUN, _equal

DET_MICRO_YAML = """\
TASK: detection
DATA:
  DATASET: coco
  IMG_SIZE: 64
  BATCH_SIZE: 2
  NUM_WORKERS: 0
MODEL:
  TYPE: flatten_swin
  NAME: det_micro
  NUM_CLASSES: 10
  DROP_PATH_RATE: 0.0
  LABEL_SMOOTHING: 0.0
  SWIN:
    PATCH_SIZE: 4
    EMBED_DIM: 16
    DEPTHS: [ 1, 1, 1, 1 ]
    NUM_HEADS: [ 1, 1, 2, 2 ]
    WINDOW_SIZE: 20
    SOFTMAX_WINDOW_SIZE: 2
  LA:
    ATTN_TYPE: LLSS
DET:
  FPN_CHANNELS: 16
  BOX_FC_DIM: 32
  MASK_CHANNELS: 16
  RPN_BATCH_PER_IMAGE: 32
  BOX_BATCH_PER_IMAGE: 32
  RPN_PRE_NMS_TRAIN: 100
  RPN_POST_NMS_TRAIN: 50
  RPN_PRE_NMS_TEST: 50
  RPN_POST_NMS_TEST: 50
  DETECTIONS_PER_IMAGE: 10
  SCORE_THRESH: 0.0
  TRAIN_SCALES: [ [ 80, 64 ] ]
  TEST_SCALE: [ 80, 64 ]
TRAIN:
  EPOCHS: 2
  WARMUP_EPOCHS: 0
  WARMUP_ITERS: 1
  BASE_LR: 1e-3
  WARMUP_LR: 1e-6
  WEIGHT_DECAY: 0.05
  CLIP_GRAD: None
  LR_SCHEDULER:
    NAME: multistep
    MILESTONES: [ 1 ]
  EMA:
    ENABLE: False
AUG:
  MIXUP: 0.0
  CUTMIX: 0.0
PRINT_FREQ: 1
"""


@pytest.fixture(scope='module')
def coco_master(tmp_path_factory) -> Path:
    """8 training and 5 validation canvases of 64x80 (a prime count: two ranks hold 3 and 2) in the COCO
    layout, written once per module by the demo writer (Fashion-MNIST glyphs, polygon masks)."""
    if not os.path.isdir(FASHION_MNIST_DIR):
        pytest.skip('Fashion-MNIST is not installed (apt-get install -y dataset-fashion-mnist)')
    from data.det_demo import write_det_demo
    root = tmp_path_factory.mktemp('coco') / 'coco'
    write_det_demo(str(root), num_train=8, num_val=5, size=(64, 80), glyphs=(1, 2), scale=(1.0, 1.5))
    return root


@pytest.fixture
def coco(tmp_path: Path, coco_master: Path) -> Path:
    """A copy of the module's folder that a test may spoil."""
    return Path(shutil.copytree(coco_master, tmp_path / 'coco'))


@pytest.fixture
def det_micro_cfg(tmp_path: Path) -> str:
    path = tmp_path / 'det_micro.yaml'
    path.write_text(DET_MICRO_YAML)
    return str(path)


def _ap_lines(text: str) -> list:
    return re.findall(r' \* bbox AP \S+ AP50 \S+ segm AP \S+', text)


def test_trains_and_eval_resume_reproduces_the_logged_ap(tmp_path, det_micro_cfg, coco):
    out = tmp_path / 'out'
    common = ['--cfg', det_micro_cfg, '--data-path', coco, '--device', 'cpu']
    trained = run_main(common + ['--output', out])
    assert trained.returncode == 0, trained.stdout + trained.stderr
    run_dir = out / 'det_micro' / 'default'
    assert 'start training: epoch 0 update 0 of 2 epochs x 4 updates' in trained.stdout
    assert re.search(r'Train: \[1/2\]\[3/4\].*loss_classifier \S+ loss_box_reg \S+ loss_mask \S+', trained.stdout)
    assert {'ckpt_epoch_0.pth', 'ckpt_epoch_1.pth', 'config.yaml', 'metrics.jsonl'} <= set(os.listdir(run_dir))
    lines = [json.loads(line) for line in (run_dir / 'metrics.jsonl').read_text().splitlines()]
    assert [line['epoch'] for line in lines] == [0, 1] and len(lines[1]['val_bbox_stats']) == 12
    assert len(_ap_lines(trained.stdout)) == 2 and 'Average Precision  (AP) @[ IoU=0.50:0.95' in trained.stdout

    evaluated = run_main(common + ['--output', tmp_path / 'eval', '--eval', '--resume', run_dir / 'ckpt_epoch_1.pth',
                                   '--opts', 'DET.SAVE_RESULTS', 'True'])
    assert evaluated.returncode == 0, evaluated.stdout + evaluated.stderr
    assert _ap_lines(evaluated.stdout) == _ap_lines(trained.stdout)[-1:]
    record = json.loads(next((tmp_path / 'eval').rglob('eval_metrics.json')).read_text())
    assert record['val']['bbox_stats'] == lines[1]['val_bbox_stats'] and record['val']['count'] == 5
    assert record['val']['segm_stats'] == lines[1]['val_segm_stats']
    from pycocotools.coco import COCO
    gt = COCO(str(coco / 'annotations' / 'instances_val2017.json'))
    for kind in ('bbox', 'segm'):
        detections = json.loads(next((tmp_path / 'eval').rglob(f'detections_{kind}.json')).read_text())
        assert detections and {d['image_id'] for d in detections} <= set(gt.getImgIds())
        gt.loadRes(detections)  # COCO's results format


def test_bf16_autocast_trains_and_evaluates(tmp_path, det_micro_cfg, coco):
    result = run_main(['--cfg', det_micro_cfg, '--data-path', coco, '--device', 'cpu', '--output', tmp_path,
                       '--amp-dtype', 'bf16', '--opts', 'TRAIN.EPOCHS', '1'])
    assert result.returncode == 0, result.stdout + result.stderr
    losses = [float(x) for x in re.findall(r'\tloss (\S+) ', result.stdout)]
    assert len(losses) == 4 and all(math.isfinite(v) for v in losses) and len(_ap_lines(result.stdout)) == 1


@pytest.mark.slow
def test_cascade_trains_on_two_gloo_ranks_and_they_evaluate_exactly_as_one_process(tmp_path, det_micro_cfg, coco):
    # the cascade's box heads hold BatchNorm, synchronised over the ranks in training
    common = ['--cfg', det_micro_cfg, '--data-path', coco, '--device', 'cpu']
    cascade = ['DET.DETECTOR', 'cascade_mask_rcnn']
    trained = run_main(common + ['--output', tmp_path / 'train', '--batch-size', '1',
                                 '--opts', 'TRAIN.EPOCHS', '1', *cascade], launcher=TORCHRUN)
    assert trained.returncode == 0, trained.stdout + trained.stderr
    assert 'Cascade Mask R-CNN (3 stages)' in trained.stdout and 'loss_classifier_stage2' in trained.stdout
    ckpt = tmp_path / 'train' / 'det_micro' / 'default' / 'ckpt_epoch_0.pth'
    runs = {}
    for name, launcher in (('one', None), ('two', TORCHRUN)):
        result = run_main(common + ['--output', tmp_path / name, '--eval', '--resume', ckpt,
                                    '--opts', 'DET.SAVE_RESULTS', 'True', *cascade], launcher=launcher)
        assert result.returncode == 0, result.stdout + result.stderr
        folder = tmp_path / name / 'det_micro' / 'default'
        runs[name] = (json.loads((folder / 'eval_metrics.json').read_text())['val'],
                      (folder / 'detections_bbox.json').read_bytes(), (folder / 'detections_segm.json').read_bytes())
    assert runs['two'][0]['count'] == runs['one'][0]['count'] == 5
    assert runs['two'][0]['bbox_stats'] == runs['one'][0]['bbox_stats']
    assert runs['two'][0]['segm_stats'] == runs['one'][0]['segm_stats']
    assert runs['two'][1:] == runs['one'][1:] and len(json.loads(runs['one'][1])) > 5  # the same detections


@pytest.mark.slow
def test_sigkill_mid_epoch_then_the_same_command_ends_bit_identical(tmp_path, det_micro_cfg, coco):
    # 2 epochs of 4 updates, a checkpoint after every update, 2 loader workers (their resize and flip draws
    # must resume too); the reference runs uninterrupted in its own process
    opts = ['--opts', 'TRAIN.CKPT_STEPS', '1', 'TRAIN.KEEP_CKPTS', '3', 'DATA.NUM_WORKERS', '2']
    args = ['--cfg', det_micro_cfg, '--data-path', coco, '--device', 'cpu']
    _finish([sys.executable, str(REPO / 'main.py')] + args + ['--output', tmp_path / 'whole'] + opts,
            tmp_path / 'whole.log')
    command = [sys.executable, str(REPO / 'main.py')] + args + ['--output', tmp_path / 'cut'] + opts
    run_dir = tmp_path / 'cut' / 'det_micro' / 'default'

    killed = _start(command, tmp_path / 'kill.log')  # SIGKILL once epoch 1's second update is on disk
    _wait_for(killed, tmp_path / 'kill.log', 'saved ckpt_epoch_1_step_2.pth')
    killed.kill()
    assert killed.wait() == -signal.SIGKILL
    assert not (run_dir / 'ckpt_epoch_1.pth').exists()

    final = _finish(command, tmp_path / 'final.log')
    assert f'resuming from {run_dir / "ckpt_epoch_1_step_2.pth"}' in final
    one = torch.load(tmp_path / 'whole' / 'det_micro' / 'default' / 'ckpt_epoch_1.pth', weights_only=True)
    two = torch.load(run_dir / 'ckpt_epoch_1.pth', weights_only=True)
    for key in ('model', 'optimizer', 'lr_scheduler', 'rng'):
        assert _equal(one[key], two[key]), key
    assert _ap_lines(final)[-1] == _ap_lines((tmp_path / 'whole.log').read_text())[-1]


def _annotations(root: Path, split: str = 'val') -> tuple:
    path = root / 'annotations' / f'instances_{split}2017.json'
    return path, json.loads(path.read_text())


def _bad_json(root: Path) -> str:
    path, _ = _annotations(root)
    path.write_text('{"images": [')
    return 'instances_val2017.json'


def _no_annotations_list(root: Path) -> str:
    path, data = _annotations(root)
    del data['annotations']
    path.write_text(json.dumps(data))
    return "annotations"


def _missing_image_file(root: Path) -> str:
    _, data = _annotations(root, 'train')
    name = data['images'][3]['file_name']
    os.remove(root / 'train2017' / name)
    return name


def _unknown_category(root: Path) -> str:
    path, data = _annotations(root)
    data['annotations'][1]['category_id'] = 99
    path.write_text(json.dumps(data))
    return f'annotation id {data["annotations"][1]["id"]} has category_id 99'


@pytest.mark.parametrize('spoil', [_bad_json, _no_annotations_list, _missing_image_file, _unknown_category])
def test_bad_data_is_named_with_exit_code_2_and_nothing_in_the_run_folder_is_lost(tmp_path, det_micro_cfg, coco,
                                                                                  spoil):
    run_dir = tmp_path / 'out' / 'det_micro' / 'default'
    run_dir.mkdir(parents=True)
    (run_dir / 'ckpt_epoch_0.pth').write_bytes(b'an earlier run')
    fragment = spoil(coco)
    result = run_main(['--cfg', det_micro_cfg, '--data-path', coco, '--device', 'cpu', '--output', tmp_path / 'out'])
    text = result.stdout + result.stderr
    assert result.returncode == 2, text
    assert 'DataError' in text and fragment in text and 'Traceback' not in text
    assert sorted(p.name for p in run_dir.glob('*.pth')) == ['ckpt_epoch_0.pth']
    assert (run_dir / 'ckpt_epoch_0.pth').read_bytes() == b'an earlier run'


def test_shipped_demo_config_writes_its_data_and_runs(tmp_path, fashion_mnist_dir):
    """configs/demo/det_flatten_swin_fmnist.yaml as shipped, cut to 8 updates and 10 validation canvases: it
    writes its COCO folder (2,000 + 200 canvases of 128x160) where DATA.DATA_PATH says, trains on it and scores
    it (the full demo's time and AP: docs/detection.md, "The demo")."""
    data = tmp_path / 'fmnist_coco'
    result = run_main(['--cfg', REPO / 'configs' / 'demo' / 'det_flatten_swin_fmnist.yaml', '--output', tmp_path,
                       '--opts', 'DATA.DATA_PATH', data, 'DATA.TRAIN_SUBSET', '32', 'DATA.VAL_SUBSET', '10',
                       'TRAIN.EPOCHS', '1', 'DATA.NUM_WORKERS', '0'])
    assert result.returncode == 0, result.stdout + result.stderr
    assert 'wrote 2000 train + 200 val canvases of 128x160' in result.stdout
    assert 'start training: epoch 0 update 0 of 1 epochs x 8 updates' in result.stdout
    assert len(_ap_lines(result.stdout)) == 1 and 'box AP of the network on the 10 val images' in result.stdout
    assert (tmp_path / 'mask_rcnn_flatten_swin_micro_fmnist' / 'default' / 'ckpt_epoch_0.pth').is_file()
