"""Export a checkpoint's weights in timm's hub layout: ``model.safetensors`` plus ``config.json``.

    python -m tools.export_weights CKPT OUT_DIR [--model NAME | --cfg FILE] [--ema]

CKPT is one of our checkpoints (its stored config names the model) or an official release (a dict
whose ``model`` holds the state dict; name its model with ``--model`` or ``--cfg``). The weights are
loaded strictly into the model they describe, and that model's own ``state_dict`` is written, so
the file holds exactly what ``model.load_state_dict(strict=True)`` needs (derived buffers such as
``relative_position_index`` included: they are persistent buffers of the model). ``--ema`` exports
``state_dict_ema``. ``config.json`` is written by timm's own ``save_config_for_hf``: ``architecture``
(the registered name), ``num_classes``, ``num_features``, ``pretrained_cfg`` and ``model_args``, the
constructor arguments that rebuild the same model. Then::

    timm.create_model('local-dir:OUT_DIR', pretrained=True)
    main.py --eval --resume OUT_DIR/model.safetensors    # or --pretrained

Errors (missing or unreadable file, unknown model name, weights that do not fit) are one line on
stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

if __package__ in (None, ''):  # run as `python tools/x.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
import torch.nn as nn  # noqa: E402
from safetensors.torch import save_file  # noqa: E402
from timm.models._hub import save_config_for_hf  # noqa: E402

from config import config_from_yaml_text, load_config  # noqa: E402
from models.build import resolve  # noqa: E402
from models.registry import create_model, list_models, unknown_name, variant_spec  # noqa: E402
from tools.common import TOOL_ERRORS  # noqa: E402
from utils.checkpoint import CheckpointError, load_model_weights, model_state_dict, torch_load  # noqa: E402

__all__ = ['model_spec', 'load_weights', 'plain_tensors', 'export', 'main']

WEIGHTS_NAME = 'model.safetensors'
CONFIG_NAME = 'config.json'
# constructor arguments of training alone: they change neither the weights nor the eval outputs,
# so the exported model_args leave them out (as timm's get_model_args does for drop rates)
TRAINING_ARGS = ('drop_rate', 'drop_path_rate', 'use_checkpoint')


def model_spec(ckpt: Any, path: str, model_name: Optional[str] = None,
               cfg_path: Optional[str] = None) -> Tuple[str, Dict[str, Any]]:
    """``(registered name, constructor overrides)`` of the model `ckpt` (read from `path`) holds.

    ``--model NAME``: that variant, with ``num_classes`` taken from the file's ``head.weight``.
    ``--cfg FILE``: the variant and overrides that config resolves to (:func:`models.build.resolve`).
    Neither: the config stored in one of our checkpoints; an official file stores none (its pickled
    CfgNode is the authors' config, not this code base's), which is a ValueError asking for either.
    """
    if model_name:
        if model_name not in list_models():
            raise unknown_name('model', model_name, list_models())
        head = model_state_dict(ckpt, path).get('head.weight')
        default_classes = variant_spec(model_name).arch.get('num_classes', 1000)
        if (head is not None) and (head.shape[0] != default_classes):
            return model_name, {'num_classes': int(head.shape[0])}
        return model_name, {}
    if cfg_path:
        cfg = load_config(cfg_path)
    elif isinstance(ckpt, dict) and isinstance(ckpt.get('config'), str):
        cfg = config_from_yaml_text(ckpt['config'])
    else:
        raise ValueError(f'{path!r} stores no config of this code base (an official release?): name its model '
                         f'with --model NAME (one of models.registry.list_models()) or --cfg FILE')
    if cfg.TASK != 'classification':
        raise ValueError(f'{path!r}: the hub layout is for classifiers; its config has TASK {cfg.TASK!r}')
    name, overrides = resolve(cfg)
    return name, {k: v for k, v in overrides.items() if k not in TRAINING_ARGS}


def load_weights(ckpt: Any, path: str, name: str, overrides: Dict[str, Any], ema: bool = False) -> nn.Module:
    """``name(**overrides)`` in eval mode with the file's weights (``state_dict_ema`` with `ema`), loaded
    strictly: CheckpointError listing the keys that do not fit, naming the file."""
    if ema:
        if not (isinstance(ckpt, dict) and isinstance(ckpt.get('state_dict_ema'), dict)):
            raise CheckpointError(f'{path!r} has no EMA weights (state_dict_ema); export without --ema')
        state_dict, source = ckpt['state_dict_ema'], path + ' [state_dict_ema]'
    else:
        state_dict, source = model_state_dict(ckpt, path), path
    model = create_model(name, **overrides)
    load_model_weights(model, state_dict, source)
    return model.eval()


def plain_tensors(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Every entry of `state_dict` as a contiguous CPU tensor with storage of its own.

    safetensors refuses tensors that share storage; a key whose storage an earlier key already uses
    gets a copy, so every key stays in the file (a strict load needs them all)."""
    tensors, storages = {}, set()
    for key, value in state_dict.items():
        value = value.detach().cpu()
        storage = value.untyped_storage().data_ptr()
        if (storage in storages) or not value.is_contiguous():
            value = value.clone(memory_format=torch.contiguous_format)
        storages.add(value.untyped_storage().data_ptr())
        tensors[key] = value
    return tensors


def _replace_into(out_dir: str, name: str, write) -> str:
    """``write(tmp_path)`` beside ``out_dir/name``, then rename it over: no half-written file is left."""
    path = os.path.join(out_dir, name)
    fd, tmp_path = tempfile.mkstemp(prefix=f'.{name}.', suffix='.tmp', dir=out_dir)
    os.close(fd)
    try:
        write(tmp_path)
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    return path


def export(model: nn.Module, overrides: Dict[str, Any], out_dir: str) -> Tuple[str, str]:
    """Write ``out_dir/model.safetensors`` (the model's state_dict, no pickle) and ``out_dir/config.json``
    (timm's ``save_config_for_hf``, with `overrides` as ``model_args``); returns the two paths."""
    os.makedirs(out_dir, exist_ok=True)
    tensors = plain_tensors(model.state_dict())
    weights = _replace_into(out_dir, WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={'format': 'pt'}))
    config = _replace_into(out_dir, CONFIG_NAME, lambda tmp: save_config_for_hf(model, tmp, model_args=overrides))
    return weights, config


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('checkpoint', metavar='CKPT', help='our checkpoint or an official .pth')
    parser.add_argument('out_dir', metavar='OUT_DIR', help='folder for model.safetensors and config.json')
    which = parser.add_mutually_exclusive_group()
    which.add_argument('--model', default=None, metavar='NAME', help='registered model name (timm name)')
    which.add_argument('--cfg', default=None, metavar='FILE', help='config file naming the model')
    parser.add_argument('--ema', action='store_true', help='export the EMA weights (state_dict_ema)')
    args = parser.parse_args(argv)
    try:
        ckpt = torch_load(args.checkpoint)
        name, overrides = model_spec(ckpt, args.checkpoint, args.model, args.cfg)
        model = load_weights(ckpt, args.checkpoint, name, overrides, args.ema)
        weights, config = export(model, overrides, args.out_dir)
    except TOOL_ERRORS as err:
        print(f'ERROR {type(err).__name__}: {err}', file=sys.stderr)
        return 2
    described = ', '.join(f'{k}={v!r}' for k, v in overrides.items())
    print(f'{args.checkpoint}{" [EMA]" if args.ema else ""}: {name}({described}), '
          f'{sum(p.numel() for p in model.parameters()):,} parameters')
    print(f'wrote {weights} and {config}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
