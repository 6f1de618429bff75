"""Storage layout and crash-safe writes shared by every stage.

Every asset partition lives in its own folder under the storage root::

    <root>/<asset>/<partition>/...

A partition is written into a hidden temporary sibling folder and renamed into place
only when complete (:func:`atomic_partition_dir`), so a crash never leaves a half
partition visible and readers only ever see whole partitions. The temporary folder's name
carries its writer's process id and host; the next writer of the same partition removes
the leftovers of writers on its host that no longer run (a killed run's half shard).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np

#: Name used for a partition that has no partition key.
UNPARTITIONED = "all"


class StorageError(RuntimeError):
    """A stored file is missing or unreadable; the message names the path."""


def partition_dir(root: Path | str, asset: str, partition: str | None = None) -> Path:
    """Folder of one asset partition: ``<root>/<asset>/<partition or 'all'>``.

    Raises
    ------
    StorageError
        If ``asset`` or ``partition`` would escape the storage root (path traversal).
    """
    root = Path(root).resolve()
    key = partition or UNPARTITIONED
    for part in (asset, key):
        if not part or part in (".", "..") or "/" in part or "\\" in part or "\x00" in part:
            raise StorageError(f"illegal asset or partition name {part!r} under {root}")
    path = (root / asset / key).resolve()
    if root not in path.parents:
        raise StorageError(f"{path} escapes the storage root {root}")
    return path


@contextlib.contextmanager
def atomic_partition_dir(final: Path | str) -> Iterator[Path]:
    """Yield a temporary folder that replaces ``final`` atomically on success.

    On an exception the temporary folder is removed and ``final`` (if it existed) is left
    untouched. On success the previous content of ``final`` is swapped out and removed.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_partition_dirs(final)
    tmp = final.parent / f".tmp-{final.name}-{_writer_token()}"
    tmp.mkdir()
    try:
        yield tmp
        _fsync_tree(tmp)
        old = None
        if final.exists():
            old = final.parent / f".old-{final.name}-{_writer_token()}"
            os.replace(final, old)
        os.replace(tmp, final)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def _writer_token() -> str:
    """``<8 hex>-<pid>@<host>``: unique, and says which process on which host wrote it."""
    return f"{uuid.uuid4().hex[:8]}-{os.getpid()}@{socket.gethostname()}"


def _pid_running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def remove_stale_partition_dirs(final: Path | str) -> list[Path]:
    """Remove ``.tmp-``/``.old-`` siblings of ``final`` left by dead writers on this host.

    Only folders named by :func:`atomic_partition_dir` whose process id no longer runs on
    this host are removed; a live writer's folder, or one from another host (which cannot
    be checked from here), is kept. Returns the removed folders.
    """
    final = Path(final)
    pattern = re.compile(rf"^\.(?:tmp|old)-{re.escape(final.name)}-[0-9a-f]{{8}}-(\d+)@(.+)$")
    host = socket.gethostname()
    removed = []
    if not final.parent.is_dir():
        return removed
    for entry in final.parent.iterdir():
        match = pattern.match(entry.name)
        if match is None or match.group(2) != host or not entry.is_dir():
            continue
        if int(match.group(1)) != os.getpid() and not _pid_running(int(match.group(1))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


@contextlib.contextmanager
def atomic_file(final: Path | str) -> Iterator[Path]:
    """Yield a temporary path in the same folder; renamed onto ``final`` on success."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{uuid.uuid4().hex[:8]}-{final.name}"
    try:
        yield tmp
        fsync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_file(path: Path | str) -> None:
    """Flush ``path``'s data to disk through a read-only descriptor (works on 0444 files)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(folder: Path) -> None:
    for path in folder.rglob("*"):
        if path.is_file() and not path.is_symlink():
            fsync_file(path)


def file_sha256(path: Path | str, chunk_bytes: int = 1 << 22) -> str:
    """Hex SHA-256 of a file, read in chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(chunk_bytes), b""):
            digest.update(chunk)
    return digest.hexdigest()


def folder_sha256(folder: Path | str) -> str:
    """Hex SHA-256 over the names and contents of every file under ``folder`` (sorted)."""
    folder = Path(folder)
    digest = hashlib.sha256()
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        digest.update(str(path.relative_to(folder)).encode())
        digest.update(file_sha256(path).encode())
    return digest.hexdigest()


def save_npy(path: Path | str, array: np.ndarray) -> None:
    """Write ``array`` as ``.npy`` (no pickle) so it can be memory-mapped back."""
    np.save(path, np.ascontiguousarray(array), allow_pickle=False)


def load_npy_mmap(path: Path | str) -> np.ndarray:
    """Memory-map a ``.npy`` written by :func:`save_npy` (read-only, no pickle)."""
    path = Path(path)
    if not path.is_file():
        raise StorageError(f"missing array file {path}")
    try:
        return np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise StorageError(f"cannot read array file {path}: {exc}") from exc
