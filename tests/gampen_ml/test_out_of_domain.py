"""Out-of-domain detection: image statistics and the ``out_of_domain`` flag on nominal images."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest

from gampen_ml import stages
from gampen_ml.config import FlagConfig, SimulationConfig, get_profile
from gampen_ml.flags import (
    compute_flags,
    image_statistics,
    noise_sigma_from_differences,
    pool_noise_sigma,
)
from gampen_ml.io import load_npy_mmap, partition_dir
from gampen_ml.sim.noise import read_noise_pool

SIGMA = 2.3


def _blob(flux: float, r_px: float, s: int = 239) -> np.ndarray:
    y, x = np.mgrid[:s, :s] - s // 2
    g = np.exp(-0.5 * (x**2 + y**2) / r_px**2)
    return flux * g / g.sum()


def test_image_statistics_measure_what_they_say():
    rng = np.random.default_rng(1)
    noise = rng.normal(0, SIGMA, (3, 239, 239))
    # A galaxy so large that its wings fill the frame: a plain MAD there would see them.
    images = noise + np.stack([_blob(0, 3), _blob(5e4, 3), _blob(4e6, 60)])
    stats = image_statistics(images)
    assert stats["noise_sigma_nJy"].to_numpy() == pytest.approx([SIGMA] * 3, rel=0.05)
    frame = images[2, :8]
    plain = 1.4826 * np.median(np.abs(frame - np.median(frame)))
    assert plain > 1.5 * SIGMA  # the wings, which the differences cancel
    assert stats["image_flux_nJy"].to_numpy() == pytest.approx(images.sum(axis=(1, 2)))
    snr = stats["image_peak_snr"].to_numpy()
    assert abs(snr[0]) < 5 and snr[1] > 100
    # Detection significance of a known point-like blob: peak of the smoothed image over
    # the smoothed noise, close to the matched-filter value for a 2-px Gaussian.
    expect = 5e4 / (4 * np.pi * 3.0**2 / 2) / (SIGMA / (2 * np.sqrt(np.pi) * 2.0))
    smoothed_peak = 5e4 / (2 * np.pi * (3.0**2 + 2.0**2))
    assert snr[1] == pytest.approx(smoothed_peak / (SIGMA / (2 * np.sqrt(np.pi) * 2.0)), rel=0.1)
    assert snr[1] < expect  # smoothing with a narrower kernel than the blob loses signal
    assert noise_sigma_from_differences(noise[:, :16]) == pytest.approx([SIGMA] * 3, rel=0.05)


@pytest.fixture(scope="module")
def nominal(tmp_path_factory):
    """500 training-distribution images (tiny profile's PSFs and noise) and their labels."""
    root = tmp_path_factory.mktemp("nominal")
    tiny = get_profile("tiny")
    profile = dataclasses.replace(
        tiny, simulation=dataclasses.replace(SimulationConfig(n_galaxies=500, n_shards=1))
    )
    list(stages.simulate_inputs(profile, root, n_workers=1))
    shard = partition_dir(root, "simulated_galaxies", "shard-000")
    images = load_npy_mmap(shard / "images.npy")
    labels = pl.read_parquet(shard / "labels.parquet")
    sigma = pool_noise_sigma(read_noise_pool(partition_dir(root, "noise_pool")))
    return images, labels, sigma


def _catalog(images, modes: pl.DataFrame) -> pl.DataFrame:
    """Flag inputs of ``images`` with the given predicted modes."""
    n = len(images)
    return pl.concat(
        [
            pl.DataFrame({"galaxy_id": np.arange(n), "dataset": ["t"] * n, "bt_mode": [0.5] * n}),
            modes,
            image_statistics(images),
        ],
        how="horizontal",
    )


def test_the_training_noise_is_what_a_cutout_measures(nominal):
    images, _, sigma = nominal
    measured = image_statistics(images[:100])["noise_sigma_nJy"].to_numpy()
    assert np.median(measured) == pytest.approx(sigma, rel=0.03)


def test_nominal_galaxies_are_in_the_domain(nominal):
    images, labels, sigma = nominal
    modes = labels.select(re_arcsec_mode="re_arcsec", flux_nJy_mode="flux_nJy")
    flags = compute_flags(_catalog(images, modes), FlagConfig(), noise_sigma_nJy=sigma)
    assert flags["out_of_domain"].mean() < 0.01, flags.filter("out_of_domain")["ood_reason"]


def test_absurd_images_are_out_of_domain(nominal):
    images, labels, sigma = nominal
    rng = np.random.default_rng(7)
    galaxy = np.asarray(images[int(np.argmax(labels["flux_nJy"].to_numpy() > 1e5))])
    cases = {
        "huge": np.full((239, 239), 1e30),
        "noisy": galaxy + rng.normal(0, 9 * SIGMA, galaxy.shape),
        "negative": -galaxy,
        "blank": rng.normal(0, SIGMA, galaxy.shape),
    }
    stack = np.stack(list(cases.values())).astype(np.float32)
    modes = pl.DataFrame({"re_arcsec_mode": [1.0] * 4, "flux_nJy_mode": [1e5] * 4})
    flags = compute_flags(_catalog(stack, modes), FlagConfig(), noise_sigma_nJy=sigma)
    reasons = dict(zip(cases, flags["ood_reason"].to_list(), strict=True))
    assert flags["out_of_domain"].all() and flags["unreliable"].all(), reasons
    assert "image flux beyond the training range" in reasons["huge"]
    assert "sky noise unlike training" in reasons["huge"]  # a constant image has no noise
    assert reasons["noisy"] == "sky noise unlike training"
    assert reasons["negative"] == "not detected"
    assert reasons["blank"] == "not detected"
