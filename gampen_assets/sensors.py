"""The inbox sensor: complete batches in the inbox become ``datasets`` partitions.

The inbox, its layout and its guarantees are described in :mod:`gampen_ml.inbox`. Each
tick only *claims* (:func:`gampen_ml.inbox.claim_batch`: one rename per batch, no pixel
read, well under a second): every complete batch gets a key — its sanitised name,
suffixed ``-2``, ``-3``... when already taken — moves into ``<inbox>/_processing/<key>/``,
is registered as a ``datasets`` partition and gets one run of the catalog assets, whose
first step ingests it (validation, storage, quarantine: :func:`gampen_ml.inbox.ingest_claimed`).
The cursor records the keys requested (each batch is requested once) and the batches
that could not be claimed (reported once, retried when they change). A claimed or stored
batch never requested (a tick interrupted after its rename) is requested by the next tick.
A batch that declares a domain in its ``batch.toml`` gets the run tag ``gampen/domain``
(the name as written; the catalog run checks it against the declared domains).
"""

from __future__ import annotations

import json
from pathlib import Path

from dagster import (
    AssetKey,
    AssetSelection,
    DefaultSensorStatus,
    RunRequest,
    SensorEvaluationContext,
    SensorResult,
    sensor,
)

from gampen_assets.partitions import SIM_TEST, datasets
from gampen_ml import store
from gampen_ml.fits_input import display_name
from gampen_ml.inbox import (
    MANIFEST,
    PROCESSING,
    STORED_BATCHES,
    BatchFileError,
    claim_batch,
    claimed_keys,
    read_batch_file,
    ready_batches,
    sanitize_batch_name,
    unique_key,
)
from gampen_ml.settings import Settings

__all__ = [
    "CATALOG_ASSETS",
    "MANIFEST",
    "PROCESSING",
    "STORED_BATCHES",
    "inbox_sensor",
    "sanitize_batch_name",
    "unique_key",
]

#: Assets materialized for a new dataset partition (also used by the reprocess schedule).
CATALOG_ASSETS = (store.POSTERIOR_CATALOG, store.QUALITATIVE_FLAGS, store.DIAGNOSTIC_PLOTS)


def _catalog_run(key: str, inbox_name: str | None = None, domain: str | None = None) -> RunRequest:
    tags = {"gampen/source": "inbox", "gampen/batch": key}
    if inbox_name is not None:
        tags["gampen/inbox_name"] = display_name(inbox_name)[:200]
    if domain is not None:
        tags["gampen/domain"] = domain[:63]
    return RunRequest(
        run_key=f"inbox-{key}",
        partition_key=key,
        asset_selection=[AssetKey(a) for a in CATALOG_ASSETS],
        tags=tags,
    )


def _folder_names(folder: Path) -> set[str]:
    if not folder.is_dir():
        return set()
    return {p.name for p in folder.iterdir() if p.is_dir() and not p.name.startswith(".")}


@sensor(
    name="inbox_sensor",
    target=AssetSelection.assets(*CATALOG_ASSETS),
    minimum_interval_seconds=30,
    # On by default: with the daemon running, a dropped batch is catalogued without a human.
    default_status=DefaultSensorStatus.RUNNING,
    description="Claims complete FITS batches in the inbox, registers a datasets partition "
    "per batch and requests its ingestion (validation, storage, quarantine), posterior "
    "catalog, flags and plots.",
)
def inbox_sensor(context: SensorEvaluationContext) -> SensorResult:
    """Claim each complete inbox batch; register its partition and request its catalog run."""
    state = json.loads(context.cursor) if context.cursor else {}
    emitted: set[str] = set(state.get("emitted", []))
    # name -> newest mtime of a batch that could not be claimed (reported once per change).
    unclaimable: dict[str, float] = state.get("unclaimable", {})
    registered = set(context.instance.get_dynamic_partitions(datasets.name))
    # Sensors run in the daemon, outside any run: the daemon's environment decides.
    settings = Settings.resolve()
    inbox = settings.inbox
    stored = set(settings.store().partition_keys(STORED_BATCHES))
    claimed = set(claimed_keys(inbox))
    # Quarantine folders too: an all-bad batch is never stored, and a later batch of the
    # same name must not overwrite its quarantined files.
    taken = emitted | registered | stored | claimed | _folder_names(settings.quarantine)
    taken.add(SIM_TEST)
    requests: list[RunRequest] = []
    still_unclaimable: dict[str, float] = {}
    for batch in ready_batches(inbox, settings.inbox_settle_s):
        key = unique_key(sanitize_batch_name(batch.name), taken)
        try:
            claimed_dir = claim_batch(batch, key, inbox)
        except OSError as exc:
            mtime = batch.path.lstat().st_mtime
            if unclaimable.get(batch.name) != mtime:
                context.log.error(
                    f"inbox batch {display_name(batch.name)!r} cannot be claimed and stays in "
                    f"the inbox ({exc}); fix its permissions or move it"
                )
            still_unclaimable[batch.name] = mtime
            continue
        taken.add(key)
        try:
            domain = read_batch_file(claimed_dir)
        except BatchFileError:
            domain = None  # the catalog run quarantines the batch with the reason
        where = f" (domain {domain})" if domain else ""
        context.log.info(f"inbox batch {display_name(batch.name)!r} claimed as {key!r}{where}")
        requests.append(_catalog_run(key, batch.name, domain))
    # Self-healing: a claimed or stored batch never requested (a tick interrupted after
    # its rename, or before the run request was recorded).
    requested = {r.partition_key for r in requests}
    for key in sorted((claimed | stored) - emitted - registered - requested):
        requests.append(_catalog_run(key))
    new_keys = [r.partition_key for r in requests]
    to_register = [k for k in new_keys if k not in registered]
    if SIM_TEST not in registered:
        to_register.append(SIM_TEST)
    cursor = json.dumps(
        {"emitted": sorted(emitted | set(new_keys)), "unclaimable": still_unclaimable}
    )
    return SensorResult(
        run_requests=requests,
        dynamic_partitions_requests=[datasets.build_add_request(to_register)]
        if to_register
        else None,
        cursor=cursor,
        skip_reason=None if requests else "no complete new batch in the inbox",
    )
