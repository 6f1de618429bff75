"""Independent shift-suite renderer: truths, PSF families, sky, offsets, streams."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from gampen_ml.config import ImagingConfig, PriorConfig, PSFConfig
from gampen_ml.sim.independent import (
    PSF_FAMILY_MOFFAT_BETA,
    VARIATIONS,
    IndependentRenderError,
    draw_population,
    draw_psf,
    galaxy_streams,
    intrinsic_profile,
    render_variations,
)
from gampen_ml.sim.parameters import (
    PARAMETER_COLUMNS,
    composite_re_arcsec,
    flux_to_magnitude,
    re_limits_arcsec,
)
from tests.gampen_ml.sim.stamp_photometry import half_light_radius_arcsec

IMAGING = ImagingConfig(stamp_size_px=63)
WIDE = ImagingConfig(stamp_size_px=95)  # 16": the wings of a compact galaxy fit
PSF_CFG = PSFConfig()
SKY_NJY = 2.3


def render_independent(variation, *args, **kwargs):
    """One variation of :func:`render_variations`: ``(images, labels)``."""
    return render_variations((variation,), *args, **kwargs)[variation]


def compact(n: int, seed: int = 0, bulge_disk_fraction: float = 1.0) -> pl.DataFrame:
    """Bright, compact galaxies (continuous Sérsic n) that fit a 63 px stamp."""
    priors = PriorConfig(
        bulge_disk_fraction=bulge_disk_fraction, re_arcsec=(0.3, 0.5),
        bulge_re_arcsec=(0.15, 0.3), flux_nJy=(1e5, 2e5), bt=(0.3, 0.7),
    )  # fmt: skip
    return draw_population(priors, n, np.random.default_rng(seed))


def centroid_px(images: np.ndarray) -> np.ndarray:
    """Light-weighted centroid (x, y) in pixels from the stamp centre, (N, 2)."""
    s = images.shape[-1]
    c = np.arange(s) - (s - 1) / 2
    tot = images.sum(axis=(1, 2))
    return np.stack([(images.sum(1) * c).sum(1) / tot, (images.sum(2) * c).sum(1) / tot], 1)


def corner_pixels(images: np.ndarray, size: int = 25) -> np.ndarray:
    """The four ``size x size`` corners of each stamp, flattened, (N, 4 size^2)."""
    k = size
    parts = [images[:, :k, :k], images[:, :k, -k:], images[:, -k:, :k], images[:, -k:, -k:]]
    return np.concatenate([p.reshape(len(images), -1) for p in parts], axis=1)


def test_noise_free_flux_matches_the_label():
    params = compact(3, seed=1)
    for variation in ("nominal", "psf_family", "offset"):
        images, labels = render_independent(
            variation, params, WIDE, PSF_CFG, SKY_NJY, seed=4, noise=False
        )
        assert images.shape == (3, 95, 95) and images.dtype == np.float32
        np.testing.assert_allclose(images.sum(axis=(1, 2)), labels["flux_nJy"], rtol=0.015)
        # Truths are sample_parameters' own.
        for name in ("bt", "re_arcsec", "flux_nJy", "component"):
            assert labels[name].equals(params[name])
        assert labels["galaxy_id"].dtype == pl.Int64 and (labels["variation"] == variation).all()
    # Peak on the central pixel (odd stamp, no offset).
    nominal, _ = render_independent("nominal", params, WIDE, PSF_CFG, SKY_NJY, 4, noise=False)
    assert all(np.unravel_index(im.argmax(), im.shape) == (47, 47) for im in nominal)


@pytest.mark.parametrize("variation, q, pa_deg", [("nominal", 1.0, 0.0), ("bulge_tied", 0.6, 30.0)])
def test_intrinsic_half_light_radius_is_the_composite_label(variation, q, pa_deg):
    row = {
        "bt": 0.45, "flux_nJy": 1e5,
        "disk_n": 1.07, "disk_re_arcsec": 1.5, "disk_q": q, "disk_pa_deg": pa_deg,
        # Tied to the disk in bulge_tied; round anyway in the nominal case.
        "bulge_n": 4.31, "bulge_re_arcsec": 0.5, "bulge_q": 1.0 if q == 1 else 0.3,
        "bulge_pa_deg": -40.0,
    }  # fmt: skip
    expect = composite_re_arcsec(
        np.array([0.45]), np.array([1.07]), np.array([1.5]), np.array([4.31]), np.array([0.5])
    )[0]
    # Pixel-integrated (an n = 4 cusp sampled at pixel centres would be badly biased), 12".
    scale = 0.05
    image = intrinsic_profile(variation, row).drawImage(nx=241, ny=241, scale=scale)
    # Against the analytic total (the stamp truncates the wings).
    measured = half_light_radius_arcsec(image.array, q, pa_deg, scale, total=1e5)
    assert measured == pytest.approx(expect, rel=0.01)
    # The two components alone would give very different radii.
    assert not 0.8 < expect / 1.5 < 1.2 and not 0.8 < expect / 0.5 < 1.2


def test_bulge_tied_takes_the_disk_shape():
    params = compact(4, seed=2)
    _, nominal = render_independent("nominal", params, IMAGING, PSF_CFG, SKY_NJY, 1, noise=False)
    _, tied = render_independent("bulge_tied", params, IMAGING, PSF_CFG, SKY_NJY, 1, noise=False)
    np.testing.assert_array_equal(tied["bulge_q"], tied["disk_q"])
    np.testing.assert_array_equal(tied["bulge_pa_deg"], tied["disk_pa_deg"])
    assert (nominal["bulge_q"] != nominal["disk_q"]).all()
    assert (nominal["bulge_pa_deg"] != nominal["disk_pa_deg"]).all()
    assert nominal.select(params.columns).equals(params)  # nominal renders the draws as they are
    # In the profile: every isophote of the tied galaxy is an ellipse with the disk's q and
    # PA; the nominal bulge (q = 0.3, PA 50 deg off) breaks that.
    row = {
        "bt": 0.5, "flux_nJy": 1e5, "disk_n": 1.0, "disk_re_arcsec": 0.8, "disk_q": 0.5,
        "disk_pa_deg": 20.0, "bulge_n": 4.0, "bulge_re_arcsec": 0.4, "bulge_q": 0.3,
        "bulge_pa_deg": 70.0,
    }  # fmt: skip
    t = np.linspace(0.0, 2.0 * np.pi, 13)[:-1]
    pa = np.radians(20.0)
    for r_arcsec in (0.2, 0.6, 1.5):
        xp, yp = r_arcsec / np.sqrt(0.5) * np.cos(t), r_arcsec * np.sqrt(0.5) * np.sin(t)
        x, y = xp * np.cos(pa) - yp * np.sin(pa), xp * np.sin(pa) + yp * np.cos(pa)
        spread = {}
        for variation in ("nominal", "bulge_tied"):
            profile = intrinsic_profile(variation, row)
            sb = np.array([profile.xValue(float(u), float(v)) for u, v in zip(x, y, strict=True)])
            spread[variation] = sb.std() / sb.mean()
        assert spread["bulge_tied"] < 1e-6 and spread["nominal"] > 0.05, (r_arcsec, spread)


def test_psf_family_draws_both_families_within_ranges():
    # PSF draws alone (cheap), 200 galaxies.
    draws = [
        draw_psf("psf_family", PSF_CFG, galaxy_streams(7, i, "psf_family")) for i in range(200)
    ]
    nominal = [draw_psf("nominal", PSF_CFG, galaxy_streams(7, i, "nominal")) for i in range(200)]
    family = np.array([d.family for d in draws])
    beta = np.array([d.beta for d in draws])
    g = np.hypot([d.g1 for d in draws], [d.g2 for d in draws])
    fwhm = np.array([d.fwhm_arcsec for d in draws])
    assert 0.4 < (family == "moffat").mean() < 0.6
    moffat = family == "moffat"
    assert np.all((beta[moffat] >= 2.5) & (beta[moffat] <= 4.5)) and np.isnan(beta[~moffat]).all()
    assert beta[moffat].min() < 2.8 and beta[moffat].max() > 4.2  # spans the range
    assert g.max() <= 0.05 and g.min() < 0.005 and np.median(g) == pytest.approx(0.025, abs=0.008)
    lo, hi = PSF_CFG.fwhm_range_arcsec
    assert np.all((fwhm >= lo) & (fwhm <= hi))
    # Same FWHM as nominal for the same galaxy; nominal has the library's beta and shear rms.
    np.testing.assert_array_equal(fwhm, [d.fwhm_arcsec for d in nominal])
    assert {d.family for d in nominal} == {"moffat"} and {d.beta for d in nominal} == {3.5}
    assert np.median(fwhm) == pytest.approx(PSF_CFG.fwhm_median_arcsec, rel=0.03)
    assert np.std([d.g1 for d in nominal]) == pytest.approx(PSF_CFG.ellipticity_rms, rel=0.15)

    # Through the renderer: labels carry the same draws; the measured FWHM is the drawn one
    # broadened a little by the pixel.
    params = compact(6, seed=3)
    _, labels = render_independent("psf_family", params, IMAGING, PSF_CFG, SKY_NJY, 7, noise=False)
    assert set(labels["psf_family"]) == {"moffat", "kolmogorov"}
    mof = labels.filter(pl.col("psf_family") == "moffat")
    assert mof["psf_beta"].is_between(*PSF_FAMILY_MOFFAT_BETA).all()
    assert labels.filter(pl.col("psf_family") == "kolmogorov")["psf_beta"].is_null().all()
    assert (labels["psf_g"] <= 0.05).all()
    assert labels["psf_fwhm_intrinsic_arcsec"].is_between(lo, hi).all()
    ratio = labels["psf_fwhm_arcsec"] / labels["psf_fwhm_intrinsic_arcsec"]
    assert ratio.is_between(0.99, 1.08).all()
    np.testing.assert_array_equal(labels["psf_fwhm_intrinsic_arcsec"], fwhm[:6])


def test_sky_variations_scale_the_same_noise_field():
    params = compact(1, seed=4)
    images, sigma = {}, {}
    for variation in ("nominal", "sky_low", "sky_high", "bulge_tied", "psf_family"):
        noisy, labels = render_independent(variation, params, WIDE, PSF_CFG, SKY_NJY, seed=9)
        clean, _ = render_independent(variation, params, WIDE, PSF_CFG, SKY_NJY, 9, noise=False)
        images[variation], sigma[variation] = noisy, labels["sky_sigma_nJy"][0]
        # The noise field: identical standard normals times this variation's sigma.
        field = (noisy - clean).astype(np.float64) / sigma[variation]
        if variation == "nominal":
            nominal_field = field
        # (float32 rounding of the bright pixels; another realisation differs by ~1.)
        np.testing.assert_allclose(field, nominal_field, atol=1e-2)
    assert sigma == {
        "nominal": 2.3, "sky_low": 0.75 * 2.3, "sky_high": 1.25 * 2.3, "bulge_tied": 2.3,
        "psf_family": 2.3,
    }  # fmt: skip
    std = {v: corner_pixels(images[v]).std() for v in ("nominal", "sky_low", "sky_high")}
    assert std["nominal"] == pytest.approx(SKY_NJY, rel=0.05)  # 2,500 corner pixels
    assert std["sky_high"] / std["nominal"] == pytest.approx(1.25, rel=0.01)
    assert std["sky_low"] / std["nominal"] == pytest.approx(0.75, rel=0.01)


def test_offset_moves_the_galaxy_by_the_label():
    params = compact(3, seed=5)
    nominal, _ = render_independent("nominal", params, IMAGING, PSF_CFG, SKY_NJY, 2, noise=False)
    shifted, labels = render_independent("offset", params, IMAGING, PSF_CFG, SKY_NJY, 2, noise=False)  # fmt: skip
    offsets = labels.select("offset_x_px", "offset_y_px").to_numpy()
    assert np.all(np.abs(offsets) <= 0.5) and np.abs(offsets).max() > 0.2
    np.testing.assert_allclose(centroid_px(nominal), 0.0, atol=0.01)
    np.testing.assert_allclose(centroid_px(shifted), offsets, atol=0.05)
    _, nominal_labels = render_independent("nominal", params, IMAGING, PSF_CFG, SKY_NJY, 2)
    assert (nominal_labels["offset_x_px"] == 0).all() and (nominal_labels["offset_y_px"] == 0).all()


def test_results_do_not_depend_on_workers_or_chunking():
    params = compact(5, seed=6, bulge_disk_fraction=0.6)
    one, labels_one = render_independent("psf_family", params, IMAGING, PSF_CFG, SKY_NJY, 3)
    two, labels_two = render_independent(
        "psf_family", params, IMAGING, PSF_CFG, SKY_NJY, 3, n_workers=2
    )
    assert one.tobytes() == two.tobytes() and labels_one.equals(labels_two)
    # A galaxy's draws follow its galaxy_id, not its position in the table.
    tail, labels_tail = render_independent("psf_family", params[2:], IMAGING, PSF_CFG, SKY_NJY, 3)
    assert tail.tobytes() == one[2:].tobytes() and labels_tail.equals(labels_one[2:])
    other, _ = render_independent("psf_family", params, IMAGING, PSF_CFG, SKY_NJY, 4)
    assert not np.array_equal(one, other)
    # Several variations at once (galaxy-major) give each variation's own rendering.
    together = render_variations(
        ("nominal", "psf_family", "offset"), params, IMAGING, PSF_CFG, SKY_NJY, 3, n_workers=2
    )
    assert together["psf_family"][0].tobytes() == one.tobytes()
    assert together["psf_family"][1].equals(labels_one)
    alone, _ = render_independent("offset", params, IMAGING, PSF_CFG, SKY_NJY, 3)
    assert together["offset"][0].tobytes() == alone.tobytes()


def test_loguniform_population_is_log_uniform_within_the_ranges():
    priors = PriorConfig()
    limits = re_limits_arcsec(priors)
    logu = draw_population(priors, 600, np.random.default_rng(11), loguniform=True)
    flat = draw_population(priors, 600, np.random.default_rng(11))
    assert logu.columns == ["galaxy_id", *PARAMETER_COLUMNS]
    assert logu["galaxy_id"].dtype == pl.Int64 and logu["galaxy_id"].to_list() == list(range(600))
    two = logu["component"] == "bulge+disk"
    samples = {
        "disk_re": (
            logu["disk_re_arcsec"].drop_nulls(),
            flat["disk_re_arcsec"].drop_nulls(),
            limits.re_arcsec,
        ),  # fmt: skip
        "bulge_re": (
            logu.filter(two)["bulge_re_arcsec"],
            flat.filter(two)["bulge_re_arcsec"],
            limits.bulge_re_arcsec,
        ),  # fmt: skip
        "flux": (logu["flux_nJy"], flat["flux_nJy"], priors.flux_nJy),
    }
    for name, (values, uniform_values, (lo, hi)) in samples.items():
        values = values.to_numpy()
        assert np.all((values >= lo) & (values <= hi)), name
        below = (values < np.sqrt(lo * hi)).mean()
        assert below == pytest.approx(0.5, abs=0.1), name
        # The uniform prior would put far less there (a wrong implementation fails).
        assert (uniform_values.to_numpy() < np.sqrt(lo * hi)).mean() < 0.3, name
    single_bulge = logu.filter(pl.col("component") == "bulge")["bulge_re_arcsec"]
    assert single_bulge.is_between(*limits.re_arcsec).all() and single_bulge.max() > 3.0
    expect_re = composite_re_arcsec(
        *(
            logu[c].fill_null(np.nan).to_numpy()
            for c in ("bt", "disk_n", "disk_re_arcsec", "bulge_n", "bulge_re_arcsec")
        )  # fmt: skip
    )
    np.testing.assert_allclose(logu["re_arcsec"], expect_re, rtol=1e-9)
    np.testing.assert_allclose(logu["magnitude"], flux_to_magnitude(logu["flux_nJy"].to_numpy()))
    # Continuous Sérsic indices (no 0.02 grid); untouched columns are sample_parameters'.
    assert logu["bulge_n"].drop_nulls().n_unique() == logu["bulge_n"].drop_nulls().len()
    for name in ("component", "bt", "disk_n", "disk_q", "bulge_pa_deg"):
        assert logu[name].equals(flat[name])


def test_bad_input_raises_with_a_clear_message():
    params = compact(2)
    with pytest.raises(IndependentRenderError, match=r"'spiral'.*nominal.*loguniform"):
        render_independent("spiral", params, IMAGING, PSF_CFG, SKY_NJY, 1)
    with pytest.raises(ValueError, match="spiral"):
        intrinsic_profile("spiral", params.row(0, named=True))
    with pytest.raises(IndependentRenderError, match="duplicates"):
        render_independent("nominal", pl.concat([params, params]), IMAGING, PSF_CFG, 1.0, 1)
    with pytest.raises(IndependentRenderError, match="odd"):
        render_independent("nominal", params, ImagingConfig(stamp_size_px=64), PSF_CFG, 1.0, 1)
    with pytest.raises(IndependentRenderError, match="bulge_q"):
        render_independent("nominal", params.drop("bulge_q"), IMAGING, PSF_CFG, 1.0, 1)
    assert len(VARIATIONS) == 7


def test_the_suite_population_ignores_a_profiles_training_mixture():
    """``nominal`` is the paper's Table 1 and ``loguniform`` all log-uniform, whatever the
    profile's ``loguniform_fraction`` (a training choice, not the population scored)."""
    import dataclasses

    mixed = dataclasses.replace(PriorConfig(), loguniform_fraction=0.3)
    for loguniform in (False, True):
        a = draw_population(mixed, 400, np.random.default_rng(8), loguniform=loguniform)
        b = draw_population(PriorConfig(), 400, np.random.default_rng(8), loguniform=loguniform)
        assert a.equals(b)
    uniform = draw_population(PriorConfig(), 4000, np.random.default_rng(8))
    log = draw_population(PriorConfig(), 4000, np.random.default_rng(8), loguniform=True)
    # 2 % vs 53 % fainter than 19 mag (flux < 9.1e4 nJy).
    assert (uniform["magnitude"] > 19).mean() < 0.04
    assert 0.48 < (log["magnitude"] > 19).mean() < 0.58
