"""The DuckDB catalog and lineage database (``<dagster_home>/gampen.duckdb``).

Bulk data stays in Parquet under the storage root; this database holds

* the ``lineage`` table (one row per materialization attempt) and its child table
  ``lineage_upstream`` (the exact upstream partitions and data versions it read), plus a
  view ``lineage_latest`` (the newest successful row per asset, partition, data version);
* the views ``posterior_catalog``, ``posterior_samples`` (the optional ``samples.parquet``
  beside each catalog), ``flags`` and ``simulations`` over the Parquet files of the
  storage root (absolute globs, hidden temporary partition folders excluded).

A partition file DuckDB cannot read (truncated, not Parquet) is left out of its view and
reported by name (:class:`UnreadablePartitionWarning`, or the ``log`` callback of
:func:`record_lineage`); the other partitions stay queryable and lineage is still written.
Readers never write: :func:`query` with ``storage_root`` defines the views as TEMP views
of its read-only connection, over the partitions present at that moment.

DuckDB lets one *process* open a file read-write at a time, and a read-write process
excludes read-only ones. Every connection here is therefore short-lived and opened
through :func:`_connect_with_retry`, which retries DuckDB's lock error with jittered
exponential backoff for up to :data:`LOCK_TIMEOUT_S` seconds, so concurrent runs wait
instead of failing. Writes are tiny (a handful of rows).

Compatibility with the DuckDB shell: the Python package may be newer than the
``duckdb-cli`` shell from PyPI (2.0 vs 1.5); a database file is created with the storage
version of the older of the two (:func:`storage_compatibility_version`) so that
``duckdb -readonly dagster_home/gampen.duckdb`` opens it.
"""

from __future__ import annotations

import json
import random
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import duckdb

from gampen_ml import store

#: How long a connection waits for another process's lock before giving up (s).
LOCK_TIMEOUT_S = 60.0
#: Asset folder and file name of each Parquet-backed view.
VIEW_SOURCES: dict[str, tuple[str, str]] = {
    "posterior_catalog": (store.POSTERIOR_CATALOG, store.CATALOG_FILE),
    "posterior_samples": (store.POSTERIOR_CATALOG, store.SAMPLE_TABLE_FILE),
    "flags": (store.QUALITATIVE_FLAGS, store.FLAGS_FILE),
    "simulations": (store.SIMULATED_GALAXIES, store.LABELS_FILE),
}
#: Typed empty stand-ins used while no Parquet file of a view exists yet.
EMPTY_VIEW_COLUMNS: dict[str, str] = {
    "posterior_catalog": "galaxy_id BIGINT, dataset VARCHAR, source_file VARCHAR, hdu INTEGER, "
    "ra_deg DOUBLE, dec_deg DOUBLE, model_name VARCHAR, model_version VARCHAR",
    "posterior_samples": "galaxy_id BIGINT, dataset VARCHAR, bt FLOAT[], re_arcsec FLOAT[], "
    "flux_nJy FLOAT[]",
    "flags": "galaxy_id BIGINT, dataset VARCHAR, bulge_dominated BOOLEAN, "
    "disk_dominated BOOLEAN, small BOOLEAN, out_of_domain BOOLEAN, unreliable BOOLEAN, "
    "ood_reason VARCHAR",
    "simulations": "galaxy_id BIGINT, shard VARCHAR, split VARCHAR, seed BIGINT, psf_id INTEGER",
}
#: Partition value stored for unpartitioned assets (same as ``gampen_ml.io.UNPARTITIONED``).
UNPARTITIONED = "all"

_SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS lineage (
    lineage_id     VARCHAR PRIMARY KEY,
    asset          VARCHAR NOT NULL,
    partition      VARCHAR NOT NULL,
    run_id         VARCHAR,
    code_version   VARCHAR,
    data_version   VARCHAR,
    upstream       JSON,
    input_hashes   JSON,
    mlflow_run_id  VARCHAR,
    model_version  VARCHAR,
    row_count      BIGINT,
    started_at     TIMESTAMP,
    finished_at    TIMESTAMP,
    status         VARCHAR NOT NULL
);
CREATE TABLE IF NOT EXISTS lineage_upstream (
    lineage_id             VARCHAR NOT NULL,
    upstream_asset         VARCHAR NOT NULL,
    upstream_partition     VARCHAR NOT NULL,
    upstream_data_version  VARCHAR
);
CREATE OR REPLACE VIEW lineage_latest AS
SELECT * FROM lineage WHERE status = 'success'
QUALIFY row_number() OVER (
    PARTITION BY asset, partition, data_version ORDER BY finished_at DESC, lineage_id
) = 1;
"""


class DatabaseError(RuntimeError):
    """The lineage database could not be opened or written; the message names the file."""


class UnreadablePartitionWarning(UserWarning):
    """A partition's Parquet file could not be read and was left out of its view."""


@dataclass(frozen=True)
class LineageRow:
    """One materialization attempt of one asset partition.

    ``upstream`` lists ``(asset, partition, data_version)`` of every input partition;
    ``input_hashes`` maps input paths to content hashes. Timestamps are UTC.
    """

    asset: str
    partition: str | None
    data_version: str | None
    run_id: str | None = None
    code_version: str | None = None
    upstream: Sequence[tuple[str, str | None, str | None]] = ()
    input_hashes: dict[str, str] = field(default_factory=dict)
    mlflow_run_id: str | None = None
    model_version: str | None = None
    row_count: int | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    status: str = "success"


def _version_tuple(text: str) -> tuple[int, int]:
    parts = text.lstrip("v").split(".")
    return int(parts[0]), int(parts[1])


def storage_compatibility_version() -> str | None:
    """DuckDB storage version a new file must use so the installed shell can read it.

    Returns ``"vX.Y.0"`` of the ``duckdb-cli`` distribution when it is older than the
    Python ``duckdb``; ``None`` (DuckDB's default) when they match or no shell is
    installed.
    """
    try:
        cli = _version_tuple(metadata.version("duckdb-cli"))
    except metadata.PackageNotFoundError:
        return None
    python = _version_tuple(duckdb.__version__)
    if cli >= python:
        return None
    return f"v{cli[0]}.{cli[1]}.0"


def _is_lock_error(exc: Exception) -> bool:
    text = str(exc).lower()
    return "lock" in text and ("conflicting" in text or "could not set" in text)


def _connect_with_retry(
    db_path: Path | str, read_only: bool, timeout_s: float = LOCK_TIMEOUT_S
) -> duckdb.DuckDBPyConnection:
    db_path = Path(db_path)
    config: dict[str, str] = {}
    if not read_only and not db_path.exists():
        version = storage_compatibility_version()
        if version:
            config["storage_compatibility_version"] = version
        db_path.parent.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + timeout_s
    delay_s = 0.01
    while True:
        try:
            return duckdb.connect(str(db_path), read_only=read_only, config=config)
        except duckdb.Error as exc:
            if not _is_lock_error(exc) or time.monotonic() > deadline:
                raise DatabaseError(
                    f"cannot open {db_path} ({'read-only' if read_only else 'read-write'}): {exc}"
                ) from exc
        time.sleep(delay_s * (0.5 + random.random()))
        delay_s = min(delay_s * 2, 0.5)


def connect_read_only(db_path: Path | str) -> duckdb.DuckDBPyConnection:
    """Open an existing ``db_path`` read-only, waiting for a concurrent writer.

    Never creates the file and never takes the writer's lock; close it promptly (a
    reader excludes writers of other processes while it is open).

    Raises
    ------
    DatabaseError
        If the file does not exist or stays locked for :data:`LOCK_TIMEOUT_S` seconds.
    """
    if not Path(db_path).is_file():
        raise DatabaseError(f"no lineage database at {Path(db_path).resolve()}")
    return _connect_with_retry(db_path, read_only=True)


def partition_files(view: str, storage_root: Path | str) -> list[Path]:
    """The published Parquet files behind ``view``, one per partition, sorted.

    Hidden folders (``.tmp-*``/``.old-*`` of partitions being written) are skipped.
    """
    folder, name = VIEW_SOURCES[view]
    base = Path(storage_root).resolve() / folder
    return sorted(p for p in base.glob(f"*/{name}") if not p.parent.name.startswith("."))


def _sql_string(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _unreadable_reason(con: duckdb.DuckDBPyConnection, file: Path) -> str | None:
    """DuckDB's error reading ``file``'s Parquet footer, ``None`` when it reads."""
    try:
        con.execute("SELECT count(*) FROM parquet_file_metadata(?)", [str(file)]).fetchall()
    except duckdb.Error as exc:
        return str(exc).splitlines()[0]
    return None


def _create_view(
    con: duckdb.DuckDBPyConnection, view: str, storage_root: Path, temporary: bool
) -> list[tuple[Path, str]]:
    """(Re)create one Parquet view; returns the ``(file, reason)`` pairs left out of it.

    With every file readable the view reads a glob, so partitions published later appear
    without a refresh; otherwise it lists the readable files. Without any file it is an
    empty typed view with the key columns (:data:`EMPTY_VIEW_COLUMNS`).
    """
    kind = "TEMP VIEW" if temporary else "VIEW"
    files = partition_files(view, storage_root)
    folder, name = VIEW_SOURCES[view]
    # "[!.]*" skips the hidden .tmp-*/.old-* folders of partitions being written.
    glob = (storage_root / folder / "[!.]*" / name).as_posix()
    if files:
        try:
            con.execute(
                f"CREATE OR REPLACE {kind} {view} AS SELECT * FROM "
                f"read_parquet({_sql_string(glob)}, union_by_name = true)"
            )
            return []
        except duckdb.Error as exc:
            unreadable = [(f, r) for f in files if (r := _unreadable_reason(con, f)) is not None]
            if not unreadable:
                raise DatabaseError(f"cannot create view {view} over {glob}: {exc}") from exc
    else:
        unreadable = []
    readable = [f for f in files if f not in {u for u, _ in unreadable}]
    if readable:
        listed = ", ".join(_sql_string(f.as_posix()) for f in readable)
        con.execute(
            f"CREATE OR REPLACE {kind} {view} AS SELECT * FROM "
            f"read_parquet([{listed}], union_by_name = true)"
        )
    else:
        columns = ", ".join(
            f"CAST(NULL AS {c.split(' ', 1)[1]}) AS {c.split(' ', 1)[0]}"
            for c in EMPTY_VIEW_COLUMNS[view].split(", ")
        )
        con.execute(f"CREATE OR REPLACE {kind} {view} AS SELECT {columns} WHERE false")
    return unreadable


def refresh_views(
    con: duckdb.DuckDBPyConnection,
    storage_root: Path | str,
    *,
    temporary: bool = False,
    log: Callable[[str], None] | None = None,
) -> list[Path]:
    """(Re)create every Parquet view of :data:`VIEW_SOURCES` over ``storage_root``.

    Parameters
    ----------
    con : DuckDB connection
        Read-write for persistent views; any (read-only too) with ``temporary``.
    storage_root : Path
        Root of the asset partitions.
    temporary : bool
        Create TEMP views, private to ``con`` (they shadow the file's views).
    log : callable, optional
        Receives one line per unreadable partition file; default: a
        :class:`UnreadablePartitionWarning`.

    Returns
    -------
    list[Path]
        The unreadable files left out of the views (empty when all read).

    Raises
    ------
    DatabaseError
        If a view cannot be created although every file reads (e.g. clashing column
        types between partitions).
    """
    root = Path(storage_root).resolve()
    left_out: list[Path] = []
    for view in VIEW_SOURCES:
        for file, reason in _create_view(con, view, root, temporary):
            message = f"{file}: unreadable partition file left out of view {view}: {reason}"
            if log is None:
                warnings.warn(message, UnreadablePartitionWarning, stacklevel=2)
            else:
                log(message)
            left_out.append(file)
    return left_out


def ensure_schema(db_path: Path | str, storage_root: Path | str | None = None) -> None:
    """Create the lineage tables and (re)create the Parquet views over ``storage_root``.

    A view whose Parquet files do not exist yet is an empty typed view with the key
    columns; it is replaced by the real ``read_parquet`` view on the next call after the
    first file appears (:func:`record_lineage` does this for every catalog write).
    Unreadable partition files are left out and warned about (:func:`refresh_views`).
    """
    con = _connect_with_retry(db_path, read_only=False)
    try:
        con.execute(_SCHEMA_SQL)
        if storage_root is not None:
            refresh_views(con, storage_root)
    finally:
        con.close()


def _partition(value: str | None) -> str:
    return value if value else UNPARTITIONED


def record_lineage(
    db_path: Path | str,
    row: LineageRow,
    storage_root: Path | str | None = None,
    *,
    log: Callable[[str], None] | None = None,
) -> str:
    """Append one lineage row (and its upstream rows) in a single short transaction.

    Waits for DuckDB's single-writer lock (jittered backoff, up to
    :data:`LOCK_TIMEOUT_S`). With ``storage_root``, a row of an asset behind a view
    (:data:`VIEW_SOURCES`) also refreshes the Parquet views, after the row is committed:
    an unreadable partition file is left out and reported through ``log`` (default: a
    :class:`UnreadablePartitionWarning`), and a view that cannot be refreshed keeps its
    previous definition (reported the same way); neither fails the lineage write.

    Returns
    -------
    str
        The new ``lineage_id``.

    Raises
    ------
    DatabaseError
        If the lock is not obtained in time or the write fails.
    """
    if row.status not in ("success", "failure"):
        raise DatabaseError(
            f"{db_path}: lineage status must be success|failure, got {row.status!r}"
        )
    lineage_id = uuid.uuid4().hex
    now = datetime.now(UTC).replace(tzinfo=None)
    upstream = [(a, _partition(p), v) for a, p, v in row.upstream]
    values = (
        lineage_id,
        row.asset,
        _partition(row.partition),
        row.run_id,
        row.code_version,
        row.data_version,
        json.dumps([{"asset": a, "partition": p, "data_version": v} for a, p, v in upstream]),
        json.dumps(row.input_hashes, sort_keys=True),
        row.mlflow_run_id,
        row.model_version,
        row.row_count,
        _naive_utc(row.started_at),
        _naive_utc(row.finished_at) or now,
        row.status,
    )
    con = _connect_with_retry(db_path, read_only=False)
    try:
        con.execute("BEGIN TRANSACTION")
        con.execute(_SCHEMA_SQL)
        con.execute(f"INSERT INTO lineage VALUES ({', '.join('?' * len(values))})", values)
        if upstream:
            con.executemany(
                "INSERT INTO lineage_upstream VALUES (?, ?, ?, ?)",
                [(lineage_id, a, p, v) for a, p, v in upstream],
            )
        con.execute("COMMIT")
    except duckdb.Error as exc:
        try:
            con.execute("ROLLBACK")
        finally:
            con.close()
        raise DatabaseError(f"{db_path}: cannot record lineage of {row.asset}: {exc}") from exc
    try:
        if storage_root is not None and row.asset in _VIEW_ASSETS:
            try:
                refresh_views(con, storage_root, log=log)
            except (DatabaseError, duckdb.Error) as exc:
                message = f"{db_path}: views not refreshed after lineage {lineage_id}: {exc}"
                if log is None:
                    warnings.warn(message, UnreadablePartitionWarning, stacklevel=2)
                else:
                    log(message)
    finally:
        con.close()
    return lineage_id


_VIEW_ASSETS = {folder for folder, _ in VIEW_SOURCES.values()}


def _naive_utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is None:
        return value
    return value.astimezone(UTC).replace(tzinfo=None)


def query(
    db_path: Path | str,
    sql: str,
    params: Sequence | dict | None = None,
    *,
    storage_root: Path | str | None = None,
    log: Callable[[str], None] | None = None,
) -> list[dict]:
    """Run one parameterised query on a read-only connection; returns rows as dicts.

    Values must be passed in ``params`` (``?`` or ``$name`` placeholders), never
    formatted into ``sql``. The database must exist; it is never created or written.

    Parameters
    ----------
    storage_root : Path, optional
        Define the Parquet views as TEMP views over the partitions under it now
        (:func:`refresh_views`), instead of the views stored in the file (as of the
        last lineage write); unreadable files are left out and reported through ``log``.

    Raises
    ------
    DatabaseError
        If the file does not exist, stays locked, or the statement fails (a write
        statement fails: the connection is read-only); the message names the file.
    """
    con = connect_read_only(db_path)
    try:
        if storage_root is not None:
            refresh_views(con, storage_root, temporary=True, log=log)
        cursor = con.execute(sql, params) if params is not None else con.execute(sql)
        if cursor.description is None:
            return []
        columns = [d[0] for d in cursor.description]
        return [dict(zip(columns, values, strict=True)) for values in cursor.fetchall()]
    except duckdb.Error as exc:
        raise DatabaseError(f"{db_path} (opened read-only): {exc}") from exc
    finally:
        con.close()


#: The recursive step of both lineage walks: from a chain row ``c`` along its recorded inputs
#: ``u`` to the materialization ``l`` of each input's recorded data version, at most 32 deep.
_UPSTREAM_STEP_SQL = """\
    FROM chain c
    JOIN lineage_upstream u ON u.lineage_id = c.lineage_id
    LEFT JOIN lineage_latest l
      ON l.asset = u.upstream_asset AND l.partition = u.upstream_partition
     AND l.data_version IS NOT DISTINCT FROM u.upstream_data_version
    WHERE c.depth < 32"""

LINEAGE_CHAIN_SQL = f"""
WITH RECURSIVE chain(depth, lineage_id, asset, partition, data_version,
                     downstream_asset, downstream_partition) AS (
    SELECT 0, lineage_id, asset, partition, data_version,
           CAST(NULL AS VARCHAR), CAST(NULL AS VARCHAR)
    FROM (SELECT * FROM lineage
          WHERE asset = $asset AND partition = $partition AND status = 'success'
          ORDER BY finished_at DESC LIMIT 1)
    UNION
    SELECT c.depth + 1, l.lineage_id, u.upstream_asset, u.upstream_partition,
           u.upstream_data_version, c.asset, c.partition
{_UPSTREAM_STEP_SQL}
)
SELECT min(c.depth) AS depth, c.asset, c.partition, c.data_version,
       c.downstream_asset, c.downstream_partition,
       l.run_id, l.code_version, l.mlflow_run_id, l.model_version, l.row_count,
       l.input_hashes, l.started_at, l.finished_at, l.status
FROM chain c LEFT JOIN lineage l USING (lineage_id)
GROUP BY ALL
ORDER BY depth, c.asset, c.partition, c.downstream_asset NULLS FIRST
"""


def lineage_chain(db_path: Path | str, asset: str, partition: str | None) -> list[dict]:
    """Everything upstream of the newest successful ``asset``/``partition``, recursively.

    Starting from that lineage row, follows ``lineage_upstream`` to the materialization
    of each input that had the recorded data version (``status`` null when that
    materialization is not in the table), down to the roots.

    Returns
    -------
    list[dict]
        One row per (upstream partition, consumer) edge, ``depth`` 0 being the start row;
        keys ``depth, asset, partition, data_version, downstream_asset,
        downstream_partition, run_id, code_version, mlflow_run_id, model_version,
        row_count, input_hashes, started_at, finished_at, status``. Empty when the
        partition was never materialized successfully.
    """
    return query(db_path, LINEAGE_CHAIN_SQL, {"asset": asset, "partition": _partition(partition)})


CATALOG_ROW_PROVENANCE_SQL = f"""
WITH RECURSIVE chain(depth, lineage_id, asset, partition, data_version) AS (
    SELECT 0, l.lineage_id, l.asset, l.partition, l.data_version
    FROM posterior_catalog c
    JOIN lineage_latest l ON l.asset = 'posterior_catalog' AND l.partition = c.dataset
    WHERE c.dataset = $dataset AND c.galaxy_id = $galaxy_id
    QUALIFY row_number() OVER (ORDER BY l.finished_at DESC) = 1
    UNION
    SELECT c.depth + 1, l.lineage_id, u.upstream_asset, u.upstream_partition,
           u.upstream_data_version
{_UPSTREAM_STEP_SQL}
)
SELECT DISTINCT c.asset, c.partition, c.data_version, l.run_id, l.mlflow_run_id,
       l.model_version, l.code_version, l.finished_at
FROM chain c LEFT JOIN lineage l USING (lineage_id)
ORDER BY c.asset, c.partition
"""


def catalog_row_provenance(db_path: Path | str, dataset: str, galaxy_id: int) -> list[dict]:
    """Which simulations, PSFs, noise pool and model produced one catalog row.

    Runs :data:`CATALOG_ROW_PROVENANCE_SQL` (also quoted in ``docs/operations.md``): the
    catalog row is looked up in the ``posterior_catalog`` view and its dataset's newest
    successful catalog build is followed upstream recursively.

    Returns
    -------
    list[dict]
        One row per distinct upstream partition (including the catalog itself), keys
        ``asset, partition, data_version, run_id, mlflow_run_id, model_version,
        code_version, finished_at``; empty when the row does not exist.
    """
    return query(db_path, CATALOG_ROW_PROVENANCE_SQL, {"dataset": dataset, "galaxy_id": galaxy_id})
