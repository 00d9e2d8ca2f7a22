"""One training epoch, one evaluation pass, and the throughput probe; each returns a metric dict."""
from __future__ import annotations

import contextlib
import datetime
import logging
import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Dict, Iterable, List, Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import AverageMeter

from .benchmark import inference_step, measure, median
from .distributed import all_reduce_sum

__all__ = ['RunState', 'StepSettings', 'DetectorLoss', 'to_device', 'NonFiniteGuard', 'EpochLog', 'train_one_epoch',
           'evaluate', 'throughput',
           'NonFiniteLossError', 'format_eta']

logger = logging.getLogger('flatten.engine')


class NonFiniteLossError(RuntimeError):
    """Too many consecutive updates with NaN/inf loss or gradients; the message names the step."""


def format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def _memory_mb(device: torch.device) -> float:
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return 0.0


@dataclass
class RunState:
    """Everything a training run carries from update to update, and saves to resume.

    `model` is the bare model (its state dict is what checkpoints hold); `train_model` is what the
    loop calls (the DDP wrapper, or `model` itself). `epoch` counts completed epochs and `step` the
    optimizer updates already done in the current one, as checkpoints record them.
    """
    model: nn.Module
    train_model: nn.Module
    optimizer: torch.optim.Optimizer
    lr_scheduler: Any
    updates_per_epoch: int
    total_epochs: int
    accumulation_steps: int = 1
    scaler: Optional[torch.amp.GradScaler] = None
    ema: Any = None
    epoch: int = 0
    step: int = 0
    max_accuracy: float = 0.0
    max_accuracy_ema: float = 0.0
    iteration_schedule: bool = False  # logs count updates of the whole run ("epochs" are evaluation periods)

    @property
    def batches_per_epoch(self) -> int:
        return self.updates_per_epoch * self.accumulation_steps

    @property
    def updates_done(self) -> int:
        """Optimizer updates of the whole run so far (an iteration schedule's iteration)."""
        return self.epoch * self.updates_per_epoch + self.step

    @property
    def total_updates(self) -> int:
        return self.total_epochs * self.updates_per_epoch

    def checkpoint_fields(self) -> Dict[str, Any]:
        """The keyword arguments of utils.checkpoint.save_checkpoint for this state."""
        return dict(model=self.model, epoch=self.epoch, step=self.step, max_accuracy=self.max_accuracy,
                    optimizer=self.optimizer, lr_scheduler=self.lr_scheduler, scaler=self.scaler, ema=self.ema,
                    max_accuracy_ema=self.max_accuracy_ema)


@dataclass(frozen=True)
class StepSettings:
    """How a batch becomes a loss and a loss an update: everything the step needs besides the state."""
    criterion: Callable
    device: torch.device
    autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    mixup_fn: Optional[Callable] = None
    clip_grad: Optional[float] = None
    memory_format: torch.memory_format = torch.contiguous_format
    # (model, samples, targets) -> loss, for models that compute their own losses from the targets
    # (detectors: lists of images and of target dicts); `criterion` is not used then
    model_loss: Optional[Callable[[nn.Module, Any, Any], torch.Tensor]] = None


def to_device(value: Any, device: torch.device) -> Any:
    """`value` with every tensor in it (nested in lists, tuples and dicts) moved to `device`."""
    if isinstance(value, torch.Tensor):
        return value.to(device, non_blocking=True)
    if isinstance(value, dict):
        return {key: to_device(item, device) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(to_device(item, device) for item in value)
    return value


class DetectorLoss:
    """A ``StepSettings.model_loss`` for torchvision-style detectors: ``model(images, targets)`` returns a
    dict of losses in training (RPN objectness and box, classifier, box regression, mask), summed here with
    weight 1 each (the heads weigh their own terms, e.g. the cascade stages). `images` is a list of
    (3, H, W) tensors and `targets` a list of dicts, as the detection loaders yield them. The last batch's
    terms are kept in :attr:`last` (floats) for the progress line."""

    def __init__(self, device: torch.device):
        self.device = device
        self.last: Dict[str, float] = {}

    def __call__(self, model: nn.Module, images: List[torch.Tensor], targets: List[dict]) -> torch.Tensor:
        losses = model(to_device(list(images), self.device), to_device(list(targets), self.device))
        self.last = {name: float(value.detach()) for name, value in losses.items()}
        return sum(losses.values())


class NonFiniteGuard:
    """The non-finite policy: an update whose gradients are not finite is skipped and counted;
    `max_in_row` skipped in a row raise NonFiniteLossError naming the step (nothing has been saved
    since the last good checkpoint)."""

    def __init__(self, max_in_row: int = 20):
        self.max_in_row = max_in_row
        self.in_row = 0

    def record(self, applied: bool, epoch: int, update: int, loss_value: float) -> None:
        if applied:
            self.in_row = 0
            return
        self.in_row += 1
        logger.warning(f'epoch {epoch} step {update}: non-finite gradients (loss {loss_value}), update skipped '
                       f'({self.in_row} in a row)')
        if self.in_row >= self.max_in_row:
            raise NonFiniteLossError(
                f'{self.in_row} consecutive updates with non-finite loss or gradients, the last at epoch {epoch} '
                f'step {update} (loss {loss_value}): stopping. The last saved checkpoint is from before these '
                f'steps; resume from it with a lower TRAIN.BASE_LR, TRAIN.CLIP_GRAD set, or --amp-dtype bf16 '
                f'(TRAIN.MAX_NONFINITE_STEPS sets how many are tolerated)')


class EpochLog:
    """Averages, the progress line with its ETA (every `print_freq` batches and the last one) and
    the per-batch TensorBoard scalars of one training epoch."""

    def __init__(self, state: RunState, print_freq: int = 100, tb_writer=None, terms: Optional[DetectorLoss] = None):
        self.state, self.print_freq, self.tb_writer = state, print_freq, tb_writer
        self.terms = terms  # a detector's loss terms of the last batch, printed after the total
        # a mid-epoch resume starts at update state.step: batch indices continue from there
        self.first_batch = state.step * state.accumulation_steps
        self.num_batches = state.batches_per_epoch - self.first_batch
        self.loss, self.grad_norm, self.batch_time = AverageMeter(), AverageMeter(), AverageMeter()
        self.skipped = 0
        self.start = self.end = time.time()

    def batch(self, idx: int, loss_value: float, batch_size: int, device: torch.device) -> None:
        if math.isfinite(loss_value):
            self.loss.update(loss_value, batch_size)
        self.batch_time.update(time.time() - self.end)
        self.end = time.time()
        if (idx % self.print_freq == 0) or (idx == self.num_batches - 1):
            self._print(idx, loss_value, device)

    def _print(self, idx: int, loss_value: float, device: torch.device) -> None:
        state = self.state
        lr = state.optimizer.param_groups[0]['lr']
        step = self.first_batch + idx  # the batch index within the epoch
        remaining = self.num_batches - idx - 1
        if state.iteration_schedule:  # the whole run's, not the evaluation period's
            total = state.total_epochs * state.batches_per_epoch
            remaining = total - (state.epoch * state.batches_per_epoch + step + 1)
        eta = self.batch_time.avg * remaining
        if state.iteration_schedule:
            done = state.epoch * state.updates_per_epoch + (step + 1) // state.accumulation_steps
            where = f'[iter {done}/{state.total_updates}]'
        else:
            where = f'[{state.epoch}/{state.total_epochs}][{step}/{state.batches_per_epoch}]'
        logger.info(
            f'Train: {where}\t'
            f'eta {format_eta(eta)} lr {lr:.6f}\t'
            f'time {self.batch_time.val:.4f} ({self.batch_time.avg:.4f})\t'
            f'loss {loss_value:.4f} ({self.loss.avg:.4f})\t'
            + (' '.join(f'{name} {value:.4f}' for name, value in self.terms.last.items()) + '\t' if self.terms else '')
            + f'grad_norm {self.grad_norm.val:.4f} ({self.grad_norm.avg:.4f})'
            + (f'\tskipped {self.skipped}' if self.skipped else '')
            + (f'\tmem {_memory_mb(device):.0f}MB' if device.type == 'cuda' else ''))
        if self.tb_writer is not None:
            global_step = state.epoch * state.batches_per_epoch + step
            self.tb_writer.add_scalar('train/loss', loss_value, global_step)
            self.tb_writer.add_scalar('train/lr', lr, global_step)

    def summary(self) -> Dict[str, float]:
        seconds = time.time() - self.start
        logger.info(f'EPOCH {self.state.epoch} training takes {format_eta(seconds)}'
                    + (f'; {self.skipped} updates skipped for non-finite gradients' if self.skipped else ''))
        return {'loss': self.loss.avg, 'grad_norm': self.grad_norm.avg,
                'lr': self.state.optimizer.param_groups[0]['lr'], 'skipped_updates': self.skipped, 'time': seconds}


def backward_batch(state: RunState, settings: StepSettings, samples: torch.Tensor, targets: torch.Tensor,
                   is_update: bool) -> float:
    """Forward and backward of one batch (``samples: (B, 3, H, W)``, or what ``settings.model_loss``
    takes); returns the unscaled loss.

    Mixup/CutMix mixes the batch first. Batches that do not end an update skip DDP's all-reduce.
    """
    model = state.train_model
    if settings.model_loss is None:
        targets = targets.to(settings.device, non_blocking=True)
        if settings.mixup_fn is not None:
            samples, targets = settings.mixup_fn(samples.to(settings.device, non_blocking=True), targets)
        samples = samples.to(settings.device, non_blocking=True, memory_format=settings.memory_format)
    sync = contextlib.nullcontext() if (is_update or not hasattr(model, 'no_sync')) else model.no_sync()
    with sync:
        with settings.autocast():
            if settings.model_loss is None:
                loss = settings.criterion(model(samples), targets)
            else:
                loss = settings.model_loss(model, samples, targets)
        scaled = loss / state.accumulation_steps
        if state.scaler is not None:
            state.scaler.scale(scaled).backward()
        else:
            scaled.backward()
    return loss.item()


def apply_update(state: RunState, params: List[torch.nn.Parameter], clip_grad: Optional[float]) -> Tuple[float, bool]:
    """Clip, step the optimizer (unless the gradients are not finite), advance the schedule and the
    EMA; returns (gradient norm, whether the update was applied).

    Under fp16 the GradScaler skips a non-finite update and lowers its scale. The scheduler steps
    per update, ``step_update(epoch · I + u)`` after update ``u`` (docs/training.md, "LR schedule").
    """
    if state.scaler is not None:
        state.scaler.unscale_(state.optimizer)
    # max_norm=inf measures the norm without clipping, as the official code logs it; after DDP's
    # all-reduce every rank sees the same norm, so all ranks skip the same updates
    grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad else float('inf')))
    if state.scaler is not None:
        scale = state.scaler.get_scale()
        state.scaler.step(state.optimizer)
        state.scaler.update()
        applied = state.scaler.get_scale() >= scale  # the scaler lowers its scale when it skips
    else:
        applied = math.isfinite(grad_norm)
        if applied:
            state.optimizer.step()
    state.optimizer.zero_grad(set_to_none=True)
    state.lr_scheduler.step_update(state.epoch * state.updates_per_epoch + state.step)
    if applied and (state.ema is not None):
        state.ema.update(state.model)
    return grad_norm, applied


def train_one_epoch(state: RunState, loader: Iterable, settings: StepSettings, *, log: EpochLog,
                    guard: NonFiniteGuard, after_update: Optional[Callable[[RunState], None]] = None,
                    ) -> Dict[str, float]:
    """Train the rest of epoch ``state.epoch``: updates ``state.step .. updates_per_epoch - 1``.

    `loader` yields the batches of those updates (its sampler already skipped the batches of the
    ``state.step`` updates done before a mid-epoch resume). With ``accumulation_steps = a`` the
    optimizer steps once per ``a`` batches. ``state.step`` counts the updates done; after each one
    ``after_update(state)`` runs (mid-epoch checkpoints, the stop check). Returns averages of the
    finite losses and grad norms, the last LR, the skipped count and the time.
    """
    state.train_model.train()
    state.optimizer.zero_grad(set_to_none=True)
    params = [p for p in state.train_model.parameters() if p.requires_grad]
    for idx, (samples, targets) in enumerate(loader):
        if idx >= log.num_batches:
            break
        is_update = (idx + 1) % state.accumulation_steps == 0
        loss_value = backward_batch(state, settings, samples, targets, is_update)
        if is_update:
            grad_norm, applied = apply_update(state, params, settings.clip_grad)
            if applied:
                log.grad_norm.update(grad_norm)
            else:
                log.skipped += 1
            guard.record(applied, state.epoch, state.step, loss_value)
            state.step += 1
            if after_update is not None:
                after_update(state)
        log.batch(idx, loss_value, len(samples), settings.device)
    return log.summary()


@torch.no_grad()
def evaluate(
        model: nn.Module,
        loader: torch.utils.data.DataLoader,
        *,
        device: torch.device,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        print_freq: int = 100,
        name: str = '',
        memory_format: torch.memory_format = torch.contiguous_format,
) -> Dict[str, float]:
    """Top-1/top-5 accuracy (percent) and mean CE loss over every image of `loader`'s dataset.

    Each rank sums correct counts, loss and image count over its shard; one all-reduce of the
    sums gives exact dataset-wide figures whatever the shard sizes (unlike the official per-batch
    averaging; docs/differences.md, "Validation accuracy"). Logs `` * Acc@1 x Acc@5 y`` as Swin does
    (prefixed by `name`).
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, count
    batch_time = AverageMeter()
    end = time.time()
    for idx, (images, targets) in enumerate(loader):
        images = images.to(device, non_blocking=True, memory_format=memory_format)
        targets = targets.to(device, non_blocking=True)
        with autocast():
            output = model(images)
        output = output.float()
        maxk = min(5, output.shape[1])
        top = output.topk(maxk, dim=1).indices
        hits = top.eq(targets[:, None])
        totals[0] += hits[:, :1].sum()
        totals[1] += hits.sum()
        totals[2] += F.cross_entropy(output, targets, reduction='sum').double()
        totals[3] += targets.numel()
        batch_time.update(time.time() - end)
        end = time.time()
        if (idx % print_freq == 0) or (idx == len(loader) - 1):
            logger.info(f'Test{name}: [{idx}/{len(loader)}]\ttime {batch_time.val:.3f} ({batch_time.avg:.3f})\t'
                        f'eta {format_eta(batch_time.avg * (len(loader) - idx - 1))}')
    all_reduce_sum(totals)
    count = max(totals[3].item(), 1.0)
    stats = {'acc1': 100.0 * totals[0].item() / count, 'acc5': 100.0 * totals[1].item() / count,
             'loss': totals[2].item() / count, 'count': int(totals[3].item())}
    prefix = f' *{name}' if name else ' *'
    logger.info(f'{prefix} Acc@1 {stats["acc1"]:.3f} Acc@5 {stats["acc5"]:.3f}')
    return stats


def throughput(model: nn.Module, loader: torch.utils.data.DataLoader, *, device: torch.device,
               autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
               memory_format: torch.memory_format = torch.contiguous_format,
               repeats: int = 7) -> Dict[str, float]:
    """Inference images/s on one batch of `loader`: the median of `repeats` timed repeats after a
    warm-up, measured by the same code as ``bench/`` (utils/benchmark.py). Logs Swin's line
    ``batch_size B throughput T``."""
    images, _ = next(iter(loader))
    images = images.to(device, non_blocking=True, memory_format=memory_format)
    batch_size = images.shape[0]
    logger.info(f'throughput: median of {repeats} timed repeats after warm-up')
    times = measure({'model': inference_step(model, images, autocast)}, device, repeats=repeats)['model']
    rate = batch_size / median(times)
    logger.info(f'batch_size {batch_size} throughput {rate}')
    return {'batch_size': batch_size, 'throughput': rate, 'seconds_per_batch': times}
