"""One-command GPU suite: CUDA correctness smoke checks, then FLatten-vs-softmax throughput, in about 5 minutes.

    python -m bench.gpu_suite --json bench/results/gpu_suite.json
    python -m bench.gpu_suite --models swin --batch 128 --repeats 5 --warmup 2 --no-compile
    python -m bench.gpu_suite --micro --no-compile --device cpu          # tiny models, seconds (tests)

Part 1, checks (each a row: name, passed, detail with the measured figure). Comparisons report the
largest absolute difference ``max|a - b|`` and pass when it is at most ``tol · max|ref|`` (relative to
the tensor's own scale: logits at initialisation are ~0.1, a gradient summed over every token ~10);
float32 comparisons run with TF32 off, so that what is left is float32 rounding (~1e-7 relative,
measured on the micro models):

* ``fused_vs_reference/core``: :func:`models.attention.core.focused_linear_attention`, fused (chunked,
  hand-written backward) vs the reference, float32, output and the gradients of q, k, v, the
  temperature and the positional encoding, at FLatten-Swin-T's stage-1 shape (3136 tokens of 96
  channels, several chunks); tol 1e-4: float32 rounding over a 3136-key sum stays near 1e-6, an
  output 1% off fails;
* ``fused_vs_reference/<pair>``: the whole FLatten model (every attention module switched with
  ``set_fused_attention``), eval, float32: logits and the input-image gradient, tol 1e-4. At
  initialisation the attention branches add little to the residual stream, so this one catches
  slips of ~10% in the core (the core check is the sharp one) and any in the DWC and layout code;
* ``autocast_bf16/<pair>``, ``autocast_fp16/<pair>``: eval forward of the FLatten model under autocast,
  logits and cross-entropy loss finite;
* ``fp16_train_step/<pair>``: fp16 autocast, ``torch.amp.GradScaler`` and AdamW: loss finite, every
  gradient finite after ``unscale_``, the optimizer step taken and the parameters moved. A first
  iteration that overflows at the scaler's initial 2^16 is GradScaler's designed skip-and-halve,
  so up to 3 iterations are allowed (the detail reports how many were skipped);
* ``channels_last/<pair>``: model and input in channels_last vs contiguous, eval, float32, tol 1e-4;
* ``compile_vs_eager/<pair>`` (not with ``--no-compile``): ``torch.compile(model)`` vs eager, eval,
  float32, tol 1e-3 (inductor reorders and fuses reductions, and the compiled focused core runs
  unchunked; measured 2e-7 relative on the micro models on a CPU).

A check that fails or raises is recorded with passed=False and its error text, the suite goes on,
and the exit status is 1.

The pairs are ``--models`` (``swin``: FLatten-Swin-T vs Swin-T and ``deit``: FLatten-DeiT-T vs DeiT-T by
default; ``FLATTEN:BASELINE`` names any other pair). Part 2, throughput: each pair at 224², batch 64, bf16
autocast (``--dtypes``), inference (``inference_step``) and training (``training_step``: forward, loss, backward,
AdamW), eager then compiled. The two models of a pair are timed interleaved (utils/benchmark.py),
img/s = batch / median seconds per call, ``ratio`` = FLatten img/s / baseline img/s (above 1, FLatten
is faster). Compiled cases compile during their warm-up calls. Cases still to start once the run has
used ``--budget-s`` seconds are recorded as skipped (not failed); a case that raises is recorded with
its error and makes the exit status 1.

``--micro``: tiny two-stage Swin and two-block DeiT models at 32², batch 4, float32, 3 repeats (CPU, seconds);
it knows the ``swin`` and ``deit`` pairs only.
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import os
import sys
import time
import traceback
from typing import Callable, Dict, Iterator, List, Tuple

import torch
import torch.nn.functional as F

if __package__ in (None, ''):  # run as `python bench/x.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench import common  # noqa: E402
from models.attention import core, set_fused_attention  # noqa: E402
from models.attention import fused as fused_path  # noqa: E402
from utils.benchmark import (  # noqa: E402
    autocast_for,
    inference_step,
    machine_info,
    measure,
    median,
    prepare_model,
    random_images,
    synchronize,
    training_step,
    write_json,
)

PAIRS = ['swin', 'deit']  # FLatten-Swin-T vs Swin-T and FLatten-DeiT-T vs DeiT-T
MICRO_SWIN = dict(img_size=32, embed_dim=32, depths=(2, 2), num_heads=(2, 4), num_classes=10)
MICRO_DEIT = dict(img_size=32, patch_size=4, embed_dim=64, depth=2, num_heads=2, num_classes=10)
# (pair, side) -> constructor overrides of the micro models (--micro knows these pairs only)
MICRO_OVERRIDES: Dict[Tuple[str, str], dict] = {
    ('swin', 'flatten'): dict(MICRO_SWIN, window_size=8, softmax_window_size=4, attn_type='LS'),
    ('swin', 'baseline'): dict(MICRO_SWIN, window_size=4, softmax_window_size=4, attn_type='SS'),
    ('deit', 'flatten'): dict(MICRO_DEIT),
    ('deit', 'baseline'): dict(MICRO_DEIT),
}
MODES = ('inference', 'training')

FUSED_TOL = 1e-4
CHANNELS_LAST_TOL = 1e-4
COMPILE_TOL = 1e-3
FP16_TRAIN_TRIES = 3


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0], parents=[common.shared_arguments(
        PAIRS, pairs=True, dtypes=None, repeats=None, warmup=2, device=True)])
    parser.add_argument('--micro', action='store_true',
                        help='tiny models at 32², batch 4, 3 repeats, fp32 (not 64, 5, bf16): runs in seconds on a '
                             'CPU (tests; bf16 autocast on a CPU without native bf16 is 10-100x slower than float32)')
    parser.add_argument('--batch', type=int, default=None, help='throughput batch size (default 64, --micro 4)')
    parser.add_argument('--no-compile', dest='compile', action='store_false',
                        help='skip the torch.compile check and the compiled throughput cases')
    parser.add_argument('--budget-s', type=float, default=300.0,
                        help='throughput cases not started after this many seconds of the run are skipped')
    args = parser.parse_args(argv)
    args.models = list(dict.fromkeys(args.models))
    if args.micro:
        unknown = [pair for pair in args.models if (pair, 'flatten') not in MICRO_OVERRIDES]
        if unknown:
            parser.error(f'--micro has micro versions of {" and ".join(PAIRS)} only, not of {unknown[0]}')
    if args.batch is None:
        args.batch = 4 if args.micro else 64
    if args.repeats is None:
        args.repeats = 3 if args.micro else 5
    if args.dtypes is None:
        args.dtypes = ['fp32'] if args.micro else ['bf16']
    # the first warm-up call of a compiled model compiles it
    common.check_minimums(parser, args, batch=1, repeats=3, warmup=1)
    if args.budget_s < 0:
        parser.error('--budget-s must not be negative')
    return args


# ---------------------------------------------------------------------------------------------
# Models and helpers
# ---------------------------------------------------------------------------------------------

def build(pair: str, side: str, device: torch.device, micro: bool) -> torch.nn.Module:
    """One model of a pair, seeded, on `device` (the micro version with --micro)."""
    torch.manual_seed(0)
    overrides = MICRO_OVERRIDES[pair, side] if micro else {}
    return prepare_model(common.model_pair(pair).sides()[side].build(**overrides), device)


def label(pair: str, side: str) -> str:
    return common.model_pair(pair).sides()[side].label


def sizes(args) -> Tuple[int, int]:
    """(batch, image side) of the correctness checks."""
    return (4, 32) if args.micro else (8, 224)


@contextlib.contextmanager
def ieee_float32() -> Iterator[None]:
    """float32 matmuls and cuDNN convolutions without TF32 (restored on exit), so that float32
    comparisons see float32 rounding only."""
    matmul, conv = torch.backends.cuda.matmul, torch.backends.cudnn.conv
    saved = matmul.fp32_precision, conv.fp32_precision
    matmul.fp32_precision = conv.fp32_precision = 'ieee'
    try:
        yield
    finally:
        matmul.fp32_precision, conv.fp32_precision = saved


def max_abs(t: torch.Tensor) -> float:
    return t.detach().double().abs().max().item()


def compare(name: str, value: torch.Tensor, ref: torch.Tensor, tol: float) -> Tuple[bool, str]:
    """(``max|value - ref| <= tol · max|ref|``, a detail naming both figures)."""
    if value.shape != ref.shape:
        return False, f'{name}: shape {tuple(value.shape)} != {tuple(ref.shape)}'
    diff, scale = max_abs(value.double() - ref.double()), max_abs(ref)
    ok = diff <= tol * scale  # NaN compares False; an all-zero reference needs an exact match
    return ok, f'{name} max abs diff {diff:.2e} (ref max abs {scale:.2e})'


def combine(results: List[Tuple[bool, str]], tol: float) -> Tuple[bool, str]:
    return all(ok for ok, _ in results), '; '.join(text for _, text in results) + f'; tol {tol:g} x ref max abs'


def finite(t: torch.Tensor) -> bool:
    return bool(torch.isfinite(t).all())


def targets_for(model: torch.nn.Module, batch: int, device: torch.device) -> torch.Tensor:
    return torch.randint(0, model.num_classes, (batch,), device=device)


# ---------------------------------------------------------------------------------------------
# Part 1: correctness checks; each returns (passed, detail)
# ---------------------------------------------------------------------------------------------

def flatten_inputs(pair: str, args, device: torch.device, train: bool = False):
    """(FLatten model of `pair` in train or eval mode, a batch of random images, random targets)."""
    model = build(pair, 'flatten', device, args.micro).train(train)
    batch, img = sizes(args)
    return model, random_images(batch, img, device), targets_for(model, batch, device)


def check_fused_core(args, device: torch.device) -> Tuple[bool, str]:
    """The focused core, fused vs reference, float32: output and all five input gradients."""
    batch, tokens, channels, heads = (2, 3136, 96, 3) if args.micro else (4, 3136, 96, 3)
    g = torch.Generator().manual_seed(0)
    shapes = dict(q=(batch, tokens, channels), k=(batch, tokens, channels), v=(batch, tokens, channels),
                  scale=(1, 1, channels), pe=(1, tokens, channels))
    base = {name: torch.randn(shape, generator=g) for name, shape in shapes.items()}
    base['scale'], base['pe'] = 0.5 * base['scale'], 0.02 * base['pe']
    weights = torch.randn(batch, tokens, channels, generator=g).to(device)
    results = {}
    with ieee_float32():
        for fused in (False, True):
            inputs = {name: t.to(device).requires_grad_() for name, t in base.items()}
            out = core.focused_linear_attention(inputs['q'], inputs['k'], inputs['v'], inputs['scale'],
                                                inputs['pe'], heads, 3, fused=fused)
            grads = torch.autograd.grad((out * weights).sum(), list(inputs.values()))
            results[fused] = dict(out=out.detach(), **{f'd{n}': gr for n, gr in zip(inputs, grads, strict=True)})
    chunks = -(-tokens // fused_path._chunks(batch, tokens, channels)[1])
    ok, text = combine([compare(key, results[True][key], results[False][key], FUSED_TOL) for key in results[False]],
                       FUSED_TOL)
    return ok, f'({batch}, {tokens}, {channels}) x{heads} heads, {chunks} token chunks: {text}'


def check_fused_model(pair: str) -> Callable:
    def check(args, device: torch.device) -> Tuple[bool, str]:
        model, images, _ = flatten_inputs(pair, args, device)
        weights = None
        results = {}
        with ieee_float32():
            for fused in (False, True):
                switched = set_fused_attention(model, fused)
                x = images.clone().requires_grad_()
                out = model(x)
                if weights is None:
                    weights = torch.randn_like(out)
                (grad,) = torch.autograd.grad((out * weights).sum(), [x])
                results[fused] = dict(logits=out.detach(), dimage=grad)
        set_fused_attention(model, True)
        ok, text = combine([compare(k, results[True][k], results[False][k], FUSED_TOL) for k in results[False]],
                           FUSED_TOL)
        batch, _, img, _ = images.shape
        return ok, f'{label(pair, "flatten")}, {switched} attention modules, batch {batch} at {img}²: {text}'
    return check


def check_autocast(pair: str, dtype: str) -> Callable:
    def check(args, device: torch.device) -> Tuple[bool, str]:
        model, images, targets = flatten_inputs(pair, args, device)
        with torch.no_grad(), autocast_for(dtype, device)():
            logits = model(images)
            loss = F.cross_entropy(logits, targets)
        ok = finite(logits) and finite(loss)
        return ok, (f'{label(pair, "flatten")}: logits {str(logits.dtype).replace("torch.", "")} finite '
                    f'{finite(logits)} (max abs logit {max_abs(logits.float()):.3g}), loss {loss.item():.4f}')
    return check


def check_fp16_train_step(pair: str) -> Callable:
    def check(args, device: torch.device) -> Tuple[bool, str]:
        model, images, targets = flatten_inputs(pair, args, device, train=True)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scaler = torch.amp.GradScaler(device.type)
        autocast = autocast_for('fp16', device)
        skipped, losses = 0, []
        for _ in range(FP16_TRAIN_TRIES):
            optimizer.zero_grad(set_to_none=True)
            with autocast():
                loss = F.cross_entropy(model(images), targets)
            losses.append(loss.item())
            if not finite(loss):
                return False, f'loss {loss.item()} is not finite'
            scaler.scale(loss).backward()
            scaler.unscale_(optimizer)
            params = [p for p in model.parameters() if p.grad is not None]
            bad = [n for n, p in model.named_parameters() if p.grad is not None and not finite(p.grad)]
            before = [p.detach().clone() for p in params]
            nonzero = [bool(p.grad.abs().sum() > 0) for p in params]
            scale = scaler.get_scale()
            scaler.step(optimizer)
            scaler.update()
            if not bad:
                break
            skipped += 1
        else:
            return False, (f'every one of {FP16_TRAIN_TRIES} iterations had non-finite gradients after unscale_ '
                           f'(last: {len(bad)} of {len(params)}, e.g. {bad[:3]}); scale now {scaler.get_scale():g}')
        moved = [not torch.equal(b, p.detach()) for b, p in zip(before, params, strict=True)]
        stuck = sum(g and not m for g, m in zip(nonzero, moved, strict=True))  # a nonzero grad, yet unchanged
        ok = any(nonzero) and stuck == 0 and scaler.get_scale() >= scale
        return ok, (f'{label(pair, "flatten")}: loss {losses[-1]:.4f}, {len(params)} grads all finite after '
                    f'unscale_, step taken at scale {scale:g} after {skipped} skipped, {sum(moved)} of '
                    f'{len(params)} parameters moved ({sum(nonzero)} with a nonzero grad, {stuck} of them unmoved)')
    return check


def check_channels_last(pair: str) -> Callable:
    def check(args, device: torch.device) -> Tuple[bool, str]:
        model, images, _ = flatten_inputs(pair, args, device)
        last = prepare_model(copy.deepcopy(model), device, channels_last=True).eval()
        with ieee_float32(), torch.no_grad():
            ref = model(images)
            out = last(images.contiguous(memory_format=torch.channels_last))
        ok, text = compare('logits', out, ref, CHANNELS_LAST_TOL)
        return ok, f'{label(pair, "flatten")}: {text}; tol {CHANNELS_LAST_TOL:g} x ref max abs'
    return check


def check_compile(pair: str) -> Callable:
    def check(args, device: torch.device) -> Tuple[bool, str]:
        model, images, _ = flatten_inputs(pair, args, device)
        compiled = torch.compile(model, dynamic=False)
        with ieee_float32(), torch.no_grad():
            ref = model(images)
            start = time.perf_counter()
            out = compiled(images)
            synchronize(device)
            seconds = time.perf_counter() - start
        ok, text = compare('logits', out, ref, COMPILE_TOL)
        return ok, (f'{label(pair, "flatten")}: {text}; tol {COMPILE_TOL:g} x ref max abs; '
                    f'first compiled call {seconds:.1f} s')
    return check


def checks_to_run(args) -> Dict[str, Callable]:
    checks: Dict[str, Callable] = {'fused_vs_reference/core': check_fused_core}
    for pair in args.models:
        checks[f'fused_vs_reference/{pair}'] = check_fused_model(pair)
    for dtype in ('bf16', 'fp16'):
        for pair in args.models:
            checks[f'autocast_{dtype}/{pair}'] = check_autocast(pair, dtype)
    for pair in args.models:
        checks[f'fp16_train_step/{pair}'] = check_fp16_train_step(pair)
    for pair in args.models:
        checks[f'channels_last/{pair}'] = check_channels_last(pair)
    if args.compile:
        for pair in args.models:
            checks[f'compile_vs_eager/{pair}'] = check_compile(pair)
    return checks


def run_checks(args, device: torch.device) -> List[dict]:
    rows = []
    for name, check in checks_to_run(args).items():
        start = time.perf_counter()
        try:
            passed, detail = check(args, device)
        except Exception as err:  # noqa: BLE001 - recorded in the row; the suite goes on
            traceback.print_exc()
            passed, detail = False, common.error_text(err)
        finally:
            if device.type == 'cuda':
                torch.cuda.empty_cache()
        rows.append(dict(name=name, passed=bool(passed), detail=detail, seconds=time.perf_counter() - start))
        print(f'[check] {name}: {"PASS" if passed else "FAIL"} - {detail}', flush=True)
    return rows


# ---------------------------------------------------------------------------------------------
# Part 2: throughput
# ---------------------------------------------------------------------------------------------

def make_step(model: torch.nn.Module, mode: str, images: torch.Tensor, autocast) -> Callable[[], object]:
    if mode == 'inference':
        return inference_step(model, images, autocast)
    return training_step(model, images, model.num_classes, autocast)


def time_case(models: Dict[str, torch.nn.Module], mode: str, compiled: bool, dtype: str, args,
              device: torch.device) -> dict:
    """img/s of both models of a pair in one (mode, compiled) case, timed interleaved."""
    img = 32 if args.micro else 224
    images = random_images(args.batch, img, device)
    autocast = autocast_for(dtype, device)
    steps = {}
    for side, model in models.items():
        steps[side] = make_step(torch.compile(model, dynamic=False) if compiled else model, mode, images, autocast)
    times = measure(steps, device, repeats=args.repeats, warmup=args.warmup,
                    min_repeat_s=0.0 if args.micro else 0.3)
    row = {}
    for side, runs in times.items():
        row[f'{side}_img_s'] = args.batch / median(runs)
        row[f'{side}_runs'] = runs
    row['ratio'] = row['flatten_img_s'] / row['baseline_img_s']
    return row


def run_throughput(args, device: torch.device, start: float) -> List[dict]:
    variants = [False, True] if args.compile else [False]
    cases = [(compiled, dtype, pair, mode) for compiled in variants for dtype in args.dtypes for pair in args.models
             for mode in MODES]
    models: Dict[str, Dict[str, torch.nn.Module]] = {}
    rows = []
    for compiled, dtype, pair, mode in cases:
        specs = common.model_pair(pair)
        row = dict(pair=pair, label=specs.label, flatten_model=specs.flatten.name, baseline_model=specs.baseline.name,
                   mode=mode, compiled=compiled, dtype=dtype, batch=args.batch)
        elapsed = time.perf_counter() - start
        if elapsed > args.budget_s:
            row['skipped'] = f'time budget: {elapsed:.0f} s of {args.budget_s:g} s used'
            print(f'[throughput] {row["label"]} {mode} compiled={compiled}: skipped ({row["skipped"]})', flush=True)
            rows.append(row)
            continue
        print(f'[throughput] {row["label"]} {mode} compiled={compiled}: timing (interleaved, {args.repeats} '
              f'repeats)', flush=True)
        try:
            if pair not in models:
                models[pair] = {side: build(pair, side, device, args.micro) for side in common.SIDES}
            row.update(time_case(models[pair], mode, compiled, dtype, args, device))
        except Exception as err:  # noqa: BLE001 - the row carries the error text, the run goes on
            traceback.print_exc()
            row['error'] = common.error_text(err)
        finally:
            if device.type == 'cuda':
                torch.cuda.empty_cache()
        rows.append(row)
    return rows


# ---------------------------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------------------------

CHECK_COLUMNS = [('name', 'check'), ('passed', 'passed'), ('detail', 'detail')]
THROUGHPUT_COLUMNS = [('label', 'pair'), ('mode', 'mode'), ('compiled', 'compiled'), ('dtype', 'dtype'),
                      ('batch', 'batch', '{:d}'), ('flatten_img_s', 'FLatten img/s', '{:.1f}'),
                      ('baseline_img_s', 'baseline img/s', '{:.1f}'), ('ratio', 'ratio', '{:.2f}')]


def format_checks(rows: List[dict]) -> str:
    return common.format_table([dict(r, passed='yes' if r['passed'] else 'NO') for r in rows], CHECK_COLUMNS)


def format_throughput(rows: List[dict]) -> str:
    shown = []
    for r in rows:
        row = dict(r, compiled='yes' if r['compiled'] else 'no')
        if 'ratio' not in r:
            row['flatten_img_s'] = 'error' if 'error' in r else 'skipped'
        shown.append(row)
    lines = [common.format_table(shown, THROUGHPUT_COLUMNS)]
    for r in rows:
        if 'error' in r:
            lines.append(f"ERROR {r['label']} {r['mode']} compiled={r['compiled']}: {r['error']}")
    return '\n'.join(lines)


def failed(payload: dict) -> bool:
    return any(not r['passed'] for r in payload['checks']) or any('error' in r for r in payload['throughput'])


def main(argv=None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    device = common.pick_device(args.device)
    checks = run_checks(args, device)
    throughput = run_throughput(args, device, start)
    payload = dict(machine=machine_info(device), args=vars(args), checks=checks, throughput=throughput,
                   seconds=time.perf_counter() - start)
    print(format_checks(checks))
    print()
    print(format_throughput(throughput))
    print()
    print(f"{common.describe_machine(payload['machine'])}; img/s = batch / median of {args.repeats} interleaved "
          f"repeats after {args.warmup} warm-up + 1 calibration call; ratio = FLatten / baseline img/s; "
          f"elapsed {payload['seconds']:.1f} s")
    write_json(args.json, payload)
    return 1 if failed(payload) else 0


if __name__ == '__main__':
    sys.exit(main())
