"""Qualitative flags and their precision against the truths."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from gampen_ml.config import FlagConfig
from gampen_ml.flags import (
    FLAGS_SCHEMA,
    FlagError,
    bt_class_probabilities,
    compute_flags,
    flag_precision,
)


def catalog() -> pl.DataFrame:
    bt_mode = [0.90, 0.86, 0.05, 0.10, 0.50, 0.50]
    bt_true = [0.95, 0.70, 0.00, 0.12, 0.50, 0.50]
    re_mode = [0.5, 2.0, 0.9, 3.0, 2.0, 2.0]
    re_true = [0.6, 2.0, 1.2, 3.0, 2.0, 2.0]
    flux_mode = [1e5] * 6
    cols = {
        "galaxy_id": list(range(6)),
        "dataset": ["sim-test"] * 6,
        "bt_mode": bt_mode,
        "re_arcsec_mode": re_mode,
        "flux_nJy_mode": flux_mode,
        "bt_true": bt_true,
        "re_arcsec_true": re_true,
        # widths: galaxy 4 too wide in B/T (0.4), galaxy 5 too wide in Re (1.2 > 0.5 * 2)
        "bt_hpd68_lo": [0.85, 0.8, 0.0, 0.05, 0.3, 0.45],
        "bt_hpd68_hi": [0.95, 0.9, 0.1, 0.15, 0.7, 0.55],
        "re_arcsec_hpd68_lo": [0.45, 1.8, 0.8, 2.8, 1.8, 1.4],
        "re_arcsec_hpd68_hi": [0.55, 2.2, 1.0, 3.2, 2.2, 2.6],
        "flux_nJy_hpd68_lo": [0.95e5] * 6,
        "flux_nJy_hpd68_hi": [1.05e5] * 6,
    }
    return pl.DataFrame(cols)


def test_compute_flags_thresholds():
    flags = compute_flags(catalog(), FlagConfig())
    assert flags.schema == pl.Schema(FLAGS_SCHEMA)
    assert flags["bulge_dominated"].to_list() == [True, True, False, False, False, False]
    assert flags["disk_dominated"].to_list() == [False, False, True, True, False, False]
    assert flags["small"].to_list() == [True, False, True, False, False, False]
    # Predictions inside the prior and no image statistics: nothing is out of domain, and
    # a wide posterior (galaxies 4 and 5) is not a reason to distrust it.
    assert flags["out_of_domain"].sum() == 0 and flags["ood_reason"].null_count() == 6
    assert flags["unreliable"].sum() == 0
    strict = compute_flags(catalog(), FlagConfig(bulge_dominated_min_bt=0.88))
    assert strict["bulge_dominated"].to_list() == [True] + [False] * 5
    outside = catalog().with_columns(
        re_arcsec_mode=pl.Series([0.5, 2.0, 0.9, 3.0, 0.02, 9.0]),
        flux_nJy_mode=pl.Series([1e5, 1e5, 1e5, 4e2, 1e5, 1e5]),
    )
    flags = compute_flags(outside, FlagConfig())
    assert flags["out_of_domain"].to_list() == [False, False, False, True, True, True]
    assert flags["ood_reason"].to_list()[3:] == [
        "predicted flux outside the prior",
        "predicted Re outside the prior",
        "predicted Re outside the prior",
    ]
    assert flags["unreliable"].to_list() == flags["out_of_domain"].to_list()
    with pytest.raises(FlagError, match="bt_mode"):
        compute_flags(catalog().drop("bt_mode"), FlagConfig())


def test_flag_precision_against_truth():
    cat = catalog()
    result = flag_precision(cat, compute_flags(cat, FlagConfig()))
    assert result["bulge_dominated"] == 0.5 and result["n_bulge_dominated"] == 2
    assert result["disk_dominated"] == 0.5 and result["n_disk_dominated"] == 2
    assert result["small"] == 0.5 and result["n_small"] == 2
    none = flag_precision(cat, compute_flags(cat, FlagConfig(small_max_re_arcsec=0.1)))
    assert math.isnan(none["small"]) and none["n_small"] == 0


def test_psf_outside_library_needs_the_range_and_a_known_fwhm():
    fwhm = [None, 0.58, 0.50, 1.25, 1.30, 0.90]
    cat = catalog().with_columns(pl.Series("psf_fwhm_arcsec", fwhm, dtype=pl.Float64))
    assert "psf_outside_library" not in compute_flags(cat, FlagConfig()).columns
    flags = compute_flags(cat, FlagConfig(), psf_fwhm_range=(0.6, 1.2))
    # 5 % tolerance: 0.57-1.26 passes; unknown FWHM is not flagged.
    assert flags["psf_outside_library"].to_list() == [False, False, True, False, True, False]
    strict = compute_flags(cat, FlagConfig(psf_fwhm_tolerance=0.0), psf_fwhm_range=(0.6, 1.2))
    assert strict["psf_outside_library"].to_list() == [False, True, True, True, True, False]
    # No FWHM column (older catalogs): no flag, whatever the range.
    assert "psf_outside_library" not in compute_flags(catalog(), FlagConfig(), (0.6, 1.2)).columns


def test_bt_labels_read_the_configured_posterior_summary():
    # A broad B/T posterior: mode at 0.95 (a U-shaped density's edge), mean 0.6.
    cat = catalog().with_columns(
        pl.Series("bt_mean", [0.60, 0.90, 0.05, 0.50, 0.50, 0.50]),
        pl.Series("bt_median", [0.88, 0.30, 0.20, 0.08, 0.50, 0.50]),
    )
    by_mode = compute_flags(cat, FlagConfig())
    assert by_mode["bulge_dominated"].to_list() == [True, True, False, False, False, False]
    by_mean = compute_flags(cat, FlagConfig(bt_estimate="mean"))
    assert by_mean["bulge_dominated"].to_list() == [False, True, False, False, False, False]
    assert by_mean["disk_dominated"].to_list() == [False, False, True, False, False, False]
    by_median = compute_flags(cat, FlagConfig(bt_estimate="median"))
    assert by_median["bulge_dominated"].to_list() == [True, False, False, False, False, False]
    assert by_median["disk_dominated"].to_list() == [False, False, False, True, False, False]
    with pytest.raises(FlagError, match="bt_mean"):
        compute_flags(catalog(), FlagConfig(bt_estimate="mean"))


def test_probability_labels_read_the_class_probabilities():
    probs = bt_class_probabilities(
        np.array([[0.9, 0.95, 0.86, 0.5], [0.0, 0.05, 0.1, 0.2], [0.84, 0.85, 0.11, 0.10]])
    )
    assert probs["bt_prob_bulge"].to_list() == [0.75, 0.0, 0.25]  # >= 0.85 counts
    assert probs["bt_prob_disk"].to_list() == [0.0, 0.75, 0.25]  # <= 0.10 counts
    cat = catalog().with_columns(
        pl.Series("bt_prob_bulge", [0.96, 0.90, 0.00, 0.00, 0.95, 0.5]),
        pl.Series("bt_prob_disk", [0.00, 0.00, 0.99, 0.94, 0.00, 0.5]),
    )
    flags = compute_flags(cat, FlagConfig(bt_estimate="probability"))
    assert flags["bulge_dominated"].to_list() == [True, False, False, False, True, False]
    assert flags["disk_dominated"].to_list() == [False, False, True, False, False, False]
    loose = compute_flags(cat, FlagConfig(bt_estimate="probability", bt_min_probability=0.9))
    assert loose["bulge_dominated"].to_list() == [True, True, False, False, True, False]
    assert loose["disk_dominated"].to_list() == [False, False, True, True, False, False]
    with pytest.raises(FlagError, match="bt_prob_bulge"):
        compute_flags(catalog(), FlagConfig(bt_estimate="probability"))
    # A catalog written before the columns existed reads them as null: a clear error.
    old = cat.with_columns(pl.lit(None, pl.Float64).alias("bt_prob_bulge"))
    with pytest.raises(FlagError, match="hold nulls"):
        compute_flags(old, FlagConfig(bt_estimate="probability"))


def test_probability_labels_are_as_precise_as_calibrated_posteriors_say():
    # Calibrated by construction: each galaxy's truth is one more draw from its own posterior.
    rng = np.random.default_rng(3)
    n, t = 20000, 400
    centre, width = rng.uniform(-0.2, 1.2, n), rng.uniform(0.02, 0.3, n)
    draws = np.clip(centre[:, None] + width[:, None] * rng.standard_normal((n, t + 1)), 0, 1)
    probs = bt_class_probabilities(draws[:, :t])
    truth = draws[:, t]
    for column, is_class in (("bt_prob_bulge", truth >= 0.85), ("bt_prob_disk", truth <= 0.10)):
        p = probs[column].to_numpy()
        labelled = p >= 0.95
        precision = is_class[labelled].mean()
        # Binomial s.e. of the precision over the labelled galaxies.
        se = math.sqrt(0.05 * 0.95 / labelled.sum())
        assert labelled.sum() > 1000
        assert abs(precision - p[labelled].mean()) < 4 * se and precision > 0.95 - 4 * se
        # The plain threshold on the posterior mean is far less precise on broad posteriors.
        mean = draws[:, :t].mean(axis=1)
        by_mean = mean >= 0.85 if column == "bt_prob_bulge" else mean <= 0.10
        assert is_class[by_mean].mean() < precision - 0.05
