"""Adaptive MC-dropout passes: the stopping rule, the generator and ragged summaries."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from benchmarks.adaptive import (
    adaptive_mc_dropout_samples,
    bounds_converged,
    hpd_bounds,
    stopping_samples,
    summarize_ragged,
)
from gampen_ml.infer import InferenceError
from gampen_ml.posterior import hpd_interval, summarize


class Tail(nn.Module):
    """Head: mean of the image; tail: dropout -> linear to [mu | log var | L]."""

    def __init__(self, rate: float) -> None:
        super().__init__()
        self.drop = nn.Dropout(rate)
        self.fc = nn.Linear(4, 9)
        with torch.no_grad():
            self.fc.weight.normal_(0.0, 0.3, generator=torch.Generator().manual_seed(0))
            self.fc.bias.copy_(torch.tensor([0.5, -1.0, 2.0, -2.0, -1.0, -3.0, 0.2, 0.0, 0.1]))

    def deterministic_head(self, x):
        return x.mean(dim=(2, 3)).repeat(1, 4)

    def stochastic_tail(self, h):
        return self.fc(self.drop(h))


def test_hpd_bounds_match_posterior_module():
    x = np.random.default_rng(0).gamma(3.0, size=(5, 400, 3))
    lo, hi, std = hpd_bounds(x, 0.9545)
    ref_lo, ref_hi = hpd_interval(x[:, :, 1], 0.9545)
    np.testing.assert_allclose(lo[:, 1], ref_lo)
    np.testing.assert_allclose(hi[:, 1], ref_hi)
    np.testing.assert_allclose(std[:, 2], x[:, :, 2].std(axis=1, ddof=1))
    moved = (lo + 0.01 * std, hi - 0.2 * std)
    assert not bounds_converged(moved, (lo, hi, std), 0.1).any()
    assert bounds_converged(moved, (lo, hi, std), 0.3).all()


def test_stopping_rule_tolerances():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(40, 1000, 3))
    assert np.all(stopping_samples(x, 100, rel_tol=10.0) == 200)  # stops at the first check
    assert np.all(stopping_samples(x, 100, rel_tol=0.0) == 1000)  # never converges
    used = stopping_samples(x, 100, rel_tol=0.1)
    assert np.all(used % 100 == 0) and 200 <= used.min() and used.max() <= 1000
    assert 200 < used.mean() < 1000  # a realistic tolerance stops some galaxies, not all
    with pytest.raises(InferenceError):
        stopping_samples(x, 1000)


def test_adaptive_generator_stops_and_samples_the_same_posterior():
    images = np.random.default_rng(2).normal(0, 1, (5, 6, 6)).astype(np.float32)
    model = Tail(0.3)
    model.train()
    loose = list(adaptive_mc_dropout_samples(
        model, images, 40, seed=3, batch_passes=10, rel_tol=100.0, galaxies_per_batch=2,
        draws_per_pass=2,
    ))  # fmt: skip
    assert [c.start for c in loose] == [0, 2, 4]
    for c in loose:
        assert np.all(c.n_samples == 40)  # 2 rounds x 10 passes x 2 draws
        assert np.isfinite(c.samples[:, :40]).all() and np.isnan(c.samples[:, 40:]).all()
    strict = list(adaptive_mc_dropout_samples(
        model, images, 40, seed=3, batch_passes=10, rel_tol=0.0, galaxies_per_batch=2,
        draws_per_pass=2,
    ))  # fmt: skip
    full = np.concatenate([c.samples for c in strict])
    assert np.all(np.concatenate([c.n_samples for c in strict]) == 80)
    assert np.isfinite(full).all() and full.shape == (5, 80, 3)
    # the first round is the same draw whatever the tolerance (same seeds)
    np.testing.assert_array_equal(loose[0].samples[:, :20], strict[0].samples[:, :20])
    assert model.training and model.drop.training  # modes restored
    # mean of the samples follows the network's mu (dropout only perturbs it slightly)
    assert np.all(np.abs(full.mean(axis=1)[:, 0] - 0.5) < 1.0)


def test_summarize_ragged_matches_per_group_summaries():
    rng = np.random.default_rng(4)
    x = rng.gamma(4.0, size=(6, 300, 3))
    n = np.array([300, 100, 200, 100, 300, 200])
    table = summarize_ragged(x, n, transform=lambda s: 2.0 * s)
    assert table["n_samples"].to_list() == n.tolist()
    for i in range(6):
        ref = summarize(2.0 * x[i : i + 1, : n[i]])
        for col in ("bt_mode", "re_arcsec_hpd95_lo", "flux_nJy_std"):
            assert table[col][i] == pytest.approx(ref[col][0], rel=1e-12)
