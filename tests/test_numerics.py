"""Numerics of training: AMP with large inputs, skipped non-finite updates, stopping a diverged run."""
from __future__ import annotations

import contextlib
import functools

import pytest
import torch
from conftest import MICRO_YAML, make_image_folder, run_main
from timm.scheduler import CosineLRScheduler

from models.swin import FLattenSwinTransformer
from utils.engine import EpochLog, NonFiniteGuard, NonFiniteLossError, RunState, StepSettings, train_one_epoch


def _micro() -> FLattenSwinTransformer:
    torch.manual_seed(0)
    return FLattenSwinTransformer(img_size=32, patch_size=2, embed_dim=16, depths=(2, 2), num_heads=(1, 2),
                                  window_size=16, softmax_window_size=4, attn_type='LS', num_classes=5)


def _train(model, batches, criterion=torch.nn.functional.cross_entropy, dtype=None, max_nonfinite=20):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    scheduler = CosineLRScheduler(optimizer, t_initial=100, t_in_epochs=False)
    scaler = torch.amp.GradScaler('cpu') if dtype == torch.float16 else None
    autocast = functools.partial(torch.autocast, 'cpu', dtype=dtype) if dtype else contextlib.nullcontext
    state = RunState(model=model, train_model=model, optimizer=optimizer, lr_scheduler=scheduler,
                     updates_per_epoch=len(batches), total_epochs=1, scaler=scaler)
    settings = StepSettings(criterion=criterion, device=torch.device('cpu'), autocast=autocast, clip_grad=5.0)
    return train_one_epoch(state, batches, settings, log=EpochLog(state), guard=NonFiniteGuard(max_nonfinite))


@pytest.mark.parametrize('dtype', [torch.float16, torch.bfloat16])
def test_autocast_training_with_large_inputs_stays_finite(dtype):
    model = _micro()
    gen = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 32, 32, generator=gen) * 100, torch.randint(0, 5, (4,), generator=gen))
               for _ in range(4)]
    stats = _train(model, batches, dtype=dtype)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert stats['loss'] == stats['loss'] and stats['skipped_updates'] < 4  # not NaN, and it learned something
    with torch.no_grad(), torch.autocast('cpu', dtype=dtype):
        assert torch.isfinite(model(batches[0][0])).all()


def _nan_after(n_good: int):
    """A criterion that turns NaN after `n_good` calls."""
    calls = {'n': 0}

    def criterion(output, target):
        calls['n'] += 1
        loss = torch.nn.functional.cross_entropy(output, target)
        return loss * float('nan') if calls['n'] > n_good else loss
    return criterion


def test_fp32_skips_non_finite_updates_and_stops_after_too_many():
    model = _micro()
    batches = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1])) for _ in range(6)]
    with pytest.raises(NonFiniteLossError, match=r'3 consecutive updates .* the last at epoch 0 step 4'):
        _train(model, batches, criterion=_nan_after(2), max_nonfinite=3)
    # the skipped updates changed nothing: weights are finite
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_a_few_non_finite_updates_are_skipped_and_counted():
    model = _micro()
    batches = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1])) for _ in range(4)]
    calls = {'n': 0}

    def one_bad(output, target):
        calls['n'] += 1
        loss = torch.nn.functional.cross_entropy(output, target)
        return loss * float('inf') if calls['n'] == 2 else loss
    stats = _train(model, batches, criterion=one_bad)
    assert stats['skipped_updates'] == 1 and stats['loss'] == stats['loss']
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_fp16_scaler_skips_overflowing_updates_and_counts_them():
    model = _micro()
    batches = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1])) for _ in range(4)]
    calls = {'n': 0}

    def overflow_once(output, target):
        calls['n'] += 1
        loss = torch.nn.functional.cross_entropy(output.float(), target)
        return loss * 1e30 if calls['n'] == 1 else loss  # fp16 gradients overflow
    stats = _train(model, batches, criterion=overflow_once, dtype=torch.float16)
    assert stats['skipped_updates'] >= 1
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_diverged_run_stops_with_a_message_and_keeps_its_checkpoints(tmp_path):
    data = make_image_folder(tmp_path / 'data')
    cfg = tmp_path / 'micro.yaml'
    cfg.write_text(MICRO_YAML)
    common = ['--cfg', cfg, '--data-path', data, '--output', tmp_path / 'out']
    assert run_main(common + ['--opts', 'TRAIN.EPOCHS', '1']).returncode == 0
    run_dir = tmp_path / 'out' / 'micro' / 'default'
    before = (run_dir / 'ckpt_epoch_0.pth').read_bytes()
    # an absurd LR for the second epoch: the weights blow up and the loss turns non-finite
    result = run_main(common + ['--opts', 'TRAIN.EPOCHS', '2', 'TRAIN.BASE_LR', '1e12', 'TRAIN.CLIP_GRAD', 'None',
                                'TRAIN.MAX_NONFINITE_STEPS', '2'])
    text = result.stdout + result.stderr
    assert result.returncode == 2, text[-2000:]
    assert 'NonFiniteLossError: 2 consecutive updates with non-finite loss or gradients' in text
    assert 'Traceback' not in text
    assert (run_dir / 'ckpt_epoch_0.pth').read_bytes() == before
    assert not (run_dir / 'ckpt_epoch_1.pth').exists()
