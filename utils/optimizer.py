"""AdamW/SGD with the official two parameter groups (docs/training.md, "Optimizer and parameter groups")."""
from __future__ import annotations

from typing import Iterable, List

import torch
import torch.nn as nn

__all__ = ['param_groups', 'build_optimizer']


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
    """The optimizer of ``TRAIN.OPTIMIZER`` at the (already scaled) ``TRAIN.BASE_LR``."""
    opt = cfg.TRAIN.OPTIMIZER
    groups = param_groups(model, cfg.TRAIN.WEIGHT_DECAY)
    name = opt.NAME.lower()
    if name == 'adamw':
        return torch.optim.AdamW(groups, lr=cfg.TRAIN.BASE_LR, eps=opt.EPS, betas=tuple(opt.BETAS),
                                 weight_decay=cfg.TRAIN.WEIGHT_DECAY)
    if name == 'sgd':
        return torch.optim.SGD(groups, lr=cfg.TRAIN.BASE_LR, momentum=opt.MOMENTUM, nesterov=True,
                               weight_decay=cfg.TRAIN.WEIGHT_DECAY)
    raise ValueError(f"TRAIN.OPTIMIZER.NAME={opt.NAME!r} is not supported; use 'adamw' or 'sgd'")
