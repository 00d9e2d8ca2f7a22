"""AdamW/SGD with the official two parameter groups (docs/training.md, "Optimizer and parameter groups"),
updated by torch's fused kernel unless ``TRAIN.OPTIMIZER.IMPL`` says otherwise."""
from __future__ import annotations

import logging
from typing import Any, Dict, Iterable, List

import torch
import torch.nn as nn

__all__ = ['IMPLEMENTATIONS', 'param_groups', 'build_optimizer', 'load_optimizer_state']

logger = logging.getLogger('flatten.optimizer')

# TRAIN.OPTIMIZER.IMPL -> torch's flags. All three compute the same update: 'foreach' and 'loop' bit for bit
# alike, 'fused' (one kernel per dtype group) to float rounding, 2.4e-7 at most after 12 AdamW steps of
# Swin-T's weights. Fused is 3-5x faster on CPU (Swin-T: 13.7 ms against 45.7 ms foreach and 68.7 ms loop,
# torch's default off CUDA; FLatten-Swin-T 14.7 / 38.5 / 40.9 ms; AMD EPYC, 2 threads, medians of 10).
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
    ``TRAIN.OPTIMIZER.IMPL`` implementation (:data:`IMPLEMENTATIONS`). If torch has no fused kernel for
    the parameters' device or dtype, the foreach one runs instead, with a warning."""
    opt = cfg.TRAIN.OPTIMIZER
    name, impl = opt.NAME.lower(), opt.IMPL.lower()
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f'TRAIN.OPTIMIZER.IMPL={opt.IMPL!r} is not supported; use one of {sorted(IMPLEMENTATIONS)}')
    if name == 'adamw':
        def make(flags):
            return torch.optim.AdamW(param_groups(model, cfg.TRAIN.WEIGHT_DECAY), lr=cfg.TRAIN.BASE_LR, eps=opt.EPS,
                                     betas=tuple(opt.BETAS), weight_decay=cfg.TRAIN.WEIGHT_DECAY, **flags)
    elif name == 'sgd':
        def make(flags):
            return torch.optim.SGD(param_groups(model, cfg.TRAIN.WEIGHT_DECAY), lr=cfg.TRAIN.BASE_LR,
                                   momentum=opt.MOMENTUM, nesterov=True, weight_decay=cfg.TRAIN.WEIGHT_DECAY, **flags)
    else:
        raise ValueError(f"TRAIN.OPTIMIZER.NAME={opt.NAME!r} is not supported; use 'adamw' or 'sgd'")
    try:
        return make(IMPLEMENTATIONS[impl])
    except RuntimeError as err:  # torch refuses fused=True for parameters its kernels do not cover
        if impl != 'fused':
            raise
        logger.warning(f"TRAIN.OPTIMIZER.IMPL='fused': {err}; using 'foreach'")
        return make(IMPLEMENTATIONS['foreach'])


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: Dict[str, Any]) -> None:
    """``optimizer.load_state_dict(state)``, keeping this run's implementation: torch would also take
    the saved groups' ``fused`` and ``foreach`` flags, so a checkpoint written with one
    ``TRAIN.OPTIMIZER.IMPL`` (or before the key existed) would silently switch the run to another."""
    flags = [{key: group[key] for key in ('fused', 'foreach') if key in group} for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, kept in zip(optimizer.param_groups, flags, strict=True):
        group.update(kept)
