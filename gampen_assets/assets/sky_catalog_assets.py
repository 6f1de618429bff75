"""The survey's sky catalog: every posterior catalog with positions, as one HATS catalog.

``sky_catalog`` follows ``posterior_catalog`` (all ``datasets`` partitions): whenever a
partition is materialized, :data:`sky_catalog_automation_sensor` (running by default, like
the inbox sensor) requests one run that publishes the new or changed partitions
incrementally (``gampen_ml.sky_catalog.publish_sky_catalog``). Open the result with
``lsdb.open_catalog("<root>/sky_catalog/all")``.
"""

from dagster import (
    AllPartitionMapping,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetDep,
    AssetExecutionContext,
    AssetSelection,
    AutomationCondition,
    AutomationConditionSensorDefinition,
    DefaultSensorStatus,
    Failure,
    MaterializeResult,
    MetadataValue,
    asset_check,
)

from gampen_assets.assets._common import AssetRun, gampen_asset
from gampen_assets.assets._metadata import md_table
from gampen_assets.resources import GampenSettings
from gampen_ml.sky_catalog import (
    SKY_CATALOG_ASSET,
    SOURCE_ASSET,
    SkyCatalogError,
    publish_sky_catalog,
    verify_sky_catalog,
)

GROUP = "catalog"

#: Eager, except that a ``datasets`` partition never materialized (a batch whose catalog run
#: failed) does not hold the sky catalog back: it publishes what exists.
SKY_CATALOG_CONDITION = (
    AutomationCondition.eager()
    .without(~AutomationCondition.any_deps_missing())
    .with_label("eager_allow_missing")
)


@gampen_asset(
    GROUP,
    name=SKY_CATALOG_ASSET,
    code_version="1",
    kinds={"parquet"},
    deps=[AssetDep(SOURCE_ASSET, partition_mapping=AllPartitionMapping())],
    automation_condition=SKY_CATALOG_CONDITION,
    description=(
        "Every posterior-catalog row with a sky position (ra_deg/dec_deg from the cutouts' "
        "WCS) as one HATS catalog partitioned by HEALPix, with a 10 arcsec margin cache: "
        "lsdb.open_catalog('<root>/sky_catalog/all') cone-searches and cross-matches it. "
        "Updated incrementally: only the pixels a new or changed batch touches are rewritten. "
        "Rows without a position (sim-test) are left out and counted."
    ),
)
def sky_catalog(context: AssetExecutionContext, settings: GampenSettings) -> MaterializeResult:
    run = AssetRun.start(context, settings)
    store = run.store
    root = store.root
    try:
        update = publish_sky_catalog(root, log=context.log.info)
    except SkyCatalogError as exc:  # a bad row does not heal on a retry
        raise Failure(description=str(exc), allow_retries=False) from exc
    context.log.info(
        f"sky catalog {update.version}: {update.total_rows} rows in {update.n_pixels} pixels; "
        f"added {update.added}, replaced {update.replaced}, removed {update.removed} "
        f"in {update.seconds:.1f} s"
    )
    without = update.rows_without_position
    metadata = {
        "dagster/row_count": update.total_rows,
        "n_rows": float(update.total_rows),
        "n_pixels": float(update.n_pixels),
        "healpix_orders": MetadataValue.json(update.orders),
        "margin_rows": float(update.margin_rows),
        "n_rows_without_position": float(sum(without.values())),
        "rows_without_position": md_table(
            [{"dataset": k, "rows left out (no ra/dec)": v} for k, v in without.items()]
        ),
        "datasets_added": MetadataValue.json(update.added),
        "datasets_replaced": MetadataValue.json(update.replaced),
        "datasets_removed": MetadataValue.json(update.removed),
        "rows_imported": float(update.rows_imported),
        "pixels_rewritten": float(update.pixels_rewritten),
        "pixels_linked": float(update.pixels_linked),
        "seconds": float(update.seconds),
        "path": MetadataValue.path(str(update.path or store.sky_catalog())),
    }
    # An incremental build reads its previous version and the partitions it (re)publishes
    # (nothing when nothing changed: the version is the previous one).
    read = [*update.added, *update.replaced]
    upstream = [run.upstream(SOURCE_ASSET, key) for key in read]
    if update.changed and update.previous_version is not None:
        upstream.insert(0, (SKY_CATALOG_ASSET, None, update.previous_version))
    return run.result(
        SKY_CATALOG_ASSET,
        update.version,
        metadata,
        upstream=upstream,
        input_paths=[store.catalog_file(key) for key in read],
        row_count=update.total_rows,
    )


def check_sky_catalog(settings: GampenSettings) -> AssetCheckResult:
    """The body of ``sky_catalog_valid``, callable without Dagster."""
    problems = verify_sky_catalog(settings.root())
    return AssetCheckResult(
        passed=not problems,
        severity=AssetCheckSeverity.WARN,
        metadata={"problems": MetadataValue.json(problems)} if problems else {},
    )


@asset_check(
    asset=sky_catalog,
    # Not blocking: nothing downstream reads it.
    blocking=False,
    description="Strict HATS validation; row counts of properties, _metadata and manifest agree",
)
def sky_catalog_valid(settings: GampenSettings) -> AssetCheckResult:
    return check_sky_catalog(settings)


#: Evaluates :data:`SKY_CATALOG_CONDITION`; on by default, so a batch catalogued by the inbox
#: sensor reaches the sky catalog without a human.
sky_catalog_automation_sensor = AutomationConditionSensorDefinition(
    "sky_catalog_automation",
    target=AssetSelection.assets(SKY_CATALOG_ASSET),
    default_status=DefaultSensorStatus.RUNNING,
    minimum_interval_seconds=30,
)

SKY_CATALOG_CHECKS = [sky_catalog_valid]
