"""Validation metrics on synthetic catalogs whose answers are known by construction."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from scipy import stats

from gampen_ml.config import CREDIBLE_LEVELS, PARAMETERS, FlagConfig
from gampen_ml.flags import compute_flags
from gampen_ml.metrics import AB_MAG_1_NJY
from gampen_ml.validate import PAPER_REFERENCE, validation_metrics, validation_report

N = 20_000
SIGMA_SINGLE, SIGMA_DOUBLE = 0.02, 0.08
RE_FRAC, FLUX_FRAC = 0.05, 0.02


def known_catalog(seed: int = 0, *, truths: bool = True):
    """Modes = truth + Gaussian noise of known sigma, HPD = mode +- z(level) sigma.

    The posterior *mean* is deliberately offset, so an implementation that used it instead
    of the mode would get the residuals wrong. Returns (catalog, noise dict, sigma dict).
    """
    rng = np.random.default_rng(seed)
    single = rng.random(N) < 0.25
    true = {
        "bt": np.where(single, rng.integers(0, 2, N).astype(float), rng.uniform(0, 1, N)),
        "re_arcsec": rng.uniform(0.1, 5.0, N),
        "flux_nJy": rng.uniform(1e3, 5e6, N),
    }
    sigma = {
        "bt": np.where(single, SIGMA_SINGLE, SIGMA_DOUBLE),
        "re_arcsec": RE_FRAC * true["re_arcsec"],
        "flux_nJy": FLUX_FRAC * true["flux_nJy"],
    }
    noise = {p: sigma[p] * rng.standard_normal(N) for p in PARAMETERS}
    cols: dict[str, object] = {
        "galaxy_id": np.arange(N, dtype=np.int64),
        "dataset": ["sim-test"] * N,
    }
    for p in PARAMETERS:
        mode = true[p] + noise[p]
        cols |= {f"{p}_mode": mode, f"{p}_mean": mode + 0.5 * sigma[p] + 1.0}
        for level, tag in zip(CREDIBLE_LEVELS, ("68", "95", "99"), strict=True):
            z = stats.norm.ppf(0.5 + level / 2)
            cols[f"{p}_hpd{tag}_lo"] = mode - z * sigma[p]
            cols[f"{p}_hpd{tag}_hi"] = mode + z * sigma[p]
        cols[f"{p}_true"] = true[p] if truths else [None] * N
    cols["component_true"] = np.where(single, "disk", "bulge+disk").tolist()
    cols["magnitude_mode"] = AB_MAG_1_NJY - 2.5 * np.log10(cols["flux_nJy_mode"])
    cols |= {"model_name": ["gampen"] * N, "model_version": ["3"] * N, "dropout_rate": [0.01] * N}
    schema = {f"{p}_true": pl.Float64 for p in PARAMETERS}
    return pl.DataFrame(cols, schema_overrides=schema), noise, sigma


@pytest.fixture(scope="module")
def known():
    return known_catalog()


def test_coverage_matches_direct_count_and_nominal(known):
    cat, noise, sigma = known
    m = validation_metrics(cat)
    assert m["n_galaxies"] == N
    for level, tag in zip(CREDIBLE_LEVELS, ("68", "95", "99"), strict=True):
        z = stats.norm.ppf(0.5 + level / 2)
        direct = [100 * np.mean(np.abs(noise[p]) <= z * sigma[p]) for p in PARAMETERS]
        for p, d in zip(PARAMETERS, direct, strict=True):
            assert m[f"coverage_{tag}_{p}_pct"] == pytest.approx(d, abs=1e-9)
            # Intervals built to cover `level`: binomial error at N = 2e4 is < 0.4 %.
            assert m[f"coverage_{tag}_{p}_pct"] == pytest.approx(100 * level, abs=1.2)
        assert m[f"coverage_{tag}_mean_pct"] == pytest.approx(np.mean(direct))


def test_residual_scatter_bias_r2_and_ratio(known):
    cat, noise, sigma = known
    m = validation_metrics(cat)
    single = (cat["component_true"] == "disk").to_numpy()
    assert m["sigma_bt"] == pytest.approx(noise["bt"].std(), rel=1e-9)
    assert m["bias_bt"] == pytest.approx(noise["bt"].mean(), abs=1e-12)
    assert m["sigma_bt_single"] == pytest.approx(SIGMA_SINGLE, rel=0.03)
    assert m["sigma_bt_double"] == pytest.approx(SIGMA_DOUBLE, rel=0.03)
    # The posterior-mean row uses bt_mean (offset by 0.5 sigma + 1 from the mode).
    mean_residual = noise["bt"] + 0.5 * sigma["bt"] + 1.0
    assert m["sigma_bt_posterior_mean"] == pytest.approx(mean_residual.std(), rel=1e-9)
    assert m["sigma_re_arcsec"] == pytest.approx(noise["re_arcsec"].std(), rel=1e-9)
    assert abs(m["bias_flux_nJy"]) < 3 * m["sigma_flux_nJy"] / np.sqrt(N)
    # Median |Gaussian| = 0.6745 sigma of the fractional noise.
    assert m["typical_re_fractional_pct"] == pytest.approx(100 * 0.6745 * RE_FRAC, rel=0.03)
    assert m["typical_flux_fractional_pct"] == pytest.approx(100 * 0.6745 * FLUX_FRAC, rel=0.03)
    # Magnitude scatter from a 2 % flux scatter: 2.5 / ln 10 * 0.02 mag.
    assert m["sigma_magnitude"] == pytest.approx(2.5 / np.log(10) * FLUX_FRAC, rel=0.03)
    assert m["re_ratio_mean"] == pytest.approx(1.0, abs=0.002)
    assert m["re_ratio_std"] == pytest.approx(RE_FRAC, rel=0.04)
    re_t = cat["re_arcsec_true"].to_numpy()
    r2 = 1 - np.sum(noise["re_arcsec"] ** 2) / np.sum((re_t - re_t.mean()) ** 2)
    assert m["r2_re_arcsec"] == pytest.approx(r2, rel=1e-12)
    # Analytic: 1 - f^2 E[Re^2] / Var(Re) for Re ~ U(0.1, 5) and fractional noise f.
    a, b = 0.1, 5.0
    expected = 1 - RE_FRAC**2 * (a * a + a * b + b * b) / 3 / ((b - a) ** 2 / 12)
    assert m["r2_re_arcsec"] == pytest.approx(expected, abs=0.001)
    assert m["sigma_bt_single"] < m["sigma_bt"] < m["sigma_bt_double"]
    assert m["sigma_bt_single"] == pytest.approx(noise["bt"][single].std(), rel=1e-9)
    # The paper's §6.2 statistic, the 68th percentile of |mode - true|.
    for p in PARAMETERS:
        assert m[f"p68_abs_residual_{p}"] == pytest.approx(np.percentile(np.abs(noise[p]), 68))
    t = cat["bt_true"].to_numpy()
    inside = (cat["bt_hpd68_lo"].to_numpy() <= t) & (t <= cat["bt_hpd68_hi"].to_numpy())
    assert m["coverage_68_bt_single_pct"] == pytest.approx(100 * inside[single].mean())
    assert m["coverage_68_bt_double_pct"] == pytest.approx(100 * inside[~single].mean())


def test_label_precision_and_well_constrained_cut(known):
    cat, noise, sigma = known
    cfg = FlagConfig()
    flags = compute_flags(cat, cfg)
    # Mark a known subset unreliable and make its residuals huge.
    rng = np.random.default_rng(9)
    bad = rng.random(N) < 0.1
    shift = np.where(bad, 0.7, 0.0)
    bt_cols = ["bt_mode"] + [c for c in cat.columns if c.startswith("bt_hpd")]
    cat2 = cat.with_columns(pl.col(c) + pl.Series(shift) for c in bt_cols)
    flags = flags.with_columns(pl.Series("unreliable", bad))
    m = validation_metrics(cat2, flags, cfg)

    bt_t, re_t = cat["bt_true"].to_numpy(), cat["re_arcsec_true"].to_numpy()
    bulge, disk = flags["bulge_dominated"].to_numpy(), flags["disk_dominated"].to_numpy()
    small = flags["small"].to_numpy()
    assert m["precision_bulge_dominated_pct"] == pytest.approx(100 * np.mean(bt_t[bulge] >= 0.85))
    assert m["precision_disk_dominated_pct"] == pytest.approx(100 * np.mean(bt_t[disk] <= 0.10))
    assert m["completeness_bulge_dominated_pct"] == pytest.approx(
        100 * np.mean(bulge[bt_t >= 0.85])
    )
    assert m["completeness_disk_dominated_pct"] == pytest.approx(100 * np.mean(disk[bt_t <= 0.10]))
    ok = (bulge & (bt_t >= 0.85)) | (disk & (bt_t <= 0.10))
    assert m["precision_extreme_bt_pct"] == pytest.approx(100 * ok.sum() / (bulge | disk).sum())
    assert m["precision_small_pct"] == pytest.approx(100 * np.mean(re_t[small] < 1.0))
    assert m["n_small"] == small.sum()

    assert m["n_unreliable"] == bad.sum()
    assert m["well_constrained.n_galaxies"] == N - bad.sum()
    assert m["well_constrained.sigma_bt"] == pytest.approx(noise["bt"][~bad].std(), rel=1e-9)
    assert m["sigma_bt"] > 2 * m["well_constrained.sigma_bt"]
    # Shifted modes leave their intervals: coverage of the subset stays nominal, all drops.
    assert m["well_constrained.coverage_68_bt_pct"] == pytest.approx(68.27, abs=1.5)
    assert m["coverage_68_bt_pct"] == pytest.approx(0.9 * 68.27, abs=1.5)


def test_validation_report_files(known, tmp_path):
    cat, _, _ = known
    cov = pl.DataFrame(
        {
            "dropout_rate": [0.0] * 6 + [0.01] * 6,
            "split": ["val"] * 12,
            "parameter": (["bt"] * 3 + ["re_arcsec"] * 3) * 2,
            "level": list(CREDIBLE_LEVELS) * 4,
            "coverage": [0.5, 0.8, 0.9, 0.6, 0.9, 0.95] + [0.68, 0.95, 0.997, 0.70, 0.96, 0.998],
            "recalibrated": [False] * 12,
        }
    )
    md, js = validation_report(cat, None, tmp_path / "v", profile_name="tiny", coverage_table=cov)
    text = md.read_text()
    assert "| metric | paper | ours | note |" in text
    assert f"**{N} galaxies with truths**" in text
    assert "| `coverage_68_bt_pct` | 71.8 % |" in text
    se = 100 * (0.6827 * 0.3173 / N) ** 0.5  # binomial s.e. of a calibrated coverage
    assert f"nominal 68.27 %, ±{se:.1f} s.e. at N={N} (paper: test split)" in text
    assert "| `sigma_bt` | 0.100 |" in text
    # Mean over bt and re of the 0.01 rate at 68.27 %: (0.68 + 0.70) / 2 = 69.0 %.
    assert "| val | 0.01 | False | 69.0 % | 95.5 % | 99.8 % |" in text
    payload = json.loads(js.read_text())
    assert payload["context"]["profile"] == "tiny"
    assert payload["context"]["model_version"] == "3"
    assert payload["paper_reference"] == PAPER_REFERENCE
    assert payload["metrics"]["n_galaxies"] == N


def test_refuses_catalog_without_truths_or_columns(known):
    real, _, _ = known_catalog(1, truths=False)
    with pytest.raises(ValueError, match="no truths"):
        validation_metrics(real)
    with pytest.raises(ValueError, match="re_arcsec_hpd95_hi"):
        validation_metrics(known[0].drop("re_arcsec_hpd95_hi"))
