"""Export every family at dynamic sizes and check it: the table of docs/export.md.

    python -m bench.export [--models NAME ...] [--formats onnx export] [--json bench/results/export_cpu.json]

For each model (default: the FLatten variant of every family and the softmax DeiT-T, PVTv2-B0 and
Swin-T) and format, ``tools.export`` traces the randomly initialised model (seed 0) with dynamic
batch, height and width (sides from twice the total stride to 2048), writes the ONNX file or the
``.pt2`` program, and runs it against eager PyTorch on batches of 2 at the build size, 64 pixels more
per side and a non-square size (224² -> 224², 288², 256×352): onnxruntime (CPU) for ONNX,
``torch.export.load(...).module()`` for ``export``. One row per model and format: export seconds
(trace included), file MiB, and the largest |difference| relative to the largest |logit| at each size.
A case that raises is recorded with its error text and the exit status is 1.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from typing import List, Optional, Sequence

import torch

if __package__ in (None, ''):  # run as `python bench/x.py`: make the repository root importable
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bench.common import error_text, format_table  # noqa: E402
from tools import export as tool  # noqa: E402
from utils.benchmark import machine_info, write_json  # noqa: E402

MODELS = (
    'flatten_deit_tiny_patch16_224', 'softmax_deit_tiny_patch16_224',
    'flatten_pvt_tiny',
    'flatten_pvt_v2_b0', 'softmax_pvt_v2_b0',
    'flatten_swin_tiny_patch4_224', 'softmax_swin_tiny_patch4_window7_224',
    'flatten_cswin_tiny_224',
)


def run_case(name: str, fmt: str, folder: str) -> dict:
    model = tool.build(name, None, None, seed=0)
    out = os.path.join(folder, f'{name}.{"onnx" if fmt == "onnx" else "pt2"}')
    info = tool.export(model, fmt, out)
    rows = tool.check(model, fmt, out, tool.default_check_sizes(model))
    os.remove(out)
    return dict(model=name, format=fmt, seconds=info['seconds'], mib=info['bytes'] / 2 ** 20,
                min_size=info['min_size'], max_size=info['max_size'], opset=info.get('opset'),
                checks=[dict(size=f'{r["height"]}x{r["width"]}', max_abs=r['max_abs'], max_rel=r['max_rel'])
                        for r in rows])


def markdown_table(results: Sequence[dict]) -> str:
    """The rows as docs/export.md shows them: one relative-difference column per checked size."""
    sizes = [c['size'] for row in results for c in row.get('checks', [])]
    sizes = list(dict.fromkeys(sizes))
    rows = [dict(row, **{f'rel {c["size"]}': c['max_rel'] for c in row.get('checks', [])}) for row in results]
    return format_table(rows, [('model', 'model'), ('format', 'format'), ('seconds', 'export s', '{:.1f}'),
                               ('mib', 'MiB', '{:.1f}')] + [(f'rel {size}', f'rel {size}', '{:.1e}') for size in sizes])


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--models', nargs='+', default=list(MODELS))
    parser.add_argument('--formats', nargs='+', choices=tool.FORMATS, default=list(tool.FORMATS))
    parser.add_argument('--json', default=None, help='write the rows and the machine to this file')
    args = parser.parse_args(argv)
    if 'onnx' in args.formats:
        tool.require_onnx()
    results: List[dict] = []
    print(f'{"model":<38} {"format":<7} {"export s":>8} {"MiB":>7}  max relative difference per size')
    with tempfile.TemporaryDirectory() as folder:
        for name in args.models:
            for fmt in args.formats:
                start = time.perf_counter()
                try:
                    row = run_case(name, fmt, folder)
                except Exception as err:  # recorded, not fatal: the other cases still run
                    row = dict(model=name, format=fmt, error=error_text(err).splitlines()[0],
                               seconds=time.perf_counter() - start)
                    print(f'{name:<38} {fmt:<7} ERROR {row["error"]}', flush=True)
                else:
                    checks = '  '.join(f'{c["size"]} {c["max_rel"]:.1e}' for c in row['checks'])
                    print(f'{name:<38} {fmt:<7} {row["seconds"]:>8.1f} {row["mib"]:>7.1f}  {checks}', flush=True)
                results.append(row)
    print(markdown_table(results))
    versions = {}  # torch's is in the machine record
    if 'onnx' in args.formats:
        import onnx
        import onnxruntime
        import onnxscript
        versions.update(onnx=onnx.__version__, onnxscript=onnxscript.__version__, onnxruntime=onnxruntime.__version__)
    write_json(args.json, dict(machine=machine_info(torch.device('cpu')), versions=versions, results=results))
    return 1 if any('error' in row for row in results) else 0


if __name__ == '__main__':
    sys.exit(main())
