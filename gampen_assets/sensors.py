"""The inbox sensor: new batches of real cutouts become ``datasets`` partitions.

Inbox layout (default ``$DAGSTER_HOME/inbox``, override ``$GAMPEN_INBOX``)::

    inbox/
      hsc-2024-05-01/          a batch: a folder of FITS cutouts (sub-folders allowed)
        a.fits  b.fits.gz ...
        _READY                 marker: the upload is complete
      cube7.fits               a batch: one FITS cube (one cutout per plane) ...
      cube7.fits._READY        ... and its marker

A batch is *complete* when its marker exists, or when nothing in it has been modified
for ``$GAMPEN_INBOX_SETTLE_S`` seconds (default 300; 0 disables the settle rule). Names
starting with ``.`` or ``_`` are ignored (upload to ``.name`` and rename for atomicity);
symbolic links in the inbox are never followed.

For each complete batch the sensor validates every file (``gampen_ml.fits_input``),
moves rejected files with a ``<name>.reason.txt`` into ``$DAGSTER_HOME/quarantine/<key>/``,
copies the accepted ones into ``<storage root>/inbox_batches/<key>/`` (atomically, with a
``_manifest.json`` of the counts), removes the batch from the inbox, registers ``<key>``
as a ``datasets`` partition and requests one run of the catalog assets for it. ``<key>``
is the sanitised batch name, suffixed ``-2``, ``-3``... when already taken, so a batch
name reused later becomes a new partition. The cursor records the keys already
requested, so every batch is processed once.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from dataclasses import dataclass
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
from gampen_ml.config import ImagingConfig, default_storage_root, get_profile
from gampen_ml.fits_input import (
    FITS_SUFFIXES,
    RESERVED_PREFIXES,
    is_fits_name,
    quarantine,
    validate_cutouts,
)
from gampen_ml.io import atomic_partition_dir

INBOX_ENV_VAR = "GAMPEN_INBOX"
SETTLE_ENV_VAR = "GAMPEN_INBOX_SETTLE_S"
DEFAULT_SETTLE_S = 300.0
READY_MARKER = "_READY"
#: Storage-root folder holding the accepted files of each batch, one sub-folder per key.
STORED_BATCHES = "inbox_batches"
MANIFEST = "_manifest.json"
#: Assets materialized for a new dataset partition (also used by the reprocess schedule).
CATALOG_ASSETS = ("posterior_catalog", "qualitative_flags", "diagnostic_plots")
#: Stop starting new batches after this much of a tick (Dagster times ticks out at 60 s).
TICK_BUDGET_S = 30.0
MAX_KEY_LENGTH = 64


def dagster_home() -> Path:
    """``$DAGSTER_HOME``, else ``./dagster_home``."""
    home = os.environ.get("DAGSTER_HOME")
    return Path(home).resolve() if home else (Path.cwd() / "dagster_home").resolve()


def inbox_dir() -> Path:
    """``$GAMPEN_INBOX``, else ``$DAGSTER_HOME/inbox``."""
    if os.environ.get(INBOX_ENV_VAR):
        return Path(os.environ[INBOX_ENV_VAR]).resolve()
    return dagster_home() / "inbox"


def quarantine_dir() -> Path:
    """``$DAGSTER_HOME/quarantine``."""
    return dagster_home() / "quarantine"


def settle_seconds() -> float:
    """``$GAMPEN_INBOX_SETTLE_S`` (default 300 s); 0 means: only the marker counts."""
    return float(os.environ.get(SETTLE_ENV_VAR, DEFAULT_SETTLE_S))


def sanitize_batch_name(raw: str) -> str:
    """A safe partition key from an inbox entry name.

    FITS suffixes are dropped, every run of characters outside ``[A-Za-z0-9._-]`` becomes
    ``-``, leading/trailing ``.``, ``-``, ``_`` are stripped (so ``..`` cannot survive),
    and the result is cut to 64 characters; an empty result becomes ``batch``.
    """
    name = raw
    for suffix in sorted(FITS_SUFFIXES, key=len, reverse=True):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
            break
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", name).strip(".-_")[:MAX_KEY_LENGTH].strip(".-_")
    name = re.sub(r"\.{2,}", ".", name)
    return name or "batch"


def unique_key(name: str, taken: set[str]) -> str:
    """``name``, or ``name-2``, ``name-3``... whichever is not in ``taken``."""
    if name not in taken:
        return name
    index = 2
    while f"{name}-{index}" in taken:
        index += 1
    return f"{name}-{index}"


@dataclass(frozen=True)
class InboxBatch:
    """A complete batch waiting in the inbox."""

    path: Path
    name: str
    marker: Path | None


def _newest_mtime(path: Path) -> float:
    newest = path.lstat().st_mtime
    if path.is_dir() and not path.is_symlink():
        for dirpath, dirnames, filenames in os.walk(path, followlinks=False):
            for name in dirnames + filenames:
                newest = max(newest, (Path(dirpath) / name).lstat().st_mtime)
    return newest


def ready_batches(inbox: Path, settle_s: float, now: float | None = None) -> list[InboxBatch]:
    """Complete batches in ``inbox`` (sorted by name); half-copied ones are left alone."""
    now = time.time() if now is None else now
    if not inbox.is_dir():
        return []
    batches = []
    for entry in sorted(inbox.iterdir()):
        if entry.name.startswith(RESERVED_PREFIXES) or entry.is_symlink():
            continue
        if entry.is_dir():
            marker = entry / READY_MARKER
        elif entry.is_file() and is_fits_name(entry.name):
            marker = entry.with_name(entry.name + "." + READY_MARKER)
        else:
            continue
        if marker.is_file():
            batches.append(InboxBatch(entry, entry.name, marker))
        elif settle_s > 0 and now - _newest_mtime(entry) >= settle_s:
            if entry.is_dir() and not any(entry.iterdir()):
                continue
            batches.append(InboxBatch(entry, entry.name, None))
    return batches


@dataclass(frozen=True)
class IngestResult:
    """What happened to one batch."""

    key: str
    n_files_in: int
    n_files_accepted: int
    n_files_quarantined: int
    n_cutouts: int
    stored_dir: Path | None


def ingest_batch(
    batch: InboxBatch,
    key: str,
    imaging: ImagingConfig,
    storage_root: Path,
    quarantine_root: Path,
) -> IngestResult:
    """Validate, quarantine, store and remove one inbox batch (no Dagster involved).

    Accepted files are *copied* into an atomic partition folder first, bad files are
    then moved to quarantine, and only then is the inbox entry removed, so a crash never
    loses a file.
    """
    scan = validate_cutouts(batch.path, imaging)
    stored = None
    if scan.accepted_files:
        stored = storage_root / STORED_BATCHES / key
        with atomic_partition_dir(stored) as tmp:
            for relative in scan.accepted_files:
                target = tmp / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(scan.root / relative, target)
            (tmp / MANIFEST).write_text(
                json.dumps(
                    {
                        "batch": key,
                        "inbox_name": batch.name,
                        "files_in": scan.n_files_in,
                        "files_accepted": scan.accepted_files,
                        "files_quarantined": {r.file: r.reason for r in scan.rejections},
                        "cutouts": scan.table.height,
                    },
                    indent=2,
                )
            )
    quarantined = quarantine(scan.rejections, scan.root, quarantine_root, batch_name=key)
    if batch.path.is_dir():
        shutil.rmtree(batch.path)
    else:
        batch.path.unlink()
    if batch.marker is not None:
        batch.marker.unlink(missing_ok=True)
    return IngestResult(
        key=key,
        n_files_in=scan.n_files_in,
        n_files_accepted=len(scan.accepted_files),
        n_files_quarantined=len(quarantined),
        n_cutouts=scan.table.height,
        stored_dir=stored,
    )


def _catalog_run(key: str) -> RunRequest:
    return RunRequest(
        run_key=f"inbox-{key}",
        partition_key=key,
        asset_selection=[AssetKey(a) for a in CATALOG_ASSETS],
        tags={"gampen/source": "inbox", "gampen/batch": key},
    )


@sensor(
    name="inbox_sensor",
    target=AssetSelection.assets(*CATALOG_ASSETS),
    minimum_interval_seconds=30,
    # On by default: with the daemon running, a dropped batch is catalogued without a human.
    default_status=DefaultSensorStatus.RUNNING,
    description="Validates new FITS batches in the inbox, quarantines bad files, registers "
    "a datasets partition and requests its posterior catalog, flags and plots.",
)
def inbox_sensor(context: SensorEvaluationContext) -> SensorResult:
    """Turn each complete inbox batch into a ``datasets`` partition and a catalog run."""
    emitted: set[str] = set(json.loads(context.cursor)["emitted"]) if context.cursor else set()
    registered = set(context.instance.get_dynamic_partitions(datasets.name))
    storage_root = default_storage_root()
    stored_root = storage_root / STORED_BATCHES
    stored = (
        {p.name for p in stored_root.iterdir() if p.is_dir() and not p.name.startswith(".")}
        if stored_root.is_dir()
        else set()
    )
    # Quarantine folders too: an all-bad batch is never stored, and a later batch of the
    # same name must not overwrite its quarantined files.
    quarantined = (
        {p.name for p in quarantine_dir().iterdir() if p.is_dir()}
        if quarantine_dir().is_dir()
        else set()
    )
    taken = emitted | registered | stored | quarantined | {SIM_TEST}
    imaging = get_profile().imaging
    started = time.monotonic()
    new_keys: list[str] = []
    for batch in ready_batches(inbox_dir(), settle_seconds()):
        if time.monotonic() - started > TICK_BUDGET_S:
            context.log.info("tick budget spent; remaining batches wait for the next tick")
            break
        key = unique_key(sanitize_batch_name(batch.name), taken)
        taken.add(key)
        result = ingest_batch(batch, key, imaging, storage_root, quarantine_dir())
        context.log.info(
            f"inbox batch {batch.name!r} -> {key!r}: {result.n_files_in} files in, "
            f"{result.n_files_accepted} accepted ({result.n_cutouts} cutouts), "
            f"{result.n_files_quarantined} quarantined"
        )
        if result.stored_dir is not None:
            new_keys.append(key)
            stored.add(key)
    # Self-healing: a stored batch never requested (a tick that crashed after storing).
    for key in sorted(stored - emitted - registered - set(new_keys)):
        new_keys.append(key)
    to_register = [k for k in new_keys if k not in registered]
    if SIM_TEST not in registered:
        to_register.append(SIM_TEST)
    cursor = json.dumps({"emitted": sorted(emitted | set(new_keys))})
    return SensorResult(
        run_requests=[_catalog_run(k) for k in new_keys],
        dynamic_partitions_requests=[datasets.build_add_request(to_register)]
        if to_register
        else None,
        cursor=cursor,
        skip_reason=None if new_keys else "no complete new batch in the inbox",
    )
