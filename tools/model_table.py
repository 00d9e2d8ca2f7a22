"""Parameters and FLOPs of every config, beside the paper's Table 8 (classification), Table 1 (ADE20K) and
Table 2 (COCO).

    python -m tools.model_table                     # configs/*.yaml, configs/ade20k/*.yaml, configs/coco/*.yaml
    python -m tools.model_table configs/flatten_swin_t.yaml configs/swin_t.yaml --json table.json
    python -m tools.model_table --table 1           # the segmentation configs only
    python -m tools.model_table --table 2           # the detection configs only (not the recipe bases)

FLOPs are multiply-adds (GMACs, the unit of the paper's tables) of one inference pass at batch 1,
counted by ``torch.utils.flop_counter`` (utils/flops.py): every matmul, including the
linear-attention products KᵀV and Q(KᵀV) and softmax attention's QKᵀ and AV, every convolution (patch
embeddings, the DWC, LePE, the decoders) and the fused softmax-attention kernels. Element-wise work
is not counted. A classifier runs on 1×C×IMG×IMG at its DATA.IMG_SIZE; a segmentor (TASK
segmentation) on 1×3×512×2048, the input of Table 1, encoder and decoder (the auxiliary head, which
only trains, is not run); segmentors are counted on fake tensors (shapes only), since a real forward
at that size is slow on a CPU and counts the same (docs/segmentation.md, "The models"). A detector (TASK
detection) is counted as mmdet's ``tools/get_flops.py`` counts Table 2: ``forward_dummy`` on 1×3×1280×800
(backbone, FPN and RPN head on the image, every box head on 1000 RoIs, every mask head on 100;
``models.detection.Detector.flops_forward``), on fake tensors, the model built without weight
initialisation (counts do not depend on values; initialising a cascade detector takes seconds).
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import timm.layers.weight_init as timm_weight_init
import torch.nn as nn

REPO = Path(__file__).resolve().parents[1]
if __package__ in (None, ''):  # run as `python tools/model_table.py`: make the repository root importable
    sys.path.insert(0, str(REPO))

import models  # noqa: E402  (registers every model)
from config import load_config  # noqa: E402
from models.detection import ForwardDummy  # noqa: E402
from utils.flops import count_layer_macs, count_macs  # noqa: E402

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


# Table 1 of the paper: config stem -> (params in M as printed, GFLOPs at 512×2048). Params are compared
# within 3 % (the table prints whole millions), FLOPs within 5 %. CSWin-T has no Table 1 row; CSWin's own
# paper gives UperNet CSWin-T 60M / 959G, which its published config does not reproduce
# (docs/segmentation.md, "The models").
PAPER_TABLE1: Dict[str, Tuple[str, float]] = {
    'fpn_pvt_t': ('17', 158.0), 'fpn_flatten_pvt_t': ('16', 169.0),
    'upernet_swin_t': ('60', 945.0), 'upernet_flatten_swin_t': ('60', 946.0),
    'upernet_swin_s': ('81', 1038.0), 'upernet_flatten_swin_s': ('82', 1038.0),
}
SEGMENTATION_INPUT = (3, 512, 2048)  # (C, H, W) of Table 1's FLOPs

# Table 2 of the paper: config stem -> (params in M as printed, GFLOPs at 1280×800), compared as Table 1's
# (params within 3 %, FLOPs within 5 %). The 1x and 3x rows of a backbone are the same model.
PAPER_TABLE2: Dict[str, Tuple[str, float]] = {
    **{f'mask_rcnn_{stem}_{schedule}': row for schedule in ('1x', '3x') for stem, row in (
        ('pvt_t', ('33', 240.0)), ('flatten_pvt_t', ('32', 244.0)),
        ('swin_t', ('48', 267.0)), ('flatten_swin_t', ('49', 268.0)))},
    'cascade_mask_rcnn_swin_t_3x': ('86', 745.0), 'cascade_mask_rcnn_flatten_swin_t_3x': ('87', 747.0),
    'cascade_mask_rcnn_swin_s_3x': ('107', 838.0), 'cascade_mask_rcnn_flatten_swin_s_3x': ('108', 841.0),
}
DETECTION_INPUT = (3, 1280, 800)  # (C, H, W) of mmdet's get_flops.py default, Table 2's FLOPs


@contextlib.contextmanager
def skip_weight_init() -> Iterator[None]:
    """Build models without initialising their weights (timm's truncated normal and torch's uniform,
    normal, Kaiming and Xavier initialisers leave the tensors as allocated): for counting only."""
    def keep(tensor, *args, **kwargs):
        return tensor

    patched = [(timm_weight_init, '_trunc_normal_')] + [
        (nn.init, name) for name in ('uniform_', 'normal_', 'kaiming_uniform_', 'kaiming_normal_', 'xavier_uniform_')]
    saved = [(module, name, getattr(module, name)) for module, name in patched]
    try:
        for module, name in patched:
            setattr(module, name, keep)
        yield
    finally:
        for module, name, function in saved:
            setattr(module, name, function)


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


# SEG / DET keys of the data pipeline and of the evaluation, which change neither a model nor its counted input
_DATA_KEYS = ('SCALE', 'RATIO_RANGE', 'CROP_SIZE', 'CAT_MAX_RATIO', 'TEST_MODE', 'TEST_STRIDE', 'TEST_SCALES',
              'TEST_FLIP', 'TRAIN_SCALES', 'CROP_PROB', 'CROP_SCALES', 'TEST_SCALE', 'SAVE_RESULTS',
              'RPN_PRE_NMS_TRAIN', 'RPN_POST_NMS_TRAIN', 'RPN_PRE_NMS_TEST', 'RPN_POST_NMS_TEST', 'SCORE_THRESH',
              'DETECTIONS_PER_IMAGE', 'RPN_BATCH_PER_IMAGE', 'BOX_BATCH_PER_IMAGE', 'CASCADE_WEIGHTS')


def _model_key(cfg) -> str:
    """What decides a config's model and its counted input: two configs with the same key (the 1x and the
    3x recipe of one detector) have the same parameters and FLOPs."""
    model = cfg.MODEL.clone()
    model.defrost()
    model.NAME = ''
    heads = {'segmentation': cfg.SEG, 'detection': cfg.DET}.get(cfg.TASK)
    heads = {key: value for key, value in (heads or {}).items() if key not in _DATA_KEYS}
    return '\n'.join([cfg.TASK, str(cfg.DATA.IMG_SIZE), model.dump(), repr(sorted(heads.items()))])


def measure(path: Path, counted: Optional[Dict[str, dict]] = None) -> dict:
    """One row: the config's model, its parameters and GMACs, and the paper's figures. `counted` (model key ->
    row, filled here) lets a config whose model an earlier row counted reuse that row's counts."""
    cfg = load_config(str(path))
    key = _model_key(cfg)
    if (counted is not None) and (key in counted):
        earlier = counted[key]
        row = dict(earlier, config=path.stem, count_seconds=0.0, same_model_as=earlier['config'])
        return _with_paper(row, cfg, path)
    detection = cfg.TASK == 'detection'
    with (skip_weight_init() if detection else contextlib.nullcontext()):
        model = models.build_model(cfg)
    params = sum(p.numel() for p in model.parameters())
    dense = cfg.TASK in ('segmentation', 'detection')  # mmseg / mmdet figures: counted on fake tensors
    if detection:
        input_size, model_input = DETECTION_INPUT, ForwardDummy(model)
    else:
        input_size = SEGMENTATION_INPUT if dense else (_in_chans(model), cfg.DATA.IMG_SIZE, cfg.DATA.IMG_SIZE)
        model_input = model
    start = time.perf_counter()
    macs, _ = count_macs(model_input, input_size, fake=dense)  # a real 512x2048 forward takes up to a minute
    row = {'config': path.stem, 'model_type': cfg.MODEL.TYPE, 'task': cfg.TASK,
           'input': f'{input_size[1]}x{input_size[2]}', 'img_size': input_size[1], 'params': params,
           'gmacs': round(macs / 1e9, 4), 'count_seconds': round(time.perf_counter() - start, 1)}
    if dense:  # Tables 1 and 2 come from mmseg/mmdet-era tools: also the conv + linear work they see
        row['layer_gmacs'] = round(count_layer_macs(model_input, input_size, fake=True) / 1e9, 4)
    row['exact_gmacs'] = macs / 1e9
    if counted is not None:
        counted[key] = dict(row)
    return _with_paper(row, cfg, path)


def _with_paper(row: dict, cfg, path: Path) -> dict:
    """`row` with the paper's figures for `path`, when the paper has a row for it, and how far off we are."""
    dense = cfg.TASK in ('segmentation', 'detection')
    params, macs = row['params'], row.pop('exact_gmacs') * 1e9
    paper = {'segmentation': PAPER_TABLE1, 'detection': PAPER_TABLE2}.get(cfg.TASK, PAPER_TABLE8).get(path.stem)
    if paper is not None:
        paper_params = float(paper[0]) * 1e6
        row.update(paper_params_m=paper[0], paper_gflops=paper[1],
                   params_match=(abs(params - paper_params) <= 0.03 * paper_params) if dense
                   else params_match(params, paper[0]),
                   params_delta_pct=round(100 * (params - paper_params) / paper_params, 2),
                   flops_delta_pct=round(100 * (macs / 1e9 - paper[1]) / paper[1], 2))
    return row


def format_table(rows: List[dict]) -> str:
    head = (f'{"config":36s} {"input":>9s} {"params":>12s} {"paper":>6s} {"GMACs":>9s} {"paper":>7s} {"ΔFLOPs":>7s} '
            f'{"count":>6s} {"layers":>9s}')
    lines = [head, '-' * len(head)]
    for row in rows:
        paper_p = row.get('paper_params_m', '')
        mark = '' if row.get('params_match', True) else '*'
        paper_f = f'{row["paper_gflops"]:.1f}' if 'paper_gflops' in row else ''
        delta = f'{row["flops_delta_pct"]:+.1f}%' if 'flops_delta_pct' in row else ''
        layers = f'{row["layer_gmacs"]:9.3f}' if 'layer_gmacs' in row else ''
        lines.append(f'{row["config"]:36s} {row["input"]:>9s} {row["params"] / 1e6:11.3f}M {paper_p:>5s}{mark:1s} '
                     f'{row["gmacs"]:9.3f} {paper_f:>7s} {delta:>7s} {row["count_seconds"]:5.1f}s {layers}')
    lines.append('params in millions; * = does not round to the paper\'s printed figure (Table 8) or is more than 3 % '
                 'off (Tables 1, 2); FLOPs in GMACs at the input shown, batch 1 (detectors: mmdet\'s forward_dummy); '
                 'count = seconds the FLOP count took; layers = GMACs of the nn.Conv2d and nn.Linear layers alone '
                 '(mmcv\'s get_flops convention; segmentors and detectors only)')
    return '\n'.join(lines)


def is_recipe_base(path: Path) -> bool:
    """A shared recipe file (``configs/ade20k/base_*.yaml``, ``configs/coco/base_*.yaml``) that model configs
    list in BASE, not a model."""
    return path.stem.startswith('base_')


def default_configs() -> List[Path]:
    """The classification configs of Table 8: configs/*.yaml."""
    return sorted(p for p in (REPO / 'configs').glob('*.yaml'))


def segmentation_configs() -> List[Path]:
    """The segmentation configs of Table 1: configs/ade20k/*.yaml, without the recipe bases."""
    return sorted(p for p in (REPO / 'configs' / 'ade20k').glob('*.yaml') if not is_recipe_base(p))


def detection_configs() -> List[Path]:
    """The detection configs of Table 2: configs/coco/*.yaml, without the recipe bases."""
    return sorted(p for p in (REPO / 'configs' / 'coco').glob('*.yaml') if not is_recipe_base(p))


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
    parser.add_argument('configs', nargs='*', type=Path,
                        help='config files (default: configs/*.yaml, configs/ade20k/*.yaml and configs/coco/*.yaml, '
                             'see --table)')
    parser.add_argument('--table', choices=('1', '2', '8', 'all'), default='all',
                        help='without config files: Table 8 (configs/*.yaml), Table 1 (configs/ade20k), Table 2 '
                             '(configs/coco) or all three')
    parser.add_argument('--json', type=Path, help='also write the rows to this JSON file')
    args = parser.parse_args(argv)
    listing = {'8': default_configs(), '1': segmentation_configs(), '2': detection_configs(),
               'all': default_configs() + segmentation_configs() + detection_configs()}
    rows, counted = [], {}
    for path in args.configs or listing[args.table]:
        if not path.is_file():
            parser.error(f'config file not found: {path}')
        rows.append(measure(path, counted))
    print(format_table(rows))  # the table is this command's output
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
        print(f'wrote {args.json}')
    return 0


if __name__ == '__main__':
    sys.exit(main())
