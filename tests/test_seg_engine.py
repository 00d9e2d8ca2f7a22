"""The segmentation parts of the engine: the stream sampler, the loss, inference modes and synced BatchNorm."""
from __future__ import annotations

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

from data.samplers import ResumableStreamSampler
from utils.seg_engine import AllReduceBatchNorm2d, SegLoss, predict, sync_batchnorm


def _batches(n: int, per_rank: int, world: int, rank: int, batch: int, epoch: int):
    sampler = ResumableStreamSampler(range(n), per_rank, num_replicas=world, rank=rank, seed=3)
    sampler.set_epoch(epoch)
    indices = list(sampler)
    return [indices[i:i + batch] for i in range(0, len(indices), batch)]


@pytest.mark.parametrize('epoch', [0, 1, 4])
def test_stream_gives_two_ranks_the_batches_of_one_process(epoch):
    # 7 images, 12 samples per period for one process: a period spans passes and ends mid-pass
    one = _batches(7, 12, 1, 0, 4, epoch)
    two = [_batches(7, 6, 2, r, 2, epoch) for r in range(2)]
    assert len(one) == 3
    for k, batch in enumerate(one):
        assert sorted(batch) == sorted(two[0][k] + two[1][k])


def test_stream_passes_are_permutations_and_decode_to_their_pass():
    sampler = ResumableStreamSampler(range(5), 15, seed=0)  # one period = three whole passes
    encoded = list(sampler)
    for p in range(3):
        chunk = encoded[5 * p:5 * p + 5]
        assert sorted(i % 5 for i in chunk) == list(range(5)) and {i // 5 for i in chunk} == {p}
    assert encoded[:5] != encoded[5:10] or encoded[5:10] != encoded[10:]  # passes are shuffled anew


def test_stream_skip_resumes_mid_period_and_set_epoch_rewinds():
    sampler = ResumableStreamSampler(range(9), 10, seed=1)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.skip(4)
    assert list(sampler) == full[4:] and len(sampler) == 6
    sampler.set_epoch(2)
    assert list(sampler) == full


def test_loss_averages_over_every_pixel_and_weighs_the_auxiliary_head():
    target = torch.tensor([[[0, 1], [255, 255]]])
    main = torch.zeros(1, 2, 2, 2)
    main[0, 0, 0, 0] = 2.0
    aux = torch.zeros(1, 2, 1, 1)  # upsampled to 2x2: every labelled pixel costs log 2
    per_pixel = F.cross_entropy(main, target, ignore_index=255, reduction='none')
    loss = SegLoss(aux_weight=0.4)({'main': main, 'aux': aux}, target)
    expected = per_pixel.sum() / 4 + 0.4 * 2 * torch.log(torch.tensor(2.0)) / 4  # ignored pixels count 0
    torch.testing.assert_close(loss, expected)
    torch.testing.assert_close(SegLoss()(main, target), per_pixel.sum() / 4)


class _Pointwise(nn.Module):
    """Per-pixel logits at the input size: sliding windows must average to the whole-image pass."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 1)

    def forward(self, x):
        return self.conv(x)


class _Quarter(nn.Module):
    """Logits at a quarter of the input, as the segmentors give them."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return F.avg_pool2d(self.conv(x), 4, ceil_mode=True)


def test_sliding_windows_average_to_the_whole_image_for_a_pointwise_model():
    torch.manual_seed(0)
    model, image = _Pointwise().eval(), torch.randn(1, 3, 37, 53)
    whole = predict(model, [image], (37, 53), 4)
    slide = predict(model, [image], (37, 53), 4, mode='slide', crop=(16, 24), stride=(10, 11))
    torch.testing.assert_close(slide, whole)
    quarter = _Quarter().eval()  # a window as large as the image is the whole-image pass
    one_window = predict(quarter, [image], (37, 53), 4, mode='slide', crop=(64, 64), stride=(32, 32))
    torch.testing.assert_close(one_window, predict(quarter, [image], (37, 53), 4))


def test_flip_and_scales_average_probabilities_at_the_label_size():
    torch.manual_seed(0)
    model, image = _Quarter().eval(), torch.randn(1, 3, 32, 48)
    small = F.interpolate(image, size=(16, 24), mode='bilinear', align_corners=False)
    got = predict(model, [small, image], (30, 45), 4, flip=True)
    passes = []
    for view in (small, image):
        for flipped in (False, True):
            x = view.flip(-1) if flipped else view
            logits = F.interpolate(model(x), size=x.shape[-2:], mode='bilinear', align_corners=False)
            logits = logits.flip(-1) if flipped else logits
            passes.append(F.interpolate(logits, size=(30, 45), mode='bilinear', align_corners=False).softmax(1))
    torch.testing.assert_close(got, sum(passes) / 4)
    assert got.shape == (1, 4, 30, 45)


def _synced_bn_worker(rank: int, init_file: str, x: torch.Tensor, out: dict) -> None:
    dist.init_process_group('gloo', init_method=f'file://{init_file}', rank=rank, world_size=2)
    torch.manual_seed(0)
    bn = sync_batchnorm(nn.Sequential(nn.BatchNorm2d(3)), torch.device('cpu'))[0]
    assert isinstance(bn, AllReduceBatchNorm2d)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
    part = x[2 * rank:2 * rank + 2].clone().requires_grad_(True)
    y = bn(part)
    (y * torch.arange(y.numel()).view_as(y).float().cos()).sum().backward()
    torch.save({'y': y.detach(), 'grad': part.grad, 'weight': bn.weight.grad, 'mean': bn.running_mean,
                'var': bn.running_var}, out[rank])
    dist.destroy_process_group()


def test_synced_batchnorm_on_two_gloo_ranks_equals_batchnorm_on_the_whole_batch(tmp_path):
    torch.manual_seed(1)
    x = torch.randn(4, 3, 5, 6) * 3 + 1
    out = {r: str(tmp_path / f'rank{r}.pt') for r in range(2)}
    os.environ.pop('MASTER_ADDR', None)
    mp.spawn(_synced_bn_worker, args=(str(tmp_path / 'init'), x, out), nprocs=2)
    reference = nn.BatchNorm2d(3)
    with torch.no_grad():
        reference.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
    whole = x.clone().requires_grad_(True)
    y = reference(whole)
    weights = torch.cat([torch.arange(2 * 3 * 5 * 6).view(2, 3, 5, 6).float().cos()] * 2)
    (y * weights).sum().backward()
    ranks = [torch.load(out[r]) for r in range(2)]
    torch.testing.assert_close(torch.cat([r['y'] for r in ranks]), y.detach())
    torch.testing.assert_close(torch.cat([r['grad'] for r in ranks]), whole.grad)
    torch.testing.assert_close(ranks[0]['weight'] + ranks[1]['weight'], reference.weight.grad)
    for r in ranks:
        torch.testing.assert_close(r['mean'], reference.running_mean)
        torch.testing.assert_close(r['var'], reference.running_var)
