"""The sky_catalog asset: materialized by Dagster, requested by its automation sensor, lineage."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from dagster import (
    AssetKey,
    AssetMaterialization,
    DagsterInstance,
    evaluate_automation_conditions,
    materialize,
)

from benchmarks.bench_sky_catalog import schema_rows
from gampen_assets.assets import ALL_ASSETS
from gampen_assets.assets.sky_catalog_assets import (
    SKY_CATALOG_CHECKS,
    check_sky_catalog,
    sky_catalog,
)
from gampen_assets.definitions import defs
from gampen_assets.partitions import datasets
from gampen_assets.resources import GampenSettings
from gampen_ml.catalog import write_catalog
from gampen_ml.database import query
from gampen_ml.sky_catalog import open_sky_catalog


def catalog_rows(dataset: str, n: int, seed: int, positioned: bool = True) -> pl.DataFrame:
    """``n`` schema-valid catalog rows in a 10° patch of sky (or without positions)."""
    rng = np.random.default_rng(seed)
    df = schema_rows(rng, n).with_columns(dataset=pl.lit(dataset))
    if not positioned:
        return df.with_columns(ra_deg=pl.lit(None, pl.Float64), dec_deg=pl.lit(None, pl.Float64))
    return df.with_columns(
        ra_deg=pl.Series(rng.uniform(30 * seed, 30 * seed + 10, n)),
        dec_deg=pl.Series(rng.uniform(-5, 5, n)),
    )


@pytest.fixture
def env(dagster_home):
    settings = GampenSettings(
        storage_root=str(dagster_home / "storage"), dagster_home=str(dagster_home)
    )
    return dagster_home, settings


def _materialize(settings, instance):
    result = materialize(
        [*ALL_ASSETS, *SKY_CATALOG_CHECKS],
        selection=[sky_catalog.key],
        resources={"settings": settings},
        instance=instance,
    )
    assert result.success
    (check,) = result.get_asset_check_evaluations()
    assert check.passed
    return result.asset_materializations_for_node("sky_catalog")[0].metadata


@pytest.mark.slow
def test_materializations_publish_new_batches_with_metadata_and_lineage(env):
    tmp_path, settings = env
    root = settings.root()
    instance = DagsterInstance.ephemeral()
    write_catalog(root / "posterior_catalog" / "sim-test", catalog_rows("sim-test", 300, 0, False))
    write_catalog(root / "posterior_catalog" / "batch-1", catalog_rows("batch-1", 2_000, 1))

    first = _materialize(settings, instance)
    assert first["dagster/row_count"].value == 2_000
    assert first["n_rows_without_position"].value == 300
    assert "sim-test | 300" in first["rows_without_position"].value
    assert first["n_pixels"].value >= 1 and first["healpix_orders"].value
    assert first["path"].value == str(root / "sky_catalog" / "all")
    assert first["datasets_added"].value == ["batch-1", "sim-test"]

    write_catalog(root / "posterior_catalog" / "batch-2", catalog_rows("batch-2", 1_500, 2))
    second = _materialize(settings, instance)
    assert second["dagster/row_count"].value == 3_500
    assert second["datasets_added"].value == ["batch-2"]
    assert second["rows_imported"].value == 1_500  # batch 1's patch is 60° away: untouched
    assert second["pixels_linked"].value == first["n_pixels"].value
    cone = open_sky_catalog(root).cone_search(65.0, 0.0, 3 * 3600.0).compute()
    assert len(cone) > 0 and set(cone["dataset"]) == {"batch-2"}

    rows = query(
        tmp_path / "gampen.duckdb",
        "SELECT data_version, row_count FROM lineage WHERE asset = 'sky_catalog' "
        "AND status = 'success' ORDER BY finished_at",
        [],
    )
    assert [r["row_count"] for r in rows] == [2_000, 3_500]
    upstream = query(
        tmp_path / "gampen.duckdb",
        "SELECT u.upstream_asset, u.upstream_partition FROM lineage_upstream u "
        "JOIN lineage l USING (lineage_id) WHERE l.data_version = ?",
        [rows[1]["data_version"]],
    )
    assert {(r["upstream_asset"], r["upstream_partition"]) for r in upstream} == {
        ("sky_catalog", "all"),
        ("posterior_catalog", "batch-2"),
    }


def test_a_bad_declination_fails_without_retries(env):
    _, settings = env
    root = settings.root()
    bad = catalog_rows("batch-1", 10, 1).with_columns(dec_deg=pl.lit(91.0))
    write_catalog(root / "posterior_catalog" / "batch-1", bad)
    result = materialize(
        [sky_catalog],
        resources={"settings": settings},
        instance=DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    assert "batch-1/catalog.parquet" in failure.event_specific_data.error.message
    assert check_sky_catalog(settings).passed  # nothing published, nothing inconsistent


def test_a_new_catalog_partition_requests_a_sky_catalog_run(env):
    """What the sky_catalog_automation sensor decides, tick by tick."""
    instance = DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(datasets.name, ["batch-1", "batch-2"])
    key = AssetKey("sky_catalog")
    result = evaluate_automation_conditions(defs=defs, instance=instance)
    assert result.get_num_requested(key) == 0  # nothing catalogued yet
    # batch-1 catalogued; batch-2 never (a failed run) does not hold it back.
    instance.report_runless_asset_event(
        AssetMaterialization("posterior_catalog", partition="batch-1")
    )
    result = evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
    assert result.get_num_requested(key) == 1
    instance.report_runless_asset_event(AssetMaterialization("sky_catalog"))
    result = evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
    assert result.get_num_requested(key) == 0
    instance.report_runless_asset_event(
        AssetMaterialization("posterior_catalog", partition="batch-2")
    )
    result = evaluate_automation_conditions(defs=defs, instance=instance, cursor=result.cursor)
    assert result.get_num_requested(key) == 1
