"""Timing, memory and environment helpers: the code behind `bench/` and main.py's --throughput.

Timing rules: warm up, then take the median of at least 5 timed repeats; candidates compared with
each other are timed *interleaved* (A, B, A, B, …) so that drift of a shared machine (frequency,
neighbours) affects them alike, and ratios come from one run.
"""
from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, List, Optional, Tuple

import torch

from utils.optimizer import IMPLEMENTATIONS

__all__ = ['machine_info', 'measure', 'median', 'synchronize', 'peak_memory_mb', 'autocast_for', 'write_json',
           'matmul_gflops', 'tune_cpu_allocator', 'exact_cpu_memory_accounting', 'cpu_model_name', 'prepare_model',
           'random_images', 'inference_step', 'training_step', 'linear_layers_seconds']


def synchronize(device: torch.device) -> None:
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def median(values: List[float]) -> float:
    return statistics.median(values)


def measure(candidates: Dict[str, Callable[[], object]], device: torch.device, repeats: int = 7, warmup: int = 2,
            min_repeat_s: float = 0.3) -> Dict[str, List[float]]:
    """Seconds per call of every candidate, `repeats` times each, interleaved.

    Each candidate is first called `warmup` times; one repeat then times as many consecutive calls
    as fill `min_repeat_s` (decided once per candidate), so short calls are not dominated by timer
    resolution. Returns ``{name: [seconds per call, one per repeat]}``.
    """
    calls = {}
    for name, fn in candidates.items():
        for _ in range(warmup):
            fn()
        synchronize(device)
        start = time.perf_counter()
        fn()
        synchronize(device)
        calls[name] = max(1, int(min_repeat_s / max(time.perf_counter() - start, 1e-6)))
    results: Dict[str, List[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            synchronize(device)
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            synchronize(device)
            results[name].append((time.perf_counter() - start) / calls[name])
    return results


def peak_memory_mb(fn: Callable[[], object], device: torch.device) -> float:
    """Peak memory of one call of `fn` above what was allocated before it, in MiB.

    CUDA: the allocator's peak. CPU: the process's resident-set high-water mark (VmHWM), reset
    just before the call through /proc/self/clear_refs (Linux). Call :func:`exact_cpu_memory_accounting`
    first (and never :func:`tune_cpu_allocator`) so that freed blocks leave the resident set, and run
    each candidate in a fresh process.
    """
    if device.type == 'cuda':
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2 ** 20
    before = _status_kb('VmRSS')
    with open('/proc/self/clear_refs', 'w') as f:
        f.write('5')  # reset VmHWM to the current RSS
    fn()
    return (_status_kb('VmHWM') - before) / 1024


def _status_kb(field: str) -> int:
    with open('/proc/self/status') as f:
        for line in f:
            if line.startswith(field + ':'):
                return int(line.split()[1])
    raise RuntimeError(f'{field} not found in /proc/self/status')


def autocast_for(dtype: str, device: torch.device):
    """A context-manager factory for 'fp32' (none), 'bf16' or 'fp16' autocast on `device`."""
    if dtype == 'fp32':
        return contextlib.nullcontext
    return functools.partial(torch.autocast, device_type=device.type,
                             dtype={'bf16': torch.bfloat16, 'fp16': torch.float16}[dtype])


def matmul_gflops(device: torch.device, size: int = 2048, dtype: torch.dtype = torch.float32,
                  repeats: int = 7) -> float:
    """The machine's square-matmul rate in GFLOP/s (2·n³ per product), the ceiling models are held to."""
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    times = measure({'mm': lambda: a @ b}, device, repeats=repeats)['mm']
    return 2 * size ** 3 / median(times) / 1e9


def cpu_model_name() -> str:
    with contextlib.suppress(OSError):
        with open('/proc/cpuinfo') as f:
            for line in f:
                if line.startswith('model name'):
                    return line.split(':', 1)[1].strip()
    return platform.processor() or 'unknown'


def machine_info(device: torch.device) -> dict:
    """What the numbers were measured on."""
    info = {
        'device': str(device), 'cpu': cpu_model_name(), 'cpu_count': os.cpu_count(),
        'torch_threads': torch.get_num_threads(), 'torch': torch.__version__, 'python': platform.python_version(),
        'platform': platform.platform(), 'time': time.strftime('%Y-%m-%d %H:%M:%S'),
    }
    if device.type == 'cuda':
        info['gpu'] = torch.cuda.get_device_name(device)
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        info['git_commit'] = subprocess.run(['git', 'rev-parse', '--short', 'HEAD'], capture_output=True, text=True,
                                            cwd=os.path.dirname(os.path.abspath(__file__)), timeout=5).stdout.strip()
    return info


def write_json(path: Optional[str], payload: dict) -> None:
    if path:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with open(path, 'w') as f:
            json.dump(payload, f, indent=1)
        sys.stdout.write(f'wrote {path}\n')


def _mallopt(*settings) -> bool:
    name = ctypes.util.find_library('c')
    if not name or platform.system() != 'Linux':
        return False
    try:
        libc = ctypes.CDLL(name)
        return all(bool(libc.mallopt(option, value)) for option, value in settings)
    except (OSError, AttributeError):
        return False


def exact_cpu_memory_accounting() -> bool:
    """Serve every allocation above 128 KiB with mmap and unmap it when freed (glibc's default
    threshold, but fixed: glibc otherwise raises it after the first large free), so the resident
    set follows live tensors and :func:`peak_memory_mb` measures a warm call's true peak."""
    m_mmap_threshold = -3
    return _mallopt((m_mmap_threshold, 128 * 1024))


def tune_cpu_allocator() -> bool:
    """Keep large freed blocks inside glibc's heap instead of returning them to the OS.

    By default glibc serves big allocations with mmap and gives trimmed memory back, so every
    large activation of a CPU forward pass is page-faulted in (and zeroed) again. Disabling mmap
    and raising the trim threshold makes malloc reuse the blocks, as jemalloc/tcmalloc would.
    Returns False (and changes nothing) where glibc's ``mallopt`` is not available.
    """
    m_trim_threshold, m_mmap_max = -1, -4
    return _mallopt((m_mmap_max, 0), (m_trim_threshold, 2 ** 31 - 1))


# ---------------------------------------------------------------------------------------------
# Whole-model probes (bench/models.py and main.py --throughput)
# ---------------------------------------------------------------------------------------------

def prepare_model(model: torch.nn.Module, device: torch.device, channels_last: bool = False,
                  compile: bool = False) -> torch.nn.Module:
    """Move `model` to `device`, optionally in channels_last layout and wrapped in torch.compile."""
    model = model.to(device)
    if channels_last:
        model = model.to(memory_format=torch.channels_last)
    if compile:
        model = torch.compile(model)
    return model


def random_images(batch_size: int, img_size: int, device: torch.device, channels_last: bool = False,
                  in_chans: int = 3) -> torch.Tensor:
    images = torch.randn(batch_size, in_chans, img_size, img_size, device=device)
    return images.contiguous(memory_format=torch.channels_last) if channels_last else images


def inference_step(model: torch.nn.Module, images: torch.Tensor,
                   autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
                   ) -> Callable[[], object]:
    """A closure running one inference forward pass (eval mode, no autograd)."""
    model.eval()

    def step():
        with torch.inference_mode(), autocast():
            return model(images)
    return step


def training_step(model: torch.nn.Module, images: torch.Tensor, num_classes: int,
                  autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                  optimizer_impl: str = 'fused') -> Callable[[], object]:
    """A closure running one training iteration: forward, cross-entropy, backward, AdamW step (run by
    the ``TRAIN.OPTIMIZER.IMPL`` implementation `optimizer_impl`, the recipe's by default)."""
    model.train()
    targets = torch.randint(0, num_classes, (images.shape[0],), device=images.device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-6, **IMPLEMENTATIONS[optimizer_impl])
    criterion = torch.nn.CrossEntropyLoss()

    def step():
        with autocast():
            loss = criterion(model(images), targets)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss
    return step


def linear_layers_seconds(model: torch.nn.Module, images: torch.Tensor,
                          autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
                          repeats: int = 5) -> Tuple[float, int]:
    """(seconds, MACs) of one inference batch's ``nn.Linear`` calls, each timed alone at its shape.

    The seconds are the sum over calls of the median time of that layer on a random input of the
    shape it saw in the model's forward pass: how long the batch would take if everything but the
    linear layers (norms, activations, attention cores, reshapes) cost nothing. `model` must be
    eager (forward hooks see its layers).
    """
    shapes = []
    hooks = [m.register_forward_hook(lambda mod, args, out: shapes.append((mod, args[0].shape)))
             for m in model.modules() if isinstance(m, torch.nn.Linear)]
    try:
        inference_step(model, images, autocast)()
    finally:
        for hook in hooks:
            hook.remove()
    calls, macs = {}, 0
    for i, (layer, shape) in enumerate(shapes):
        x = torch.randn(shape, device=images.device)

        def call(layer=layer, x=x):
            with torch.inference_mode(), autocast():
                return layer(x)
        calls[str(i)] = call
        macs += math.prod(shape[:-1]) * layer.in_features * layer.out_features
    times = measure(calls, images.device, repeats=repeats, warmup=1, min_repeat_s=0.05)
    return sum(median(t) for t in times.values()), macs
