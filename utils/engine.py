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

from .benchmark import inference_step, measure, median
from .distributed import all_reduce_sum

__all__ = ['train_one_epoch', 'evaluate', 'throughput', 'NonFiniteLossError', 'format_eta']

logger = logging.getLogger('flatten.engine')


class NonFiniteLossError(RuntimeError):
    """Too many consecutive updates with NaN/inf loss or gradients; the message names the step."""


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
        updates_per_epoch: int,
        start_update: int = 0,
        accumulation_steps: int = 1,
        clip_grad: Optional[float] = None,
        mixup_fn: Optional[Callable] = None,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        scaler: Optional[torch.amp.GradScaler] = None,
        ema=None,
        print_freq: int = 100,
        tb_writer=None,
        max_nonfinite: int = 20,
        after_update: Optional[Callable[[int], None]] = None,
        memory_format: torch.memory_format = torch.contiguous_format,
) -> Dict[str, float]:
    """Train `model` for the rest of epoch `epoch`: updates ``start_update .. updates_per_epoch-1``.

    `loader` yields the batches of those updates (its sampler already skipped the first
    ``start_update · accumulation_steps`` batches when resuming mid-epoch). With
    ``accumulation_steps = a`` the optimizer steps once per ``a`` batches (the others skip DDP's
    all-reduce). The scheduler advances per update: ``step_update(epoch·I + u)`` after update ``u``
    (spec §5.3), and ``after_update(u + 1)`` runs then (mid-epoch checkpoints).

    An update whose gradients are not finite is skipped: under fp16 the GradScaler skips it and
    lowers its scale; otherwise the optimizer step and the EMA update are left out. Skipped updates
    are counted; `max_nonfinite` in a row raise NonFiniteLossError naming the step (nothing has
    been saved since the last good checkpoint). Returns averages of the finite losses and grad
    norms, the last LR, the skipped count and the time.
    """
    model.train()
    optimizer.zero_grad(set_to_none=True)
    num_batches = (updates_per_epoch - start_update) * accumulation_steps
    params = [p for p in model.parameters() if p.requires_grad]
    loss_meter, norm_meter, batch_time = AverageMeter(), AverageMeter(), AverageMeter()
    skipped = consecutive = 0
    start = end = time.time()
    lr = optimizer.param_groups[0]['lr']
    for idx, (samples, targets) in enumerate(loader):
        if idx >= num_batches:
            break
        targets = targets.to(device, non_blocking=True)
        if mixup_fn is not None:
            samples, targets = mixup_fn(samples.to(device, non_blocking=True), targets)
        samples = samples.to(device, non_blocking=True, memory_format=memory_format)
        is_update = (idx + 1) % accumulation_steps == 0
        sync = contextlib.nullcontext() if (is_update or not hasattr(model, 'no_sync')) else model.no_sync()
        with sync:
            with autocast():
                loss = criterion(model(samples), targets)
            scaled = loss / accumulation_steps
            if scaler is not None:
                scaler.scale(scaled).backward()
            else:
                scaled.backward()
        loss_value = loss.item()
        if math.isfinite(loss_value):
            loss_meter.update(loss_value, targets.size(0))
        if is_update:
            update = start_update + idx // accumulation_steps
            if scaler is not None:
                scaler.unscale_(optimizer)
            # max_norm=inf measures the norm without clipping, as the official code logs it; after
            # DDP's all-reduce every rank sees the same norm, so all ranks skip the same updates
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, clip_grad if clip_grad else float('inf')))
            if scaler is not None:
                scale = scaler.get_scale()
                scaler.step(optimizer)
                scaler.update()
                applied = scaler.get_scale() >= scale  # the scaler lowers its scale when it skips
            else:
                applied = math.isfinite(grad_norm)
                if applied:
                    optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            lr_scheduler.step_update(epoch * updates_per_epoch + update)
            if applied:
                consecutive = 0
                norm_meter.update(grad_norm)
                if ema is not None:
                    ema.update(model.module if hasattr(model, 'module') else model)
            else:
                skipped += 1
                consecutive += 1
                logger.warning(f'epoch {epoch} step {update}: non-finite gradients (loss {loss_value}), update '
                               f'skipped ({consecutive} in a row)')
                if consecutive >= max_nonfinite:
                    raise NonFiniteLossError(
                        f'{consecutive} consecutive updates with non-finite loss or gradients, the last at epoch '
                        f'{epoch} step {update} (loss {loss_value}): stopping. The last saved checkpoint is from '
                        f'before these steps; resume from it with a lower TRAIN.BASE_LR, TRAIN.CLIP_GRAD set, or '
                        f'--amp-dtype bf16 (TRAIN.MAX_NONFINITE_STEPS sets how many are tolerated)')
            if after_update is not None:
                after_update(update + 1)
        batch_time.update(time.time() - end)
        end = time.time()
        lr = optimizer.param_groups[0]['lr']
        if (idx % print_freq == 0) or (idx == num_batches - 1):
            eta = batch_time.avg * (num_batches - idx - 1)
            step = start_update * accumulation_steps + idx
            logger.info(
                f'Train: [{epoch}/{total_epochs}][{step}/{updates_per_epoch * accumulation_steps}]\t'
                f'eta {format_eta(eta)} lr {lr:.6f}\t'
                f'time {batch_time.val:.4f} ({batch_time.avg:.4f})\t'
                f'loss {loss_value:.4f} ({loss_meter.avg:.4f})\t'
                f'grad_norm {norm_meter.val:.4f} ({norm_meter.avg:.4f})'
                + (f'\tskipped {skipped}' if skipped else '')
                + (f'\tmem {_memory_mb(device):.0f}MB' if device.type == 'cuda' else ''))
            if tb_writer is not None:
                global_step = epoch * updates_per_epoch * accumulation_steps + step
                tb_writer.add_scalar('train/loss', loss_value, global_step)
                tb_writer.add_scalar('train/lr', lr, global_step)
    epoch_time = time.time() - start
    logger.info(f'EPOCH {epoch} training takes {format_eta(epoch_time)}'
                + (f'; {skipped} updates skipped for non-finite gradients' if skipped else ''))
    return {'loss': loss_meter.avg, 'grad_norm': norm_meter.avg, 'lr': lr, 'skipped_updates': skipped,
            'time': epoch_time}


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
    averaging, spec §7.1). Logs `` * Acc@1 x Acc@5 y`` as Swin does (prefixed by `name`).
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
