"""Small helpers that have no better home."""
from __future__ import annotations

import argparse
import random
from typing import Tuple

import numpy as np
import torch

__all__ = ['seed_everything', 'count_parameters', 'parse_size']


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch (all devices)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def count_parameters(model: torch.nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in model.parameters() if (p.requires_grad or not trainable_only))


def parse_size(text: str, minimum: int = 1, square: bool = False) -> Tuple[int, int]:
    """A command-line image size: 'HxW' (or 'H×W') -> (H, W); with `square`, also 'S' -> (S, S).
    Raises argparse.ArgumentTypeError naming the text when it is not one, or a side is below `minimum`."""
    parts = text.lower().replace('×', 'x').split('x')
    if (len(parts) not in ((1, 2) if square else (2,))) or not all(part.strip().isdigit() for part in parts):
        raise argparse.ArgumentTypeError(f'size {text!r} is not HxW{" or S" if square else ""} '
                                         f'(e.g. 256x352{", 224" if square else ""})')
    h, w = int(parts[0]), int(parts[-1])
    if min(h, w) < max(minimum, 1):
        raise argparse.ArgumentTypeError(f'size {text!r}: both sides must be at least {max(minimum, 1)}')
    return h, w
