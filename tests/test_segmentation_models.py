"""Segmentors (models/segmentation.py): UperNet and Semantic FPN on every backbone family, the auxiliary
head, odd input sizes, gradients, the Table 1 configs' parameter counts, pretrained loading, bad keys."""
from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import REPO, read_inventory

import models
from config import ConfigError, load_config
from models.segmentation import FCNHead, Segmentor, SemanticFPNHead, UperNetHead
from tools.model_table import PAPER_TABLE1, segmentation_configs
from utils.checkpoint import CheckpointError, load_pretrained
from utils.optimizer import param_groups

NUM_CLASSES = 5
# A micro FLatten-Swin segmentor: four stages 8-16-32-64 wide, global focused linear attention in
# stages 1-2 at the 64² build size, softmax windows of 2 in stages 3-4
MICRO = ['TASK', 'segmentation', 'TRAIN.ITERS', '10', 'TRAIN.EVAL_PERIOD', '10', 'DATA.IMG_SIZE', '64',
         'MODEL.NUM_CLASSES', str(NUM_CLASSES), 'MODEL.DROP_PATH_RATE', '0.0', 'MODEL.TYPE', 'flatten_swin',
         'MODEL.SWIN.EMBED_DIM', '8', 'MODEL.SWIN.DEPTHS', '[1, 1, 1, 1]', 'MODEL.SWIN.NUM_HEADS', '[1, 1, 2, 2]',
         'MODEL.SWIN.WINDOW_SIZE', '16', 'MODEL.SWIN.SOFTMAX_WINDOW_SIZE', '2', 'MODEL.LA.ATTN_TYPE', 'LLSS',
         'SEG.CHANNELS', '16', 'SEG.FPN_CHANNELS', '12', 'SEG.AUX_CHANNELS', '8']
ODD_SIZE = (45, 71)  # stride-4 map ⌈45/4⌉ × ⌈71/4⌉ = 12 × 18, stage 2 (stride 16) 3 × 5


def micro(*opts: str) -> Segmentor:
    torch.manual_seed(0)
    return models.build_model(load_config(None, MICRO + list(opts)))


@pytest.mark.parametrize('decoder', ['upernet', 'fpn'])
@pytest.mark.parametrize('aux_weight', ['0.4', '0.0'])
def test_output_shapes_in_train_and_eval(decoder, aux_weight):
    model = micro('SEG.DECODER', decoder, 'SEG.AUX_WEIGHT', aux_weight)
    assert (model.aux_head is not None) == (aux_weight != '0.0')
    images = torch.randn(2, 3, *ODD_SIZE)
    out = model.train()(images)
    assert sorted(out) == (['aux', 'main'] if aux_weight != '0.0' else ['main'])
    assert out['main'].shape == (2, NUM_CLASSES, 12, 18)
    if 'aux' in out:
        assert out['aux'].shape == (2, NUM_CLASSES, 3, 5)
    calls = []
    if model.aux_head is not None:
        model.aux_head.register_forward_hook(lambda *args: calls.append(1))
    with torch.no_grad():
        logits = model.eval()(images)
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, NUM_CLASSES, 12, 18)
    assert calls == []  # the auxiliary head does not run in eval mode


@pytest.mark.parametrize('model_type', ['pvt_tiny', 'flatten_pvt_tiny', 'CSWin_64_12211_tiny_224',
                                        'FLatten_CSWin_64_24181_tiny_224'])
@pytest.mark.parametrize('size', [(66, 99), (64, 128)])
def test_every_family_gives_the_ceil_quarter_map(model_type, size):
    """CSwin's 7×7 stride-4 stem alone would give ⌊(H - 3)/4⌋ + 1 rows (16 of 66): the segmentor pads."""
    model = micro('MODEL.TYPE', model_type, 'DATA.IMG_SIZE', '224', 'SEG.DECODER', 'fpn').eval()
    with torch.no_grad():
        logits = model(torch.randn(1, 3, *size))
    assert logits.shape == (1, NUM_CLASSES, -(-size[0] // 4), -(-size[1] // 4))


@pytest.mark.parametrize('decoder', ['upernet', 'fpn'])
def test_gradients_reach_every_parameter(decoder):
    model = micro('SEG.DECODER', decoder, 'SEG.AUX_WEIGHT', '0.4', 'SEG.DROPOUT', '0.0').train()
    out = model(torch.randn(2, 3, *ODD_SIZE))
    (out['main'].square().mean() + 0.4 * out['aux'].square().mean()).backward()
    missing = [name for name, p in model.named_parameters() if (p.grad is None) or not p.grad.abs().sum() > 0]
    assert missing == []
    assert model.unused_parameters() == set()


def test_upernet_is_mmsegs_upperhead():
    head = micro('SEG.DECODER', 'upernet').decode_head
    assert isinstance(head, UperNetHead)
    decoder = head.decoder
    assert [block[0].output_size for block in decoder.psp.blocks] == [1, 2, 3, 6]
    assert [norm.eps for norm in decoder.feature_norms] == [1e-5] * 4  # mmseg's backbone output LayerNorms
    convs = [m for m in decoder.modules() if isinstance(m, nn.Conv2d)]
    assert all(conv.bias is None for conv in convs)  # conv-BN-ReLU, as mmseg's ConvModule
    # 4 PPM, the PPM bottleneck, 3 laterals, 3 FPN convs, the fusion conv
    assert len(convs) == 4 + 1 + 3 + 3 + 1
    assert isinstance(head.dropout, nn.Dropout2d) and head.conv_seg.bias is not None


def test_other_pool_scales_are_honoured():
    model = micro('SEG.POOL_SCALES', '[1, 2, 4]')
    assert [block[0].output_size for block in model.decode_head.decoder.psp.blocks] == [1, 2, 4]
    assert model.decode_head.decoder.psp.out_conv[0].in_channels == 64 + 3 * 16
    assert model.eval()(torch.randn(1, 3, *ODD_SIZE)).shape == (1, NUM_CLASSES, 12, 18)


def test_semantic_fpn_is_mmsegs_fpn_and_fpnhead():
    head = micro('SEG.DECODER', 'fpn').decode_head
    assert isinstance(head, SemanticFPNHead)
    convs_per_level = [sum(isinstance(m, nn.Conv2d) for m in level.modules()) for level in head.scale_heads]
    upsamples = [sum(isinstance(m, nn.Upsample) for m in level.modules()) for level in head.scale_heads]
    assert convs_per_level == [1, 1, 2, 3] and upsamples == [0, 1, 2, 3]
    neck_convs = [m for m in head.neck.modules() if isinstance(m, nn.Conv2d)]
    assert len(neck_convs) == 8 and all(conv.bias is not None for conv in neck_convs)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in head.neck.modules())
    assert [conv.kernel_size for conv in neck_convs] == [(1, 1)] * 4 + [(3, 3)] * 4


def test_auxiliary_head_is_fcnhead_on_the_stage():
    model = micro('SEG.AUX_STAGE', '1')
    assert isinstance(model.aux_head, FCNHead)
    conv = model.aux_head.convs[0]
    assert (conv.in_channels, conv.out_channels, conv.kernel_size, conv.bias) == (16, 8, (3, 3), None)
    assert model.train()(torch.randn(2, 3, *ODD_SIZE))['aux'].shape == (2, NUM_CLASSES, 6, 9)


def test_no_weight_decay_names_are_the_segmentors():
    model = micro('MODEL.TYPE', 'pvt_tiny', 'DATA.IMG_SIZE', '224')
    names = dict(model.named_parameters())
    assert model.no_weight_decay() == {'backbone.model.cls_token'} and 'backbone.model.cls_token' in names
    decayed, exempt = param_groups(model, 0.01)
    assert any(p is names['backbone.model.cls_token'] for p in exempt['params'])
    swin = micro()
    assert swin.no_weight_decay_keywords() == {'relative_position_bias_table'}


def test_classification_configs_still_build_classifiers():
    model = models.build_model(load_config(None, MICRO[2:] + ['TRAIN.ITERS', '0']))  # TASK classification
    assert not isinstance(model, Segmentor) and model.num_classes == NUM_CLASSES


@pytest.mark.parametrize('opts, key', [
    (['SEG.AUX_STAGE', '4'], 'SEG.AUX_STAGE'),
    (['MODEL.TYPE', 'deit', 'DATA.IMG_SIZE', '32', 'MODEL.DEIT.EMBED_DIM', '16', 'MODEL.DEIT.DEPTH', '4',
      'MODEL.DEIT.NUM_HEADS', '1'], 'MODEL.TYPE'),
])
def test_bad_keys_raise_value_errors_naming_the_key(opts, key):
    with pytest.raises(ValueError, match=key.replace('.', r'\.')):
        micro(*opts)


def test_bad_decoder_is_refused_by_name():
    with pytest.raises(ConfigError, match=r'SEG\.DECODER'):
        micro('SEG.DECODER', 'deeplab')


# ---------------------------------------------------------------------------------------------
# The Table 1 configs (full-size models: about a second each to build on 2 CPU cores)
# ---------------------------------------------------------------------------------------------

def test_bases_are_not_models():
    stems = {path.stem for path in segmentation_configs()}
    assert set(PAPER_TABLE1) <= stems and not any(stem.startswith('base_') for stem in stems)


@pytest.mark.parametrize('path', segmentation_configs(), ids=lambda p: p.stem)
def test_config_parameters_match_table1(path: Path):
    model = models.build_model(load_config(str(path)))
    assert isinstance(model, Segmentor) and model.num_classes == 150
    params = sum(p.numel() for p in model.parameters())
    if path.stem in PAPER_TABLE1:
        paper = float(PAPER_TABLE1[path.stem][0]) * 1e6
        assert abs(params - paper) <= 0.03 * paper, (path.stem, params)
    assert model.unused_parameters() == set()


def _official_file(tmp_path: Path, inventory: str) -> Path:
    """An official-format checkpoint of `inventory`'s keys and shapes, random values."""
    generator = torch.Generator().manual_seed(0)
    state = {key: (torch.randn(shape, generator=generator) if not key.endswith('relative_position_index')
                   else torch.zeros(shape, dtype=torch.long)) for key, shape in read_inventory(inventory)}
    path = tmp_path / f'{inventory}.pth'
    torch.save({'model': state, 'epoch': 300, 'max_accuracy': 0.0}, path)
    return path


@pytest.mark.parametrize('config, inventory, skipped', [
    ('upernet_flatten_swin_t', 'flatten_swin_t', {'head.weight', 'head.bias', 'norm.weight', 'norm.bias'}),
    ('fpn_flatten_pvt_t', 'flatten_pvt_t', {'head.weight', 'head.bias', 'norm.weight', 'norm.bias'}),
])
def test_pretrained_classifier_loads_into_the_backbone(tmp_path, caplog, config, inventory, skipped):
    path = _official_file(tmp_path, inventory)
    model = models.build_model(load_config(str(REPO / 'configs' / 'ade20k' / f'{config}.yaml')))
    decoder_before = {k: v.clone() for k, v in model.state_dict().items() if not k.startswith('backbone.')}
    with caplog.at_level(logging.INFO, logger='flatten.checkpoint'):
        report = load_pretrained(model, str(path))
    file_state = torch.load(path, weights_only=True)['model']
    own = model.state_dict()
    backbone_keys = [k for k in own if k.startswith('backbone.model.')]
    assert sorted(report.loaded) == sorted(backbone_keys)
    for key in backbone_keys:
        name = key[len('backbone.model.'):]
        if not name.endswith(('relative_position_index', 'attn_mask')):
            assert torch.equal(own[key], file_state[name]), key
    assert set(report.dropped) == skipped
    assert sorted(report.not_loaded) == sorted(decoder_before)
    assert all(torch.equal(own[k], v) for k, v in decoder_before.items())
    lines = [r.getMessage() for r in caplog.records if 'loaded pretrained weights' in r.getMessage()]
    assert len(lines) == 1 and 'head' in lines[0] and 'decode_head' in lines[0] and str(path) in lines[0]


def test_pretrained_that_matches_nothing_names_the_file(tmp_path):
    path = _official_file(tmp_path, 'flatten_swin_t')
    model = models.build_model(load_config(str(REPO / 'configs' / 'ade20k' / 'fpn_flatten_pvt_t.yaml')))
    with pytest.raises(CheckpointError, match='flatten_swin_t.pth'):
        load_pretrained(model, str(path))


def test_pretrained_of_a_deeper_backbone_is_refused(tmp_path):
    """Swin-S's stage 3 has 18 blocks: into FLatten-Swin-T's 6 its extra ones are unexpected, not skipped."""
    path = _official_file(tmp_path, 'flatten_swin_s')
    model = models.build_model(load_config(str(REPO / 'configs' / 'ade20k' / 'upernet_flatten_swin_t.yaml')))
    with pytest.raises(CheckpointError, match=r'flatten_swin_s\.pth.*unexpected'):
        load_pretrained(model, str(path))
