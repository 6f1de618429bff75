"""Coverage beyond the paper's three levels: expected-coverage curve, TARP, binned coverage."""

import json

import numpy as np
import polars as pl

from gampen_ml.catalog import build_catalog
from gampen_ml.config import PARAMETERS
from gampen_ml.data.transforms import LabelScaler
from gampen_ml.infer import predict_physical
from gampen_ml.posterior import summarize
from gampen_ml.stages import coverage_diagnostics
from tests.catalog_helpers import provenance


def test_calibrated_draws_give_a_diagonal_curve_and_small_tarp_error(tmp_path):
    rng = np.random.default_rng(0)
    n, t = 1500, 300
    truths = pl.DataFrame(
        {
            "bt": rng.uniform(0.2, 0.8, n),
            "re_arcsec": rng.uniform(0.5, 4.0, n),
            "flux_nJy": rng.uniform(1e4, 1e6, n),
        }
    )
    scaler = LabelScaler.fit(truths.to_numpy())
    truth_scaled = scaler.transform(truths.to_numpy())
    # Calibrated posteriors: the truth is one more draw from each galaxy's N(centre, 0.1^2)
    # (narrow, so the physical-space HPD is close to the image of the scaled-space one).
    centre = truth_scaled + rng.normal(0, 0.1, truth_scaled.shape)
    samples = (centre[:, None, :] + rng.normal(0, 0.1, (n, t, 3))).astype(np.float32)
    catalog = build_catalog(
        summarize(predict_physical(samples, scaler)),
        pl.DataFrame({"galaxy_id": np.arange(n)}),
        truths,
        **provenance(model_name="m", dropout_rate=0.0, n_passes=t, dataset="sim-test"),
    )
    paths = coverage_diagnostics(catalog, samples, scaler, tmp_path, seed=3)
    assert paths["expected_coverage"].stat().st_size > 10_000
    report = json.loads(paths["coverage_diagnostics_json"].read_text())
    assert report["tarp_atc_error"] < 0.08
    levels = np.array(report["expected_coverage"]["levels"])
    for p in PARAMETERS:
        assert np.max(np.abs(np.array(report["expected_coverage"][p]) - levels)) < 0.09, p
    assert "magnitude_true" in report["binned"] and "re_arcsec_true" in report["binned"]
    # Over-dispersed posteriors move the TARP error away from zero.
    wide = (centre[:, None, :] + rng.normal(0, 0.3, (n, t, 3))).astype(np.float32)
    wide_paths = coverage_diagnostics(catalog, wide, scaler, tmp_path / "wide", seed=3)
    wide_report = json.loads(wide_paths["coverage_diagnostics_json"].read_text())
    assert wide_report["tarp_atc_error"] > 2 * report["tarp_atc_error"]
