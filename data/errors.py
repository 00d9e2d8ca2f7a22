"""Errors for data that cannot be used as configured; each message names the file, folder or key."""
from __future__ import annotations

__all__ = ['DataError', 'DatasetNotFoundError']


class DataError(ValueError):
    """Data that exist but cannot be used: a corrupt image, mismatched splits, a batch larger than
    the dataset, an unsupported dataset option."""


class DatasetNotFoundError(FileNotFoundError):
    """A dataset folder or file is missing; the message says where it looked and how to get it."""
