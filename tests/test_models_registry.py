"""Every registered model, timm tests/test_models.py style: forward, backward, heads, state dicts.

Each registered variant is built at full size (batch 1, at the resolution its name gives: 384 for
``*_384``, else 224) with 10 classes, so the whole registry is exercised the way users create it.
"""
from __future__ import annotations

import sys

import pytest
import timm
import torch
from conftest import assert_model_contract

import models


def _resolution(name: str) -> int:
    return 384 if name.endswith('384') else 224


def test_every_variant_is_registered_in_timm():
    assert set(models.list_models()) <= set(timm.list_models())


def test_variant_entry_points_are_module_functions():
    """The entry points made from the variant tables look as if written with ``def`` in their backbone module."""
    for name in models.list_models():
        fn = timm.models.model_entrypoint(name)
        module = sys.modules[fn.__module__]
        assert fn.__name__ == fn.__qualname__ == name
        assert fn.__module__.startswith('models.') and getattr(module, name) is fn and name in module.__all__
        assert fn.__doc__ and fn.__doc__.strip()


@pytest.mark.slow
@pytest.mark.parametrize('name', models.list_models())
def test_registered_model(name):
    size = _resolution(name)

    def make():
        torch.manual_seed(0)
        return models.create_model(name, num_classes=10)
    assert_model_contract(make, size)
