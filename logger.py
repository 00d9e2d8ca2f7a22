"""Logging: a coloured console on rank 0 and a plain-text file per rank (``log_rank{r}.txt``)."""
from __future__ import annotations

import logging
import os
import sys
from typing import Optional

from termcolor import colored

__all__ = ['create_logger']

_FMT = '[%(asctime)s %(name)s] (%(filename)s %(lineno)d): %(levelname)s %(message)s'
_DATEFMT = '%Y-%m-%d %H:%M:%S'


def create_logger(output_dir: Optional[str], dist_rank: int = 0, name: str = 'flatten') -> logging.Logger:
    """Configure and return the project logger (idempotent: old handlers are replaced).

    Rank 0 logs INFO to stdout in colour, other ranks only errors (to stderr); every rank writes
    ``log_rank{rank}.txt`` in `output_dir` when one is given. Library modules log through
    ``logging.getLogger('flatten.*')`` and inherit these handlers.
    """
    logger = logging.getLogger(name)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
        handler.close()

    if dist_rank == 0:
        color_fmt = (colored('[%(asctime)s %(name)s]', 'green')
                     + colored('(%(filename)s %(lineno)d)', 'yellow') + ': %(levelname)s %(message)s')
        console = logging.StreamHandler(sys.stdout)
        console.setLevel(logging.INFO)
        console.setFormatter(logging.Formatter(fmt=color_fmt, datefmt=_DATEFMT))
    else:
        # other ranks stay quiet on the console except for errors, so a failing rank is visible
        console = logging.StreamHandler(sys.stderr)
        console.setLevel(logging.ERROR)
        console.setFormatter(logging.Formatter(fmt=f'[rank {dist_rank}] %(levelname)s %(message)s'))
    logger.addHandler(console)

    if output_dir:
        os.makedirs(output_dir, exist_ok=True)
        file_handler = logging.FileHandler(os.path.join(output_dir, f'log_rank{dist_rank}.txt'), mode='a')
        file_handler.setLevel(logging.INFO)
        file_handler.setFormatter(logging.Formatter(fmt=_FMT, datefmt=_DATEFMT))
        logger.addHandler(file_handler)
    return logger
