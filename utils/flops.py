"""FLOP counting with ``torch.utils.flop_counter``, reported in GMACs (multiply-adds) like the paper.

The counter sees every matmul (linear layers, attention products, the linear-order KᵀV and Q(KᵀV)),
convolution (patch embeddings, the DWC, LePE) and fused attention kernel. Element-wise work
(norms, activations, the focusing power) is not counted, as in fvcore and the papers' tables.

With ``fake=True`` the forward runs on fake tensors (shapes, no data): a segmentor at 512×2048 is counted
in seconds instead of a minute, to the same count as a real forward (`tests/test_model_table.py`). It
runs on a copy of the model, so that the size caches filled during the pass (resized position tables,
Swin's shifted-window masks) hold no fake tensors afterwards.
"""
from __future__ import annotations

import contextlib
import copy
from typing import Callable, ContextManager, Dict, Iterator, Tuple

import torch
import torch.nn as nn
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count

__all__ = ['count_macs', 'count_layer_macs']

# PyTorch registers the CUDA fused-attention kernels but not the CPU one that SDPA dispatches to here.
_CPU_SDPA = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if _CPU_SDPA not in flop_registry and _CPU_SDPA.default not in flop_registry:
    @register_flop_formula(_CPU_SDPA)
    def _cpu_sdpa_flop(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


@torch.no_grad()
def _forward(model: nn.Module, input_size: Tuple[int, int, int], batch_size: int,
             around: Callable[[nn.Module], ContextManager], fake: bool) -> None:
    """One eval forward on a batch of zeros inside ``around(module that runs)``: `model` itself, or with
    `fake` a copy of it on fake tensors."""
    if not fake:
        was_training = model.training
        model.eval()
        try:
            with around(model):
                model(torch.zeros(batch_size, *input_size, device=next(model.parameters()).device))
        finally:
            model.train(was_training)
        return
    copied = copy.deepcopy(model).eval()
    with FakeTensorMode(allow_non_fake_inputs=True):
        images = torch.zeros(batch_size, *input_size, device=next(copied.parameters()).device)
        with around(copied):
            copied(images)


def count_macs(model: nn.Module, input_size: Tuple[int, int, int], batch_size: int = 1,
               fake: bool = False) -> Tuple[float, Dict[str, float]]:
    """Multiply-adds of one inference forward pass per image: (total, {aten op: MACs}).

    `input_size` is (C, H, W); `fake`: count on fake tensors (for large inputs; slower than a real
    forward at 224²). The model is left as it was; nothing is printed.
    """
    # count the reference formulation of focused attention (the paper's operations), not the fused
    # path's: it reorders the same work (e.g. the normaliser as an extra KᵀV column) into other matmuls
    fused = {m: m.fused for m in model.modules() if isinstance(getattr(m, 'fused', None), bool)}
    counter = FlopCounterMode(display=False)
    try:
        for m in fused:
            m.fused = False
        _forward(model, input_size, batch_size, lambda module: counter, fake)
    finally:
        for m, flag in fused.items():
            m.fused = flag
    per_op = {str(op): flops / 2 / batch_size for op, flops in counter.get_flop_counts()['Global'].items()}
    return counter.get_total_flops() / 2 / batch_size, per_op


def count_layer_macs(model: nn.Module, input_size: Tuple[int, int, int], fake: bool = False) -> float:
    """Multiply-adds of the ``nn.Conv2d`` and ``nn.Linear`` layers alone, for one image of `input_size` (C, H, W)
    (`fake` as in :func:`count_macs`).

    This is the matmul work mmcv's ``get_model_complexity_info`` (mmseg's and mmdet's ``get_flops.py``)
    sees: it hooks modules, so the products of attention written as tensor operations (QKᵀ, AV, KᵀV,
    Q(KᵀV)) are missing from its totals. A conv is output elements × in/groups × kernel area, a transposed
    conv (Mask R-CNN's mask upsampling) input elements × out/groups × kernel area, a linear layer output
    elements × in_features, as mmcv counts them (its element-wise extras, norms and activations, are left
    out here as in :func:`count_macs`).
    """
    total = [0]

    def hook(module: nn.Module, inputs, output: torch.Tensor) -> None:
        if isinstance(module, nn.ConvTranspose2d):
            kernel = module.kernel_size[0] * module.kernel_size[1]
            total[0] += inputs[0].numel() * (module.out_channels // module.groups) * kernel
        elif isinstance(module, nn.Conv2d):
            kernel = module.kernel_size[0] * module.kernel_size[1]
            total[0] += output.numel() * (module.in_channels // module.groups) * kernel
        else:
            total[0] += output.numel() * module.in_features

    @contextlib.contextmanager
    def hooked(module: nn.Module) -> Iterator[None]:
        layers = (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)
        handles = [m.register_forward_hook(hook) for m in module.modules() if isinstance(m, layers)]
        try:
            yield
        finally:
            for handle in handles:
                handle.remove()

    _forward(model, input_size, 1, hooked, fake)
    return float(total[0])
