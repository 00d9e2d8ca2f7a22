"""One training epoch, one evaluation pass, and the throughput probe; each returns a metric dict."""
from __future__ import annotations

import contextlib
import datetime
import logging
import math
import time
from typing import Callable, Dict, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.utils import AverageMeter

from .distributed import all_reduce_sum

__all__ = ['train_one_epoch', 'evaluate', 'throughput', 'NonFiniteLossError', 'format_eta']

logger = logging.getLogger('flatten.engine')


class NonFiniteLossError(RuntimeError):
    """The training loss became NaN/inf; the message names the epoch and step."""


def format_eta(seconds: float) -> str:
    return str(datetime.timedelta(seconds=int(max(seconds, 0))))


def _memory_mb(device: torch.device) -> float:
    if device.type == 'cuda':
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return 0.0


def train_one_epoch(
        model: nn.Module,
        criterion: Callable,
        loader: torch.utils.data.DataLoader,
        optimizer: torch.optim.Optimizer,
        lr_scheduler,
        epoch: int,
        *,
        device: torch.device,
        total_epochs: int,
        accumulation_steps: int = 1,
        clip_grad: Optional[float] = None,
        mixup_fn: Optional[Callable] = None,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        scaler: Optional[torch.amp.GradScaler] = None,
        ema=None,
        print_freq: int = 100,
        tb_writer=None,
) -> Dict[str, float]:
    """Train `model` for one pass over `loader`.

    With ``accumulation_steps = a`` the optimizer steps once per ``a`` batches (gradients of the
    others are not all-reduced under DDP), and trailing batches that do not fill a group are
    skipped. The scheduler advances per update: ``step_update(epoch·I + u)`` after update ``u``
    (spec §5.3). Returns averages of loss and grad norm, the last LR and the epoch time.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    updates_per_epoch = len(loader) // accumulation_steps
    num_batches = updates_per_epoch * accumulation_steps
    params = [p for p in model.parameters() if p.requires_grad]
    loss_meter, norm_meter, batch_time = AverageMeter(), AverageMeter(), AverageMeter()
    start = end = time.time()
    lr = optimizer.param_groups[0]['lr']
    for idx, (samples, targets) in enumerate(loader):
        if idx >= num_batches:
            break
        samples = samples.to(device, non_blocking=True)
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples, targets)
        is_update = (idx + 1) % accumulation_steps == 0
        sync = contextlib.nullcontext() if (is_update or not hasattr(model, 'no_sync')) else model.no_sync()
        with sync:
            with autocast():
                loss = criterion(model(samples), targets)
            if not math.isfinite(loss.item()):
                raise NonFiniteLossError(
                    f'loss is {loss.item()} at epoch {epoch} step {idx}/{len(loader)}: stopping; the last saved '
                    f'checkpoint is unaffected (lower TRAIN.BASE_LR, enable TRAIN.CLIP_GRAD or use --amp-dtype bf16)')
            scaled = loss / accumulation_steps
            if scaler is not None:
                scaler.scale(scaled).backward()
            else:
                scaled.backward()
        if is_update:
            if scaler is not None:
                scaler.unscale_(optimizer)
            # max_norm=inf measures the norm without clipping, as the official code logs it
            grad_norm = torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad else float('inf'))
            if scaler is not None:
                scaler.step(optimizer)
                scaler.update()
            else:
                optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            update = idx // accumulation_steps
            lr_scheduler.step_update(epoch * updates_per_epoch + update)
            if ema is not None:
                ema.update(model.module if hasattr(model, 'module') else model)
            norm_meter.update(float(grad_norm))
        loss_meter.update(loss.item(), targets.size(0))
        batch_time.update(time.time() - end)
        end = time.time()
        lr = optimizer.param_groups[0]['lr']
        if (idx % print_freq == 0) or (idx == num_batches - 1):
            eta = batch_time.avg * (num_batches - idx - 1)
            logger.info(
                f'Train: [{epoch}/{total_epochs}][{idx}/{num_batches}]\t'
                f'eta {format_eta(eta)} lr {lr:.6f}\t'
                f'time {batch_time.val:.4f} ({batch_time.avg:.4f})\t'
                f'loss {loss_meter.val:.4f} ({loss_meter.avg:.4f})\t'
                f'grad_norm {norm_meter.val:.4f} ({norm_meter.avg:.4f})'
                + (f'\tmem {_memory_mb(device):.0f}MB' if device.type == 'cuda' else ''))
            if tb_writer is not None:
                step = epoch * num_batches + idx
                tb_writer.add_scalar('train/loss', loss_meter.val, step)
                tb_writer.add_scalar('train/lr', lr, step)
    epoch_time = time.time() - start
    logger.info(f'EPOCH {epoch} training takes {format_eta(epoch_time)}')
    return {'loss': loss_meter.avg, 'grad_norm': norm_meter.avg, 'lr': lr, 'time': epoch_time}


@torch.no_grad()
def evaluate(
        model: nn.Module,
        loader: torch.utils.data.DataLoader,
        *,
        device: torch.device,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        print_freq: int = 100,
        name: str = '',
) -> Dict[str, float]:
    """Top-1/top-5 accuracy (percent) and mean CE loss over every image of `loader`'s dataset.

    Each rank sums correct counts, loss and image count over its shard; one all-reduce of the
    sums gives exact dataset-wide figures whatever the shard sizes (unlike the official per-batch
    averaging, spec §7.1). Logs `` * Acc@1 x Acc@5 y`` as Swin does (prefixed by `name`).
    """
    model.eval()
    totals = torch.zeros(4, dtype=torch.float64, device=device)  # correct@1, correct@5, loss sum, count
    batch_time = AverageMeter()
    end = time.time()
    for idx, (images, targets) in enumerate(loader):
        images = images.to(device, non_blocking=True)
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


@torch.no_grad()
def throughput(model: nn.Module, loader: torch.utils.data.DataLoader, *, device: torch.device,
               autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
               warmup: int = 50, repeats: int = 30) -> Dict[str, float]:
    """Inference images/s on one batch of `loader` after `warmup` passes (Swin's probe)."""
    model.eval()
    images, _ = next(iter(loader))
    images = images.to(device, non_blocking=True)
    batch_size = images.shape[0]
    with autocast():
        for _ in range(warmup):
            model(images)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
        logger.info(f'throughput averaged over {repeats} passes')
        tic = time.time()
        for _ in range(repeats):
            model(images)
        if device.type == 'cuda':
            torch.cuda.synchronize(device)
    rate = repeats * batch_size / (time.time() - tic)
    logger.info(f'batch_size {batch_size} throughput {rate}')
    return {'batch_size': batch_size, 'throughput': rate}
