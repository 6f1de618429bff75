"""The reprocessing schedule: rebuild only the catalogs whose model or inputs changed.

Cadence: ``$GAMPEN_REPROCESS_CRON`` (read when the definitions load), default nightly
``0 3 * * *`` UTC. On each tick, every ``posterior_catalog`` partition that is still a
registered ``datasets`` partition and has a successful build in the lineage table is
compared with the present state (:func:`stale_catalog_partitions`); a run of the catalog
assets (catalog, flags, plots) is requested for each stale one, and nothing else.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from dagster import (
    AssetKey,
    AssetSelection,
    DagsterRunStatus,
    DefaultScheduleStatus,
    RunRequest,
    RunsFilter,
    ScheduleEvaluationContext,
    SkipReason,
    schedule,
)

from gampen_assets.lineage import database_path, input_fingerprint
from gampen_assets.partitions import datasets
from gampen_assets.sensors import CATALOG_ASSETS
from gampen_ml import store
from gampen_ml.database import query

REPROCESS_CRON_ENV_VAR = "GAMPEN_REPROCESS_CRON"
DEFAULT_REPROCESS_CRON = "0 3 * * *"
#: Asset whose lineage rows carry the champion model version.
CHAMPION_ASSET = store.CALIBRATED_DROPOUT_RATE
CATALOG_ASSET = store.POSTERIOR_CATALOG

_CHAMPION_SQL = """
SELECT model_version FROM lineage
WHERE asset = ? AND status = 'success' AND model_version IS NOT NULL
ORDER BY finished_at DESC, lineage_id LIMIT 1
"""
_LAST_CATALOGS_SQL = """
SELECT lineage_id, partition, model_version, data_version, input_hashes FROM lineage
WHERE asset = ? AND status = 'success'
QUALIFY row_number() OVER (PARTITION BY partition ORDER BY finished_at DESC, lineage_id) = 1
"""
# For each upstream the catalog read: the newest successful data version of that
# upstream partition, when it differs from the one the catalog was built from.
_CHANGED_UPSTREAM_SQL = """
WITH last_catalog AS (
    SELECT lineage_id, partition FROM lineage
    WHERE asset = ? AND status = 'success'
    QUALIFY row_number() OVER (PARTITION BY partition ORDER BY finished_at DESC, lineage_id) = 1
), newest AS (
    SELECT asset, partition, data_version FROM lineage WHERE status = 'success'
    QUALIFY row_number() OVER (
        PARTITION BY asset, partition ORDER BY finished_at DESC, lineage_id) = 1
)
SELECT c.partition AS catalog_partition, u.upstream_asset, u.upstream_partition,
       u.upstream_data_version AS used_version, n.data_version AS newest_version
FROM last_catalog c
JOIN lineage_upstream u ON u.lineage_id = c.lineage_id
JOIN newest n ON n.asset = u.upstream_asset AND n.partition = u.upstream_partition
WHERE n.data_version IS DISTINCT FROM u.upstream_data_version
ORDER BY 1, 2, 3
"""


def reprocess_cron() -> str:
    """``$GAMPEN_REPROCESS_CRON``, else nightly at 03:00 UTC."""
    return os.environ.get(REPROCESS_CRON_ENV_VAR) or DEFAULT_REPROCESS_CRON


@dataclass(frozen=True)
class StaleCatalog:
    """A catalog partition to rebuild, with why."""

    partition: str
    reasons: tuple[str, ...]
    champion_version: str

    @property
    def fingerprint(self) -> str:
        """Short hash of the reasons (a stable run key for the same staleness)."""
        text = "|".join((self.partition, self.champion_version, *self.reasons))
        return hashlib.sha256(text.encode()).hexdigest()[:12]


def stale_catalog_partitions(
    db_path: Path | str,
    partitions: Iterable[str] | None = None,
    check_input_files: bool = True,
) -> list[StaleCatalog]:
    """Catalog partitions whose last successful build is out of date.

    A partition is stale when (a) the model version of its last successful
    ``posterior_catalog`` build differs from the champion (the newest successful
    ``calibrated_dropout_rate`` row's ``model_version``); (b) an upstream partition it
    read has a newer successful build with another data version; or (c, with
    ``check_input_files``) an input file it hashed now has a different fingerprint
    (a vanished input is not a reason: a rerun could not read it either).

    Parameters
    ----------
    db_path : Path or str
        The lineage database.
    partitions : iterable of str, optional
        Only consider these partitions (the registered ones); default all.
    check_input_files : bool
        Re-fingerprint recorded input files (cheap: large files use a stat fingerprint).

    Returns
    -------
    list[StaleCatalog]
        Sorted by partition; empty when no champion is recorded yet.
    """
    champion_rows = query(db_path, _CHAMPION_SQL, [CHAMPION_ASSET])
    if not champion_rows:
        return []
    champion = str(champion_rows[0]["model_version"])
    wanted = None if partitions is None else set(partitions)
    reasons: dict[str, list[str]] = {}
    for row in query(db_path, _LAST_CATALOGS_SQL, [CATALOG_ASSET]):
        partition = row["partition"]
        if wanted is not None and partition not in wanted:
            continue
        found = reasons.setdefault(partition, [])
        if row["model_version"] is None or str(row["model_version"]) != champion:
            found.append(f"model version {row['model_version']} -> champion {champion}")
        if check_input_files and row["input_hashes"]:
            for path, recorded in sorted(json.loads(row["input_hashes"]).items()):
                current = input_fingerprint(path)
                if current != "missing" and current != recorded:
                    found.append(f"input {path} changed")
    for row in query(db_path, _CHANGED_UPSTREAM_SQL, [CATALOG_ASSET]):
        if row["catalog_partition"] in reasons:
            reasons[row["catalog_partition"]].append(
                f"upstream {row['upstream_asset']}[{row['upstream_partition']}] data version "
                f"{row['used_version']} -> {row['newest_version']}"
            )
    return [StaleCatalog(p, tuple(r), champion) for p, r in sorted(reasons.items()) if r]


_ACTIVE = [
    DagsterRunStatus.QUEUED,
    DagsterRunStatus.NOT_STARTED,
    DagsterRunStatus.STARTING,
    DagsterRunStatus.STARTED,
]


@schedule(
    cron_schedule=reprocess_cron(),
    name="reprocess_schedule",
    target=AssetSelection.assets(*CATALOG_ASSETS),
    execution_timezone="UTC",
    # On by default: it only ever requests catalogs that are stale, so it is safe to run.
    default_status=DefaultScheduleStatus.RUNNING,
    description="Rebuilds the posterior catalogs (with flags and plots) whose champion "
    "model or input data changed since they were built, according to the lineage table.",
)
def reprocess_schedule(context: ScheduleEvaluationContext):
    """Request a catalog run for every stale, registered, not already running dataset."""
    db_path = database_path()
    if not db_path.exists():
        return SkipReason(f"no lineage database at {db_path} yet")
    registered = context.instance.get_dynamic_partitions(datasets.name)
    requests = []
    for stale in stale_catalog_partitions(db_path, registered):
        active = context.instance.get_runs(
            filters=RunsFilter(statuses=_ACTIVE, tags={"dagster/partition": stale.partition}),
            limit=1,
        )
        if active:
            context.log.info(f"{stale.partition}: stale but a run is in progress; skipped")
            continue
        requests.append(
            RunRequest(
                run_key=f"reprocess-{stale.partition}-{stale.fingerprint}",
                partition_key=stale.partition,
                asset_selection=[AssetKey(a) for a in CATALOG_ASSETS],
                tags={
                    "gampen/source": "reprocess",
                    "gampen/reprocess_reason": "; ".join(stale.reasons)[:250],
                },
            )
        )
    return requests or SkipReason("every catalog is up to date with the champion and inputs")
