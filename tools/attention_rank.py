"""Rank of the equivalent N×n attention matrix of every block (paper Fig. 5, Eq. 11).

    python -m tools.attention_rank --cfg configs/flatten_deit_t.yaml [--resume CKPT] [--image FILE] \\
        [--json ranks.json] [--png ranks.png]

Every backbone works (DeiT, PVT, PVTv2, Swin, CSwin). For each attention module (Swin: its first
window; CSwin: its first stripe window; DeiT, PVT: the whole map) the module's own q, k, v on the
image give three N×n matrices (models/attention/analysis.py), N queries and n keys (n < N where PVT
reduces the keys): softmax, vanilla linear (rank ≤ head dim d) and focused linear with the DWC
folded in. Their numerical ranks (float64, torch.linalg.matrix_rank; full rank is min(N, n)), min and
max over the heads, are printed as a table; CSwin modules also get the rank of focused + LePE.
JSON rows: block, kind, tokens (N), keys (n), head_dim, and per form {min, max, heads}
(``focused_lepe`` only for modules with LePE).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import List, Optional, Sequence

if __package__ in (None, ''):  # run as `python tools/x.py`: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.attention.analysis import FORMS, equivalent_matrices, head_ranks  # noqa: E402
from tools.common import TOOL_ERRORS, add_model_arguments, attention_inputs, model_and_image, save_figure  # noqa: E402


def _ranks(matrices) -> dict:
    ranks = head_ranks(matrices).tolist()
    return dict(min=min(ranks), max=max(ranks), heads=ranks)


def block_ranks(model, image) -> List[dict]:
    rows = []
    for name, module, inputs in attention_inputs(model, image):
        matrices = equivalent_matrices(module, inputs)
        tokens, keys = matrices['softmax'].shape[-2:]
        row = dict(block=name, kind=type(module).kind, tokens=tokens, keys=keys, head_dim=module.head_dim)
        for form in FORMS:
            row[form] = _ranks(matrices[form])
        if 'lepe' in matrices:
            row['focused_lepe'] = _ranks(matrices['focused'] + matrices['lepe'])
        rows.append(row)
    return rows


def _cell(ranks: Optional[dict]) -> str:
    if ranks is None:
        return '-'
    return f'{ranks["min"]}' if ranks['min'] == ranks['max'] else f'{ranks["min"]}-{ranks["max"]}'


def print_table(rows: List[dict]) -> None:
    width = max(len(r['block']) for r in rows)
    lepe = any('focused_lepe' in r for r in rows)
    print(f'{"block":<{width}}  {"N":>5}  {"n":>5}  {"d":>4}  {"softmax":>9}  {"linear":>9}  {"focused+DWC":>11}'
          + (f'  {"+LePE":>9}' if lepe else ''))
    for r in rows:
        cells = [_cell(r[f]) for f in FORMS]
        extra = f'  {_cell(r.get("focused_lepe")):>9}' if lepe else ''
        print(f'{r["block"]:<{width}}  {r["tokens"]:>5}  {r.get("keys", r["tokens"]):>5}  {r["head_dim"]:>4}  '
              f'{cells[0]:>9}  {cells[1]:>9}  {cells[2]:>11}{extra}')


def plot(rows: List[dict], path: str) -> None:
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(max(6, 0.5 * len(rows) + 2), 4))
    index = range(len(rows))
    for offset, form in zip((-0.27, 0, 0.27), FORMS, strict=True):
        ax.bar([i + offset for i in index], [r[form]['min'] for r in rows], width=0.27, label=form)
    ax.plot(index, [min(r['tokens'], r.get('keys', r['tokens'])) for r in rows], 'k_', markersize=18,
            label='min(N, n) (full rank)')
    ax.set_xticks(list(index), [r['block'] for r in rows], rotation=60, ha='right', fontsize=7)
    ax.set_ylabel('rank of the N×n attention matrix (min over heads)')
    ax.legend(fontsize=8)
    save_figure(fig, path)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    add_model_arguments(parser)
    parser.add_argument('--json', default=None, metavar='PATH')
    parser.add_argument('--png', default=None, metavar='PATH')
    args = parser.parse_args(argv)
    try:
        model, _, image = model_and_image(args)
        rows = block_ranks(model, image)
    except TOOL_ERRORS as err:
        print(f'ERROR {type(err).__name__}: {err}', file=sys.stderr)
        return 2
    print_table(rows)
    if args.json:
        with open(args.json, 'w') as f:
            json.dump(rows, f, indent=1)
        print(f'wrote {args.json}')
    if args.png:
        plot(rows, args.png)
    return 0


if __name__ == '__main__':
    sys.exit(main())
