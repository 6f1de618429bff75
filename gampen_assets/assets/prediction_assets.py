"""Predictions: posterior catalogs, qualitative flags and diagnostic plots per dataset.

A dataset is a ``datasets`` dynamic partition: ``sim-test`` (the test split of every
simulation shard, with truths) or one batch of real cutouts that the inbox sensor stored
at ``<root>/inbox_batches/<batch>/``. A batch that declares a survey domain
(``batch.toml``, :mod:`gampen_ml.inbox`) is read as that survey delivers it and
catalogued by the domain's fine-tuned model (``finetuned_model/<domain>/``) when there
is one, else by the champion; the metadata says which.
"""

import dataclasses
import os

import polars as pl
from dagster import (
    AllPartitionMapping,
    AssetDep,
    AssetExecutionContext,
    Config,
    Failure,
    MaterializeResult,
    MetadataValue,
    TableColumn,
    TableColumnConstraints,
    TableSchema,
)

from gampen_assets.assets._common import AssetRun, fail_fast_on_bad_input, gampen_asset
from gampen_assets.assets._metadata import coverage_metadata, folder_version, md_table
from gampen_assets.assets.model_assets import GPU_K8S_TAGS
from gampen_assets.partitions import SIM_TEST, datasets
from gampen_assets.resources import GampenSettings
from gampen_ml import plots, stages
from gampen_ml.columns import ColumnInfo
from gampen_ml.config import PARAMETERS, dropout_key, shard_keys
from gampen_ml.export import ExportError, ExportFormat, write_exports
from gampen_ml.flags import catalog_flags
from gampen_ml.prediction import PredictionModel, finetuned_model, resolve_prediction_model
from gampen_ml.settings import Settings
from gampen_ml.store import (
    CALIBRATED_DROPOUT_RATE,
    DIAGNOSTIC_PLOTS,
    FINETUNED_MODEL,
    FLAGS_FILE,
    NOISE_POOL,
    PLOTS_INDEX_FILE,
    POSTERIOR_CATALOG,
    PSF_LIBRARY,
    QUALITATIVE_FLAGS,
    ROBUSTNESS_REPORT,
    SIMULATED_GALAXIES,
    TRAINED_MODEL,
    Store,
)

GROUP = "catalog"
#: Figures embedded in the diagnostic_plots metadata (all of them are on disk).
EMBEDDED_FIGURES = (
    "coverage_vs_dropout",
    "stn_examples",
    "predicted_vs_true",
    "residual_histograms",
    "uncertainty_vs_parameters",
    "confusion_matrix",
    "parameter_distributions",
    "posterior_width_distributions",
    "flag_fractions",
)


def _ingest_claimed_batch(
    context: AssetExecutionContext, profile, resolved: Settings, key: str
) -> dict:
    """Ingest the inbox batch claimed as ``key``, if it is waiting (:mod:`gampen_ml.inbox`).

    Returns the materialization metadata of the ingestion (empty when there was none).
    """
    from gampen_ml.inbox import PROCESSING, ingest_claimed
    from gampen_ml.sim.errors import InputFileError

    store, quarantine = resolved.store(), resolved.quarantine
    claimed = resolved.inbox / PROCESSING / key
    if key == SIM_TEST or not claimed.is_dir():
        return {}
    result = ingest_claimed(claimed, key, profile, store, quarantine, domains=resolved.domains)
    if result.problem is not None:
        raise InputFileError(
            quarantine / key,
            f"inbox batch {key!r} quarantined whole ({result.n_files_quarantined} files, "
            f"each with a .reason.txt): {result.problem}",
        )
    context.log.info(
        f"ingested inbox batch {key!r}: {result.n_files_in} files in, "
        f"{result.n_files_accepted} stored ({result.n_cutouts} cutouts), "
        f"{result.n_files_quarantined} quarantined in {quarantine / key}"
    )
    if result.left_behind:
        context.log.warning(
            f"could not remove from {claimed} (left there, never ingested twice): "
            + ", ".join(result.left_behind[:20])
        )
    if not store.inbox_batch(key).is_dir():
        raise InputFileError(
            quarantine / key,
            f"none of the {result.n_files_in} files of inbox batch {key!r} is a usable "
            "cutout; each is quarantined here with a .reason.txt",
        )
    return {
        "inbox_files_in": result.n_files_in,
        "inbox_files_stored": result.n_files_accepted,
        "inbox_files_quarantined": result.n_files_quarantined,
        "quarantine": MetadataValue.path(str(quarantine / key)),
    }


def _catalog_model(profile, store: Store, catalog: pl.DataFrame) -> PredictionModel | None:
    """The fine-tuned model that made ``catalog`` (its flags compare against that model's
    training domain), or None: the champion's, the storage root's simulations."""
    domains = catalog["domain"].drop_nulls().unique().to_list() if catalog.height else []
    if len(domains) != 1:
        return None
    tuned = finetuned_model(profile, store, domains[0])
    if tuned is None or tuned.model_name not in set(catalog["model_name"].unique()):
        return None
    return tuned


def _column_schema(
    table: pl.DataFrame, info: dict[str, ColumnInfo], nullable: frozenset[str]
) -> TableSchema:
    """``dagster/column_schema`` of a stored table: its columns, types and descriptions."""
    return TableSchema(
        columns=[
            TableColumn(
                name,
                str(dtype),
                description=info[name].described(),
                constraints=TableColumnConstraints(nullable=name in nullable),
            )
            for name, dtype in table.schema.items()
        ]
    )


class CatalogExportConfig(Config):
    """Run configuration of ``posterior_catalog``: standard-format copies to write.

    Each format lands in the partition folder as ``catalog.fits``, ``catalog.vot`` or
    ``catalog.ecsv`` (``gampen_ml.export``) and is linked from the materialization.
    """

    formats: list[ExportFormat] = []


@gampen_asset(
    GROUP,
    code_version="1",
    kinds={"pytorch", "parquet"},
    partitions_def=datasets,
    deps=[
        CALIBRATED_DROPOUT_RATE,
        AssetDep(TRAINED_MODEL, partition_mapping=AllPartitionMapping()),
        AssetDep(SIMULATED_GALAXIES, partition_mapping=AllPartitionMapping()),
    ],
    pool="gpu",
    op_tags=GPU_K8S_TAGS,
    description=(
        "Bayesian posteriors of B/T, Re (arcsec) and flux (nJy) per galaxy from T MC-dropout "
        "passes of the champion model, or for a batch whose batch.toml names a survey domain "
        "its fine-tuned model when there is one (recalibrated when calibration fit one): "
        "mode, mean, median, std and HPD bounds at 68.27/95.45/99.73 %. catalog.parquet, "
        "schema in docs/catalog.md; queryable as the DuckDB view posterior_catalog. Run "
        "config formats (fits, votable, ecsv) adds catalog.fits/.vot/.ecsv with units, UCDs "
        "and provenance."
    ),
)
def posterior_catalog(
    context: AssetExecutionContext, config: CatalogExportConfig, settings: GampenSettings
) -> MaterializeResult:
    from gampen_ml.calibrate import coverage_table
    from gampen_ml.catalog import CATALOG_COLUMN_INFO, NULLABLE_COLUMNS
    from gampen_ml.inbox import stored_batch_domain

    run = AssetRun.start(context, settings)
    profile, resolved, store = settings.profile(), settings.settings(), run.store
    key = context.partition_key
    device = settings.torch_device()
    n_chunk = profile.inference.galaxies_per_batch

    def progress(done: int, total: int) -> None:
        step = max(1, total // 10)
        if done == total or done // step != (done - n_chunk) // step:
            context.log.info(f"{done}/{total} galaxies")

    with fail_fast_on_bad_input():
        ingested = _ingest_claimed_batch(context, profile, resolved, key)
        domain = None if key == SIM_TEST else stored_batch_domain(store, key, resolved.domains)
        model = resolve_prediction_model(
            profile, store, domain=domain and domain.name, log=context.log.info
        )
        catalog = stages.catalog_and_publish(
            profile, store, key, device=device, progress=progress, log=context.log.info,
            model=model, domain=domain,
        )  # fmt: skip
    rate = model.dropout_rate
    model_dir = model.model_dir
    passes = profile.inference.n_passes
    out = store.catalog(key)
    version = folder_version(out)
    if model.finetuned_for is not None:
        source = f"finetuned_model[{model.finetuned_for}]"
    elif domain is not None:
        source = f"champion (domain {domain.name} has no fine-tuned model)"
    else:
        source = "champion"
    metadata: dict = {
        "dagster/row_count": catalog.height,
        "n_galaxies": float(catalog.height),
        "n_passes": float(passes),
        "dropout_rate": float(rate),
        "model_name": model.model_name,
        "model_version": str(model.model_version),
        "model_source": source,
        "domain": domain.name if domain is not None else "none",
        "recalibrated": model.calibrated,
        "path": MetadataValue.path(str(store.catalog_file(key))),
        "dagster/column_schema": _column_schema(catalog, CATALOG_COLUMN_INFO, NULLABLE_COLUMNS),
        **ingested,
    }
    try:  # after the data version: exports do not change it (gampen_ml.export)
        exports = write_exports(
            catalog, out, config.formats, data_version=version, run_id=context.run_id
        )
    except ExportError as exc:
        raise Failure(
            description=f"catalog published at {out}, but not exported: {exc}",
            allow_retries=False,
        ) from exc
    for fmt, path in exports.items():
        metadata[f"export_{fmt.value}"] = MetadataValue.path(str(path))
    for p in PARAMETERS:
        width = catalog[f"{p}_hpd68_hi"] - catalog[f"{p}_hpd68_lo"]
        metadata[f"{p}_mode_median"] = float(catalog[f"{p}_mode"].median())
        metadata[f"{p}_hpd68_width_median"] = float(width.median())
    if key == SIM_TEST:
        test_coverage = coverage_table(catalog, None, profile.calibration.levels, rate, "test")
        metadata["test_coverage"] = md_table(test_coverage.to_dicts())
        metadata |= coverage_metadata("test_coverage", test_coverage.iter_rows(named=True))
        metadata["bt_mode_mae"] = float((catalog["bt_mode"] - catalog["bt_true"]).abs().mean())
    if model.finetuned_for is not None:
        upstream = [run.upstream(FINETUNED_MODEL, model.finetuned_for)]
    else:
        upstream = [
            run.upstream(CALIBRATED_DROPOUT_RATE),
            run.upstream(TRAINED_MODEL, dropout_key(rate)),
        ]
    if key == SIM_TEST:
        upstream += [run.upstream(SIMULATED_GALAXIES, s) for s in shard_keys(profile)]
        inputs = store.shards(profile)
    else:
        inputs = [store.inbox_batch(key)]
    return run.result(
        POSTERIOR_CATALOG,
        version,
        metadata,
        partition=key,
        upstream=upstream,
        input_paths=[*inputs, model_dir],
        row_count=catalog.height,
        model_version=str(model.model_version),
    )


@gampen_asset(
    GROUP,
    code_version="2",
    kinds={"polars", "parquet"},
    partitions_def=datasets,
    deps=[POSTERIOR_CATALOG, PSF_LIBRARY],
    pool="duckdb",
    description=(
        "Qualitative flags per galaxy (paper §6.4, §7): bulge-dominated (B/T >= 0.85), "
        'disk-dominated (B/T <= 0.1), small (Re < 1"); beyond the training set: '
        "out_of_domain with ood_reason (not detected, flux or sky noise unlike the training "
        "images, prediction outside the prior), asymmetric (image not point-symmetric), "
        "psf_outside_library (cutout PSF FWHM outside the training PSF library's range), and "
        "unreliable = any of the three; thresholds from profile.flags. flags.parquet; DuckDB "
        "view flags."
    ),
)
def qualitative_flags(
    context: AssetExecutionContext, settings: GampenSettings
) -> MaterializeResult:
    from gampen_ml.catalog import read_catalog
    from gampen_ml.flags import FLAG_COLUMNS, FLAGS_COLUMN_INFO, OPTIONAL_FLAG_COLUMNS

    run = AssetRun.start(context, settings)
    profile, store = settings.profile(), run.store
    key = context.partition_key
    catalog = read_catalog(store.catalog(key))
    out = store.flags(key)
    with fail_fast_on_bad_input(), store.publish(out) as tmp:
        flags = catalog_flags(catalog, profile, store, _catalog_model(profile, store, catalog))
        flags.write_parquet(tmp / FLAGS_FILE)
    version = folder_version(out)
    counts = {c: int(flags[c].sum()) for c in (*FLAG_COLUMNS, *OPTIONAL_FLAG_COLUMNS) if c in flags}
    context.log.info(f"{key}: {counts} of {flags.height} galaxies")
    metadata = {
        "dagster/row_count": flags.height,
        "n_galaxies": float(flags.height),
        **{f"n_{c}": float(v) for c, v in counts.items()},
        **{f"fraction_{c}": float(v / max(flags.height, 1)) for c, v in counts.items()},
        "thresholds": MetadataValue.json(dataclasses.asdict(profile.flags)),
        "path": MetadataValue.path(str(store.flags_file(key))),
        # ood_reason is null for a galaxy inside the training domain.
        "dagster/column_schema": _column_schema(
            flags, FLAGS_COLUMN_INFO, frozenset({"ood_reason"})
        ),
    }
    return run.result(
        QUALITATIVE_FLAGS,
        version,
        metadata,
        partition=key,
        upstream=[run.upstream(POSTERIOR_CATALOG, key), run.upstream(PSF_LIBRARY)],
        input_paths=[store.catalog_file(key)],
        row_count=flags.height,
    )


@gampen_asset(
    GROUP,
    code_version="1",
    kinds={"matplotlib"},
    partitions_def=datasets,
    deps=[POSTERIOR_CATALOG, QUALITATIVE_FLAGS, CALIBRATED_DROPOUT_RATE],
    pool="duckdb",
    description=(
        "The paper's diagnostic figures that apply to the dataset (coverage vs dropout, "
        "predicted vs true, residuals, uncertainties, flag regions, confusion matrix; "
        "distributions for real data) plus each dropout model's loss curve: PNG files and "
        "index.md, key figures shown here."
    ),
)
def diagnostic_plots(context: AssetExecutionContext, settings: GampenSettings) -> MaterializeResult:
    run = AssetRun.start(context, settings)
    profile, store = settings.profile(), run.store
    key = context.partition_key
    out = store.plots(key)
    with fail_fast_on_bad_input():
        paths = stages.diagnostics_and_publish(profile, store, key, device=settings.torch_device())
    figures = {name: out / p.name for name, p in paths.items() if p.suffix == ".png"}
    context.log.info(f"{key}: wrote {len(figures)} figures to {out}")
    metadata: dict = {
        "n_figures": float(len(figures)),
        "figures": MetadataValue.md("\n".join(f"- `{p.name}`" for p in figures.values())),
        "index": MetadataValue.path(str(out / PLOTS_INDEX_FILE)),
    }
    shown = [n for n in EMBEDDED_FIGURES if n in figures]
    shown += sorted(n for n in figures if n.startswith("loss_curve_"))
    for name in shown:
        metadata[name] = MetadataValue.md(plots.png_markdown(figures[name], max_px=900, title=name))
    report = paths.get("validation")
    if report is not None and report.is_file():
        metadata["validation_report"] = MetadataValue.md(report.read_text())
    return run.result(
        DIAGNOSTIC_PLOTS,
        folder_version(out),
        metadata,
        partition=key,
        upstream=[
            run.upstream(POSTERIOR_CATALOG, key),
            run.upstream(QUALITATIVE_FLAGS, key),
            run.upstream(CALIBRATED_DROPOUT_RATE),
        ],
        input_paths=[store.catalog_file(key), store.flags_file(key)],
        row_count=len(figures),
    )


__all__ = ["diagnostic_plots", "posterior_catalog", "qualitative_flags"]


class RobustnessConfig(Config):
    """Run configuration of ``robustness_report`` (set it in the UI's launchpad)."""

    n_per_variation: int = 1000
    #: None: the frozen test seed of the profile (``gampen_ml.robustness.frozen_seed``).
    seed: int | None = None


@gampen_asset(
    "validation",
    code_version="1",
    kinds={"pytorch", "galsim"},
    deps=[CALIBRATED_DROPOUT_RATE, PSF_LIBRARY, NOISE_POOL],
    pool="gpu",
    description=(
        "Calibration under survey shifts: Table-1 galaxies rendered by independent GalSim code "
        "(bulge tied to the disk, Moffat/Kolmogorov PSFs, sky noise +-25 %, sub-pixel offsets, "
        "log-uniform sizes and fluxes) through the champion and its calibration; coverage, "
        "median bias and width per variation, 68 % coverage per bin of size, magnitude and "
        "component, against the targets. robustness.md/.json and a figure. Not part of "
        "`make pipeline` (about 10 min on 2 cores); materialize it from the UI."
    ),
)
def robustness_report(
    context: AssetExecutionContext, config: RobustnessConfig, settings: GampenSettings
) -> MaterializeResult:
    from gampen_ml import robustness

    run = AssetRun.start(context, settings)
    profile, store = settings.profile(), run.store
    out = store.robustness_report()
    with fail_fast_on_bad_input():
        model = stages.champion_model(profile, store)
        with store.publish(out) as tmp:
            table, _, misses = stages.shift_suite(
                profile, store, model, tmp, n_per_variation=config.n_per_variation,
                seed=config.seed, device=settings.torch_device(),
                n_workers=os.cpu_count() or 1, log=context.log.info,
            )  # fmt: skip
    seed = robustness.frozen_seed(profile) if config.seed is None else config.seed
    version = folder_version(out)
    metadata = {
        "n_per_variation": float(config.n_per_variation),
        "seed": float(seed),
        "model_version": model.model_version,
        "n_targets_missed": float(len(misses)),
        "targets_missed": MetadataValue.md("\n".join(f"- {m}" for m in misses) or "none"),
        "table": md_table(table.to_dicts()),
        "coverage_per_variation": MetadataValue.md(
            plots.png_markdown(out / robustness.FIGURE_FILE, title="coverage per variation")
        ),
        "path": MetadataValue.path(str(out / robustness.MD_FILE)),
    }
    return run.result(
        ROBUSTNESS_REPORT,
        version,
        metadata,
        upstream=[
            run.upstream(CALIBRATED_DROPOUT_RATE),
            run.upstream(PSF_LIBRARY),
            run.upstream(NOISE_POOL),
        ],
        input_paths=[model.model_dir],
        row_count=table.height,
        model_version=model.model_version,
    )
