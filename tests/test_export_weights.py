"""tools/export_weights.py: a checkpoint in timm's hub layout (model.safetensors + config.json) that
timm, utils.checkpoint.load_pretrained and torch_load read back into a model with identical logits."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from safetensors import safe_open

import models  # noqa: F401  (registers the variants in timm)
from config import config_to_yaml, load_config
from models import build_model
from tests.conftest import MICRO_YAML
from tools.export_weights import main as export_main
from utils.checkpoint import CheckpointError, load_checkpoint, load_pretrained, save_checkpoint, torch_load

# the micro FLatten-Swin of the CLI tests (a global L stage, a softmax stage with its
# relative_position_index), with a 10-class head so that config.json must carry num_classes
MICRO_10_YAML = MICRO_YAML.replace('  TYPE: flatten_swin\n', '  TYPE: flatten_swin\n  NUM_CLASSES: 10\n')
ARCHITECTURE = 'flatten_swin_tiny_patch4_224'


@pytest.fixture(scope='module')
def exported(tmp_path_factory):
    """A trained-looking micro model, its checkpoints (ours with EMA, official layout) and both exports."""
    root = tmp_path_factory.mktemp('export')
    cfg_path = root / 'micro10.yaml'
    cfg_path.write_text(MICRO_10_YAML)
    cfg = load_config(str(cfg_path))
    torch.manual_seed(0)
    model, ema_model = build_model(cfg).eval(), build_model(cfg).eval()
    with torch.no_grad():  # weights no initialisation gives (the head is zero-initialised)
        for param in list(model.parameters()) + list(ema_model.parameters()):
            param.normal_(0.0, 0.2)

    class Ema:  # what save_checkpoint reads of timm's ModelEmaV3
        module = ema_model

    ours, official = root / 'ours.pth', root / 'official.pth'
    save_checkpoint(str(ours), model=model, epoch=3, max_accuracy=1.0, config_yaml=config_to_yaml(cfg), ema=Ema())
    torch.save({'model': model.state_dict()}, official)
    images = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        logits, ema_logits = model(images), ema_model(images)
    dirs = {'ours': root / 'ours_hub', 'ema': root / 'ema_hub', 'official': root / 'official_hub'}
    assert export_main([str(ours), str(dirs['ours'])]) == 0
    assert export_main([str(ours), str(dirs['ema']), '--ema']) == 0
    assert export_main([str(official), str(dirs['official']), '--cfg', str(cfg_path)]) == 0
    return dict(root=root, cfg=cfg, cfg_path=cfg_path, model=model, images=images, logits=logits,
                ema_logits=ema_logits, ours=ours, official=official, dirs=dirs)


def _logits(model, images):
    with torch.no_grad():
        return model.eval()(images)


def test_file_is_plain_safetensors_of_the_model_state_dict(exported):
    path = exported['dirs']['ours'] / 'model.safetensors'
    assert path.read_bytes()[8:9] == b'{'  # a JSON header after its 8-byte length, not a pickle / zip
    with safe_open(str(path), framework='pt') as f:
        keys = list(f.keys())
        assert f.metadata() == {'format': 'pt'}
        tensors = {key: f.get_tensor(key) for key in keys}
    own = exported['model'].state_dict()
    assert sorted(keys) == sorted(own)
    assert any(key.endswith('relative_position_index') for key in keys)  # the strict load needs it
    for key, value in own.items():
        assert torch.equal(tensors[key], value), key


def test_config_json_is_timm_hub_layout(exported):
    config = json.loads((exported['dirs']['ours'] / 'config.json').read_text())
    assert config['architecture'] == ARCHITECTURE
    assert config['num_classes'] == 10
    assert config['num_features'] == exported['model'].num_features
    assert config['pretrained_cfg']['num_classes'] == 10
    assert config['pretrained_cfg']['input_size'] == [3, 32, 32]
    args = config['model_args']
    assert (args['num_classes'], args['img_size'], args['embed_dim'], args['patch_size']) == (10, [32, 32], 16, 2)
    assert 'drop_path_rate' not in args  # training-only arguments are left out
    # the official file with --cfg of the same model: the same export
    assert json.loads((exported['dirs']['official'] / 'config.json').read_text()) == config


@pytest.mark.parametrize('which', ['ours', 'official', 'ema'])
def test_timm_loads_the_export_with_identical_logits(exported, which):
    expected = exported['ema_logits'] if which == 'ema' else exported['logits']
    folder = exported['dirs'][which]
    # timm's local folder: config.json rebuilds the model (model_args) and its weights are the folder's
    model = timm.create_model(f'local-dir:{folder}', pretrained=True)
    assert model.pretrained_cfg['source'] == 'local-dir'
    assert torch.equal(_logits(model, exported['images']), expected)
    # the variant with the model's arguments and the file as pretrained_cfg's 'file'
    args = json.loads((folder / 'config.json').read_text())['model_args']
    model = timm.create_model(ARCHITECTURE, pretrained=True,
                              pretrained_cfg_overlay=dict(file=str(folder / 'model.safetensors')), **args)
    assert torch.equal(_logits(model, exported['images']), expected)


def test_our_loaders_read_the_safetensors_file(exported):
    path = str(exported['dirs']['ours'] / 'model.safetensors')
    assert set(torch_load(path)) == {'model'}
    model = build_model(exported['cfg'])
    load_pretrained(model, path)  # main.py --pretrained
    assert torch.equal(_logits(model, exported['images']), exported['logits'])
    model = build_model(exported['cfg'])
    info = load_checkpoint(path, model)  # main.py --eval --resume
    assert info['epoch'] == 0
    assert torch.equal(_logits(model, exported['images']), exported['logits'])


def test_bad_inputs_exit_2_naming_the_file(exported, tmp_path, capsys):
    out = str(tmp_path / 'out')
    wider = tmp_path / 'wider.yaml'
    wider.write_text(MICRO_10_YAML.replace('EMBED_DIM: 16', 'EMBED_DIM: 24'))
    cases = [
        ([str(tmp_path / 'missing.pth'), out], 'missing.pth'),
        ([str(tmp_path / 'garbage.pth'), out], 'garbage.pth'),
        ([str(tmp_path / 'garbage.safetensors'), out], 'garbage.safetensors'),
        ([str(exported['official']), out], 'official.pth'),  # no config stored: --model or --cfg needed
        ([str(exported['official']), out, '--model', 'flatten_swin_tiny_patch4_22'], 'flatten_swin_tiny_patch4_224'),
        ([str(exported['official']), out, '--cfg', str(wider)], 'official.pth'),  # keys do not fit
        ([str(exported['official']), out, '--cfg', str(exported['cfg_path']), '--ema'], 'official.pth'),
    ]
    (tmp_path / 'garbage.pth').write_bytes(b'not a checkpoint')
    (tmp_path / 'garbage.safetensors').write_bytes(b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": 1')
    for argv, named in cases:
        assert export_main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith('ERROR ') and (named in err) and ('Traceback' not in err), (argv, err)
    assert not Path(out).exists()
    with pytest.raises(CheckpointError, match='garbage.safetensors'):
        torch_load(str(tmp_path / 'garbage.safetensors'))
