"""PSF library and noise pool: synthetic draws, FITS ingestion and validation, noise draws."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from astropy.io import fits

from gampen_ml.config import ImagingConfig, NoiseConfig, PSFConfig
from gampen_ml.sim import InputFileError
from gampen_ml.sim.noise import (
    draw_noise,
    load_sky_folder,
    read_noise_pool,
    synthetic_noise_pool,
    write_noise_pool,
)
from gampen_ml.sim.psf import (
    load_psf_folder,
    measure_fwhm_arcsec,
    read_psf_library,
    synthetic_psf_library,
    write_psf_library,
)

IMAGING = ImagingConfig()


def test_synthetic_psfs_fwhm_and_determinism(tmp_path):
    cfg = PSFConfig(n_psfs=6, stamp_size_px=31)
    cube, table = synthetic_psf_library(cfg, IMAGING, seed=5)
    assert cube.shape == (6, 31, 31) and cube.dtype == np.float32
    np.testing.assert_allclose(cube.sum(axis=(1, 2)), 1.0, atol=1e-5)
    np.testing.assert_allclose(table["sum"], 1.0, atol=1e-5)
    fwhm = table["fwhm_arcsec"].to_numpy()
    assert ((fwhm >= 0.55) & (fwhm <= 1.3)).all()
    # Pixelized effective PSF: measured FWHM a little above the requested one.
    ratio = table["measured_fwhm_arcsec"].to_numpy() / fwhm
    assert ((ratio > 0.97) & (ratio < 1.08)).all(), ratio
    # Centred: the peak is the central pixel.
    assert all(np.unravel_index(p.argmax(), p.shape) == (15, 15) for p in cube)
    cube2, table2 = synthetic_psf_library(cfg, IMAGING, seed=5)
    assert cube.tobytes() == cube2.tobytes() and table.equals(table2)
    write_psf_library(tmp_path, cube, table)
    cube3, table3 = read_psf_library(tmp_path)
    np.testing.assert_array_equal(cube3, cube)
    assert table3.equals(table)


def _write(path, data, header=None):
    fits.PrimaryHDU(np.asarray(data), header=header).writeto(path)


def test_load_psf_folder_resamples_by_header_scale(tmp_path):
    import galsim

    moffat = galsim.Moffat(beta=3.5, fwhm=0.9)
    fine = moffat.drawImage(nx=61, ny=61, scale=0.084, method="no_pixel").array
    coarse = moffat.drawImage(nx=31, ny=31, scale=0.168, method="no_pixel").array
    hdr = fits.Header()
    hdr["CD1_1"], hdr["CD2_2"] = -0.084 / 3600.0, 0.084 / 3600.0
    _write(tmp_path / "a_fine.fits", fine, hdr)
    _write(tmp_path / "b_native.fits", coarse)
    cube, table = load_psf_folder(tmp_path, IMAGING)
    assert cube.shape == (2, 31, 31)
    assert list(table["source"]) == ["a_fine.fits", "b_native.fits"]
    np.testing.assert_allclose(cube.sum(axis=(1, 2)), 1.0, atol=1e-5)
    # The resampled fine PSF matches the natively sampled one.
    np.testing.assert_allclose(cube[0], cube[1], atol=2e-3 * cube[1].max())
    assert measure_fwhm_arcsec(cube[0], 0.168) == pytest.approx(0.9, rel=0.05)


BAD_IMAGES = {
    "corrupt": None,
    "cube": np.ones((3, 9, 9)),
    "nan": np.where(np.eye(9) > 0, np.nan, 1.0),
    "zero": np.zeros((9, 9)),
}


@pytest.mark.parametrize("kind", sorted(BAD_IMAGES))
def test_bad_fits_rejected_naming_file(tmp_path, kind):
    folder = tmp_path / "in"
    folder.mkdir()
    _write(folder / "good.fits", np.ones((9, 9)))
    bad = folder / f"bad_{kind}.fits"
    if kind == "corrupt":
        bad.write_bytes(b"SIMPLE  = this is not a FITS file" * 10)
    else:
        _write(bad, BAD_IMAGES[kind])
    out = tmp_path / "out"
    out.mkdir()
    expected = {"corrupt": "FITS", "cube": "2-D", "nan": "NaN", "zero": "all zero"}[kind]
    for loader, writer in (
        (load_psf_folder, lambda r: write_psf_library(out, *r)),
        (load_sky_folder, lambda r: write_noise_pool(out, r)),
    ):
        with pytest.raises(InputFileError, match=expected) as err:
            writer(loader(folder, IMAGING))
        assert err.value.path.name == bad.name and bad.name in str(err.value)
        assert list(out.iterdir()) == []


def test_psf_negative_sum_rejected(tmp_path):
    _write(tmp_path / "neg.fits", -np.ones((9, 9)))
    with pytest.raises(InputFileError, match="sum must be positive"):
        load_psf_folder(tmp_path, IMAGING)


def test_synthetic_noise_pool_and_draws(tmp_path):
    cfg = NoiseConfig(n_sky_objects=50, sky_sigma_nJy=2.3)
    pool = synthetic_noise_pool(cfg, IMAGING, seed=1)
    assert pool.sky_objects.shape == (50, 12, 12)  # 2" / 0.168"/px
    stats = pool.statistics()
    assert stats["std_nJy"] == pytest.approx(2.3, rel=0.05)
    assert stats["mad_sigma_nJy"] == pytest.approx(2.3, rel=0.08)
    write_noise_pool(tmp_path, pool)
    back = read_noise_pool(tmp_path)
    np.testing.assert_array_equal(back.pixels, pool.pixels)
    noise = draw_noise(back, (4, 239, 239), np.random.default_rng(0))
    assert noise.shape == (4, 239, 239) and noise.dtype == np.float32
    # Every value comes from the pool, and the distribution matches it.
    assert np.isin(noise[0, :5].ravel(), pool.pixels).all()
    assert noise.mean() == pytest.approx(pool.pixels.mean(), abs=0.02)
    assert noise.std() == pytest.approx(pool.pixels.std(), rel=0.01)
    from scipy import stats as st

    assert st.ks_2samp(noise.ravel()[:20000], pool.pixels).pvalue > 1e-3
    again = draw_noise(back, (4, 239, 239), np.random.default_rng(0))
    assert again.tobytes() == noise.tobytes()


def test_real_sky_pool_keeps_every_pixel(tmp_path):
    rng = np.random.default_rng(4)
    a, b = rng.normal(0, 3.0, (12, 12)), rng.normal(1.0, 3.0, (14, 13))
    _write(tmp_path / "s1.fits", a)
    _write(tmp_path / "s2.fits", b)
    pool = load_sky_folder(tmp_path, IMAGING)
    assert pool.pixels.size == a.size + b.size
    assert pool.sky_objects.shape == (2, 12, 12)
    np.testing.assert_allclose(
        np.sort(pool.pixels), np.sort(np.r_[a.ravel(), b.ravel()]).astype(np.float32)
    )


def test_correlated_pool_uses_galsim_acs_noise():
    cfg = NoiseConfig(n_sky_objects=16, sky_sigma_nJy=2.3, correlated=True)
    pool = synthetic_noise_pool(cfg, IMAGING, seed=2)
    field = draw_noise(pool, (1, 128, 128), np.random.default_rng(1))[0]
    assert field.std() == pytest.approx(2.3, rel=0.15)
    # Neighbouring pixels are correlated (white noise would give ~0).
    rho = np.corrcoef(field[:, :-1].ravel(), field[:, 1:].ravel())[0, 1]
    assert rho > 0.1


def test_moffat_beta_range_varies_the_wings():
    """With a beta range the library's PSFs differ in their wings, not in their FWHM."""
    imaging = ImagingConfig()
    cfg = PSFConfig(n_psfs=40, fwhm_log_sigma=0.0, ellipticity_rms=0.0)  # all 0.85", round
    fixed, _ = synthetic_psf_library(cfg, imaging, seed=3)
    varied, table = synthetic_psf_library(
        dataclasses.replace(cfg, moffat_beta_range=(2.5, 4.5)), imaging, seed=3
    )
    s = cfg.stamp_size_px
    r = np.hypot(*(np.mgrid[:s, :s] - s // 2))
    wing = r > 2 * 0.85 / imaging.pixel_scale_arcsec

    def wings(cube):
        return (cube * wing).sum(axis=(1, 2))

    assert np.ptp(wings(fixed)) < 1e-6
    assert np.ptp(wings(varied)) > 0.02  # beta 2.5 puts several % more light in the wings
    np.testing.assert_allclose(table["measured_fwhm_arcsec"], 0.85, rtol=0.08)
