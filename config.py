"""Configuration: commented, frozen YACS defaults with the official FLatten key names.

Every key of the official code base is declared here with its official default and type, so
the authors' yaml files load unchanged (docs/training.md, "Official configuration files"). Keys
this project adds are marked *new*. Keys the official code declares but never reads are kept,
marked *unused*, so that yaml files that mention them still load; they have no effect. Every
numeric key has a valid range in :data:`RANGES` (or a reason for having none in :data:`NO_RANGE`),
rendered in ``docs/config.md``.

Use :func:`load_config` from Python and tests; ``main.py`` calls it with the command-line
flags already turned into ``KEY VALUE`` pairs (see ``FLAG_TO_KEY`` in ``main.py``).
"""
from __future__ import annotations

import difflib
import itertools
import math
import os
import re
from dataclasses import dataclass, field
from typing import Dict, Iterable, List, Optional, Sequence

import yaml
from yacs.config import CfgNode as CN

__all__ = ['ConfigError', 'Range', 'RANGES', 'NO_RANGE', 'get_default_config', 'load_config', 'scale_lr',
           'config_to_yaml', 'ranges_markdown']


class ConfigError(ValueError):
    """A bad config file, key or value. The message names the file and/or the key."""


_NUMBER = r'[-+]?[0-9.]+(?:e[-+]?[0-9]+)?'
_INTERVAL = re.compile(rf'^([\[(])\s*(-inf|{_NUMBER})\s*,\s*(inf|{_NUMBER})\s*([\])])$')


@dataclass(frozen=True)
class Range:
    """The valid values of one numeric key, checked by :func:`load_config`.

    `interval` is written in the usual notation: ``'[0, 1)'`` includes 0 and excludes 1; ``inf``
    stands for "no bound" and is always excluded, so inf and nan are never valid. `form` says what
    the interval applies to: the value itself (``'value'``), every item of a non-empty list
    (``'list'``), both items of a pair (``'pair'``, with `order` ``'<='`` or ``'<'`` between the
    first and the second, or ``''`` when they are independent), or every decimal digit of a positive
    integer (``'digits'``). `integer` refuses non-integers (bools are never numbers here), `odd`
    even numbers, and `none_ok` allows None as well (the key's "off" or "automatic" value). `why`
    says what the key means and where the bounds come from; it is part of the error message.
    `bounds` is the parsed interval: (low, low included, high, high included).
    """
    interval: str
    why: str
    integer: bool = False
    odd: bool = False
    form: str = 'value'
    order: str = ''
    none_ok: bool = False
    bounds: tuple = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # a malformed table entry fails at import, not when some user's value happens to reach it
        match = _INTERVAL.match(self.interval)
        if match is None:
            raise ValueError(f'Range interval {self.interval!r} is not of the form [lo, hi), (lo, hi], ...')
        lo, hi = float(match.group(2)), float(match.group(3))
        if (match.group(2) == '-inf' and match.group(1) == '[') or (match.group(3) == 'inf' and match.group(4) == ']'):
            raise ValueError(f'Range interval {self.interval!r}: an infinite bound is never included')
        if self.integer and ((match.group(1) == '(' and lo != -math.inf) or (match.group(4) == ')' and hi != math.inf)):
            raise ValueError(f'Range interval {self.interval!r}: write integer bounds as included ones')
        if (self.form not in ('value', 'list', 'pair', 'digits')) or (self.order not in ('', '<=', '<')):
            raise ValueError(f'Range form {self.form!r} / order {self.order!r} is not known')
        object.__setattr__(self, 'bounds', (lo, match.group(1) == '[', hi, match.group(4) == ']'))

    def _in_interval(self, number) -> bool:
        lo, lo_closed, hi, hi_closed = self.bounds
        if isinstance(number, float) and not math.isfinite(number):
            return False
        above = (number >= lo) if lo_closed else (number > lo)
        below = (number <= hi) if hi_closed else (number < hi)
        return above and below

    def _item_ok(self, item) -> bool:
        if isinstance(item, bool) or not isinstance(item, (int, float)):
            return False
        if self.integer and not isinstance(item, int):
            return False
        if self.odd and (item % 2 == 0):
            return False
        return self._in_interval(item)

    def accepts(self, value) -> bool:
        """Whether `value` (as yacs parsed it) is valid for this key."""
        if value is None:
            return self.none_ok
        if self.form == 'value':
            return self._item_ok(value)
        if self.form == 'digits':
            return (isinstance(value, int) and not isinstance(value, bool) and value > 0
                    and all(self._in_interval(int(digit)) for digit in str(value)))
        if not isinstance(value, (list, tuple)):
            return False
        if self.form == 'list':
            return (len(value) >= 1) and all(self._item_ok(item) for item in value)
        if (len(value) != 2) or not all(self._item_ok(item) for item in value):
            return False
        if self.order == '<=':
            return value[0] <= value[1]
        if self.order == '<':
            return value[0] < value[1]
        return True

    def describe(self) -> str:
        """The range in words, e.g. 'an integer >= 1', 'a number in [0, 1)', 'None or a number > 0'."""
        lo, lo_closed, hi, hi_closed = self.bounds
        low_text, high_text = self.interval[1:-1].split(',')
        if hi == math.inf and lo == -math.inf:
            bound = ''
        elif hi == math.inf:
            bound = f' {">=" if lo_closed else ">"} {low_text.strip()}'
        elif lo == -math.inf:
            bound = f' {"<=" if hi_closed else "<"} {high_text.strip()}'
        else:
            bound = f' in {self.interval}'
        noun = 'odd integer' if self.odd else ('integer' if self.integer else 'number')
        if self.form == 'value':
            text = f'{"an" if noun[0] in "aeiou" else "a"} {noun}{bound}'
        elif self.form == 'list':
            text = f'a non-empty list of {noun}s{bound}'
        elif self.form == 'pair':
            names = '(min, max)' if self.order else '(first, second)'
            text = f'a pair {names} of {noun}s{bound}' + (f' with min {self.order} max' if self.order else '')
        else:
            text = f'a positive integer whose decimal digits are each{bound}'
        return f'None or {text}' if self.none_ok else text


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
# quick experiments and tests
_C.DATA.TRAIN_SUBSET = 0
# *new* Validate on a fixed random subset of this many validation images (drawn with SEED; 0 = all):
# the same images every epoch, on every rank count, and logged as such. Accuracy figures to compare
# with a paper need the whole split (0)
_C.DATA.VAL_SUBSET = 0
# *new* Repeated augmentation (DeiT's recipe, --repeated-aug): each image drawn in an epoch appears
# REPEATED_AUG_COUNT = k times, on different ranks (when the world size W >= k), each augmented
# differently. The epoch keeps its length: every rank takes g*floor(N/(W*g)) samples, g = k/gcd(k, W),
# so an epoch covers about 1/k of the N training images (data/samplers.py, ResumableRepeatAugSampler)
_C.DATA.REPEATED_AUG = False
_C.DATA.REPEATED_AUG_COUNT = 3

# -----------------------------------------------------------------------------
# *new* Semantic segmentation (TASK 'segmentation', configs/ade20k; docs/segmentation.md)
# -----------------------------------------------------------------------------
# What main.py trains and evaluates: 'classification' (ImageNet-style folders, Fashion-MNIST) or
# 'segmentation' (ADE20K-layout folders, DATA.DATASET 'ade20k')
_C.TASK = 'classification'
_C.SEG = CN()
# Decoder: 'upernet' (PPM + FPN fusion, Xiao et al. 2018) or 'fpn' (Semantic FPN, Kirillov et al. 2019)
_C.SEG.DECODER = 'upernet'
# Decoder width: UperNet's PPM/FPN channels (512), or the Semantic FPN head's (128)
_C.SEG.CHANNELS = 512
# Semantic FPN: channels of the FPN neck
_C.SEG.FPN_CHANNELS = 256
# UperNet: output sides of the pyramid pooling module
_C.SEG.POOL_SCALES = [1, 2, 3, 6]
# Dropout before the classifier of the decoder and of the auxiliary head
_C.SEG.DROPOUT = 0.1
# Auxiliary FCN head on backbone stage AUX_STAGE (0-based; 2 = the third), used in training only:
# its loss counts AUX_WEIGHT times; 0 builds no auxiliary head
_C.SEG.AUX_WEIGHT = 0.4
_C.SEG.AUX_CHANNELS = 256
_C.SEG.AUX_STAGE = 2
# Training images are resized to SEG.SCALE (long side, short side) times a ratio drawn from
# RATIO_RANGE, keeping their aspect ratio, then cropped to CROP_SIZE (H, W) with at most
# CAT_MAX_RATIO of the labelled pixels in one class (1 = no limit)
_C.SEG.SCALE = [2048, 512]
_C.SEG.RATIO_RANGE = [0.5, 2.0]
_C.SEG.CROP_SIZE = [512, 512]
_C.SEG.CAT_MAX_RATIO = 0.75
# Inference: 'whole' (the image rescaled to SEG.SCALE in one pass) or 'slide' (CROP_SIZE windows
# every TEST_STRIDE (H, W) pixels, overlaps averaged)
_C.SEG.TEST_MODE = 'whole'
_C.SEG.TEST_STRIDE = [341, 341]
# Ratios of SEG.SCALE to evaluate at, and whether to add each one's horizontal flip; the class
# scores of all passes are averaged ([0.5, 0.75, 1.0, 1.25, 1.5, 1.75] + flip = multi-scale testing)
_C.SEG.TEST_SCALES = [1.0]
_C.SEG.TEST_FLIP = False

# -----------------------------------------------------------------------------
# *new* Detection and instance segmentation (TASK 'detection', configs/coco; docs/detection.md)
# -----------------------------------------------------------------------------
_C.DET = CN()
# 'mask_rcnn' (torchvision's Mask R-CNN) or 'cascade_mask_rcnn' (three box stages at CASCADE_IOUS, a mask
# head per stage, as mmdet's Cascade Mask R-CNN in the Swin detection recipe; models/detection.py)
_C.DET.DETECTOR = 'mask_rcnn'
# FPN width; box head fc width (Mask R-CNN's two fcs, the cascade's one); mask head conv width
_C.DET.FPN_CHANNELS = 256
_C.DET.BOX_FC_DIM = 1024
_C.DET.MASK_CHANNELS = 256
# Sampled anchors (RPN) and RoIs (box head) per training image; RPN proposals kept per image
_C.DET.RPN_BATCH_PER_IMAGE = 256
_C.DET.BOX_BATCH_PER_IMAGE = 512
_C.DET.RPN_PRE_NMS_TRAIN = 2000
_C.DET.RPN_POST_NMS_TRAIN = 1000
_C.DET.RPN_PRE_NMS_TEST = 1000
_C.DET.RPN_POST_NMS_TEST = 1000
# Test-time detections: score threshold, boxes kept per image
_C.DET.SCORE_THRESH = 0.05
_C.DET.DETECTIONS_PER_IMAGE = 100
# Cascade: IoU threshold of each stage's positives, and each stage's loss weight
_C.DET.CASCADE_IOUS = [0.5, 0.6, 0.7]
_C.DET.CASCADE_WEIGHTS = [1.0, 0.5, 0.25]
# Training sizes, (long side, short side) limits of a keep-ratio resize: one of TRAIN_SCALES is drawn per
# image ([[1333, 800]]: the 1x recipe; [[1333, 480], ..., [1333, 800]]: 3x multi-scale). With probability
# CROP_PROB (Swin's 3x recipe: 0.5) the image is instead resized to one of CROP_SCALES, cropped to a random
# (h, w) with each side in CROP_SIZE (absolute range), then resized to one of TRAIN_SCALES
_C.DET.TRAIN_SCALES = [[1333, 800]]
_C.DET.CROP_PROB = 0.0
_C.DET.CROP_SCALES = [[1333, 400], [1333, 500], [1333, 600]]
_C.DET.CROP_SIZE = [384, 600]
# Evaluation size (long side, short side) limits; predictions are mapped back to the original image
_C.DET.TEST_SCALE = [1333, 800]
# --eval also writes the detections as COCO results files (<run folder>/detections_{bbox,segm}.json)
_C.DET.SAVE_RESULTS = False

# -----------------------------------------------------------------------------
# Model settings
# -----------------------------------------------------------------------------
_C.MODEL = CN()
# Model type ('flatten_swin', 'swin', ...): a row of models.build.MODEL_TYPES, which maps it to a registered
# variant plus the constructor arguments read from this config (models.build.describe(cfg) prints them)
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
# *new* At input sizes other than DATA.IMG_SIZE, L blocks that are global at DATA.IMG_SIZE stay global
# (False, the default) or keep their window of the build size, the map padded to whole windows (True:
# windowed focused attention for very large inputs). No effect at DATA.IMG_SIZE.
_C.MODEL.SWIN.FIXED_WINDOW = False
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
# *new* The attention kind of the L blocks of every backbone (the ablation zoo, paper Tables 3-4):
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
# *new* Iteration-based schedule (segmentation): ITERS optimizer updates in all, with evaluation and a
# checkpoint every EVAL_PERIOD updates (an iteration schedule's "epoch"); WARMUP_ITERS of linear
# warm-up from WARMUP_LR. ITERS 0 keeps the epoch schedule (EPOCHS, WARMUP_EPOCHS)
_C.TRAIN.ITERS = 0
_C.TRAIN.WARMUP_ITERS = 0
_C.TRAIN.EVAL_PERIOD = 16000

# LR scheduler
_C.TRAIN.LR_SCHEDULER = CN()
# cosine, linear, step or poly (*new*: (1 - t/T)^POWER from BASE_LR to MIN_LR, as mmseg's)
_C.TRAIN.LR_SCHEDULER.NAME = 'cosine'
# *new* Power of the poly schedule
_C.TRAIN.LR_SCHEDULER.POWER = 1.0
# Epoch interval to decay LR, used in StepLRScheduler
_C.TRAIN.LR_SCHEDULER.DECAY_EPOCHS = 30
# LR decay rate, used in StepLRScheduler
_C.TRAIN.LR_SCHEDULER.DECAY_RATE = 0.1
# *new* 'multistep': the LR is multiplied by DECAY_RATE at each of these epochs (mmdet's 1x: [8, 11])
_C.TRAIN.LR_SCHEDULER.MILESTONES = [8, 11]

# Optimizer
_C.TRAIN.OPTIMIZER = CN()
# adamw or sgd
_C.TRAIN.OPTIMIZER.NAME = 'adamw'
_C.TRAIN.OPTIMIZER.EPS = 1e-8
_C.TRAIN.OPTIMIZER.BETAS = (0.9, 0.999)
# *new* how the update runs: 'fused' (torch's one-kernel AdamW/SGD), 'foreach' or 'loop' (docs/training.md)
_C.TRAIN.OPTIMIZER.IMPL = 'fused'
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
# *new* torch.compile only the focused cores (and, in training, their DWC weight gradients)
# (--compile-core): each FLatten stage compiles once per batch shape for training and once for
# evaluation (about 5-30 s each on CPU; models/attention/core.py)
_C.COMPILE_CORE = False
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

# -----------------------------------------------------------------------------
# Valid ranges: every numeric key above has one here (or an entry in NO_RANGE), checked by
# load_config before anything runs. How sizes fit together (image size vs patches, windows,
# stripes; heads vs width; one entry per stage) is checked when the model is built.
# -----------------------------------------------------------------------------
RANGES: Dict[str, Range] = {
    # data
    'DATA.BATCH_SIZE': Range('[1, inf)', 'images per process and step', integer=True),
    'DATA.IMG_SIZE': Range('[1, inf)', 'side of the square input in pixels, the size the model is built for; it '
                                       'must be at least the model\'s total stride, checked when the model is built',
                           integer=True),
    'DATA.NUM_WORKERS': Range('[0, inf)', 'loader processes per process; 0 loads in the main process', integer=True),
    'DATA.TRAIN_SUBSET': Range('[0, inf)', 'training images to keep, 0 = all; more than the split holds is refused '
                                           'when it is loaded', integer=True),
    'DATA.VAL_SUBSET': Range('[0, inf)', 'validation images to keep, 0 = all; more than the split holds is refused '
                                         'when it is loaded', integer=True),
    'DATA.REPEATED_AUG_COUNT': Range('[1, inf)', 'copies of each sampled image per epoch; 1 = no repetition',
                                     integer=True),
    # segmentation
    'SEG.CHANNELS': Range('[1, inf)', 'decoder width', integer=True),
    'SEG.FPN_CHANNELS': Range('[1, inf)', 'Semantic FPN neck width', integer=True),
    'SEG.POOL_SCALES': Range('[1, inf)', 'output sides of the pyramid pooling module', form='list', integer=True),
    'SEG.DROPOUT': Range('[0, 1)', 'dropout probability before the classifiers'),
    'SEG.AUX_WEIGHT': Range('[0, inf)', 'weight of the auxiliary head loss, 0 = no auxiliary head'),
    'SEG.AUX_CHANNELS': Range('[1, inf)', 'auxiliary head width', integer=True),
    'SEG.AUX_STAGE': Range('[0, inf)', 'backbone stage (0-based) the auxiliary head reads; below the stage count, '
                                       'checked when the model is built', integer=True),
    'SEG.SCALE': Range('[1, inf)', 'image scale (long side, short side) in pixels', form='pair'),
    'SEG.RATIO_RANGE': Range('(0, inf)', 'range of the random resize ratio', form='pair', order='<='),
    'SEG.CROP_SIZE': Range('[1, inf)', 'training crop and sliding window (H, W) in pixels', form='pair',
                           integer=True),
    'SEG.CAT_MAX_RATIO': Range('(0, 1]', 'largest share of a crop\'s labelled pixels one class may take; 1 = '
                                         'no limit'),
    'SEG.TEST_STRIDE': Range('[1, inf)', 'sliding-window step (H, W) in pixels', form='pair', integer=True),
    'SEG.TEST_SCALES': Range('(0, inf)', 'ratios of SEG.SCALE evaluated and averaged', form='list'),
    # detection
    'DET.FPN_CHANNELS': Range('[1, inf)', 'FPN width', integer=True),
    'DET.BOX_FC_DIM': Range('[1, inf)', 'box head fc width', integer=True),
    'DET.MASK_CHANNELS': Range('[1, inf)', 'mask head conv width', integer=True),
    'DET.RPN_BATCH_PER_IMAGE': Range('[1, inf)', 'anchors sampled per image for the RPN loss', integer=True),
    'DET.BOX_BATCH_PER_IMAGE': Range('[1, inf)', 'RoIs sampled per image for the box head loss', integer=True),
    'DET.RPN_PRE_NMS_TRAIN': Range('[1, inf)', 'RPN proposals per level before NMS in training', integer=True),
    'DET.RPN_POST_NMS_TRAIN': Range('[1, inf)', 'RPN proposals per image after NMS in training', integer=True),
    'DET.RPN_PRE_NMS_TEST': Range('[1, inf)', 'RPN proposals per level before NMS in evaluation', integer=True),
    'DET.RPN_POST_NMS_TEST': Range('[1, inf)', 'RPN proposals per image after NMS in evaluation', integer=True),
    'DET.SCORE_THRESH': Range('[0, 1)', 'lowest score of a kept detection'),
    'DET.DETECTIONS_PER_IMAGE': Range('[1, inf)', 'detections kept per image', integer=True),
    'DET.CASCADE_IOUS': Range('(0, 1)', 'IoU threshold of each cascade stage\'s positives', form='list'),
    'DET.CASCADE_WEIGHTS': Range('[0, inf)', 'loss weight of each cascade stage', form='list'),
    'DET.CROP_PROB': Range('[0, 1]', 'probability of the random-crop branch of the 3x recipe'),
    'DET.CROP_SIZE': Range('[1, inf)', 'range of the crop sides in pixels', form='pair', integer=True, order='<='),
    'DET.TEST_SCALE': Range('[1, inf)', 'evaluation size limits (long side, short side) in pixels', form='pair'),
    # model
    'MODEL.NUM_CLASSES': Range('[1, inf)', "classifier outputs; a training run uses the dataset's class count",
                               integer=True),
    'MODEL.DROP_RATE': Range('[0, 1)', 'dropout probability; at 1 every activation would be zeroed'),
    'MODEL.DROP_PATH_RATE': Range('[0, 1)', 'stochastic-depth probability of the last block, rising linearly '
                                            'from 0 at the first; at 1 DropPath divides by a keep probability of 0'),
    'MODEL.LABEL_SMOOTHING': Range('[0, 1)', 'share of the target spread evenly over the classes; at 1 the '
                                             'target would no longer carry the label'),
    'MODEL.SWIN.PATCH_SIZE': Range('[1, inf)', 'pixels per patch side', integer=True),
    'MODEL.SWIN.IN_CHANS': Range('[1, inf)', 'input image channels, Swin and CSwin', integer=True),
    'MODEL.SWIN.EMBED_DIM': Range('[1, inf)', 'channels of stage 1', integer=True),
    'MODEL.SWIN.DEPTHS': Range('[1, inf)', 'blocks per stage, one item per stage', form='list', integer=True),
    'MODEL.SWIN.NUM_HEADS': Range('[1, inf)', 'attention heads per stage, one item per stage', form='list',
                                  integer=True),
    'MODEL.SWIN.WINDOW_SIZE': Range('[1, inf)', 'window side in tokens, clamped to the stage map', integer=True),
    'MODEL.SWIN.SOFTMAX_WINDOW_SIZE': Range('[0, inf)', 'window side of the softmax blocks; 0 = the official rule',
                                            integer=True),
    'MODEL.SWIN.MLP_RATIO': Range('(0, inf)', 'MLP hidden width over block width'),
    'MODEL.SWIN.QK_SCALE': Range('(0, inf)', 'softmax logit scale; None means head_dim^-0.5, and so would 0, '
                                             'silently', none_ok=True),
    'MODEL.LA.FOCUSING_FACTOR': Range('[1, inf)', 'power p of the focusing function: p = 1 does not focus, and p = 0 '
                                                  'would make every attention weight equal', integer=True),
    'MODEL.LA.KERNEL_SIZE': Range('[1, inf)', 'side of the depthwise rank-restoration conv; odd, so that its '
                                              'zero padding keeps the token map size', odd=True, integer=True),
    'MODEL.LA.PVT_LA_SR_RATIOS': Range('[1, 9]', 'PVT key/value reduction ratio of the L blocks, one digit per '
                                                 'stage, e.g. 1111 or 8421', form='digits', integer=True),
    'MODEL.DEIT.PATCH_SIZE': Range('[1, inf)', 'pixels per patch side', integer=True),
    'MODEL.DEIT.IN_CHANS': Range('[1, inf)', 'input image channels', integer=True),
    'MODEL.DEIT.EMBED_DIM': Range('[1, inf)', 'token width', integer=True),
    'MODEL.DEIT.DEPTH': Range('[1, inf)', 'number of blocks', integer=True),
    'MODEL.DEIT.NUM_HEADS': Range('[1, inf)', 'attention heads', integer=True),
    'MODEL.DEIT.MLP_RATIO': Range('(0, inf)', 'MLP hidden width over token width'),
    # training
    'TRAIN.START_EPOCH': Range('[0, inf)', "first epoch of a fresh run; a resumed run takes its checkpoint's",
                               integer=True),
    'TRAIN.EPOCHS': Range('[1, inf)', 'length of the LR schedule in epochs', integer=True),
    'TRAIN.WARMUP_EPOCHS': Range('[0, inf)', 'epochs of linear warm-up, 0 = none', integer=True),
    'TRAIN.COOLDOWN_EPOCHS': Range('[0, inf)', 'epochs at MIN_LR after the schedule, 0 = none', integer=True),
    'TRAIN.WEIGHT_DECAY': Range('[0, inf)', 'weight decay; a negative one would push the weights away from 0'),
    'TRAIN.BASE_LR': Range('(0, inf)', 'peak LR for a global batch of 512; at 0 the weights would never move'),
    'TRAIN.WARMUP_LR': Range('[0, inf)', 'LR at the first update'),
    'TRAIN.MIN_LR': Range('[0, inf)', 'LR at the end of the schedule'),
    'TRAIN.CLIP_GRAD': Range('[0, inf)', 'largest global gradient norm; None or 0 = no clipping', none_ok=True),
    'TRAIN.ACCUMULATION_STEPS': Range('[1, inf)', 'batches per optimizer update', integer=True),
    'TRAIN.KEEP_CKPTS': Range('[1, inf)', 'newest epoch checkpoints kept: at least the one to resume from',
                              integer=True),
    'TRAIN.CKPT_STEPS': Range('[0, inf)', 'updates between mid-epoch checkpoints, 0 = only at epoch ends',
                              integer=True),
    'TRAIN.ITERS': Range('[0, inf)', 'length of an iteration schedule in updates; 0 = the epoch schedule',
                         integer=True),
    'TRAIN.WARMUP_ITERS': Range('[0, inf)', 'updates of linear warm-up of an iteration schedule', integer=True),
    'TRAIN.EVAL_PERIOD': Range('[1, inf)', 'updates between evaluations and checkpoints of an iteration schedule',
                               integer=True),
    'TRAIN.LR_SCHEDULER.POWER': Range('(0, inf)', 'exponent of the poly schedule; 1 decays linearly'),
    'TRAIN.MAX_NONFINITE_STEPS': Range('[1, inf)', 'consecutive skipped non-finite updates that stop the run',
                                       integer=True),
    'TRAIN.LR_SCHEDULER.DECAY_EPOCHS': Range('[1, inf)', 'epochs between decays of the step schedule; 0 would '
                                                         'divide by zero', integer=True),
    'TRAIN.LR_SCHEDULER.DECAY_RATE': Range('(0, 1]', 'factor of each decay of the step schedule: it lowers the LR; '
                                                     '1 keeps it, 0 would stop training'),
    'TRAIN.OPTIMIZER.EPS': Range('(0, inf)', "term in AdamW's denominator that keeps it from dividing by zero"),
    'TRAIN.OPTIMIZER.BETAS': Range('[0, 1)', 'AdamW decay rates of the gradient mean and of its square; '
                                             'independent, each below 1 as torch requires', form='pair'),
    'TRAIN.OPTIMIZER.MOMENTUM': Range('(0, 1)', 'SGD momentum; Nesterov SGD needs it above 0, and at 1 it never '
                                                'forgets'),
    'TRAIN.EMA.DECAY': Range('[0, 1]', 'weight of the old average at each update: 0 copies the model, 1 keeps '
                                       'the initial weights'),
    # augmentation
    'AUG.COLOR_JITTER': Range('[0, inf)', 'brightness/contrast/saturation jitter strength, 0 = off'),
    'AUG.REPROB': Range('[0, 1]', 'probability of random erasing'),
    'AUG.RECOUNT': Range('[1, inf)', 'most boxes erased per image', integer=True),
    'AUG.MIXUP': Range('[0, inf)', 'alpha of the Beta distribution of the mixing weight, 0 = off'),
    'AUG.CUTMIX': Range('[0, inf)', 'alpha of the Beta distribution of the box area, 0 = off'),
    'AUG.CUTMIX_MINMAX': Range('[0, 1]', 'smallest and largest CutMix box side as fractions of the image side; '
                                         'the side is drawn at least min and below max; None = use CUTMIX',
                               form='pair', order='<', none_ok=True),
    'AUG.MIXUP_PROB': Range('[0, 1]', 'probability of mixing a batch'),
    'AUG.MIXUP_SWITCH_PROB': Range('[0, 1]', 'probability of CutMix instead of Mixup when both are on'),
    'AUG.SCALE': Range('(0, 1]', 'RandomResizedCrop area as a fraction of the image', form='pair', order='<='),
    'AUG.RATIO': Range('(0, inf)', 'RandomResizedCrop aspect ratio, width over height', form='pair', order='<='),
    'AUG.HFLIP': Range('[0, 1]', 'probability of a horizontal flip'),
    # misc
    'SAVE_FREQ': Range('[1, inf)', 'epochs between periodic checkpoints', integer=True),
    'PRINT_FREQ': Range('[1, inf)', 'iterations between progress lines', integer=True),
    'SEED': Range('[0, 4294967295]', 'seeds every RNG, rank r with SEED + r; numpy takes 32-bit seeds',
                  integer=True),
    'LOCAL_RANK': Range('[0, inf)', 'process index on this machine', integer=True),
    'DIST_TIMEOUT': Range('[1, inf)', 'minutes a collective waits for the other ranks', integer=True),
}

# String keys with a fixed set of values.
CHOICES: Dict[str, tuple] = {
    'AMP_DTYPE': ('fp16', 'bf16'),
    'TASK': ('classification', 'segmentation', 'detection'),
    'DET.DETECTOR': ('mask_rcnn', 'cascade_mask_rcnn'),
    'SEG.DECODER': ('upernet', 'fpn'),
    'SEG.TEST_MODE': ('whole', 'slide'),
}

# Keys that yacs would let take a number but that need no range, and why.
_UNUSED = '*unused*: accepted for the official yaml files and ignored'
NO_RANGE: Dict[str, str] = {
    **{f'MODEL.SWIN.{key}': _UNUSED for key in (
        'KA', 'DIM_REDUCTION', 'STAGES', 'STAGES_NUM', 'RPB', 'PADDING_MODE', 'SHARE_DWC_KERNEL', 'SHARE_QKV',
        'LR_FACTOR', 'DEPTHS_LR', 'FUSION_TYPE', 'STAGE_CFG')},
    **{f'MODEL.{node}': '*unused* sub-config: any keys accepted, none read'
       for node in ('SWIN_HR', 'SWIN_LRVIT', 'PVD')},
    'MODEL.DEIT.ABS_POS_EMBED': 'a switch, not a number: True, False or None (automatic)',
    'TRAIN.LR_SCHEDULER.MILESTONES': 'increasing epochs of the multistep schedule: checked by _validate',
}


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
        valid = f'; expected {RANGES[key].describe()}' if key in RANGES else ''
        return ConfigError(f'{where}: wrong value type for {key!r}: {text}{valid}')
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


def _leaf_keys(data: dict, prefix: str = '') -> Iterable[str]:
    """Full names of the values a parsed yaml mapping sets (``{'A': {'B': 1}}`` -> ``A.B``)."""
    for key, value in data.items():
        if isinstance(value, dict):
            yield from _leaf_keys(value, f'{prefix}{key}.')
        else:
            yield f'{prefix}{key}'


def _merge_file(cfg: CN, path: str, seen: tuple[str, ...] = (), sources: Optional[Dict[str, str]] = None) -> None:
    """Merge `path` into `cfg`, its BASE files first (paths relative to the file). `sources`, when
    given, records for every key the file sets that it came from this file (a later file wins)."""
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
            _merge_file(cfg, os.path.join(os.path.dirname(path), base), seen + (path,), sources)
    try:
        cfg.merge_from_other_cfg(CN(data))
    except (KeyError, ValueError, AssertionError) as err:
        raise _explain_yacs_error(err, f'config {path}') from None
    if sources is not None:
        sources.update((key, f'config {path}') for key in _leaf_keys(data) if key != 'BASE')


def load_config(path: Optional[str] = None, opts: Optional[Sequence[str]] = None) -> CN:
    """Defaults ← yaml `path` (with its BASE chain) ← `opts` (``['KEY', 'VALUE', ...]``); frozen.

    Raises :class:`ConfigError` for a missing file, bad YAML, an unknown key (with close matches),
    a value of the wrong type or a value outside its :data:`RANGES` entry, always naming the key
    and the file (or ``--opts``) it came from.
    """
    cfg = get_default_config()
    sources: Dict[str, str] = {}
    if path:
        _merge_file(cfg, path, sources=sources)
    if opts:
        opts = list(opts)
        if len(opts) % 2:
            raise ConfigError(f'--opts needs KEY VALUE pairs, got an odd number of items: {opts}')
        try:
            cfg.merge_from_list(_quote_string_values(opts))
        except (KeyError, ValueError, AssertionError) as err:
            raise _explain_yacs_error(err, '--opts') from None
        sources.update((key, '--opts') for key in opts[::2])
    _validate(cfg, sources)
    cfg.freeze()
    return cfg


def _value_of(cfg: CN, key: str):
    node = cfg
    for part in key.split('.'):
        node = node[part]
    return node


def _validate(cfg: CN, sources: Optional[Dict[str, str]] = None) -> None:
    """The checks yacs' type system cannot express: every :data:`RANGES` entry, and AMP_DTYPE.

    Raises one :class:`ConfigError` listing every bad value with its key, its range and, from
    `sources` (key -> 'config FILE' or '--opts'), where the value was set.
    """
    sources = sources or {}
    problems = []
    for key, valid in RANGES.items():
        value = _value_of(cfg, key)
        if not valid.accepts(value):
            origin = f' (from {sources[key]})' if key in sources else ''
            problems.append(f'{key}={value!r}{origin} is out of range: expected {valid.describe()} ({valid.why})')
    for key, choices in CHOICES.items():
        value = _value_of(cfg, key)
        if value not in choices:
            origin = f' (from {sources[key]})' if key in sources else ''
            problems.append(f'{key} must be one of {", ".join(map(repr, choices))}, got {value!r}{origin}')
    if not problems:  # how keys fit together is judged on values that are each valid
        if cfg.TRAIN.ITERS % cfg.TRAIN.EVAL_PERIOD:
            problems.append(f'TRAIN.ITERS={cfg.TRAIN.ITERS} is not a multiple of '
                            f'TRAIN.EVAL_PERIOD={cfg.TRAIN.EVAL_PERIOD}: an iteration schedule is a whole number '
                            f'of evaluation periods')
        problems += _detection_problems(cfg)
        if cfg.TASK == 'segmentation' and not cfg.TRAIN.ITERS:
            problems.append('TASK segmentation trains on an iteration schedule: set TRAIN.ITERS (and '
                            'TRAIN.EVAL_PERIOD)')
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f'{len(problems)} config values are not valid: ' + '; '.join(problems))


def _detection_problems(cfg: CN) -> List[str]:
    """What is wrong with the list-of-pairs keys, the cascade lists and the multistep milestones."""
    problems = []
    for key in ('DET.TRAIN_SCALES', 'DET.CROP_SCALES'):
        value = _value_of(cfg, key)
        pairs_ok = isinstance(value, (list, tuple)) and len(value) > 0 and all(
            isinstance(p, (list, tuple)) and len(p) == 2 and all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and 0 < v < float('inf') for v in p)
            for p in value)
        if not pairs_ok:
            problems.append(f'{key}={value!r} must be a non-empty list of [long side, short side] pairs of positive '
                            f'sizes in pixels, e.g. [[1333, 800]]')
    if len(cfg.DET.CASCADE_IOUS) != len(cfg.DET.CASCADE_WEIGHTS):
        problems.append(f'DET.CASCADE_IOUS has {len(cfg.DET.CASCADE_IOUS)} stages but DET.CASCADE_WEIGHTS '
                        f'{len(cfg.DET.CASCADE_WEIGHTS)}: one loss weight per stage')
    milestones = list(cfg.TRAIN.LR_SCHEDULER.MILESTONES)
    if cfg.TRAIN.LR_SCHEDULER.NAME == 'multistep' and (
            not all(isinstance(m, int) and not isinstance(m, bool) and m > 0 for m in milestones)
            or any(b <= a for a, b in itertools.pairwise(milestones))):
        problems.append(f'TRAIN.LR_SCHEDULER.MILESTONES={milestones!r} must be increasing positive whole epochs')
    return problems


def scale_lr(cfg: CN, world_size: int) -> CN:
    """Linear LR scaling: lr · BATCH_SIZE · world_size · ACCUMULATION_STEPS / 512 (docs/training.md,
    "Linear LR scaling"); segmentation configs keep their rates (docs/segmentation.md).

    Returns a frozen copy; the run folder's config.yaml records the scaled values, as the
    official code does. The factor is positive (BATCH_SIZE, ACCUMULATION_STEPS >= 1), so the
    scaled rates keep their ranges; they are checked again all the same, since a huge rate could
    overflow to inf.
    """
    if world_size < 1:
        raise ValueError(f'world_size must be >= 1, got {world_size}')
    if cfg.TASK in ('segmentation', 'detection'):  # mmseg / mmdet recipes give the rate of their total batch
        return cfg
    factor = cfg.DATA.BATCH_SIZE * world_size * cfg.TRAIN.ACCUMULATION_STEPS / 512.0
    cfg = cfg.clone()
    cfg.defrost()
    cfg.TRAIN.BASE_LR = cfg.TRAIN.BASE_LR * factor
    cfg.TRAIN.WARMUP_LR = cfg.TRAIN.WARMUP_LR * factor
    cfg.TRAIN.MIN_LR = cfg.TRAIN.MIN_LR * factor
    _validate(cfg, {key: f'linear LR scaling by {factor:g}' for key in ('TRAIN.BASE_LR', 'TRAIN.WARMUP_LR',
                                                                        'TRAIN.MIN_LR')})
    cfg.freeze()
    return cfg


def config_to_yaml(cfg: CN) -> str:
    """The full config as YAML text (what config.yaml and checkpoints store)."""
    return cfg.dump()


def config_from_yaml_text(text: str) -> CN:
    """Rebuild a frozen config from :func:`config_to_yaml` output, checked against the defaults.

    Keys and types are checked, ranges are not: this is the record of a run that has already
    happened (a checkpoint's config), whose values were checked when that run started; checking
    them against today's ranges would make a checkpoint unreadable whenever a range is tightened.
    """
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


def ranges_markdown() -> str:
    """:data:`RANGES` and :data:`NO_RANGE` as the Markdown of ``docs/config.md``."""
    defaults = get_default_config()
    lines = ['# Valid ranges of the numeric config keys', '',
             'Generated from `RANGES` and `NO_RANGE` in `config.py` by `python -m config > docs/config.md`.',
             '`load_config` refuses a value outside its range before anything runs, with a `ConfigError`',
             'that names the key, the value, the range and the yaml file or `--opts` that set it.',
             'In an interval, `[` and `]` include the bound, `(` and `)` exclude it; `inf` is no bound',
             '(inf and nan are never valid). Whether sizes fit together (image size vs the total stride',
             'and the LA stripe or reduction sizes; width vs heads; one entry per stage) is checked when',
             'the model is built.', '',
             '| key | default | valid | meaning and reason |', '|---|---|---|---|']
    for key, valid in RANGES.items():
        lines.append(f'| `{key}` | `{_value_of(defaults, key)!r}` | {valid.describe()} | {valid.why} |')
    lines += ['', 'Keys without a range:', '', '| key | why |', '|---|---|']
    lines += [f'| `{key}` | {why} |' for key, why in NO_RANGE.items()]
    return '\n'.join(lines) + '\n'


if __name__ == '__main__':
    print(ranges_markdown(), end='')
