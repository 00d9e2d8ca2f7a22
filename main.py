"""Train, evaluate or time a FLatten model.

    python main.py --cfg configs/demo/flatten_swin_fmnist.yaml
    torchrun --nproc_per_node=8 main.py --cfg configs/flatten_swin_t.yaml --data-path /imagenet
    python main.py --cfg configs/flatten_swin_t.yaml --data-path /imagenet --eval --resume ckpt.pth

The story: parse flags into a config → set up device / distributed → build data, model,
optimizer and schedule → load pretrained weights or resume → per epoch: train, evaluate, save.
Bad input (unknown config key, missing data, unreadable checkpoint, ...) ends with one error
paragraph and exit code 2, never a traceback.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import logging
import os
import sys
import time
from typing import List, Optional, Sequence

import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3

from config import ConfigError, config_to_yaml, load_config, scale_lr
from data import DatasetNotFoundError, build_loaders, build_mixup
from logger import create_logger
from models import UnknownModelError, build_model
from utils.checkpoint import (
    CheckpointError,
    find_latest_checkpoint,
    load_checkpoint,
    load_pretrained,
    model_state_dict,
    save_checkpoint,
    torch_load,
)
from utils.distributed import DeviceError, cleanup, init_distributed
from utils.engine import NonFiniteLossError, evaluate, format_eta, throughput, train_one_epoch
from utils.lr_scheduler import build_scheduler
from utils.misc import count_parameters, seed_everything
from utils.optimizer import build_optimizer

logger = logging.getLogger('flatten')

# Errors caused by what the user asked for: reported as one message, exit code 2.
USER_ERRORS = (ConfigError, DatasetNotFoundError, UnknownModelError, CheckpointError, DeviceError,
               NonFiniteLossError)

# flag -> (config key, value transform). Flags left at their default (None / False) set nothing.
FLAG_TO_KEY = {
    'batch_size': ('DATA.BATCH_SIZE', int),
    'data_path': ('DATA.DATA_PATH', str),
    'zip': ('DATA.ZIP_MODE', bool),
    'cache_mode': ('DATA.CACHE_MODE', str),
    'pretrained': ('MODEL.PRETRAINED', str),
    'resume': ('MODEL.RESUME', str),
    'accumulation_steps': ('TRAIN.ACCUMULATION_STEPS', int),
    'use_checkpoint': ('TRAIN.USE_CHECKPOINT', bool),
    'find_unused_params': ('TRAIN.FIND_UNUSED_PARAMS', bool),
    'model_ema': ('TRAIN.EMA.ENABLE', bool),
    'model_ema_decay': ('TRAIN.EMA.DECAY', float),
    'amp': ('AMP', bool),
    'amp_dtype': ('AMP_DTYPE', str),
    'device': ('DEVICE', str),
    'output': ('OUTPUT', str),
    'tag': ('TAG', str),
    'eval': ('EVAL_MODE', bool),
    'eval_ema': ('EVAL_EMA', bool),
    'throughput': ('THROUGHPUT_MODE', bool),
}


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser('FLatten Transformer training and evaluation', add_help=True)
    parser.add_argument('--cfg', type=str, required=True, metavar='FILE', help='path to config file')
    parser.add_argument('--opts', nargs='+', default=None, metavar='KEY VALUE',
                        help="modify config options by adding 'KEY VALUE' pairs")
    parser.add_argument('--batch-size', type=int, help='batch size for a single GPU / process')
    parser.add_argument('--data-path', type=str, help='path to dataset')
    parser.add_argument('--zip', action='store_true', default=None, help='zipped dataset (not supported)')
    parser.add_argument('--cache-mode', type=str, choices=['no', 'full', 'part'], help='zip cache mode')
    parser.add_argument('--pretrained', type=str, help='initialise from these weights, adapting resolution/classes')
    parser.add_argument('--resume', type=str, help='resume from checkpoint')
    parser.add_argument('--accumulation-steps', type=int, help='gradient accumulation steps')
    parser.add_argument('--use-checkpoint', action='store_true', default=None,
                        help='gradient checkpointing to save memory')
    parser.add_argument('--amp', action='store_true', default=None, help='mixed precision (fp16 unless --amp-dtype)')
    parser.add_argument('--amp-dtype', type=str, choices=['bf16', 'fp16'], help='autocast dtype; implies --amp')
    parser.add_argument('--output', type=str, metavar='PATH',
                        help='root of output folder, the full path is <output>/<model_name>/<tag> (default: output)')
    parser.add_argument('--tag', type=str, help='tag of experiment')
    parser.add_argument('--eval', action='store_true', default=None, help='perform evaluation only')
    parser.add_argument('--eval-ema', action='store_true', default=None,
                        help="evaluate the checkpoint's EMA weights (state_dict_ema); implies --eval")
    parser.add_argument('--throughput', action='store_true', default=None, help='test throughput only')
    parser.add_argument('--find-unused-params', action='store_true', default=None,
                        help='DDP find_unused_parameters (needed by PVT v1, whose final norm is unused)')
    parser.add_argument('--model-ema', action='store_true', default=None, help='keep an EMA of the weights')
    parser.add_argument('--model-ema-decay', type=float, help='EMA decay (default 0.9999)')
    parser.add_argument('--device', type=str, help="'cpu', 'cuda' or 'cuda:N' (default: cuda when available)")
    # torch.distributed.launch passes --local_rank; torchrun uses the LOCAL_RANK variable instead
    parser.add_argument('--local_rank', '--local-rank', type=int, default=None, help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def flags_to_opts(args: argparse.Namespace) -> List[str]:
    """The explicit flag → config-key mapping, as ``['KEY', 'VALUE', ...]``."""
    opts: List[str] = []
    for flag, (key, cast) in FLAG_TO_KEY.items():
        value = getattr(args, flag)
        if value is None:
            continue
        # repr() keeps strings strings: yacs literal-evaluates values, so a --tag of 1 would become an int
        opts += [key, repr(cast(value))]
    if args.amp_dtype is not None:
        opts += ['AMP', 'True']
    if args.eval_ema:
        opts += ['EVAL_MODE', 'True']
    return opts


def build_criterion(cfg, mixup_active: bool) -> torch.nn.Module:
    if mixup_active:
        return SoftTargetCrossEntropy()  # targets are already smoothed and mixed by timm's Mixup
    if cfg.MODEL.LABEL_SMOOTHING > 0.:
        return LabelSmoothingCrossEntropy(smoothing=cfg.MODEL.LABEL_SMOOTHING)
    return torch.nn.CrossEntropyLoss()


def make_autocast(cfg, device: torch.device):
    """The one AMP path: an autocast factory, or nullcontext when AMP is off."""
    if not cfg.AMP:
        return contextlib.nullcontext
    dtype = torch.bfloat16 if cfg.AMP_DTYPE == 'bf16' else torch.float16
    return functools.partial(torch.autocast, device_type=device.type, dtype=dtype)


def prune_checkpoints(output_dir: str, keep: int) -> None:
    """Delete all but the newest `keep` ckpt_epoch_*.pth files (by recorded epoch)."""
    epochs = []
    for name in os.listdir(output_dir):
        if name.startswith('ckpt_epoch_') and name.endswith('.pth') and name[11:-4].isdigit():
            epochs.append(int(name[11:-4]))
    for epoch in sorted(epochs)[:-keep]:
        os.remove(os.path.join(output_dir, f'ckpt_epoch_{epoch}.pth'))


def checkpoint_to_resume(cfg, output_dir: str, train_mode: bool) -> Optional[str]:
    """The checkpoint whose full state this run restores, or None.

    Training: the newest ``ckpt_epoch_*.pth`` of this run's folder (TRAIN.AUTO_RESUME), else
    ``--resume``. The folder wins so that re-launching the same command after a crash continues
    this run instead of restarting from the ``--resume`` file (official behaviour, with a warning).
    Evaluation: ``--resume`` when given; with ``--pretrained`` nothing (the adapted weights are what
    is evaluated); else the folder's newest checkpoint.
    """
    latest = find_latest_checkpoint(output_dir) if cfg.TRAIN.AUTO_RESUME else None
    if not train_mode:
        if cfg.MODEL.RESUME or cfg.MODEL.PRETRAINED:
            return cfg.MODEL.RESUME or None
        return latest
    if latest and cfg.MODEL.RESUME and os.path.abspath(cfg.MODEL.RESUME) != os.path.abspath(latest):
        logger.warning(f'auto-resume: continuing this run from {latest} instead of --resume {cfg.MODEL.RESUME}')
    return latest or cfg.MODEL.RESUME or None


def choose_num_classes(dataset_classes: int, eval_ckpt, path: Optional[str], ema_weights: bool) -> int:
    """The model's class count. Training: the dataset's (a pretrained head of another size is
    replaced). Evaluating a checkpoint: its head's, which must cover the dataset's labels (an
    ImageNet model evaluated on a folder of a few of its classes keeps its 1000 outputs)."""
    if eval_ckpt is None:
        return dataset_classes
    weights = eval_ckpt.get('state_dict_ema') if (ema_weights and isinstance(eval_ckpt, dict)) else None
    head = (weights or model_state_dict(eval_ckpt, path)).get('head.weight')
    if head is None:
        return dataset_classes
    if head.shape[0] < dataset_classes:
        raise CheckpointError(f'{path!r} has a {head.shape[0]}-class head but the validation set has '
                              f'{dataset_classes} classes')
    return int(head.shape[0])


def write_config(output_dir: str, name: str, config_yaml: str, is_main: bool) -> None:
    """Save the full resolved config beside the run, once everything it names has loaded."""
    if is_main:
        with open(os.path.join(output_dir, name), 'w') as f:
            f.write(config_yaml)


def run(args: argparse.Namespace) -> int:
    create_logger(None, int(os.environ.get('RANK', '0')))
    cfg = load_config(args.cfg, flags_to_opts(args) + list(args.opts or []))
    ctx = init_distributed(cfg.DEVICE)
    cfg = scale_lr(cfg, ctx.world_size)
    output_dir = os.path.join(cfg.OUTPUT or 'output', cfg.MODEL.NAME, cfg.TAG)
    try:
        os.makedirs(output_dir, exist_ok=True)
        if not os.access(output_dir, os.W_OK):
            raise PermissionError(output_dir)
    except OSError as err:
        raise ConfigError(f'output folder {output_dir!r} cannot be created or written ({err}); choose another '
                          f'with --output') from None
    create_logger(output_dir, ctx.rank)
    train_mode = not (cfg.EVAL_MODE or cfg.THROUGHPUT_MODE)
    logger.info(f'rank {ctx.rank}/{ctx.world_size} on {ctx.device}; output {output_dir}')
    seed_everything(cfg.SEED + ctx.rank)
    if ctx.device.type == 'cuda':
        torch.backends.cudnn.benchmark = True

    data = build_loaders(cfg, ctx.rank, ctx.world_size, train=train_mode, pin_memory=ctx.device.type == 'cuda')
    resume = checkpoint_to_resume(cfg, output_dir, train_mode)
    # evaluation reads its checkpoint first: the head it holds decides the class count
    eval_ckpt = torch_load(resume) if (resume and not train_mode) else None
    num_classes = choose_num_classes(data.num_classes, eval_ckpt, resume, cfg.EVAL_EMA)
    if num_classes != cfg.MODEL.NUM_CLASSES:
        logger.warning(f'MODEL.NUM_CLASSES={cfg.MODEL.NUM_CLASSES}: using {num_classes} classes '
                       f'({"the checkpoint" if eval_ckpt is not None else "the dataset"}\'s count)')
        cfg.defrost()
        cfg.MODEL.NUM_CLASSES = num_classes
        cfg.freeze()
    mixup_fn = build_mixup(cfg, cfg.MODEL.NUM_CLASSES) if train_mode else None
    if (mixup_fn is not None) and (cfg.DATA.BATCH_SIZE % 2):
        raise ConfigError(f'DATA.BATCH_SIZE={cfg.DATA.BATCH_SIZE} is odd, but Mixup/CutMix pair up the samples of a '
                          f'batch: use an even batch size or set AUG.MIXUP 0.0 AUG.CUTMIX 0.0')
    config_yaml = config_to_yaml(cfg)

    try:
        model = build_model(cfg)
    except ValueError as err:
        raise ConfigError(f'cannot build MODEL.TYPE={cfg.MODEL.TYPE!r} from {args.cfg}: {err}') from None
    n_parameters = count_parameters(model)
    logger.info(f'{cfg.MODEL.NAME}: {n_parameters:,} parameters ({n_parameters / 1e6:.2f}M)')
    model.to(ctx.device)
    if cfg.MODEL.PRETRAINED and not resume:
        load_pretrained(model, cfg.MODEL.PRETRAINED)
    model_without_ddp = model
    ema = ModelEmaV3(model, decay=cfg.TRAIN.EMA.DECAY) if cfg.TRAIN.EMA.ENABLE else None
    if ctx.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == 'cuda' else None,
            broadcast_buffers=True, find_unused_parameters=cfg.TRAIN.FIND_UNUSED_PARAMS)
    autocast = make_autocast(cfg, ctx.device)
    eval_kwargs = dict(device=ctx.device, autocast=autocast, print_freq=cfg.PRINT_FREQ)

    if not train_mode:
        if resume:
            logger.info(f'loading {"EMA " if cfg.EVAL_EMA else ""}weights from {resume}')
            load_checkpoint(resume, model_without_ddp, ema=ema, weights='ema' if cfg.EVAL_EMA else 'model',
                            loaded=eval_ckpt)
        elif cfg.EVAL_EMA:
            raise ConfigError('--eval-ema needs a checkpoint: pass --resume FILE')
        elif not cfg.MODEL.PRETRAINED:
            logger.warning('no --resume or --pretrained checkpoint: evaluating randomly initialised weights')
        write_config(output_dir, 'config_eval.yaml', config_yaml, ctx.is_main)
        if cfg.THROUGHPUT_MODE:
            throughput(model_without_ddp, data.loader_val, device=ctx.device, autocast=autocast)
        else:
            stats = evaluate(model_without_ddp, data.loader_val, **eval_kwargs)
            logger.info(f'Accuracy of the network on the {stats["count"]} test images: {stats["acc1"]:.1f}%')
            if ema is not None:
                evaluate(ema.module, data.loader_val, name=' EMA', **eval_kwargs)
        return 0

    optimizer = build_optimizer(cfg, model_without_ddp)
    updates_per_epoch = len(data.loader_train) // cfg.TRAIN.ACCUMULATION_STEPS
    if updates_per_epoch == 0:
        raise ConfigError(f'TRAIN.ACCUMULATION_STEPS={cfg.TRAIN.ACCUMULATION_STEPS} exceeds the '
                          f'{len(data.loader_train)} batches of an epoch')
    lr_scheduler = build_scheduler(cfg, optimizer, updates_per_epoch)
    scaler = torch.amp.GradScaler(ctx.device.type) if (cfg.AMP and cfg.AMP_DTYPE == 'fp16') else None
    criterion = build_criterion(cfg, mixup_fn is not None)

    start_epoch, max_accuracy, max_accuracy_ema = cfg.TRAIN.START_EPOCH, 0.0, 0.0
    if resume:
        logger.info(f'resuming from {resume}')
        info = load_checkpoint(resume, model_without_ddp, optimizer, lr_scheduler, scaler, ema)
        start_epoch, max_accuracy, max_accuracy_ema = info['epoch'], info['max_accuracy'], info['max_accuracy_ema']

    write_config(output_dir, 'config.yaml', config_yaml, ctx.is_main)
    total_epochs = cfg.TRAIN.EPOCHS + cfg.TRAIN.COOLDOWN_EPOCHS
    if start_epoch >= total_epochs:
        logger.info(f'{resume} already completed all {total_epochs} epochs; evaluating it (raise TRAIN.EPOCHS to '
                    f'train longer, or pick another --tag / --output for a new run)')
        evaluate(model_without_ddp, data.loader_val, **eval_kwargs)
        return 0

    tb_writer = None
    if ctx.is_main:
        from torch.utils.tensorboard import SummaryWriter  # slow import, rank 0 only
        tb_writer = SummaryWriter(log_dir=os.path.join(output_dir, 'tensorboard'))
    logger.info(f'start training: epochs {start_epoch}..{total_epochs - 1}, {updates_per_epoch} updates per epoch')
    start_time = time.time()
    for epoch in range(start_epoch, total_epochs):
        data.loader_train.sampler.set_epoch(epoch)
        # worker seeds (hence augmentations) depend on (SEED, rank, epoch) only
        data.loader_train.generator.manual_seed((cfg.SEED + ctx.rank) * 1_000_003 + epoch)
        train_stats = train_one_epoch(
            model, criterion, data.loader_train, optimizer, lr_scheduler, epoch, device=ctx.device,
            total_epochs=total_epochs, accumulation_steps=cfg.TRAIN.ACCUMULATION_STEPS,
            clip_grad=cfg.TRAIN.CLIP_GRAD, mixup_fn=mixup_fn, autocast=autocast, scaler=scaler, ema=ema,
            print_freq=cfg.PRINT_FREQ, tb_writer=tb_writer)
        val_stats = evaluate(model_without_ddp, data.loader_val, **eval_kwargs)
        is_best = val_stats['acc1'] >= max_accuracy
        max_accuracy = max(max_accuracy, val_stats['acc1'])
        logger.info(f'Accuracy of the network on the {val_stats["count"]} test images: {val_stats["acc1"]:.1f}%; '
                    f'max accuracy: {max_accuracy:.2f}%')
        ema_stats, is_best_ema = None, False
        if ema is not None:
            ema_stats = evaluate(ema.module, data.loader_val, name=' EMA', **eval_kwargs)
            is_best_ema = ema_stats['acc1'] >= max_accuracy_ema
            max_accuracy_ema = max(max_accuracy_ema, ema_stats['acc1'])

        if ctx.is_main:
            save = functools.partial(
                save_checkpoint, model=model_without_ddp, epoch=epoch + 1, max_accuracy=max_accuracy,
                config_yaml=config_yaml, optimizer=optimizer, lr_scheduler=lr_scheduler, scaler=scaler, ema=ema,
                max_accuracy_ema=max_accuracy_ema)
            if (epoch % cfg.SAVE_FREQ == 0) or (epoch == total_epochs - 1):
                save(os.path.join(output_dir, f'ckpt_epoch_{epoch}.pth'))
                prune_checkpoints(output_dir, cfg.TRAIN.KEEP_CKPTS)
                logger.info(f'saved {output_dir}/ckpt_epoch_{epoch}.pth')
            if is_best:
                save(os.path.join(output_dir, 'max_acc.pth'))
            if is_best_ema:
                save(os.path.join(output_dir, 'max_ema_acc.pth'))
            record = {'epoch': epoch, **{f'train_{k}': v for k, v in train_stats.items()},
                      **{f'val_{k}': v for k, v in val_stats.items()}, 'max_accuracy': max_accuracy,
                      'n_parameters': n_parameters}
            if ema_stats is not None:
                record.update({f'ema_{k}': v for k, v in ema_stats.items()}, max_accuracy_ema=max_accuracy_ema)
            with open(os.path.join(output_dir, 'metrics.jsonl'), 'a') as f:
                f.write(json.dumps(record) + '\n')
            for key in ('loss', 'lr', 'grad_norm'):
                tb_writer.add_scalar(f'epoch/train_{key}', train_stats[key], epoch)
            for key in ('acc1', 'acc5', 'loss'):
                tb_writer.add_scalar(f'epoch/val_{key}', val_stats[key], epoch)
                if ema_stats is not None:
                    tb_writer.add_scalar(f'epoch/ema_{key}', ema_stats[key], epoch)
            tb_writer.flush()
    if tb_writer is not None:
        tb_writer.close()
    logger.info(f'training time {format_eta(time.time() - start_time)}; max accuracy {max_accuracy:.2f}%')
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except USER_ERRORS as err:
        logger.error(f'{type(err).__name__}: {err}')
        return 2
    finally:
        cleanup()


if __name__ == '__main__':
    sys.exit(main())
