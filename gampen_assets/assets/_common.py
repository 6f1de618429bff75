"""What every GaMPEN asset and check shares: owners, retry policy, fail-fast errors, lineage.

No science here: only the glue that declares an asset, runs its body and records the lineage
row of what it wrote. The metadata an asset reports is built with
:mod:`gampen_assets.assets._metadata`.
"""

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Self

from dagster import (
    AssetCheckExecutionContext,
    AssetCheckResult,
    AssetChecksDefinition,
    AssetExecutionContext,
    AssetKey,
    AssetRecordsFilter,
    AssetsDefinition,
    Backoff,
    DataVersion,
    Failure,
    MaterializeResult,
    RetryPolicy,
    asset,
    asset_check,
)

from gampen_assets import lineage
from gampen_assets.lineage import input_fingerprint
from gampen_assets.resources import GampenSettings
from gampen_ml.config import ConfigError
from gampen_ml.store import Store

OWNERS = ["team:gampen"]

#: Transient failures (MLflow's SQLite store busy, DuckDB's writer lock, a flaky disk) get
#: three more tries; bad configuration and bad input files are raised through
#: :func:`fail_fast_on_bad_input` as ``Failure(allow_retries=False)`` and never retried.
TRANSIENT_RETRY = RetryPolicy(max_retries=3, delay=5, backoff=Backoff.EXPONENTIAL)

DATA_VERSION_TAG = "dagster/data_version"


def gampen_asset(group_name: str, **asset_kwargs: Any) -> Callable[[Callable], AssetsDefinition]:
    """``@asset`` in group ``group_name`` with what every GaMPEN asset shares.

    The team owns it and :data:`TRANSIENT_RETRY` retries it; ``asset_kwargs`` (code
    version, kinds, partitions, deps, pool, description ...) go to ``dagster.asset``.
    """
    return asset(group_name=group_name, owners=OWNERS, retry_policy=TRANSIENT_RETRY, **asset_kwargs)


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


@dataclass(frozen=True)
class AssetRun:
    """One run of an asset body: where it reads and writes, and when it started.

    An asset body begins with :meth:`start` and ends with :meth:`result`, which writes the
    lineage row of what it wrote (:func:`gampen_assets.lineage.record_materialization`)
    and returns Dagster's result with the same data version.
    """

    context: AssetExecutionContext
    store: Store
    started_at: datetime

    @classmethod
    def start(cls, context: AssetExecutionContext, settings: GampenSettings) -> Self:
        """The run of ``context``, started now, over the store of ``settings``."""
        started_at = datetime.now(UTC)
        return cls(context, settings.store(), started_at)

    def upstream(self, asset: str, partition: str | None = None) -> tuple[str, str | None, str]:
        """``(asset, partition, data_version)`` of an input read (:func:`upstream_version`)."""
        return upstream_version(self.context, self.store, asset, partition)

    def result(
        self, asset: str, data_version: str, metadata: Mapping[str, Any], **lineage_row: Any
    ) -> MaterializeResult:
        """Record the lineage row of ``asset`` and return its Dagster result at ``data_version``.

        ``lineage_row``: the other arguments of
        :func:`gampen_assets.lineage.record_materialization` (``partition``, ``upstream``,
        ``input_paths``, ``row_count`` ...); ``metadata`` goes to the result only.
        """
        lineage.record_materialization(
            self.context,
            asset=asset,
            data_version=data_version,
            started_at=self.started_at,
            **lineage_row,
        )
        return MaterializeResult(metadata=metadata, data_version=DataVersion(data_version))


def partition_check(
    body: Callable[[GampenSettings, str], AssetCheckResult],
    *,
    name: str,
    asset: AssetsDefinition,
    description: str,
    blocking: bool = False,
) -> AssetChecksDefinition:
    """The check ``name`` of each partition of ``asset``: ``body(settings, partition_key)``.

    The body takes the partition key explicitly so that it also runs on the files alone,
    without Dagster (Dagster 1.13 cannot execute a partitioned check without its asset).
    """

    @asset_check(
        name=name,
        asset=asset,
        blocking=blocking,
        partitions_def=asset.partitions_def,
        description=description,
    )
    def check(context: AssetCheckExecutionContext, settings: GampenSettings) -> AssetCheckResult:
        return body(settings, context.partition_key)

    return check
