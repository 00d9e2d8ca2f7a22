"""Train, evaluate or time a FLatten model.

    python main.py --cfg configs/demo/flatten_swin_fmnist.yaml
    torchrun --nproc_per_node=8 main.py --cfg configs/flatten_swin_t.yaml --data-path /imagenet
    python main.py --cfg configs/flatten_swin_t.yaml --data-path /imagenet --eval --resume ckpt.pth

The story: parse flags into a config → set up device / distributed → build data, model,
optimizer and schedule → load pretrained weights or resume → per epoch: train, evaluate, save.
A segmentation config (``TASK: segmentation``, configs/ade20k) runs the same story with its own data,
model, loss and metric (utils/seg_engine.py); its "epochs" are evaluation periods of an iteration
schedule (TRAIN.ITERS, TRAIN.EVAL_PERIOD). A detection config (``TASK: detection``, configs/coco) trains
a detector that computes its own losses (utils/engine.DetectorLoss) and is scored by COCO AP
(utils/det_eval.py).
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
from dataclasses import dataclass
from typing import Any, Callable, List, Optional, Sequence, Tuple

import torch
from timm.loss import LabelSmoothingCrossEntropy, SoftTargetCrossEntropy
from timm.utils import ModelEmaV3
from yacs.config import CfgNode as CN

from config import ConfigError, config_to_yaml, load_config, scale_lr
from data import DataBundle, DataError, DatasetNotFoundError, build_loaders, build_mixup
from logger import create_logger
from models import UnknownModelError, build_model
from models.attention import set_compiled_core
from models.build import describe
from utils.checkpoint import (
    CheckpointError,
    latest_valid_checkpoint,
    load_checkpoint,
    load_pretrained,
    model_state_dict,
    torch_load,
)
from utils.distributed import DeviceError, DistContext, cleanup, init_distributed
from utils.engine import (
    DetectorLoss,
    EpochLog,
    NonFiniteGuard,
    NonFiniteLossError,
    RunState,
    StepSettings,
    evaluate,
    format_eta,
    throughput,
    train_one_epoch,
)
from utils.lr_scheduler import build_scheduler
from utils.misc import count_parameters, seed_everything
from utils.optimizer import build_optimizer
from utils.preemption import EXIT_PREEMPTED, Preempted, StopSignal
from utils.run_folder import CheckpointTriggers, RunFolder, write_config
from utils.seg_engine import SegLoss, evaluate_segmentation, sync_batchnorm

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
    'compile_core': ('COMPILE_CORE', bool),
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
    parser.add_argument('--compile-core', action='store_true', default=None,
                        help='torch.compile only the focused-attention cores (and, in training, the DWC '
                             'weight gradients)')
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


def build_criterion(cfg, mixup_active: bool) -> Optional[torch.nn.Module]:
    """The loss of model outputs and targets; None for a detector (it computes its own: DetectorLoss)."""
    if cfg.TASK == 'detection':
        return None
    if cfg.TASK == 'segmentation':
        return SegLoss(cfg.SEG.AUX_WEIGHT)
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


@dataclass(frozen=True)
class StartPoint:
    """Where a run starts, resolved once before the model exists: the checkpoint whose state it
    restores (path and content, read once; both None for a fresh start) and the model's class count."""
    path: Optional[str]
    checkpoint: Any
    num_classes: int


def find_resume(cfg, output_dir: str, train_mode: bool) -> Tuple[Optional[str], Any]:
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


def checkpoint_classes(dataset_classes: int, ckpt: Any, path: Optional[str], ema_weights: bool) -> int:
    """The class count of an evaluated checkpoint's head, which must cover the dataset's labels (an
    ImageNet model evaluated on a folder of a few of its classes keeps its 1000 outputs); the
    dataset's when there is no checkpoint or it has no ``head.weight``."""
    if ckpt is None:
        return dataset_classes
    weights = ckpt.get('state_dict_ema') if (ema_weights and isinstance(ckpt, dict)) else None
    head = (weights or model_state_dict(ckpt, path)).get('head.weight')
    if head is None:
        return dataset_classes
    if head.shape[0] < dataset_classes:
        raise CheckpointError(f'{path!r} has a {head.shape[0]}-class head but the validation set has '
                              f'{dataset_classes} classes')
    return int(head.shape[0])


def resolve_start(cfg, output_dir: str, train_mode: bool, dataset_classes: int) -> StartPoint:
    """The checkpoint this run restores and its class count. Training uses the dataset's classes (a
    pretrained head of another size is replaced); evaluation the checkpoint head's."""
    path, ckpt = find_resume(cfg, output_dir, train_mode)
    if train_mode or cfg.TASK != 'classification':  # a dense model's classes are MODEL.NUM_CLASSES, the data's
        return StartPoint(path, ckpt, dataset_classes)
    num_classes = checkpoint_classes(dataset_classes, ckpt, path, cfg.EVAL_EMA)
    return StartPoint(path, ckpt, num_classes)


def build_model_for(cfg, source: str) -> torch.nn.Module:
    try:
        return build_model(cfg)
    except ValueError as err:  # geometry that does not fit (image size vs patches / windows / splits)
        raise ConfigError(f'cannot build MODEL.TYPE={cfg.MODEL.TYPE!r} from {source}: {err}') from None


def evaluate_only(job, model, ema) -> int:
    """--eval / --eval-ema / --throughput: load the weights to judge, then measure them; the figures
    also go to ``eval_metrics.json`` in the run folder (with a segmentation's confusion matrix)."""
    cfg, start = job.cfg, job.start
    if start.path:
        logger.info(f'loading {"EMA " if cfg.EVAL_EMA else ""}weights from {start.path}')
        load_checkpoint(start.path, model, ema=ema, weights='ema' if cfg.EVAL_EMA else 'model',
                        loaded=start.checkpoint)
    elif cfg.EVAL_EMA:
        raise ConfigError('--eval-ema needs a checkpoint: pass --resume FILE')
    elif not cfg.MODEL.PRETRAINED:
        logger.warning('no --resume or --pretrained checkpoint: evaluating randomly initialised weights')
    if cfg.THROUGHPUT_MODE:
        if cfg.TASK != 'classification':
            raise ConfigError(f'--throughput times classifiers on a batch of equal-size images; a {cfg.TASK} '
                              'config evaluates whole images of different sizes one by one: time it with '
                              'python -m bench.dense')
        throughput(model, job.data.loader_val, device=job.ctx.device, autocast=job.autocast,
                   memory_format=memory_format(cfg))
        return 0
    stats = job.evaluate(model)
    logger.info(job.summary(stats))
    record = {'weights': start.path or cfg.MODEL.PRETRAINED or 'random', 'val': stats}
    if ema is not None:
        record['ema'] = job.evaluate(ema.module, name=' EMA')
    if job.ctx.is_main:
        write_json(os.path.join(job.output_dir, 'eval_metrics.json'), record)
    return 0


def write_json(path: str, record: dict) -> None:
    """`record` as JSON (tensors as nested lists), replacing `path` only once it is complete."""
    def plain(value):
        return value.tolist() if isinstance(value, torch.Tensor) else str(value)
    with open(path + '.tmp', 'w') as f:
        json.dump(record, f, indent=1, default=plain)
    os.replace(path + '.tmp', path)


@dataclass
class Job:
    """What run() has set up, shared by evaluation and training."""
    cfg: CN
    ctx: DistContext
    data: DataBundle
    output_dir: str
    config_yaml: str
    autocast: Callable
    stop: StopSignal
    start: StartPoint

    def eval_kwargs(self) -> dict:
        return dict(device=self.ctx.device, autocast=self.autocast, print_freq=self.cfg.PRINT_FREQ,
                    memory_format=memory_format(self.cfg))

    @property
    def metric(self) -> str:
        """The validation figure that picks the best checkpoint: top-1 accuracy, mIoU or box AP."""
        return {'segmentation': 'mIoU', 'detection': 'bbox_AP'}.get(self.cfg.TASK, 'acc1')

    def evaluate(self, model, name: str = '') -> dict:
        """The task's evaluation of `model` over the whole validation set (exact under DDP)."""
        if self.cfg.TASK == 'classification':
            return evaluate(model, self.data.loader_val, name=name, **self.eval_kwargs())
        if self.cfg.TASK == 'detection':
            from utils.det_eval import evaluate_detection  # pycocotools: imported by detection runs only
            save = self.cfg.EVAL_MODE and self.cfg.DET.SAVE_RESULTS and not name
            return evaluate_detection(model, self.data.loader_val, gt=self.data.val_gt, name=name,
                                      device=self.ctx.device, autocast=self.autocast, print_freq=self.cfg.PRINT_FREQ,
                                      results_dir=self.output_dir if save else None)
        seg = self.cfg.SEG
        return evaluate_segmentation(
            model, self.data.loader_val, name=name, num_classes=self.cfg.MODEL.NUM_CLASSES, mode=seg.TEST_MODE,
            crop=tuple(seg.CROP_SIZE), stride=tuple(seg.TEST_STRIDE), flip=seg.TEST_FLIP,
            class_names=self.data.class_names, **self.eval_kwargs())

    def summary(self, stats: dict, best: Optional[float] = None) -> str:
        if self.cfg.TASK == 'detection':
            masks = f', mask AP {stats["segm_AP"]:.1f}' if 'segm_AP' in stats else ''
            text = f'box AP of the network on the {stats["count"]} val images: {stats["bbox_AP"]:.1f}{masks}'
            return text + (f'; best box AP: {best:.1f}' if best is not None else '')
        if self.cfg.TASK == 'segmentation':
            text = f'mIoU of the network on the {stats["count"]} val images: {stats["mIoU"]:.2f}%'
            return text + (f'; best mIoU: {best:.2f}%' if best is not None else '')
        text = f'Accuracy of the network on the {stats["count"]} test images: {stats["acc1"]:.1f}%'
        return text + (f'; max accuracy: {best:.2f}%' if best is not None else '')


def build_run_state(job: Job, model, model_without_ddp, ema) -> RunState:
    """Optimizer, schedule and scaler for `model`, with the state of the run's start point restored into them."""
    cfg = job.cfg
    accumulation = cfg.TRAIN.ACCUMULATION_STEPS
    updates_per_epoch = len(job.data.loader_train) // accumulation
    if updates_per_epoch == 0:
        raise ConfigError(f'TRAIN.ACCUMULATION_STEPS={accumulation} exceeds the {len(job.data.loader_train)} batches '
                          f'of an epoch')
    optimizer = build_optimizer(cfg, model_without_ddp)
    state = RunState(
        model=model_without_ddp, train_model=model, optimizer=optimizer,
        lr_scheduler=build_scheduler(cfg, optimizer, updates_per_epoch), updates_per_epoch=updates_per_epoch,
        total_epochs=(cfg.TRAIN.ITERS // cfg.TRAIN.EVAL_PERIOD) if cfg.TRAIN.ITERS
        else cfg.TRAIN.EPOCHS + cfg.TRAIN.COOLDOWN_EPOCHS, accumulation_steps=accumulation,
        scaler=torch.amp.GradScaler(job.ctx.device.type) if (cfg.AMP and cfg.AMP_DTYPE == 'fp16') else None,
        ema=ema, epoch=cfg.TRAIN.START_EPOCH, iteration_schedule=bool(cfg.TRAIN.ITERS))
    start = job.start
    if start.path:
        logger.info(f'resuming from {start.path}')
        restored = load_checkpoint(start.path, model_without_ddp, state.optimizer, state.lr_scheduler, state.scaler,
                                   ema, loaded=start.checkpoint)
        state.epoch, state.step = restored['epoch'], restored['step']
        state.max_accuracy, state.max_accuracy_ema = restored['max_accuracy'], restored['max_accuracy_ema']
    return state


def evaluate_epoch(job: Job, state: RunState) -> Tuple[dict, Optional[dict], bool, bool]:
    """Evaluate the model (and its EMA) after an epoch: (val stats, EMA stats, is best, EMA is best)."""
    metric = job.metric
    val_stats = job.evaluate(state.model)
    is_best = val_stats[metric] >= state.max_accuracy
    state.max_accuracy = max(state.max_accuracy, val_stats[metric])
    logger.info(job.summary(val_stats, state.max_accuracy))
    if state.ema is None:
        return val_stats, None, is_best, False
    ema_stats = job.evaluate(state.ema.module, name=' EMA')
    is_best_ema = ema_stats[metric] >= state.max_accuracy_ema
    state.max_accuracy_ema = max(state.max_accuracy_ema, ema_stats[metric])
    return val_stats, ema_stats, is_best, is_best_ema


def run_epoch(job: Job, state: RunState, settings: StepSettings, folder: RunFolder,
              triggers: CheckpointTriggers) -> None:
    """Train the rest of epoch ``state.epoch``, evaluate, record, save (or stop, when asked to)."""
    epoch = state.epoch
    # every sample's order and augmentation depend on (SEED, epoch, index) only
    job.data.dataset_train.set_epoch(epoch)
    job.data.loader_train.sampler.set_epoch(epoch)
    job.data.loader_train.sampler.skip(state.step * state.accumulation_steps * job.cfg.DATA.BATCH_SIZE)
    terms = settings.model_loss if isinstance(settings.model_loss, DetectorLoss) else None
    train_stats = train_one_epoch(
        state, job.data.loader_train, settings, log=EpochLog(state, job.cfg.PRINT_FREQ, folder.tb_writer, terms),
        guard=NonFiniteGuard(job.cfg.TRAIN.MAX_NONFINITE_STEPS), after_update=triggers.after_update)
    val_stats, ema_stats, is_best, is_best_ema = evaluate_epoch(job, state)
    folder.record_epoch(epoch, state, {'train': train_stats, 'val': val_stats, 'ema': ema_stats})
    state.epoch, state.step = epoch + 1, 0
    triggers.end_of_epoch(state, is_best, is_best_ema)


def train(job: Job, model, model_without_ddp, ema, mixup_fn) -> int:
    """Restore the run state, then per epoch: train, evaluate, save.

    After every update the ranks ask `job.stop` whether any of them received SIGTERM / SIGUSR1; if
    so they save a checkpoint at that update and raise Preempted (exit code 75).
    """
    cfg, ctx = job.cfg, job.ctx
    state = build_run_state(job, model, model_without_ddp, ema)
    write_config(job.output_dir, 'config.yaml', job.config_yaml, ctx.is_main)
    if state.epoch >= state.total_epochs:
        logger.info(f'{job.start.path} already completed all {state.total_epochs} epochs; evaluating it (raise '
                    f'TRAIN.EPOCHS to train longer, or pick another --tag / --output for a new run)')
        job.evaluate(model_without_ddp)
        return 0
    settings = StepSettings(criterion=build_criterion(cfg, mixup_fn is not None), device=ctx.device,
                            autocast=job.autocast, mixup_fn=mixup_fn, clip_grad=cfg.TRAIN.CLIP_GRAD,
                            memory_format=memory_format(cfg),
                            model_loss=DetectorLoss(ctx.device) if cfg.TASK == 'detection' else None)
    folder = RunFolder(job.output_dir, job.config_yaml, cfg.TRAIN.KEEP_CKPTS, ctx.is_main, state,
                       resuming=job.start.path is not None)
    triggers = CheckpointTriggers(folder, job.stop, ctx.device, cfg.TRAIN.CKPT_STEPS, cfg.SAVE_FREQ)
    logger.info(f'start training: epoch {state.epoch} update {state.step} of {state.total_epochs} epochs x '
                f'{state.updates_per_epoch} updates')
    start_time = time.time()
    try:
        triggers.stop_if_asked(state, [], 'before the first update')
        while state.epoch < state.total_epochs:
            run_epoch(job, state, settings, folder, triggers)
    finally:
        folder.close()
    best = {'segmentation': 'best mIoU', 'detection': 'best box AP'}.get(cfg.TASK, 'max accuracy')
    unit = '' if cfg.TASK == 'detection' else '%'
    logger.info(f'training time {format_eta(time.time() - start_time)}; {best} {state.max_accuracy:.2f}{unit}')
    return 0


def start(args: argparse.Namespace, stop: StopSignal) -> Tuple[CN, DistContext, str, bool]:
    """Flags → config; device and (optional) process group; run folder and logs. Returns the config,
    the process context, the run folder and whether this run trains."""
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
    return cfg, ctx, output_dir, train_mode


def load_data(cfg: CN, ctx: DistContext, output_dir: str, train_mode: bool):
    """The loaders, where the run starts (the checkpoint's head decides the classes of an evaluation)
    and Mixup. Returns (config with the class count, data, start point, mixup_fn)."""
    data = build_loaders(cfg, ctx.rank, ctx.world_size, train=train_mode, pin_memory=ctx.device.type == 'cuda')
    start = resolve_start(cfg, output_dir, train_mode, data.num_classes)
    if start.num_classes != cfg.MODEL.NUM_CLASSES:
        logger.warning(f'MODEL.NUM_CLASSES={cfg.MODEL.NUM_CLASSES}: using {start.num_classes} classes '
                       f'({"the dataset" if train_mode else "the checkpoint"}\'s count)')
        cfg = cfg.clone()
        cfg.defrost()
        cfg.MODEL.NUM_CLASSES = start.num_classes
        cfg.freeze()
    mixup_fn = build_mixup(cfg, cfg.MODEL.NUM_CLASSES) if (train_mode and cfg.TASK == 'classification') else None
    if (mixup_fn is not None) and (cfg.DATA.BATCH_SIZE % 2):
        raise ConfigError(f'DATA.BATCH_SIZE={cfg.DATA.BATCH_SIZE} is odd, but Mixup/CutMix pair up the samples of a '
                          f'batch: use an even batch size or set AUG.MIXUP 0.0 AUG.CUTMIX 0.0')
    return cfg, data, start, mixup_fn


def build_models(cfg: CN, ctx: DistContext, source: str, resuming: bool):
    """The model (with --pretrained weights when not resuming), its EMA and, under torchrun, its DDP
    wrapper. Returns (model to train, bare model, EMA or None)."""
    model = build_model_for(cfg, source)
    if cfg.TASK != 'classification' and ctx.world_size > 1:
        model = sync_batchnorm(model, ctx.device)  # the heads' BatchNorm sees the global batch, as mmseg's SyncBN
    n_parameters = count_parameters(model)
    what = describe(cfg)
    if cfg.TASK == 'segmentation':
        what = (f'{"UperNet" if cfg.SEG.DECODER == "upernet" else "Semantic FPN"} ({cfg.SEG.CHANNELS} channels'
                f'{f", auxiliary head on stage {cfg.SEG.AUX_STAGE}" if cfg.SEG.AUX_WEIGHT else ""}) on the '
                f'features of {what}')
    elif cfg.TASK == 'detection':
        detector = 'Mask R-CNN' if cfg.DET.DETECTOR == 'mask_rcnn' else \
            f'Cascade Mask R-CNN ({len(cfg.DET.CASCADE_IOUS)} stages)'
        what = f'{detector} with a {cfg.DET.FPN_CHANNELS}-channel FPN on the features of {what}'
    logger.info(f'{cfg.MODEL.NAME}: {what}, {n_parameters:,} parameters ({n_parameters / 1e6:.2f}M)')
    if cfg.COMPILE_CORE:
        logger.info(f'--compile-core: {set_compiled_core(model)} focused-attention modules compile their core '
                    'for training steps and evaluation')
    model.to(ctx.device)
    if cfg.MODEL.PRETRAINED and not resuming:
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
    return model, model_without_ddp, ema


def run(args: argparse.Namespace, stop: StopSignal) -> int:
    cfg, ctx, output_dir, train_mode = start(args, stop)
    cfg, data, start_point, mixup_fn = load_data(cfg, ctx, output_dir, train_mode)
    job = Job(cfg, ctx, data, output_dir, config_to_yaml(cfg), make_autocast(cfg, ctx.device), stop, start_point)
    model, model_without_ddp, ema = build_models(cfg, ctx, args.cfg, resuming=start_point.path is not None)
    if not train_mode:
        result = evaluate_only(job, model_without_ddp, ema)
        write_config(output_dir, 'config_eval.yaml', job.config_yaml, ctx.is_main)
        return result
    return train(job, model, model_without_ddp, ema, mixup_fn)


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
