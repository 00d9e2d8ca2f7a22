"""models/build.py: every MODEL.TYPE is a row of one table that names a registered variant and the config keys
it reads; an official yaml resolves to its registered variant plus training knobs only."""
from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import timm
import torch

import models
from bench.dense import PAIRS
from config import get_default_config, load_config
from models.build import MODEL_TYPES, describe, resolve
from models.registry import list_families, variant_spec

REPO = Path(__file__).resolve().parents[1]
OFFICIAL_YAMLS = sorted((REPO / 'configs').glob('*.yaml'))
# keys of a recipe rather than of an architecture. CSwin's L stripes '56-28-14-7' at 224² are its whole
# stage maps, what the variants' default (None) means, so a 224² config restates the variant there.
TRAINING_KNOBS = {'drop_path_rate', 'la_split_size'}
# FLatten-Swin-T/S and FLatten-CSwin-T/S at 384² have a config but no variant: the 224² variant at 384²
AT_384 = {'flatten_swin_t_384': {'img_size', 'window_size'}, 'flatten_swin_s_384': {'img_size', 'window_size'},
          'flatten_cswin_t_384': {'img_size', 'split_size'}, 'flatten_cswin_s_384': {'img_size', 'split_size'}}


def _value(cfg, key):
    for part in key.split('.'):
        cfg = getattr(cfg, part)
    return cfg


@pytest.mark.parametrize('path', OFFICIAL_YAMLS, ids=lambda p: p.stem)
def test_official_yaml_is_its_variant_up_to_training_knobs(path):
    variant, overrides = resolve(load_config(str(path), []))
    spec = variant_spec(variant)
    assert path.stem.replace('flatten_', '').startswith(spec.family), (path.stem, variant)
    assert variant.startswith('flatten_') == path.stem.startswith('flatten_'), (path.stem, variant)
    assert set(overrides) <= TRAINING_KNOBS | AT_384.get(path.stem, set()), (path.stem, variant, overrides)


def test_describe_reads_as_a_timm_call():
    cfg = load_config(str(REPO / 'configs' / 'flatten_swin_b_384.yaml'), [])
    assert describe(cfg) == 'flatten_swin_base_patch4_384(drop_path_rate=0.5)'
    cfg = load_config(str(REPO / 'configs' / 'flatten_pvt_v2_b2.yaml'), ['MODEL.LA.PVT_LA_SR_RATIOS', '8421'])
    assert describe(cfg) == "flatten_pvt_v2_b2(drop_path_rate=0.1, la_sr_ratios='8421')"


@pytest.mark.parametrize('model_type', sorted(MODEL_TYPES))
def test_every_row_reads_existing_keys_into_constructor_arguments(model_type):
    row = MODEL_TYPES[model_type]
    defaults = get_default_config()
    parameters = inspect.signature(variant_spec(row.variant).cls).parameters
    for key, arg, convert in row.keys:
        convert(_value(defaults, key))  # the key exists and its default converts
        assert arg in parameters, (model_type, key, arg)
    assert set(row.fixed) <= set(parameters)
    for key, why in row.refuse:
        _value(defaults, key)
        assert why


def test_every_family_is_reachable_from_a_model_type_and_listed_for_the_benches():
    families = list_families()
    assert set(families) == {'cswin', 'deit', 'pvt', 'pvt_v2', 'swin'}
    assert sorted(n for names in families.values() for n in names) == models.list_models()
    reached = {variant_spec(row.variant).family for row in MODEL_TYPES.values()}
    assert reached == set(families)
    for names in families.values():
        assert any(n.startswith('flatten_') for n in names) and any(n.startswith('softmax_') for n in names)
    assert set(PAIRS) == set(families)  # a new family gets a dense-size pair without editing bench/dense.py
    assert PAIRS['swin'] == ('FLatten-Swin-T', 'flatten_swin_tiny_patch4_224', 'Swin-T',
                             'softmax_swin_tiny_patch4_window7_224')


def test_nearest_variant_builds_what_the_row_variant_with_all_arguments_builds():
    """deit_s.yaml starts from the DeiT-T baseline row and resolves to softmax_deit_small_patch16_224 with
    no overrides: both routes give the same modules and, from one seed, the same weights."""
    cfg = load_config(str(REPO / 'configs' / 'deit_s.yaml'), [])
    assert resolve(cfg) == ('softmax_deit_small_patch16_224', {})
    torch.manual_seed(0)
    built = models.build_model(cfg)
    torch.manual_seed(0)
    direct = models.create_model(MODEL_TYPES['deit'].variant, embed_dim=384, num_heads=6,
                                 drop_path_rate=cfg.MODEL.DROP_PATH_RATE)
    assert repr(built) == repr(direct)
    a, b = built.state_dict(), direct.state_dict()
    assert list(a) == list(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_refused_key_is_named():
    cfg = load_config(str(REPO / 'configs' / 'pvt_t.yaml'), ['MODEL.LA.PVT_LINEAR', 'True'])
    with pytest.raises(ValueError, match=r"MODEL.LA.PVT_LINEAR is a PVTv2 mode; MODEL.TYPE 'pvt_tiny' cannot use it"):
        resolve(cfg)


def test_pretrained_cfg_describes_the_model_built():
    model = timm.create_model('flatten_deit_tiny_patch16_224', img_size=384, num_classes=5)
    assert model.pretrained_cfg['input_size'] == (3, 384, 384) and model.pretrained_cfg['crop_pct'] == 1.0
    assert timm.create_model('flatten_deit_tiny_patch16_224').pretrained_cfg['input_size'] == (3, 224, 224)
