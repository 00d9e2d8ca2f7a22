"""Every registered model, timm tests/test_models.py style: forward, backward, heads, state dicts.

Each registered variant is built as users create it (full width and depth, 10 classes) and runs the
contract at batch 1 on a reduced 64² input, which every backbone takes (any input size); one model
per family, those of :data:`FULL_SIZE`, runs it at its full 224² input, as timm's own tests do:
reduced sizes for the registry, full size for a few.
"""
from __future__ import annotations

import sys

import pytest
import timm
import torch
from conftest import assert_model_contract

import models

# one full-size model per family; every other variant runs the same checks at REDUCED_SIZE
FULL_SIZE = ('flatten_deit_tiny_patch16_224', 'flatten_pvt_tiny', 'flatten_pvt_v2_b0', 'flatten_swin_tiny_patch4_224',
             'flatten_cswin_tiny_224')
REDUCED_SIZE = 64


def _resolution(name: str) -> int:
    return 224 if name in FULL_SIZE else REDUCED_SIZE


def _family(name: str) -> str:
    """The backbone module that registers the variant (models.swin, models.pvt, ...)."""
    return timm.models.model_entrypoint(name).__module__


def test_one_full_size_model_per_family():
    assert set(FULL_SIZE) <= set(models.list_models())
    assert sorted(_family(name) for name in FULL_SIZE) == sorted({_family(name) for name in models.list_models()})


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
