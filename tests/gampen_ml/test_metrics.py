"""The shared catalog measures: level tags, coverage, residuals, magnitudes, bounds, nesting."""

from __future__ import annotations

import warnings

import astropy.units as u
import numpy as np
import polars as pl
import pytest

from gampen_ml.config import CREDIBLE_LEVELS
from gampen_ml.flags import FLAG_COLUMNS
from gampen_ml.metrics import (
    AB_MAG_1_NJY,
    LEVEL_TAGS,
    LevelError,
    ab_magnitude,
    coverage_bounds,
    covered,
    flag_arrays,
    in_interval,
    level_tag,
    non_nested_intervals,
    residuals,
)


def test_level_tag_is_the_catalog_column_tag():
    assert [level_tag(lv) for lv in CREDIBLE_LEVELS] == ["hpd68", "hpd95", "hpd99"]
    assert [level_tag(lv, prefix="") for lv in CREDIBLE_LEVELS] == ["68", "95", "99"]
    assert level_tag(0.6827 + 1e-12) == "hpd68"
    assert LEVEL_TAGS == {0.6827: "68", 0.9545: "95", 0.9973: "99"}
    with pytest.raises(LevelError, match="0.9"):
        level_tag(0.9)


def test_in_interval_is_inclusive_and_false_on_nan():
    lo = np.array([0.0, 0.0, 0.0, np.nan, 0.0])
    hi = np.array([1.0, 1.0, 1.0, 1.0, 1.0])
    truth = np.array([0.0, 1.0, 1.0 + 1e-12, 0.5, np.nan])
    assert in_interval(lo, truth, hi).tolist() == [True, True, False, False, False]


def _catalog() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "galaxy_id": [0, 1, 2, 3],
            "bt_true": [0.2, 0.5, None, 1.0],
            "bt_mode": [0.3, 0.5, 0.1, 0.5],
            "bt_mean": [0.25, 0.4, 0.1, 0.5],
            "bt_hpd68_lo": np.array([0.1, 0.5, 0.0, 0.0], dtype=np.float32),
            "bt_hpd68_hi": np.array([0.2, 0.6, 0.2, 0.9], dtype=np.float32),
            "re_arcsec_true": [1.0, 0.0, 2.0, 4.0],
            "re_arcsec_mode": [1.5, 0.1, 1.0, 4.0],
        },
        schema_overrides={"bt_true": pl.Float64},
    )


def test_covered_reads_the_level_columns_and_treats_null_truth_as_not_covered():
    cat = _catalog()
    # float32(0.2) = 0.20000000298 > 0.2: the first truth is inside its (float32) interval.
    assert covered(cat, "bt", 0.6827).tolist() == [True, True, False, False]
    with pytest.raises(LevelError):
        covered(cat, "bt", 0.5)


def test_residuals_plain_fractional_and_other_estimates():
    cat = _catalog()
    np.testing.assert_allclose(residuals(cat, "bt"), [0.1, 0.0, np.nan, -0.5])
    np.testing.assert_allclose(residuals(cat, "bt", estimate="mean"), [0.05, -0.1, np.nan, -0.5])
    frac = residuals(cat, "re_arcsec", fractional=True)
    np.testing.assert_allclose(frac, [0.5, np.nan, -0.5, 0.0])


def test_ab_magnitude_equals_the_stored_formula_bit_for_bit_and_astropy():
    assert AB_MAG_1_NJY == 31.4  # the 48.60 mag definition; 3631 Jy would give 31.40007
    flux = np.geomspace(1e2, 1e8, 10_001)
    by_hand = 31.4 - 2.5 * np.log10(flux)
    assert np.array_equal(ab_magnitude(flux), by_hand)  # stored magnitudes stay identical
    np.testing.assert_allclose(ab_magnitude(flux), (flux * u.nJy).to_value(u.ABmag), atol=1e-12)
    assert ab_magnitude(3631e9) == pytest.approx(0.0, abs=2e-4)  # 3631 Jy is ~0 mag AB
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = ab_magnitude([0.0, -1.0, np.nan])
    assert np.isposinf(out[0]) and np.isnan(out[1:]).all()


def test_coverage_bounds_widen_with_counting_noise():
    lo8, hi8 = coverage_bounds(0.6827, 8, 0.03)
    lo5000, hi5000 = coverage_bounds(0.6827, 5000, 0.03)
    assert lo8 < lo5000 < 0.6827 - 0.03 and 0.6827 + 0.03 < hi5000 < hi8
    assert hi5000 - lo5000 < 0.1
    # c + tolerance reaching 1: every galaxy covered is always accepted.
    assert coverage_bounds(0.9973, 8, 0.03)[1] == 1.0
    # A stricter false-alarm rate accepts a wider range.
    assert (
        coverage_bounds(0.6827, 200, 0.03, false_alarm=1e-6)[0]
        < coverage_bounds(0.6827, 200, 0.03)[0]
    )


def test_non_nested_intervals_counts_inverted_and_escaping_intervals():
    n = 5
    base = {
        f"{p}_hpd{t}_{s}": np.full(n, v, dtype=np.float32)
        for p in ("bt", "re_arcsec", "flux_nJy")
        for t, (lo, hi) in {"68": (1.0, 2.0), "99": (0.5, 3.0)}.items()
        for s, v in (("lo", lo), ("hi", hi))
    }
    good = pl.DataFrame(base)
    assert non_nested_intervals(good) == 0
    # Coinciding bounds are nested (equal is inside).
    same = good.with_columns(pl.col("bt_hpd99_hi").alias("bt_hpd68_hi"))
    assert non_nested_intervals(same) == 0
    bad = good.with_columns(
        pl.Series("bt_hpd68_lo", np.array([1.0, 2.5, 1.0, 1.0, 1.0], dtype=np.float32)),
        pl.Series("flux_nJy_hpd68_hi", np.array([2.0, 2.0, 3.5, 2.0, 2.0], dtype=np.float32)),
    )
    assert non_nested_intervals(bad) == 2
    assert non_nested_intervals(bad, parameters=("flux_nJy",)) == 1


def test_flag_arrays_follow_catalog_order_and_missing_rows_are_unflagged():
    cat = pl.DataFrame({"galaxy_id": [3, 1, 2]})
    flags = pl.DataFrame(
        {"galaxy_id": [1, 3], **{c: [False, False] for c in FLAG_COLUMNS}}
    ).with_columns(
        pl.Series("bulge_dominated", [True, False]),
        pl.Series("disk_dominated", [False, True]),
        pl.Series("unreliable", [True, True]),
    )
    f = flag_arrays(cat, flags)
    assert set(f) == set(FLAG_COLUMNS)
    assert f["bulge_dominated"].tolist() == [False, True, False]
    assert f["disk_dominated"].tolist() == [True, False, False]
    assert f["unreliable"].tolist() == [True, True, False]
    with pytest.raises(ValueError, match="small"):
        flag_arrays(cat, flags.drop("small"))


def test_ab_flux_inverts_ab_magnitude():
    from gampen_ml.metrics import ab_flux_nJy

    flux = np.geomspace(1e2, 1e8, 101)
    np.testing.assert_allclose(ab_flux_nJy(ab_magnitude(flux)), flux, rtol=1e-12)
    assert ab_flux_nJy(31.4) == 1.0
