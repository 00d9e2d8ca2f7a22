"""Checkpoints: atomic saves in the official layout, resume, and pretrained-weight adaptation.

File layout (top-level keys; the official ones first; docs/checkpoints.md, "File layout"):

* ``model``, ``optimizer``, ``lr_scheduler``, ``max_accuracy``, ``epoch`` (completed epochs),
  ``config`` (the full config as a YAML string; official files hold a pickled CfgNode);
* EMA runs: ``state_dict_ema`` and ``max_accuracy_e`` (the official EMA key names);
* added here: ``step`` (updates done in the next, incomplete epoch; 0 at an epoch end), ``scaler``
  (fp16 GradScaler) and ``rng`` (every rank's torch/cuda/numpy/python states).

Every load uses ``torch.load(weights_only=True)``. The only extra global allowed is the name
``yacs.config.CfgNode``, which official checkpoints pickle under ``config``; it is read as a plain
``OrderedDict`` (a CfgNode is a dict subclass), so no yacs code runs while unpickling.
"""
from __future__ import annotations

import collections
import logging
import math
import os
import random
import re
import tempfile
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

from models.grid import DERIVED_BUFFERS, GridSpec, collect_parameter_grids, resize_grid_tensor

__all__ = [
    'CheckpointError', 'torch_load', 'atomic_save', 'rng_state', 'set_rng_state', 'save_checkpoint',
    'gather_rng_states', 'periodic_checkpoint_name', 'periodic_checkpoints', 'latest_valid_checkpoint',
    'prune_checkpoints', 'remove_partial_writes', 'find_latest_checkpoint', 'load_checkpoint', 'model_state_dict',
    'load_model_weights', 'load_pretrained', 'PretrainedReport', 'infer_source_grid', 'resize_grid_tensor',
]

logger = logging.getLogger('flatten.checkpoint')

_PERIODIC_CKPT = re.compile(r'^ckpt_epoch_(\d+)(?:_step_(\d+))?\.pth$')


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be read or does not fit the model; the message names the file."""


# The official files' pickled config: read yacs.config.CfgNode as the dict it is.
_ALLOWED_GLOBALS = [(collections.OrderedDict, 'yacs.config.CfgNode')]


def torch_load(path: str) -> Any:
    """``torch.load(path, map_location='cpu', weights_only=True)``, official pickled configs allowed.

    A ``.safetensors`` file (weights alone, as ``python -m tools.export_weights`` writes them) is read
    with safetensors and returned as ``{'model': state_dict}``, the layout of a weights-only checkpoint.
    """
    if not os.path.isfile(path):
        raise CheckpointError(f'checkpoint {path!r} does not exist')
    if path.endswith('.safetensors'):
        return {'model': _safetensors_load(path)}
    try:
        with torch.serialization.safe_globals(_ALLOWED_GLOBALS):
            return torch.load(path, map_location='cpu', weights_only=True)
    except Exception as err:  # torch raises several types for truncated / foreign files
        raise CheckpointError(
            f'cannot read checkpoint {path!r}: {type(err).__name__}: {str(err).splitlines()[0] if str(err) else ""}. '
            f'Is it a complete PyTorch checkpoint?') from None


def _safetensors_load(path: str) -> Dict[str, torch.Tensor]:
    """The tensors of a safetensors file on the CPU, or CheckpointError naming the file."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    try:
        return load_file(path, device='cpu')
    except (SafetensorError, OSError, ValueError) as err:
        raise CheckpointError(f'cannot read safetensors file {path!r}: {type(err).__name__}: '
                              f'{str(err).splitlines()[0] if str(err) else ""}') from None


def atomic_save(obj: Any, path: str) -> None:
    """Write `obj` to a temp file beside `path`, fsync it, then rename over `path`.

    A reader sees either the old file or the complete new one, never a partial write.
    """
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp_path = tempfile.mkstemp(prefix='.' + os.path.basename(path) + '.', suffix='.tmp', dir=directory)
    try:
        with os.fdopen(fd, 'wb') as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp_path, path)
    except BaseException:
        if os.path.exists(tmp_path):
            os.remove(tmp_path)
        raise
    dir_fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def rng_state() -> Dict[str, Any]:
    """All global RNG states as weights_only-loadable values (tensors, ints, tuples)."""
    np_state = np.random.get_state()
    state = {
        'torch': torch.get_rng_state(),
        'numpy': (np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), int(np_state[2]),
                  int(np_state[3]), float(np_state[4])),
        'python': random.getstate(),
    }
    if torch.cuda.is_available():
        state['cuda'] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Dict[str, Any]) -> None:
    torch.set_rng_state(state['torch'])
    name, keys, pos, has_gauss, cached = state['numpy']
    np.random.set_state((name, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    version, internal, gauss = state['python']
    random.setstate((version, tuple(internal), gauss))
    if ('cuda' in state) and torch.cuda.is_available() and len(state['cuda']) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state['cuda'])


def unwrap(model: nn.Module) -> nn.Module:
    """The bare model inside DDP / torch.compile wrappers."""
    while True:
        if hasattr(model, 'module') and isinstance(model.module, nn.Module):
            model = model.module
        elif hasattr(model, '_orig_mod'):
            model = model._orig_mod
        else:
            return model


def save_checkpoint(
        path: str,
        *,
        model: nn.Module,
        epoch: int,
        max_accuracy: float,
        config_yaml: str,
        optimizer: Optional[torch.optim.Optimizer] = None,
        lr_scheduler=None,
        scaler=None,
        ema=None,
        max_accuracy_ema: Optional[float] = None,
        step: int = 0,
        rng: Optional[List[Dict[str, Any]]] = None,
) -> None:
    """Atomically write a training checkpoint.

    `epoch` counts the completed epochs (official meaning) and `step` the optimizer updates
    already done in the next, incomplete one (0 at an epoch end). `rng` holds every rank's RNG
    states (:func:`gather_rng_states`); by default this process's alone.
    """
    state = {
        'model': unwrap(model).state_dict(),
        'optimizer': optimizer.state_dict() if optimizer is not None else None,
        'lr_scheduler': lr_scheduler.state_dict() if lr_scheduler is not None else None,
        'max_accuracy': float(max_accuracy),
        'epoch': int(epoch),
        'config': config_yaml,
        'step': int(step),
        'scaler': scaler.state_dict() if scaler is not None else None,
        'rng': rng if rng is not None else [rng_state()],
    }
    if ema is not None:
        state['state_dict_ema'] = unwrap(ema.module).state_dict()
        state['max_accuracy_e'] = float(max_accuracy_ema if max_accuracy_ema is not None else 0.0)
    atomic_save(state, path)


def gather_rng_states() -> List[Dict[str, Any]]:
    """Every rank's RNG states, indexed by rank (a collective: call it on all ranks)."""
    own = rng_state()
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return [own]
    states: List[Any] = [None] * torch.distributed.get_world_size()
    torch.distributed.all_gather_object(states, own)
    return states


def periodic_checkpoint_name(epoch: int, step: int = 0) -> str:
    """``ckpt_epoch_{epoch}.pth`` at the end of epoch `epoch` (0-based, official name) or
    ``ckpt_epoch_{epoch}_step_{step}.pth`` after `step` updates of it."""
    return f'ckpt_epoch_{epoch}.pth' if step == 0 else f'ckpt_epoch_{epoch}_step_{step}.pth'


def periodic_checkpoints(output_dir: str) -> List[Tuple[Tuple[int, int], str]]:
    """The run folder's periodic checkpoints, oldest first, as ((completed epochs, updates into the
    next epoch), path): ``ckpt_epoch_4.pth`` is (5, 0), ``ckpt_epoch_5_step_100.pth`` (5, 100).
    The order is the training progress the files record, never their modification times."""
    if not os.path.isdir(output_dir):
        return []
    found = []
    for name in os.listdir(output_dir):
        match = _PERIODIC_CKPT.match(name)
        if match:
            epoch, step = int(match.group(1)), int(match.group(2) or 0)
            found.append(((epoch + 1, 0) if step == 0 else (epoch, step), os.path.join(output_dir, name)))
    return sorted(found)


def find_latest_checkpoint(output_dir: str) -> Optional[str]:
    """The periodic checkpoint of the furthest training progress in `output_dir`, or None."""
    found = periodic_checkpoints(output_dir)
    return found[-1][1] if found else None


def latest_valid_checkpoint(output_dir: str) -> Optional[Tuple[str, Dict[str, Any]]]:
    """(path, content) of the newest periodic checkpoint that reads back completely.

    A truncated or corrupt newer file (e.g. from a disk filled up, or a copy cut short) is
    skipped with a warning and the previous one is used.
    """
    for _, path in reversed(periodic_checkpoints(output_dir)):
        try:
            ckpt = torch_load(path)
            if not (isinstance(ckpt, dict) and isinstance(ckpt.get('model'), dict) and 'epoch' in ckpt):
                raise CheckpointError(f'{path!r} is not a training checkpoint (no model / epoch)')
            return path, ckpt
        except CheckpointError as err:
            logger.warning(f'auto-resume: skipping {path}: {err}; falling back to the previous checkpoint')
    return None


def prune_checkpoints(output_dir: str, keep: int) -> None:
    """Delete all but the `keep` most advanced periodic checkpoints (best ones are separate files)."""
    for _, path in periodic_checkpoints(output_dir)[:-keep]:
        os.remove(path)


def remove_partial_writes(output_dir: str) -> List[str]:
    """Delete temp files left by a save that was killed before its rename; returns their names."""
    if not os.path.isdir(output_dir):
        return []
    leftovers = [n for n in os.listdir(output_dir) if n.startswith('.') and n.endswith('.tmp') and '.pth.' in n]
    for name in leftovers:
        os.remove(os.path.join(output_dir, name))
    return leftovers


def model_state_dict(ckpt: Any, path: str) -> Dict[str, torch.Tensor]:
    """The weights inside a loaded file: ``ckpt['model']``, ``ckpt['state_dict']`` or a bare state dict."""
    if isinstance(ckpt, dict):
        for key in ('model', 'state_dict'):
            if key in ckpt and isinstance(ckpt[key], dict):
                return ckpt[key]
        if ckpt and all(isinstance(v, torch.Tensor) for v in ckpt.values()):
            return ckpt
    keys = list(ckpt)[:8] if isinstance(ckpt, dict) else []
    raise CheckpointError(f'{path!r} holds no model weights: expected a dict with a "model" entry or a bare '
                          f'state dict, got {type(ckpt).__name__} with keys {keys}')


def _strip_prefix(state_dict: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    """Remove DDP's ``module.`` and torch.compile's ``_orig_mod.`` prefixes."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ('module.', '_orig_mod.'):
            if key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


def _describe_mismatch(
        model: nn.Module, state_dict: Dict[str, torch.Tensor], path: str, limit: int = 8) -> Optional[str]:
    own = model.state_dict()
    missing = [k for k in own if k not in state_dict]
    unexpected = [k for k in state_dict if k not in own]
    mismatched = [k for k in own if (k in state_dict) and (tuple(own[k].shape) != tuple(state_dict[k].shape))]
    if not (missing or unexpected or mismatched):
        return None
    lines = [f'checkpoint {path!r} does not fit {type(model).__name__} '
             f'({len(missing)} missing, {len(unexpected)} unexpected, {len(mismatched)} mismatched keys):']
    lines += [f'  missing    {k} {list(own[k].shape)}' for k in missing[:limit]]
    lines += [f'  unexpected {k} {list(state_dict[k].shape)}' for k in unexpected[:limit]]
    lines += [f'  mismatched {k}: checkpoint {list(state_dict[k].shape)} vs model {list(own[k].shape)}'
              for k in mismatched[:limit]]
    return '\n'.join(lines)


def _is_derived(key: str) -> bool:
    return any(key.endswith(name) for name in DERIVED_BUFFERS)


def load_model_weights(model: nn.Module, state_dict: Dict[str, torch.Tensor], path: str) -> None:
    """Strictly load `state_dict` into `model`, or raise CheckpointError listing the first
    missing / unexpected / mismatched keys with their shapes.

    Derived buffers (``relative_position_index``, ``attn_mask``) are neither required nor taken
    from the file: the model's own, rebuilt from its geometry, are kept. Official files carry them
    (and an official EMA averages the integer index: docs/checkpoints.md, "EMA"), files of other tools may not.
    """
    model = unwrap(model)
    own = model.state_dict()
    state_dict = {k: v for k, v in _strip_prefix(state_dict).items() if not _is_derived(k)}
    state_dict.update({k: v for k, v in own.items() if _is_derived(k)})
    problem = _describe_mismatch(model, state_dict, path)
    if problem:
        raise CheckpointError(problem)
    model.load_state_dict(state_dict, strict=True)


def _optimizer_mismatch(optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> Optional[str]:
    """Why `state` cannot be restored into `optimizer`, or None. PyTorch only checks group sizes;
    a state saved for parameters in another order would load and fail (or silently mix moments)."""
    groups = state.get('param_groups', [])
    if [len(g['params']) for g in groups] != [len(g['params']) for g in optimizer.param_groups]:
        return (f'parameter groups of sizes {[len(g["params"]) for g in groups]} vs this model\'s '
                f'{[len(g["params"]) for g in optimizer.param_groups]}')
    params = [p for g in optimizer.param_groups for p in g['params']]
    ids = [i for g in groups for i in g['params']]
    for index, param in zip(ids, params, strict=True):
        for name, value in state.get('state', {}).get(index, {}).items():
            if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape != param.shape:
                return (f'state {name!r} of parameter {index} has shape {list(value.shape)}, '
                        f'the parameter {list(param.shape)}')
    return None


# Scheduler fields that define the schedule; a checkpoint from another schedule must not override them.
_SCHEDULE_FIELDS = ('t_initial', 'warmup_t', 'lr_min', 'warmup_lr_init', 'decay_t', 'decay_rate', 'lr_min_rate',
                    'base_values')


def _same_value(a: Any, b: Any) -> bool:
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_same_value(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, float) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-9)
    return a == b


def _scheduler_mismatch(scheduler, state: Dict[str, Any]) -> Optional[str]:
    """Why the stored schedule differs from the one built from this run's config, or None."""
    own = scheduler.state_dict()
    for name in _SCHEDULE_FIELDS:
        if (name in own) and (name in state) and not _same_value(own[name], state[name]):
            return f'{name} is {state[name]} in the checkpoint but {own[name]} for this config'
    return None


def _restore_ema(ema, model: nn.Module, ckpt: Dict[str, Any], path: str) -> None:
    """The EMA weights of `ckpt`, or (with a warning) the loaded model's when the file has none."""
    if isinstance(ckpt.get('state_dict_ema'), dict):
        load_model_weights(ema.module, ckpt['state_dict_ema'], path + ' [state_dict_ema]')
    else:
        logger.warning(f'{path}: no state_dict_ema in the checkpoint; the EMA starts from the loaded weights')
        ema.set(unwrap(model))


def _restore_state(name: str, target, state: Optional[Dict[str, Any]], mismatch, path: str) -> None:
    """Load `state` into `target` (optimizer, scheduler or scaler) unless it is missing or does not
    fit this run (``mismatch(target, state)`` gives the reason); either case is a warning, not an error."""
    if state is None:
        logger.warning(f'{path}: no {name} state in the checkpoint; starting it fresh')
        return
    reason = mismatch(target, state) if mismatch is not None else None
    if reason is None:
        try:
            target.load_state_dict(state)
        except (ValueError, KeyError, RuntimeError, TypeError) as err:
            reason = f'{type(err).__name__}: {err}'
    if reason is not None:
        logger.warning(f'{path}: {name} state skipped, it does not match this run: {reason}')


def load_checkpoint(
        path: str,
        model: nn.Module,
        optimizer: Optional[torch.optim.Optimizer] = None,
        lr_scheduler=None,
        scaler=None,
        ema=None,
        restore_rng: bool = True,
        weights: str = 'model',
        loaded: Optional[Any] = None,
) -> Dict[str, Any]:
    """Restore a checkpoint written by :func:`save_checkpoint` or by the official scripts.

    The model loads strictly from ``ckpt['model']`` (or ``ckpt['state_dict_ema']`` with
    ``weights='ema'``; a bare state dict also works). With an `optimizer`, the training state is
    restored too: optimizer, scheduler, scaler, EMA and RNG, each only when the file has it and it
    fits this run; otherwise a warning says what was skipped and why. Returns
    ``{'epoch', 'step', 'max_accuracy', 'max_accuracy_ema'}``: completed epochs and updates into the
    next one (both 0 without an optimizer).
    `loaded` is the file's content when the caller has already read it.
    """
    ckpt = torch_load(path) if loaded is None else loaded
    if weights == 'ema':
        if not (isinstance(ckpt, dict) and isinstance(ckpt.get('state_dict_ema'), dict)):
            raise CheckpointError(f'{path!r} has no EMA weights (state_dict_ema); evaluate without --eval-ema')
        load_model_weights(model, ckpt['state_dict_ema'], path + ' [state_dict_ema]')
    else:
        load_model_weights(model, model_state_dict(ckpt, path), path)
    info = {'epoch': 0, 'step': 0, 'max_accuracy': 0.0, 'max_accuracy_ema': 0.0}
    if not isinstance(ckpt, dict) or 'model' not in ckpt:
        return info
    info['max_accuracy'] = float(ckpt.get('max_accuracy', 0.0) or 0.0)
    info['max_accuracy_ema'] = float(ckpt.get('max_accuracy_e', 0.0) or 0.0)
    if ema is not None:
        _restore_ema(ema, model, ckpt, path)
    if optimizer is None:
        return info
    for name, target, mismatch in (('optimizer', optimizer, _optimizer_mismatch),
                                   ('lr_scheduler', lr_scheduler, _scheduler_mismatch), ('scaler', scaler, None)):
        if target is not None:
            _restore_state(name, target, ckpt.get(name), mismatch, path)
    if restore_rng and ckpt.get('rng') is not None:
        _restore_rng(ckpt['rng'], path)
    info['epoch'] = int(ckpt.get('epoch', 0))
    info['step'] = int(ckpt.get('step', 0) or 0)
    return info


def _restore_rng(states: Any, path: str) -> None:
    """Restore this rank's RNG states from a checkpoint's per-rank list."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    states = [states] if isinstance(states, dict) else list(states)
    if len(states) != world:
        logger.warning(f'{path}: RNG states of {len(states)} rank(s) for a run of {world}: restoring those of rank '
                       f'{rank % len(states)} (augmentations are seeded per sample and stay identical; drop-path '
                       f'and Mixup draws will differ from an uninterrupted run)')
    set_rng_state(states[rank % len(states)])


# ---------------------------------------------------------------------------------------------
# Pretrained weights for another resolution or class count (docs/checkpoints.md, "Pretrained weights
# (load_pretrained)")
# ---------------------------------------------------------------------------------------------

@dataclass
class PretrainedReport:
    """What :func:`load_pretrained` changed on the way in (state-dict keys). Into a segmentor,
    `loaded` holds the model keys that took checkpoint tensors, `dropped` the checkpoint keys it has
    no place for (the classifier head, the final norm) and `not_loaded` the model keys left as
    initialised (decoder, auxiliary head)."""
    resized: List[str] = field(default_factory=list)
    dropped: List[str] = field(default_factory=list)
    reinitialized: List[str] = field(default_factory=list)
    loaded: List[str] = field(default_factory=list)
    not_loaded: List[str] = field(default_factory=list)

    def __str__(self) -> str:
        return (f'resized {len(self.resized)} tensors, dropped {len(self.dropped)} keys, '
                f're-initialised {", ".join(self.reinitialized) or "nothing"}')


def infer_source_grid(length: int, target: GridSpec, key: str) -> Tuple[int, int]:
    """The grid of a checkpoint tensor with `length` grid cells.

    First choice: the target's grid scaled (same aspect ratio: square stays square, a 56×7 stripe
    may come from 96×12). Failing that, a square grid, the grid of every released checkpoint
    (224² or 384² models), so square weights load into a model built for a non-square size.
    For ``table`` layouts the aspect ratio is that of the window, (rows + 1) / 2 by (cols + 1) / 2.
    """
    H, W = target.grid
    shapes = [(rows, length // rows) for rows in range(1, length + 1) if length % rows == 0]
    if target.layout == 'table':
        shapes = [(r, c) for r, c in shapes if (r % 2 == 1) and (c % 2 == 1)]
        same_aspect = [(r, c) for r, c in shapes if (r + 1) * (W + 1) == (c + 1) * (H + 1)]
    else:
        same_aspect = [(r, c) for r, c in shapes if r * W == c * H]
    matches = same_aspect or [(r, c) for r, c in shapes if r == c]
    if len(matches) != 1:
        raise CheckpointError(
            f'{key}: cannot tell the grid of the checkpoint\'s {length} cells from the model\'s {H}x{W} grid '
            f'(it is resized only from a grid of the same aspect ratio or a square one)')
    return matches[0]


def _resize_grids(target: nn.Module, state_dict: Dict[str, torch.Tensor], report: PretrainedReport) -> None:
    """Drop the checkpoint's derived buffers that `target` lacks and bicubic-resize, in place, every grid
    tensor of `state_dict` whose length differs from `target`'s (see :func:`load_pretrained`)."""
    own = target.state_dict()
    grids = collect_parameter_grids(target)
    for key in [k for k in state_dict if _is_derived(k) and k not in own]:
        del state_dict[key]
        report.dropped.append(key)
    for key, value in list(state_dict.items()):
        spec = grids.get(key)
        if (spec is None) or (key not in own) or (own[key].shape == value.shape) or (value.ndim != own[key].ndim):
            continue
        if (spec.layout == 'tokens') and (value.shape[-1] == own[key].shape[-1]) and (value.shape[0] == 1):
            source = infer_source_grid(value.shape[1] - spec.prefix_tokens, spec, key)
        elif (spec.layout == 'table') and (value.shape[-1] == own[key].shape[-1]):
            source = infer_source_grid(value.shape[0], spec, key)
        else:
            continue  # another width: reported as a mismatch by the strict load
        state_dict[key] = resize_grid_tensor(value, spec, source)
        report.resized.append(key)


def _load_backbone(target: nn.Module, state_dict: Dict[str, torch.Tensor], path: str) -> PretrainedReport:
    """An ImageNet classifier's weights into the backbone of a model with ``backbone_model`` and
    ``backbone_prefix`` (a :class:`models.segmentation.Segmentor`): every backbone tensor must come from
    the file (grids resized, as into a classifier); the file's keys under a top-level module the
    backbone pruned to Identity or dropped (the classifier ``head``, the final ``norm``) are skipped;
    the rest of the model keeps its initialisation. CheckpointError naming the file when no key
    matches, or listing the backbone's missing, unexpected and mismatched keys."""
    backbone, prefix = target.backbone_model, target.backbone_prefix
    own = backbone.state_dict()
    if not any(key in own for key in state_dict):
        raise CheckpointError(
            f'checkpoint {path!r} has none of the {len(own)} backbone tensors of {type(backbone).__name__} '
            f'(file keys {list(state_dict)[:4]}, backbone keys {list(own)[:4]}): is it a classifier of this '
            f'MODEL.TYPE?')
    report = PretrainedReport()
    children = dict(backbone.named_children())
    for key in list(state_dict):
        top = key.split('.')[0]
        if (key not in own) and ((top not in children) or isinstance(children[top], nn.Identity)):
            del state_dict[key]
            report.dropped.append(key)
    _resize_grids(backbone, state_dict, report)
    load_model_weights(backbone, state_dict, path)
    report.loaded = [prefix + key for key in own]
    report.not_loaded = [key for key in target.state_dict() if not key.startswith(prefix)]
    skipped = sorted({key.rsplit('.', 1)[0] for key in report.dropped if not _is_derived(key)})
    modules = sorted({key.split('.')[0] for key in report.not_loaded})
    logger.info(f'loaded pretrained weights from {path}: {len(report.loaded)} backbone tensors into '
                f'{prefix.rstrip(".")} ({len(report.resized)} resized); skipped the checkpoint\'s '
                f'{", ".join(skipped) or "nothing"} (classifier parts the model has not); not in the checkpoint, '
                f'kept as initialised: {", ".join(modules) or "nothing"} ({len(report.not_loaded)} tensors)')
    return report


def load_pretrained(model: nn.Module, path: str) -> PretrainedReport:
    """Load weights from `path` into `model`, adapting what depends on resolution or classes.

    * parameters whose modules declare a grid (``positional_encoding`` of every focused kind,
      Swin's ``relative_position_bias_table`` and ``absolute_pos_embed``, PVT's ``pos_embed{i}``,
      DeiT's ``pos_embed``) and have another length are bicubic-resized over that 2-D grid;
    * derived buffers (``relative_position_index``, ``attn_mask``) are rebuilt by the model;
    * a ``head`` for another class count is dropped and a freshly initialised one kept.

    Everything else must match exactly; otherwise CheckpointError lists the first missing,
    unexpected and mismatched keys with their shapes. Returns what was changed.

    Into a segmentor (a model with ``backbone_model``, :class:`models.segmentation.Segmentor`) an
    ImageNet classifier's file loads into the backbone alone, the same way; its classifier head and
    final norm are skipped and the decoder keeps its initialisation (one log line says which).
    """
    target = unwrap(model)
    state_dict = _strip_prefix(dict(model_state_dict(torch_load(path), path)))
    if hasattr(target, 'backbone_model'):
        return _load_backbone(target, state_dict, path)
    report = PretrainedReport()
    _resize_grids(target, state_dict, report)
    head = getattr(target, 'head', None)
    ckpt_head = state_dict.get('head.weight')
    if isinstance(head, nn.Linear) and (ckpt_head is not None) and (ckpt_head.shape != head.weight.shape):
        # another class count: keep the model's freshly initialised head
        target.reset_classifier(target.num_classes)
        for key in ('head.weight', 'head.bias'):
            state_dict[key] = getattr(target.head, key.split('.')[1]).detach().clone()
            report.dropped.append(key)
        report.reinitialized.append('head')
    load_model_weights(target, state_dict, path)
    logger.info(f'loaded pretrained weights from {path}: {report}')
    if report.reinitialized:
        logger.info(f'{path}: checkpoint head has {tuple(ckpt_head.shape)[0]} classes, the model '
                    f'{target.num_classes}: the head was re-initialised')
    return report
