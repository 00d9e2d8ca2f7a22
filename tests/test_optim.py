"""Optimizer parameter groups and the per-iteration LR schedule (docs/training.md, "Optimizer and parameter
groups" and "LR schedule")."""
from __future__ import annotations

import copy
import logging
import math

import pytest
import torch

import models
from config import load_config
from utils.lr_scheduler import build_scheduler
from utils.optimizer import build_optimizer, param_groups


def test_no_decay_groups_follow_the_official_rules():
    model = models.create_model('flatten_swin_tiny_patch4_224')
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, 0.05)
    decayed = {names[id(p)] for p in decay['params']}
    skipped = {names[id(p)] for p in no_decay['params']}
    assert no_decay['weight_decay'] == 0.
    # multi-dimensional FLA parameters are decayed, as in the official runs
    assert 'layers.0.blocks.0.attn.scale' in decayed
    assert 'layers.0.blocks.0.attn.positional_encoding' in decayed
    assert 'layers.0.blocks.0.attn.dwc.weight' in decayed
    assert 'layers.2.blocks.0.attn.relative_position_bias_table' in skipped
    assert {'norm.weight', 'head.bias', 'layers.0.blocks.0.attn.dwc.bias'} <= skipped
    # every trainable parameter lands in exactly one group, in named_parameters() order
    order = [n for n, _ in model.named_parameters()]
    assert [n for n in order if n in decayed] == [names[id(p)] for p in decay['params']]
    assert decayed.isdisjoint(skipped) and (decayed | skipped) == set(order)


def test_frozen_parameters_are_skipped():
    model = models.create_model('flatten_swin_tiny_patch4_224')
    model.patch_embed.requires_grad_(False)
    groups = param_groups(model, 0.05)
    total = sum(len(g['params']) for g in groups)
    assert total == sum(1 for p in model.parameters() if p.requires_grad)


def test_adamw_settings():
    cfg = load_config(None, ['TRAIN.BASE_LR', '1e-3', 'TRAIN.WEIGHT_DECAY', '0.1'])
    opt = build_optimizer(cfg, torch.nn.Linear(3, 3))
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults['lr'] == 1e-3 and opt.defaults['eps'] == 1e-8 and opt.defaults['betas'] == (0.9, 0.999)
    assert [g['weight_decay'] for g in opt.param_groups] == [0.1, 0.]


def _schedule(opts, updates_per_epoch=5):
    cfg = load_config(None, opts)
    opt = build_optimizer(cfg, torch.nn.Linear(2, 2))
    sched = build_scheduler(cfg, opt, updates_per_epoch)
    return cfg, opt, sched


def test_cosine_with_unshifted_warmup_and_cooldown():
    base, warm, low, per_epoch = 1e-3, 1e-6, 1e-5, 5
    cfg, opt, sched = _schedule(['TRAIN.EPOCHS', '10', 'TRAIN.WARMUP_EPOCHS', '2', 'TRAIN.COOLDOWN_EPOCHS', '1',
                                 'TRAIN.BASE_LR', str(base), 'TRAIN.WARMUP_LR', str(warm), 'TRAIN.MIN_LR', str(low)])
    assert opt.param_groups[0]['lr'] == pytest.approx(warm)  # set at construction when warm-up > 0
    T, T_w = 10 * per_epoch, 2 * per_epoch
    for t in range(0, (10 + 1) * per_epoch):
        sched.step_update(t)
        if t < T_w:
            expected = warm + t * (base - warm) / T_w
        elif t < T:
            expected = low + 0.5 * (base - low) * (1 + math.cos(math.pi * t / T))  # t not shifted by warm-up
        else:
            expected = low  # cooldown
        for group in opt.param_groups:
            assert group['lr'] == pytest.approx(expected), t


def test_no_warmup_starts_at_base_lr():
    _, opt, _ = _schedule(['TRAIN.WARMUP_EPOCHS', '0', 'TRAIN.EPOCHS', '3'])
    assert opt.param_groups[0]['lr'] == pytest.approx(5e-4)


def test_linear_and_step_schedules():
    _, opt, sched = _schedule(['TRAIN.LR_SCHEDULER.NAME', 'linear', 'TRAIN.WARMUP_EPOCHS', '0', 'TRAIN.EPOCHS', '4',
                               'TRAIN.BASE_LR', '1.0'])
    sched.step_update(20)
    assert opt.param_groups[0]['lr'] == pytest.approx(0.01)
    sched.step_update(10)
    assert opt.param_groups[0]['lr'] == pytest.approx(1.0 - 0.99 * 0.5)
    _, opt, sched = _schedule(['TRAIN.LR_SCHEDULER.NAME', 'step', 'TRAIN.WARMUP_EPOCHS', '0', 'TRAIN.EPOCHS', '4',
                               'TRAIN.BASE_LR', '1.0', 'TRAIN.LR_SCHEDULER.DECAY_EPOCHS', '2'])
    sched.step_update(9)
    assert opt.param_groups[0]['lr'] == pytest.approx(1.0)
    sched.step_update(10)
    assert opt.param_groups[0]['lr'] == pytest.approx(0.1)


def test_poly_over_an_iteration_schedule():
    # mmseg's UperNet schedule in miniature: 100 updates, 10 of warm-up from 1e-6 of the rate, power 1.0,
    # evaluation periods of 25 updates (the engine's "epochs": the counter runs over the whole schedule)
    base, power = 6e-5, 0.9
    cfg, opt, sched = _schedule(['TRAIN.ITERS', '100', 'TRAIN.EVAL_PERIOD', '25', 'TRAIN.WARMUP_ITERS', '10',
                                 'TRAIN.BASE_LR', str(base), 'TRAIN.WARMUP_LR', str(base * 1e-6), 'TRAIN.MIN_LR', '0.0',
                                 'TRAIN.LR_SCHEDULER.NAME', 'poly', 'TRAIN.LR_SCHEDULER.POWER', str(power)],
                                updates_per_epoch=25)
    for t in (0, 5, 10, 37, 99, 100, 120):
        sched.step_update(t)
        expected = base * 1e-6 + t * (base - base * 1e-6) / 10 if t < 10 else base * max(1 - t / 100, 0) ** power
        assert opt.param_groups[0]['lr'] == pytest.approx(expected, rel=1e-9, abs=1e-15), t


def test_multistep_with_warmup_in_updates():
    # mmdet's 1x in miniature: 12 epochs of 100 updates, x0.1 at epochs 8 and 11, linear warm-up over the first
    # 50 updates from 0.001 of the rate; the milestones are absolute epochs (not shifted by the warm-up).
    # step_update(t) runs after update t and sets the rate of update t + 1: epoch 8's first update (800)
    # gets the decayed rate from step_update(799)
    base = 1e-4
    _, opt, sched = _schedule(['TRAIN.LR_SCHEDULER.NAME', 'multistep', 'TRAIN.LR_SCHEDULER.MILESTONES', '[8, 11]',
                               'TRAIN.EPOCHS', '12', 'TRAIN.WARMUP_ITERS', '50', 'TRAIN.WARMUP_EPOCHS', '5',
                               'TRAIN.BASE_LR', str(base), 'TRAIN.WARMUP_LR', str(base * 1e-3)], updates_per_epoch=100)
    for t, expected in ((0, base * 1e-3), (25, base * 1e-3 + 25 * (base - base * 1e-3) / 50), (50, base),
                        (798, base), (799, base * 0.1), (1098, base * 0.1), (1099, base * 0.01), (1199, base * 0.01)):
        sched.step_update(t)
        assert opt.param_groups[0]['lr'] == pytest.approx(expected, rel=1e-9), t


def test_unknown_names_are_errors():
    with pytest.raises(ValueError, match="TRAIN.LR_SCHEDULER.NAME='exponential'"):
        _schedule(['TRAIN.LR_SCHEDULER.NAME', 'exponential'])
    with pytest.raises(ValueError, match="TRAIN.OPTIMIZER.NAME='lamb'"):
        build_optimizer(load_config(None, ['TRAIN.OPTIMIZER.NAME', 'lamb']), torch.nn.Linear(2, 2))


def _two_group_model():
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.LayerNorm(5), torch.nn.Linear(5, 3))


def _train(impl: str, steps: int = 5, name: str = 'adamw'):
    model = _two_group_model()
    cfg = load_config(None, ['TRAIN.OPTIMIZER.IMPL', impl, 'TRAIN.OPTIMIZER.NAME', name, 'TRAIN.BASE_LR', '1e-2'])
    opt = build_optimizer(cfg, model)
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        model(torch.randn(4, 6, generator=gen)).square().mean().backward()
        opt.step()
        opt.zero_grad()
    return model, opt


@pytest.mark.parametrize('name', ['adamw', 'sgd'])
def test_optimizer_implementations_compute_the_same_update(name):
    """'foreach' equals the one-tensor-at-a-time loop bit for bit, 'fused' to float rounding."""
    loop, foreach, fused = (_train(impl, name=name) for impl in ('loop', 'foreach', 'fused'))
    assert fused[1].param_groups[0]['fused'] and foreach[1].param_groups[0]['foreach']
    assert not (loop[1].param_groups[0]['fused'] or loop[1].param_groups[0]['foreach'])
    for a, b, c in zip(loop[0].parameters(), foreach[0].parameters(), fused[0].parameters(), strict=True):
        assert torch.equal(a, b)
        torch.testing.assert_close(c, a, rtol=1e-6, atol=1e-7)
    assert not torch.equal(loop[0][0].weight, _two_group_model()[0].weight)  # the steps did move the weights


def test_unknown_optimizer_implementation_names_the_key():
    with pytest.raises(ValueError, match=r"TRAIN.OPTIMIZER.IMPL='multi'.*'foreach'"):
        build_optimizer(load_config(None, ['TRAIN.OPTIMIZER.IMPL', 'multi']), torch.nn.Linear(2, 2))


def test_fused_falls_back_to_foreach_where_torch_has_no_kernel(monkeypatch, caplog):
    real = torch.optim.AdamW

    def no_fused_kernel(*args, fused=None, **kwargs):
        if fused:
            raise RuntimeError('`fused=True` requires all the params to be floating point Tensors of supported devices')
        return real(*args, fused=fused, **kwargs)
    monkeypatch.setattr(torch.optim, 'AdamW', no_fused_kernel)
    # an in-process main() may have configured 'flatten' not to propagate; caplog listens at the root
    monkeypatch.setattr(logging.getLogger('flatten'), 'propagate', True)
    with caplog.at_level('WARNING'):
        opt = build_optimizer(load_config(None, []), torch.nn.Linear(2, 2))
    assert opt.param_groups[0]['foreach'] and not opt.param_groups[0]['fused']
    assert "TRAIN.OPTIMIZER.IMPL='fused'" in caplog.text and "using 'foreach'" in caplog.text


def test_restored_state_keeps_this_runs_implementation():
    """A checkpoint written by a 'loop' run restores moments and step counts into a 'fused' run, which
    stays fused (torch alone would take the saved flags), and it then continues like the loop run."""
    model, saved = _train('loop', steps=3)
    state = copy.deepcopy(saved.state_dict())  # as from a file: torch would share the moment tensors
    resumed_model = _two_group_model()
    resumed_model.load_state_dict(model.state_dict())
    resumed = build_optimizer(load_config(None, ['TRAIN.BASE_LR', '1e-2']), resumed_model)
    resumed.load_state_dict(state)
    assert all(g['fused'] and not g['foreach'] for g in resumed.param_groups)
    for p, q in zip(saved.state.values(), resumed.state.values(), strict=True):
        assert torch.equal(p['exp_avg'], q['exp_avg']) and torch.equal(p['step'], q['step'])
    x = torch.randn(4, 6)
    for m, o in ((model, saved), (resumed_model, resumed)):
        m(x).square().mean().backward()
        o.step()
    for a, b in zip(model.parameters(), resumed_model.parameters(), strict=True):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7)
