"""Validation of a simulated posterior catalog against the paper's reported numbers.

:func:`validation_metrics` computes, from a catalog with truths (docs/catalog.md), the
quantities Ghosh et al. (2022) report: HPD coverage at 68.27/95.45/99.73 % (Table 2),
residual scatter and bias (§6.2, §7), R^2 and the Re ratio (§7 comparison with the
literature), and the precision of the qualitative labels (§6.4) -- for all galaxies and
again for the galaxies not flagged ``unreliable`` (nothing marks them as unlike the training
set; JSON keys ``well_constrained.*``).
:func:`validation_report` writes them side by side with :data:`PAPER_REFERENCE` as
Markdown and JSON.

The point prediction is the posterior mode and a residual is ``mode - true`` (paper
§6.2). Coverage and flag precisions are in percent, like the paper.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl
from astropy.stats import sigma_clipped_stats

from gampen_ml.config import CREDIBLE_LEVELS, PARAMETERS, FlagConfig
from gampen_ml.flags import bt_point_estimate, describe_bt_labels
from gampen_ml.io import atomic_file
from gampen_ml.metrics import (
    AB_MAG_1_NJY,
    LEVEL_TAGS,
    ab_magnitude,
    covered,
    flag_arrays,
    float_column,
    has_truths,
    residuals,
)

#: The paper's reference numbers (Ghosh et al. 2022), keyed like :func:`validation_metrics`.
PAPER_REFERENCE: dict[str, float] = {
    # Table 2: coverage probabilities on the test set [%].
    "coverage_68_bt_pct": 71.8,
    "coverage_95_bt_pct": 96.9,
    "coverage_99_bt_pct": 98.9,
    "coverage_68_re_arcsec_pct": 68.1,
    "coverage_95_re_arcsec_pct": 95.9,
    "coverage_99_re_arcsec_pct": 98.3,
    "coverage_68_flux_nJy_pct": 78.7,
    "coverage_95_flux_nJy_pct": 98.2,
    "coverage_99_flux_nJy_pct": 99.9,
    "coverage_68_mean_pct": 72.9,
    "coverage_95_mean_pct": 97.0,
    "coverage_99_mean_pct": 99.0,
    # §6.2 / Fig. 12: residual distributions have mean ~ median ~ 0.
    "bias_bt": 0.0,
    "bias_re_arcsec": 0.0,
    "bias_flux_nJy": 0.0,
    # §7: typical errors 0.10 (B/T), 0.17" (~7 %) for Re, 6.3e4 nJy (~1 %) for flux.
    "sigma_bt": 0.10,
    "sigma_re_arcsec": 0.17,
    "typical_re_fractional_pct": 7.0,
    "sigma_flux_nJy": 6.3e4,
    "typical_flux_fractional_pct": 1.0,
    # §6.2 / Fig. 15: B/T residual sigma of single- and two-component galaxies.
    "sigma_bt_single": 0.06,
    "sigma_bt_double": 0.11,
    # §7: B/T sigma once the extreme-B/T labels replace the numbers.
    "sigma_bt_unlabelled": 0.076,
    # §7: magnitude error 0.051 mag; R^2 (eq. 17) 0.998 (magnitude) and 0.980 (Re);
    # Re ratio predicted/true 0.98 +- 0.08.
    "sigma_magnitude": 0.051,
    "r2_magnitude": 0.998,
    "r2_re_arcsec": 0.980,
    "re_ratio_mean": 0.98,
    "re_ratio_std": 0.08,
    # §6.4 / Fig. 20: extreme-B/T label accuracy >~ 99 %; Re < 1" label ~ 97 %.
    "precision_extreme_bt_pct": 99.0,
    "precision_small_pct": 97.0,
}

#: How each metric is computed (the ``note`` column of the report).
METRIC_NOTES: dict[str, str] = {
    "bias_bt": "mean of mode - true",
    "sigma_bt": "std of mode - true",
    "sigma_bt_single": "single-component galaxies (component_true, else true B/T in {0, 1})",
    "sigma_bt_double": "two-component galaxies",
    "sigma_bt_unlabelled": "galaxies not labelled bulge- or disk-dominated, residual of the "
    "labels' B/T estimate (paper: 'reduce ... to 0.076')",
    "sigma_bt_posterior_mean": "std of posterior mean - true: a posterior broad in logit(B/T) is "
    "U-shaped in B/T, so its mode sits at 0 or 1",
    "sigma_re_arcsec": "std of mode - true",
    "p68_abs_residual_bt": "68th percentile of |mode - true| (the paper's §6.2 statistic)",
    "p68_abs_residual_re_arcsec": "68th percentile of |mode - true|, arcsec",
    "p68_abs_residual_flux_nJy": "68th percentile of |mode - true|, nJy",
    "coverage_68_bt_single_pct": "68.27 % HPD coverage of single-component galaxies (B/T 0 or "
    "1: a point mass, over-covered by design)",
    "coverage_68_bt_double_pct": "68.27 % HPD coverage of two-component galaxies",
    "typical_re_fractional_pct": "median |mode - true| / true; the paper does not define 'typical'",
    "sigma_re_arcsec_not_small": 'galaxies not labelled small (Re mode >= 1")',
    "sigma_flux_nJy": "std of mode - true",
    "typical_flux_fractional_pct": "median |mode - true| / true; the paper does not define 'typical'",
    "sigma_magnitude": f"std of m(mode) - m(true), m = {AB_MAG_1_NJY} - 2.5 log10 F/nJy",
    "r2_magnitude": "eq. 17 on AB magnitudes",
    "r2_re_arcsec": "eq. 17 on Re",
    "re_ratio_mean": "3-sigma-clipped mean of Re mode / Re true (astropy)",
    "re_ratio_std": "3-sigma-clipped std of Re mode / Re true",
    "precision_extreme_bt_pct": "labelled bulge-/disk-dominated whose true B/T is on the same side of "
    "the threshold; the paper's true classes for Fig. 20 are not stated (>~ 99 %)",
    "precision_direction_bt_pct": "labelled bulge-/disk-dominated whose true B/T is on the same side of 0.5",
    "precision_bulge_dominated_pct": "true B/T >= bulge threshold among labelled bulge-dominated",
    "precision_disk_dominated_pct": "true B/T <= disk threshold among labelled disk-dominated",
    "precision_small_pct": 'true Re < 1" among labelled small (paper ~ 97 %)',
    "completeness_bulge_dominated_pct": "labelled among the galaxies whose true B/T >= the "
    "bulge threshold (the price of precision)",
    "completeness_disk_dominated_pct": "labelled among the galaxies whose true B/T <= the "
    "disk threshold",
}


def _pct(x: float) -> float:
    return 100.0 * x


def _r2(true: np.ndarray, pred: np.ndarray) -> float:
    """Coefficient of determination, paper eq. 17."""
    ok = np.isfinite(true) & np.isfinite(pred)
    t, f = true[ok], pred[ok]
    if t.size < 2:
        return math.nan
    return float(1.0 - np.sum((t - f) ** 2) / np.sum((t - t.mean()) ** 2))


def _std(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.std()) if x.size > 1 else math.nan  # one residual has no scatter


def _mean(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(x.mean()) if x.size else math.nan


def _median(x: np.ndarray) -> float:
    x = x[np.isfinite(x)]
    return float(np.median(x)) if x.size else math.nan


def _precision(flagged: np.ndarray, correct: np.ndarray) -> float:
    n = int(flagged.sum())
    return _pct(float((flagged & correct).sum()) / n) if n else math.nan


def _metrics_of(cat: pl.DataFrame, f: dict[str, np.ndarray], cfg: FlagConfig) -> dict[str, float]:
    """All metrics of a catalog subset (rows with truths) with aligned flag arrays."""
    m: dict[str, float] = {"n_galaxies": float(cat.height)}
    # Coverage: fraction of true values inside the HPD interval (paper §5, Table 2).
    for level in CREDIBLE_LEVELS:
        tag = LEVEL_TAGS[level]
        per_param = []
        for p in PARAMETERS:
            inside = covered(cat, p, level)
            m[f"coverage_{tag}_{p}_pct"] = _pct(float(inside.mean())) if cat.height else math.nan
            per_param.append(m[f"coverage_{tag}_{p}_pct"])
        m[f"coverage_{tag}_mean_pct"] = float(np.mean(per_param))

    res = {p: residuals(cat, p) for p in PARAMETERS}
    for p in PARAMETERS:
        m[f"bias_{p}"] = _mean(res[p])
        m[f"sigma_{p}"] = _std(res[p])
        # The paper's §6.2 statistic: the 68th percentile of |residual|, robust to outliers.
        m[f"p68_abs_residual_{p}"] = (
            float(np.percentile(np.abs(res[p]), 68)) if res[p].size else math.nan
        )

    bt_true = float_column(cat, "bt_true")
    if "component_true" in cat.columns and cat["component_true"].null_count() < cat.height:
        double = (cat["component_true"].fill_null("") == "bulge+disk").to_numpy()
    else:
        double = ~((bt_true == 0.0) | (bt_true == 1.0))
    m["sigma_bt_single"] = _std(res["bt"][~double])
    m["sigma_bt_double"] = _std(res["bt"][double])
    inside = covered(cat, "bt", CREDIBLE_LEVELS[0])
    m["coverage_68_bt_single_pct"] = (
        _pct(float(inside[~double].mean())) if (~double).any() else math.nan
    )
    m["coverage_68_bt_double_pct"] = (
        _pct(float(inside[double].mean())) if double.any() else math.nan
    )
    labelled_bt = f["bulge_dominated"] | f["disk_dominated"]
    # The labels read cfg.bt_estimate; the numbers kept for the rest are that estimate too.
    estimate = bt_point_estimate(cfg)
    m["sigma_bt_unlabelled"] = _std(residuals(cat, "bt", estimate=estimate)[~labelled_bt])
    m["sigma_bt_posterior_mean"] = _std(residuals(cat, "bt", estimate="mean"))

    re_true, re_mode = float_column(cat, "re_arcsec_true"), float_column(cat, "re_arcsec_mode")
    m["sigma_re_arcsec_not_small"] = _std(res["re_arcsec"][~f["small"]])
    m["typical_re_fractional_pct"] = _pct(
        _median(np.abs(residuals(cat, "re_arcsec", fractional=True)))
    )
    m["typical_flux_fractional_pct"] = _pct(
        _median(np.abs(residuals(cat, "flux_nJy", fractional=True)))
    )
    m["r2_re_arcsec"] = _r2(re_true, re_mode)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = re_mode / re_true
    mag_true = ab_magnitude(float_column(cat, "flux_nJy_true"))
    mag_mode = (
        float_column(cat, "magnitude_mode")
        if "magnitude_mode" in cat.columns
        else ab_magnitude(float_column(cat, "flux_nJy_mode"))
    )
    ratio = ratio[np.isfinite(ratio)]
    if ratio.size:
        mean, _, std = sigma_clipped_stats(ratio, sigma=3.0)
        m["re_ratio_mean"], m["re_ratio_std"] = float(mean), float(std)
    else:
        m["re_ratio_mean"] = m["re_ratio_std"] = math.nan
    m["sigma_magnitude"] = _std(mag_mode - mag_true)
    m["bias_magnitude"] = _mean(mag_mode - mag_true)
    m["r2_magnitude"] = _r2(mag_true, mag_mode)

    # Label precision (paper §6.4, Fig. 20): labels come from predictions, checked on truths.
    true_bulge = bt_true >= cfg.bulge_dominated_min_bt
    true_disk = bt_true <= cfg.disk_dominated_max_bt
    bulge, disk, small = f["bulge_dominated"], f["disk_dominated"], f["small"]
    m["precision_bulge_dominated_pct"] = _precision(bulge, true_bulge)
    m["precision_disk_dominated_pct"] = _precision(disk, true_disk)
    m["precision_extreme_bt_pct"] = _precision(
        bulge | disk, (bulge & true_bulge) | (disk & true_disk)
    )
    m["precision_direction_bt_pct"] = _precision(
        bulge | disk, (bulge & (bt_true > 0.5)) | (disk & (bt_true < 0.5))
    )
    m["precision_small_pct"] = _precision(small, re_true < cfg.small_max_re_arcsec)
    m["completeness_bulge_dominated_pct"] = _precision(true_bulge, bulge & true_bulge)
    m["completeness_disk_dominated_pct"] = _precision(true_disk, disk & true_disk)
    m["n_bulge_dominated"] = float(bulge.sum())
    m["n_disk_dominated"] = float(disk.sum())
    m["n_small"] = float(small.sum())
    return m


def validation_metrics(
    catalog: pl.DataFrame, flags: pl.DataFrame | None = None, flag_config: FlagConfig | None = None
) -> dict[str, float]:
    """Paper-comparable accuracy and calibration metrics of a simulated catalog.

    Parameters
    ----------
    catalog : pl.DataFrame
        Posterior catalog with truths (``{p}_true`` non-null); rows whose truths are null
        are ignored.
    flags : pl.DataFrame, optional
        Qualitative flags (``galaxy_id`` + flag columns); computed with
        :func:`gampen_ml.flags.compute_flags` when absent.
    flag_config : FlagConfig, optional
        Thresholds for the true classes of the label precisions (and for computing flags).

    Returns
    -------
    dict of str -> float
        Keys of :data:`PAPER_REFERENCE` and more (``n_galaxies``, ``bias_magnitude``,
        ``sigma_re_arcsec_not_small``, ``precision_*``, ``n_*``), then the same metrics on
        the galaxies not flagged ``unreliable`` under ``well_constrained.<key>``, and
        ``n_unreliable``. Coverage and precision in percent; Re in arcsec; flux in nJy.
        NaN where a subset is empty.

    Raises
    ------
    ValueError
        If the catalog has no truths or lacks a needed column (named).
    """
    cfg = flag_config or FlagConfig()
    needed = [
        f"{p}_{s}"
        for p in PARAMETERS
        for s in (
            "mode",
            "true",
            *(f"hpd{t}_{b}" for t in LEVEL_TAGS.values() for b in ("lo", "hi")),
        )
    ]
    for col in ("galaxy_id", *needed):
        if col not in catalog.columns:
            raise ValueError(f"validation_metrics: catalog has no column {col!r}")
    if not has_truths(catalog):
        raise ValueError(
            "validation_metrics: catalog has no truths (a *_true column is all null); "
            "validation needs a simulated catalog"
        )
    f_all = flag_arrays(catalog, flags, cfg)
    keep = np.ones(catalog.height, dtype=bool)
    for p in PARAMETERS:
        keep &= np.isfinite(float_column(catalog, f"{p}_true"))
    cat = catalog.filter(pl.Series(keep))
    f = {k: v[keep] for k, v in f_all.items()}
    metrics = _metrics_of(cat, f, cfg)
    good = ~f["unreliable"]
    metrics["n_unreliable"] = float(f["unreliable"].sum())
    sub = _metrics_of(cat.filter(pl.Series(good)), {k: v[good] for k, v in f.items()}, cfg)
    metrics |= {f"well_constrained.{k}": v for k, v in sub.items()}
    return metrics


#: Credible level of each short tag (``"68" -> 0.6827``).
_LEVEL_OF_TAG = {tag: level for level, tag in LEVEL_TAGS.items()}


def _fmt(key: str, value: float | None) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    if key.startswith("n_") or ".n_" in key:
        return f"{int(value)}"
    if key.endswith("_pct"):
        return f"{value:.1f} %"
    if "flux_nJy" in key and "sigma" in key or key.startswith("bias_flux"):
        return f"{value:.3g}"
    return f"{value:.3f}"


_ROW_ORDER = [
    *(f"coverage_{t}_{p}_pct" for p in (*PARAMETERS, "mean") for t in LEVEL_TAGS.values()),
    "coverage_68_bt_single_pct",
    "coverage_68_bt_double_pct",
    "bias_bt",
    "sigma_bt",
    "p68_abs_residual_bt",
    "sigma_bt_single",
    "sigma_bt_double",
    "sigma_bt_unlabelled",
    "sigma_bt_posterior_mean",
    "bias_re_arcsec",
    "sigma_re_arcsec",
    "p68_abs_residual_re_arcsec",
    "sigma_re_arcsec_not_small",
    "typical_re_fractional_pct",
    "re_ratio_mean",
    "re_ratio_std",
    "r2_re_arcsec",
    "bias_flux_nJy",
    "sigma_flux_nJy",
    "p68_abs_residual_flux_nJy",
    "typical_flux_fractional_pct",
    "bias_magnitude",
    "sigma_magnitude",
    "r2_magnitude",
    "precision_extreme_bt_pct",
    "precision_direction_bt_pct",
    "precision_bulge_dominated_pct",
    "precision_disk_dominated_pct",
    "precision_small_pct",
    "completeness_bulge_dominated_pct",
    "completeness_disk_dominated_pct",
    "n_bulge_dominated",
    "n_disk_dominated",
    "n_small",
]


def _table(metrics: dict[str, float], prefix: str = "") -> list[str]:
    lines = ["| metric | paper | ours | note |", "|---|---|---|---|"]
    for key in _ROW_ORDER:
        value = metrics.get(prefix + key)
        ref = PAPER_REFERENCE.get(key)
        note = METRIC_NOTES.get(key, "")
        if key.startswith("coverage_") and key not in METRIC_NOTES:
            level = round(100 * _LEVEL_OF_TAG[key.split("_")[1]], 2)  # 99.73, not 99.72999...
            n = metrics.get(prefix + "n_galaxies") or 0
            # Binomial standard error of a calibrated model's coverage on n galaxies: the
            # scatter to expect from the test split alone.
            se = f", ±{math.sqrt(level * (100 - level) / n):.1f} s.e. at N={int(n)}" if n else ""
            note = f"HPD coverage, nominal {level} %{se} (paper: test split)"
        note = note.replace("|", "\\|")  # a bare pipe would split the Markdown cell
        lines.append(
            f"| `{key}` | {_fmt(key, ref) if ref is not None else '-'} | {_fmt(key, value)} | {note} |"
        )
    return lines


def _coverage_section(coverage_table: pl.DataFrame) -> list[str]:
    needed = ("dropout_rate", "split", "parameter", "level", "coverage", "recalibrated")
    for col in needed:
        if col not in coverage_table.columns:
            raise ValueError(f"validation_report: coverage_table has no column {col!r}")
    mean = (
        coverage_table.group_by("split", "dropout_rate", "recalibrated", "level")
        .agg(pl.col("coverage").mean())
        .sort("split", "dropout_rate", "recalibrated", "level")
    )
    levels = mean["level"].unique().sort().to_list()
    head = " | ".join(f"{100 * lv:.2f} %" for lv in levels)
    lines = [
        "## Calibration: mean coverage over parameters per dropout rate",
        "",
        f"| split | dropout rate | recalibrated | {head} |",
        "|---|---|---|" + "---|" * len(levels),
    ]
    for (split, rate, recal), group in mean.group_by(
        "split", "dropout_rate", "recalibrated", maintain_order=True
    ):
        cov = dict(zip(group["level"].to_list(), group["coverage"].to_list(), strict=True))
        cells = " | ".join(f"{100 * cov[lv]:.1f} %" if lv in cov else "n/a" for lv in levels)
        lines.append(f"| {split} | {rate:g} | {recal} | {cells} |")
    return [*lines, ""]


def _first(catalog: pl.DataFrame, col: str) -> object:
    if col in catalog.columns and catalog.height and catalog[col].null_count() < catalog.height:
        return catalog[col].drop_nulls()[0]
    return None


def validation_report(
    catalog: pl.DataFrame,
    flags: pl.DataFrame | None,
    out_dir: Path | str,
    *,
    profile_name: str,
    coverage_table: pl.DataFrame | None = None,
    flag_config: FlagConfig | None = None,
) -> tuple[Path, Path]:
    """Write ``validation.md`` and ``validation.json``: our metrics beside the paper's.

    Parameters
    ----------
    catalog, flags, flag_config
        As for :func:`validation_metrics`.
    out_dir : Path or str
        Output folder (created).
    profile_name : str
        Profile the catalog was produced with (stated in the report: a ``quick`` model is
        not expected to reach the paper's accuracy).
    coverage_table : pl.DataFrame, optional
        Calibration coverage table; summarized per split and dropout rate.

    Returns
    -------
    (Path, Path)
        The Markdown and JSON files.
    """
    metrics = validation_metrics(catalog, flags, flag_config)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    n = int(metrics["n_galaxies"])
    n_good = int(metrics["well_constrained.n_galaxies"])
    context = {
        "profile": profile_name,
        "dataset": _first(catalog, "dataset"),
        "model_name": _first(catalog, "model_name"),
        "model_version": _first(catalog, "model_version"),
        "dropout_rate": _first(catalog, "dropout_rate"),
        "n_passes": _first(catalog, "n_passes"),
        "recalibrated": _first(catalog, "recalibrated"),
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    lines = [
        f"# Validation against Ghosh et al. (2022): {context['dataset'] or 'catalog'}",
        "",
        f"Profile `{profile_name}`; "
        + "; ".join(
            f"{k.replace('_', ' ')}: {context[k]}"
            for k in ("model_name", "model_version", "dropout_rate", "n_passes", "recalibrated")
            if context[k] is not None
        )
        + ".",
        "",
        f"**{n} galaxies with truths** (the paper: 22,500 test galaxies, 1000 passes, the "
        "full VGG-16). Point prediction = posterior mode; residual = mode - true. "
        f"B/T labels (bulge-/disk-dominated) {describe_bt_labels(flag_config or FlagConfig())}. "
        "Numbers from a small profile are not expected to match the paper's.",
        "",
        "## All galaxies",
        "",
        *_table(metrics),
        "",
        f"## Galaxies not flagged unreliable (like the training set): {n_good} of {n}",
        "",
        *_table(metrics, "well_constrained."),
        "",
    ]
    if coverage_table is not None:
        lines += _coverage_section(coverage_table)
    md_path, json_path = out_dir / "validation.md", out_dir / "validation.json"
    with atomic_file(md_path) as tmp:
        Path(tmp).write_text("\n".join(lines))
    clean = {k: (v if math.isfinite(v) else None) for k, v in metrics.items()}
    payload = {"context": context, "metrics": clean, "paper_reference": PAPER_REFERENCE}
    with atomic_file(json_path) as tmp:
        Path(tmp).write_text(json.dumps(payload, indent=2, default=str))
    return md_path, json_path
