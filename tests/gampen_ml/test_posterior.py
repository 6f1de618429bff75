"""Posterior statistics on distributions with known answers."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from scipy import optimize, stats

from gampen_ml.config import CREDIBLE_LEVELS
from gampen_ml.posterior import (
    PosteriorError,
    binned_coverage,
    coverage,
    expected_coverage_curve,
    hpd_interval,
    hpd_intervals,
    kde_mode,
    n_in_interval,
    summarize,
    tarp_coverage,
)


def analytic_hpd(dist, level: float) -> tuple[float, float]:
    """Shortest interval of probability ``level`` of a unimodal scipy distribution."""

    def width(a_prob: float) -> float:
        return dist.ppf(a_prob + level) - dist.ppf(a_prob)

    res = optimize.minimize_scalar(
        width, bounds=(0.0, 1.0 - level), method="bounded", options={"xatol": 1e-10}
    )
    return float(dist.ppf(res.x)), float(dist.ppf(res.x + level))


def test_n_in_interval_rounds_up_without_float_noise():
    assert n_in_interval(0.6827, 1000) == 683
    assert n_in_interval(0.7, 1000) == 700  # 0.7 * 1000 = 700.0000000000001
    assert n_in_interval(1.0, 10) == 10
    with pytest.raises(PosteriorError):
        n_in_interval(1.5, 10)


def test_gaussian_hpd_is_mean_plus_minus_z_sigma():
    rng = np.random.default_rng(0)
    mu = rng.uniform(-5, 5, size=40)
    sigma = rng.uniform(0.1, 3.0, size=40)
    x = mu[:, None] + sigma[:, None] * rng.standard_normal((40, 20000))
    for level, z in zip(CREDIBLE_LEVELS, (1.0, 2.0, 3.0), strict=True):
        lo, hi = hpd_interval(x, level)
        # The width is sharp; the window's position wanders where the density is flat.
        half_width = (hi - lo) / (2 * sigma)
        assert abs(half_width.mean() - z) < (0.01 if z < 3 else 0.03)
        np.testing.assert_allclose(half_width, z, atol=0.05 if z < 3 else 0.15)
        np.testing.assert_allclose((lo - mu) / sigma, -z, atol=0.15 if z < 3 else 0.25)
        np.testing.assert_allclose((hi - mu) / sigma, z, atol=0.15 if z < 3 else 0.25)


@pytest.mark.parametrize(
    "dist",
    [stats.gamma(a=2.0, scale=1.5), stats.lognorm(s=0.6, scale=2.0)],
    ids=["gamma", "lognorm"],
)
def test_skewed_hpd_matches_analytic_hpd_not_central_interval(dist):
    x = dist.rvs(size=(8, 40000), random_state=np.random.default_rng(1))
    lo_all, hi_all = hpd_intervals(x, (0.6827, 0.9545))
    for i, level in enumerate((0.6827, 0.9545)):
        a, b = analytic_hpd(dist, level)
        c_lo = dist.ppf((1 - level) / 2)
        assert abs(a - c_lo) > 0.1  # the HPD really differs from the central interval
        scale = b - a
        np.testing.assert_allclose(lo_all[i], a, atol=0.03 * scale)
        np.testing.assert_allclose(hi_all[i], b, atol=0.03 * scale)
        # and it is shorter than the central interval of the same samples
        central = np.quantile(x, [(1 - level) / 2, (1 + level) / 2], axis=1)
        assert np.all(hi_all[i] - lo_all[i] < central[1] - central[0])


def test_bt_point_masses_at_zero_and_one():
    rng = np.random.default_rng(2)
    t = 10000
    zero_pile = np.concatenate([np.zeros(t // 2), rng.uniform(0, 0.5, t // 2)])
    one_pile = 1.0 - zero_pile
    x = np.stack([zero_pile, one_pile])
    lo, hi = hpd_interval(x, 0.6827)
    # the spike (mass 0.5) plus 0.1827 of uniform density 1 -> width 0.1827
    np.testing.assert_allclose([lo[0], hi[0]], [0.0, 0.1827], atol=0.01)
    np.testing.assert_allclose([lo[1], hi[1]], [1 - 0.1827, 1.0], atol=0.01)
    assert lo[0] == 0.0 and hi[1] == 1.0
    lo40, hi40 = hpd_interval(x, 0.40)  # less than the pile: zero-width interval on it
    np.testing.assert_array_equal(lo40, [0.0, 1.0])
    np.testing.assert_array_equal(hi40, [0.0, 1.0])
    # truth exactly on the pile is covered (inclusive bounds)
    assert coverage(lo40, hi40, np.array([0.0, 1.0])) == 1.0


def test_hpd_intervals_are_nested_and_plain_hpd_when_unimodal():
    from gampen_ml.posterior import hpd_interval, hpd_intervals

    rng = np.random.default_rng(11)
    gauss = rng.normal(size=(200, 2000))
    lo, hi = hpd_intervals(gauss, CREDIBLE_LEVELS)
    for i, level in enumerate(CREDIBLE_LEVELS):
        plain = hpd_interval(gauss, level)
        np.testing.assert_array_equal(lo[i], plain[0])
        np.testing.assert_array_equal(hi[i], plain[1])
    # A B/T posterior piled against both ends (the trained quick model's uncertain
    # galaxies): a tight pile near 0, a looser one near 1, some mass between. The plain
    # 99.73 % interval drops the top of the looser pile that the 68 % interval holds.
    shape = (400, 1000)
    near_0 = 1e-4 * np.exp(rng.normal(size=shape))
    near_1 = 1 - 1e-3 * np.exp(rng.normal(size=shape))
    pick = rng.uniform(size=shape)
    u = np.where(pick < 0.25, near_0, np.where(pick < 0.8, near_1, rng.uniform(size=shape)))
    plain = [hpd_interval(u, level) for level in CREDIBLE_LEVELS]
    not_nested = (plain[2][0] > plain[0][0]) | (plain[0][1] > plain[2][1])
    assert not_nested.any()  # the case this guards against exists
    lo, hi = hpd_intervals(u, CREDIBLE_LEVELS)
    assert np.all(lo[2] <= lo[1]) and np.all(lo[1] <= lo[0])
    assert np.all(hi[0] <= hi[1]) and np.all(hi[1] <= hi[2])
    # The catalog summary uses the same nested intervals.
    summary = summarize(u[:, :, None], parameters=("bt",))
    np.testing.assert_array_equal(summary["bt_hpd68_lo"].to_numpy(), lo[0])
    np.testing.assert_array_equal(summary["bt_hpd99_hi"].to_numpy(), hi[2])
    # Each interval still holds its share of the samples.
    for i, level in enumerate(CREDIBLE_LEVELS):
        inside = ((u >= lo[i][:, None]) & (u <= hi[i][:, None])).mean(axis=1)
        assert np.all(inside >= level - 1e-9)


def test_kde_mode_agrees_with_scipy_gaussian_kde_argmax():
    rng = np.random.default_rng(3)
    x = np.concatenate(
        [rng.gamma(2.5, 1.0, size=(6, 800)), 3 + 0.2 * rng.standard_normal((6, 800))]
    )
    ours = kde_mode(x)
    for row, mode in zip(x, ours, strict=True):
        kde = stats.gaussian_kde(row)
        grid = np.linspace(row.min(), row.max(), 20001)
        ref = grid[np.argmax(kde(grid))]
        assert abs(mode - ref) < 0.005 * row.std()
    # gamma(2.5) has its true mode at 1.5 (the smoothed KDE leans towards the mean, 2.5)
    assert 1.4 < ours[:6].mean() < 1.8
    np.testing.assert_allclose(ours[6:], 3.0, atol=0.1)


def test_kde_mode_degenerate_and_point_mass():
    x = np.full((2, 50), 0.25)
    np.testing.assert_array_equal(kde_mode(x), [0.25, 0.25])
    rng = np.random.default_rng(4)
    piled = np.concatenate([np.zeros(600), rng.uniform(0, 1, 400)])[None]
    assert abs(kde_mode(piled)[0]) < 0.05


def test_summarize_columns_and_values():
    rng = np.random.default_rng(5)
    samples = np.stack(
        [
            rng.beta(2, 5, size=(30, 2000)),
            rng.lognormal(0.0, 0.1, size=(30, 2000)),
            rng.normal(1e5, 1e3, size=(30, 2000)),
        ],
        axis=-1,
    )
    df = summarize(samples)
    assert df.height == 30
    assert df.columns[:4] == ["bt_mode", "bt_mean", "bt_median", "bt_std"]
    assert "flux_nJy_hpd99_hi" in df.columns and len(df.columns) == 3 * 10
    assert all(dtype == pl.Float64 for dtype in df.dtypes)
    np.testing.assert_allclose(df["bt_mean"], samples[:, :, 0].mean(1))
    np.testing.assert_allclose(df["re_arcsec_median"], np.median(samples[:, :, 1], 1))
    np.testing.assert_allclose(df["flux_nJy_std"], samples[:, :, 2].std(1, ddof=1))
    np.testing.assert_allclose(df["bt_mode"], kde_mode(samples[:, :, 0]))
    assert abs(df["bt_mode"].mean() - 0.2) < 0.03  # beta(2, 5) has its mode at 1/5
    col = {c: df[c].to_numpy() for c in df.columns}
    assert np.all(col["bt_hpd68_lo"] <= col["bt_mode"]) and np.all(
        col["bt_mode"] <= col["bt_hpd68_hi"]
    )
    assert np.all(col["bt_hpd95_hi"] - col["bt_hpd95_lo"] > col["bt_hpd68_hi"] - col["bt_hpd68_lo"])
    with pytest.raises(PosteriorError, match="shape"):
        summarize(samples[:, :, :2])
    bad = samples.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(PosteriorError, match="NaN"):
        summarize(bad)


def _synthetic(spread: float, n: int = 3000, t: int = 300, seed: int = 6):
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=n)
    sigma = rng.uniform(0.5, 2.0, size=n)
    truth = centre + sigma * rng.standard_normal(n)
    samples = centre[:, None] + spread * sigma[:, None] * rng.standard_normal((n, t))
    return samples, truth


@pytest.mark.parametrize(("spread", "sign"), [(1.0, 0), (1.5, 1), (0.6, -1)])
def test_coverage_calibrated_over_and_under_dispersed(spread, sign):
    samples, truth = _synthetic(spread)
    levels = np.array(CREDIBLE_LEVELS)
    cov = expected_coverage_curve(samples, truth, levels)
    # truth ~ N(c, s^2), interval c +- z * spread * s: coverage = 2 Phi(z * spread) - 1
    expected = 2 * stats.norm.cdf(np.array([1.0, 2.0, 3.0]) * spread) - 1
    np.testing.assert_allclose(cov, expected, atol=0.035)  # T=300: HPDs a bit short
    if sign == 0:
        np.testing.assert_allclose(cov, levels, atol=0.025)
    elif sign > 0:
        assert np.all(cov[:2] > levels[:2] + 0.03)
    else:
        assert np.all(cov < levels - 0.05)
    lo, hi = hpd_interval(samples, levels[0])
    assert coverage(lo, hi, truth) == pytest.approx(cov[0])


def test_expected_coverage_curve_multi_parameter_shape_and_monotone():
    # T = 1000 as in the paper: sample HPDs from few samples are biased short (T=300: -3 pts)
    s1, t1 = _synthetic(1.0, n=1000, t=1000)
    s2, t2 = _synthetic(0.5, n=1000, t=1000, seed=7)
    curve = expected_coverage_curve(np.stack([s1, s2], -1), np.stack([t1, t2], -1))
    assert curve.shape == (99, 2)
    # sample HPD windows at neighbouring levels need not nest, so only the trend is monotone
    assert np.all(np.diff(curve[::10], axis=0) > 0)
    assert np.mean(np.abs(curve[:, 0] - np.linspace(0.01, 0.99, 99))) < 0.03
    assert np.all(curve[20:, 1] < np.linspace(0.01, 0.99, 99)[20:])


def test_binned_coverage_by_column():
    truth = np.array([0.1, 0.5, 0.9, 0.3])
    cat = {"magnitude_mode": np.array([20.0, 20.5, 22.0, 22.5])}
    for p in ("bt", "re_arcsec", "flux_nJy"):
        cat[f"{p}_true"] = truth
        for tag in ("hpd68", "hpd95", "hpd99"):
            cat[f"{p}_{tag}_lo"] = np.array([0.0, 0.6, 0.0, 0.0])
            cat[f"{p}_{tag}_hi"] = np.array([1.0, 1.0, 1.0, 0.2])
    out = binned_coverage(pl.DataFrame(cat), "magnitude_mode", [19, 21, 23])
    assert out.height == 2 * 3 * 3
    row = out.filter((pl.col("parameter") == "bt") & (pl.col("level") == 0.6827))
    assert row["n"].to_list() == [2, 2]
    assert row["coverage"].to_list() == [0.5, 0.5]


def _joint_draws(n: int, narrow_scale: float, seed: int, t: int = 200):
    """Truths ``(n, 3)``, and ``(n, t, 3)`` draws of calibrated (unit-width) posteriors about
    ``n`` random centres and of posteriors ``narrow_scale`` times as wide."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=(n, 3))
    truth = centre + rng.standard_normal((n, 3))
    good = centre[:, None] + rng.standard_normal((n, t, 3))
    narrow = centre[:, None] + narrow_scale * rng.standard_normal((n, t, 3))
    return truth, good, narrow


def test_tarp_joint_coverage_detects_miscalibration():
    n = 1000
    truth, good, narrow = _joint_draws(n, narrow_scale=0.4, seed=8)
    state = np.random.get_state()  # noqa: NPY002
    ecp, alpha, err_good = tarp_coverage(good, truth, seed=1)
    assert np.random.get_state()[1][0] == state[1][0]  # noqa: NPY002 (global RNG untouched)
    _, _, err_narrow = tarp_coverage(narrow, truth, seed=1)
    assert ecp.shape == alpha.shape == (n // 10 + 1,)
    assert err_good < 0.04 < 0.1 < err_narrow
    assert tarp_coverage(good, truth, seed=1)[2] == err_good  # reproducible


def test_tarp_null_is_the_scale_of_calibrated():
    """A calibrated model's TARP error lies inside the null; a 2x too narrow one far beyond."""
    from gampen_ml.posterior import tarp_null_errors

    truth, good, narrow = _joint_draws(500, narrow_scale=0.5, seed=9)
    null = tarp_null_errors(good, seed=3, n_replicates=8)
    assert null.shape == (8,) and (null > 0).all()  # finite N: never exactly 0
    err_good = tarp_coverage(good, truth, seed=1)[2]
    err_narrow = tarp_coverage(narrow, truth, seed=1)[2]
    assert err_good < 2 * null.max()
    assert err_narrow > 3 * null.max()
    np.testing.assert_array_equal(null, tarp_null_errors(good, seed=3, n_replicates=8))
