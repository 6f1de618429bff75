"""MC-dropout inference: head once per galaxy, batched tail, exact MVN draws, seeding."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from gampen_ml.data.transforms import LabelScaler
from gampen_ml.infer import InferenceError, chunk_seed, mc_dropout_samples, predict_physical
from gampen_ml.model import GaMPEN, covariance

MU = [0.5, -1.0, 2.0]
LOG_VAR = [np.log(0.25), np.log(1.0), np.log(0.04)]
L_OFFDIAG = [0.8, -0.5, 0.3]


class StandIn(nn.Module):
    """Head: conv + pooling (no dropout). Tail: dropout -> linear (+ batch norm, to check eval)."""

    def __init__(self, dropout_rate: float, weight_scale: float = 0.0) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3)
        self.norm = nn.BatchNorm1d(4)
        self.drop = nn.Dropout(dropout_rate)
        self.fc = nn.Linear(4, 9)
        with torch.no_grad():
            self.fc.weight.normal_(0.0, weight_scale) if weight_scale else self.fc.weight.zero_()
            self.fc.bias.copy_(torch.tensor(MU + LOG_VAR + L_OFFDIAG))
        self.head_batches: list[int] = []
        self.tail_batches: list[int] = []
        self.modes_in_tail: list[tuple[bool, bool]] = []

    def deterministic_head(self, x):
        self.head_batches.append(x.shape[0])
        return torch.relu(self.conv(x)).mean(dim=(2, 3))

    def stochastic_tail(self, h):
        self.tail_batches.append(h.shape[0])
        self.modes_in_tail.append((self.drop.training, self.norm.training))
        return self.fc(self.drop(self.norm(h)))

    def forward(self, x):
        return self.stochastic_tail(self.deterministic_head(x))


def images(n: int, px: int = 12, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).normal(0, 5, size=(n, px, px)).astype(np.float32)


def collect(model, imgs, n_passes, **kw) -> np.ndarray:
    chunks = list(mc_dropout_samples(model, imgs, n_passes, **kw))
    starts = [s for s, _ in chunks]
    assert starts == sorted(starts) and starts[0] == 0
    return np.concatenate([c for _, c in chunks])


def test_draws_follow_predicted_mvn_exactly():
    model = StandIn(dropout_rate=0.0)
    samples = collect(model, images(2), 3000, seed=3, draws_per_pass=2)
    assert samples.shape == (2, 6000, 3) and samples.dtype == np.float32
    # no active dropout: every pass would be the same, so the network runs once per galaxy
    assert model.tail_batches == [2]
    out = torch.tensor([MU + LOG_VAR + L_OFFDIAG])
    sigma = covariance(out)[0].numpy()
    for g in range(2):
        standard_error = np.sqrt(np.diag(sigma) / 6000)
        assert np.all(np.abs(samples[g].mean(0) - MU) < 4 * standard_error)
        np.testing.assert_allclose(np.cov(samples[g].T), sigma, atol=0.06, rtol=0.06)


def test_head_once_per_galaxy_tail_batched_and_modes():
    model = StandIn(dropout_rate=0.3, weight_scale=1.0)
    model.train()
    collect(model, images(5), 40, seed=1, galaxies_per_batch=2, passes_per_chunk=25)
    assert model.head_batches == [2, 2, 1]  # the head sees each galaxy once
    assert model.tail_batches == [50, 30, 50, 30, 25, 15]  # galaxies x passes per call
    assert set(model.modes_in_tail) == {(True, False)}  # dropout on, batch norm in eval
    assert model.training and model.norm.training  # previous modes restored


def test_dropout_makes_passes_differ_and_seed_reproduces():
    model = StandIn(dropout_rate=0.5, weight_scale=1.0)
    with torch.no_grad():
        model.fc.bias[3:6] = -30.0  # negligible aleatoric noise: spread is epistemic only
    imgs = images(3)
    a = collect(model, imgs, 64, seed=11, galaxies_per_batch=2)
    b = collect(model, imgs, 64, seed=11, galaxies_per_batch=2)
    c = collect(model, imgs, 64, seed=12, galaxies_per_batch=2)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)
    assert np.all(a.std(axis=1) > 1e-3)
    # without dropout and noise every pass gives the deterministic forward output
    model.drop.p = 0.0
    d = collect(model, imgs, 8, seed=1)
    model.eval()
    with torch.no_grad():
        ref = model(torch.asinh(torch.from_numpy(imgs)[:, None]))[:, :3].numpy()
    np.testing.assert_allclose(d, np.repeat(ref[:, None], 8, axis=1), atol=1e-5)


def test_memmap_input_and_chunk_seeds(tmp_path):
    path = tmp_path / "images.npy"
    np.save(path, images(4))
    mm = np.load(path, mmap_mode="r")
    model = StandIn(dropout_rate=0.1, weight_scale=0.5)
    a = collect(model, mm, 10, seed=5, galaxies_per_batch=3)
    b = collect(model, np.asarray(mm), 10, seed=5, galaxies_per_batch=3)
    np.testing.assert_array_equal(a, b)
    assert chunk_seed(5, 0, 0) != chunk_seed(5, 3, 0) != chunk_seed(5, 0, 8)
    assert 0 <= chunk_seed(2**62, 10**9, 10**6) < 2**63


def test_bad_arguments_raise():
    model = StandIn(0.1)
    with pytest.raises(InferenceError, match="n_passes"):
        next(mc_dropout_samples(model, images(2), 0, seed=1))
    with pytest.raises(InferenceError, match="images"):
        next(mc_dropout_samples(model, np.zeros((2, 3)), 4, seed=1))


def test_real_tiny_gampen(tiny_profile):
    torch.manual_seed(0)
    model = GaMPEN(tiny_profile.network, dropout_rate=0.2, image_px=164)
    imgs = images(3, px=164)
    a = collect(model, imgs, 12, seed=7, galaxies_per_batch=2)
    b = collect(model, imgs, 12, seed=7, galaxies_per_batch=2)
    assert a.shape == (3, 12, 3) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)
    assert np.all(a.std(axis=1) > 0)


def test_predict_physical_uses_scaler_inverse():
    labels = np.array([[0.0, 1.0, 1e4], [0.3, 2.0, 1e5], [1.0, 0.5, 1e6], [0.6, 3.0, 3e3]])
    scaler = LabelScaler.fit(labels)
    scaled = scaler.transform(labels)[:, None, :].repeat(4, axis=1)
    phys = predict_physical(scaled, scaler)
    assert phys.shape == (4, 4, 3)
    inner = [1, 3]  # B/T strictly inside (0, 1) round-trips
    np.testing.assert_allclose(phys[inner, 0], labels[inner], rtol=1e-5)
    np.testing.assert_allclose(phys[:, 0, 1:], labels[:, 1:], rtol=1e-5)
    beyond = scaled.copy()
    beyond[0, :, 0] -= 0.5
    beyond[2, :, 0] += 0.5
    phys = predict_physical(beyond, scaler)
    assert np.all(phys[0, :, 0] == 0.0) and np.all(phys[2, :, 0] == 1.0)  # snapped to 0 / 1
    with pytest.raises(InferenceError):
        predict_physical(np.zeros((2, 4)), scaler)


def test_several_draws_per_pass_sample_the_same_mixture():
    model = StandIn(dropout_rate=0.0)
    samples = collect(model, images(2), 600, seed=5, draws_per_pass=10)
    assert samples.shape == (2, 6000, 3)
    sigma = covariance(torch.tensor([MU + LOG_VAR + L_OFFDIAG]))[0].numpy()
    np.testing.assert_allclose(np.cov(samples[0].T), sigma, atol=0.06, rtol=0.06)
    # With dropout the K draws of one pass share that pass's mean: the passes differ, so
    # consecutive blocks of K draws have different centres.
    dropout_model = StandIn(dropout_rate=0.5, weight_scale=1.0)
    blocks = collect(dropout_model, images(1), 50, seed=1, draws_per_pass=4)[0]
    assert blocks.shape == (200, 3)
    with pytest.raises(InferenceError, match="draws_per_pass"):
        collect(model, images(1), 4, seed=0, draws_per_pass=0)


def test_fold_batch_norm_keeps_the_mc_function():
    # A quick-preset network (batch norm) with trained-like running statistics: the folded
    # copy gives the same outputs in MC mode for the same dropout masks, and the
    # original model keeps its BN layers.
    from gampen_ml.config import QUICK
    from gampen_ml.infer import fold_batch_norm, set_mc_dropout_mode
    from gampen_ml.model import GaMPEN

    torch.manual_seed(0)
    model = GaMPEN(QUICK.network, 0.05, 239)
    for bn in (m for m in model.modules() if isinstance(m, nn.BatchNorm2d)):
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
        bn.weight.data.uniform_(0.5, 1.5)
        bn.bias.data.uniform_(-0.5, 0.5)
    set_mc_dropout_mode(model)
    folded = fold_batch_norm(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules())
    assert sum(isinstance(m, nn.BatchNorm2d) for m in model.modules()) == 13
    x = torch.asinh(torch.rand(4, 1, 239, 239) * 40)
    with torch.no_grad():
        torch.manual_seed(7)
        expected = model(x)
        torch.manual_seed(7)
        got = folded(x)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)
    nobn = GaMPEN(dataclasses.replace(QUICK.network, batch_norm=False), 0.05, 239)
    assert fold_batch_norm(nobn) is nobn
