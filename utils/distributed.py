"""Device selection and optional DDP: a single process unless torchrun's environment says otherwise.

Every helper works in a single process (world size 1) and then does nothing collective.
"""
from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

logger = logging.getLogger('flatten.distributed')

__all__ = ['DistContext', 'init_distributed', 'is_dist', 'get_rank', 'get_world_size', 'is_main_process',
           'all_reduce_sum', 'barrier', 'cleanup']


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


class DeviceError(RuntimeError):
    """The requested device cannot be used (e.g. CUDA absent, or more ranks than GPUs)."""


def _pick_device(requested: str, local_rank: int, local_world_size: int) -> torch.device:
    """The device of this process: rank-local GPU ``local_rank`` under torchrun on CUDA."""
    if not requested:
        requested = 'cuda' if torch.cuda.is_available() else 'cpu'
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise DeviceError(f"--device {requested!r} is not a device: use 'cpu', 'cuda' or 'cuda:N'") from None
    if device.type == 'cuda':
        if not torch.cuda.is_available():
            raise DeviceError(f'--device {requested}: CUDA is not available on this machine; use --device cpu')
        count = torch.cuda.device_count()
        if (local_world_size > 1) and (device.index is None):
            if local_world_size > count:
                raise DeviceError(
                    f'{local_world_size} processes were started on this machine but only {count} CUDA device(s) '
                    f'are visible: use --nproc_per_node={count} or fewer')
            device = torch.device('cuda', local_rank)
        elif (device.index is not None) and (device.index >= count):
            raise DeviceError(f'--device {requested}: only {count} CUDA device(s) are visible')
        elif device.index is None:
            # a bare 'cuda' is the current GPU; torch.cuda.set_device refuses a device without an index
            device = torch.device('cuda', torch.cuda.current_device())
        torch.cuda.set_device(device)
    return device


def init_distributed(device: str = '', timeout_minutes: float = 30.0) -> DistContext:
    """Read torchrun's RANK/WORLD_SIZE/LOCAL_RANK; start a process group when WORLD_SIZE > 1.

    The backend is nccl on CUDA and gloo on CPU. Collectives time out after `timeout_minutes`, so a
    rank that died takes the job down instead of hanging it.
    """
    world_size = int(os.environ.get('WORLD_SIZE', '1'))
    rank = int(os.environ.get('RANK', '0'))
    local_rank = int(os.environ.get('LOCAL_RANK', '0'))
    local_world_size = int(os.environ.get('LOCAL_WORLD_SIZE', str(world_size)))
    torch_device = _pick_device(device, local_rank, local_world_size)
    _warn_about_shared_store_restarts(rank)
    if world_size > 1 and not dist.is_initialized():
        backend = 'nccl' if torch_device.type == 'cuda' else 'gloo'
        dist.init_process_group(
            backend=backend, rank=rank, world_size=world_size,
            timeout=datetime.timedelta(minutes=timeout_minutes),
            device_id=torch_device if backend == 'nccl' else None)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=torch_device)


def _warn_about_shared_store_restarts(rank: int) -> None:
    """torchrun --max-restarts with its default shared rendezvous store: a restarted group can read a
    peer address of the group before it (the store outlives the workers and its keys are not
    namespaced per attempt; PyTorch issue 135712) and fail to connect. A fresh store per attempt,
    TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 set for torchrun, avoids it."""
    restarts = int(os.environ.get('TORCHELASTIC_MAX_RESTARTS', '0') or 0)
    if (rank == 0) and (restarts > 0) and (os.environ.get('TORCHELASTIC_USE_AGENT_STORE') == 'True'):
        logger.warning('torchrun --max-restarts shares its rendezvous store with the workers: a restarted group may '
                       'read stale peer addresses and fail to connect. Launch with '
                       'TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 torchrun ... (README, "Pre-emption")')


def is_dist() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_dist() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_dist() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """In-place sum over ranks (a no-op in a single process); returns `tensor`."""
    if is_dist():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def barrier() -> None:
    if is_dist():
        dist.barrier()


def cleanup() -> None:
    if is_dist():
        dist.destroy_process_group()
