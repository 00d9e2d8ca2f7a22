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
from typing import List, Optional, Sequence, Tuple

import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3

from config import ConfigError, config_to_yaml, load_config, scale_lr
from data import DataError, DatasetNotFoundError, build_loaders, build_mixup
from logger import create_logger
from models import UnknownModelError, build_model
from utils.checkpoint import (
    CheckpointError,
    gather_rng_states,
    latest_valid_checkpoint,
    load_checkpoint,
    load_pretrained,
    model_state_dict,
    periodic_checkpoint_name,
    prune_checkpoints,
    remove_partial_writes,
    save_checkpoint,
    torch_load,
)
from utils.distributed import DeviceError, barrier, cleanup, init_distributed
from utils.engine import NonFiniteLossError, evaluate, format_eta, throughput, train_one_epoch
from utils.lr_scheduler import build_scheduler
from utils.misc import count_parameters, seed_everything
from utils.optimizer import build_optimizer
from utils.preemption import EXIT_PREEMPTED, Preempted, StopSignal

logger = logging.getLogger('flatten')

# Errors caused by what the user asked for: reported as one message, exit code 2.
USER_ERRORS = (ConfigError, DataError, DatasetNotFoundError, UnknownModelError, CheckpointError, DeviceError,
               NonFiniteLossError)

# flag -> (config key, value transform). Flags left at their default (None / False) set nothing.
FLAG_TO_KEY = {
    'batch_size': ('DATA.BATCH_SIZE', int),
    'data_path': ('DATA.DATA_PATH', str),
    'zip': ('DATA.ZIP_MODE', bool),
    'repeated_aug': ('DATA.REPEATED_AUG', bool),
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
    'compile': ('COMPILE', bool),
    'channels_last': ('CHANNELS_LAST', bool),
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
    parser.add_argument('--repeated-aug', action='store_true', default=None,
                        help='repeated augmentation (DeiT): each sampled image appears DATA.REPEATED_AUG_COUNT (3) '
                             'times per epoch')
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
    parser.add_argument('--compile', action='store_true', default=None,
                        help='torch.compile the model (checkpoints keep the plain parameter names)')
    parser.add_argument('--channels-last', action='store_true', default=None,
                        help='channels_last memory format for the model and the input images')
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


def memory_format(cfg) -> torch.memory_format:
    return torch.channels_last if cfg.CHANNELS_LAST else torch.contiguous_format


def prepare_output_dir(cfg) -> str:
    """``<OUTPUT>/<MODEL.NAME>/<TAG>``, created and checked writable before anything else runs."""
    output_dir = os.path.join(cfg.OUTPUT or 'output', cfg.MODEL.NAME, cfg.TAG)
    try:
        os.makedirs(output_dir, exist_ok=True)
        probe = os.path.join(output_dir, f'.write_test_{os.getpid()}')
        with open(probe, 'w'):
            pass
        os.remove(probe)
    except OSError as err:
        raise ConfigError(f'output folder {output_dir!r} cannot be created or written ({err.strerror or err}): '
                          f'choose another with --output, or fix its permissions') from None
    return output_dir


def checkpoint_to_resume(cfg, output_dir: str, train_mode: bool) -> Tuple[Optional[str], Optional[dict]]:
    """(path, content) of the checkpoint whose full state this run restores, or (None, None).

    Training: the most advanced readable ``ckpt_epoch_*`` of this run's folder (TRAIN.AUTO_RESUME;
    a corrupt newest file is skipped with a warning), else ``--resume``. The folder wins so that
    re-launching the same command after a crash continues this run instead of restarting from the
    ``--resume`` file (official behaviour, with a warning). Evaluation: ``--resume`` when given;
    with ``--pretrained`` nothing (the adapted weights are what is evaluated); else the folder's
    newest readable checkpoint.
    """
    explicit = cfg.MODEL.RESUME
    if (not train_mode) and (explicit or cfg.MODEL.PRETRAINED):
        return (explicit, torch_load(explicit)) if explicit else (None, None)
    latest = latest_valid_checkpoint(output_dir) if cfg.TRAIN.AUTO_RESUME else None
    if latest is not None:
        if explicit and os.path.abspath(explicit) != os.path.abspath(latest[0]):
            logger.warning(f'auto-resume: continuing this run from {latest[0]} instead of --resume {explicit}')
        return latest
    return (explicit, torch_load(explicit)) if explicit else (None, None)


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


def build_model_for(cfg, source: str) -> torch.nn.Module:
    try:
        return build_model(cfg)
    except ValueError as err:  # geometry that does not fit (image size vs patches / windows / splits)
        raise ConfigError(f'cannot build MODEL.TYPE={cfg.MODEL.TYPE!r} from {source}: {err}') from None


def evaluate_only(cfg, ctx, data, model, ema, resume: Optional[str], ckpt, autocast) -> int:
    """--eval / --eval-ema / --throughput: load the weights to judge, then measure them."""
    if resume:
        logger.info(f'loading {"EMA " if cfg.EVAL_EMA else ""}weights from {resume}')
        load_checkpoint(resume, model, ema=ema, weights='ema' if cfg.EVAL_EMA else 'model', loaded=ckpt)
    elif cfg.EVAL_EMA:
        raise ConfigError('--eval-ema needs a checkpoint: pass --resume FILE')
    elif not cfg.MODEL.PRETRAINED:
        logger.warning('no --resume or --pretrained checkpoint: evaluating randomly initialised weights')
    if cfg.THROUGHPUT_MODE:
        throughput(model, data.loader_val, device=ctx.device, autocast=autocast, memory_format=memory_format(cfg))
        return 0
    eval_kwargs = dict(device=ctx.device, autocast=autocast, print_freq=cfg.PRINT_FREQ,
                       memory_format=memory_format(cfg))
    stats = evaluate(model, data.loader_val, **eval_kwargs)
    logger.info(f'Accuracy of the network on the {stats["count"]} test images: {stats["acc1"]:.1f}%')
    if ema is not None:
        evaluate(ema.module, data.loader_val, name=' EMA', **eval_kwargs)
    return 0


def keep_aside(path: str) -> Optional[str]:
    """Rename an existing `path` to the first free ``path.1``, ``path.2``, …; returns the new name."""
    if not os.path.exists(path):
        return None
    index = 1
    while os.path.exists(f'{path}.{index}'):
        index += 1
    os.replace(path, f'{path}.{index}')
    return f'{path}.{index}'


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


def train(cfg, ctx, data, model, model_without_ddp, ema, mixup_fn, resume: Optional[str], ckpt, autocast,
          output_dir: str, config_yaml: str, stop: StopSignal) -> int:
    """Build optimizer and schedule, restore the run state, then per epoch: train, evaluate, save.

    After every update the ranks ask `stop` whether any of them received SIGTERM / SIGUSR1; if so
    they save a checkpoint at that update and raise Preempted (exit code 75).
    """
    accumulation = cfg.TRAIN.ACCUMULATION_STEPS
    optimizer = build_optimizer(cfg, model_without_ddp)
    updates_per_epoch = len(data.loader_train) // accumulation
    if updates_per_epoch == 0:
        raise ConfigError(f'TRAIN.ACCUMULATION_STEPS={accumulation} exceeds the {len(data.loader_train)} batches of '
                          f'an epoch')
    lr_scheduler = build_scheduler(cfg, optimizer, updates_per_epoch)
    scaler = torch.amp.GradScaler(ctx.device.type) if (cfg.AMP and cfg.AMP_DTYPE == 'fp16') else None
    criterion = build_criterion(cfg, mixup_fn is not None)

    state = {'epoch': cfg.TRAIN.START_EPOCH, 'step': 0, 'max_accuracy': 0.0, 'max_accuracy_ema': 0.0}
    if resume:
        logger.info(f'resuming from {resume}')
        state = load_checkpoint(resume, model_without_ddp, optimizer, lr_scheduler, scaler, ema, loaded=ckpt)
    write_config(output_dir, 'config.yaml', config_yaml, ctx.is_main)
    total_epochs = cfg.TRAIN.EPOCHS + cfg.TRAIN.COOLDOWN_EPOCHS
    eval_kwargs = dict(device=ctx.device, autocast=autocast, print_freq=cfg.PRINT_FREQ,
                       memory_format=memory_format(cfg))
    if state['epoch'] >= total_epochs:
        logger.info(f'{resume} already completed all {total_epochs} epochs; evaluating it (raise TRAIN.EPOCHS to '
                    f'train longer, or pick another --tag / --output for a new run)')
        evaluate(model_without_ddp, data.loader_val, **eval_kwargs)
        return 0

    batches_per_epoch = updates_per_epoch * accumulation
    if ctx.is_main:
        for name in remove_partial_writes(output_dir):
            logger.warning(f'removed {name}, the remains of a checkpoint write that was interrupted')
        prepare_metrics(output_dir, state['epoch'], resuming=resume is not None)
    tb_writer = None
    if ctx.is_main:
        from torch.utils.tensorboard import SummaryWriter  # slow import, rank 0 only
        # when resuming, purge_step drops the events a killed run logged after its last checkpoint
        purge = state['epoch'] * batches_per_epoch + state['step'] * accumulation if resume else None
        tb_writer = SummaryWriter(log_dir=os.path.join(output_dir, 'tensorboard'), purge_step=purge)

    def save(epoch_done: int, step: int, names: List[str]) -> None:
        """Every rank hands over its RNG states; rank 0 writes each file in `names`."""
        rng = gather_rng_states()
        if ctx.is_main:
            for name in names:
                save_checkpoint(os.path.join(output_dir, name), model=model_without_ddp, epoch=epoch_done, step=step,
                                max_accuracy=max_accuracy, config_yaml=config_yaml, optimizer=optimizer,
                                lr_scheduler=lr_scheduler, scaler=scaler, ema=ema, max_accuracy_ema=max_accuracy_ema,
                                rng=rng)
            prune_checkpoints(output_dir, cfg.TRAIN.KEEP_CKPTS)
            logger.info(f'saved {", ".join(names)} in {output_dir}')
        barrier()  # no rank may exit (and so have torchrun stop the others) while rank 0 writes

    def stop_here(epoch_done: int, step: int, names: List[str], where: str) -> None:
        """Save the stop checkpoint(s) and raise Preempted; every rank calls it at the same point."""
        if names:
            save(epoch_done, step, names)
        saved = f'saved {names[0]} in {output_dir}' if names else 'nothing new to save'
        raise Preempted(f'stopped by {stop.describe()} {where}; {saved}. Run the same command again to continue '
                        f'exactly from there')

    max_accuracy, max_accuracy_ema = state['max_accuracy'], state['max_accuracy_ema']
    start_epoch, start_update = state['epoch'], state['step']
    logger.info(f'start training: epoch {start_epoch} update {start_update} of {total_epochs} epochs x '
                f'{updates_per_epoch} updates')
    start_time = time.time()
    if stop.should_stop(ctx.device):
        stop_here(start_epoch, start_update, [], 'before the first update')
    try:
        for epoch in range(start_epoch, total_epochs):
            # every sample's order and augmentation depend on (SEED, epoch, index) only
            data.dataset_train.set_epoch(epoch)
            data.loader_train.sampler.set_epoch(epoch)
            first_update = start_update if epoch == start_epoch else 0
            data.loader_train.sampler.skip(first_update * accumulation * cfg.DATA.BATCH_SIZE)

            def save_mid_epoch(updates_done: int, epoch: int = epoch) -> None:
                if updates_done >= updates_per_epoch:
                    return  # the epoch end evaluates, saves and (when asked to) stops
                if stop.should_stop(ctx.device):
                    stop_here(epoch, updates_done, [periodic_checkpoint_name(epoch, updates_done)],
                              f'after update {updates_done} of {updates_per_epoch} of epoch {epoch}')
                if cfg.TRAIN.CKPT_STEPS and (updates_done % cfg.TRAIN.CKPT_STEPS == 0):
                    save(epoch, updates_done, [periodic_checkpoint_name(epoch, updates_done)])

            train_stats = train_one_epoch(
                model, criterion, data.loader_train, optimizer, lr_scheduler, epoch, device=ctx.device,
                total_epochs=total_epochs, updates_per_epoch=updates_per_epoch, start_update=first_update,
                accumulation_steps=accumulation, clip_grad=cfg.TRAIN.CLIP_GRAD, mixup_fn=mixup_fn, autocast=autocast,
                scaler=scaler, ema=ema, print_freq=cfg.PRINT_FREQ, tb_writer=tb_writer,
                max_nonfinite=cfg.TRAIN.MAX_NONFINITE_STEPS, after_update=save_mid_epoch,
                memory_format=memory_format(cfg))
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
                record = {'epoch': epoch, **{f'train_{k}': v for k, v in train_stats.items()},
                          **{f'val_{k}': v for k, v in val_stats.items()}, 'max_accuracy': max_accuracy}
                if ema_stats is not None:
                    record.update({f'ema_{k}': v for k, v in ema_stats.items()}, max_accuracy_ema=max_accuracy_ema)
                with open(os.path.join(output_dir, 'metrics.jsonl'), 'a') as f:
                    f.write(json.dumps(record) + '\n')
                step = (epoch + 1) * batches_per_epoch
                for key in ('loss', 'lr', 'grad_norm', 'skipped_updates'):
                    tb_writer.add_scalar(f'epoch/train_{key}', train_stats[key], step)
                for key in ('acc1', 'acc5', 'loss'):
                    tb_writer.add_scalar(f'epoch/val_{key}', val_stats[key], step)
                    if ema_stats is not None:
                        tb_writer.add_scalar(f'epoch/ema_{key}', ema_stats[key], step)
                tb_writer.flush()
            stopping = stop.should_stop(ctx.device)  # a signal during the evaluation stops here
            periodic = (epoch % cfg.SAVE_FREQ == 0) or (epoch == total_epochs - 1) or stopping
            names = [periodic_checkpoint_name(epoch)] if periodic else []
            names += ['max_acc.pth'] if is_best else []
            names += ['max_ema_acc.pth'] if is_best_ema else []
            if stopping and (epoch < total_epochs - 1):
                stop_here(epoch + 1, 0, names, f'at the end of epoch {epoch}')
            if names:
                save(epoch + 1, 0, names)
    finally:
        if tb_writer is not None:
            tb_writer.close()
    logger.info(f'training time {format_eta(time.time() - start_time)}; max accuracy {max_accuracy:.2f}%')
    return 0


def run(args: argparse.Namespace, stop: StopSignal) -> int:
    # 1. flags → config; device and (optional) process group; run folder and logs
    create_logger(None, int(os.environ.get('RANK', '0')))
    cfg = load_config(args.cfg, flags_to_opts(args) + list(args.opts or []))
    ctx = init_distributed(cfg.DEVICE, timeout_minutes=cfg.DIST_TIMEOUT)
    cfg = scale_lr(cfg, ctx.world_size)
    output_dir = prepare_output_dir(cfg)
    create_logger(output_dir, ctx.rank)
    train_mode = not (cfg.EVAL_MODE or cfg.THROUGHPUT_MODE)
    if train_mode:
        stop.install()  # from here on SIGTERM / SIGUSR1 stop the run with a checkpoint
    logger.info(f'rank {ctx.rank}/{ctx.world_size} (pid {os.getpid()}) on {ctx.device}; output {output_dir}')
    seed_everything(cfg.SEED + ctx.rank)
    if ctx.device.type == 'cuda':
        torch.backends.cudnn.benchmark = True

    # 2. data, and the checkpoint this run starts from (its head decides the classes of an evaluation)
    data = build_loaders(cfg, ctx.rank, ctx.world_size, train=train_mode, pin_memory=ctx.device.type == 'cuda')
    resume, ckpt = checkpoint_to_resume(cfg, output_dir, train_mode)
    num_classes = choose_num_classes(data.num_classes, None if train_mode else ckpt, resume, cfg.EVAL_EMA)
    if num_classes != cfg.MODEL.NUM_CLASSES:
        logger.warning(f'MODEL.NUM_CLASSES={cfg.MODEL.NUM_CLASSES}: using {num_classes} classes '
                       f'({"the dataset" if train_mode else "the checkpoint"}\'s count)')
        cfg.defrost()
        cfg.MODEL.NUM_CLASSES = num_classes
        cfg.freeze()
    mixup_fn = build_mixup(cfg, cfg.MODEL.NUM_CLASSES) if train_mode else None
    if (mixup_fn is not None) and (cfg.DATA.BATCH_SIZE % 2):
        raise ConfigError(f'DATA.BATCH_SIZE={cfg.DATA.BATCH_SIZE} is odd, but Mixup/CutMix pair up the samples of a '
                          f'batch: use an even batch size or set AUG.MIXUP 0.0 AUG.CUTMIX 0.0')
    config_yaml = config_to_yaml(cfg)

    # 3. model: pretrained weights (when not resuming), EMA, DDP
    model = build_model_for(cfg, args.cfg)
    n_parameters = count_parameters(model)
    logger.info(f'{cfg.MODEL.NAME}: {n_parameters:,} parameters ({n_parameters / 1e6:.2f}M)')
    model.to(ctx.device)
    if cfg.MODEL.PRETRAINED and not resume:
        load_pretrained(model, cfg.MODEL.PRETRAINED)
    if cfg.CHANNELS_LAST:
        model.to(memory_format=torch.channels_last)
    model_without_ddp = model
    ema = ModelEmaV3(model, decay=cfg.TRAIN.EMA.DECAY) if cfg.TRAIN.EMA.ENABLE else None
    if cfg.COMPILE:
        # in place: the module (and so every state_dict) keeps its parameter names; the EMA copy stays eager
        model.compile()
    if ctx.world_size > 1:
        model = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[ctx.device.index] if ctx.device.type == 'cuda' else None,
            broadcast_buffers=True,
            # PVT v1 keeps a final norm it never applies (official layout): DDP must know, flag or not
            find_unused_parameters=cfg.TRAIN.FIND_UNUSED_PARAMS or bool(model.unused_parameters()))
    autocast = make_autocast(cfg, ctx.device)

    # 4. evaluate, or train
    if not train_mode:
        result = evaluate_only(cfg, ctx, data, model_without_ddp, ema, resume, ckpt, autocast)
        write_config(output_dir, 'config_eval.yaml', config_yaml, ctx.is_main)
        return result
    return train(cfg, ctx, data, model, model_without_ddp, ema, mixup_fn, resume, ckpt, autocast, output_dir,
                 config_yaml, stop)


def error_message(err: BaseException) -> str:
    """One paragraph: errors raised in DataLoader workers arrive wrapped with the worker's traceback
    text; keep only the original message (its last line)."""
    text = str(err)
    if 'Original Traceback' in text:
        last = text.strip().splitlines()[-1]
        text = last.split(': ', 1)[1] if ': ' in last else last
    return f'{type(err).__name__}: {text}'


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    stop = StopSignal()
    try:
        return run(args, stop)
    except USER_ERRORS as err:
        logger.error(error_message(err))
        return 2
    except Preempted as err:
        logger.warning(f'{err} (exit code {EXIT_PREEMPTED})')
        return EXIT_PREEMPTED
    finally:
        stop.restore()
        cleanup()


if __name__ == '__main__':
    sys.exit(main())
