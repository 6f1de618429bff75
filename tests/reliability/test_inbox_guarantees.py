"""The inbox's guarantees (``docs/operations.md``): every file of a batch ends in exactly one
place — stored or quarantined with its reason — whatever its name, size, permissions, or
where the ingestion is killed; the sensor only claims, reads no pixel, and never stores a
batch twice."""

from __future__ import annotations

import gzip
import json
import multiprocessing
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits
from dagster import build_sensor_context, instance_for_test
from fits_cases import S, galaxy, write_fits

from gampen_assets.sensors import inbox_sensor
from gampen_ml.config import InputLimits, get_profile
from gampen_ml.inbox import MANIFEST, PROCESSING, STORED_BATCHES, ingest_claimed
from gampen_ml.io import atomic_partition_dir
from gampen_ml.settings import Settings
from tests.inbox_helpers import ingest_requested, watch_inbox

TINY = get_profile("tiny")


@pytest.fixture
def inbox_env(tmp_path, monkeypatch, storage_root):
    home, inbox = tmp_path / "home", tmp_path / "inbox"
    inbox.mkdir()
    watch_inbox(monkeypatch, inbox)
    with instance_for_test() as instance:
        monkeypatch.setenv("DAGSTER_HOME", str(home))

        def tick(cursor=None, ingest=True):
            result = inbox_sensor(build_sensor_context(instance=instance, cursor=cursor))
            if ingest:
                ingest_requested(result, inbox, storage_root, home / "quarantine")
            return result

        yield tick, inbox, storage_root, home / "quarantine"


def _files(folder: Path) -> dict[bytes, bytes]:
    """Relative path (bytes) -> content of every file under ``folder``."""
    if not folder.is_dir():
        return {}
    return {
        os.fsencode(p.relative_to(folder)): p.read_bytes()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_a_single_file_batch_whose_file_is_rejected(inbox_env):
    tick, inbox, storage, quarantine = inbox_env
    write_fits(inbox / "lone.fits", np.zeros((S, S), np.float32))
    (inbox / "lone.fits._READY").touch()
    result = tick()
    assert [r.partition_key for r in result.run_requests] == ["lone"]
    assert "all pixels are zero" in (quarantine / "lone" / "lone.fits.reason.txt").read_text()
    assert not (storage / STORED_BATCHES / "lone").exists()
    assert [p.name for p in inbox.iterdir()] == [PROCESSING]  # marker consumed, nothing left
    assert tick(result.cursor).run_requests == []


def test_reserved_and_hidden_names_are_quarantined_never_deleted(inbox_env):
    tick, inbox, storage, quarantine = inbox_env
    batch = inbox / "night"
    write_fits(batch / "good.fits", galaxy(1))
    write_fits(batch / ".upload-in-progress.fits", galaxy(2))
    (batch / "_notes.txt").write_text("observer notes")
    write_fits(batch / ".cache" / "x.fits", galaxy(3))
    (batch / "_READY").touch()
    tick()
    stored = storage / STORED_BATCHES / "night"
    assert sorted(_files(stored)) == [MANIFEST.encode(), b"good.fits"]
    for name in (".upload-in-progress.fits", "_notes.txt", ".cache/x.fits"):
        assert (quarantine / "night" / name).is_file(), name
        assert "reserved name" in (quarantine / "night" / f"{name}.reason.txt").read_text()
    assert (quarantine / "night" / "_notes.txt").read_text() == "observer notes"
    manifest = json.loads((stored / MANIFEST).read_text())
    assert manifest["files_in"] == 4 and len(manifest["files_quarantined"]) == 3


def test_non_utf8_names_are_quarantined_with_their_bytes_recorded(inbox_env):
    tick, inbox, storage, quarantine = inbox_env
    batch = os.fsdecode(bytes(inbox) + b"/n\xe9ght")  # a Latin-1 batch name
    os.mkdir(batch)
    weird = os.fsdecode(b"gal\xff\xfe.fits")
    write_fits(Path(batch) / weird, galaxy(4))
    write_fits(Path(batch) / "ok.fits", galaxy(5))
    Path(batch, "_READY").touch()
    result = tick()
    (key,) = [r.partition_key for r in result.run_requests]
    assert key == "n-ght"
    reason_file = quarantine / key / f"{weird}.reason.txt"
    assert (quarantine / key / weird).is_file()
    reason = reason_file.read_bytes()
    assert b"not valid UTF-8" in reason and b"file: gal\xff\xfe.fits" in reason  # lossless
    assert b"67616cfffe2e66697473" in reason  # and as hex
    assert sorted(_files(storage / STORED_BATCHES / key)) == [MANIFEST.encode(), b"ok.fits"]
    assert not Path(batch).exists()


def _bomb(path: Path, shape: tuple[int, ...]) -> None:
    """A gzipped FITS header claiming ``shape`` float32 with (almost) no data behind it."""
    header = fits.Header({"SIMPLE": True, "BITPIX": -32, "NAXIS": len(shape)})
    for i, n in enumerate(reversed(shape), start=1):
        header[f"NAXIS{i}"] = n
    with gzip.open(path, "wb") as fh:
        fh.write(header.tostring().encode("ascii") + b"\0" * 2880)


def test_oversized_files_are_refused_from_their_headers(inbox_env, monkeypatch):
    tick, inbox, storage, quarantine = inbox_env
    batch = inbox / "big"
    batch.mkdir()
    _bomb(batch / "bomb.fits.gz", (36_000, 36_000))  # claims 5.2 GB in a few kB
    _bomb(batch / "deep.fits.gz", (30_000, S, S))
    write_fits(batch / "ok.fits", galaxy(6))
    (batch / "_READY").touch()
    tick()
    reasons = {n: (quarantine / "big" / f"{n}.reason.txt").read_text() for n in ("bomb.fits.gz",
               "deep.fits.gz")}  # fmt: skip
    assert (
        "max_image_pixels" in reasons["bomb.fits.gz"] and "36000x36000" in reasons["bomb.fits.gz"]
    )
    assert "max_planes" in reasons["deep.fits.gz"]
    assert sorted(_files(storage / STORED_BATCHES / "big")) == [MANIFEST.encode(), b"ok.fits"]


def test_file_and_batch_byte_limits(tmp_path):
    batch = tmp_path / "claimed"
    for i in range(3):
        write_fits(batch / f"g{i}.fits", galaxy(i))
    one = S * S * 4
    limits = InputLimits(max_file_bytes=one, max_batch_bytes=2 * one)
    profile = TINY.replace(limits=limits)
    result = ingest_claimed(batch, "b", profile, tmp_path / "store", tmp_path / "q")
    assert result.n_files_accepted == 2
    assert "max_batch_bytes" in (tmp_path / "q" / "b" / "g2.fits.reason.txt").read_text()
    write_fits(tmp_path / "c2" / "cube.fits", np.stack([galaxy(7), galaxy(8)]))
    ingest_claimed(tmp_path / "c2", "c", profile, tmp_path / "store", tmp_path / "q")
    assert "max_file_bytes" in (tmp_path / "q" / "c" / "cube.fits.reason.txt").read_text()


def test_the_sensor_only_claims_and_reads_no_pixel(inbox_env, monkeypatch):
    tick, inbox, storage, quarantine = inbox_env
    write_fits(inbox / "b" / "g.fits", galaxy(1))
    (inbox / "b" / "_READY").touch()

    def no_reading(*args, **kwargs):
        raise AssertionError("the sensor opened a FITS file")

    monkeypatch.setattr(fits, "open", no_reading)
    result = tick(ingest=False)
    assert [r.partition_key for r in result.run_requests] == ["b"]
    assert (inbox / PROCESSING / "b" / "g.fits").is_file()


def test_a_claim_never_requested_is_requested_by_the_next_tick(inbox_env):
    tick, inbox, storage, quarantine = inbox_env
    # What a tick interrupted after its renames leaves: a claimed batch, no cursor entry;
    # a single-file claim interrupted before its file moved (empty folder, file and marker
    # in the inbox) and one interrupted before its marker moved (orphaned marker).
    write_fits(inbox / PROCESSING / "orphan" / "g.fits", galaxy(1))
    (inbox / PROCESSING / "half").mkdir()
    write_fits(inbox / "half.fits", galaxy(2))
    (inbox / "half.fits._READY").touch()
    write_fits(inbox / PROCESSING / "moved" / "moved.fits", galaxy(3))
    (inbox / "moved.fits._READY").touch()
    result = tick()
    assert sorted(r.partition_key for r in result.run_requests) == ["half", "moved", "orphan"]
    for key in ("half", "moved", "orphan"):
        assert (storage / STORED_BATCHES / key / MANIFEST).is_file()
    assert [p.name for p in inbox.iterdir()] == [PROCESSING]


def _chattr(flag: str, path: Path) -> bool:
    return subprocess.run(["chattr", flag, str(path)], capture_output=True).returncode == 0


def test_an_unclaimable_batch_is_reported_once_and_never_stored(inbox_env, capfd):
    tick, inbox, storage, quarantine = inbox_env
    write_fits(inbox / "stuck" / "g.fits", galaxy(1))
    (inbox / "stuck" / "_READY").touch()
    if not _chattr("+i", inbox / "stuck"):
        pytest.skip("chattr +i is not supported on this filesystem")
    try:
        first = tick()
        second = tick(first.cursor)
        errors = [
            line for line in capfd.readouterr().err.splitlines() if "cannot be claimed" in line
        ]
    finally:
        _chattr("-i", inbox / "stuck")
    assert first.run_requests == [] and second.run_requests == []
    assert len(errors) == 1 and "'stuck'" in errors[0]
    assert not (storage / STORED_BATCHES).exists()
    assert (inbox / "stuck" / "g.fits").is_file()
    # Fixed by its owner: claimed on the next tick.
    os.utime(inbox / "stuck", (1, 1))
    assert [r.partition_key for r in tick(second.cursor).run_requests] == ["stuck"]


def test_an_undeletable_claimed_file_is_kept_and_never_ingested_twice(inbox_env):
    tick, inbox, storage, quarantine = inbox_env
    write_fits(inbox / "b" / "g.fits", galaxy(1))
    write_fits(inbox / "b" / "h.fits", galaxy(2))
    (inbox / "b" / "_READY").touch()
    result = tick(ingest=False)
    claimed = inbox / PROCESSING / "b"
    if not _chattr("+i", claimed / "g.fits"):
        pytest.skip("chattr +i is not supported on this filesystem")
    try:
        first = ingest_requested(result, inbox, storage, quarantine)["b"]
        again = ingest_requested(result, inbox, storage, quarantine)["b"]  # a rerun
        later = tick(result.cursor, ingest=False)
    finally:
        _chattr("-i", claimed / "g.fits")
    assert first.left_behind == ("g.fits",) and again.left_behind == ("g.fits",)
    assert later.run_requests == []
    assert sorted(p.name for p in (storage / STORED_BATCHES).iterdir()) == ["b"]
    assert sorted(_files(storage / STORED_BATCHES / "b")) == [MANIFEST.encode(), b"g.fits",
                                                              b"h.fits"]  # fmt: skip


def _store_as_nobody(source: Path, stored: Path) -> None:
    """What ingestion does to store a file, in a forked child with the uid/gid of nobody.

    Only the storage step runs there: a forked child must not use polars (its thread pool
    may be locked at the fork), and nobody cannot start this venv's interpreter (it lives
    under /root, mode 0700).
    """

    def child():
        os.setgroups([])
        os.setgid(65534)
        os.setuid(65534)
        with atomic_partition_dir(stored) as tmp:
            shutil.copy2(source, tmp / source.name)

    process = multiprocessing.get_context("fork").Process(target=child)
    process.start()
    process.join(60)
    assert process.exitcode == 0, f"storing a read-only file as nobody failed ({process.exitcode})"


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to become nobody")
def test_read_only_inputs_are_stored_by_an_unprivileged_daemon():
    """As an unprivileged user (root ignores 0444): a read-only input file is stored."""
    work = Path(tempfile.mkdtemp(prefix="gampen-nobody-", dir="/tmp"))
    try:
        work.chmod(0o777)
        write_fits(work / "in" / "ro.fits", galaxy(1))
        (work / "in").chmod(0o755)
        (work / "in" / "ro.fits").chmod(0o444)
        _store_as_nobody(work / "in" / "ro.fits", work / "store" / "b")
        stored = work / "store" / "b" / "ro.fits"
        assert np.array_equal(fits.getdata(stored), galaxy(1))
        assert stored.stat().st_uid == 65534 and stored.stat().st_mode & 0o777 == 0o444
    finally:
        shutil.rmtree(work, ignore_errors=True)


STEPS = ["validated", "stored", "quarantined:bad.fits", "quarantined:notes.txt", "released"]


def _write_mixed(folder: Path) -> None:
    write_fits(folder / "a.fits", galaxy(1))
    write_fits(folder / "sub" / "b.fits", np.stack([galaxy(2), galaxy(3)]))
    write_fits(folder / "bad.fits", np.zeros((S, S), np.float32))
    (folder / "notes.txt").write_text("not a cutout")
    (folder / "_READY").touch()


def _killed_at(step: str, claimed: Path, store: Path, quarantine: Path) -> None:
    def checkpoint(reached: str) -> None:
        if reached == step:
            os._exit(137)  # as abrupt as a kill: no cleanup handler runs

    ingest_claimed(claimed, "k", TINY, store, quarantine, checkpoint=checkpoint)


@pytest.mark.parametrize("step", STEPS)
def test_ingestion_killed_at_any_step_loses_and_duplicates_nothing(step, tmp_path):
    reference = tmp_path / "reference"
    _write_mixed(reference / "claimed")
    ingest_claimed(reference / "claimed", "k", TINY, reference / "store", reference / "q")

    run = tmp_path / "run"
    _write_mixed(run / "claimed")
    originals = _files(run / "claimed")
    # spawn, not fork: a forked child can deadlock in polars' thread pool.
    process = multiprocessing.get_context("spawn").Process(
        target=_killed_at, args=(step, run / "claimed", run / "store", run / "q")
    )
    process.start()
    process.join(120)
    assert process.exitcode == 137, f"never reached {step}"
    # After the kill: every original file is still somewhere (claimed, stored or quarantined).
    after_kill = {**_files(run / "claimed"), **_files(run / "q" / "k")}
    after_kill.update(_files(run / "store" / STORED_BATCHES / "k"))
    assert set(originals) - {b"_READY"} <= set(after_kill)
    # The rerun (the catalog run ingests while the claimed folder exists) finishes the job:
    # the same partition and quarantine as without the kill.
    if (run / "claimed").exists():
        ingest_claimed(run / "claimed", "k", TINY, run / "store", run / "q")
    assert _files(run / "store") == _files(reference / "store")
    assert _files(run / "q") == _files(reference / "q")
    assert not (run / "claimed").exists()
    assert [p.name for p in (run / "store" / STORED_BATCHES).iterdir()] == ["k"]  # no k-2


def test_the_catalog_run_ingests_its_claimed_batch_and_fails_clearly_when_all_bad(inbox_env):
    from dagster import Failure, build_asset_context

    from gampen_assets.assets._common import fail_fast_on_bad_input
    from gampen_assets.assets.prediction_assets import _ingest_claimed_batch

    tick, inbox, storage, quarantine = inbox_env
    write_fits(inbox / "good" / "g.fits", galaxy(1))
    write_fits(inbox / "bad" / "z.fits", np.zeros((S, S), np.float32))
    for name in ("good", "bad"):
        (inbox / name / "_READY").touch()
    tick(ingest=False)
    context, settings = build_asset_context(), Settings.resolve()
    metadata = _ingest_claimed_batch(context, TINY, settings, "good")
    assert metadata["inbox_files_stored"] == 1 and metadata["inbox_files_quarantined"] == 0
    assert _ingest_claimed_batch(context, TINY, settings, "good") == {}  # a rerun: nothing to do
    with pytest.raises(Failure, match="none of the 1 files of inbox batch 'bad'"):
        with fail_fast_on_bad_input():
            _ingest_claimed_batch(context, TINY, settings, "bad")
    assert (quarantine / "bad" / "z.fits.reason.txt").is_file()
