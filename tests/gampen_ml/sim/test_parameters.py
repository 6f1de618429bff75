"""Table-1 priors, kpc limits and the composite half-light radius."""

from __future__ import annotations

import numpy as np
import pytest
from astropy.cosmology import Planck18
from scipy import integrate, stats
from scipy.special import gammainc, gammaincinv

from gampen_ml.config import PriorConfig
from gampen_ml.sim.parameters import (
    PARAMETER_COLUMNS,
    composite_re_arcsec,
    quantize_sersic_n,
    re_limits_arcsec,
    sample_parameters,
)

PRIORS = PriorConfig()


@pytest.fixture(scope="module")
def params():
    return sample_parameters(PRIORS, 4000, np.random.default_rng(11))


def test_kpc_limits_follow_planck18():
    d_a_kpc = Planck18.angular_diameter_distance(0.125).to_value("kpc")
    to_arcsec = np.degrees(1.0 / d_a_kpc) * 3600.0
    limits = re_limits_arcsec(PRIORS)
    assert limits.re_arcsec == pytest.approx(
        (max(0.1, 0.25 * to_arcsec), min(5.0, 11.5 * to_arcsec))
    )
    assert limits.bulge_re_arcsec == pytest.approx((0.25 * to_arcsec, 3.0))
    # Planck18 at z=0.125: ~2.32 kpc per arcsec, so 11.5 kpc < 5" and 7 kpc > 3".
    assert 4.9 < limits.re_arcsec[1] < 5.0
    assert 0.105 < limits.re_arcsec[0] < 0.111


def test_columns_and_component_fractions(params):
    assert params.columns == list(PARAMETER_COLUMNS)
    comp = params["component"].to_numpy()
    assert (comp == "bulge+disk").sum() == 3000
    assert (comp == "disk").sum() == 500 and (comp == "bulge").sum() == 500
    disk = params.filter(params["component"] == "disk")
    bulge = params.filter(params["component"] == "bulge")
    assert (disk["bt"] == 0).all() and disk["bulge_n"].null_count() == disk.height
    assert (bulge["bt"] == 1).all() and bulge["disk_n"].null_count() == bulge.height


def test_ranges_and_uniformity(params):
    lim = re_limits_arcsec(PRIORS)
    two = params.filter(params["component"] == "bulge+disk")
    single_bulge = params.filter(params["component"] == "bulge")

    def ks_uniform(x, lo, hi):
        x = np.asarray(x)
        assert x.min() >= lo and x.max() <= hi
        return stats.kstest(x, stats.uniform(lo, hi - lo).cdf).pvalue

    checks = [
        (params["disk_n"].drop_nulls(), *PRIORS.disk_sersic_n),
        (params["bulge_n"].drop_nulls(), *PRIORS.bulge_sersic_n),
        (params["disk_re_arcsec"].drop_nulls(), *lim.re_arcsec),
        (two["bulge_re_arcsec"], *lim.bulge_re_arcsec),
        (single_bulge["bulge_re_arcsec"], *lim.re_arcsec),
        (params["flux_nJy"], *PRIORS.flux_nJy),
        (two["bt"], 0.0, 1.0),
        (params["disk_q"].drop_nulls(), *PRIORS.axis_ratio),
        (params["bulge_q"].drop_nulls(), *PRIORS.axis_ratio),
        (params["disk_pa_deg"].drop_nulls(), -90.0, 90.0),
    ]
    for x, lo, hi in checks:
        assert ks_uniform(x, lo, hi) > 1e-3
    # Bulge PA within 15 deg of the disk PA (modulo 180), and the offset is uniform.
    d = (two["bulge_pa_deg"] - two["disk_pa_deg"]).to_numpy()
    d = (d + 90.0) % 180.0 - 90.0
    assert np.abs(d).max() <= 15.0 + 1e-9
    assert ks_uniform(d, -15.0, 15.0) > 1e-3
    np.testing.assert_allclose(params["magnitude"], 31.4 - 2.5 * np.log10(params["flux_nJy"]))
    assert params["magnitude"].min() > 14.6 and params["magnitude"].max() < 23.9


def test_loguniform_fraction_mixes_log_uniform_radii_and_fluxes():
    """A fraction f of the galaxies is log-uniform in Re and flux; f = 0 is the uniform stream."""
    import dataclasses

    n = 20000
    uniform = sample_parameters(PRIORS, n, np.random.default_rng(5))
    zero = dataclasses.replace(PRIORS, loguniform_fraction=0.0)
    assert sample_parameters(zero, n, np.random.default_rng(5)).equals(uniform)

    lo, hi = PRIORS.flux_nJy
    for f in (0.3, 1.0):
        mixed = sample_parameters(
            dataclasses.replace(PRIORS, loguniform_fraction=f), n, np.random.default_rng(5)
        )
        flux = mixed["flux_nJy"].to_numpy()
        assert flux.min() >= lo and flux.max() <= hi

        # Mixture CDF: (1 - f) uniform + f log-uniform.
        def mixture(x, f=f):
            return (1 - f) * (x - lo) / (hi - lo) + f * np.log(x / lo) / np.log(hi / lo)

        assert stats.kstest(flux, mixture).pvalue > 1e-3
        disk_re = mixed["disk_re_arcsec"].drop_nulls().to_numpy()
        rlo, rhi = re_limits_arcsec(PRIORS).re_arcsec
        assert disk_re.min() >= rlo and disk_re.max() <= rhi
        share_small = np.mean(disk_re < 0.5)
        expect = (1 - f) * (0.5 - rlo) / (rhi - rlo) + f * np.log(0.5 / rlo) / np.log(rhi / rlo)
        assert abs(share_small - expect) < 0.02
        # Everything else keeps its uniform stream's layout: component mix and B/T of
        # two-component galaxies are unchanged.
        assert mixed["component"].equals(uniform["component"])
        assert mixed["bt"].equals(uniform["bt"])


def test_same_rng_same_draws():
    a = sample_parameters(PRIORS, 50, np.random.default_rng(3))
    b = sample_parameters(PRIORS, 50, np.random.default_rng(3))
    assert a.equals(b)


def test_composite_re_single_component_is_its_re(params):
    single = params.filter(params["component"] != "bulge+disk")
    re_comp = np.where(single["bt"] == 0, single["disk_re_arcsec"], single["bulge_re_arcsec"])
    np.testing.assert_array_equal(single["re_arcsec"].to_numpy(), re_comp)


def _brute_force_half_light(bt, dn, dre, bn, bre):
    # Integrate the two circular Sérsic surface brightness profiles numerically.
    def sb(r, n, re, flux):
        b = gammaincinv(2 * n, 0.5)
        norm = (
            flux
            * b ** (2 * n)
            / (2 * np.pi * n * re**2 * np.exp(0) * __import__("math").gamma(2 * n))
        )
        return norm * np.exp(-b * (r / re) ** (1 / n))

    def enclosed(radius):
        f = lambda r: 2 * np.pi * r * (sb(r, dn, dre, 1 - bt) + sb(r, bn, bre, bt))  # noqa: E731
        return integrate.quad(f, 0, radius, limit=200, points=[dre, bre])[0]

    total = enclosed(1e4)
    assert total == pytest.approx(1.0, rel=1e-6)
    lo, hi = 1e-3, 100.0
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if enclosed(mid) < 0.5 else (lo, mid)
    return 0.5 * (lo + hi)


def test_composite_re_brute_force():
    cases = [(0.3, 1.0, 2.0, 4.0, 0.5), (0.7, 0.9, 3.5, 4.8, 1.2), (0.5, 1.1, 0.4, 3.6, 2.5)]
    got = composite_re_arcsec(*map(np.array, zip(*cases, strict=True)))
    for value, case in zip(got, cases, strict=True):
        assert value == pytest.approx(_brute_force_half_light(*case), rel=1e-5)
        # And it encloses half of the analytic total.
        bt, dn, dre, bn, bre = case
        b_d, b_b = gammaincinv(2 * dn, 0.5), gammaincinv(2 * bn, 0.5)
        frac = (1 - bt) * gammainc(2 * dn, b_d * (value / dre) ** (1 / dn)) + bt * gammainc(
            2 * bn, b_b * (value / bre) ** (1 / bn)
        )
        assert frac == pytest.approx(0.5, abs=1e-9)
        assert min(dre, bre) < value < max(dre, bre)


def test_quantize_sersic_n_recomputes_re(params):
    q = quantize_sersic_n(params, 0.02)
    n = q["bulge_n"].drop_nulls().to_numpy()
    np.testing.assert_allclose(n / 0.02, np.round(n / 0.02), atol=1e-9)
    assert np.abs(q["disk_n"].drop_nulls() - params["disk_n"].drop_nulls()).max() <= 0.01 + 1e-9
    components = ("bt", "disk_n", "disk_re_arcsec", "bulge_n", "bulge_re_arcsec")
    expect = composite_re_arcsec(*(q[c].to_numpy() for c in components))
    np.testing.assert_allclose(q["re_arcsec"], expect)


def test_prior_range_report_accepts_draws_and_names_a_value_outside():
    import polars as pl

    from gampen_ml.sim.parameters import prior_range_report, prior_ranges, sample_parameters

    labels = sample_parameters(PRIORS, 400, np.random.default_rng(5))
    problems, rows = prior_range_report(labels, PRIORS)
    assert problems == []
    assert {r["parameter"] for r in rows} == set(prior_ranges(PRIORS))
    lo, hi = prior_ranges(PRIORS)["flux_nJy"]
    bad = labels.with_columns(pl.col("flux_nJy").clip(upper_bound=hi) * 1.01)
    problems, _ = prior_range_report(bad, PRIORS)
    assert len(problems) == 1 and problems[0].startswith("flux_nJy in [")
    assert f"[{lo:g}, {hi:g}]" in problems[0]
    # A value within float rounding of a bound passes.
    at_bound = labels.with_columns(pl.lit(hi * (1 + 1e-12)).alias("flux_nJy"))
    assert prior_range_report(at_bound, PRIORS)[0] == []
