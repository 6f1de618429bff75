"""SparseDropout: the same Bernoulli dropout as nn.Dropout, drawn from geometric gaps."""

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from gampen_ml.model.dropout import SparseDropout, drop_positions


@pytest.mark.parametrize("p", [7e-4, 0.01, 0.05, 0.2])
def test_drop_positions_are_bernoulli(p):
    torch.manual_seed(0)
    n, trials = 20_000, 200
    counts = np.array([len(drop_positions(n, p)) for _ in range(trials)])
    # Binomial(n, p) counts: mean and variance within sampling error.
    assert abs(counts.mean() - n * p) < 5 * np.sqrt(n * p * (1 - p) / trials)
    assert 0.7 < counts.var(ddof=1) / (n * p * (1 - p)) < 1.35
    # Every position equally likely: chi-square over 20 blocks of the index range.
    hits = torch.cat([drop_positions(n, p) for _ in range(trials)]).numpy()
    assert hits.min() >= 0 and hits.max() < n
    per_block = np.bincount(hits * 20 // n, minlength=20)
    assert stats.chisquare(per_block).pvalue > 1e-3
    # No position twice in one draw, sorted.
    one = drop_positions(n, p)
    assert torch.all(one[1:] > one[:-1])


def test_neighbours_are_independent():
    # Bernoulli trials: P(i and i+1 both dropped) = p^2 (a gap sampler with the wrong
    # offset would make them never or always adjacent).
    torch.manual_seed(1)
    n, p, trials = 50_000, 0.2, 50
    pairs = drops = 0
    for _ in range(trials):
        mask = torch.zeros(n, dtype=torch.bool)
        mask[drop_positions(n, p)] = True
        pairs += int((mask[1:] & mask[:-1]).sum())
        drops += int(mask.sum())
    assert abs(drops / (n * trials) - p) < 0.003
    assert abs(pairs / ((n - 1) * trials) - p * p) < 0.003


@pytest.mark.parametrize("memory_format", [torch.contiguous_format, torch.channels_last])
def test_forward_and_backward_share_the_mask(memory_format):
    torch.manual_seed(2)
    p = 0.05
    x = torch.rand(8, 6, 10, 10).add_(0.5).contiguous(memory_format=memory_format)
    x.requires_grad_(True)
    drop = SparseDropout(p).train()
    y = drop(x)
    assert y.is_contiguous(memory_format=memory_format)
    kept = y != 0
    torch.testing.assert_close(y[kept], (x / (1 - p))[kept])
    assert 0 < (~kept).sum() < x.numel() * 0.2
    g = torch.randn_like(y)
    y.backward(g)
    # d y / d x = mask / (1 - p), on the same elements.
    torch.testing.assert_close(x.grad, g * kept / (1 - p))


def test_matches_nn_dropout_statistics_in_a_network_layer():
    # Mean and variance of a dropped-out sum agree with nn.Dropout's (same distribution).
    torch.manual_seed(3)
    x = torch.rand(64, 512)
    p = 0.1
    ours = torch.stack([SparseDropout(p)(x).sum(1) for _ in range(300)])
    ref = torch.stack([nn.Dropout(p)(x).sum(1) for _ in range(300)])
    torch.testing.assert_close(ours.mean(0), ref.mean(0), rtol=0.01, atol=0.0)
    ratio = (ours.var(0) / ref.var(0)).mean().item()
    assert 0.85 < ratio < 1.15


def test_eval_mode_rate_zero_and_high_rates_fall_back():
    x = torch.randn(4, 3, 5, 5)
    assert torch.equal(SparseDropout(0.1).eval()(x), x)
    assert torch.equal(SparseDropout(0.0).train()(x), x)
    torch.manual_seed(4)
    y = SparseDropout(0.5).train()(x)  # plain F.dropout above SPARSE_MAX_RATE
    assert set(torch.unique((y / x).round(decimals=4)).tolist()) <= {0.0, 2.0}
    assert isinstance(SparseDropout(0.1), nn.Dropout)


def test_same_seed_same_mask():
    x = torch.randn(16, 8, 12, 12)
    torch.manual_seed(5)
    a = SparseDropout(0.05)(x)
    torch.manual_seed(5)
    b = SparseDropout(0.05)(x)
    assert torch.equal(a, b)
