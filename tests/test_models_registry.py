"""Every registered model, timm tests/test_models.py style: forward, backward, heads, state dicts.

Each registered variant is built at full size (batch 1, at the resolution its name gives: 384 for
``*_384``, else 224) with 10 classes, so the whole registry is exercised the way users create it.
"""
from __future__ import annotations

import pytest
import timm
import torch

import models


def _resolution(name: str) -> int:
    return 384 if name.endswith('384') else 224


def test_every_variant_is_registered_in_timm():
    assert set(models.list_models()) <= set(timm.list_models())


@pytest.mark.slow
@pytest.mark.parametrize('name', models.list_models())
def test_registered_model(name):
    torch.manual_seed(0)
    model = models.create_model(name, num_classes=10)
    size = _resolution(name)
    x = torch.randn(1, 3, size, size)

    out = model(x)
    assert out.shape == (1, 10) and model.num_classes == 10
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    # only parameters a model declares unused may lack a gradient (PVT v1's final norm, spec §2.2)
    skipped = model.unused_parameters()
    for param_name, param in model.named_parameters():
        if param_name in skipped:
            assert param.grad is None, f'{param_name} is expected to be unused'
        else:
            assert param.grad is not None, f'{param_name} receives no gradient'
            assert torch.isfinite(param.grad).all(), param_name

    model.eval()
    clone = models.create_model(name, num_classes=10).eval()
    clone.load_state_dict(model.state_dict(), strict=True)
    with torch.no_grad():
        reference = model(x)
        torch.testing.assert_close(clone(x), reference)
        features = model.forward_head(model.forward_features(x), pre_logits=True)
        assert features.shape == (1, model.num_features)
        model.reset_classifier(3)
        assert model(x).shape == (1, 3) and model.num_classes == 3
        model.reset_classifier(0)
        assert model(x).shape == (1, model.num_features)
    assert isinstance(model.no_weight_decay(), set) and isinstance(model.no_weight_decay_keywords(), set)
