"""Shared set-up of the analysis tools: a model from a config (and optional checkpoint), an image,
and the input tokens of each attention module on that image."""
from __future__ import annotations

import os
from pathlib import Path
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn

from config import load_config
from data.build import build_transform
from models import build_model
from models.attention.analysis import first_image, supports_analysis
from models.registry import UnknownModelError
from utils.checkpoint import CheckpointError, load_checkpoint

# The runnable tools put the repository root on sys.path before importing this module.
REPO = Path(__file__).resolve().parents[1]

# A Fashion-MNIST test image (index 0, an ankle boot) shipped with the repository
DEFAULT_IMAGE = REPO / 'tools' / 'assets' / 'fashion_mnist_test_0.png'


def add_model_arguments(parser) -> None:
    """The arguments every analysis tool takes: the model, its weights and the image."""
    parser.add_argument('--cfg', required=True, help='config of a DeiT, PVT, PVTv2, Swin or CSwin model')
    parser.add_argument('--opts', nargs='+', default=None, metavar='KEY VALUE')
    parser.add_argument('--resume', default=None, help='checkpoint with the weights (default: random init)')
    parser.add_argument('--image', default=None,
                        help="image file (default: tools/assets/fashion_mnist_test_0.png), or 'noise'")
    parser.add_argument('--seed', type=int, default=0, help="seed of the random initialisation and of 'noise'")


# what the tools report as one-line errors (exit status 2) instead of tracebacks: bad configs, model
# names, checkpoints, image files, and models the analysis does not cover
TOOL_ERRORS = (ValueError, TypeError, OSError, UnknownModelError, CheckpointError)


def model_and_image(args):
    """(model, config, image) for the parsed :func:`add_model_arguments`, seeded by ``args.seed``."""
    torch.manual_seed(args.seed)
    model, cfg = load_model(args.cfg, args.opts, args.resume)
    return model, cfg, load_image(cfg, args.image, args.seed)


def save_figure(fig, path: str) -> None:
    """Lay out `fig` and write it to `path` as PNG, creating the folder."""
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    print(f'wrote {path}')


def load_model(cfg_path: str, opts: Optional[Sequence[str]] = None, checkpoint: Optional[str] = None):
    """(model in eval mode, config); `checkpoint` is one of ours or an official .pth (its 'model')."""
    cfg = load_config(cfg_path, list(opts or []))
    model = build_model(cfg)
    if checkpoint:
        load_checkpoint(checkpoint, model)
    return model.eval(), cfg


def load_image(cfg, path: Optional[str] = None, seed: int = 0) -> torch.Tensor:
    """(1, 3, IMG, IMG): `path` (default: the shipped sample) through the config's eval transform, or
    for ``path='noise'`` a seeded standard-normal image (every token distinct, unlike the flat
    background of a Fashion-MNIST image, whose identical patches make identical attention rows)."""
    from PIL import Image
    if path == 'noise':
        gen = torch.Generator().manual_seed(seed)
        return torch.randn(1, 3, cfg.DATA.IMG_SIZE, cfg.DATA.IMG_SIZE, generator=gen)
    path = str(path or DEFAULT_IMAGE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f'image {path!r} does not exist')
    with Image.open(path) as img:
        return build_transform(False, cfg)(img.convert('RGB')).unsqueeze(0)


@torch.no_grad()
def attention_inputs(model: nn.Module, image: torch.Tensor) -> List[Tuple[str, nn.Module, torch.Tensor]]:
    """Run `image` and return, for every attention module (models.attention.Attention, every backbone)
    in forward order, its name, the module and its forward input for the first image, batch dim kept
    at 1: (1, N, C), or the block's stacked (3, 1, N, C) Q, K, V for CSwin (``projections='block'``).

    Swin's modules see the windows of the batch, so theirs is the image's first window; CSwin's first
    stripe window is taken later, by models/attention/analysis.py."""
    captured = []

    def capture(module, args, name):
        captured.append((name, module, first_image(module, args[0]).detach().clone()))

    hooks = [module.register_forward_pre_hook(lambda mod, args, name=name: capture(mod, args, name))
             for name, module in model.named_modules() if supports_analysis(module)]
    try:
        model(image)
    finally:
        for hook in hooks:
            hook.remove()
    if not captured:
        raise ValueError(f'{type(model).__name__} runs no attention module of models.attention (Attention); the '
                         f'analysis tools cover DeiT, PVT, PVTv2, Swin and CSwin configs')
    return captured
