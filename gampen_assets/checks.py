"""Asset checks guarding every stage.

Blocking checks stop the downstream assets of the same run when they fail: bad PSFs, noise
or simulations must not train a model; a diverged model must not be calibrated; a
miscalibrated champion must not produce catalogs; a broken catalog must not be flagged or
plotted. Each check reads the partition's files (never large arrays through Dagster) and
reports what it measured as metadata, whether it passes or not.
"""

import json
import math

import numpy as np
import polars as pl
from dagster import AssetCheckResult, AssetCheckSeverity, asset_check

from gampen_assets.assets._common import partition_check
from gampen_assets.assets._metadata import md_table
from gampen_assets.assets.data_assets import (
    noise_pool,
    psf_library,
    simulated_galaxies,
)
from gampen_assets.assets.model_assets import (
    calibrated_dropout_rate,
    trained_model,
)
from gampen_assets.assets.prediction_assets import (
    diagnostic_plots,
    posterior_catalog,
    qualitative_flags,
    robustness_report,
)
from gampen_assets.partitions import SIM_TEST
from gampen_assets.resources import GampenSettings
from gampen_ml.metrics import coverage_bounds, non_nested_intervals
from gampen_ml.plots.common import PNG_MAGIC
from gampen_ml.store import (
    HISTORY_FILE,
    LABELS_FILE,
    MODEL_JSON_FILE,
    PLOTS_INDEX_FILE,
    SCALER_FILE,
    STATE_DICT_FILE,
    TRAINED_MODEL,
    Calibration,
)

#: Measured FWHM of a pixelated Moffat may sit a little outside the drawn range.
FWHM_MARGIN = 0.15
#: Tolerated |pool std / configured sigma - 1| of a synthetic noise pool.
NOISE_STD_RTOL = 0.10
#: Splits are drawn with exact counts per shard: each may differ from fraction x N by
#: rounding only (at most this many galaxies).
SPLIT_ROUNDING_GALAXIES = 1


def _failed(problems: list[str]) -> dict:
    return {"problems": "; ".join(problems) if problems else "none"}


# ---------------------------------------------------------------- inputs


@asset_check(asset=psf_library, blocking=True, description="Unit-sum, finite PSFs; FWHM in range")
def psf_library_valid(settings: GampenSettings) -> AssetCheckResult:
    from gampen_ml.sim.psf import read_psf_library

    profile = settings.profile()
    cube, table = read_psf_library(settings.store().psf_library())
    problems: list[str] = []
    if cube.ndim != 3 or cube.dtype != np.float32:
        problems.append(f"cube is {cube.dtype} {cube.shape}, want (n, s, s) float32")
    if len(cube) != table.height:
        problems.append(f"{len(cube)} PSF images but {table.height} table rows")
    finite = bool(np.isfinite(cube).all())
    if not finite:
        problems.append("PSF cube has NaN/inf pixels")
    sums = cube.astype(np.float64).sum(axis=(1, 2))
    worst_sum = float(np.max(np.abs(sums - 1.0))) if len(sums) else math.nan
    if not worst_sum <= 1e-4:
        problems.append(f"PSF sums deviate from 1 by up to {worst_sum:.3g}")
    lo, hi = profile.psf.fwhm_range_arcsec
    fwhm = table["measured_fwhm_arcsec"].to_numpy()
    fwhm_min, fwhm_max = float(np.min(fwhm)), float(np.max(fwhm))
    if fwhm_min < lo * (1 - FWHM_MARGIN) or fwhm_max > hi * (1 + FWHM_MARGIN):
        problems.append(f'measured FWHM {fwhm_min:.3f}-{fwhm_max:.3f}" outside {lo}-{hi}"')
    if not profile.psf.source_dir and len(cube) != profile.psf.n_psfs:
        problems.append(f"{len(cube)} PSFs, profile asks for {profile.psf.n_psfs}")
    return AssetCheckResult(
        passed=not problems,
        metadata={
            "n_psfs": float(len(cube)),
            "max_abs_sum_minus_1": worst_sum,
            "fwhm_min_arcsec": fwhm_min,
            "fwhm_max_arcsec": fwhm_max,
            **_failed(problems),
        },
    )


@asset_check(asset=noise_pool, blocking=True, description="Finite noise; std matches the config")
def noise_pool_valid(settings: GampenSettings) -> AssetCheckResult:
    from gampen_ml.sim.noise import read_noise_pool

    profile = settings.profile()
    pool = read_noise_pool(settings.store().noise_pool())
    pixels = np.asarray(pool.pixels, dtype=np.float64)
    problems: list[str] = []
    if pixels.size == 0 or not np.isfinite(pixels).all():
        problems.append(f"{pixels.size} pixels, {int((~np.isfinite(pixels)).sum())} not finite")
    std = float(pixels.std()) if pixels.size else math.nan
    mean = float(pixels.mean()) if pixels.size else math.nan
    sigma = profile.noise.sky_sigma_nJy
    synthetic = not profile.noise.source_dir
    if synthetic and not abs(std / sigma - 1.0) <= NOISE_STD_RTOL:
        problems.append(f"pixel std {std:.4g} nJy vs configured {sigma:.4g} nJy")
    # Sky is background-subtracted: the mean must be small against the r.m.s.
    if not abs(mean) <= 0.1 * max(std, 1e-30):
        problems.append(f"pixel mean {mean:.4g} nJy is not ~0 (std {std:.4g})")
    return AssetCheckResult(
        passed=not problems,
        metadata={
            "pixel_std_nJy": std,
            "pixel_mean_nJy": mean,
            "configured_sigma_nJy": float(sigma),
            **_failed(problems),
        },
    )


def check_shard(settings: GampenSettings, key: str) -> AssetCheckResult:
    """The body of ``simulated_galaxies_valid`` for partition ``key``, callable without Dagster."""
    from gampen_ml.sim.parameters import prior_range_report
    from gampen_ml.sim.shards import LABEL_SCHEMA, open_shard

    profile = settings.profile()
    images, labels = open_shard(settings.store().shard(key))
    problems: list[str] = []
    wrong = {
        c: str(labels.schema.get(c))
        for c, dtype in LABEL_SCHEMA.items()
        if labels.schema.get(c) != dtype
    }
    if wrong:
        problems.append(f"label columns with wrong/missing dtype: {wrong}")
    s = profile.imaging.stamp_size_px
    if images.dtype != np.float32 or images.shape != (labels.height, s, s):
        problems.append(
            f"images {images.dtype} {images.shape}, want ({labels.height}, {s}, {s}) float32"
        )
    # Chunked so a 10^4-galaxy shard is never copied into memory at once.
    n_bad_pixels = sum(
        int((~np.isfinite(images[i : i + 256])).sum()) for i in range(0, len(images), 256)
    )
    if n_bad_pixels:
        problems.append(f"{n_bad_pixels} NaN/inf image pixels")
    numeric = ["bt", "re_arcsec", "flux_nJy", "magnitude"]
    bad_labels = {
        c: int((~np.isfinite(labels[c].to_numpy())).sum()) for c in numeric if c in labels.columns
    }
    if any(bad_labels.values()):
        problems.append(f"NaN/inf/null truths: {bad_labels}")
    range_problems, range_rows = ([], [])
    if not wrong:
        range_problems, range_rows = prior_range_report(labels, profile.simulation.priors)
    problems += range_problems
    n = labels.height
    fractions = {}
    for split, want in zip(
        ("train", "val", "test"), profile.simulation.split_fractions, strict=True
    ):
        got = int((labels["split"] == split).sum()) if "split" in labels.columns else 0
        fractions[split] = got / n if n else math.nan
        allowed = SPLIT_ROUNDING_GALAXIES / max(n, 1) + 1e-12
        if not abs(fractions[split] - want) <= allowed:
            problems.append(
                f"{split} fraction {fractions[split]:.3f} vs {want:.3f} (+-{allowed:.3f})"
            )
    return AssetCheckResult(
        passed=not problems,
        metadata={
            "n_galaxies": float(n),
            **{f"fraction_{k}": float(v) for k, v in fractions.items()},
            "nonfinite_pixels": float(n_bad_pixels),
            "parameter_ranges": md_table(range_rows),
            **_failed(problems),
        },
    )


# ---------------------------------------------------------------- model


def check_model(settings: GampenSettings, key: str) -> AssetCheckResult:
    """The body of ``trained_model_valid`` for partition ``key``, callable without Dagster."""
    folder = settings.store().partition(TRAINED_MODEL, key)
    problems = [
        f"missing {name}"
        for name in (STATE_DICT_FILE, MODEL_JSON_FILE, SCALER_FILE, HISTORY_FILE)
        if not (folder / name).is_file()
    ]
    history = json.loads((folder / HISTORY_FILE).read_text()) if not problems else []
    train = np.array([h["train_loss"] for h in history], dtype=np.float64)
    val = np.array([h["val_loss"] for h in history], dtype=np.float64)
    if not history:
        problems.append("empty training history")
    elif not (np.isfinite(train).all() and np.isfinite(val).all()):
        problems.append("non-finite loss in history")
    elif len(train) >= 2 and not train[-1] < train[0]:
        problems.append(f"train loss did not fall: {train[0]:.4g} -> {train[-1]:.4g}")
    return AssetCheckResult(
        passed=not problems,
        metadata={
            "epochs": float(len(history)),
            "first_train_loss": float(train[0]) if len(train) else math.nan,
            "final_train_loss": float(train[-1]) if len(train) else math.nan,
            "final_val_loss": float(val[-1]) if len(val) else math.nan,
            **_failed(problems),
        },
    )


@asset_check(
    asset=calibrated_dropout_rate,
    blocking=True,
    description="Calibration files complete: chosen rate in the grid, coverages finite in [0, 1], "
    "recalibration factors positive",
)
def calibration_valid(settings: GampenSettings) -> AssetCheckResult:
    profile = settings.profile()
    store = settings.store()
    problems: list[str] = []
    try:
        calibration = store.read_calibration()
        table = store.read_coverage()
    except (FileNotFoundError, ValueError) as exc:
        return AssetCheckResult(passed=False, metadata=_failed([str(exc)]))
    if table is None:
        return AssetCheckResult(
            passed=False, metadata=_failed([f"missing {store.coverage_file()}"])
        )
    coverage = table["coverage"].to_numpy()
    if calibration.chosen_dropout_rate not in profile.calibration.dropout_rates:
        problems.append(f"chosen rate {calibration.chosen_dropout_rate} not in the grid")
    if not (np.all(np.isfinite(coverage)) and np.all((coverage >= 0) & (coverage <= 1))):
        problems.append("coverage values not finite in [0, 1]")
    if calibration.recalibrated:
        recal = calibration.recalibration
        scale = list(recal.scale) if recal is not None else []
        if len(scale) != 3 or not all(math.isfinite(k) and k > 0 for k in scale):
            problems.append(f"recalibration factors {scale} are not 3 positive numbers")
    return AssetCheckResult(passed=not problems, metadata=_failed(problems))


@asset_check(
    asset=calibrated_dropout_rate,
    # Not blocking: a model whose coverage is off still gives a catalog worth looking at;
    # the failed check (and the coverage table in the metadata) says how far off it is.
    blocking=False,
    description="Champion's validation coverage within calibration.coverage_tolerance",
)
def champion_coverage_within_tolerance(settings: GampenSettings) -> AssetCheckResult:
    profile = settings.profile()
    store = settings.store()
    calibration: Calibration = store.read_calibration()
    table = pl.read_parquet(store.coverage_file())
    rate, n = calibration.chosen_dropout_rate, calibration.n_val_galaxies
    final = table.filter(
        (pl.col("dropout_rate") == rate) & (pl.col("recalibrated") == calibration.recalibrated)
    )
    tolerance = profile.calibration.coverage_tolerance
    rows, problems = [], []
    for row in final.iter_rows(named=True):
        error = row["coverage"] - row["level"]
        lo, hi = coverage_bounds(row["level"], n, tolerance)
        rows.append({**row, "error": error, "accepted_lo": lo, "accepted_hi": hi})
        if not lo <= row["coverage"] <= hi:
            problems.append(
                f"{row['parameter']} @ {row['level']}: coverage {row['coverage']:.3f} "
                f"outside [{lo:.3f}, {hi:.3f}]"
            )
    if final.is_empty():
        problems.append(f"no coverage rows for the chosen rate {rate}")
    if rate not in profile.calibration.dropout_rates:
        problems.append(f"chosen rate {rate} is not in the profile's grid")
    return AssetCheckResult(
        passed=not problems,
        metadata={
            "chosen_dropout_rate": rate,
            "n_val_galaxies": float(n),
            "tolerance": float(tolerance),
            "max_abs_error": float(max((abs(r["error"]) for r in rows), default=math.nan)),
            "coverage": md_table(rows),
            **_failed(problems),
        },
    )


# ---------------------------------------------------------------- catalogs


def _expected_rows(settings: GampenSettings, key: str) -> int:
    """Galaxies that went into a dataset: the test split, or the batch's accepted cutouts."""
    store = settings.store()
    if key == SIM_TEST:
        return sum(
            int((pl.read_parquet(shard / LABELS_FILE, columns=["split"])["split"] == "test").sum())
            for shard in store.shards(settings.profile())
        )
    return int(json.loads(store.batch_manifest(key).read_text())["cutouts"])


def check_catalog(settings: GampenSettings, key: str) -> AssetCheckResult:
    """The body of ``posterior_catalog_valid`` for partition ``key``, callable without Dagster."""
    from gampen_ml.catalog import (
        CATALOG_SCHEMA,
        NULLABLE_COLUMNS,
        CatalogSchemaError,
        validate_catalog,
    )

    df = pl.read_parquet(settings.store().catalog_file(key))
    problems: list[str] = []
    try:
        validate_catalog(df, source=f"posterior_catalog[{key}]")
    except CatalogSchemaError as exc:
        problems.append(str(exc))
    numeric = [
        c
        for c, dtype in CATALOG_SCHEMA.items()
        if c in df.columns and dtype.is_float() and c not in NULLABLE_COLUMNS
    ]
    nonfinite = {c: int((~np.isfinite(df[c].to_numpy().astype(np.float64))).sum()) for c in numeric}
    nonfinite = {c: v for c, v in nonfinite.items() if v}
    if nonfinite:
        problems.append(f"NaN/inf in {nonfinite}")
    nested = 0
    if not problems:
        nested = non_nested_intervals(df)
        if nested:
            problems.append(
                f"{nested} HPD intervals are inverted or not nested (68 % inside 99.73 %)"
            )
    expected = _expected_rows(settings, key)
    if df.height != expected:
        problems.append(f"{df.height} catalog rows for {expected} input galaxies")
    if df.height and df["galaxy_id"].n_unique() != df.height:
        problems.append("duplicate galaxy_id")
    return AssetCheckResult(
        passed=not problems,
        metadata={
            "n_rows": float(df.height),
            "n_input_galaxies": float(expected),
            "non_nested_intervals": float(nested),
            **_failed(problems),
        },
    )


def check_flags(settings: GampenSettings, key: str) -> AssetCheckResult:
    """The body of ``flags_consistent_with_catalog`` for partition ``key``, callable without Dagster."""
    from gampen_ml.flags import FLAG_COLUMNS, OPTIONAL_FLAG_COLUMNS, catalog_flags

    store = settings.store()
    catalog = pl.read_parquet(store.catalog_file(key))
    flags = pl.read_parquet(store.flags_file(key))
    problems: list[str] = []
    if (
        flags.height != catalog.height
        or flags["galaxy_id"].to_list() != catalog["galaxy_id"].to_list()
    ):
        problems.append(
            f"{flags.height} flag rows vs {catalog.height} catalog rows (or ids differ)"
        )
    mismatches = {}
    if not problems:
        expected = catalog_flags(catalog, settings.profile(), store)
        columns = [*FLAG_COLUMNS, *(c for c in OPTIONAL_FLAG_COLUMNS if c in expected.columns)]
        mismatches = {
            c: int((flags[c] != expected[c]).sum()) for c in columns if c in flags.columns
        }
        missing = [c for c in columns if c not in flags.columns]
        if missing:
            problems.append(f"missing flag columns {missing}")
        if any(mismatches.values()):
            problems.append(f"flags differ from the catalog's: {mismatches}")
    return AssetCheckResult(
        passed=not problems,
        severity=AssetCheckSeverity.ERROR,
        metadata={"n_rows": float(flags.height), **_failed(problems)},
    )


def check_plots(settings: GampenSettings, key: str) -> AssetCheckResult:
    """The body of ``plots_written`` for partition ``key``, callable without Dagster."""
    folder = settings.store().plots(key)
    pngs = sorted(folder.glob("*.png"))
    bad = [p.name for p in pngs if p.read_bytes()[:8] != PNG_MAGIC]
    problems = []
    if not (folder / PLOTS_INDEX_FILE).is_file():
        problems.append("index.md missing")
    if not pngs:
        problems.append("no PNG figures")
    if bad:
        problems.append(f"not PNG: {bad}")
    return AssetCheckResult(
        passed=not problems,
        severity=AssetCheckSeverity.WARN,
        metadata={"n_figures": float(len(pngs)), **_failed(problems)},
    )


# ---------------------------------------------------------------- partitioned checks
# One check per partition of its asset, running the body above that takes the key.

simulated_galaxies_valid = partition_check(
    check_shard,
    name="simulated_galaxies_valid",
    asset=simulated_galaxies,
    blocking=True,
    description="Label schema and dtypes, finite images/labels, Table-1 ranges, split fractions",
)
trained_model_valid = partition_check(
    check_model,
    name="trained_model_valid",
    asset=trained_model,
    blocking=True,
    description="Model files present; training and validation loss finite and falling",
)
posterior_catalog_valid = partition_check(
    check_catalog,
    name="posterior_catalog_valid",
    asset=posterior_catalog,
    blocking=True,
    description="Catalog schema, finite values, nested HPD intervals, one row per input galaxy",
)
flags_consistent_with_catalog = partition_check(
    check_flags,
    name="flags_consistent_with_catalog",
    asset=qualitative_flags,
    description="One flag row per catalog galaxy; flags equal those recomputed from the catalog",
)
plots_written = partition_check(
    check_plots,
    name="plots_written",
    asset=diagnostic_plots,
    description="index.md present; every figure a non-empty PNG",
)


# ---------------------------------------------------------------- validation


@asset_check(
    asset=robustness_report,
    # Not blocking: nothing downstream; a missed target is the finding, shown with its size.
    blocking=False,
    description="Every shift-suite target met (coverage, binned coverage, median bias)",
)
def robustness_targets_met(settings: GampenSettings) -> AssetCheckResult:
    from gampen_ml.robustness import JSON_FILE

    report = json.loads((settings.store().robustness_report() / JSON_FILE).read_text())
    misses = report["misses"]
    return AssetCheckResult(
        passed=not misses,
        severity=AssetCheckSeverity.WARN,
        metadata={"n_targets_missed": float(len(misses)), **_failed(misses)},
    )


DATA_CHECKS = [psf_library_valid, noise_pool_valid, simulated_galaxies_valid]
MODEL_CHECKS = [trained_model_valid, calibration_valid, champion_coverage_within_tolerance]
CATALOG_CHECKS = [posterior_catalog_valid, flags_consistent_with_catalog, plots_written]
VALIDATION_CHECKS = [robustness_targets_met]
ALL_CHECKS = [*DATA_CHECKS, *MODEL_CHECKS, *CATALOG_CHECKS, *VALIDATION_CHECKS]
