"""Configuration: commented, frozen YACS defaults with the official FLatten key names.

Every key of the official code base is declared here with its official default and type, so
the authors' yaml files load unchanged (spec §3). Keys this project adds are marked *new*.
Keys the official code declares but never reads are kept, marked *unused*, so that yaml files
that mention them still load; they have no effect.

Use :func:`load_config` from Python and tests; ``main.py`` calls it with the command-line
flags already turned into ``KEY VALUE`` pairs (see ``FLAG_TO_KEY`` in ``main.py``).
"""
from __future__ import annotations

import difflib
import os
from typing import Iterable, Optional, Sequence

import yaml
from yacs.config import CfgNode as CN

__all__ = ['ConfigError', 'get_default_config', 'load_config', 'scale_lr', 'config_to_yaml']


class ConfigError(ValueError):
    """A bad config file, key or value. The message names the file and/or the key."""


_C = CN()

# Base config files, loaded first and then overridden by the file that lists them (paths are
# relative to that file).
_C.BASE = ['']

# -----------------------------------------------------------------------------
# Data settings
# -----------------------------------------------------------------------------
_C.DATA = CN()
# Batch size for a single GPU / process; the global batch is this times the world size.
_C.DATA.BATCH_SIZE = 128
# Path to dataset: an ImageFolder root with train/ and val/ (imagenet), or the folder holding the
# Fashion-MNIST IDX files (fashion_mnist; empty means /usr/share/datasets/fashion-mnist).
_C.DATA.DATA_PATH = ''
# Dataset name: 'imagenet' (any ImageFolder tree with train/ and val/), 'imagefolder' (same)
# or 'fashion_mnist' (the Debian IDX files, 10 classes).
_C.DATA.DATASET = 'imagenet'
# Input image size
_C.DATA.IMG_SIZE = 224
# Interpolation to resize image (random, bilinear, bicubic)
_C.DATA.INTERPOLATION = 'bicubic'
# Zip datasets of the official code base: not supported here, kept so official yaml files load.
_C.DATA.ZIP_MODE = False
# Cache mode of the zip datasets (unused without ZIP_MODE).
_C.DATA.CACHE_MODE = 'part'
# Pin CPU memory in DataLoader for more efficient (sometimes) transfer to GPU.
_C.DATA.PIN_MEMORY = True
# Number of data loading threads per process
_C.DATA.NUM_WORKERS = 8
# *new* Unreadable (corrupt or non-image) files: False stops with an error naming the file, True logs
# them and uses the next readable image instead
_C.DATA.SKIP_CORRUPT = False
# *new* Train on a fixed random subset of this many training images (drawn with SEED; 0 = all), for
# quick experiments and tests. Validation always uses the whole split.
_C.DATA.TRAIN_SUBSET = 0

# -----------------------------------------------------------------------------
# Model settings
# -----------------------------------------------------------------------------
_C.MODEL = CN()
# Model type: a family builder ('flatten_swin', 'swin', ...); see models.build.list_model_types().
_C.MODEL.TYPE = 'swin'
# Model name, used for the output folder <OUTPUT>/<NAME>/<TAG>
_C.MODEL.NAME = 'swin_tiny_patch4_window7_224'
# Checkpoint to initialise from, adapting resolution-dependent tensors (--pretrained)
_C.MODEL.PRETRAINED = ''
# Checkpoint to resume from (--resume)
_C.MODEL.RESUME = ''
# Number of classes; replaced by the dataset's class count when they differ (with a warning)
_C.MODEL.NUM_CLASSES = 1000
# Dropout rate
_C.MODEL.DROP_RATE = 0.0
# Drop path rate
_C.MODEL.DROP_PATH_RATE = 0.1
# Label Smoothing
_C.MODEL.LABEL_SMOOTHING = 0.1

# Swin Transformer parameters
_C.MODEL.SWIN = CN()
_C.MODEL.SWIN.PATCH_SIZE = 4
_C.MODEL.SWIN.IN_CHANS = 3
_C.MODEL.SWIN.EMBED_DIM = 96
_C.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]
_C.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]
# Window of the focused-linear (L) blocks; clamped to the stage resolution, so 56 means global
# attention at 224 and 96 at 384. For MODEL.TYPE 'swin' it is the window of every block.
_C.MODEL.SWIN.WINDOW_SIZE = 7
# *new* Window of the softmax (S) blocks of FLatten-Swin. 0 keeps the official rule: 7 when
# WINDOW_SIZE <= 56, else 12.
_C.MODEL.SWIN.SOFTMAX_WINDOW_SIZE = 0
_C.MODEL.SWIN.MLP_RATIO = 4.
_C.MODEL.SWIN.QKV_BIAS = True
_C.MODEL.SWIN.QK_SCALE = None
_C.MODEL.SWIN.APE = False
_C.MODEL.SWIN.PATCH_NORM = True
# *unused* leftovers of the official config, accepted and ignored.
_C.MODEL.SWIN.KA = None
_C.MODEL.SWIN.DIM_REDUCTION = None
_C.MODEL.SWIN.STAGES = None
_C.MODEL.SWIN.STAGES_NUM = None
_C.MODEL.SWIN.RPB = None
_C.MODEL.SWIN.PADDING_MODE = None
_C.MODEL.SWIN.SHARE_DWC_KERNEL = None
_C.MODEL.SWIN.SHARE_QKV = None
_C.MODEL.SWIN.LR_FACTOR = None
_C.MODEL.SWIN.DEPTHS_LR = None
_C.MODEL.SWIN.FUSION_TYPE = None
_C.MODEL.SWIN.STAGE_CFG = None
# *unused* sub-configs of the official config (any keys accepted, none read).
_C.MODEL.SWIN_HR = CN(new_allowed=True)
_C.MODEL.SWIN_LRVIT = CN(new_allowed=True)
_C.MODEL.PVD = CN(new_allowed=True)

# Focused linear attention parameters
_C.MODEL.LA = CN()
# Focusing power p of f_p (paper Eq. 6)
_C.MODEL.LA.FOCUSING_FACTOR = 3
# Kernel size of the depthwise rank-restoration conv (DWC)
_C.MODEL.LA.KERNEL_SIZE = 5
# One letter per stage: L focused linear, S softmax, M mixed (first k blocks L, rest S, where k
# is the integer suffix, e.g. 'LLMS2').
_C.MODEL.LA.ATTN_TYPE = 'LLLL'
# *new* The attention kind of the L blocks of Swin and DeiT (the ablation zoo, paper Tables 3-4):
# focused_linear (FLatten), vanilla_linear, focused_only, dwc_only, hydra, efficient, angular, relu_linear
_C.MODEL.LA.LINEAR_KIND = 'focused_linear'
# PVT: key/value spatial-reduction ratio of the L blocks, one digit per stage (an int, as official)
_C.MODEL.LA.PVT_LA_SR_RATIOS = 1111
# CSwin: stripe width of the L blocks per stage, dash-separated
_C.MODEL.LA.CSWIN_LA_SPLIT_SIZE = '56-28-14-7'
# *new* PVTv2 "linear" mode of the official code (no official config uses it): every attention block
# takes keys/values from a 7x7 average pool of the map, and the MLPs get a ReLU after fc1
_C.MODEL.LA.PVT_LINEAR = False

# *new* DeiT parameters (MODEL.TYPE 'deit' / 'flatten_deit')
_C.MODEL.DEIT = CN()
_C.MODEL.DEIT.PATCH_SIZE = 16
_C.MODEL.DEIT.IN_CHANS = 3
_C.MODEL.DEIT.EMBED_DIM = 192
_C.MODEL.DEIT.DEPTH = 12
_C.MODEL.DEIT.NUM_HEADS = 3
_C.MODEL.DEIT.MLP_RATIO = 4.0
_C.MODEL.DEIT.QKV_BIAS = True
# Classifier input: 'token' (class token, DeiT) or 'avg' (mean of the patch tokens). '' picks 'avg'
# when any block is focused linear attention (their DWC needs the tokens to be exactly the grid),
# else 'token'.
_C.MODEL.DEIT.GLOBAL_POOL = ''
# Learned absolute position embedding after the patch embedding (True/False). None adds it only to
# all-softmax models: focused linear blocks carry their own positional encoding and DWC.
_C.MODEL.DEIT.ABS_POS_EMBED = None

# -----------------------------------------------------------------------------
# Training settings
# -----------------------------------------------------------------------------
_C.TRAIN = CN()
_C.TRAIN.START_EPOCH = 0
# Length of the cosine schedule in epochs; training runs EPOCHS + COOLDOWN_EPOCHS epochs.
_C.TRAIN.EPOCHS = 300
_C.TRAIN.WARMUP_EPOCHS = 20
# Extra epochs at MIN_LR after the cosine
_C.TRAIN.COOLDOWN_EPOCHS = 0
_C.TRAIN.WEIGHT_DECAY = 0.05
# Learning rates for a global batch of 512; scaled linearly by BATCH_SIZE * world * ACCUMULATION_STEPS / 512
_C.TRAIN.BASE_LR = 5e-4
_C.TRAIN.WARMUP_LR = 5e-7
_C.TRAIN.MIN_LR = 5e-6
# Clip the global gradient 2-norm to this value; None or 0 disables clipping
_C.TRAIN.CLIP_GRAD = 5.0
# Auto resume from the newest checkpoint in the output folder
_C.TRAIN.AUTO_RESUME = True
# Gradient accumulation steps (*new* flag --accumulation-steps)
_C.TRAIN.ACCUMULATION_STEPS = 1
# Gradient checkpointing to save memory
_C.TRAIN.USE_CHECKPOINT = False
# *new* Keep the newest K epoch checkpoints (plus max_acc.pth / max_ema_acc.pth)
_C.TRAIN.KEEP_CKPTS = 3
# *new* DDP find_unused_parameters (--find-unused-params)
_C.TRAIN.FIND_UNUSED_PARAMS = False
# *new* Also save a checkpoint every this many optimizer updates inside an epoch (0 = only at epoch
# ends); a killed run then resumes mid-epoch, exactly where the file was written
_C.TRAIN.CKPT_STEPS = 0
# *new* Stop after this many consecutive updates with non-finite loss or gradients (each is skipped)
_C.TRAIN.MAX_NONFINITE_STEPS = 20

# LR scheduler
_C.TRAIN.LR_SCHEDULER = CN()
# cosine, linear or step
_C.TRAIN.LR_SCHEDULER.NAME = 'cosine'
# Epoch interval to decay LR, used in StepLRScheduler
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30
# LR decay rate, used in StepLRScheduler
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1

# Optimizer
_C.TRAIN.OPTIMIZER = CN()
# adamw or sgd
_C.TRAIN.OPTIMIZER.NAME = 'adamw'
_C.TRAIN.OPTIMIZER.EPS = 1e-8
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)
# SGD momentum
_C.TRAIN.OPTIMIZER.MOMENTUM = 0.9

# *new* Exponential moving average of the weights (timm ModelEmaV3), evaluated and saved separately
_C.TRAIN.EMA = CN()
_C.TRAIN.EMA.ENABLE = False
_C.TRAIN.EMA.DECAY = 0.9999

# -----------------------------------------------------------------------------
# Augmentation settings
# -----------------------------------------------------------------------------
_C.AUG = CN()
# Color jitter factor (timm ignores it when AUTO_AUGMENT is set)
_C.AUG.COLOR_JITTER = 0.4
# Use AutoAugment policy. "v0" or "original"; 'none' disables
_C.AUG.AUTO_AUGMENT = 'rand-m9-mstd0.5-inc1'
# Random erase prob
_C.AUG.REPROB = 0.25
# Random erase mode
_C.AUG.REMODE = 'pixel'
# Random erase count
_C.AUG.RECOUNT = 1
# Mixup alpha, mixup enabled if > 0
_C.AUG.MIXUP = 0.8
# Cutmix alpha, cutmix enabled if > 0
_C.AUG.CUTMIX = 1.0
# Cutmix min/max ratio, overrides alpha and enables cutmix if set
_C.AUG.CUTMIX_MINMAX = None
# Probability of performing mixup or cutmix when either/both is enabled
_C.AUG.MIXUP_PROB = 1.0
# Probability of switching to cutmix when both mixup and cutmix enabled
_C.AUG.MIXUP_SWITCH_PROB = 0.5
# How to apply mixup/cutmix params. Per "batch", "pair", or "elem"
_C.AUG.MIXUP_MODE = 'batch'
# *new* Scale and aspect-ratio ranges of RandomResizedCrop
_C.AUG.SCALE = (0.08, 1.0)
_C.AUG.RATIO = (3. / 4., 4. / 3.)
# *new* Horizontal flip probability
_C.AUG.HFLIP = 0.5

# -----------------------------------------------------------------------------
# Testing settings
# -----------------------------------------------------------------------------
_C.TEST = CN()
# Resize to (256/224·IMG)² and centre-crop IMG (True), or resize straight to IMG² (False)
_C.TEST.CROP = True

# -----------------------------------------------------------------------------
# Misc
# -----------------------------------------------------------------------------
# Mixed precision (--amp): autocast plus, for float16 only, a GradScaler
_C.AMP = False
# *new* Autocast dtype: 'fp16' (the official --amp) or 'bf16' (--amp-dtype)
_C.AMP_DTYPE = 'fp16'
# *new* Device: '' picks cuda when available, else cpu; or 'cpu', 'cuda', 'cuda:1' (--device)
_C.DEVICE = ''
# *new* torch.compile the model (--compile); the first iterations of each mode (train, eval) compile
_C.COMPILE = False
# *new* channels_last memory format for the model and its input images (--channels-last)
_C.CHANNELS_LAST = False
# Path to output folder, overwritten by command line argument
_C.OUTPUT = ''
# Tag of experiment, overwritten by command line argument
_C.TAG = 'default'
# Frequency to save checkpoint (epochs)
_C.SAVE_FREQ = 1
# Frequency to log info (iterations)
_C.PRINT_FREQ = 100
# Fixed random seed; the seed of rank r is SEED + r
_C.SEED = 0
# Perform evaluation only, overwritten by command line argument
_C.EVAL_MODE = False
# *new* Evaluate the checkpoint's EMA weights (state_dict_ema) instead of its model weights (--eval-ema)
_C.EVAL_EMA = False
# Test throughput only, overwritten by command line argument
_C.THROUGHPUT_MODE = False
# local rank for DistributedDataParallel, given by command line argument (torchrun sets LOCAL_RANK)
_C.LOCAL_RANK = 0
# *new* Minutes a collective may wait for the other ranks before the job fails (a dead rank then
# takes the job down instead of hanging it)
_C.DIST_TIMEOUT = 30


def get_default_config() -> CN:
    """A mutable copy of the defaults."""
    return _C.clone()


def _all_keys(node: CN, prefix: str = '') -> list[str]:
    keys = []
    for key, value in node.items():
        full = f'{prefix}{key}'
        keys.append(full)
        if isinstance(value, CN):
            keys.extend(_all_keys(value, full + '.'))
    return keys


def _close_keys(key: str, limit: int = 3) -> list[str]:
    """Known keys that the unknown `key` was probably meant to be: extensions first, then look-alikes."""
    keys = _all_keys(_C)
    extended = [k for k in keys if k.startswith(key)]
    similar = difflib.get_close_matches(key, keys, n=limit, cutoff=0.6)
    return list(dict.fromkeys(extended + similar))[:limit]


def _explain_yacs_error(err: Exception, where: str) -> ConfigError:
    """Turn yacs' KeyError/ValueError/AssertionError into a message that names the key."""
    text = str(err.args[0]) if err.args else str(err)
    if 'Non-existent' in text:
        key = text.split(':', 1)[1].strip()
        close = _close_keys(key)
        hint = f' Did you mean: {", ".join(close)}?' if close else ''
        return ConfigError(f'{where}: unknown config key {key!r}.{hint}')
    if 'Type mismatch' in text:
        key = text.rsplit('config key:', 1)[-1].strip()
        return ConfigError(f'{where}: wrong value type for {key!r}: {text}')
    return ConfigError(f'{where}: {text}')


def _quote_string_values(opts: list[str]) -> list[str]:
    """Keep ``--opts TAG 1`` a string: yacs literal-evaluates every value, which would make it an int."""
    out = list(opts)
    for i in range(0, len(out) - 1, 2):
        node, value = _C, None
        for part in out[i].split('.'):
            if not isinstance(node, CN) or part not in node:
                break
            node = value = node[part]
        else:
            if isinstance(value, str) and out[i + 1][:1] not in ('"', "'"):
                out[i + 1] = repr(out[i + 1])
    return out


def _merge_file(cfg: CN, path: str, seen: tuple[str, ...] = ()) -> None:
    """Merge `path` into `cfg`, its BASE files first (paths relative to the file)."""
    path = os.path.abspath(path)
    if path in seen:
        raise ConfigError(f'config {path}: BASE inheritance cycle: {" -> ".join(seen + (path,))}')
    if not os.path.isfile(path):
        raise ConfigError(f'config file not found: {path}')
    try:
        with open(path) as f:
            data = yaml.safe_load(f)
    except yaml.YAMLError as err:
        raise ConfigError(f'config {path} is not valid YAML: {err}') from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f'config {path} must be a YAML mapping of keys, got {type(data).__name__}')
    for base in data.get('BASE', ['']) or ['']:
        if base:
            _merge_file(cfg, os.path.join(os.path.dirname(path), base), seen + (path,))
    try:
        cfg.merge_from_other_cfg(CN(data))
    except (KeyError, ValueError, AssertionError) as err:
        raise _explain_yacs_error(err, f'config {path}') from None


def load_config(path: Optional[str] = None, opts: Optional[Sequence[str]] = None) -> CN:
    """Defaults ← yaml `path` (with its BASE chain) ← `opts` (``['KEY', 'VALUE', ...]``); frozen.

    Raises :class:`ConfigError` for a missing file, bad YAML, an unknown key (with close matches)
    or a value of the wrong type, always naming the file or key.
    """
    cfg = get_default_config()
    if path:
        _merge_file(cfg, path)
    if opts:
        opts = list(opts)
        if len(opts) % 2:
            raise ConfigError(f'--opts needs KEY VALUE pairs, got an odd number of items: {opts}')
        try:
            cfg.merge_from_list(_quote_string_values(opts))
        except (KeyError, ValueError, AssertionError) as err:
            raise _explain_yacs_error(err, '--opts') from None
    _validate(cfg)
    cfg.freeze()
    return cfg


def _validate(cfg: CN) -> None:
    """Checks that yacs' type system cannot express."""
    if cfg.AMP_DTYPE not in ('fp16', 'bf16'):
        raise ConfigError(f"AMP_DTYPE must be 'fp16' or 'bf16', got {cfg.AMP_DTYPE!r}")
    if cfg.TRAIN.ACCUMULATION_STEPS < 1:
        raise ConfigError(f'TRAIN.ACCUMULATION_STEPS must be >= 1, got {cfg.TRAIN.ACCUMULATION_STEPS}')
    if cfg.DATA.BATCH_SIZE < 1:
        raise ConfigError(f'DATA.BATCH_SIZE must be >= 1, got {cfg.DATA.BATCH_SIZE}')
    if cfg.SAVE_FREQ < 1:
        raise ConfigError(f'SAVE_FREQ must be >= 1, got {cfg.SAVE_FREQ}')
    if cfg.TRAIN.KEEP_CKPTS < 1:
        raise ConfigError(f'TRAIN.KEEP_CKPTS must be >= 1, got {cfg.TRAIN.KEEP_CKPTS}')
    if (cfg.TRAIN.CKPT_STEPS < 0) or (cfg.TRAIN.MAX_NONFINITE_STEPS < 1) or (cfg.DIST_TIMEOUT <= 0):
        raise ConfigError(f'TRAIN.CKPT_STEPS must be >= 0 (got {cfg.TRAIN.CKPT_STEPS}), TRAIN.MAX_NONFINITE_STEPS >= 1 '
                          f'(got {cfg.TRAIN.MAX_NONFINITE_STEPS}) and DIST_TIMEOUT > 0 (got {cfg.DIST_TIMEOUT})')


def scale_lr(cfg: CN, world_size: int) -> CN:
    """Linear LR scaling (spec §5.1): lr · BATCH_SIZE · world_size · ACCUMULATION_STEPS / 512.

    Returns a frozen copy; the run folder's config.yaml records the scaled values, as the
    official code does.
    """
    factor = cfg.DATA.BATCH_SIZE * world_size * cfg.TRAIN.ACCUMULATION_STEPS / 512.0
    cfg = cfg.clone()
    cfg.defrost()
    cfg.TRAIN.BASE_LR = cfg.TRAIN.BASE_LR * factor
    cfg.TRAIN.WARMUP_LR = cfg.TRAIN.WARMUP_LR * factor
    cfg.TRAIN.MIN_LR = cfg.TRAIN.MIN_LR * factor
    cfg.freeze()
    return cfg


def config_to_yaml(cfg: CN) -> str:
    """The full config as YAML text (what config.yaml and checkpoints store)."""
    return cfg.dump()


def config_from_yaml_text(text: str) -> CN:
    """Rebuild a frozen config from :func:`config_to_yaml` output, checked against the defaults."""
    cfg = get_default_config()
    try:
        cfg.merge_from_other_cfg(CN.load_cfg(text))
    except (KeyError, ValueError, AssertionError) as err:
        raise _explain_yacs_error(err, 'stored config') from None
    cfg.freeze()
    return cfg


def iter_keys(cfg: CN) -> Iterable[str]:
    """Every full key name of `cfg` (used for close-match suggestions and tests)."""
    return _all_keys(cfg)
