"""The compiled focused core and DWC weight gradient (--compile-core): same numbers as the eager
fused path, the same saved activations, the eager path wherever compiling cannot be trusted, and a
warning instead of a crash when the compiler fails. Tests that compile are ``slow`` (about 5-15 s
per input shape on CPU)."""
from __future__ import annotations

import copy
import re
import warnings

import pytest
import timm
import torch
from conftest import run_main

import models  # noqa: F401  (registers the variants)
from models.attention import compiled as compiled_path
from models.attention import core, set_compiled_core
from models.attention import focused as focused_path
from models.attention import fused as fused_path


def _inputs(B: int, N: int, C: int, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, N, C, generator=gen).requires_grad_() for _ in range(3))
    scale = (0.5 * torch.randn(1, 1, C, generator=gen)).requires_grad_()
    pe = (0.1 * torch.randn(1, N, C, generator=gen)).requires_grad_()
    return [q, k, v, scale, pe]


def _broken_compile(function, **kwargs):
    """A stand-in for torch.compile on a machine without a working C++ toolchain."""
    def run(*args):
        raise RuntimeError('InvalidCxxCompiler: no working C++ compiler found')
    return run


@pytest.mark.slow
@pytest.mark.parametrize('B,N,C,heads', [(2, 49, 24, 3), (3, 16, 16, 2)])
def test_compiled_core_matches_eager(B, N, C, heads):
    """Output and the gradients of all five inputs equal the eager fused path's, and the compiled
    graph saves its inputs and only small results besides (so training memory stays that of the eager path)."""
    inputs = _inputs(B, N, C)
    grad = torch.randn(B, N, C)
    eager = core.focused_linear_attention(*inputs, heads, 3)
    compiled = core.focused_linear_attention(*inputs, heads, 3, compiled=True)
    assert type(compiled.grad_fn).__name__ == 'CompiledFunctionBackward', compiled_path.compiled_focused_core.failed
    torch.testing.assert_close(compiled, eager, rtol=1e-5, atol=1e-6)
    # the inputs, then only per-token norms (B, N, 1) and per-head summaries (B·h, d, d+1): no (B, N, C)
    # intermediate, so training memory stays that of the eager path
    saved = [tuple(t.shape) for t in compiled.grad_fn.saved_tensors]
    d = C // heads
    assert saved[:5] == [tuple(t.shape) for t in inputs], saved
    assert set(saved[5:]) <= {(B, N, 1), (B * heads, d, d + 1)}, saved
    # the summary is kept where it is much smaller than the key-side operands (N > 4d tokens)
    assert ((B * heads, d, d + 1) in saved[5:]) == (N > 4 * d), saved
    for name, a, b in zip('q k v scale pe'.split(), torch.autograd.grad(compiled, inputs, grad),
                          torch.autograd.grad(eager, inputs, grad), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=lambda m, name=name: f'grad {name}: {m}')


@pytest.mark.slow
@pytest.mark.parametrize('B,H,C,heads,kernel', [(2, 7, 24, 3, 5), (1, 5, 8, 2, 3)])
def test_compiled_dwc_weight_gradient_matches_eager(B, H, C, heads, kernel):
    """The DWC with its weight gradient compiled: the same output and input gradient bit for bit
    (oneDNN computes both), and the weight and bias gradients of the eager conv to float rounding."""
    dwc = focused_path.make_dwc(C // heads, kernel)
    v = torch.randn(B, H * H, C, requires_grad=True)
    grad = torch.randn(B, H * H, C)
    eager = core.rank_restore_dwc(dwc, v, heads, (H, H))
    compiled = core.rank_restore_dwc(dwc, v, heads, (H, H), compiled=True)
    assert torch.equal(compiled, eager)
    expected = torch.autograd.grad(eager, [v, dwc.weight, dwc.bias], grad)
    got = torch.autograd.grad(compiled, [v, dwc.weight, dwc.bias], grad)
    assert compiled_path.compiled_dwc_weight_grad.failed is None
    assert torch.equal(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[2], expected[2], rtol=1e-5, atol=1e-5)


def test_dwc_weight_gradient_falls_back_when_the_compiler_fails(monkeypatch):
    monkeypatch.setattr(compiled_path, 'compiled_dwc_weight_grad', compiled_path._CompiledCore(
        compiled_path._dwc_weight_grad, compiled_path._probe_dwc_weight_grad, 'DWC weight gradient'))
    monkeypatch.setattr(torch, 'compile', _broken_compile)
    dwc = focused_path.make_dwc(8, 5)
    v = torch.randn(2, 36, 24, requires_grad=True)
    grad = torch.randn(2, 36, 24)
    expected = torch.autograd.grad(core.rank_restore_dwc(dwc, v, 3, (6, 6)), [v, dwc.weight, dwc.bias], grad)
    with pytest.warns(RuntimeWarning, match='compiled DWC weight gradient failed .*no working C\\+\\+ compiler'):
        got = torch.autograd.grad(core.rank_restore_dwc(dwc, v, 3, (6, 6), compiled=True),
                                  [v, dwc.weight, dwc.bias], grad)
    # input and weight gradients: oneDNN's on both paths; the bias gradient is a differently ordered float32
    # sum (grad.sum against oneDNN's), equal to float rounding as in test_compiled_dwc_weight_gradient_matches_eager
    assert torch.equal(got[0], expected[0]) and torch.equal(got[1], expected[1])
    torch.testing.assert_close(got[2], expected[2], rtol=1e-5, atol=1e-5)


@pytest.mark.slow
def test_compiled_core_without_gradients_runs_a_forward_graph():
    """Evaluation and inference with compiled=True run a forward-only graph (the training graph is not
    touched): the eager fused path's output to float rounding, computed in float32 also for the
    bfloat16 q, k, v that autocast hands it."""
    from torch._dynamo.utils import counters
    inputs = [t.detach() for t in _inputs(3, 53, 24)]  # a shape no other test compiles: a new graph
    training_function = compiled_path.compiled_focused_core.function
    graphs = counters['stats']['unique_graphs']
    with torch.inference_mode():
        out = core.focused_linear_attention(*inputs, 3, 3, compiled=True)
        eager = core.focused_linear_attention(*inputs, 3, 3)
    assert compiled_path.compiled_focused_inference.failed is None
    assert counters['stats']['unique_graphs'] == graphs + 1  # compiled, not run eagerly
    assert compiled_path.compiled_focused_core.function is training_function
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)
    q, k, v = (t.bfloat16() for t in inputs[:3])
    with torch.no_grad():
        out = core.focused_linear_attention(q, k, v, *inputs[3:], 3, 3, compiled=True)
        eager = core.focused_linear_attention(q.float(), k.float(), v.float(), *inputs[3:], 3, 3)
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, eager, rtol=1e-5, atol=1e-6)


def test_inference_compiler_failure_warns_and_falls_back(monkeypatch):
    """Without gradients a failing compiler costs one RuntimeWarning too, and the eager result, bit for bit."""
    monkeypatch.setattr(compiled_path, 'compiled_focused_inference', compiled_path._CompiledCore(
        fused_path._plain_fused, None, 'focused core (inference)'))
    monkeypatch.setattr(torch, 'compile', _broken_compile)
    inputs = [t.detach() for t in _inputs(2, 16, 16)]
    eager = core.focused_linear_attention(*inputs, 2, 3)
    with pytest.warns(RuntimeWarning, match=r'compiled focused core \(inference\) failed .*no working C\+\+ compiler'):
        first = core.focused_linear_attention(*inputs, 2, 3, compiled=True)
    assert torch.equal(first, eager)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        assert torch.equal(core.focused_linear_attention(*inputs, 2, 3, compiled=True), eager)


def test_compiled_core_stops_compiling_new_layouts_at_its_limit(monkeypatch):
    """Past MAX_LAYOUTS input layouts a compiled core returns None (the caller's eager fused path runs)
    instead of letting torch.compile hit its recompile limit and run the unchunked ops; layouts it
    already compiled keep their graphs."""
    monkeypatch.setattr(torch, 'compile', lambda function, **kwargs: function)  # count calls, compile nothing
    calls = []
    compiled = compiled_path._CompiledCore(lambda x, heads: calls.append(x.shape) or x, None, 'test core')
    compiled.MAX_LAYOUTS = 2
    a, b, c = torch.zeros(1, 4, 8), torch.zeros(2, 4, 8), torch.zeros(3, 4, 8)
    assert compiled(a, 2) is a and compiled(b, 2) is b
    assert compiled(c, 2) is None and compiled(torch.zeros(1, 8, 8)[:, ::2], 2) is None  # a new shape; new strides
    assert compiled(a, 3) is None  # a new non-tensor argument
    assert compiled(a, 2) is a and compiled(b.clone(), 2) is not None  # known layouts still compiled
    assert calls == [a.shape, b.shape, a.shape, b.shape] and compiled.failed is None


def test_compiled_core_not_used_under_saved_tensor_hooks():
    """Under activation checkpointing (saved-tensor hooks) the eager autograd function runs: its
    recomputation must run the code its forward ran."""
    inputs = _inputs(2, 16, 16)
    with torch.autograd.graph.saved_tensors_hooks(lambda t: t, lambda t: t):
        out = core.focused_linear_attention(*inputs, 2, 3, compiled=True)
    assert type(out.grad_fn).__name__ == '_FusedFocusedLinearAttentionBackward'


def test_compiler_failure_warns_once_and_falls_back(monkeypatch):
    """A compiler that raises (here: a stand-in for a missing C++ toolchain) costs one RuntimeWarning
    naming the error; that call and every later one return the eager result."""
    monkeypatch.setattr(compiled_path, 'compiled_focused_core', compiled_path._CompiledCore(
        compiled_path._recomputed_fused, compiled_path._probe_core, 'focused core'))
    monkeypatch.setattr(torch, 'compile', _broken_compile)
    inputs = _inputs(2, 16, 16)
    eager = core.focused_linear_attention(*inputs, 2, 3)
    with pytest.warns(RuntimeWarning, match='compiled focused core failed .*no working C\\+\\+ compiler'):
        first = core.focused_linear_attention(*inputs, 2, 3, compiled=True)
    assert type(first.grad_fn).__name__ == '_FusedFocusedLinearAttentionBackward'
    torch.testing.assert_close(first, eager, rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter('error')
        second = core.focused_linear_attention(*inputs, 2, 3, compiled=True)
    torch.testing.assert_close(second, eager, rtol=0, atol=0)
    assert 'no working C++ compiler' in compiled_path.compiled_focused_core.failed


def test_set_compiled_core_switches_focused_modules_only():
    flatten = timm.create_model('flatten_swin_tiny_patch4_224', img_size=64, num_classes=5)
    assert set_compiled_core(flatten) == 4  # the four L blocks of stages 1-2; the S blocks have no focused core
    focused = [m for m in flatten.modules() if getattr(m, 'has_compiled_core', False)]
    assert len(focused) == 4 and all(m.compiled_core for m in focused)
    assert set_compiled_core(flatten, False) == 4 and not any(m.compiled_core for m in focused)
    swin = timm.create_model('softmax_swin_tiny_patch4_window7_224', img_size=64, num_classes=5)
    assert set_compiled_core(swin) == 0


@pytest.mark.slow
def test_compiled_core_model_gradients_match_eager():
    """A whole FLatten-Swin-T (64², train mode) with compiled cores: the loss and every parameter
    gradient equal the eager model's. Under grad checkpointing the eager core runs: the gradients are
    those of the checkpointed eager model, bit for bit."""
    torch.manual_seed(0)
    eager = timm.create_model('flatten_swin_tiny_patch4_224', img_size=64, num_classes=5, drop_path_rate=0.).train()
    compiled = copy.deepcopy(eager)
    set_compiled_core(compiled)
    images = torch.randn(2, 3, 64, 64)
    eager(images).square().mean().backward()
    compiled(images).square().mean().backward()
    assert compiled_path.compiled_focused_core.failed is None
    for (name, a), b in zip(eager.named_parameters(), compiled.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6, msg=lambda m, name=name: f'{name}: {m}')
    reference, checkpointed = copy.deepcopy(eager), copy.deepcopy(compiled)
    for model in (reference, checkpointed):
        model.zero_grad()
        model.set_grad_checkpointing(True)
        model(images).square().mean().backward()
    for (name, a), b in zip(reference.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=0, msg=lambda m, name=name: f'{name}: {m}')


@pytest.mark.slow
def test_compile_core_cli(tmp_path, image_folder, micro_cfg):
    """main.py --compile-core trains and evaluates the micro config, says how many cores it compiles and
    saves the key."""
    out = tmp_path / 'out'
    result = run_main(['--cfg', micro_cfg, '--data-path', image_folder, '--output', out, '--compile-core',
                       '--opts', 'TRAIN.EPOCHS', '1'], threads=None, fresh_process=True)
    assert result.returncode == 0, result.stdout + result.stderr
    assert re.search(r'--compile-core: [1-9]\d* focused-attention modules compile their core', result.stdout)
    assert not re.search(r'the compiled .* failed', result.stdout + result.stderr)  # training and evaluation graphs
    config = next(out.rglob('config.yaml')).read_text()
    assert 'COMPILE_CORE: true' in config
