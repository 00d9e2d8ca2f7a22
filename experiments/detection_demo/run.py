"""Mask R-CNN with a FLatten-Swin-T FPN backbone: a forward/backward check at 800×1333, then a few training steps.

    python -m experiments.detection_demo.run [--model flatten_swin_tiny_patch4_224] [--steps 6] [--images 4] \\
        [--size 800x1333] [--optimizer adamw] [--lr 1e-4] [--seed 0] [--json experiments/detection_demo/results.json]
    python -m experiments.detection_demo.run --micro    # a tiny backbone on 96×128 canvases: seconds (tests)

The detector is torchvision's ``MaskRCNN`` on ``models.detection.fpn_backbone(--model)`` (the four
stages under a 256-channel FPN with the max-pooled extra level), randomly initialised (seeded), with
torchvision's default transform: each image is resized to short side 800 / long side at most 1333 and
the batch padded to a multiple of 32, so an 800×1333 canvas enters the backbone as 800×1344. The data
are ``data.detection_toy.FashionMNISTCanvases``: `--images` black canvases of `--size` with 3 to 6
real Fashion-MNIST glyphs each (11 classes with the background, boxes and masks).

Step 0 is the check: its forward must give finite losses, and its backward a finite gradient on every
backbone parameter, non-zero on the patch embedding (the gradient reaches the first layer through
every stage and the FPN); the FPN level shapes are recorded. Every step (the check included) then
takes an optimiser step on a batch of `--batch-size` canvases, cycling through the set, and prints
the total loss and its parts (torchvision's loss_classifier, loss_box_reg, loss_mask,
loss_objectness, loss_rpn_box_reg) with its time. Exit status 1 when the check fails or a loss is
not finite, 2 for bad arguments or missing data.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torchvision.models.detection.faster_rcnn import FastRCNNPredictor, TwoMLPHead
from torchvision.models.detection.mask_rcnn import MaskRCNNHeads, MaskRCNNPredictor

HERE = Path(__file__).resolve().parent
if __package__ in (None, ''):  # run as `python experiments/x/run.py`: make the repository root importable
    sys.path.insert(0, str(HERE.parents[1]))

from bench.common import check_minimums, torch_threads  # noqa: E402
from data.detection_toy import FashionMNISTCanvases, detection_collate  # noqa: E402
from models.detection import mask_rcnn  # noqa: E402
from models.registry import UnknownModelError  # noqa: E402
from utils.benchmark import machine_info, write_json  # noqa: E402
from utils.misc import parse_size  # noqa: E402

DEFAULT_MODEL = 'flatten_swin_tiny_patch4_224'
DEFAULT_JSON = str(HERE / 'results.json')  # beside this script
# --micro: a one-block-per-stage FLatten-Swin with 16 channels, a 32-channel FPN and 32-channel heads
# (micro_heads) on 96×128 canvases
MICRO_MODEL_KWARGS = dict(embed_dim=16, depths=(1, 1, 1, 1), num_heads=(1, 1, 1, 1))
MICRO = dict(size=(96, 128), out_channels=32, scale=(0.8, 1.5), steps=2, images=2)
ERRORS = (ValueError, OSError, UnknownModelError)


def micro_heads(out_channels: int, num_classes: int, width: int = 32) -> dict:
    """Light Mask R-CNN heads for the micro runs (torchvision's classes, `width` channels instead of
    256 and a 1024-wide box MLP: torchvision's heads take most of the time of a micro step). Pass them with
    ``num_classes=None``."""
    return dict(box_head=TwoMLPHead(out_channels * 7 * 7, width), box_predictor=FastRCNNPredictor(width, num_classes),
                mask_head=MaskRCNNHeads(out_channels, (width, width), 1),
                mask_predictor=MaskRCNNPredictor(width, width, num_classes))


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    parser.add_argument('--model', default=DEFAULT_MODEL, help=f'registered backbone variant (default {DEFAULT_MODEL})')
    parser.add_argument('--steps', type=int, default=None, help='training steps, the check included (default 6)')
    parser.add_argument('--images', type=int, default=None, help='canvases in the toy set (default 4)')
    parser.add_argument('--batch-size', type=int, default=1, help='canvases per step (default 1)')
    parser.add_argument('--size', type=lambda text: parse_size(text, minimum=32), default=None, metavar='HxW',
                        help='canvas size (default 800x1333)')
    parser.add_argument('--min-size', type=int, default=None,
                        help="the detector's resize: short side (default torchvision's 800; --micro: the canvas)")
    parser.add_argument('--max-size', type=int, default=None,
                        help="the detector's resize: longest side at most (default torchvision's 1333)")
    parser.add_argument('--glyphs', type=int, nargs=2, default=(3, 6), metavar=('LO', 'HI'),
                        help='glyphs per canvas, inclusive range (default 3 6)')
    parser.add_argument('--optimizer', choices=['adamw', 'sgd'], default='adamw')
    parser.add_argument('--lr', type=float, default=None, help='learning rate (default adamw 1e-4, sgd 0.01)')
    parser.add_argument('--weight-decay', type=float, default=None, help='(default adamw 0.05, sgd 1e-4)')
    parser.add_argument('--drop-path', type=float, default=0.0,
                        help='stochastic depth of the backbone (default 0: a few-step check wants no extra noise)')
    parser.add_argument('--seed', type=int, default=0, help='seed of the canvases, the initialisation and sampling')
    parser.add_argument('--data-path', default='', help='folder of the Fashion-MNIST IDX files (default: the '
                        "Debian package's /usr/share/datasets/fashion-mnist)")
    parser.add_argument('--micro', action='store_true', help=f'tiny backbone, {MICRO["size"][0]}x{MICRO["size"][1]} '
                        f'canvases, {MICRO["steps"]} steps: runs in seconds (tests)')
    parser.add_argument('--threads', type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument('--json', default=None, metavar='PATH',
                        help='write the results here (default: results.json beside this script; --micro: none)')
    args = parser.parse_args(argv)
    micro = args.micro
    if args.size is None:
        args.size = MICRO['size'] if micro else (800, 1333)
    if args.steps is None:
        args.steps = MICRO['steps'] if micro else 6
    if args.images is None:
        args.images = MICRO['images'] if micro else 4
    if args.min_size is None:
        args.min_size = min(args.size) if micro else 800
    if args.max_size is None:
        args.max_size = max(args.size) if micro else 1333
    if args.lr is None:
        args.lr = 1e-4 if args.optimizer == 'adamw' else 0.01
    if args.weight_decay is None:
        args.weight_decay = 0.05 if args.optimizer == 'adamw' else 1e-4
    if args.json is None and not micro:
        args.json = DEFAULT_JSON
    check_minimums(parser, args, steps=1, images=1, batch_size=1, min_size=1, max_size=1)
    if not 0 <= args.drop_path < 1:
        parser.error('--drop-path must be in [0, 1)')
    return args


def build(args: argparse.Namespace) -> Tuple[torch.nn.Module, FashionMNISTCanvases]:
    """(Mask R-CNN in train mode, toy set) for the parsed arguments, seeded by ``args.seed``."""
    model_kwargs = dict(drop_path_rate=args.drop_path, **(MICRO_MODEL_KWARGS if args.micro else {}))
    num_classes = FashionMNISTCanvases.num_classes
    torch.manual_seed(args.seed)
    if args.micro:
        heads = micro_heads(MICRO['out_channels'], num_classes)
        model = mask_rcnn(args.model, num_classes=None, out_channels=MICRO['out_channels'], model_kwargs=model_kwargs,
                          min_size=args.min_size, max_size=args.max_size, **heads)
    else:
        model = mask_rcnn(args.model, num_classes=num_classes, model_kwargs=model_kwargs, min_size=args.min_size,
                          max_size=args.max_size)
    dataset = FashionMNISTCanvases(num_images=args.images, size=args.size, glyphs=tuple(args.glyphs),
                                   scale=MICRO['scale'] if args.micro else (3.0, 9.0), seed=args.seed,
                                   root=args.data_path)
    return model.train(), dataset


def make_optimizer(model: torch.nn.Module, args: argparse.Namespace) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if args.optimizer == 'sgd':
        return torch.optim.SGD(params, lr=args.lr, momentum=0.9, weight_decay=args.weight_decay)
    return torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)


def gradient_report(model: torch.nn.Module) -> dict:
    """Which backbone parameters got a gradient: counts, the names of those without one or with a
    non-finite one, and gradient norms of the backbone body, its patch embedding, the FPN and the heads."""
    body = model.backbone.body
    missing = [n for n, p in body.named_parameters() if p.requires_grad and p.grad is None]
    nonfinite = [n for n, p in body.named_parameters() if p.grad is not None and not torch.isfinite(p.grad).all()]

    def norm(module: torch.nn.Module) -> float:
        grads = [p.grad.detach().double().norm() for p in module.parameters() if p.grad is not None]
        return float(torch.stack(grads).norm()) if grads else 0.0

    patch_embed = [m for n, m in body.named_modules() if n.endswith('patch_embed')]
    return dict(
        body_params=sum(1 for _ in body.parameters()), body_missing=missing, body_nonfinite=nonfinite,
        grad_norm=dict(body=norm(body), patch_embed=norm(patch_embed[0]) if patch_embed else None,
                       fpn=norm(model.backbone.fpn), rpn=norm(model.rpn), roi_heads=norm(model.roi_heads)))


def check_passed(losses: Dict[str, float], grads: dict) -> List[str]:
    """The failures of the step-0 check (empty: passed)."""
    failures = [f'{k} = {v} is not finite' for k, v in losses.items() if not math.isfinite(v)]
    if grads['body_missing']:
        failures.append(f'{len(grads["body_missing"])} backbone parameters got no gradient, e.g. '
                        f'{grads["body_missing"][:3]}')
    if grads['body_nonfinite']:
        failures.append(f'non-finite gradient on {grads["body_nonfinite"][:3]}')
    if not grads['grad_norm']['patch_embed']:
        failures.append('the gradient does not reach the patch embedding (zero or no norm)')
    return failures


def train(model: torch.nn.Module, dataset: FashionMNISTCanvases, args: argparse.Namespace, log=print) -> dict:
    """Run ``args.steps`` steps (step 0 is the check); returns the results: per-step losses and times,
    the check, the shapes the backbone saw and gave."""
    optimizer = make_optimizer(model, args)
    shapes: Dict[str, list] = {}

    def record(module, inputs, output):
        shapes['backbone_input'] = list(inputs[0].shape)
        shapes['levels'] = {k: list(v.shape) for k, v in output.items()}

    hook = model.backbone.register_forward_hook(record)
    steps, check = [], None
    try:
        for step in range(args.steps):
            first = step * args.batch_size
            indices = [(first + i) % len(dataset) for i in range(args.batch_size)]
            images, targets = detection_collate([dataset[i] for i in indices])
            start = time.perf_counter()
            losses = model(images, targets)
            loss = sum(losses.values())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            parts = {k: float(v.detach()) for k, v in losses.items()}
            if step == 0:
                grads = gradient_report(model)
                check = dict(losses=parts, gradients=grads, failures=check_passed(parts, grads), **shapes)
                hook.remove()
            optimizer.step()
            seconds = time.perf_counter() - start
            row = dict(step=step, images=indices, loss=float(loss.detach()), parts=parts, seconds=round(seconds, 2))
            steps.append(row)
            log(f'step {step}  loss {row["loss"]:.4f}  ' + '  '.join(f'{k} {v:.4f}' for k, v in parts.items())
                + f'  ({seconds:.1f} s)')
            if step == 0:
                log(f'check: backbone input {shapes["backbone_input"]}, levels '
                    + ', '.join(f'{k} {v[1:]}' for k, v in shapes['levels'].items())
                    + ('; ' + '; '.join(check['failures']) if check['failures'] else '; passed'))
    finally:
        hook.remove()
    losses = [s['loss'] for s in steps]
    return dict(check=check, steps=steps, first_loss=losses[0], last_loss=losses[-1],
                min_loss=min(losses), step_seconds=[s['seconds'] for s in steps])


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    with torch_threads(args.threads):
        return run(args)


def run(args: argparse.Namespace) -> int:
    """Build, train and report: exit status 0 (the check passed), 1 (it failed) or 2 (bad input)."""
    try:
        model, dataset = build(args)
    except ERRORS as err:
        print(f'ERROR {type(err).__name__}: {err}', file=sys.stderr)
        return 2
    params = sum(p.numel() for p in model.parameters())
    backbone_params = sum(p.numel() for p in model.backbone.body.parameters())
    print(f'Mask R-CNN on {args.model} + FPN({model.backbone.out_channels}): {params / 1e6:.1f}M parameters '
          f'({backbone_params / 1e6:.1f}M backbone); {len(dataset)} canvases {args.size[0]}x{args.size[1]}, '
          f'resize min {args.min_size} / max {args.max_size}; {args.optimizer} lr {args.lr}; '
          f'{torch.get_num_threads()} threads')
    start = time.perf_counter()
    results = train(model, dataset, args)
    total = time.perf_counter() - start
    ok = not results['check']['failures'] and all(math.isfinite(s['loss']) for s in results['steps'])
    print(f'loss {results["first_loss"]:.4f} -> {results["last_loss"]:.4f} over {args.steps} steps '
          f'({total:.0f} s); check {"passed" if ok else "FAILED"}')
    payload = dict(machine=machine_info(torch.device('cpu')), args={k: v for k, v in vars(args).items()},
                   parameters=dict(total=params, backbone=backbone_params),
                   targets=[dict(labels=dataset[i][1]['labels'].tolist()) for i in range(len(dataset))],
                   total_seconds=round(total, 1), passed=ok, **results)
    payload['args']['size'] = list(args.size)
    payload['args']['glyphs'] = list(args.glyphs)
    write_json(args.json, payload)
    return 0 if ok else 1


if __name__ == '__main__':
    sys.exit(main())
