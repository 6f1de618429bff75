"""The simulated target domain (gampen_ml.sim.target_domain) on small stamps."""

from __future__ import annotations

from pathlib import Path

import galsim
import numpy as np
import polars as pl
import pytest
from astropy.io import fits

from gampen_ml.config import get_profile
from gampen_ml.fits_input import load_cutouts
from gampen_ml.sim.parameters import composite_re_arcsec
from gampen_ml.sim.target_domain import (
    FROZEN_TEST_SEED,
    TRUTH_COLUMNS,
    TRUTH_FILE,
    TargetDomainConfig,
    correlated_noise,
    render_target_domain,
    target_domain_parameters,
    write_target_domain,
)

SMALL = TargetDomainConfig(stamp_size_px=63, psf_stamp_px=21)


def test_knots_change_the_light_but_not_the_flux() -> None:
    params = target_domain_parameters(8, seed=3)
    knotty, _, truth = render_target_domain(params, SMALL, seed=3, noise=False)
    smooth, _, _ = render_target_domain(params, SMALL, seed=3, noise=False, knots=False)
    has_disk = (truth["bt"] < 1.0).to_numpy()
    assert has_disk.sum() >= 6
    # Flux moves from the smooth disk into knots; the total stays (up to light leaving the
    # stamp, which the knots' scatter changes a little).
    ratio = knotty.sum(axis=(1, 2)) / smooth.sum(axis=(1, 2))
    assert ratio == pytest.approx(1.0, abs=0.02)
    change = np.abs(knotty - smooth).max(axis=(1, 2)) / smooth.max(axis=(1, 2))
    assert np.all(change[has_disk] > 0.005), change
    assert np.all(change[~has_disk] == 0.0)
    # Not a smooth Sérsic: the knots break the 180-degree symmetry of every disk galaxy.
    asym = np.abs(knotty - knotty[:, ::-1, ::-1]).sum(axis=(1, 2)) / knotty.sum(axis=(1, 2))
    asym_smooth = np.abs(smooth - smooth[:, ::-1, ::-1]).sum(axis=(1, 2)) / smooth.sum(axis=(1, 2))
    assert np.all(asym[has_disk] > 10 * asym_smooth[has_disk] + 1e-3)
    knots = truth.filter(pl.col("bt") < 1.0)
    assert knots["knot_fraction"].is_between(0.1, 0.4).all()
    assert knots["n_knots"].is_between(20, 100).all()
    assert truth.filter(pl.col("bt") == 1.0)["n_knots"].null_count() == int((~has_disk).sum())


def test_noise_is_correlated_with_the_sky_sigma() -> None:
    field = np.zeros((200, 200))
    image = galsim.ImageD(field, scale=SMALL.pixel_scale_arcsec)
    image.addNoise(correlated_noise(SMALL, seed=5))
    x = image.array
    assert x.std() == pytest.approx(SMALL.sky_sigma_nJy, rel=0.05)
    rho_x = np.corrcoef(x[:, :-1].ravel(), x[:, 1:].ravel())[0, 1]
    rho_y = np.corrcoef(x[:-1].ravel(), x[1:].ravel())[0, 1]
    assert 0.35 < rho_x < 0.6 and 0.35 < rho_y < 0.6, (rho_x, rho_y)
    # A galaxy's stamp carries it: the border pixels of a faint galaxy are correlated too.
    params = target_domain_parameters(1, seed=1).with_columns(pl.lit(1e-6).alias("flux_nJy"))
    images, _, _ = render_target_domain(params, SMALL, seed=1)
    stamp = images[0]
    assert np.corrcoef(stamp[:, :-1].ravel(), stamp[:, 1:].ravel())[0, 1] > 0.3


def test_truth_table_and_files_follow_the_schema(tmp_path: Path) -> None:
    truth = write_target_domain(tmp_path, 4, SMALL, seed=7)
    assert truth.schema == pl.Schema(TRUTH_COLUMNS)
    assert pl.read_parquet(tmp_path / TRUTH_FILE).equals(truth)
    assert truth["psf_family"].to_list() == ["kolmogorov"] * 4
    # The labels' definitions: composite circularized radius of the components.
    re = composite_re_arcsec(
        truth["bt"].to_numpy(),
        truth["disk_n"].fill_null(np.nan).to_numpy(),
        truth["disk_re_arcsec"].fill_null(np.nan).to_numpy(),
        truth["bulge_n"].fill_null(np.nan).to_numpy(),
        truth["bulge_re_arcsec"].fill_null(np.nan).to_numpy(),
    )
    assert truth["re_arcsec"].to_numpy() == pytest.approx(re, rel=1e-9)
    # Platform cutouts: the reader takes them as they are, PSF FWHM from the header.
    imaging = SMALL.domain().imaging(get_profile("tiny").imaging)
    batch = load_cutouts(tmp_path, imaging, domain=SMALL.domain())
    assert batch.rejections == [] and batch.accepted_files == truth["file"].to_list()
    assert batch.table["psf_fwhm_arcsec"].to_numpy() == pytest.approx(
        truth["psf_fwhm_arcsec"].to_numpy(), rel=1e-6
    )
    with fits.open(tmp_path / truth["file"][0]) as hdul:
        psf = hdul["PSF"].data
        assert psf.shape == (21, 21) and psf.sum() == pytest.approx(1.0, rel=1e-5)
        assert hdul[0].header["BUNIT"] == "nJy" and hdul[0].header["GALID"] == 0
    # Kolmogorov FWHMs from the truncated log-normal.
    fwhm = truth["psf_fwhm_intrinsic_arcsec"].to_numpy()
    assert np.all((fwhm >= 0.55) & (fwhm <= 1.3))


def test_seeded_and_frozen() -> None:
    params = target_domain_parameters(3)
    a, pa, ta = render_target_domain(params, SMALL)
    b, pb, tb = render_target_domain(params, SMALL)
    assert np.array_equal(a, b) and np.array_equal(pa, pb) and ta.equals(tb)
    other, _, _ = render_target_domain(params, SMALL, seed=FROZEN_TEST_SEED + 1)
    assert not np.array_equal(a, other)
    # The frozen test galaxies never change: the seed and the parameter stream are pinned.
    assert FROZEN_TEST_SEED == 19_005
    frozen = target_domain_parameters(8)
    assert frozen["component"].to_list().count("bulge+disk") == 6
    assert frozen["flux_nJy"][0] == pytest.approx(3588547.84, rel=1e-8)
