"""Stopping when a cluster asks: SIGTERM or SIGUSR1 → finish the update, agree, save, exit 75.

SLURM (``--signal``, pre-emption, ``scancel``), Kubernetes (pod eviction) and torchrun (stopping
its workers) all ask a job to stop with a signal and kill it a little later. The default action
of SIGTERM would lose everything since the last checkpoint. Here the signal only raises a flag:

* the training loop asks :meth:`StopSignal.should_stop` after every optimizer update; each rank
  contributes its own flag and one all-reduce (MAX) makes every rank see the same answer at the
  same update, although the signal reached them at different times;
* the loop then saves a mid-epoch checkpoint (rank 0 writes, every rank waits for it) and raises
  :class:`Preempted`; ``main`` exits with :data:`EXIT_PREEMPTED`;
* re-running the same command resumes from that checkpoint exactly (see README, "Surviving a kill").

Further signals while stopping are ignored, so a second SIGTERM cannot cut a checkpoint write
short (writes are atomic in any case). DataLoader workers ignore both signals
(:func:`ignore_stop_signals`): torchrun and SLURM signal the whole process group, and a worker that
died of it would turn a clean stop into a DataLoader error.
"""
from __future__ import annotations

import logging
import signal
import time
from typing import Dict, Optional, Sequence

import torch
import torch.distributed as dist

__all__ = ['EXIT_PREEMPTED', 'STOP_SIGNALS', 'Preempted', 'StopSignal', 'ignore_stop_signals']

logger = logging.getLogger('flatten.preemption')

# EX_TEMPFAIL of sysexits.h: "temporary failure, retry later": the run stopped cleanly with a
# checkpoint and the same command continues it.
EXIT_PREEMPTED = 75
STOP_SIGNALS = (signal.SIGTERM, signal.SIGUSR1)


class Preempted(Exception):
    """Raised once the stop checkpoint is on disk (or there was nothing to save)."""


def ignore_stop_signals(worker_id: int = 0) -> None:
    """DataLoader ``worker_init_fn``: workers leave stopping to the main process, which shuts
    them down itself (and they exit on their own if the main process dies)."""
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)


class StopSignal:
    """Records the first stop signal; :meth:`should_stop` is the collective all ranks agree on.

    :meth:`install` it when training starts (evaluation keeps the default: nothing to save) and
    :meth:`restore` the previous handlers at the end.
    """

    def __init__(self, signals: Sequence[signal.Signals] = STOP_SIGNALS):
        self.signals = tuple(signals)
        self.received: Optional[str] = None
        self.received_at: Optional[float] = None
        self._previous: Dict[signal.Signals, object] = {}

    def install(self) -> StopSignal:
        for signum in self.signals:
            if signum not in self._previous:
                self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def restore(self) -> None:
        """Put the previous handlers back, unless a stop signal came: the process is then on its
        way out, and a repeated signal must not turn its exit code 75 into a kill (SIG_IGN, as
        the interpreter's shutdown resets Python-level handlers to the default)."""
        for signum, handler in self._previous.items():
            signal.signal(signum, handler if self.received is None else signal.SIG_IGN)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        # no logging here: the handler may interrupt the logging module itself
        if self.received is None:
            self.received = signal.Signals(signum).name
            self.received_at = time.time()

    def should_stop(self, device: torch.device) -> bool:
        """True on every rank if any rank has received a stop signal (a collective under DDP:
        call it at the same point on all ranks)."""
        flag = self.received is not None
        if dist.is_available() and dist.is_initialized():
            # gloo reduces CPU tensors; nccl needs the tensor on this rank's GPU
            tensor = torch.tensor([int(flag)], dtype=torch.int32, device=device)
            dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
            flag = bool(tensor.item())
        return flag

    def describe(self) -> str:
        """What asked for the stop, for the log: this rank's signal, or another rank's."""
        if self.received is None:
            return 'a stop signal received by another rank'
        return f'{self.received} ({time.time() - self.received_at:.1f} s ago)'
