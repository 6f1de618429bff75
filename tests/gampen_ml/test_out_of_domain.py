"""Out-of-domain detection: image statistics and the ``out_of_domain`` flag on nominal images."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest

from gampen_ml import stages
from gampen_ml.config import FlagConfig, SimulationConfig, get_profile
from gampen_ml.flags import (
    PSF_SIGMA_PER_FWHM,
    compute_flags,
    image_statistics,
    noise_sigma_from_differences,
    pool_noise_sigma,
)
from gampen_ml.io import load_npy_mmap, partition_dir
from gampen_ml.sim.noise import read_noise_pool
from gampen_ml.sim.psf import read_psf_library

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
    cube, table = read_psf_library(partition_dir(root, "psf_library"))
    fwhm = table["measured_fwhm_arcsec"].to_numpy()[labels["psf_id"].to_numpy()]
    return images, labels.with_columns(psf_fwhm_arcsec=fwhm), sigma, (cube, table)


SCALE = get_profile("tiny").imaging.pixel_scale_arcsec


def _catalog(images, modes: pl.DataFrame, psf_fwhm=None) -> pl.DataFrame:
    """Flag inputs of ``images`` with the given predicted modes (and PSF FWHMs)."""
    n = len(images)
    return pl.concat(
        [
            pl.DataFrame(
                {
                    "galaxy_id": np.arange(n),
                    "dataset": ["t"] * n,
                    "bt_mode": [0.5] * n,
                    "psf_fwhm_arcsec": pl.Series(psf_fwhm, dtype=pl.Float64)
                    if psf_fwhm is not None
                    else pl.repeat(None, n, eager=True, dtype=pl.Float64),
                }
            ),
            modes,
            image_statistics(images),
        ],
        how="horizontal",
    )


def test_the_training_noise_is_what_a_cutout_measures(nominal):
    images, _, sigma, _ = nominal
    measured = image_statistics(images[:100])["noise_sigma_nJy"].to_numpy()
    assert np.median(measured) == pytest.approx(sigma, rel=0.03)


def test_nominal_galaxies_are_in_the_domain(nominal):
    images, labels, sigma, _ = nominal
    modes = labels.select(re_arcsec_mode="re_arcsec", flux_nJy_mode="flux_nJy")
    catalog = _catalog(images, modes, labels["psf_fwhm_arcsec"])
    flags = compute_flags(catalog, FlagConfig(), noise_sigma_nJy=sigma, pixel_scale_arcsec=SCALE)
    assert flags["out_of_domain"].mean() < 0.01, flags.filter("out_of_domain")["ood_reason"]
    # Every galaxy is larger than its PSF, the smallest (Re ~ 0.1") by a few per cent.
    ratio = catalog["image_sigma_px"] * SCALE / (PSF_SIGMA_PER_FWHM * labels["psf_fwhm_arcsec"])
    assert ratio.null_count() == 0 and ratio.min() > 1.0


def test_absurd_images_are_out_of_domain(nominal):
    images, labels, sigma, (cube, table) = nominal
    rng = np.random.default_rng(7)
    i = int(np.argmax(labels["flux_nJy"].to_numpy() > 1e5))
    galaxy = np.asarray(images[i])
    # A star: the galaxy's own PSF (library image) at 2e4 nJy, on the training noise.
    s, h = galaxy.shape[0], cube.shape[1] // 2
    star = rng.normal(0, SIGMA, galaxy.shape)
    star[s // 2 - h : s // 2 + h + 1, s // 2 - h : s // 2 + h + 1] += (
        2e4 * cube[labels["psf_id"][i]]
    )
    cases = {
        "huge": np.full((239, 239), 1e30),
        "noisy": galaxy + rng.normal(0, 9 * SIGMA, galaxy.shape),
        "negative": -galaxy,
        "blank": rng.normal(0, SIGMA, galaxy.shape),
        "star": star,
    }
    stack = np.stack(list(cases.values())).astype(np.float32)
    n = len(cases)
    modes = pl.DataFrame({"re_arcsec_mode": [1.0] * n, "flux_nJy_mode": [1e5] * n})
    catalog = _catalog(stack, modes, [labels["psf_fwhm_arcsec"][i]] * n)
    flags = compute_flags(catalog, FlagConfig(), noise_sigma_nJy=sigma, pixel_scale_arcsec=SCALE)
    reasons = dict(zip(cases, flags["ood_reason"].to_list(), strict=True))
    assert flags["out_of_domain"].all() and flags["unreliable"].all(), reasons
    assert "image flux beyond the training range" in reasons["huge"]
    assert "sky noise unlike training" in reasons["huge"]  # a constant image has no noise
    assert reasons["noisy"] == "sky noise unlike training"
    assert reasons["negative"] == "not detected"
    assert reasons["blank"] == "not detected"
    assert reasons["star"] == "consistent with a point source"
    # The galaxy itself, on the same PSF, is not.
    alone = compute_flags(
        _catalog(galaxy[None], modes[:1], [labels["psf_fwhm_arcsec"][i]]),
        FlagConfig(),
        noise_sigma_nJy=sigma,
        pixel_scale_arcsec=SCALE,
    )
    assert not alone["out_of_domain"][0], alone["ood_reason"][0]
