"""Per-iteration LR schedules on timm's scheduler base (docs/training.md, "LR schedule").

``step_update(t)`` is called with the update counter ``t = epoch·I + idx`` after every optimizer
step, ``I`` being the optimizer updates per epoch. The cosine spans ``EPOCHS`` only (``t`` is not
shifted by the warm-up); cooldown epochs run at ``MIN_LR``. An iteration schedule (``TRAIN.ITERS``)
spans ITERS updates with WARMUP_ITERS of warm-up; its "epochs" are evaluation periods.
"""
from __future__ import annotations

from typing import List

import torch
from timm.scheduler import CosineLRScheduler, MultiStepLRScheduler, PolyLRScheduler, StepLRScheduler
from timm.scheduler.scheduler import Scheduler

__all__ = ['build_scheduler', 'LinearLRScheduler']


class LinearLRScheduler(Scheduler):
    """Linear warm-up, then a linear decay from each base LR to ``base·lr_min_rate`` at ``t_initial``."""

    def __init__(self, optimizer: torch.optim.Optimizer, t_initial: int, lr_min_rate: float,
                 warmup_t: int = 0, warmup_lr_init: float = 0.):
        super().__init__(optimizer, param_group_field='lr', t_in_epochs=False)
        self.t_initial = t_initial
        self.lr_min_rate = lr_min_rate
        self.warmup_t = warmup_t
        self.warmup_lr_init = warmup_lr_init
        if warmup_t:
            self.warmup_steps = [(v - warmup_lr_init) / warmup_t for v in self.base_values]
            super().update_groups(warmup_lr_init)
        else:
            self.warmup_steps = [1 for _ in self.base_values]

    def _get_lr(self, t: int) -> List[float]:
        if t < self.warmup_t:
            return [self.warmup_lr_init + t * s for s in self.warmup_steps]
        t, total = t - self.warmup_t, self.t_initial - self.warmup_t
        return [v - (v - v * self.lr_min_rate) * min(t / max(total, 1), 1.0) for v in self.base_values]


def build_scheduler(cfg, optimizer: torch.optim.Optimizer, updates_per_epoch: int) -> Scheduler:
    """The ``TRAIN.LR_SCHEDULER.NAME`` schedule in optimizer updates (scaled LRs from `cfg`)."""
    if cfg.TRAIN.ITERS:  # an iteration schedule (segmentation)
        num_steps, warmup_steps = cfg.TRAIN.ITERS, cfg.TRAIN.WARMUP_ITERS
    else:  # an epoch schedule, whose warm-up may be counted in updates (detection: 500)
        num_steps = int(cfg.TRAIN.EPOCHS * updates_per_epoch)
        warmup_steps = cfg.TRAIN.WARMUP_ITERS or int(cfg.TRAIN.WARMUP_EPOCHS * updates_per_epoch)
    name = cfg.TRAIN.LR_SCHEDULER.NAME
    if num_steps < 1:
        raise ValueError(f'TRAIN.EPOCHS={cfg.TRAIN.EPOCHS} with {updates_per_epoch} updates per epoch gives an '
                         f'empty schedule')
    if name == 'cosine':
        return CosineLRScheduler(
            optimizer, t_initial=num_steps, lr_min=cfg.TRAIN.MIN_LR, warmup_lr_init=cfg.TRAIN.WARMUP_LR,
            warmup_t=warmup_steps, cycle_limit=1, t_in_epochs=False, warmup_prefix=False)
    if name == 'linear':
        return LinearLRScheduler(optimizer, t_initial=num_steps, lr_min_rate=0.01,
                                 warmup_lr_init=cfg.TRAIN.WARMUP_LR, warmup_t=warmup_steps)
    if name == 'step':
        return StepLRScheduler(
            optimizer, decay_t=int(cfg.TRAIN.LR_SCHEDULER.DECAY_EPOCHS * updates_per_epoch),
            decay_rate=cfg.TRAIN.LR_SCHEDULER.DECAY_RATE, warmup_lr_init=cfg.TRAIN.WARMUP_LR,
            warmup_t=warmup_steps, t_in_epochs=False)
    if name == 'multistep':  # mmdet's step schedule: x DECAY_RATE at each milestone epoch
        return MultiStepLRScheduler(
            optimizer, decay_t=[int(m * updates_per_epoch) for m in cfg.TRAIN.LR_SCHEDULER.MILESTONES],
            decay_rate=cfg.TRAIN.LR_SCHEDULER.DECAY_RATE, warmup_lr_init=cfg.TRAIN.WARMUP_LR,
            warmup_t=warmup_steps, warmup_prefix=False, t_in_epochs=False)
    if name == 'poly':
        return PolyLRScheduler(
            optimizer, t_initial=num_steps, power=cfg.TRAIN.LR_SCHEDULER.POWER, lr_min=cfg.TRAIN.MIN_LR,
            warmup_lr_init=cfg.TRAIN.WARMUP_LR, warmup_t=warmup_steps, cycle_limit=1, t_in_epochs=False,
            warmup_prefix=False)
    raise ValueError(f"TRAIN.LR_SCHEDULER.NAME={name!r} is not supported; use 'cosine', 'linear', 'step', "
                     f"'multistep' or 'poly'")
