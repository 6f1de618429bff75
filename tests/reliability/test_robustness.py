"""The shift-robustness suite, run as a user runs it (``gampen validate --robustness``)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
from conftest import REPO, child_env

from gampen_ml.robustness import calibration_summary, conditional_coverage, target_misses


@pytest.mark.slow
def test_validate_robustness_on_the_tiny_world(world, tmp_path):
    out = tmp_path / "robustness"
    env = child_env(GAMPEN_PROFILE="tiny", GAMPEN_STORAGE=str(world),
                    DAGSTER_HOME=str(tmp_path / "home"))  # fmt: skip
    result = subprocess.run(
        [sys.executable, "-m", "gampen_ml.cli", "validate", "--robustness", "--n", "6",
         "--variations", "nominal,sky_high,loguniform", "--workers", "1", "--device", "cpu",
         "--out", str(out)],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "# Calibration under shifts" in result.stdout and "frozen test seed" in result.stdout
    report = json.loads((out / "robustness.json").read_text())
    table = pl.DataFrame(report["table"])
    assert table["set"].unique(maintain_order=True).to_list() == [
        "nominal", "sky_high", "loguniform",
    ]  # fmt: skip
    for variation in ("nominal", "sky_high", "loguniform"):
        catalog = pl.read_parquet(out / variation / "catalog.parquet")
        assert catalog.height == 6 and catalog["recalibrated"].all() is False
        rows = table.filter(pl.col("set") == variation)
        for p in ("bt", "re_arcsec", "flux_nJy"):
            t = catalog[f"{p}_true"]
            inside = (catalog[f"{p}_hpd68_lo"] <= t) & (t <= catalog[f"{p}_hpd68_hi"])
            row = rows.filter(pl.col("parameter") == p).row(0, named=True)
            assert row["coverage_68"] == pytest.approx(inside.mean())
    labels = {v: pl.read_parquet(out / v / "labels.parquet") for v in ("nominal", "sky_high")}
    # Same galaxies, a noisier sky.
    assert labels["nominal"]["re_arcsec"].equals(labels["sky_high"]["re_arcsec"])
    assert (labels["sky_high"]["sky_sigma_nJy"] > labels["nominal"]["sky_sigma_nJy"]).all()
    assert report["misses"] == target_misses(table, pl.DataFrame(report["binned"]))


def _catalog(n: int, inside_68: np.ndarray, mode_over_true: float) -> pl.DataFrame:
    """A catalog whose 68 % interval holds the truth where ``inside_68`` (wider ones always)."""
    true = np.linspace(0.3, 3.0, n)
    cols = {"component_true": ["bulge+disk"] * n}
    for p, scale in (("bt", 0.1), ("re_arcsec", 1.0), ("flux_nJy", 1e5)):
        t = true * scale if p != "bt" else np.full(n, 0.5)
        mode = t * mode_over_true if p != "bt" else t
        cols[f"{p}_true"], cols[f"{p}_mode"] = t, mode
        shift = np.where(inside_68, 0.0, 10.0 * t)
        cols[f"{p}_hpd68_lo"], cols[f"{p}_hpd68_hi"] = t * 0.9 + shift, t * 1.1 + shift
        for tag in ("95", "99"):
            cols[f"{p}_hpd{tag}_lo"], cols[f"{p}_hpd{tag}_hi"] = t * 0.5, t * 1.5
    return pl.DataFrame(cols)


def test_targets_are_checked_per_set_and_bin():
    n = 1000
    calibrated = _catalog(n, np.arange(n) % 25 < 17, 1.0)
    biased = _catalog(n, np.arange(n) % 25 < 17, 1.03)
    table = pl.concat([calibration_summary(calibrated, "good"), calibration_summary(biased, "bad")])
    binned = pl.concat(
        [conditional_coverage(calibrated, "good"), conditional_coverage(biased, "bad")]
    )
    # The paper's statistic: the 68th percentile of |mode / true - 1| is the 3 % bias itself.
    p68 = dict(zip(table["set"] + table["parameter"], table["p68_abs_residual"], strict=True))
    assert p68["badre_arcsec"] == pytest.approx(0.03) and p68["goodflux_nJy"] == 0.0
    misses = target_misses(table, binned)
    # 95.45 % coverage is 100 % in both (intervals of +-50 %): a miss for every parameter.
    assert sum("coverage 95 off by +4.5" in m for m in misses) == 6
    assert [m for m in misses if "bias" in m] == [
        "bad re_arcsec: median bias +3.0 %", "bad flux_nJy: median bias +3.0 %",
    ]  # fmt: skip
    assert not [m for m in misses if "coverage 68" in m]
    small = calibrated.with_columns(
        pl.when(pl.col("re_arcsec_true") < 0.5).then(10.0).otherwise(pl.col("re_arcsec_hpd68_lo"))
        .alias("re_arcsec_hpd68_lo")
    )  # fmt: skip
    misses = target_misses(calibration_summary(small, "s"), conditional_coverage(small, "s"))
    assert any(m.startswith("s re_arcsec re_arcsec_true 0-0.5") for m in misses)
