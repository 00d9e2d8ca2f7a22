"""Parameters and FLOPs of every config, beside the paper's Table 8.

    python -m tools.model_table                     # every configs/*.yaml (not configs/demo)
    python -m tools.model_table configs/flatten_swin_t.yaml configs/swin_t.yaml --json table.json

FLOPs are multiply-adds (GMACs, the unit of the paper's tables) of one 1×C×IMG×IMG inference pass
at the config's DATA.IMG_SIZE, counted by ``torch.utils.flop_counter`` (utils/flops.py): every
matmul, including the linear-attention products KᵀV and Q(KᵀV), every convolution (patch
embeddings, the DWC, LePE) and the fused softmax-attention kernels. Element-wise work is not counted.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ''):  # run as `python tools/model_table.py`: make the repository root importable
    sys.path.insert(0, str(REPO))

import models  # noqa: E402  (registers every model)
from config import load_config  # noqa: E402
from utils.flops import count_macs  # noqa: E402

# Table 8 of the paper: config stem -> (params in M as printed, GFLOPs). The printed precision
# (e.g. '29' vs '12.2') is the precision at which our count has to agree.
PAPER_TABLE8: Dict[str, Tuple[str, float]] = {
    'deit_t': ('5.7', 1.2), 'flatten_deit_t': ('6.1', 1.1),
    'pvt_t': ('13.2', 1.9), 'flatten_pvt_t': ('12.2', 2.0),
    'pvt_s': ('24.5', 3.8), 'flatten_pvt_s': ('21.7', 4.0),
    'pvt_m': ('44.2', 6.7), 'flatten_pvt_m': ('37.2', 7.0),
    'pvt_l': ('61.4', 9.8), 'flatten_pvt_b': ('50.6', 10.4),
    'pvt_v2_b0': ('3.4', 0.6), 'flatten_pvt_v2_b0': ('3.6', 0.6),
    'pvt_v2_b1': ('13.1', 2.1), 'flatten_pvt_v2_b1': ('12.9', 2.2),
    'pvt_v2_b2': ('25.4', 4.0), 'flatten_pvt_v2_b2': ('22.6', 4.3),
    'pvt_v2_b3': ('45.2', 6.9), 'flatten_pvt_v2_b3': ('38.3', 7.3),
    'pvt_v2_b4': ('62.6', 10.1), 'flatten_pvt_v2_b4': ('51.8', 10.7),
    'swin_t': ('29', 4.5), 'flatten_swin_t': ('29', 4.5),
    'swin_s': ('50', 8.7), 'flatten_swin_s': ('51', 8.7),
    'swin_b': ('88', 15.4), 'flatten_swin_b': ('89', 15.4),
    'swin_b_384': ('88', 47.0), 'flatten_swin_b_384': ('91', 46.5),
    'cswin_t': ('23', 4.3), 'flatten_cswin_t': ('21', 4.3),
    'cswin_s': ('35', 6.9), 'flatten_cswin_s': ('35', 6.9),
    'cswin_b': ('78', 15.0), 'flatten_cswin_b': ('75', 15.0),
    'cswin_b_384': ('78', 47.0), 'flatten_cswin_b_384': ('78', 46.4),
}


def _in_chans(model: nn.Module) -> int:
    """Input channels: those of the first convolution (every backbone here starts with one)."""
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            return module.in_channels
    raise ValueError(f'{type(model).__name__} has no convolution to read the input channels from')


def params_match(params: int, printed: str) -> bool:
    """Does `params` round to the paper's printed millions at the printed precision?"""
    decimals = len(printed.split('.')[1]) if '.' in printed else 0
    return f'{params / 1e6:.{decimals}f}' == printed


def measure(path: Path) -> dict:
    """One row: the config's model, its parameters and GMACs, and the paper's figures."""
    cfg = load_config(str(path))
    model = models.build_model(cfg)
    params = sum(p.numel() for p in model.parameters())
    macs, _ = count_macs(model, (_in_chans(model), cfg.DATA.IMG_SIZE, cfg.DATA.IMG_SIZE))
    row = {'config': path.stem, 'model_type': cfg.MODEL.TYPE, 'img_size': cfg.DATA.IMG_SIZE,
           'params': params, 'gmacs': round(macs / 1e9, 4)}
    paper = PAPER_TABLE8.get(path.stem)
    if paper is not None:
        row.update(paper_params_m=paper[0], paper_gflops=paper[1], params_match=params_match(params, paper[0]),
                   flops_delta_pct=round(100 * (macs / 1e9 - paper[1]) / paper[1], 2))
    return row


def format_table(rows: List[dict]) -> str:
    head = f'{"config":22s} {"res":>4s} {"params":>12s} {"paper":>6s} {"GMACs":>8s} {"paper":>6s} {"ΔFLOPs":>7s}'
    lines = [head, '-' * len(head)]
    for row in rows:
        paper_p = row.get('paper_params_m', '')
        mark = '' if row.get('params_match', True) else '*'
        paper_f = f'{row["paper_gflops"]:.1f}' if 'paper_gflops' in row else ''
        delta = f'{row["flops_delta_pct"]:+.1f}%' if 'flops_delta_pct' in row else ''
        lines.append(f'{row["config"]:22s} {row["img_size"]:4d} {row["params"] / 1e6:11.3f}M {paper_p:>5s}{mark:1s} '
                     f'{row["gmacs"]:8.3f} {paper_f:>6s} {delta:>7s}')
    lines.append('params in millions; * = does not round to the paper\'s printed figure; '
                 'FLOPs in GMACs at the config resolution, batch 1')
    return '\n'.join(lines)


def default_configs() -> List[Path]:
    return sorted(p for p in (REPO / 'configs').glob('*.yaml'))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('configs', nargs='*', type=Path, help='config files (default: configs/*.yaml)')
    parser.add_argument('--json', type=Path, help='also write the rows to this JSON file')
    args = parser.parse_args(argv)
    rows = []
    for path in args.configs or default_configs():
        if not path.is_file():
            parser.error(f'config file not found: {path}')
        rows.append(measure(path))
    print(format_table(rows))  # the table is this command's output
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
        print(f'wrote {args.json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
