"""Coverage tables, dropout-rate selection and spread recalibration on synthetic posteriors."""

from __future__ import annotations

import dataclasses

import numpy as np
import polars as pl
import pytest

from gampen_ml.calibrate import (
    COVERAGE_TABLE_SCHEMA,
    FLOOR_GRID,
    MEAN_SHIFT_BINS,
    RECALIBRATION_LEVELS,
    SPREAD_BINS,
    CalibrationError,
    Recalibration,
    coverage_table,
    fit_mean_shift,
    fit_recalibration,
    fit_spread_profile,
    reshape_tails,
    search_physical_recalibration,
    select_dropout_rate,
    shift_means,
    stretch_by_mean,
)
from gampen_ml.config import CREDIBLE_LEVELS
from gampen_ml.posterior import expected_coverage_curve, hpd_intervals, summarize

LEVELS = np.array(CREDIBLE_LEVELS)


def synthetic(spread, n=3000, t=500, seed=0):
    """Scaled-space posteriors whose truth ~ N(centre, sigma); samples use spread * sigma."""
    rng = np.random.default_rng(seed)
    centre = rng.normal(size=(n, 3))
    sigma = np.exp(rng.normal(-1.0, 0.3, size=(n, 3)))
    truth = centre + sigma * rng.standard_normal((n, 3))
    samples = centre[:, None] + spread * sigma[:, None] * rng.standard_normal((n, t, 3))
    return samples.astype(np.float32), truth, (centre, sigma)


def _truth_frame(truth):
    return pl.DataFrame({"bt": truth[:, 0], "re_arcsec": truth[:, 1], "flux_nJy": truth[:, 2]})


def test_coverage_table_from_truths_and_from_catalog_true_columns():
    samples, truth, _ = synthetic(1.0, n=400, t=300)
    summary = summarize(samples)
    truths = pl.DataFrame({"bt": truth[:, 0], "re_arcsec": truth[:, 1], "flux_nJy": truth[:, 2]})
    table = coverage_table(summary, truths, CREDIBLE_LEVELS, dropout_rate=0.01, split="val")
    assert table.schema == pl.Schema(COVERAGE_TABLE_SCHEMA)
    assert table.height == 9
    row = table.filter((pl.col("parameter") == "re_arcsec") & (pl.col("level") == 0.9545))
    lo, hi = summary["re_arcsec_hpd95_lo"].to_numpy(), summary["re_arcsec_hpd95_hi"].to_numpy()
    assert row["coverage"].item() == np.mean((lo <= truth[:, 1]) & (truth[:, 1] <= hi))
    catalog = summary.with_columns(
        pl.Series("bt_true", truth[:, 0]),
        pl.Series("re_arcsec_true", truth[:, 1]),
        pl.Series("flux_nJy_true", truth[:, 2]),
    )
    same = coverage_table(catalog, None, CREDIBLE_LEVELS, dropout_rate=0.01, split="val")
    assert same.equals(table)
    with pytest.raises(CalibrationError, match="bt_true"):
        coverage_table(summary, None)


def test_select_dropout_rate_closest_to_nominal():
    tables = []
    for rate, spread in [(0.0, 0.5), (0.01, 1.0), (0.05, 1.6)]:
        samples, truth, _ = synthetic(spread, n=600, t=400, seed=int(rate * 1000))
        truths = pl.DataFrame(
            {"bt": truth[:, 0], "re_arcsec": truth[:, 1], "flux_nJy": truth[:, 2]}
        )
        tables.append(coverage_table(summarize(samples), truths, dropout_rate=rate))
    assert select_dropout_rate(tables) == 0.01
    assert select_dropout_rate(pl.concat(tables[::2])) == 0.05  # 1.6 is closer than 0.5
    with pytest.raises(CalibrationError, match="recalibrated=True"):
        select_dropout_rate(tables, recalibrated=True)


def test_select_sharpest_among_calibrated_posteriors():
    # Two calibrated models: a converged one (sharp, sigma 1) and one that never learned
    # (posteriors 5x wider, still covering its 5x larger errors). Coverage alone cannot tell
    # them apart; "sharpest subject to calibration" picks the converged one.
    good, truth_g, _ = synthetic(1.0, n=1500, t=400, seed=3)
    rng = np.random.default_rng(4)
    bad = good * 5.0 + rng.normal(0, 0.01, size=good.shape).astype(np.float32)
    truth_b = truth_g * 5.0
    tables = [
        coverage_table(summarize(good), _truth_frame(truth_g), LEVELS, dropout_rate=0.01),
        coverage_table(summarize(bad), _truth_frame(truth_b), LEVELS, dropout_rate=0.0),
    ]
    sharp = {0.01: float(good.std(axis=1).mean()), 0.0: float(bad.std(axis=1).mean())}
    assert sharp[0.0] > 4 * sharp[0.01]
    assert select_dropout_rate(tables, sharpness=sharp, tolerance=0.03) == 0.01
    # A sharp but mis-calibrated model (posteriors 3x too narrow) is not eligible.
    narrow = good / 3.0 + (good.mean(axis=1, keepdims=True) * (1 - 1 / 3.0))
    tables.append(coverage_table(summarize(narrow), _truth_frame(truth_g), LEVELS,
                                 dropout_rate=0.05))  # fmt: skip
    sharp[0.05] = float(narrow.std(axis=1).mean())
    assert select_dropout_rate(tables, sharpness=sharp, tolerance=0.03) == 0.01
    # None within tolerance: the closest to nominal, as the paper.
    assert select_dropout_rate(tables, sharpness=sharp, tolerance=0.0) == select_dropout_rate(
        tables
    )
    with pytest.raises(CalibrationError, match="no sharpness"):
        select_dropout_rate(tables, sharpness={0.0: 1.0}, tolerance=0.03)


def test_recalibration_restores_under_dispersed_coverage():
    samples, truth, (centre, sigma) = synthetic(0.6)
    before = expected_coverage_curve(samples, truth, LEVELS)
    assert np.all(before < LEVELS[:, None] - 0.05)
    recal = fit_recalibration(samples, truth)
    assert all(1.5 < k < 1.9 for k in recal.scale)
    assert all(a < 0.3 * b for a, b in zip(recal.error_after, recal.error_before, strict=True))
    after = expected_coverage_curve(recal.apply(samples), truth, LEVELS)
    np.testing.assert_allclose(after, np.broadcast_to(LEVELS[:, None], after.shape), atol=0.015)
    # held-out galaxies from the same model (never fit on): still close to nominal
    rng = np.random.default_rng(99)
    fresh_truth = centre + sigma * rng.standard_normal(centre.shape)
    held_out = expected_coverage_curve(recal.apply(samples), fresh_truth, LEVELS)
    np.testing.assert_allclose(
        held_out, np.broadcast_to(LEVELS[:, None], held_out.shape), atol=0.025
    )


def test_recalibration_shrinks_over_dispersed_and_round_trips():
    samples, truth, _ = synthetic(1.5, n=1500, t=400, seed=3)
    recal = fit_recalibration(samples, truth)
    assert all(0.55 < k < 0.75 for k in recal.scale)
    applied = recal.apply(samples)
    np.testing.assert_allclose(applied.mean(axis=1), samples.mean(axis=1), atol=1e-5)
    ratio = applied.std(axis=1) / samples.std(axis=1)
    np.testing.assert_allclose(ratio, np.broadcast_to(recal.scale, ratio.shape), rtol=1e-4)
    again = Recalibration.from_dict(recal.to_dict())
    assert again == recal
    with pytest.raises(CalibrationError, match="scale"):
        Recalibration.from_dict({"scale": [1.0, -1.0, 1.0]})
    with pytest.raises(CalibrationError, match="disagree"):
        fit_recalibration(samples, truth[:10])


def test_tail_exponent_fixes_heavy_tailed_residuals():
    # Gaussian posteriors whose sigma is the residuals' r.m.s., but residuals ~ Student t(3):
    # the 68 % intervals over-cover and the 99.73 % ones under-cover, which no single spread
    # factor repairs. The fitted tail exponent does, on an independent draw.
    def draw(seed, n=3000, t=500):
        rng = np.random.default_rng(seed)
        centre = rng.normal(size=(n, 3))
        sigma = np.exp(rng.normal(-1.0, 0.3, size=(n, 3)))
        residual = rng.standard_t(3, size=(n, 3)) / np.sqrt(3.0)  # unit variance
        truth = centre + sigma * residual
        samples = centre[:, None] + sigma[:, None] * rng.standard_normal((n, t, 3))
        return samples.astype(np.float32), truth

    def coverage_at(samples, truth):
        lo, hi = [], []
        for j in range(3):
            lj, hj = hpd_intervals(samples[:, :, j], LEVELS)
            lo.append(lj), hi.append(hj)
        lo, hi = np.stack(lo, -1), np.stack(hi, -1)  # (L, N, 3)
        return ((lo <= truth) & (truth <= hi)).mean(axis=1)  # (L, 3)

    fit_samples, fit_truth = draw(5)
    recal = fit_recalibration(fit_samples, fit_truth)
    assert all(g > 1.05 for g in recal.exponent)
    test_samples, test_truth = draw(6)
    raw = coverage_at(test_samples, test_truth)
    assert raw[0].min() > LEVELS[0] + 0.03  # over-covered core
    fixed = np.abs(coverage_at(recal.apply(test_samples), test_truth) - LEVELS[:, None]).max()
    assert fixed < 0.025
    # The plain spread factor (exponent fixed at 1) cannot do it at every level.
    plain = Recalibration(scale=recal.scale, exponent=(1.0, 1.0, 1.0))
    best_plain = min(
        np.abs(coverage_at(Recalibration(scale=(k,) * 3).apply(test_samples), test_truth)
               - LEVELS[:, None]).max()
        for k in (0.7, 0.8, 0.9, 1.0, 1.1)
    )  # fmt: skip
    assert best_plain > fixed + 0.01
    assert Recalibration.from_dict(recal.to_dict()) == recal
    assert plain.exponent == (1.0, 1.0, 1.0)


def test_physical_search_calibrates_the_physical_intervals():
    # Posteriors in the scaled space ln(Re) that are 1.8x too narrow: judged on the HPD
    # intervals of the *physical* samples (Re = exp), which is what the catalog reports, the
    # search finds the widening, and it holds on an independent draw of the truths.
    def draw(seed, n=2000, t=400):
        rng = np.random.default_rng(seed)
        centre = rng.normal(0.5, 0.6, n)
        sigma = np.exp(rng.normal(-1.5, 0.3, n))
        truth = np.exp(centre + 1.8 * sigma * rng.standard_normal(n))
        samples = centre[:, None] + sigma[:, None] * rng.standard_normal((n, t))
        return samples.astype(np.float32), truth

    def coverage(samples, truth, g, k):
        shaped = Recalibration(scale=(k,) * 3, exponent=(g,) * 3).apply(
            np.repeat(samples[:, :, None], 3, axis=2)
        )[:, :, 0]
        lo, hi = hpd_intervals(np.exp(shaped.astype(np.float64)), CREDIBLE_LEVELS)
        return ((lo <= truth) & (truth <= hi)).mean(axis=1)

    samples, truth = draw(1)
    raw = coverage(samples, truth, 1.0, 1.0)
    assert raw[0] < 0.45  # far under-covered
    g, k, objective = search_physical_recalibration(samples, truth, np.exp)
    assert 1.6 < k < 2.0 and 0.85 <= g <= 1.15
    fresh_samples, fresh_truth = draw(2)
    held_out = coverage(fresh_samples, fresh_truth, g, k)
    np.testing.assert_allclose(held_out, CREDIBLE_LEVELS, atol=0.025)
    # A candidate that is already right is kept when nothing on the grid beats it.
    g2, k2, objective2 = search_physical_recalibration(samples, truth, np.exp, candidates=[(g, k)])
    assert objective2 <= objective and (g2, k2) == (g, k)


def _biased_floor_draw(seed, n=3000, t=300):
    """Gaussian posteriors (scaled space) whose truths carry a bias that depends on the
    predicted mean and an error floor of 0.1 beside the predicted sigma."""
    rng = np.random.default_rng(seed)
    centre = rng.uniform(-2, 2, (n, 3))
    sigma = np.exp(rng.uniform(np.log(0.02), np.log(0.5), (n, 3)))
    bias = 0.15 * np.clip(-centre, 0, None)  # the low end is predicted too high
    truth = centre - bias + np.sqrt(sigma**2 + 0.1**2) * rng.standard_normal((n, 3))
    samples = centre[:, None] + sigma[:, None] * rng.standard_normal((n, t, 3))
    return samples.astype(np.float32), truth


def test_mean_shift_removes_a_bias_that_depends_on_the_prediction():
    samples, truth = _biased_floor_draw(11)
    knots, values = fit_mean_shift(samples[:, :, 0], truth[:, 0])
    assert list(knots) == sorted(knots) and len(knots) == MEAN_SHIFT_BINS
    # The lowest bin's offset is the bias there (0.15 x its median |centre| ~ 0.27).
    assert values[0] == pytest.approx(0.15 * -knots[0], abs=0.03)
    assert abs(values[-1]) < 0.02
    shifted = shift_means(samples, (knots, (), ()), (values, (), ()))
    np.testing.assert_array_equal(shifted[:, :, 1:], samples[:, :, 1:])
    fresh, fresh_truth = _biased_floor_draw(12)
    residual = shift_means(fresh, (knots, (), ()), (values, (), ()))[:, :, 0].mean(1)
    low = fresh[:, :, 0].mean(1) < -1
    assert abs(np.median(residual[low] - fresh_truth[low, 0])) < 0.03
    assert np.median(fresh[low, :, 0].mean(1) - fresh_truth[low, 0]) > 0.15


def test_error_floor_and_groups_calibrate_the_sharpest_posteriors():
    samples, truth = _biased_floor_draw(21)
    levels = (0.6827, *[v for v in RECALIBRATION_LEVELS if v != 0.6827])
    sharp = [samples[:, :, j].std(1) < 0.06 for j in range(3)]
    groups = [sharp[0], ~sharp[0]]
    recal = fit_recalibration(samples, truth, levels, floors=FLOOR_GRID, groups=groups)
    assert all(0.07 <= f <= 0.13 for f in recal.floor)  # the true floor is 0.1
    # A galaxy's width becomes sqrt((k sigma)^2 + f^2), sigma that of the reshaped tails.
    applied = recal.apply(samples)
    shaped = reshape_tails(samples, np.asarray(recal.exponent, dtype=np.float32))
    expect = np.sqrt((np.asarray(recal.scale) * shaped.std(1)) ** 2 + np.asarray(recal.floor) ** 2)
    np.testing.assert_allclose(applied.std(1), expect, rtol=2e-3)
    assert Recalibration.from_dict(recal.to_dict()) == recal
    # On an independent draw the sharpest galaxies are covered like the rest; without the
    # floor the spread factor alone leaves them far under.
    fresh, fresh_truth = _biased_floor_draw(22)
    knots_values = [fit_mean_shift(samples[:, :, j], truth[:, j]) for j in range(3)]
    knots = tuple(k for k, _ in knots_values)
    values = tuple(v for _, v in knots_values)

    def coverage_68(recalibration, x, t, mask):
        y = recalibration.apply(x)[:, :, 0]
        lo, hi = hpd_intervals(y, [0.6827])
        return float(((lo[0] <= t[:, 0]) & (t[:, 0] <= hi[0]))[mask].mean())

    fresh_sharp = fresh[:, :, 0].std(1) < 0.06
    shifted = shift_means(samples, knots, values)
    with_floor = fit_recalibration(shifted, truth, levels, floors=FLOOR_GRID, groups=groups)
    no_floor = fit_recalibration(shifted, truth, levels)
    for name, r in (("floor", with_floor), ("plain", no_floor)):
        full = Recalibration(
            scale=r.scale, exponent=r.exponent, floor=r.floor, shift_knots=knots,
            shift_values=values,
        )  # fmt: skip
        sharp_cov = coverage_68(full, fresh, fresh_truth, fresh_sharp)
        if name == "floor":
            assert abs(sharp_cov - 0.6827) < 0.08
        else:
            assert sharp_cov < 0.5
    with pytest.raises(CalibrationError, match="floor"):
        Recalibration.from_dict({"scale": [1, 1, 1], "floor": [0, -1, 0]})
    with pytest.raises(CalibrationError, match="shift"):
        Recalibration.from_dict({"scale": [1, 1, 1], "shift_knots": [[0.0], [], []]})


def _mean_dependent_width_draw(seed: int, n: int = 4000, t: int = 200):
    """Posteriors N(m, 1) whose truths scatter 0.5 (m < 0) or 2 (m > 0) about m."""
    rng = np.random.default_rng(seed)
    mean = rng.uniform(-3, 3, n)
    sigma = np.where(mean < 0, 0.5, 2.0)
    truth = mean + sigma * rng.standard_normal(n)
    samples = mean[:, None] + rng.standard_normal((n, t))
    return samples.astype(np.float32), truth


def test_spread_profile_redistributes_width_by_predicted_mean():
    samples, truth = _mean_dependent_width_draw(31)
    knots, values = fit_spread_profile(samples, truth)
    assert len(knots) == SPREAD_BINS and list(knots) == sorted(knots)
    # The narrow half needs ~4x less width than the wide half.
    low = np.asarray(knots) < -0.5
    high = np.asarray(knots) > 0.5
    ratio = np.mean(np.asarray(values)[high]) / np.mean(np.asarray(values)[low])
    assert ratio == pytest.approx(4.0, rel=0.15)
    # On a fresh draw, the stretched posteriors cover both halves alike (one global factor
    # then calibrates both, which no single factor could do before).
    fresh, fresh_truth = _mean_dependent_width_draw(32)
    stretched = stretch_by_mean(fresh[:, :, None], (knots,), (values,))[:, :, 0]
    z = np.abs(fresh_truth - stretched.mean(1)) / stretched.std(1)
    half = fresh.mean(1) < 0
    q_low, q_high = (np.quantile(z[m], 0.6827) for m in (half, ~half))
    assert q_low == pytest.approx(q_high, rel=0.15)
    raw_z = np.abs(fresh_truth - fresh.mean(1)) / fresh.std(1)
    assert np.quantile(raw_z[~half], 0.6827) > 3 * np.quantile(raw_z[half], 0.6827)
    # Empty knots leave samples untouched; Recalibration carries the profile.
    np.testing.assert_array_equal(
        stretch_by_mean(fresh[:, :, None], ((),), ((),)), fresh[:, :, None]
    )
    recal = Recalibration(
        scale=(1.0, 1.0, 1.0),
        spread_knots=(knots, (), ()),
        spread_values=(values, (), ()),
    )
    assert Recalibration.from_dict(recal.to_dict()) == recal
    three = np.repeat(fresh[:, :, None], 3, axis=2)
    np.testing.assert_allclose(recal.apply(three)[:, :, 0], stretched, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(recal.apply(three)[:, :, 1], three[:, :, 1], atol=1e-5)


def test_second_width_profile_follows_a_second_driver():
    """Widths that depend on size and on brightness: one profile per driver, in sequence."""

    def draw(seed, n=6000, t=200):
        rng = np.random.default_rng(seed)
        mean = rng.normal(size=(n, 3))
        # True scatter x2 for large (mean 1 > 0) and x3 for faint (mean 2 < 0) galaxies;
        # the network's width is the same for all.
        sigma = np.where(mean[:, 1] > 0, 2.0, 1.0) * np.where(mean[:, 2] < 0, 3.0, 1.0)
        truth = mean + sigma[:, None] * rng.standard_normal((n, 3))
        samples = mean[:, None, :] + rng.standard_normal((n, t, 3))
        return samples.astype(np.float32), truth

    samples, truth = draw(41)
    first = [fit_spread_profile(samples[:, :, j], truth[:, j], driver=samples[:, :, 1].mean(1))
             for j in range(3)]  # fmt: skip
    knots1, values1 = tuple(k for k, _ in first), tuple(v for _, v in first)
    stretched = stretch_by_mean(samples, knots1, values1, (1, 1, 1))
    second = [
        fit_spread_profile(stretched[:, :, j], truth[:, j], driver=stretched[:, :, 2].mean(1))
        for j in range(3)
    ]
    recal = Recalibration(
        scale=(1.0, 1.0, 1.0),
        spread_knots=knots1,
        spread_values=values1,
        spread_drivers=(1, 1, 1),
        second_spread_knots=tuple(k for k, _ in second),
        second_spread_values=tuple(v for _, v in second),
        second_spread_drivers=(2, 2, 2),
    )
    assert Recalibration.from_dict(recal.to_dict()) == recal

    fresh, fresh_truth = draw(42)
    large, faint = fresh.mean(1)[:, 1] > 0, fresh.mean(1)[:, 2] < 0
    cells = [(large == a) & (faint == b) for a in (False, True) for b in (False, True)]

    def q68_per_cell(x):
        z = np.abs(fresh_truth[:, 0] - x[:, :, 0].mean(1)) / x[:, :, 0].std(1)
        return np.array([np.quantile(z[c], 0.6827) for c in cells])

    one_stage = dataclasses.replace(recal, second_spread_knots=((), (), ()),
                                    second_spread_values=((), (), ()))  # fmt: skip
    # The first profile alone leaves the brightness dependence (x3); the second removes it.
    q_one, q_two = q68_per_cell(one_stage.apply(fresh)), q68_per_cell(recal.apply(fresh))
    assert q_one.max() / q_one.min() > 2.5
    assert q_two.max() / q_two.min() < 1.25


def test_second_mean_shift_removes_a_bias_that_follows_another_prediction():
    """A bias in parameter 1 that depends on the predicted parameter 2 (faint galaxies' sizes
    underestimated): the first shift (over parameter 1's own mean) cannot see it, the second
    (over parameter 2's) removes it; the fit and ``apply`` agree and round-trip."""

    def draw(seed, n=6000, t=100):
        rng = np.random.default_rng(seed)
        truth = rng.normal(size=(n, 3))
        mean = truth + 0.1 * rng.standard_normal((n, 3))
        mean[:, 1] -= np.where(mean[:, 2] < 0, 0.5, 0.0)  # faint: parameter 1 biased low
        return (mean[:, None, :] + 0.1 * rng.standard_normal((n, t, 3))).astype(np.float32), truth

    samples, truth = draw(51)
    first = [fit_mean_shift(samples[:, :, j], truth[:, j]) for j in range(3)]
    knots1, values1 = tuple(k for k, _ in first), tuple(v for _, v in first)
    shifted = shift_means(samples, knots1, values1)
    second = [
        fit_mean_shift(shifted[:, :, j], truth[:, j], driver=shifted[:, :, 2].mean(1))
        for j in range(3)
    ]
    recal = Recalibration(
        scale=(1.0, 1.0, 1.0),
        shift_knots=knots1,
        shift_values=values1,
        second_shift_knots=tuple(k for k, _ in second),
        second_shift_values=tuple(v for _, v in second),
        second_shift_drivers=(2, 2, 2),
    )
    assert Recalibration.from_dict(recal.to_dict()) == recal

    fresh, fresh_truth = draw(52)
    faint = fresh.mean(1)[:, 2] < 0

    def bias(x):
        residual = x[:, :, 1].mean(1) - fresh_truth[:, 1]
        return np.median(residual[faint]), np.median(residual[~faint])

    one = dataclasses.replace(recal, second_shift_knots=((), (), ()),
                              second_shift_values=((), (), ()))  # fmt: skip
    faint_one, bright_one = bias(one.apply(fresh))
    faint_two, bright_two = bias(recal.apply(fresh))
    assert faint_one - bright_one < -0.35  # the first shift leaves the split
    assert abs(faint_two) < 0.05 and abs(bright_two) < 0.05
