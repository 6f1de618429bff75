"""The inbox: survey cutouts enter the platform exactly once per file, crash or not.

Layout (the inbox folder is ``$GAMPEN_INBOX``, else ``$DAGSTER_HOME/inbox``)::

    inbox/
      hsc-2024-05-01/          a batch: a folder of FITS cutouts (sub-folders allowed)
        a.fits  b.fits.gz ...
        _READY                 marker: the upload is complete
      decals-0591m305/         a batch of another survey's files ...
        cutout_59.1_-30.5.fits psf_59.1_-30.5.fits ...
        batch.toml             ... declaring its domain: domain = "decals-r"
        _READY
      cube7.fits               a batch: one FITS cube (one cutout per plane) ...
      cube7.fits._READY        ... and its marker
      _processing/<key>/       claimed batches (written by the platform only)

A batch is *complete* when its marker exists, or when nothing in it has been modified for
the settle time. Top-level names starting with ``.`` or ``_`` are not batches (upload to
``.name`` and rename for atomicity); symbolic links in the inbox are never followed.

Two steps, each safe to interrupt at any point:

1. **Claim** (:func:`claim_batch`, in the sensor; no pixel is read): a complete batch gets
   a partition key and moves with one rename into ``_processing/<key>/``. A batch that
   cannot be renamed (permissions) stays where it is and is reported.
2. **Ingest** (:func:`ingest_claimed`, in the catalog run): every file of the claimed
   batch is validated (sizes from the headers first, :class:`~gampen_ml.config.InputLimits`);
   the accepted files are copied into ``<storage root>/inbox_batches/<key>/`` in one atomic
   step with a ``_manifest.json``; each rejected file is moved into ``quarantine/<key>/``
   with a ``<name>.reason.txt`` — a reserved name (``_*``, ``.*``, e.g. an upload still in
   progress) and a name that is not UTF-8 included; then the claimed copies are released.
   Run again after a crash anywhere, it finishes the job and produces the same partition.

So every file ends in exactly one place: stored, or quarantined with its reason. Files the
platform cannot remove from ``_processing/<key>/`` (immutable, permissions) stay there,
are logged by name, and are never ingested twice.

**Domains.** A folder batch may hold a ``batch.toml`` (:data:`BATCH_FILE`) at its top,
``domain = "<name>"``: its files are then read as that survey delivers them
(:class:`gampen_ml.domains.Domain`, declared in ``<dagster_home>/domains/<name>.toml``;
:mod:`gampen_ml.fits_input`), the sibling PSF files of its accepted cutouts are stored
with them, and ``_manifest.json`` records the domain, which the catalog run reads
(:func:`stored_batch_domain`) to pick the domain's fine-tuned model. A single-file batch
has no domain. A ``batch.toml`` that cannot be used (not TOML, an unknown key, a domain
that is not declared) quarantines the whole batch, each file with that reason, the
``batch.toml`` last; :attr:`IngestResult.problem` says what was wrong.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
import tomllib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from gampen_ml.config import ConfigError, Profile
from gampen_ml.domains import Domain, find_domain
from gampen_ml.fits_input import (
    BATCH_FILE,
    FITS_SUFFIXES,
    Rejection,
    batch_files,
    display_name,
    is_fits_name,
    is_reserved_name,
    quarantine,
    validate_cutouts,
)
from gampen_ml.sim.errors import InputFileError
from gampen_ml.store import BATCH_MANIFEST_FILE, INBOX_BATCHES, Store

READY_MARKER = "_READY"
#: Inbox sub-folder holding the claimed batches, one folder per partition key.
PROCESSING = "_processing"
#: Storage-root folder holding the accepted files of each batch, one sub-folder per key,
#: and the manifest in each (the names are the store's).
STORED_BATCHES = INBOX_BATCHES
MANIFEST = BATCH_MANIFEST_FILE
MAX_KEY_LENGTH = 64


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
        if is_reserved_name(entry.name) or entry.is_symlink():
            continue
        if entry.is_dir():
            marker = entry / READY_MARKER
        elif entry.is_file() and is_fits_name(entry.name):
            marker = entry.with_name(entry.name + "." + READY_MARKER)
        else:
            _remove_orphan_marker(entry)
            continue
        if marker.is_file():
            batches.append(InboxBatch(entry, entry.name, marker))
        elif settle_s > 0 and now - _newest_mtime(entry) >= settle_s:
            if entry.is_dir() and not any(entry.iterdir()):
                continue
            batches.append(InboxBatch(entry, entry.name, None))
    return batches


def _remove_orphan_marker(entry: Path) -> None:
    """Remove ``X._READY`` when ``X`` is gone (a claim interrupted between its renames).

    The marker must be written after its file, so a marker alone carries no data.
    """
    suffix = "." + READY_MARKER
    if entry.name.endswith(suffix) and entry.is_file() and not entry.is_symlink():
        data = entry.with_name(entry.name[: -len(suffix)])
        if not data.exists() and not data.is_symlink():
            entry.unlink(missing_ok=True)


def claimed_keys(inbox: Path) -> list[str]:
    """Keys of the claimed batches in ``_processing/``.

    An empty folder is what an interrupted claim of a single-file batch leaves (its file
    is still in the inbox): it is removed here.
    """
    processing = inbox / PROCESSING
    if not processing.is_dir():
        return []
    keys = []
    for entry in sorted(processing.iterdir()):
        if not entry.is_dir() or entry.is_symlink() or is_reserved_name(entry.name):
            continue
        try:
            entry.rmdir()  # only succeeds when empty
        except OSError:
            keys.append(entry.name)
    return keys


def claim_batch(batch: InboxBatch, key: str, inbox: Path) -> Path:
    """Move ``batch`` into ``<inbox>/_processing/<key>/``; return that folder.

    A folder batch moves with one rename (its marker inside). A single-file batch gets a
    folder: the file moves, then its marker, so an interruption leaves the file in the
    inbox (claimed again later; the empty folder is removed by :func:`claimed_keys`) or
    the file claimed and its marker orphaned (removed by :func:`ready_batches`).

    Raises
    ------
    OSError
        If the batch cannot be renamed (permissions, another filesystem); nothing moved.
    """
    processing = inbox / PROCESSING
    processing.mkdir(exist_ok=True)
    claimed = processing / key
    if batch.path.is_dir():
        os.rename(batch.path, claimed)
        return claimed
    claimed.mkdir()
    try:
        os.rename(batch.path, claimed / batch.name)
    except OSError:
        claimed.rmdir()
        raise
    if batch.marker is not None:
        os.rename(batch.marker, claimed / READY_MARKER)
    return claimed


@dataclass(frozen=True)
class IngestResult:
    """What happened to one claimed batch."""

    key: str
    n_files_in: int
    n_files_accepted: int
    n_files_quarantined: int
    n_cutouts: int
    stored_dir: Path | None
    #: Files of the claimed batch that could not be removed after ingestion (by name).
    left_behind: tuple[str, ...] = ()
    #: The batch's domain (``batch.toml``), None without one.
    domain: str | None = None
    #: Why the whole batch was quarantined without being read (an unusable ``batch.toml``).
    problem: str | None = None


class BatchFileError(InputFileError):
    """A batch's ``batch.toml`` cannot be used; the message names the file and the problem."""


def read_batch_file(folder: Path) -> str | None:
    """The domain name a batch folder declares in its ``batch.toml``; None without the file.

    The file holds one key, ``domain = "<name>"``.

    Raises
    ------
    BatchFileError
        When the file is not TOML, has another key, or the domain is not a string.
    """
    path = Path(folder) / BATCH_FILE
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise BatchFileError(path, "not a regular file")
    if not path.is_file():
        return None
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise BatchFileError(path, f"not a readable TOML file ({exc})") from exc
    unknown = sorted(set(data) - {"domain"})
    if unknown:
        raise BatchFileError(path, f"unknown key(s) {unknown}; the only key is domain")
    domain = data.get("domain")
    if domain is None:
        return None
    if not isinstance(domain, str):
        raise BatchFileError(path, f"domain must be a string, got {domain!r}")
    return domain


def batch_domain(folder: Path, domains: Path | None) -> Domain | None:
    """The :class:`Domain` a batch folder declares, looked up in the ``domains`` folder.

    Raises
    ------
    BatchFileError
        Naming the ``batch.toml`` and, for an undeclared domain, the declared ones.
    """
    name = read_batch_file(folder)
    if name is None:
        return None
    if domains is None:
        raise BatchFileError(Path(folder) / BATCH_FILE, f"domain {name!r}: no domains folder")
    try:
        return find_domain(domains, name)
    except ConfigError as exc:
        raise BatchFileError(Path(folder) / BATCH_FILE, str(exc)) from exc


def stored_batch_domain(
    storage_root: Store | Path, key: str, domains: Path | None
) -> Domain | None:
    """The domain recorded in the manifest of the stored batch ``key`` (None: none).

    Read again from the ``domains`` folder (:func:`gampen_ml.domains.find_domain`), so a
    catalog run reads the batch the way it was ingested.

    Raises
    ------
    InputFileError
        When the recorded domain is no longer declared (naming the manifest).
    """
    manifest_path = Store.of(storage_root).batch_manifest(key)
    if not manifest_path.is_file():
        return None
    name = json.loads(manifest_path.read_text()).get("domain")
    if name is None:
        return None
    if domains is None:
        raise InputFileError(manifest_path, f"its batch's domain {name!r}: no domains folder")
    try:
        return find_domain(domains, name)
    except ConfigError as exc:
        raise InputFileError(manifest_path, f"its batch's domain: {exc}") from exc


def ingest_claimed(
    claimed: Path,
    key: str,
    profile: Profile,
    storage_root: Store | Path,
    quarantine_root: Path,
    checkpoint: Callable[[str], None] | None = None,
    *,
    domains: Path | None = None,
) -> IngestResult:
    """Validate, store, quarantine and release one claimed batch; idempotent.

    ``domains`` is the folder of declared domains (:attr:`Settings.domains`) that a
    ``batch.toml`` names one of; without a ``batch.toml`` the batch is read with the
    profile's imaging.

    Steps, each safe to interrupt (``checkpoint`` is called after each, for fault tests):
    ``validated`` -> ``stored`` (atomic partition with its manifest; skipped when the
    partition exists, i.e. on a rerun) -> ``quarantined:<file>`` per rejected file ->
    ``released`` (the stored copies and the marker are removed from ``claimed``).
    """
    step = checkpoint or (lambda _: None)
    (claimed / READY_MARKER).unlink(missing_ok=True)
    stored = Store.of(storage_root).inbox_batch(key)
    try:
        # A rerun after the batch was stored reads it the way it was stored, even if its
        # batch.toml is gone already.
        domain = (
            stored_batch_domain(storage_root, key, domains)
            if (stored / MANIFEST).is_file()
            else batch_domain(claimed, domains)
        )
    except InputFileError as exc:
        return _quarantine_whole_batch(claimed, key, quarantine_root, str(exc), checkpoint)
    imaging = profile.imaging if domain is None else domain.imaging(profile.imaging)
    scan = validate_cutouts(claimed, imaging, profile.limits, reject_reserved=True, domain=domain)
    step("validated")
    if scan.accepted_files and not (stored / MANIFEST).is_file():
        with Store.publish(stored) as tmp:
            for relative in scan.accepted_files + scan.psf_files:
                target = tmp / relative
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(scan.root / relative, target)
            (tmp / MANIFEST).write_text(
                json.dumps(
                    {
                        "batch": key,
                        "domain": None if domain is None else domain.name,
                        "files_in": scan.n_files_in,
                        "files_accepted": scan.accepted_files,
                        "psf_files": scan.psf_files,
                        "files_quarantined": {r.file: r.reason for r in scan.rejections},
                        "cutouts": scan.table.height,
                    },
                    indent=2,
                )
            )
    step("stored")
    quarantined = quarantine(
        scan.rejections, claimed, quarantine_root, batch_name=key, checkpoint=checkpoint
    )
    left = _release(claimed, [*scan.accepted_files, *scan.psf_files, BATCH_FILE])
    step("released")
    return IngestResult(
        key=key,
        n_files_in=scan.n_files_in,
        n_files_accepted=len(scan.accepted_files),
        n_files_quarantined=len(quarantined),
        n_cutouts=scan.table.height,
        stored_dir=stored if stored.is_dir() else None,
        left_behind=left,
        domain=None if domain is None else domain.name,
    )


def _quarantine_whole_batch(
    claimed: Path,
    key: str,
    quarantine_root: Path,
    problem: str,
    checkpoint: Callable[[str], None] | None,
) -> IngestResult:
    """Quarantine every file of ``claimed`` with ``problem``; ``batch.toml`` moves last, so
    a rerun after a crash still finds the reason."""
    files = [
        p.relative_to(claimed).as_posix()
        for p in batch_files(claimed, include_reserved=True)
        if p != claimed / BATCH_FILE
    ]
    if (claimed / BATCH_FILE).exists() or (claimed / BATCH_FILE).is_symlink():
        files.append(BATCH_FILE)
    reason = f"batch not read: {problem}"
    quarantined = quarantine(
        [Rejection(f, reason) for f in files],
        claimed,
        quarantine_root,
        batch_name=key,
        checkpoint=checkpoint,
    )
    left = _release(claimed, [])
    return IngestResult(
        key=key,
        n_files_in=len(files),
        n_files_accepted=0,
        n_files_quarantined=len(quarantined),
        n_cutouts=0,
        stored_dir=None,
        left_behind=left,
        problem=problem,
    )


def _release(claimed: Path, accepted: list[str]) -> tuple[str, ...]:
    """Remove the stored copies from ``claimed`` and the folder if empty; list what stays."""
    for relative in accepted:
        try:
            (claimed / relative).unlink(missing_ok=True)
        except OSError:
            pass
    for dirpath, _, _ in sorted(os.walk(claimed), key=lambda w: -len(w[0])):
        try:
            os.rmdir(dirpath)
        except OSError:
            pass
    if not claimed.exists():
        return ()
    return tuple(
        display_name(p.relative_to(claimed).as_posix())
        for p in sorted(claimed.rglob("*"))
        if not p.is_dir() or p.is_symlink()
    )
