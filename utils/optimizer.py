"""AdamW/SGD with the official two parameter groups (docs/training.md, "Optimizer and parameter groups"),
updated by torch's fused kernel unless ``TRAIN.OPTIMIZER.IMPL`` says otherwise."""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, List

import torch
import torch.nn as nn

__all__ = ['IMPLEMENTATIONS', 'param_groups', 'build_optimizer']

logger = logging.getLogger('flatten.optimizer')

# TRAIN.OPTIMIZER.IMPL -> torch's flags. All three compute the same update: 'foreach' and 'loop' bit for bit
# alike, 'fused' (one kernel per dtype group) to float rounding, 2.4e-7 at most after 12 AdamW steps of
# Swin-T's weights. Fused is the fastest on CPU too, where 'loop' is torch's default (docs/training.md,
# "Optimizer and parameter groups").
IMPLEMENTATIONS = {'fused': {'fused': True, 'foreach': False}, 'foreach': {'fused': False, 'foreach': True},
                   'loop': {'fused': False, 'foreach': False}}


def param_groups(model: nn.Module, weight_decay: float) -> List[dict]:
    """[decayed, not decayed] groups in ``named_parameters()`` order; frozen parameters skipped.

    A parameter skips weight decay when it is 1-D, a ``.bias``, named in
    ``model.no_weight_decay()``, or contains a keyword of ``model.no_weight_decay_keywords()``.
    Multi-dimensional FLA ``scale`` and ``positional_encoding`` are therefore decayed, as in the
    official runs (docs/differences.md, "Weight decay on scale and positional
    encodings").
    """
    skip = model.no_weight_decay() if hasattr(model, 'no_weight_decay') else set()
    keywords: Iterable[str] = model.no_weight_decay_keywords() if hasattr(model, 'no_weight_decay_keywords') else ()
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if (param.ndim == 1) or name.endswith('.bias') or (name in skip) or any(k in name for k in keywords):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{'params': decay}, {'params': no_decay, 'weight_decay': 0.}]


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """The optimizer of ``TRAIN.OPTIMIZER`` at the (already scaled) ``TRAIN.BASE_LR``, run by the
    ``TRAIN.OPTIMIZER.IMPL`` implementation (:data:`IMPLEMENTATIONS`), which a later ``load_state_dict``
    keeps (:func:`_keep_implementation`). If torch has no fused kernel for the parameters' device or
    dtype, the foreach one runs instead, with a warning."""
    opt = cfg.TRAIN.OPTIMIZER
    name, impl = opt.NAME.lower(), opt.IMPL.lower()
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f'TRAIN.OPTIMIZER.IMPL={opt.IMPL!r} is not supported; use one of {sorted(IMPLEMENTATIONS)}')
    if name == 'adamw':
        kind, settings = torch.optim.AdamW, {'eps': opt.EPS, 'betas': tuple(opt.BETAS)}
    elif name == 'sgd':
        kind, settings = torch.optim.SGD, {'momentum': opt.MOMENTUM, 'nesterov': True}
    else:
        raise ValueError(f"TRAIN.OPTIMIZER.NAME={opt.NAME!r} is not supported; use 'adamw' or 'sgd'")

    def make(flags):
        return kind(param_groups(model, cfg.TRAIN.WEIGHT_DECAY), lr=cfg.TRAIN.BASE_LR,
                    weight_decay=cfg.TRAIN.WEIGHT_DECAY, **settings, **flags)
    try:
        optimizer = make(IMPLEMENTATIONS[impl])
    except RuntimeError as err:  # torch refuses fused=True for parameters its kernels do not cover
        if impl != 'fused':
            raise
        logger.warning(f"TRAIN.OPTIMIZER.IMPL='fused': {err}; using 'foreach'")
        optimizer = make(IMPLEMENTATIONS['foreach'])
    optimizer.register_load_state_dict_pre_hook(_keep_implementation)
    return optimizer


def _keep_implementation(optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> Dict[str, Any]:
    """``load_state_dict`` pre-hook: the saved groups keep their hyperparameters and take this run's
    ``fused`` and ``foreach`` flags. Torch would otherwise copy the saved flags too, so a checkpoint
    written with another ``TRAIN.OPTIMIZER.IMPL`` (or before the key existed) would silently switch
    the run to that implementation. A different group count is left to torch to refuse."""
    groups = [{**saved, **{key: current[key] for key in ('fused', 'foreach') if key in current}}
              for saved, current in zip(state['param_groups'], optimizer.param_groups, strict=False)]
    return {**state, 'param_groups': groups + state['param_groups'][len(groups):]}
