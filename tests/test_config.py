"""Config: official yaml files, BASE inheritance, --opts, frozen results, clear errors."""
from __future__ import annotations

from pathlib import Path

import pytest
from conftest import ASSETS, REPO
from yacs.config import CfgNode

from config import ConfigError, config_from_yaml_text, config_to_yaml, load_config, scale_lr

OFFICIAL_CFGS = sorted((ASSETS / 'official_cfgs').glob('*.yaml'))

# docs/training.md, "Official configuration files":
# yaml -> (MODEL.TYPE, IMG, batch/GPU, epochs, warmup, cooldown, 8-GPU base LR, WD, clip, drop path)
SPEC_TABLE = {
    'flatten_swin_t': ('flatten_swin', 224, 128, 300, 20, 0, 1e-3, 0.05, 5.0, 0.2),
    'flatten_swin_s': ('flatten_swin', 224, 128, 300, 20, 0, 1e-3, 0.05, 5.0, 0.3),
    'flatten_swin_b': ('flatten_swin', 224, 64, 300, 20, 0, 5e-4, 0.05, 5.0, 0.5),
    'flatten_swin_b_384': ('flatten_swin', 384, 32, 30, 5, 0, 1e-5, 1e-8, 5.0, 0.5),
    'flatten_pvt_t': ('flatten_pvt_tiny', 224, 128, 300, 5, 10, 1e-3, 0.05, None, 0.1),
    'flatten_pvt_s': ('flatten_pvt_small', 224, 64, 300, 5, 10, 5e-4, 0.05, None, 0.1),
    'flatten_pvt_m': ('flatten_pvt_medium', 224, 64, 300, 5, 10, 5e-4, 0.05, 1.0, 0.3),
    'flatten_pvt_b': ('flatten_pvt_large', 224, 32, 300, 5, 10, 2.5e-4, 0.05, 1.0, 0.3),
    'flatten_pvt_v2_b0': ('flatten_pvt_v2_b0', 224, 128, 300, 5, 10, 1e-3, 0.05, None, 0.1),
    'flatten_pvt_v2_b1': ('flatten_pvt_v2_b1', 224, 128, 300, 5, 10, 1e-3, 0.05, None, 0.1),
    'flatten_pvt_v2_b2': ('flatten_pvt_v2_b2', 224, 128, 300, 5, 10, 1e-3, 0.05, None, 0.1),
    'flatten_pvt_v2_b3': ('flatten_pvt_v2_b3', 224, 128, 300, 5, 10, 1e-3, 0.05, 1.0, 0.3),
    'flatten_pvt_v2_b4': ('flatten_pvt_v2_b4', 224, 64, 300, 5, 10, 5e-4, 0.05, 1.0, 0.3),
    'flatten_cswin_t': ('FLatten_CSWin_64_24181_tiny_224', 224, 256, 300, 20, 10, 2e-3, 0.05, None, 0.2),
    'flatten_cswin_s': ('FLatten_CSWin_64_24322_small_224', 224, 128, 300, 20, 10, 1e-3, 0.05, None, 0.4),
    'flatten_cswin_b': ('FLatten_CSWin_96_36292_base_224', 224, 64, 300, 20, 10, 5e-4, 0.1, None, 0.5),
    'flatten_cswin_b_384': ('FLatten_CSWin_96_36292_base_384', 384, 32, 20, 0, 10, 2.5e-6, 1e-8, None, 0.7),
}


def test_all_seventeen_official_cfgs_are_present():
    assert sorted(p.stem for p in OFFICIAL_CFGS) == sorted(SPEC_TABLE)


@pytest.mark.parametrize('path', OFFICIAL_CFGS, ids=lambda p: p.stem)
def test_official_yaml_loads_unchanged(path):
    cfg = load_config(str(path))
    assert cfg.is_frozen()
    model_type, img, batch, epochs, warmup, cooldown, lr8, wd, clip, drop_path = SPEC_TABLE[path.stem]
    assert cfg.MODEL.TYPE == model_type
    assert (cfg.DATA.IMG_SIZE, cfg.DATA.BATCH_SIZE) == (img, batch)
    assert (cfg.TRAIN.EPOCHS, cfg.TRAIN.WARMUP_EPOCHS, cfg.TRAIN.COOLDOWN_EPOCHS) == (epochs, warmup, cooldown)
    assert cfg.TRAIN.WEIGHT_DECAY == pytest.approx(wd)
    assert cfg.TRAIN.CLIP_GRAD == clip  # the yaml's "None" string becomes None, as in the official code
    assert cfg.MODEL.DROP_PATH_RATE == pytest.approx(drop_path)
    assert scale_lr(cfg, world_size=8).TRAIN.BASE_LR == pytest.approx(lr8)
    assert (cfg.MODEL.LA.FOCUSING_FACTOR, cfg.MODEL.LA.KERNEL_SIZE) == (3, 5)


def test_cswin_384_split_sizes_stay_a_string():
    cfg = load_config(str(ASSETS / 'official_cfgs' / 'flatten_cswin_b_384.yaml'))
    assert cfg.MODEL.LA.CSWIN_LA_SPLIT_SIZE == '96-48-24-12'
    assert cfg.MODEL.LA.PVT_LA_SR_RATIOS == 1111


@pytest.mark.parametrize('path', sorted((REPO / 'configs').rglob('*.yaml')), ids=lambda p: p.stem)
def test_project_configs_load(path):
    load_config(str(path))


def test_project_swin_configs_equal_the_official_ones():
    for name in ('flatten_swin_t', 'flatten_swin_s', 'flatten_swin_b', 'flatten_swin_b_384'):
        ours = load_config(str(REPO / 'configs' / f'{name}.yaml'))
        official = load_config(str(ASSETS / 'official_cfgs' / f'{name}.yaml'))
        assert config_to_yaml(ours) == config_to_yaml(official), name


def test_defaults_are_the_official_ones():
    cfg = load_config(None)
    assert (cfg.TRAIN.BASE_LR, cfg.TRAIN.WARMUP_LR, cfg.TRAIN.MIN_LR) == (5e-4, 5e-7, 5e-6)
    assert (cfg.DATA.BATCH_SIZE, cfg.TRAIN.EPOCHS, cfg.TRAIN.WARMUP_EPOCHS, cfg.TRAIN.CLIP_GRAD) == (128, 300, 20, 5.0)
    assert cfg.AUG.AUTO_AUGMENT == 'rand-m9-mstd0.5-inc1' and cfg.AUG.MIXUP == 0.8 and cfg.AUG.CUTMIX == 1.0
    assert cfg.MODEL.LA.ATTN_TYPE == 'LLLL' and cfg.MODEL.LABEL_SMOOTHING == 0.1


def _write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return str(path)


def test_base_inheritance_relative_to_the_file(tmp_path):
    _write(tmp_path / 'base' / 'common.yaml', 'DATA:\n  BATCH_SIZE: 32\n  IMG_SIZE: 192\nTRAIN:\n  EPOCHS: 7\n')
    child = _write(tmp_path / 'exp' / 'child.yaml', "BASE: ['../base/common.yaml']\nDATA:\n  IMG_SIZE: 160\n")
    cfg = load_config(child)
    assert (cfg.DATA.BATCH_SIZE, cfg.DATA.IMG_SIZE, cfg.TRAIN.EPOCHS) == (32, 160, 7)


def test_base_cycle_is_reported(tmp_path):
    a = _write(tmp_path / 'a.yaml', "BASE: ['b.yaml']\n")
    _write(tmp_path / 'b.yaml', "BASE: ['a.yaml']\n")
    with pytest.raises(ConfigError, match='cycle'):
        load_config(a)


def test_opts_override_and_freeze():
    cfg = load_config(str(REPO / 'configs' / 'flatten_swin_t.yaml'),
                      ['DATA.BATCH_SIZE', '16', 'MODEL.LA.ATTN_TYPE', 'LLLS', 'TAG', '1'])
    assert (cfg.DATA.BATCH_SIZE, cfg.MODEL.LA.ATTN_TYPE) == (16, 'LLLS')
    with pytest.raises(AttributeError):
        cfg.DATA.BATCH_SIZE = 3


def test_yaml_round_trip():
    cfg = load_config(str(REPO / 'configs' / 'demo' / 'flatten_swin_fmnist.yaml'))
    again = config_from_yaml_text(config_to_yaml(cfg))
    assert again == cfg and isinstance(again, CfgNode)


@pytest.mark.parametrize('text, message', [
    ('MODEL:\n  DROP_PATH: 0.2\n', "unknown config key 'MODEL.DROP_PATH'. Did you mean: MODEL.DROP_PATH_RATE"),
    ('TRAIN:\n  EPOCHS: three\n', "wrong value type for 'TRAIN.EPOCHS'"),
    ('DATA:\n  BATCH_SIZE: [1, 2]\n', "wrong value type for 'DATA.BATCH_SIZE'"),
    ('- a\n- b\n', 'must be a YAML mapping'),
    ('MODEL: [unclosed\n', 'is not valid YAML'),
    ('AMP_DTYPE: fp8\n', "AMP_DTYPE must be one of 'fp16', 'bf16', got 'fp8'"),
    ('TASK: detect\n', "TASK must be one of 'classification', 'segmentation', 'detection', got 'detect'"),
    ('SEG:\n  TEST_MODE: sliding\n', "SEG.TEST_MODE must be one of 'whole', 'slide'"),
    ('TRAIN:\n  ITERS: 100\n  EVAL_PERIOD: 30\n', 'TRAIN.ITERS=100 is not a multiple of TRAIN.EVAL_PERIOD=30'),
    ('TASK: segmentation\n', 'TASK segmentation trains on an iteration schedule: set TRAIN.ITERS'),
    ('DET:\n  TRAIN_SCALES: [1333, 800]\n', 'DET.TRAIN_SCALES=[1333, 800] must be a non-empty list of [long side, '
                                          'short side] pairs'),
    ('DET:\n  CROP_SCALES: [[1333, 0]]\n', 'DET.CROP_SCALES=[[1333, 0]] must be a non-empty list'),
    ('DET:\n  CASCADE_WEIGHTS: [1.0, 0.5]\n', 'DET.CASCADE_IOUS has 3 stages but DET.CASCADE_WEIGHTS 2'),
    ('DET:\n  DETECTOR: retinanet\n', "DET.DETECTOR must be one of 'mask_rcnn', 'cascade_mask_rcnn'"),
    ('TRAIN:\n  LR_SCHEDULER:\n    NAME: multistep\n    MILESTONES: [11, 8]\n',
     'TRAIN.LR_SCHEDULER.MILESTONES=[11, 8] must be increasing positive whole epochs'),
])
def test_bad_files_name_the_problem(tmp_path, text, message):
    path = _write(tmp_path / 'bad.yaml', text)
    with pytest.raises(ConfigError, match=message.replace('[', r'\[').replace('.', r'\.')) as info:
        load_config(path)
    assert 'bad.yaml' in str(info.value) or message.split()[0] in str(info.value)


def test_bad_opts_name_the_key():
    with pytest.raises(ConfigError, match="--opts: unknown config key 'TRAIN.EPOCH'"):
        load_config(None, ['TRAIN.EPOCH', '3'])
    with pytest.raises(ConfigError, match='odd number'):
        load_config(None, ['TRAIN.EPOCHS'])
    with pytest.raises(ConfigError, match='config file not found'):
        load_config('no/such/file.yaml')


def test_legacy_keys_are_accepted_and_ignored(tmp_path):
    path = _write(tmp_path / 'legacy.yaml', 'MODEL:\n  SWIN:\n    KA: 7\n  SWIN_HR:\n    ANYTHING: 1\n')
    assert load_config(path).MODEL.SWIN.KA == 7


def test_scale_lr_is_linear_in_global_batch():
    cfg = load_config(None, ['DATA.BATCH_SIZE', '64', 'TRAIN.ACCUMULATION_STEPS', '2'])
    scaled = scale_lr(cfg, world_size=4)
    factor = 64 * 4 * 2 / 512
    assert scaled.TRAIN.BASE_LR == pytest.approx(5e-4 * factor)
    assert scaled.TRAIN.WARMUP_LR == pytest.approx(5e-7 * factor)
    assert scaled.TRAIN.MIN_LR == pytest.approx(5e-6 * factor)
    assert cfg.TRAIN.BASE_LR == 5e-4 and scaled.is_frozen()
