"""Lineage of every materialization into the DuckDB database, from Dagster.

Every asset body ends with :func:`record_materialization` (through
:meth:`gampen_assets.assets._common.AssetRun.result`); :data:`lineage_failure_sensor`
records failed runs. The database and storage root come from the run's ``settings``
resource (``GampenSettings.settings()``), so they are the paths the run wrote to; outside
a run, :func:`database_path` resolves them from the environment
(:meth:`gampen_ml.settings.Settings.resolve`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path

from dagster import DefaultSensorStatus, RunFailureSensorContext, run_failure_sensor

from gampen_assets.resources import GampenSettings
from gampen_ml.database import LineageRow, query, record_lineage
from gampen_ml.io import file_sha256, folder_sha256
from gampen_ml.settings import Settings
from gampen_ml.version import code_version

#: Inputs up to this size are hashed in full (SHA-256); larger ones get a stat fingerprint.
FULL_HASH_MAX_BYTES = 256 * 1024**2


def database_path(settings: Settings | None = None) -> Path:
    """The lineage database of ``settings`` (default: resolved from the environment).

    ``$GAMPEN_DUCKDB``, else ``$DAGSTER_HOME/gampen.duckdb``, else ``./dagster_home/...``.
    """
    return (settings or Settings.resolve()).database


def run_settings(context) -> Settings:
    """The resolved ``settings`` resource of a run's ``context``; the environment without one."""
    resource = getattr(getattr(context, "resources", None), "settings", None)
    return resource.settings() if isinstance(resource, GampenSettings) else Settings.resolve()


def launched_settings(run_config: Mapping | None) -> Settings:
    """The settings a run was launched with: its ``settings`` resource config over the
    environment (what :func:`run_settings` gave the run's steps, seen from outside it)."""
    resource = ((run_config or {}).get("resources") or {}).get("settings") or {}
    config = resource.get("config") or {}
    fields = {
        k: v for k, v in config.items() if k in GampenSettings.model_fields and isinstance(v, str)
    }
    return GampenSettings(**fields).settings()


def input_fingerprint(path: Path | str) -> str:
    """Content hash of an input file or folder.

    Files and folders up to :data:`FULL_HASH_MAX_BYTES` get ``sha256:<hex>``
    (``gampen_ml.io.file_sha256`` / ``folder_sha256``). Larger ones (image shards of
    gigabytes) get ``stat:<hex>``, a SHA-256 over every file's relative name, size and
    modification time: cheap, and it changes whenever a file is rewritten.
    """
    path = Path(path)
    if path.is_file():
        if path.stat().st_size <= FULL_HASH_MAX_BYTES:
            return f"sha256:{file_sha256(path)}"
        files = [path]
        base = path.parent
    elif path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file())
        if sum(p.stat().st_size for p in files) <= FULL_HASH_MAX_BYTES:
            return f"sha256:{folder_sha256(path)}"
        base = path
    else:
        return "missing"
    digest = hashlib.sha256()
    for file in files:
        stat = file.stat()
        digest.update(f"{file.relative_to(base)}|{stat.st_size}|{stat.st_mtime_ns}\n".encode())
    return f"stat:{digest.hexdigest()}"


def record_materialization(
    context,
    *,
    asset: str,
    data_version: str,
    row_count: int | None,
    started_at: datetime,
    partition: str | None = None,
    upstream: Sequence[tuple[str, str | None, str | None]] = (),
    input_paths: Sequence[Path | str] = (),
    mlflow_run_id: str | None = None,
    model_version: str | None = None,
    status: str = "success",
) -> None:
    """Write one lineage row for the asset partition just materialized.

    Parameters
    ----------
    context : AssetExecutionContext or OpExecutionContext
        Supplies the run id and the ``settings`` resource (database and storage root,
        :func:`run_settings`); the row, and any partition file left out of the views,
        are logged to ``context.log``.
    asset : str
        The asset key (single component).
    data_version : str
        Content version of what was written (e.g. a hash of the partition folder).
    row_count : int or None
        Rows (galaxies, PSFs, ...) written.
    started_at : datetime
        When the asset body started (UTC or naive UTC).
    partition : str or None
        The partition key (None if unpartitioned).
    upstream : sequence of (asset, partition, data_version)
        The exact input partitions read (none for an asset without inputs in the store).
    input_paths : sequence of Path
        Input files or folders; each is fingerprinted (:func:`input_fingerprint`).
    mlflow_run_id, model_version : str, optional
        MLflow run and registered model version involved.
    status : str
        ``success`` or ``failure``.
    """
    hashes = {str(Path(p)): input_fingerprint(p) for p in input_paths}
    settings = run_settings(context)
    lineage_id = record_lineage(
        settings.database,
        LineageRow(
            asset=asset,
            partition=partition,
            data_version=data_version,
            run_id=context.run_id,
            code_version=code_version(),
            upstream=list(upstream),
            input_hashes=hashes,
            mlflow_run_id=mlflow_run_id,
            model_version=model_version,
            row_count=row_count,
            started_at=started_at,
            finished_at=datetime.now(UTC),
            status=status,
        ),
        storage_root=settings.storage_root,
        log=context.log.warning,
    )
    context.log.info(
        f"lineage {lineage_id}: {asset}[{partition or 'all'}] {status} "
        f"data_version={data_version} upstream={len(upstream)} inputs={len(hashes)}"
    )


def failed_run_rows(
    run_id: str,
    asset_keys: Sequence[str],
    partition: str | None,
    started_at: datetime | None,
    db_path: Path | str | None = None,
) -> list[LineageRow]:
    """Failure rows for the assets of a failed run that recorded no success in it."""
    db_path = Path(db_path or database_path())
    succeeded: set[str] = set()
    if db_path.exists():
        rows = query(
            db_path,
            "SELECT DISTINCT asset FROM lineage WHERE run_id = ? AND status = 'success'",
            [run_id],
        )
        succeeded = {r["asset"] for r in rows}
    return [
        LineageRow(
            asset=key,
            partition=partition,
            data_version=None,
            run_id=run_id,
            code_version=code_version(),
            started_at=started_at,
            finished_at=datetime.now(UTC),
            status="failure",
        )
        for key in sorted(set(asset_keys) - succeeded)
    ]


@run_failure_sensor(
    name="lineage_failure_sensor",
    minimum_interval_seconds=30,
    default_status=DefaultSensorStatus.RUNNING,
)
def lineage_failure_sensor(context: RunFailureSensorContext) -> None:
    """Record ``status='failure'`` lineage rows for every asset of a failed run.

    The rows go to the database of the run's own settings (:func:`launched_settings`).
    """
    run = context.dagster_run
    if run.asset_selection:
        keys = [key.to_user_string() for key in run.asset_selection]
    else:
        keys = sorted(
            {e.step_key for e in context.get_step_failure_events() if e.step_key is not None}
        )
    record = context.instance.get_run_record_by_id(run.run_id)
    started = (
        datetime.fromtimestamp(record.start_time, UTC) if record and record.start_time else None
    )
    db_path = launched_settings(run.run_config).database
    for row in failed_run_rows(
        run.run_id, keys, run.tags.get("dagster/partition"), started, db_path=db_path
    ):
        record_lineage(db_path, row)
