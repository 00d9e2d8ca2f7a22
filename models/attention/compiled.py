"""The compiled path of focused linear attention (``--compile-core``): the fused forward of
:mod:`.fused` as one ``torch.compile`` graph per input shape, and the DWC's weight gradient.

Why: inductor fuses the element-wise chains of φ_p (:mod:`.focused`), of their recomputation and of
the backward it derives into a few loops, which the eager chunks cannot do. In training, selective
activation checkpointing inside the graph keeps, besides its inputs, only per-token norms and
per-head summaries (:func:`_keep_small_results`); calls without gradients (evaluation, inference)
run a forward-only graph of the same ops. The DWC's weight gradient, oneDNN's slow part of the
DWC backward, is compiled too (:class:`_DepthwiseConv`). Calls under saved-tensor hooks (grad
checkpointing) keep the eager path, and a compiler that fails warns once and the eager path takes
over. Figures: docs/numerics.md, "Fused and compiled paths".
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F
import torch.utils.checkpoint

from .fused import _plain_fused

__all__ = ['compiled_focused_core', 'compiled_focused_inference', 'compiled_dwc_weight_grad']


def _saved_tensor_hooks() -> bool:
    """Whether saved-tensor hooks are active (activation checkpointing: TRAIN.USE_CHECKPOINT). The
    compiled paths stay off there: a checkpoint's recomputation must run the code its forward ran,
    which a compiled graph with its own checkpoint cannot promise."""
    return torch._C._autograd._top_saved_tensors_default_hooks(False) is not None


def _compilable(dwc: nn.Conv2d) -> bool:
    """The DWC shape :class:`_DepthwiseConv` handles: stride 1, zero padding k//2, square kernel."""
    k = dwc.kernel_size[0]
    return (dwc.kernel_size == (k, k)) and (dwc.stride == (1, 1)) and (dwc.padding == (k // 2, k // 2)) \
        and (dwc.dilation == (1, 1)) and (dwc.padding_mode == 'zeros') and (dwc.bias is not None)


def _keep_small_results(ctx, func, *args, **kwargs) -> torch.utils.checkpoint.CheckpointPolicy:
    """Selective-checkpoint policy of the compiled core: save the per-token norms and the matmuls whose
    result is much smaller than their inputs (the per-head key summaries S, a sum over tokens), recompute
    the rest. The backward then recomputes only element-wise chains and the query-side product, not the
    key side's product, for a few per cent more saved memory (docs/numerics.md, "Fused and compiled
    paths")."""
    policy = torch.utils.checkpoint.CheckpointPolicy
    if func is torch.ops.aten.linalg_vector_norm.default:
        return policy.MUST_SAVE
    if func is torch.ops.aten.bmm.default:
        a, b = args[0], args[1]
        if 4 * a.shape[0] * a.shape[1] * b.shape[2] < max(a.numel(), b.numel()):
            return policy.MUST_SAVE
    return policy.PREFER_RECOMPUTE


def _recomputed_fused(*args) -> torch.Tensor:
    """:func:`_plain_fused` under non-reentrant selective activation checkpointing: the compiled graph
    saves its inputs and the small results of :func:`_keep_small_results`, and recomputes the (B, N, C)
    intermediates in its backward, as the eager path does. Left to itself, inductor's partitioner keeps
    (B, N, C) intermediates, and FLatten-Swin-T's training step peaks above Swin-T's (docs/numerics.md,
    "Fused and compiled paths")."""
    context = functools.partial(torch.utils.checkpoint.create_selective_checkpoint_contexts, _keep_small_results)
    return torch.utils.checkpoint.checkpoint(_plain_fused, *args, use_reentrant=False, context_fn=context)


class _CompiledCore:
    """`function` under ``torch.compile``, built on first use, one graph per input shape
    (``dynamic=False``: a stage's shape is fixed during training, and static kernels are the fastest).

    The first call first compiles and runs `probe`, if given (a forward and backward on a tiny input
    of the same device and dtype: the backward graph is compiled lazily, inside ``loss.backward()``,
    where a failure could not fall back; a forward-only function needs none). If that probe or a
    later compiled call raises, the error is reported once as a RuntimeWarning and every later call
    returns None, so that callers use the eager path (which raises again if the inputs themselves
    are at fault). Calls with inputs of a new layout (shape, strides, dtype, device) once
    ``MAX_LAYOUTS`` have been compiled also return None: past its recompile limit (8 graphs per
    function, one of them the probe's) torch.compile would run the function's ops eagerly, and the
    unchunked ops hold whole (B, N, C) intermediates where the eager fused path works in chunks
    (a detector fed many input sizes, say).
    """
    MAX_LAYOUTS = 6

    def __init__(self, function, probe: Optional[Callable], what: str):
        self.target, self.probe, self.what = function, probe, what
        self.function = None
        self.failed: Optional[str] = None
        self.layouts = set()

    def __call__(self, *args) -> Optional[torch.Tensor]:
        if self.failed is not None:
            return None
        layout = tuple((tuple(a.shape), a.stride(), a.dtype, a.device, a.requires_grad)
                       if isinstance(a, torch.Tensor) else a for a in args)
        if layout not in self.layouts:
            if len(self.layouts) >= self.MAX_LAYOUTS:
                return None
            self.layouts.add(layout)
        if self.function is None:
            self.function = torch.compile(self.target, dynamic=False)
            if (self.probe is not None) and (self._guarded(self.probe, self.function, *args) is None):
                return None
        return self._guarded(self.function, *args)

    def _guarded(self, function, *args):
        try:
            return function(*args)
        except Exception as error:  # any compiler failure: the eager path is always correct
            self.failed = f'{type(error).__name__}: {error}'.splitlines()[0]
            warnings.warn(f'the compiled {self.what} failed ({self.failed}); the eager path is used instead',
                          RuntimeWarning, stacklevel=4)
            return None


def _probe_core(function, q, k, v, scale, positional_encoding, num_heads, focusing_factor) -> bool:
    q, k, v, pe = (torch.randn(1, 4, 4, dtype=q.dtype, device=q.device, requires_grad=True) for _ in range(4))
    scale = torch.zeros(1, 1, 4, dtype=q.dtype, device=q.device, requires_grad=True)
    function(q, k, v, scale, pe, 1, focusing_factor).sum().backward()
    return True


compiled_focused_core = _CompiledCore(_recomputed_fused, _probe_core, 'focused core')
# Without gradients: the same ops, forward only, nothing to checkpoint. One graph per shape, as in
# training: an evaluation loop compiles its full batches and its last, shorter one (seconds each per
# stage on CPU), up to _CompiledCore.MAX_LAYOUTS layouts.
compiled_focused_inference = _CompiledCore(_plain_fused, None, 'focused core (inference)')


def _dwc_weight_grad(image: torch.Tensor, grad: torch.Tensor, kernel_size: int) -> torch.Tensor:
    """The weight gradient of a stride-1 depthwise conv with zero padding k//2, as plain ops (compiled
    by :data:`compiled_dwc_weight_grad`): ``Σ_{b,y,x} grad[b,c,y,x] · image_pad[b,c,y+i,x+j]`` for each
    tap (i, j), on the channels-last views. image, grad: (B, C, H, W); returns (C, 1, k, k).

    Each tap is first summed over batch and columns only, per row y; the k² × (H, C) row sums are then
    added up. Inductor's loop then walks the rows once for all taps, with the few input rows a row needs
    in cache, instead of streaming both tensors once per tap; the shorter sums are also closer to the
    float64 gradient than oneDNN's. The image is first copied to a dense channels-last tensor: in the
    model it is a view of V inside the qkv projection's output (every third run of C floats), which
    inductor's loop reads slower than the copy costs. Figures: docs/numerics.md, "Fused and compiled
    paths"."""
    pad = kernel_size // 2
    image = image.contiguous(memory_format=torch.channels_last)
    x = F.pad(image.permute(0, 2, 3, 1), (0, 0, pad, pad, pad, pad))
    g = grad.permute(0, 2, 3, 1)
    H, W = g.shape[1:3]
    rows = [(g * x[:, i:i + H, j:j + W]).sum((0, 2)) for i in range(kernel_size) for j in range(kernel_size)]
    return torch.stack(rows, dim=-1).sum(0).view(-1, 1, kernel_size, kernel_size)


def _probe_dwc_weight_grad(function, image, grad, kernel_size) -> bool:
    x = torch.randn(1, 2, 4, 4, dtype=image.dtype, device=image.device)
    function(x, x, kernel_size)
    return True


compiled_dwc_weight_grad = _CompiledCore(_dwc_weight_grad, _probe_dwc_weight_grad, 'DWC weight gradient')


class _DepthwiseConv(torch.autograd.Function):
    """``F.conv2d(image, weight, bias, padding=k//2, groups=C)`` whose weight gradient is
    :func:`_dwc_weight_grad` compiled: oneDNN's depthwise weight gradient on a channels-last input is
    the slow part of the DWC's backward (docs/numerics.md, "Fused and compiled paths"), so its input
    gradient and the bias sum stay as they are. Falls back to oneDNN's weight gradient if the compiler
    fails."""

    @staticmethod
    def forward(ctx, image, weight, bias):
        ctx.save_for_backward(image, weight)
        return F.conv2d(image, weight, bias, padding=weight.shape[-1] // 2, groups=image.shape[1])

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad):
        image, weight = ctx.saved_tensors
        C, pad = image.shape[1], weight.shape[-1] // 2
        compiled = compiled_dwc_weight_grad(image, grad, weight.shape[-1])
        grad_image, onednn_weight, _ = torch.ops.aten.convolution_backward(
            grad, image, weight, None, [1, 1], [pad, pad], [1, 1], False, [0, 0], C, [True, compiled is None, False])
        return grad_image, onednn_weight if compiled is None else compiled, grad.sum((0, 2, 3))

