"""Predictions: posterior catalogs, qualitative flags and diagnostic plots per dataset.

A dataset is a ``datasets`` dynamic partition: ``sim-test`` (the test split of every
simulation shard, with truths) or one batch of real cutouts that the inbox sensor stored
at ``<root>/inbox_batches/<batch>/``.
"""

import json
from datetime import UTC, datetime

import polars as pl
from dagster import (
    AllPartitionMapping,
    AssetDep,
    AssetExecutionContext,
    DataVersion,
    MaterializeResult,
    MetadataValue,
    asset,
)

from gampen_assets import lineage
from gampen_assets.assets._common import (
    OWNERS,
    TRANSIENT_RETRY,
    fail_fast_on_bad_input,
    folder_version,
    md_table,
    upstream_version,
)
from gampen_assets.assets._common import (
    level_suffix as _level,
)
from gampen_assets.assets._stages import dataset_inputs
from gampen_assets.assets.model_assets import GPU_K8S_TAGS
from gampen_assets.partitions import SIM_TEST, datasets
from gampen_assets.resources import GampenSettings
from gampen_ml import plots
from gampen_ml.config import PARAMETERS, derive_seed, dropout_key, shard_keys
from gampen_ml.io import atomic_partition_dir, partition_dir

GROUP = "catalog"
#: Figures embedded in the diagnostic_plots metadata (all of them are on disk).
EMBEDDED_FIGURES = (
    "coverage_vs_dropout",
    "predicted_vs_true",
    "residual_histograms",
    "uncertainty_vs_parameters",
    "confusion_matrix",
    "parameter_distributions",
    "posterior_width_distributions",
    "flag_fractions",
)


def _read_calibration(root) -> dict:
    folder = partition_dir(root, "calibrated_dropout_rate")
    path = folder / "calibration.json"
    if not path.is_file():
        from gampen_ml.config import ConfigError

        raise ConfigError(f"{path} is missing: materialize calibrated_dropout_rate first")
    calibration = json.loads(path.read_text())
    recal = folder / "recalibration.json"
    calibration["recalibration"] = json.loads(recal.read_text()) if recal.is_file() else None
    return calibration


@asset(
    group_name=GROUP,
    owners=OWNERS,
    code_version="1",
    kinds={"pytorch", "parquet"},
    partitions_def=datasets,
    deps=[
        "calibrated_dropout_rate",
        AssetDep("trained_model", partition_mapping=AllPartitionMapping()),
        AssetDep("simulated_galaxies", partition_mapping=AllPartitionMapping()),
    ],
    pool="gpu",
    op_tags=GPU_K8S_TAGS,
    retry_policy=TRANSIENT_RETRY,
    description=(
        "Bayesian posteriors of B/T, Re (arcsec) and flux (nJy) per galaxy from T MC-dropout "
        "passes of the champion model (recalibrated when calibration fit a spread factor): "
        "mode, mean, median, std and HPD bounds at 68.27/95.45/99.73 %. catalog.parquet, "
        "schema in docs/catalog.md; queryable as the DuckDB view posterior_catalog."
    ),
)
def posterior_catalog(
    context: AssetExecutionContext, settings: GampenSettings
) -> MaterializeResult:
    from gampen_ml.calibrate import Recalibration, coverage_table
    from gampen_ml.catalog import catalog_from_images, write_catalog
    from gampen_ml.train import load_trained_model

    started_at = datetime.now(UTC)
    profile = settings.profile()
    root = settings.root()
    key = context.partition_key
    shard_dirs = [partition_dir(root, "simulated_galaxies", s) for s in shard_keys(profile)]
    device = settings.torch_device()
    with fail_fast_on_bad_input():
        calibration = _read_calibration(root)
        rate = float(calibration["chosen_dropout_rate"])
        model_dir = partition_dir(root, "trained_model", dropout_key(rate))
        model, scaler, _ = load_trained_model(model_dir, device)
        recal = calibration["recalibration"]
        recalibration = Recalibration.from_dict(recal) if recal else None
        images, meta, truths = dataset_inputs(profile, root, shard_dirs, key, SIM_TEST)
    n = len(images)
    passes = profile.inference.n_passes
    context.log.info(
        f"{key}: {n} galaxies x {passes} MC passes with dropout {rate:g} "
        f"({calibration['model_name']} v{calibration['model_version']}, device {device})"
    )
    step = max(1, n // 10)

    def progress(done: int, total: int) -> None:
        if done == total or done // step != (done - profile.inference.galaxies_per_batch) // step:
            context.log.info(f"{done}/{total} galaxies")

    out = partition_dir(root, "posterior_catalog", key)
    with atomic_partition_dir(out) as tmp:
        catalog = catalog_from_images(
            model,
            scaler,
            images,
            meta,
            n_passes=passes,
            seed=derive_seed(profile.seed, "posterior_catalog", key),
            recalibration=recalibration,
            store_samples=profile.inference.store_samples,
            out_dir=tmp,
            progress=progress,
            truths=truths,
            dataset=key,
            model_name=calibration["model_name"],
            model_version=str(calibration["model_version"]),
            dropout_rate=rate,
            galaxies_per_batch=profile.inference.galaxies_per_batch,
            device=device,
        )
        write_catalog(tmp, catalog)
    version = folder_version(out)
    metadata: dict = {
        "dagster/row_count": catalog.height,
        "n_galaxies": float(catalog.height),
        "n_passes": float(passes),
        "dropout_rate": float(rate),
        "model_version": str(calibration["model_version"]),
        "recalibrated": recalibration is not None,
        "path": MetadataValue.path(str(out / "catalog.parquet")),
    }
    for p in PARAMETERS:
        width = catalog[f"{p}_hpd68_hi"] - catalog[f"{p}_hpd68_lo"]
        metadata[f"{p}_mode_median"] = float(catalog[f"{p}_mode"].median())
        metadata[f"{p}_hpd68_width_median"] = float(width.median())
    if truths is not None:
        test_coverage = coverage_table(catalog, None, profile.calibration.levels, rate, "test")
        metadata["test_coverage"] = md_table(test_coverage.to_dicts())
        for row in test_coverage.iter_rows(named=True):
            metadata[f"test_coverage_{row['parameter']}_{_level(row['level'])}"] = float(
                row["coverage"]
            )
        metadata["bt_mode_mae"] = float((catalog["bt_mode"] - catalog["bt_true"]).abs().mean())
    upstream = [
        upstream_version(context, root, "calibrated_dropout_rate"),
        upstream_version(context, root, "trained_model", dropout_key(rate)),
    ]
    if key == SIM_TEST:
        upstream += [
            upstream_version(context, root, "simulated_galaxies", s) for s in shard_keys(profile)
        ]
        inputs = shard_dirs
    else:
        inputs = [root / "inbox_batches" / key]
    lineage.record_materialization(
        context,
        asset="posterior_catalog",
        partition=key,
        data_version=version,
        upstream=upstream,
        input_paths=[*inputs, model_dir],
        row_count=catalog.height,
        started_at=started_at,
        model_version=str(calibration["model_version"]),
    )
    return MaterializeResult(metadata=metadata, data_version=DataVersion(version))


@asset(
    group_name=GROUP,
    owners=OWNERS,
    code_version="1",
    kinds={"polars", "parquet"},
    partitions_def=datasets,
    deps=["posterior_catalog"],
    pool="duckdb",
    retry_policy=TRANSIENT_RETRY,
    description=(
        "Qualitative flags per galaxy (paper §6.4, §7): bulge-dominated (B/T >= 0.85), "
        'disk-dominated (B/T <= 0.1), small (Re < 1"), and unreliable (68 % HPD too wide); '
        "thresholds from profile.flags. flags.parquet; DuckDB view flags."
    ),
)
def qualitative_flags(
    context: AssetExecutionContext, settings: GampenSettings
) -> MaterializeResult:
    from gampen_ml.catalog import read_catalog
    from gampen_ml.flags import FLAG_COLUMNS, compute_flags

    started_at = datetime.now(UTC)
    profile = settings.profile()
    root = settings.root()
    key = context.partition_key
    catalog_dir = partition_dir(root, "posterior_catalog", key)
    catalog = read_catalog(catalog_dir)
    out = partition_dir(root, "qualitative_flags", key)
    with fail_fast_on_bad_input(), atomic_partition_dir(out) as tmp:
        flags = compute_flags(catalog, profile.flags)
        flags.write_parquet(tmp / "flags.parquet")
    version = folder_version(out)
    counts = {c: int(flags[c].sum()) for c in FLAG_COLUMNS}
    context.log.info(f"{key}: {counts} of {flags.height} galaxies")
    metadata = {
        "dagster/row_count": flags.height,
        "n_galaxies": float(flags.height),
        **{f"n_{c}": float(v) for c, v in counts.items()},
        **{f"fraction_{c}": float(v / max(flags.height, 1)) for c, v in counts.items()},
        "thresholds": MetadataValue.json({k: float(v) for k, v in profile.flags.__dict__.items()}),
        "path": MetadataValue.path(str(out / "flags.parquet")),
    }
    lineage.record_materialization(
        context,
        asset="qualitative_flags",
        partition=key,
        data_version=version,
        upstream=[upstream_version(context, root, "posterior_catalog", key)],
        input_paths=[catalog_dir / "catalog.parquet"],
        row_count=flags.height,
        started_at=started_at,
    )
    return MaterializeResult(metadata=metadata, data_version=DataVersion(version))


@asset(
    group_name=GROUP,
    owners=OWNERS,
    code_version="1",
    kinds={"matplotlib"},
    partitions_def=datasets,
    deps=["posterior_catalog", "qualitative_flags", "calibrated_dropout_rate"],
    pool="duckdb",
    retry_policy=TRANSIENT_RETRY,
    description=(
        "The paper's diagnostic figures that apply to the dataset (coverage vs dropout, "
        "predicted vs true, residuals, uncertainties, flag regions, confusion matrix; "
        "distributions for real data) plus each dropout model's loss curve: PNG files and "
        "index.md, key figures shown here."
    ),
)
def diagnostic_plots(context: AssetExecutionContext, settings: GampenSettings) -> MaterializeResult:
    from gampen_ml.catalog import SAMPLES_FILE, read_catalog
    from gampen_ml.infer import predict_physical
    from gampen_ml.io import load_npy_mmap
    from gampen_ml.train import load_trained_model

    started_at = datetime.now(UTC)
    profile = settings.profile()
    root = settings.root()
    key = context.partition_key
    catalog_dir = partition_dir(root, "posterior_catalog", key)
    flags_dir = partition_dir(root, "qualitative_flags", key)
    calib_dir = partition_dir(root, "calibrated_dropout_rate")
    catalog = read_catalog(catalog_dir)
    flags = pl.read_parquet(flags_dir / "flags.parquet")
    coverage = pl.read_parquet(calib_dir / "coverage.parquet").filter(~pl.col("recalibrated"))
    calibration = _read_calibration(root)
    rate = float(calibration["chosen_dropout_rate"])
    samples = None
    if (catalog_dir / SAMPLES_FILE).is_file():
        _, scaler, _ = load_trained_model(partition_dir(root, "trained_model", dropout_key(rate)))
        samples = predict_physical(load_npy_mmap(catalog_dir / SAMPLES_FILE), scaler)
    out = partition_dir(root, "diagnostic_plots", key)
    with atomic_partition_dir(out) as tmp:
        paths = plots.make_catalog_figures(
            catalog,
            tmp,
            flags=flags,
            coverage_table=coverage,
            samples=samples,
            chosen_dropout=rate,
            flag_config=profile.flags,
        )
        for r in profile.calibration.dropout_rates:
            history_file = partition_dir(root, "trained_model", dropout_key(r)) / "history.json"
            if history_file.is_file():
                name = f"loss_curve_{dropout_key(r)}"
                fig = plots.loss_curve(json.loads(history_file.read_text()))
                paths[name] = plots.save_figure(fig, tmp / f"{name}.png")
    figures = {name: out / p.name for name, p in paths.items() if p.suffix == ".png"}
    context.log.info(f"{key}: wrote {len(figures)} figures to {out}")
    metadata: dict = {
        "n_figures": float(len(figures)),
        "figures": MetadataValue.md("\n".join(f"- `{p.name}`" for p in figures.values())),
        "index": MetadataValue.path(str(out / "index.md")),
    }
    shown = [n for n in EMBEDDED_FIGURES if n in figures]
    shown += sorted(n for n in figures if n.startswith("loss_curve_"))
    for name in shown:
        metadata[name] = MetadataValue.md(plots.png_markdown(figures[name], max_px=900, title=name))
    lineage.record_materialization(
        context,
        asset="diagnostic_plots",
        partition=key,
        data_version=folder_version(out),
        upstream=[
            upstream_version(context, root, "posterior_catalog", key),
            upstream_version(context, root, "qualitative_flags", key),
            upstream_version(context, root, "calibrated_dropout_rate"),
        ],
        input_paths=[catalog_dir / "catalog.parquet", flags_dir / "flags.parquet"],
        row_count=len(figures),
        started_at=started_at,
    )
    return MaterializeResult(metadata=metadata, data_version=DataVersion(folder_version(out)))


__all__ = ["diagnostic_plots", "posterior_catalog", "qualitative_flags"]
