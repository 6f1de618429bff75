"""DuckDB lineage: schema, chain query, Parquet views, concurrent writers, the CLI."""

from __future__ import annotations

import multiprocessing
import shutil
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from gampen_ml.database import (
    DatabaseError,
    LineageRow,
    catalog_row_provenance,
    ensure_schema,
    lineage_chain,
    query,
    record_lineage,
)


def fill_pipeline(db: Path, storage_root: Path | None = None) -> None:
    """psf + noise -> 2 shards -> model -> champion -> catalog (which also reads shard 1)."""
    record_lineage(db, LineageRow("psf_library", None, "psf-v1", row_count=4))
    record_lineage(db, LineageRow("noise_pool", None, "noise-v1", row_count=8))
    for shard in ("shard-000", "shard-001"):
        record_lineage(
            db,
            LineageRow(
                "simulated_galaxies",
                shard,
                f"{shard}-v1",
                upstream=[("psf_library", None, "psf-v1"), ("noise_pool", None, "noise-v1")],
                row_count=24,
            ),
        )
    record_lineage(
        db,
        LineageRow(
            "trained_model",
            "dropout-0.05",
            "model-v1",
            upstream=[
                ("simulated_galaxies", "shard-000", "shard-000-v1"),
                ("simulated_galaxies", "shard-001", "shard-001-v1"),
            ],
            mlflow_run_id="run-abc",
        ),
    )
    record_lineage(
        db,
        LineageRow(
            "calibrated_dropout_rate",
            None,
            "cal-v1",
            upstream=[("trained_model", "dropout-0.05", "model-v1")],
            model_version="7",
        ),
    )
    record_lineage(
        db,
        LineageRow(
            "posterior_catalog",
            "sim-test",
            "cat-v1",
            upstream=[
                ("calibrated_dropout_rate", None, "cal-v1"),
                ("simulated_galaxies", "shard-001", "shard-001-v1"),
            ],
            model_version="7",
            row_count=7,
        ),
        storage_root=storage_root,
    )


def test_lineage_chain_answers_what_produced_a_catalog(tmp_path):
    db = tmp_path / "gampen.duckdb"
    fill_pipeline(db)
    # A later, failed rebuild of the PSFs must not change the chain.
    record_lineage(db, LineageRow("psf_library", None, None, status="failure"))
    chain = lineage_chain(db, "posterior_catalog", "sim-test")
    edges = {(r["asset"], r["partition"], r["downstream_asset"]) for r in chain}
    assert edges == {
        ("posterior_catalog", "sim-test", None),
        ("calibrated_dropout_rate", "all", "posterior_catalog"),
        ("simulated_galaxies", "shard-001", "posterior_catalog"),
        ("trained_model", "dropout-0.05", "calibrated_dropout_rate"),
        ("simulated_galaxies", "shard-000", "trained_model"),
        ("simulated_galaxies", "shard-001", "trained_model"),
        ("psf_library", "all", "simulated_galaxies"),
        ("noise_pool", "all", "simulated_galaxies"),
    }
    by_asset = {r["asset"]: r for r in chain}
    assert by_asset["trained_model"]["mlflow_run_id"] == "run-abc"
    assert by_asset["calibrated_dropout_rate"]["model_version"] == "7"
    assert by_asset["psf_library"]["data_version"] == "psf-v1"
    assert by_asset["psf_library"]["status"] == "success"
    assert min(r["depth"] for r in chain if r["asset"] == "psf_library") == 2
    assert lineage_chain(db, "posterior_catalog", "never-built") == []


def test_views_exist_before_and_after_parquet_files(tmp_path):
    db = tmp_path / "gampen.duckdb"
    root = tmp_path / "storage"
    ensure_schema(db, root)
    for view in ("posterior_catalog", "flags", "simulations"):
        assert query(db, f"SELECT count(*) AS n FROM {view}") == [{"n": 0}]
    for dataset, n in (("sim-test", 3), ("batch-a", 2)):
        folder = root / "posterior_catalog" / dataset
        folder.mkdir(parents=True)
        pl.DataFrame(
            {"galaxy_id": list(range(n)), "dataset": [dataset] * n, "bt_mode": [0.5] * n}
        ).write_parquet(folder / "catalog.parquet")
    # A partition being written (hidden temporary folder) must stay invisible.
    hidden = root / "posterior_catalog" / ".tmp-batch-b-1234"
    hidden.mkdir()
    (hidden / "catalog.parquet").write_bytes(b"half a file")
    fill_pipeline(db, storage_root=root)  # the catalog write refreshes the views
    rows = query(
        db,
        "SELECT dataset, count(*) AS n FROM posterior_catalog GROUP BY 1 ORDER BY 1",
    )
    assert rows == [{"dataset": "batch-a", "n": 2}, {"dataset": "sim-test", "n": 3}]
    # One query answers which simulations, PSFs, noise pool and model made a row.
    provenance = catalog_row_provenance(db, "sim-test", 1)
    assert [(r["asset"], r["partition"]) for r in provenance] == [
        ("calibrated_dropout_rate", "all"),
        ("noise_pool", "all"),
        ("posterior_catalog", "sim-test"),
        ("psf_library", "all"),
        ("simulated_galaxies", "shard-000"),
        ("simulated_galaxies", "shard-001"),
        ("trained_model", "dropout-0.05"),
    ]
    assert provenance[0]["model_version"] == "7"
    assert provenance[-1]["mlflow_run_id"] == "run-abc"
    assert catalog_row_provenance(db, "sim-test", 99) == []


def test_query_is_parameterised(tmp_path):
    db = tmp_path / "gampen.duckdb"
    fill_pipeline(db)
    evil = "sim-test' OR '1'='1"
    assert query(db, "SELECT * FROM lineage WHERE partition = ?", [evil]) == []
    assert query(db, "SELECT count(*) AS n FROM lineage")[0]["n"] == 7
    with pytest.raises(DatabaseError, match="status"):
        record_lineage(db, LineageRow("x", None, None, status="maybe"))
    with pytest.raises(DatabaseError, match="no lineage database"):
        query(tmp_path / "absent.duckdb", "SELECT 1")


def _writer(db: str, worker: int, n: int, errors) -> None:
    try:
        _write_rows(db, worker, n)
    except Exception as exc:  # report to the parent, which asserts there are none
        errors.put(f"writer {worker}: {exc!r}")
        raise


def _write_rows(db: str, worker: int, n: int) -> None:
    for i in range(n):
        record_lineage(
            db,
            LineageRow(
                "simulated_galaxies",
                f"shard-{worker:03d}",
                f"v{i}",
                upstream=[("psf_library", None, "psf-v1")],
                row_count=i,
            ),
        )


def _reader(db: str, stop_after_s: float, results) -> None:
    deadline = time.monotonic() + stop_after_s
    n_queries = 0
    while time.monotonic() < deadline:
        if Path(db).exists():
            query(db, "SELECT count(*) AS n FROM lineage")
            n_queries += 1
        time.sleep(0.01)
    results.put(n_queries)


def test_concurrent_writers_and_reader_lose_nothing(tmp_path):
    db = str(tmp_path / "gampen.duckdb")
    ensure_schema(db)
    ctx = multiprocessing.get_context("spawn")
    results = ctx.Queue()
    reader = ctx.Process(target=_reader, args=(db, 4.0, results))
    errors = ctx.Queue()
    writers = [ctx.Process(target=_writer, args=(db, w, 20, errors)) for w in range(4)]
    reader.start()
    for p in writers:
        p.start()
    for p in [*writers, reader]:
        p.join(timeout=120)
    assert errors.empty() or pytest.fail(errors.get())
    assert [p.exitcode for p in writers] == [0, 0, 0, 0]
    assert reader.exitcode == 0 and results.get(timeout=5) > 0
    counts = query(
        db,
        "SELECT partition, count(*) AS n, count(DISTINCT data_version) AS v FROM lineage "
        "GROUP BY 1 ORDER BY 1",
    )
    assert counts == [{"partition": f"shard-{w:03d}", "n": 20, "v": 20} for w in range(4)]
    assert query(db, "SELECT count(*) AS n FROM lineage_upstream")[0]["n"] == 80


def test_duckdb_cli_reads_the_database(tmp_path):
    cli = Path(sys.executable).with_name("duckdb")
    if not cli.exists():
        cli = shutil.which("duckdb")
    if cli is None:
        pytest.skip("duckdb-cli is not installed")
    db = tmp_path / "gampen.duckdb"
    root = tmp_path / "storage"
    (root / "posterior_catalog" / "sim-test").mkdir(parents=True)
    pl.DataFrame({"galaxy_id": [0, 1], "dataset": ["sim-test"] * 2}).write_parquet(
        root / "posterior_catalog" / "sim-test" / "catalog.parquet"
    )
    fill_pipeline(db, storage_root=root)
    out = subprocess.run(
        [
            str(cli),
            "-readonly",
            "-csv",
            str(db),
            "SELECT asset, model_version FROM lineage_latest WHERE model_version IS NOT NULL "
            "ORDER BY asset; SELECT count(*) AS n FROM posterior_catalog;",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == [
        "asset,model_version",
        "calibrated_dropout_rate,7",
        "posterior_catalog,7",
        "n",
        "2",
    ]
