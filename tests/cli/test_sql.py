"""``gampen sql``, run as a user runs it: read-only, on an existing database only, over the
partitions present when it runs."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import duckdb
import polars as pl
import pytest

from gampen_ml.database import LineageRow, query, record_lineage

REPO = Path(__file__).resolve().parents[2]
WRITER_HOLD_S = 6.0
DATASETS = (
    "SELECT string_agg(DISTINCT dataset, '+' ORDER BY dataset) AS datasets FROM posterior_catalog"
)


def gampen_sql(*args: str, env: dict, cwd: Path, timeout: float = 120):
    return subprocess.run(
        [sys.executable, "-m", "gampen_ml.cli", "sql", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def bare_env(**extra: str) -> dict[str, str]:
    """This environment without any storage variable, plus ``extra``."""
    drop = {"DAGSTER_HOME", "GAMPEN_STORAGE", "GAMPEN_DUCKDB", "MLFLOW_TRACKING_URI"}
    env = {k: v for k, v in os.environ.items() if k not in drop}
    return {**env, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **extra}


def write_catalog(root: Path, dataset: str) -> None:
    folder = root / "posterior_catalog" / dataset
    folder.mkdir(parents=True)
    pl.DataFrame({"galaxy_id": [0, 1], "dataset": [dataset] * 2}).write_parquet(
        folder / "catalog.parquet"
    )


def assert_lists_datasets(result: subprocess.CompletedProcess, datasets: str) -> None:
    """``result``, an answer of ``gampen sql`` to :data:`DATASETS`, succeeded and lists
    ``datasets`` (``+``-joined)."""
    assert result.returncode == 0, result.stderr
    assert f"│ {datasets} " in result.stdout


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def home(tmp_path) -> Path:
    """A Dagster home whose database's last lineage write saw no catalog at all."""
    home = tmp_path / "home"
    record_lineage(
        home / "gampen.duckdb",
        LineageRow("posterior_catalog", "a", "v1", row_count=2),
        storage_root=home / "data",
    )
    return home


def test_without_a_database_it_fails_naming_the_path_and_creates_nothing(tmp_path):
    result = gampen_sql("select count(*) from posterior_catalog", env=bare_env(), cwd=tmp_path)
    assert result.returncode == 2
    assert f"no lineage database at {tmp_path / 'dagster_home' / 'gampen.duckdb'}" in (
        result.stderr
    )
    assert list(tmp_path.iterdir()) == []
    # --db and $GAMPEN_DUCKDB are where it looks first.
    result = gampen_sql("select 1", "--db", "x.duckdb", env=bare_env(), cwd=tmp_path)
    assert result.returncode == 2 and str(tmp_path / "x.duckdb") in result.stderr
    env = bare_env(GAMPEN_DUCKDB=str(tmp_path / "y.duckdb"))
    result = gampen_sql("select 1", env=env, cwd=tmp_path)
    assert result.returncode == 2 and str(tmp_path / "y.duckdb") in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_sees_partitions_published_after_the_last_lineage_write(home):
    db, root = home / "gampen.duckdb", home / "data"
    write_catalog(root, "a")
    write_catalog(root, "b")
    # The view stored in the file predates the catalogs (empty typed view) ...
    assert query(db, DATASETS) == [{"datasets": None}]
    before = sha256(db)
    result = gampen_sql(DATASETS, env=bare_env(DAGSTER_HOME=str(home)), cwd=home)
    # ... gampen sql defines its own, over the partitions there now, and writes nothing.
    assert_lists_datasets(result, "a+b")
    assert sha256(db) == before
    assert sorted(p.name for p in home.iterdir()) == ["data", "gampen.duckdb"]


def test_a_write_statement_is_refused(home):
    db = home / "gampen.duckdb"
    before = sha256(db)
    env = bare_env(DAGSTER_HOME=str(home))
    result = gampen_sql("create table x(i int)", env=env, cwd=home)
    assert result.returncode == 2
    assert "gampen sql: error:" in result.stderr
    assert "read-only" in result.stderr and str(db) in result.stderr
    assert sha256(db) == before
    assert query(db, "SELECT count(*) AS n FROM duckdb_tables() WHERE table_name = 'x'") == [
        {"n": 0}
    ]


def test_never_takes_the_write_lock(home):
    """What is asserted: DuckDB lets one process hold a file read-write, which excludes
    every other process, readers included. (1) While this process holds the database
    read-write, ``gampen sql`` waits (it retries the lock error for up to 60 s) and
    answers once the writer closes, instead of failing. (2) While this process holds a
    read-only connection (a shared lock), ``gampen sql`` answers at once: had it asked for
    the write lock it would wait for this reader until its 60 s lock timeout, past the 40 s
    given here."""
    db = home / "gampen.duckdb"
    write_catalog(home / "data", "a")
    env = bare_env(DAGSTER_HOME=str(home))

    # Held long enough for the CLI (about 1 s of CPU to start) to reach its connect.
    writer = duckdb.connect(str(db))
    closer = threading.Timer(WRITER_HOLD_S, writer.close)
    closer.start()
    start = time.monotonic()
    try:
        result = gampen_sql(DATASETS, env=env, cwd=home, timeout=60)
    finally:
        closer.join()
    assert_lists_datasets(result, "a")
    assert time.monotonic() - start >= WRITER_HOLD_S  # it answered after the writer left

    with duckdb.connect(str(db), read_only=True):
        result = gampen_sql(DATASETS, env=env, cwd=home, timeout=40)
    assert_lists_datasets(result, "a")
