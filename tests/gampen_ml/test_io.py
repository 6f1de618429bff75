"""Crash-safe partition writes and path safety."""

import numpy as np
import pytest

from gampen_ml.io import (
    StorageError,
    atomic_file,
    atomic_partition_dir,
    load_npy_mmap,
    partition_dir,
    save_npy,
)


def test_partition_dir_rejects_traversal(tmp_path):
    assert (
        partition_dir(tmp_path, "posterior_catalog", "sim-test")
        == (tmp_path / "posterior_catalog" / "sim-test").resolve()
    )
    for bad in ("..", "../x", "a/b", ""):
        with pytest.raises(StorageError):
            partition_dir(tmp_path, "posterior_catalog", bad if bad else "/")


def test_failed_write_leaves_previous_partition_intact(tmp_path):
    final = tmp_path / "asset" / "p"
    with atomic_partition_dir(final) as tmp:
        save_npy(tmp / "a.npy", np.arange(5, dtype=np.float32))
    with pytest.raises(RuntimeError), atomic_partition_dir(final) as tmp:
        save_npy(tmp / "a.npy", np.zeros(3, dtype=np.float32))
        raise RuntimeError("killed mid-write")
    np.testing.assert_array_equal(load_npy_mmap(final / "a.npy"), np.arange(5))
    assert [p.name for p in final.parent.iterdir()] == ["p"]


def test_successful_rewrite_replaces_partition(tmp_path):
    final = tmp_path / "asset" / "p"
    for value in (1.0, 2.0):
        with atomic_partition_dir(final) as tmp:
            save_npy(tmp / "a.npy", np.full(2, value, dtype=np.float32))
    assert load_npy_mmap(final / "a.npy")[0] == 2.0
    assert sorted(p.name for p in final.parent.iterdir()) == ["p"]


def test_atomic_file_and_missing_array(tmp_path):
    target = tmp_path / "x.txt"
    with pytest.raises(ValueError), atomic_file(target) as tmp:
        tmp.write_text("half")
        raise ValueError
    assert not target.exists() and list(tmp_path.iterdir()) == []
    with pytest.raises(StorageError, match="missing array file"):
        load_npy_mmap(tmp_path / "nope.npy")


def test_stale_partition_dirs_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    import os
    import socket
    import subprocess
    import sys

    from gampen_ml.io import atomic_partition_dir, remove_stale_partition_dirs

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    dead_pid, host = int(dead.stdout), socket.gethostname()
    parent = tmp_path / "simulated_galaxies"
    folders = {
        "dead": parent / f".tmp-shard-000-0123abcd-{dead_pid}@{host}",
        "dead_old": parent / f".old-shard-000-4567abcd-{dead_pid}@{host}",
        "live": parent / f".tmp-shard-000-89abcdef-{os.getppid()}@{host}",
        "other_host": parent / f".tmp-shard-000-0123abcd-{dead_pid}@elsewhere-{host}",
        "other_partition": parent / f".tmp-shard-000-2-0123abcd-{dead_pid}@{host}",
    }
    for folder in folders.values():
        (folder / "images.npy").parent.mkdir(parents=True)
        (folder / "images.npy").write_bytes(b"torn")
    final = parent / "shard-000"
    with atomic_partition_dir(final) as tmp:
        (tmp / "labels.parquet").write_bytes(b"whole")
        assert f"-{os.getpid()}@{host}" in tmp.name
    assert (final / "labels.parquet").read_bytes() == b"whole"
    assert {k for k, f in folders.items() if f.exists()} == {
        "live", "other_host", "other_partition"
    }  # fmt: skip
    assert remove_stale_partition_dirs(final) == []
