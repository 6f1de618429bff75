"""Shift robustness: do the posteriors stay calibrated on galaxies the platform did not make?

:func:`evaluate_robustness` draws Table-1 galaxies, renders them with the independent GalSim
code of :mod:`gampen_ml.sim.independent` under each variation a survey really has (bulge
tied to the disk, other PSF families, sky noise +-25 %, sub-pixel centring, a log-uniform
population), catalogues them through the platform's one prediction path
(:func:`gampen_ml.prediction.predict_catalog`, the champion and its recalibration) and
measures, per variation and parameter:

* HPD coverage at 68.27 / 95.45 / 99.73 %;
* the median bias of the mode: ``mode - true`` for B/T, ``mode / true - 1`` for Re and flux;
* the median 68.27 % interval width (relative to the truth for Re and flux);
* the fraction flagged ``out_of_domain`` (these variations are *inside* the domain: it
  should be ~0);

and the 68.27 % coverage in bins of true Re, true magnitude and component
(:func:`conditional_coverage`). :func:`robustness_report` checks both against the targets
of :data:`TARGETS` and writes Markdown and JSON.

The suite's seed is frozen (:func:`frozen_seed`): it is a test set, never tuned on. Try
ideas on another ``seed``.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import polars as pl

from gampen_ml.calibrate import MAGNITUDE_BINS, RE_BINS_ARCSEC
from gampen_ml.config import CREDIBLE_LEVELS, PARAMETERS, Profile, derive_seed
from gampen_ml.metrics import LEVEL_TAGS, ab_magnitude, covered, residuals
from gampen_ml.store import CATALOG_FILE, LABELS_FILE

#: Targets of a calibrated platform (points of coverage; fraction for the bias).
TARGETS = {
    "coverage_68_points": 3.0,
    "coverage_95_points": 2.0,
    "binned_coverage_68_points": 5.0,
    "median_bias": 0.01,
}
#: Level tags in the order of :data:`CREDIBLE_LEVELS`.
TAGS = tuple(LEVEL_TAGS.values())

TABLE_FILE = "robustness.parquet"
BINNED_FILE = "robustness_binned.parquet"
MD_FILE = "robustness.md"
JSON_FILE = "robustness.json"
FIGURE_FILE = "robustness_coverage.png"


def frozen_seed(profile: Profile) -> int:
    """The suite's test seed: fixed per profile; never tune on it."""
    return derive_seed(profile.seed, "robustness", "frozen-test")


def calibration_summary(catalog: pl.DataFrame, name: str) -> pl.DataFrame:
    """Coverage, median bias and width per parameter of one catalog with truths.

    Returns
    -------
    pl.DataFrame
        One row per parameter: ``set``, ``parameter``, ``n``, ``coverage_68`` /
        ``_95`` / ``_99`` (fractions), ``median_bias`` (mode; absolute for B/T, fractional
        otherwise), ``p68_abs_residual`` (68th percentile of |mode − true|, fractional for Re
        and flux: the paper's §6.2 statistic), ``median_width_68`` (68.27 % HPD width;
        relative to the truth for Re and flux) and ``out_of_domain`` (fraction flagged, when
        the catalog has the column).
    """
    rows = []
    for p in PARAMETERS:
        true = catalog[f"{p}_true"].to_numpy()
        width = catalog[f"{p}_hpd68_hi"].to_numpy() - catalog[f"{p}_hpd68_lo"].to_numpy()
        residual = residuals(catalog, p, fractional=p != "bt")
        row = {
            "set": name,
            "parameter": p,
            "n": catalog.height,
            **{
                f"coverage_{tag}": float(covered(catalog, p, level).mean())
                for tag, level in zip(TAGS, CREDIBLE_LEVELS, strict=True)
            },
            "median_bias": float(np.median(residual)),
            "p68_abs_residual": float(np.quantile(np.abs(residual), 0.68)),
            "median_width_68": float(np.median(width if p == "bt" else width / true)),
            "out_of_domain": (
                float(catalog["out_of_domain"].mean())
                if "out_of_domain" in catalog.columns
                else math.nan
            ),
        }
        rows.append(row)
    return pl.DataFrame(rows)


def conditional_coverage(catalog: pl.DataFrame, name: str) -> pl.DataFrame:
    """68.27 % coverage in bins of true Re, true magnitude and (for B/T) component.

    Returns
    -------
    pl.DataFrame
        ``set``, ``parameter``, ``by`` (``re_arcsec_true``, ``magnitude_true``,
        ``component_true``), ``bin`` (label), ``n``, ``coverage_68``.
    """
    magnitude = ab_magnitude(catalog["flux_nJy_true"].to_numpy())
    bins = {
        "re_arcsec_true": (catalog["re_arcsec_true"].to_numpy(), RE_BINS_ARCSEC),
        "magnitude_true": (magnitude, MAGNITUDE_BINS),
    }
    rows = []
    for p in PARAMETERS:
        hit = covered(catalog, p, CREDIBLE_LEVELS[0])
        for by, (values, edges) in bins.items():
            index = np.searchsorted(edges, values, side="right") - 1
            for b in range(len(edges) - 1):
                mask = index == b
                if mask.any():
                    rows.append((name, p, by, _bin_label(edges[b], edges[b + 1]), mask, hit))
        if p == "bt" and catalog["component_true"].null_count() == 0:
            two = catalog["component_true"].to_numpy() == "bulge+disk"
            rows.append((name, p, "component_true", "two-component", two, hit))
            rows.append((name, p, "component_true", "single", ~two, hit))
    return pl.DataFrame(
        [
            {
                "set": s,
                "parameter": p,
                "by": by,
                "bin": label,
                "n": int(mask.sum()),
                "coverage_68": float(hit[mask].mean()) if mask.any() else math.nan,
            }
            for s, p, by, label, mask, hit in rows
        ],
        schema={
            "set": pl.String,
            "parameter": pl.String,
            "by": pl.String,
            "bin": pl.String,
            "n": pl.Int64,
            "coverage_68": pl.Float64,
        },
    )


def _bin_label(lo: float, hi: float) -> str:
    if math.isinf(lo):
        return f"< {hi:g}"
    if math.isinf(hi):
        return f">= {lo:g}"
    return f"{lo:g}-{hi:g}"


def evaluate_robustness(
    profile: Profile,
    model,
    out_dir: Path | str,
    *,
    n_per_variation: int,
    seed: int,
    psf_fwhm_range: tuple[float, float] | None = None,
    noise_sigma_nJy: float | tuple[float, float] | None = None,
    variations: Sequence[str] | None = None,
    device: str | None = None,
    n_workers: int = 1,
    log: Callable[[str], None] | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Catalogue every variation of the independent renderer and measure calibration.

    Parameters
    ----------
    profile : Profile
        Priors, imaging, PSF and noise settings, inference and flag thresholds.
    model : gampen_ml.prediction.PredictionModel
        The model and its calibration (:func:`gampen_ml.prediction.resolve_prediction_model`).
    out_dir : path-like
        Receives ``<variation>/catalog.parquet`` (flags joined) and the two tables.
    n_per_variation : int
        Galaxies per variation (the same Table-1 draws for every variation but
        ``loguniform``).
    seed : int
        Seed of the draws, the rendering and MC dropout (:func:`frozen_seed` for the report).
    psf_fwhm_range, noise_sigma_nJy
        What the training set was made of, for the flags (``gampen_ml.flags.compute_flags``).
    variations : sequence of str, optional
        Default: every variation of :data:`gampen_ml.sim.independent.VARIATIONS`.
    device, n_workers
        Torch device; rendering processes.
    log : callable(str), optional
        Progress lines.

    Returns
    -------
    (table, binned)
        :func:`calibration_summary` and :func:`conditional_coverage` rows of every variation.
    """
    from gampen_ml.flags import compute_flags
    from gampen_ml.prediction import predict_catalog
    from gampen_ml.sim.independent import VARIATIONS, draw_population, render_variations

    log = log or (lambda line: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    priors = profile.simulation.priors
    population = draw_population(
        priors, n_per_variation, np.random.default_rng(derive_seed(seed, "population"))
    )
    loguniform = draw_population(
        priors,
        n_per_variation,
        np.random.default_rng(derive_seed(seed, "population", "loguniform")),
        loguniform=True,
    )
    variations = tuple(variations or VARIATIONS)
    log(f"rendering {len(variations)} variations x {n_per_variation} galaxies")
    rendered = {}
    for params, subset in (
        (population, [v for v in variations if v != "loguniform"]),
        (loguniform, [v for v in variations if v == "loguniform"]),
    ):
        if subset:
            rendered |= render_variations(
                subset,
                params,
                profile.imaging,
                profile.psf,
                profile.noise.sky_sigma_nJy,
                derive_seed(seed, "render"),
                n_workers=n_workers,
            )
    tables, binned = [], []
    for variation in variations:
        images, labels = rendered.pop(variation)
        catalog = predict_catalog(
            profile,
            model,
            images,
            labels.select("galaxy_id", "psf_fwhm_arcsec"),
            dataset=f"robustness-{variation}",
            seed=derive_seed(seed, "mc", variation),
            truths=labels.select(*PARAMETERS, "component"),
            device=device,
        )
        flags = compute_flags(
            catalog,
            profile.flags,
            psf_fwhm_range=psf_fwhm_range,
            noise_sigma_nJy=noise_sigma_nJy,
            priors=priors,
        )
        catalog = catalog.join(flags.drop("dataset"), on="galaxy_id", how="left")
        folder = out_dir / variation
        folder.mkdir(exist_ok=True)
        catalog.write_parquet(folder / CATALOG_FILE)
        labels.write_parquet(folder / LABELS_FILE)
        tables.append(calibration_summary(catalog, variation))
        binned.append(conditional_coverage(catalog, variation))
        row = tables[-1]
        log(
            f"{variation}: "
            + ", ".join(
                f"{r['parameter']} {100 * r['coverage_68']:.1f}/{100 * r['coverage_95']:.1f}"
                f" bias {100 * r['median_bias']:+.1f}%"
                for r in row.iter_rows(named=True)
            )
        )
    table, conditional = pl.concat(tables), pl.concat(binned)
    table.write_parquet(out_dir / TABLE_FILE)
    conditional.write_parquet(out_dir / BINNED_FILE)
    return table, conditional


def target_misses(table: pl.DataFrame, binned: pl.DataFrame) -> list[str]:
    """Every target of :data:`TARGETS` that a set misses, in words (empty: all met)."""
    misses = []
    for r in table.iter_rows(named=True):
        where = f"{r['set']} {r['parameter']}"
        for tag, level, limit in (
            ("68", 0.6827, TARGETS["coverage_68_points"]),
            ("95", 0.9545, TARGETS["coverage_95_points"]),
        ):
            off = 100 * (r[f"coverage_{tag}"] - level)
            if abs(off) > limit:
                misses.append(f"{where}: coverage {tag} off by {off:+.1f} points")
        if r["parameter"] != "bt" and abs(r["median_bias"]) > TARGETS["median_bias"]:
            misses.append(f"{where}: median bias {100 * r['median_bias']:+.1f} %")
    for r in binned.iter_rows(named=True):
        off = 100 * (r["coverage_68"] - 0.6827)
        if abs(off) > TARGETS["binned_coverage_68_points"]:
            misses.append(
                f"{r['set']} {r['parameter']} {r['by']} {r['bin']} (n={r['n']}): coverage 68 "
                f"off by {off:+.1f} points"
            )
    return misses


def robustness_report(
    table: pl.DataFrame, binned: pl.DataFrame, out_dir: Path | str, *, header: str = ""
) -> tuple[Path, Path]:
    """Markdown, JSON and a coverage figure of the suite, each set checked against :data:`TARGETS`."""
    out_dir = Path(out_dir)
    misses = target_misses(table, binned)
    lines = [
        "# Calibration under shifts",
        "",
        header,
        "",
        "Coverage: fraction of galaxies whose true value lies in the HPD interval (nominal "
        "68.27 / 95.45 / 99.73 %). Bias: median of mode − true (B/T) or mode / true − 1 (Re, "
        "flux). p68: 68th percentile of |mode − true| (B/T) or |mode / true − 1| (the paper's "
        "§6.2 statistic). Width: median 68.27 % interval (relative to the truth for Re and "
        "flux). "
        "Targets: 68.27 % within ±3 points, 95.45 % within ±2, every bin's 68.27 % within "
        "±5, |bias| of Re and flux < 1 %.",
        "",
        "| set | parameter | n | coverage 68 / 95 / 99.7 % | median bias | p68 | "
        "median width 68 | out_of_domain |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in table.iter_rows(named=True):
        bias = (
            f"{r['median_bias']:+.3f}"
            if r["parameter"] == "bt"
            else f"{100 * r['median_bias']:+.1f} %"
        )
        width, p68 = (
            f"{r[key]:.3f}" if r["parameter"] == "bt" else f"{100 * r[key]:.1f} %"
            for key in ("median_width_68", "p68_abs_residual")
        )
        ood = "" if math.isnan(r["out_of_domain"]) else f"{100 * r['out_of_domain']:.1f} %"
        lines.append(
            f"| {r['set']} | {r['parameter']} | {r['n']} | {100 * r['coverage_68']:.1f} / "
            f"{100 * r['coverage_95']:.1f} / {100 * r['coverage_99']:.1f} | {bias} | {p68} | "
            f"{width} | {ood} |"
        )
    lines += ["", "## 68.27 % coverage in bins", ""]
    wide = binned.with_columns(
        (pl.col("by") + ": " + pl.col("bin")).alias("column"),
        pl.format("{} ({})", (100 * pl.col("coverage_68")).round(1), pl.col("n")).alias("cell"),
    )
    columns = wide.select("column").unique(maintain_order=True)["column"].to_list()
    lines += [
        "| set | parameter | " + " | ".join(columns) + " |",
        "|---|---|" + "---|" * len(columns),
    ]
    for (s, p), group in wide.group_by(["set", "parameter"], maintain_order=True):
        cells = dict(zip(group["column"], group["cell"], strict=True))
        lines.append(f"| {s} | {p} | " + " | ".join(cells.get(c, "") for c in columns) + " |")
    lines += ["", f"## Targets missed: {len(misses)}", ""]
    lines += [f"- {m}" for m in misses] or ["All targets met."]
    from gampen_ml import plots

    plots.save_figure(plots.robustness_coverage(table), out_dir / FIGURE_FILE)
    lines += ["", f"![coverage per variation]({FIGURE_FILE})"]
    md = out_dir / MD_FILE
    md.write_text("\n".join(lines) + "\n")
    js = out_dir / JSON_FILE
    js.write_text(
        json.dumps(
            {
                "targets": TARGETS,
                "table": table.to_dicts(),
                "binned": binned.to_dicts(),
                "misses": misses,
            },
            indent=2,
        )
    )
    return md, js
