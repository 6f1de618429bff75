"""What every GaMPEN asset shares: owners, retry policy, versions and metadata helpers.

No science here: only the glue that turns a ``gampen_ml`` result into Dagster metadata,
data versions and a lineage row.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

from dagster import (
    AssetExecutionContext,
    AssetKey,
    AssetRecordsFilter,
    Backoff,
    Failure,
    MetadataValue,
    RetryPolicy,
)

from gampen_assets.lineage import input_fingerprint
from gampen_ml.config import ConfigError
from gampen_ml.io import folder_sha256
from gampen_ml.store import Store

OWNERS = ["team:gampen"]

#: Transient failures (MLflow's SQLite store busy, DuckDB's writer lock, a flaky disk) get
#: three more tries; bad configuration and bad input files are raised through
#: :func:`fail_fast_on_bad_input` as ``Failure(allow_retries=False)`` and never retried.
TRANSIENT_RETRY = RetryPolicy(max_retries=3, delay=5, backoff=Backoff.EXPONENTIAL)

DATA_VERSION_TAG = "dagster/data_version"


@contextlib.contextmanager
def fail_fast_on_bad_input() -> Iterator[None]:
    """Turn configuration and input-file errors into a non-retried Dagster ``Failure``.

    ``ConfigError`` (a bad profile setting), ``gampen_ml.sim.errors.InputFileError`` (a bad
    FITS file), ``FileNotFoundError`` and ``gampen_ml.io.StorageError`` (an upstream not
    materialized, or a stored file unreadable) cannot succeed on a retry, so the
    :data:`TRANSIENT_RETRY` policy must not spend minutes on them.
    """
    from gampen_ml.io import StorageError
    from gampen_ml.sim.errors import InputFileError

    # A missing upstream file does not appear by waiting seconds either.
    bad_input = (ConfigError, InputFileError, FileNotFoundError, StorageError)
    try:
        yield
    except bad_input as exc:
        raise Failure(description=f"{type(exc).__name__}: {exc}", allow_retries=False) from exc


def upstream_version(
    context: AssetExecutionContext, root: Store | Path, asset: str, partition: str | None = None
) -> tuple[str, str | None, str]:
    """Identify one upstream partition for lineage: ``(asset, partition, data_version)``.

    The data version is the one Dagster recorded at that partition's latest
    materialization; when there is none (files written outside Dagster, e.g. by the
    ``gampen`` CLI) it is the fingerprint of the partition folder
    (:func:`gampen_assets.lineage.input_fingerprint`).
    """
    records = context.instance.fetch_materializations(
        AssetRecordsFilter(
            asset_key=AssetKey(asset), asset_partitions=[partition] if partition else None
        ),
        limit=1,
    ).records
    version = None
    if records:
        materialization = records[0].asset_materialization
        if materialization is not None:
            version = (materialization.tags or {}).get(DATA_VERSION_TAG)
    if version is None:
        version = input_fingerprint(Store.of(root).partition(asset, partition))
    return (asset, partition, version)


def folder_version(folder: Path) -> str:
    """Data version of a written partition: SHA-256 over its files, first 16 hex digits."""
    return folder_sha256(folder)[:16]


def md_table(rows: Sequence[Mapping[str, object]], float_format: str = "{:.4g}") -> MetadataValue:
    """A list of dicts (same keys) as a Markdown table for the Dagster UI."""
    if not rows:
        return MetadataValue.md("_(empty)_")
    columns = list(rows[0])

    def cell(value: object) -> str:
        if isinstance(value, float):
            return float_format.format(value)
        return str(value)

    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    lines += ["| " + " | ".join(cell(row[c]) for c in columns) + " |" for row in rows]
    return MetadataValue.md("\n".join(lines))


def level_suffix(level: float) -> str:
    """Metadata key suffix of a credible level: ``0.6827 -> "68"``, ``0.9973 -> "99"``."""
    from gampen_ml.posterior import level_tag

    return level_tag(level).removeprefix("hpd")
