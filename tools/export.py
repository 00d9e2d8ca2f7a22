"""Export a classifier for deployment: an ONNX file or a ``torch.export`` program, parity-checked.

    python -m tools.export --model NAME | --cfg FILE [--checkpoint F] --format onnx|export OUT
                           [--static HxW] [--min-size S] [--max-size S]

By default the batch, height and width are dynamic: one file serves every batch size and every
input side between ``--min-size`` and ``--max-size`` (default 2048), square or not. The default
smallest side is twice the model's ``min_input_size`` (its total stride), so that the last map has
at least 2 tokens per side: torch.export treats a size of 1 as a special case. The size-dependent
parts (positional encodings resized to the token map, the PVT value resampling, Swin's padded and
shifted windows, CSwin's padded stripes) are traced in a form without size comparisons
(models/grid.py, ``symbolic``), so every family exports at dynamic sizes; ``--static HxW`` exports at
one size (the batch stays dynamic). docs/export.md.

After writing OUT, the export is checked against the eager PyTorch model on random batches of 2 at
the build size, at 64 pixels more per side and at a non-square size (224² -> 224², 288², 256×352;
``--static``: that size; ``--check-sizes`` to choose): a table of the largest absolute and relative
differences is printed, and the exit status is 1 when one exceeds ``--tolerance`` (default 1e-4,
relative to the largest |logit|). ``onnx`` runs the check in onnxruntime (CPU), ``export`` runs
``torch.export.load(OUT).module()``.

Weights: ``--checkpoint`` takes one of our checkpoints or an official release (name its model with
``--model`` or ``--cfg``), as tools.export_weights reads them; without it the model is randomly
initialised (``--seed``). ONNX needs the optional export packages (``pip install -r
requirements-export.txt``: onnx, onnxscript, onnxruntime). Errors (unknown model, bad file, missing
package, a size the model cannot serve) are one line on stderr and exit status 2.
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

if __package__ in (None, ''):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch
import torch.fx.experimental._config  # backed_size_oblivious (trace)
import torch.nn as nn

from models.registry import create_model
from tools.common import TOOL_ERRORS
from tools.export_weights import load_weights, model_spec
from utils.checkpoint import torch_load
from utils.misc import parse_size

FORMATS = ('onnx', 'export')
# the packages the ONNX route needs, as requirements-export.txt installs them
ONNX_PACKAGES = ('onnx', 'onnxscript', 'onnxruntime')
# default check: relative to the largest |logit| of PyTorch's output
TOLERANCE = 1e-4


class ExportError(RuntimeError):
    """The export or its check could not be done (the message says why)."""


def require_onnx() -> None:
    """Raise ExportError naming the missing packages of the ONNX route and how to install them."""
    missing = [name for name in ONNX_PACKAGES if importlib.util.find_spec(name) is None]
    if missing:
        raise ExportError(f'--format onnx needs {", ".join(missing)} (not installed): '
                          f'pip install -r requirements-export.txt')


def build(model_name: Optional[str], cfg_path: Optional[str], checkpoint: Optional[str], seed: int = 0) -> nn.Module:
    """The model to export, in eval mode: `checkpoint`'s weights (tools.export_weights rules), or a
    random initialisation of the named variant / the config's model."""
    torch.manual_seed(seed)
    if checkpoint:
        ckpt = torch_load(checkpoint)
        name, overrides = model_spec(ckpt, checkpoint, model_name, cfg_path)
        return load_weights(ckpt, checkpoint, name, overrides)
    if model_name:
        return create_model(model_name).eval()  # an unknown name: the registry's UnknownModelError
    name, overrides = model_spec(None, cfg_path, cfg_path=cfg_path)
    return create_model(name, **overrides).eval()


def build_size(model: nn.Module) -> Tuple[int, int]:
    """The (H, W) the model was built for (its pretrained cfg's input size)."""
    return tuple(model.pretrained_cfg['input_size'][1:])


def default_check_sizes(model: nn.Module) -> List[Tuple[int, int]]:
    """The build size, about 1.25× it and a non-square size: 224² -> 224², 288², 256×352."""
    h, w = build_size(model)
    return [(h, w), (h + 64, w + 64), (h + 32, w + 128)]


def dynamic_shapes(min_size: Optional[int], max_size: Optional[int]):
    """torch.export's spec of the image argument: batch dynamic; height and width too, unless
    `min_size` is None (a static size)."""
    from torch.export import Dim
    spec = {0: Dim('batch', min=1, max=4096)}
    if min_size is not None:
        spec.update({2: Dim('height', min=min_size, max=max_size), 3: Dim('width', min=min_size, max=max_size)})
    return (spec,)


def trace(model: nn.Module, example: torch.Tensor, min_size: Optional[int],
          max_size: Optional[int]) -> torch.export.ExportedProgram:
    """``torch.export.export`` with dynamic batch, height and width (only the batch when `min_size`
    is None); ExportError when the model's code pins a dynamic size (the message names it)."""
    try:
        # sizes count as >= 2 where torch asks whether one is 1 (broadcasting, strides): a Swin stage of
        # one window per axis at some sizes must not pin the traced program to either case
        with torch.no_grad(), torch.fx.experimental._config.patch(backed_size_oblivious=True):
            return torch.export.export(model, (example,), dynamic_shapes=dynamic_shapes(min_size, max_size))
    except torch._dynamo.exc.UserError as err:  # a constraint violation: a size the code specialised
        reasons = [line.strip(' -') for line in str(err).splitlines() if line.startswith('  - ')]
        raise ExportError(f'torch.export could not keep the sizes dynamic for sides {min_size}..{max_size}: '
                          f'{"; ".join(reasons[:2]) or str(err).splitlines()[0]} (docs/export.md)') from err
    except Exception as err:  # torch's own failure inside the trace: name it, with the way out
        first = (str(err).strip().splitlines() or [''])[0]
        raise ExportError(f'torch.export failed ({type(err).__name__}: {first}); '
                          f'{"try --static HxW" if min_size is not None else "see docs/export.md"}') from err


def export_onnx(program: torch.export.ExportedProgram, out: str, opset: Optional[int]) -> int:
    """Write the ONNX graph of `program` to `out` with the dynamo exporter; returns the opset used."""
    onnx_program = torch.onnx.export(program, dynamo=True, opset_version=opset, verbose=False)
    onnx_program.save(out)
    return next(version for domain, version in onnx_program.model.opset_imports.items() if domain == '')


def runner(fmt: str, out: str):
    """A function image batch (numpy) -> logits (numpy) running the written file."""
    if fmt == 'onnx':
        import onnxruntime
        session = onnxruntime.InferenceSession(out, providers=['CPUExecutionProvider'])
        name = session.get_inputs()[0].name
        return lambda batch: session.run(None, {name: batch})[0]
    module = torch.export.load(out).module()

    def run(batch):
        with torch.no_grad():
            return module(torch.from_numpy(batch)).numpy()
    return run


def check(model: nn.Module, fmt: str, out: str, sizes: Sequence[Tuple[int, int]], batch: int = 2,
          seed: int = 0) -> List[Dict[str, float]]:
    """Run the written file and the eager model on the same random batch at each size; one row per
    size: largest absolute difference, and relative to the largest |logit|."""
    run = runner(fmt, out)
    generator = torch.Generator().manual_seed(seed)
    rows = []
    for h, w in sizes:
        x = torch.randn(batch, model.pretrained_cfg['input_size'][0], h, w, generator=generator)
        with torch.no_grad():
            ref = model(x)
        start = time.perf_counter()
        got = torch.from_numpy(run(x.numpy()))
        seconds = time.perf_counter() - start
        if got.shape != ref.shape:
            raise ExportError(f'{out}: output {tuple(got.shape)} at {batch}x{h}x{w}, PyTorch gives {tuple(ref.shape)}')
        diff = (got - ref).abs().max().item()
        rows.append(dict(height=h, width=w, batch=batch, max_abs=diff, max_rel=diff / ref.abs().max().item(),
                         seconds=seconds))
    return rows


def export(model: nn.Module, fmt: str, out: str, min_size: Optional[int] = None, max_size: int = 2048,
           opset: Optional[int] = None, static_size: Optional[Tuple[int, int]] = None) -> Dict[str, object]:
    """Trace `model` and write `out` as ONNX or a torch.export program (.pt2): at dynamic sizes, or at
    `static_size` (H, W) with only the batch dynamic; returns what was done (seconds, bytes, opset)."""
    if fmt not in FORMATS:
        raise ValueError(f'--format must be one of {FORMATS}, got {fmt!r}')
    if fmt == 'onnx':
        require_onnx()
    if static_size is None:
        min_size = 2 * model.min_input_size if min_size is None else min_size
        if not min_size <= max_size:
            raise ValueError(f'--min-size {min_size} is above --max-size {max_size}')
        if min_size < model.min_input_size:
            raise ValueError(f'--min-size {min_size} is below the model\'s smallest input, {model.min_input_size}')
        h, w = build_size(model)
        h, w = min(max(h, min_size), max_size), min(max(w, min_size), max_size)
    else:
        model.check_size(static_size)
        (h, w), min_size, max_size = static_size, None, None
    example = torch.randn(2, model.pretrained_cfg['input_size'][0], h, w)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    start = time.perf_counter()
    program = trace(model, example, min_size, max_size)
    info: Dict[str, object] = dict(format=fmt, min_size=min_size, max_size=max_size, size=(h, w))
    if fmt == 'onnx':
        info['opset'] = export_onnx(program, out, opset)
        import onnxruntime
        info['onnxruntime'] = onnxruntime.__version__
    else:
        torch.export.save(program, out)
    info['seconds'] = time.perf_counter() - start
    info['bytes'] = os.path.getsize(out)
    return info


def square_or_hw(text: str) -> Tuple[int, int]:
    return parse_size(text, square=True)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument('--model', default=None, metavar='NAME', help='registered model name (timm name)')
    which.add_argument('--cfg', default=None, metavar='FILE', help='config file naming the model')
    parser.add_argument('--checkpoint', default=None, metavar='F',
                        help='weights: our checkpoint, an official .pth or a model.safetensors (default: random)')
    parser.add_argument('--format', required=True, choices=FORMATS, help='onnx (.onnx) or export (torch.export .pt2)')
    parser.add_argument('out', metavar='OUT', help='file to write')
    parser.add_argument('--min-size', type=int, default=None,
                        help="smallest side served (default: twice the model's minimum input)")
    parser.add_argument('--max-size', type=int, default=2048, help='largest side served (default 2048)')
    parser.add_argument('--static', type=square_or_hw, default=None, metavar='HxW',
                        help='export at this one size (only the batch dynamic), e.g. 224 or 256x352')
    parser.add_argument('--opset', type=int, default=None, help="ONNX opset (default: the exporter's)")
    parser.add_argument('--check-sizes', type=square_or_hw, nargs='*', default=None, metavar='HxW',
                        help='sizes of the parity check (default: build, 1.25x, non-square); none to skip')
    parser.add_argument('--tolerance', type=float, default=TOLERANCE, help='largest relative difference accepted')
    parser.add_argument('--seed', type=int, default=0, help='seed of a random initialisation and the check batches')
    args = parser.parse_args(argv)
    try:
        model = build(args.model, args.cfg, args.checkpoint, args.seed)
        info = export(model, args.format, args.out, args.min_size, args.max_size, args.opset, args.static)
        if args.check_sizes is not None:
            sizes = args.check_sizes
        else:
            sizes = [args.static] if args.static else default_check_sizes(model)
        rows = check(model, args.format, args.out, sizes, seed=args.seed)
    except (*TOOL_ERRORS, ExportError) as err:
        print(f'ERROR {type(err).__name__}: {err}', file=sys.stderr)
        return 2
    extra = f', opset {info["opset"]}, onnxruntime {info["onnxruntime"]}' if args.format == 'onnx' else ''
    served = (f'height and width {info["min_size"]}..{info["max_size"]}' if args.static is None
              else f'static {args.static[0]}x{args.static[1]}')
    print(f'wrote {args.out} ({info["bytes"] / 2 ** 20:.1f} MiB) in {info["seconds"]:.1f} s: dynamic batch, '
          f'{served}{extra}')
    if rows:
        print(f'{"input":>14} {"max |diff|":>11} {"relative":>9} {"run s":>6}')
        for row in rows:
            print(f'{row["batch"]}x{row["height"]}x{row["width"]:<8} {row["max_abs"]:11.2e} {row["max_rel"]:9.2e} '
                  f'{row["seconds"]:6.2f}')
    worst = max((row['max_rel'] for row in rows), default=0.0)
    if worst > args.tolerance:
        print(f'FAILED: relative difference {worst:.2e} above --tolerance {args.tolerance:g}', file=sys.stderr)
        return 1
    return 0


if __name__ == '__main__':
    sys.exit(main())
