"""Misspecified variants: each renders the property it claims, deterministically."""

import numpy as np
import polars as pl
import pytest
from scipy.stats import kurtosis

from gampen_ml.config import ImagingConfig, NoiseConfig, PriorConfig, PSFConfig
from gampen_ml.flags import image_asymmetry
from gampen_ml.sim.misspecified import (
    KNOT_FRACTION,
    PSF_OUTSIDE_FWHM_ARCSEC,
    VARIANTS,
    MisspecificationError,
    composite_re_with_bar,
    render_misspecified,
)
from gampen_ml.sim.noise import synthetic_noise_pool
from gampen_ml.sim.parameters import composite_re_arcsec, quantize_sersic_n, sample_parameters
from gampen_ml.sim.psf import measure_fwhm_arcsec, synthetic_psf_library

IMAGING = ImagingConfig(stamp_size_px=129)  # 21.7" stamp: room for a neighbour at <= 10"
PSF_CFG = PSFConfig(n_psfs=2, stamp_size_px=25)


@pytest.fixture(scope="module")
def library():
    cube, table = synthetic_psf_library(PSF_CFG, IMAGING, seed=1)
    quiet = synthetic_noise_pool(NoiseConfig(n_sky_objects=4, sky_sigma_nJy=1e-6), IMAGING, 2)
    return cube, table, quiet


def bulge_disk(n: int, seed: int = 0) -> pl.DataFrame:
    """Bright, compact bulge+disk galaxies (fit in the small stamp)."""
    priors = PriorConfig(
        bulge_disk_fraction=1.0, re_arcsec=(0.8, 1.5), bulge_re_arcsec=(0.3, 0.6),
        flux_nJy=(1e5, 2e5), bt=(0.3, 0.7),
    )  # fmt: skip
    return quantize_sersic_n(sample_parameters(priors, n, np.random.default_rng(seed)), 0.02)


def centroid(images: np.ndarray) -> np.ndarray:
    """Light-weighted centroid (x, y) in pixels from the stamp centre, (N, 2)."""
    s = images.shape[-1]
    c = np.arange(s) - (s - 1) / 2
    tot = images.sum(axis=(1, 2))
    return np.stack(
        [(images.sum(axis=1) * c).sum(1) / tot, (images.sum(axis=2) * c).sum(1) / tot], 1
    )


def test_every_variant_is_finite_deterministic_and_labelled(library):
    cube, _, pool = library
    params = bulge_disk(3)
    for variant in VARIANTS:
        a, la = render_misspecified(variant, params, cube, pool, IMAGING, seed=5, psf_cfg=PSF_CFG)
        b, lb = render_misspecified(variant, params, cube, pool, IMAGING, seed=5, psf_cfg=PSF_CFG)
        assert a.shape == (3, 129, 129) and a.dtype == np.float32 and np.isfinite(a).all()
        np.testing.assert_array_equal(a, b)
        assert la.equals(lb) and (la["variant"] == variant).all()
        # Truth labels of the main galaxy: B/T and flux never change.
        np.testing.assert_array_equal(la["bt"].to_numpy(), params["bt"].to_numpy())
        np.testing.assert_array_equal(la["flux_nJy"].to_numpy(), params["flux_nJy"].to_numpy())
    with pytest.raises(MisspecificationError, match="spiral"):
        render_misspecified("spiral", params, cube, pool, IMAGING, seed=5)


def test_knots_conserve_flux_and_are_clumpier(library):
    cube, _, pool = library
    params = bulge_disk(4).with_columns(pl.lit(0.0).alias("bt"))  # pure disks: knots visible
    params = params.with_columns(
        pl.Series("re_arcsec", composite_re_arcsec(
            params["bt"].to_numpy(), params["disk_n"].to_numpy(), params["disk_re_arcsec"].to_numpy(),
            params["bulge_n"].to_numpy(), params["bulge_re_arcsec"].to_numpy()))
    )  # fmt: skip
    smooth, _ = render_misspecified("nominal", params, cube, pool, IMAGING, 3, psf_cfg=PSF_CFG)
    knots, labels = render_misspecified("knots", params, cube, pool, IMAGING, 3, psf_cfg=PSF_CFG)
    other, _ = render_misspecified("knots", params, cube, pool, IMAGING, 4, psf_cfg=PSF_CFG)
    assert labels["affected"].all() and (labels["knot_fraction"] == KNOT_FRACTION).all()
    assert labels["n_knots"].is_between(20, 80).all()
    np.testing.assert_allclose(knots.sum(axis=(1, 2)), smooth.sum(axis=(1, 2)), rtol=2e-3)
    # Knots make the light clumpier: relative to the smooth disk of the same galaxy, the
    # light moved into the knots sits in PSF-sized peaks, so the difference image inside
    # 2.5" is heavy-tailed (positive excess pixel kurtosis; a Gaussian field has 0).
    s = 129
    radius = np.hypot(*np.meshgrid(np.arange(s) - 64, np.arange(s) - 64)) * 0.168
    diff = (knots - smooth)[:, radius < 2.5].astype(np.float64)
    assert np.all(kurtosis(diff, axis=1) > 0.3)
    # ... and break the 180-degree symmetry of every training galaxy.
    assert np.all(image_asymmetry(knots) > 0.02)
    assert np.all(np.abs(image_asymmetry(smooth)) < 0.003)
    assert not np.array_equal(knots, other)


def test_offcentre_bulge_shifts_the_bulge_light(library):
    cube, _, pool = library
    params = bulge_disk(4, seed=1)
    nominal, _ = render_misspecified("nominal", params, cube, pool, IMAGING, 7, psf_cfg=PSF_CFG)
    shifted, labels = render_misspecified(
        "offcentre_bulge", params, cube, pool, IMAGING, 7, psf_cfg=PSF_CFG
    )
    offset = labels["bulge_offset_px"].to_numpy()
    angle = np.radians(labels["bulge_offset_angle_deg"].to_numpy())
    assert np.all((offset >= 0.5) & (offset <= 2.0))
    np.testing.assert_allclose(centroid(nominal), 0.0, atol=0.02)
    # Centroid of the difference image (bulge moved away) vs the bulge's light fraction:
    # the total-light centroid moves by B/T x offset in the requested direction.
    moved = centroid(shifted)
    expected = (params["bt"].to_numpy() * offset)[:, None] * np.stack(
        [np.cos(angle), np.sin(angle)], 1
    )
    np.testing.assert_allclose(moved, expected, atol=0.05)


def test_bar_keeps_bt_and_recomputes_re(library):
    cube, _, pool = library
    params = bulge_disk(3, seed=2)
    images, labels = render_misspecified("bar", params, cube, pool, IMAGING, 8, psf_cfg=PSF_CFG)
    frac = labels["bar_flux_fraction"].to_numpy()
    assert np.all((frac >= 0.1) & (frac <= 0.3)) and np.all(labels["bar_q"].to_numpy() <= 0.3)
    # A bar more compact than the disk shrinks the composite Re.
    assert np.all(labels["re_arcsec"].to_numpy() < params["re_arcsec"].to_numpy())
    # Bar fraction 0 reproduces the two-component composite radius exactly.
    args = [
        params[c].to_numpy()
        for c in ("bt", "disk_n", "disk_re_arcsec", "bulge_n", "bulge_re_arcsec")
    ]
    zero = composite_re_with_bar(args[0], np.zeros(3), *args[1:], bar_re_arcsec=args[2] * 0.5)
    np.testing.assert_allclose(zero, params["re_arcsec"].to_numpy(), rtol=1e-8)
    np.testing.assert_allclose(images.sum(axis=(1, 2)), params["flux_nJy"].to_numpy(), rtol=0.02)


def test_neighbour_is_a_second_peak_at_the_requested_separation(library):
    cube, _, pool = library
    params = bulge_disk(3, seed=3)
    imaging = ImagingConfig()  # 239 px = 40": every neighbour (<= 15") lies inside
    images, labels = render_misspecified(
        "neighbour", params, cube, pool, imaging, 9, psf_cfg=PSF_CFG
    )
    sep = labels["neighbour_separation_arcsec"].to_numpy()
    angle = np.radians(labels["neighbour_angle_deg"].to_numpy())
    ratio = labels["neighbour_flux_ratio"].to_numpy()
    assert np.all((sep >= 5) & (sep <= 15)) and np.all((ratio >= 0.05) & (ratio <= 0.30))
    dx, s = imaging.pixel_scale_arcsec, imaging.stamp_size_px
    yy, xx = np.mgrid[:s, :s] - (s - 1) / 2
    far = np.hypot(xx, yy) > 3.5 / dx  # mask the main galaxy
    for k in range(3):
        x_px, y_px = sep[k] * np.cos(angle[k]) / dx, sep[k] * np.sin(angle[k]) / dx
        iy, ix = np.unravel_index(np.argmax(np.where(far, images[k], -np.inf)), (s, s))
        assert np.hypot(xx[iy, ix] - x_px, yy[iy, ix] - y_px) <= 1.5
    np.testing.assert_allclose(
        images.sum(axis=(1, 2)), params["flux_nJy"].to_numpy() * (1 + ratio), rtol=0.02
    )


def test_psf_outside_is_broader_than_the_library(library):
    cube, table, pool = library
    params = bulge_disk(3, seed=4)
    images, labels = render_misspecified(
        "psf_outside", params, cube, pool, IMAGING, 10, psf_cfg=PSF_CFG
    )
    fwhm = labels["psf_fwhm_arcsec"].to_numpy()
    assert labels["psf_id"].null_count() == 3
    lib_max = table["measured_fwhm_arcsec"].max()
    assert np.all(fwhm > max(lib_max, PSF_CFG.fwhm_range_arcsec[1]) - 0.05)
    assert np.all(fwhm > PSF_OUTSIDE_FWHM_ARCSEC[0] - 0.05) and np.all(
        fwhm < PSF_OUTSIDE_FWHM_ARCSEC[1] + 0.1
    )
    nominal, lab_nom = render_misspecified(
        "nominal", params, cube, pool, IMAGING, 10, psf_cfg=PSF_CFG
    )
    assert np.all(lab_nom["psf_fwhm_arcsec"].to_numpy() < PSF_CFG.fwhm_range_arcsec[1] + 0.05)
    # Broader PSF: lower peak, same flux.
    assert np.all(images.max(axis=(1, 2)) < nominal.max(axis=(1, 2)))
    np.testing.assert_allclose(images.sum(axis=(1, 2)), nominal.sum(axis=(1, 2)), rtol=0.02)
    # measured from the image of a point-like source? the PSF itself is measured in labels
    assert measure_fwhm_arcsec(cube[0], IMAGING.pixel_scale_arcsec) < fwhm.min()
