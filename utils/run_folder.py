"""A training run's folder and its save policy.

:class:`RunFolder` owns every write into ``<OUTPUT>/<MODEL.NAME>/<TAG>``: checkpoints (rank 0,
atomic, pruned to TRAIN.KEEP_CKPTS), ``metrics.jsonl`` (one line per epoch) and TensorBoard.
:class:`CheckpointTriggers` decides when to save and when to stop: every TRAIN.CKPT_STEPS updates,
every SAVE_FREQ epochs, at a new best accuracy, and when a rank received a stop signal
(utils/preemption.py).
"""
from __future__ import annotations

import json
import logging
import os
from typing import Dict, List, Optional

import torch

from .checkpoint import (
    gather_rng_states,
    periodic_checkpoint_name,
    prune_checkpoints,
    remove_partial_writes,
    save_checkpoint,
)
from .distributed import barrier
from .engine import RunState
from .preemption import Preempted, StopSignal

__all__ = ['RunFolder', 'CheckpointTriggers', 'keep_aside', 'write_config', 'prepare_metrics']

logger = logging.getLogger('flatten')


def keep_aside(path: str) -> Optional[str]:
    """Rename an existing `path` to the first free ``path.1``, ``path.2``, …; returns the new name."""
    if not os.path.exists(path):
        return None
    index = 1
    while os.path.exists(f'{path}.{index}'):
        index += 1
    os.replace(path, f'{path}.{index}')
    return f'{path}.{index}'


def write_config(output_dir: str, name: str, config_yaml: str, is_main: bool) -> None:
    """Save the full resolved config beside the run, once everything it names has loaded. A
    different config already there (a resumed run with changed settings) is kept as name.1, .2, …"""
    if not is_main:
        return
    path = os.path.join(output_dir, name)
    if os.path.exists(path):
        with open(path) as f:
            if f.read() == config_yaml:
                return
        logger.info(f'{name} differs from the one already in {output_dir}: kept the old one as {keep_aside(path)}')
    with open(path, 'w') as f:
        f.write(config_yaml)


def prepare_metrics(output_dir: str, start_epoch: int, resuming: bool) -> None:
    """A resumed run drops the metrics lines of the epochs it repeats (a kill after logging, before
    saving); a fresh run in a folder with another run's metrics keeps those aside."""
    path = os.path.join(output_dir, 'metrics.jsonl')
    if not os.path.exists(path):
        return
    if not resuming:
        logger.info(f'metrics.jsonl of an earlier run kept as {keep_aside(path)}')
        return
    with open(path) as f:
        lines = [line for line in f if line.strip() and json.loads(line).get('epoch', -1) < start_epoch]
    with open(path + '.tmp', 'w') as f:
        f.writelines(lines)
    os.replace(path + '.tmp', path)


class RunFolder:
    """Checkpoints, metrics and TensorBoard of one run; only rank 0 writes."""

    def __init__(self, output_dir: str, config_yaml: str, keep: int, is_main: bool, state: RunState,
                 resuming: bool):
        self.output_dir, self.config_yaml, self.keep, self.is_main = output_dir, config_yaml, keep, is_main
        self.tb_writer = None
        if not is_main:
            return
        for name in remove_partial_writes(output_dir):
            logger.warning(f'removed {name}, the remains of a checkpoint write that was interrupted')
        prepare_metrics(output_dir, state.epoch, resuming)
        from torch.utils.tensorboard import SummaryWriter  # slow import, rank 0 only
        # when resuming, purge_step drops the events a killed run logged after its last checkpoint
        purge = (state.epoch * state.batches_per_epoch + state.step * state.accumulation_steps) if resuming else None
        self.tb_writer = SummaryWriter(log_dir=os.path.join(output_dir, 'tensorboard'), purge_step=purge)

    def save(self, state: RunState, names: List[str]) -> None:
        """Every rank hands over its RNG states; rank 0 writes each file in `names` (a collective)."""
        rng = gather_rng_states()
        if self.is_main:
            for name in names:
                save_checkpoint(os.path.join(self.output_dir, name), config_yaml=self.config_yaml, rng=rng,
                                **state.checkpoint_fields())
            prune_checkpoints(self.output_dir, self.keep)
            at = f' (iteration {state.updates_done} of {state.total_updates})' if state.iteration_schedule else ''
            logger.info(f'saved {", ".join(names)} in {self.output_dir}{at}')
        barrier()  # no rank may exit (and so have torchrun stop the others) while rank 0 writes

    def record_epoch(self, epoch: int, state: RunState, stats: Dict[str, Optional[Dict[str, float]]]) -> None:
        """One metrics.jsonl line and the epoch's TensorBoard scalars; `stats` holds the 'train',
        'val' and (None without EMA) 'ema' metric dicts."""
        if not self.is_main:
            return
        def figures(split: str) -> dict:  # the confusion matrix of a segmentation evaluation stays out of the log
            return {f'{split}_{k}': v for k, v in stats[split].items() if not isinstance(v, torch.Tensor)}
        record = {'epoch': epoch, **figures('train'), **figures('val'), 'max_accuracy': state.max_accuracy}
        if stats['ema'] is not None:
            record.update(figures('ema'), max_accuracy_ema=state.max_accuracy_ema)
        with open(os.path.join(self.output_dir, 'metrics.jsonl'), 'a') as f:
            f.write(json.dumps(record) + '\n')
        step = (epoch + 1) * state.batches_per_epoch
        keys = ('loss', 'lr', 'grad_norm', 'skipped_updates', 'acc1', 'acc5', 'mIoU', 'mAcc', 'aAcc')
        for split in ('train', 'val', 'ema'):
            for key in keys if stats[split] is not None else ():
                if key in stats[split]:
                    self.tb_writer.add_scalar(f'epoch/{split}_{key}', stats[split][key], step)
        self.tb_writer.flush()

    def close(self) -> None:
        if self.tb_writer is not None:
            self.tb_writer.close()


class CheckpointTriggers:
    """When to save and when to stop. Every method is called at the same point on every rank (the
    stop check is a collective)."""

    def __init__(self, folder: RunFolder, stop: StopSignal, device: torch.device, ckpt_steps: int, save_freq: int):
        self.folder, self.stop, self.device = folder, stop, device
        self.ckpt_steps, self.save_freq = ckpt_steps, save_freq

    def stop_if_asked(self, state: RunState, names: List[str], where: str) -> None:
        """If any rank received a stop signal: save `names` and raise Preempted."""
        if self.stop.should_stop(self.device):
            self._stop(state, names, where)

    def _stop(self, state: RunState, names: List[str], where: str) -> None:
        if names:
            self.folder.save(state, names)
        saved = f'saved {names[0]} in {self.folder.output_dir}' if names else 'nothing new to save'
        raise Preempted(f'stopped by {self.stop.describe()} {where}; {saved}. Run the same command again to '
                        f'continue exactly from there')

    def after_update(self, state: RunState) -> None:
        """Inside an epoch: stop when asked, else save every `ckpt_steps` updates. The epoch's last
        update is left to :meth:`end_of_epoch`, which evaluates first."""
        if state.step >= state.updates_per_epoch:
            return
        name = periodic_checkpoint_name(state.epoch, state.step)
        if state.iteration_schedule:
            where = f'after iteration {state.updates_done} of {state.total_updates}'
        else:
            where = f'after update {state.step} of {state.updates_per_epoch} of epoch {state.epoch}'
        self.stop_if_asked(state, [name], where)
        if self.ckpt_steps and (state.step % self.ckpt_steps == 0):
            self.folder.save(state, [name])

    def end_of_epoch(self, state: RunState, is_best: bool, is_best_ema: bool) -> None:
        """After the evaluation of epoch ``state.epoch - 1``: the periodic and best checkpoints, and
        the stop a signal during the evaluation asked for."""
        epoch = state.epoch - 1
        last = state.epoch >= state.total_epochs
        stopping = self.stop.should_stop(self.device)
        names = [periodic_checkpoint_name(epoch)] if ((epoch % self.save_freq == 0) or last or stopping) else []
        names += ['max_acc.pth'] if is_best else []
        names += ['max_ema_acc.pth'] if is_best_ema else []
        if stopping and not last:
            where = f'after iteration {state.updates_done} of {state.total_updates} and its evaluation' \
                if state.iteration_schedule else f'at the end of epoch {epoch}'
            self._stop(state, names, where)
        if names:
            self.folder.save(state, names)
