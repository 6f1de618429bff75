"""Lineage from Dagster runs, the failure sensor, and the reprocess schedule's staleness."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime

import pytest
from dagster import (
    AssetKey,
    DagsterInstance,
    asset,
    build_asset_context,
    build_schedule_context,
    instance_for_test,
    materialize,
)

from gampen_assets.lineage import (
    database_path,
    failed_run_rows,
    input_fingerprint,
    record_materialization,
)
from gampen_assets.partitions import SIM_TEST, datasets
from gampen_assets.schedules import (
    DEFAULT_REPROCESS_CRON,
    reprocess_cron,
    reprocess_schedule,
    stale_catalog_partitions,
)
from gampen_assets.sensors import CATALOG_ASSETS
from gampen_ml.database import LineageRow, query, record_lineage
from tests.lineage_helpers import sense_run_failure


@pytest.fixture
def db(tmp_path, monkeypatch, storage_root):
    path = tmp_path / "gampen.duckdb"
    monkeypatch.setenv("GAMPEN_DUCKDB", str(path))
    return path


def test_database_path_follows_environment(tmp_path, monkeypatch):
    monkeypatch.delenv("GAMPEN_DUCKDB", raising=False)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    assert database_path() == tmp_path / "gampen.duckdb"


def test_record_materialization_writes_row_with_hashes(db, tmp_path):
    small = tmp_path / "psfs.fits"
    small.write_bytes(b"abc")
    folder = tmp_path / "shard"
    folder.mkdir()
    (folder / "labels.parquet").write_bytes(b"xyz")
    started = datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    context = build_asset_context()
    record_materialization(
        context,
        asset="simulated_galaxies",
        partition="shard-000",
        data_version="dv1",
        upstream=[("psf_library", None, "p1"), ("noise_pool", None, "n1")],
        input_paths=[small, folder, tmp_path / "gone"],
        row_count=24,
        started_at=started,
        mlflow_run_id="mlf",
    )
    (row,) = query(db, "SELECT * FROM lineage")
    assert (row["asset"], row["partition"], row["data_version"], row["row_count"]) == (
        "simulated_galaxies",
        "shard-000",
        "dv1",
        24,
    )
    assert row["run_id"] == context.run_id and row["status"] == "success"
    assert row["started_at"] == datetime(2024, 5, 1, 12, 0)
    assert row["finished_at"] > row["started_at"] and row["code_version"].startswith("0.1.0")
    hashes = json.loads(row["input_hashes"])
    # sha256("abc")
    assert hashes[str(small)] == (
        "sha256:ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
    )
    assert hashes[str(folder)].startswith("sha256:") and hashes[str(tmp_path / "gone")] == "missing"
    upstream = query(
        db, "SELECT upstream_asset, upstream_partition FROM lineage_upstream ORDER BY 1"
    )
    assert upstream == [
        {"upstream_asset": "noise_pool", "upstream_partition": "all"},
        {"upstream_asset": "psf_library", "upstream_partition": "all"},
    ]


def test_lineage_and_catalog_rows_record_one_code_version(db):
    import gampen_assets.lineage as lineage
    import gampen_ml.catalog as catalog
    from gampen_ml.version import code_version

    assert lineage.code_version is catalog.code_version is code_version
    record_materialization(
        build_asset_context(),
        asset="posterior_catalog",
        partition=SIM_TEST,
        data_version="dv",
        upstream=[],
        input_paths=[],
        row_count=1,
        started_at=datetime(2024, 5, 1, 12, 0, tzinfo=UTC),
    )
    (row,) = query(db, "SELECT code_version FROM lineage")
    assert row["code_version"] == code_version()
    assert re.fullmatch(r"\d+\.\d+\.\d+(\+g[0-9a-f]{4,40})?", row["code_version"])


def test_large_inputs_get_a_stat_fingerprint(tmp_path, monkeypatch):
    import gampen_assets.lineage as lineage

    monkeypatch.setattr(lineage, "FULL_HASH_MAX_BYTES", 4)
    path = tmp_path / "images.npy"
    path.write_bytes(b"0123456789")
    first = input_fingerprint(path)
    assert first.startswith("stat:") and input_fingerprint(path) == first
    path.write_bytes(b"01234567890")
    assert input_fingerprint(path) != first


def test_failure_rows_only_for_assets_without_success(db):
    record_lineage(db, LineageRow("posterior_catalog", "b1", "v", run_id="r1"))
    rows = failed_run_rows("r1", list(CATALOG_ASSETS), "b1", None, db_path=db)
    assert [(r.asset, r.partition, r.status) for r in rows] == [
        ("diagnostic_plots", "b1", "failure"),
        ("qualitative_flags", "b1", "failure"),
    ]


def test_failure_sensor_records_a_failed_run(db):
    @asset
    def broken_asset() -> None:
        raise RuntimeError("boom")

    with instance_for_test() as instance:
        result = materialize([broken_asset], instance=instance, raise_on_error=False)
        assert not result.success
        sense_run_failure(result, instance)
    (row,) = query(db, "SELECT asset, partition, status, run_id FROM lineage")
    assert row == {
        "asset": "broken_asset",
        "partition": "all",
        "status": "failure",
        "run_id": result.run_id,
    }


def _catalog(db, partition, model_version, upstream=(), input_hashes=None):
    record_lineage(
        db,
        LineageRow(
            "posterior_catalog",
            partition,
            f"{partition}-{model_version}",
            upstream=list(upstream),
            model_version=model_version,
            input_hashes=input_hashes or {},
        ),
    )


def test_staleness_from_model_upstream_and_input_changes(db, tmp_path):
    cutouts = tmp_path / "b2.fits"
    cutouts.write_bytes(b"v1")
    record_lineage(db, LineageRow("calibrated_dropout_rate", None, "cal1", model_version="1"))
    record_lineage(db, LineageRow("simulated_galaxies", "shard-001", "s1"))
    sims = [("simulated_galaxies", "shard-001", "s1")]
    _catalog(db, SIM_TEST, "1", upstream=sims)
    _catalog(db, "b1", "1")
    _catalog(db, "b2", "1", input_hashes={str(cutouts): input_fingerprint(cutouts)})
    assert stale_catalog_partitions(db) == []

    # A new champion makes every catalog stale ...
    record_lineage(db, LineageRow("calibrated_dropout_rate", None, "cal2", model_version="2"))
    stale = stale_catalog_partitions(db)
    assert [s.partition for s in stale] == ["b1", "b2", SIM_TEST]
    assert stale[0].reasons == ("model version 1 -> champion 2",)
    # ... until each is rebuilt with it; a failed rebuild does not count.
    _catalog(db, SIM_TEST, "2", upstream=sims)
    _catalog(db, "b2", "2", input_hashes={str(cutouts): input_fingerprint(cutouts)})
    record_lineage(db, LineageRow("posterior_catalog", "b1", None, status="failure"))
    assert [s.partition for s in stale_catalog_partitions(db)] == ["b1"]
    # Only registered partitions are considered.
    assert stale_catalog_partitions(db, partitions=[SIM_TEST, "b2"]) == []

    # New simulations (a different data version of an input partition) -> stale.
    record_lineage(db, LineageRow("simulated_galaxies", "shard-001", "s2"))
    # The input file of b2 changes -> stale.
    cutouts.write_bytes(b"v2")
    stale = {s.partition: s.reasons for s in stale_catalog_partitions(db)}
    assert sorted(stale) == ["b1", "b2", SIM_TEST]
    assert stale[SIM_TEST] == ("upstream simulated_galaxies[shard-001] data version s1 -> s2",)
    assert stale["b2"] == (f"input {cutouts} changed",)


def test_no_champion_means_nothing_to_reprocess(db):
    _catalog(db, SIM_TEST, "1")
    assert stale_catalog_partitions(db) == []


def test_schedule_requests_runs_only_for_stale_registered_partitions(db):
    record_lineage(db, LineageRow("calibrated_dropout_rate", None, "cal1", model_version="1"))
    _catalog(db, SIM_TEST, "1")
    _catalog(db, "b1", "1")
    _catalog(db, "gone", "1")  # no longer a registered partition
    record_lineage(db, LineageRow("calibrated_dropout_rate", None, "cal2", model_version="2"))
    _catalog(db, "b1", "2")
    with instance_for_test() as instance:
        instance.add_dynamic_partitions(datasets.name, [SIM_TEST, "b1"])
        requests = reprocess_schedule(build_schedule_context(instance=instance))
    assert [r.partition_key for r in requests] == [SIM_TEST]
    assert requests[0].asset_selection == [AssetKey(a) for a in CATALOG_ASSETS]
    assert requests[0].tags["gampen/reprocess_reason"] == "model version 1 -> champion 2"


def test_schedule_skips_without_database(tmp_path, monkeypatch):
    monkeypatch.setenv("GAMPEN_DUCKDB", str(tmp_path / "none.duckdb"))
    result = reprocess_schedule(build_schedule_context(instance=DagsterInstance.ephemeral()))
    assert "no lineage database" in result.skip_message


def test_cron_is_configurable(monkeypatch):
    monkeypatch.delenv("GAMPEN_REPROCESS_CRON", raising=False)
    assert reprocess_cron() == DEFAULT_REPROCESS_CRON == "0 3 * * *"
    monkeypatch.setenv("GAMPEN_REPROCESS_CRON", "*/15 * * * *")
    assert reprocess_cron() == "*/15 * * * *"
    assert reprocess_schedule.execution_timezone == "UTC"
