"""The inbox sensor on a temporary inbox: ready batches claimed once, half-copied ones never;
each claimed batch ingested by its run."""

from __future__ import annotations

import json
import os
import time

import numpy as np
import pytest
from astropy.io import fits
from dagster import AssetKey, build_sensor_context, instance_for_test

from gampen_assets.partitions import SIM_TEST, datasets
from gampen_assets.sensors import (
    CATALOG_ASSETS,
    MANIFEST,
    STORED_BATCHES,
    inbox_sensor,
    sanitize_batch_name,
    unique_key,
)
from gampen_ml.config import get_profile
from gampen_ml.fits_input import load_cutouts
from gampen_ml.inbox import PROCESSING
from tests.inbox_helpers import ingest_requested, watch_inbox

S = get_profile("tiny").imaging.stamp_size_px


def cutout(seed: int = 0, shape=(S, S)) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.normal(0, 1, shape).astype(np.float32) + 5


def write(path, data):
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.PrimaryHDU(data).writeto(path)


@pytest.fixture
def env(tmp_path, monkeypatch, storage_root):
    home, inbox = tmp_path / "home", tmp_path / "inbox"
    inbox.mkdir(parents=True)
    watch_inbox(monkeypatch, inbox, settle_s=600)
    with instance_for_test() as instance:
        # instance_for_test points DAGSTER_HOME at its own folder: point it back.
        monkeypatch.setenv("DAGSTER_HOME", str(home))
        yield instance, inbox, home / "quarantine", storage_root


def test_sensor_processes_ready_batches_once(env):
    instance, inbox, quarantine_root, storage_root = env
    # b1: 2 good files (one a 2-plane cube), 1 NaN-ridden, 1 not FITS; marker present.
    write(inbox / "b1" / "g1.fits", cutout(1))
    write(inbox / "b1" / "deep" / "cube.fits", np.stack([cutout(2), cutout(3)]))
    bad = cutout(4)
    bad[S // 2] = np.nan
    write(inbox / "b1" / "nan.fits", bad)
    (inbox / "b1" / "readme.txt").write_text("not a cutout")
    (inbox / "b1" / "_READY").touch()
    # A single-file cube batch with its marker, name needing sanitising.
    write(inbox / "my cube!.fits", np.stack([cutout(5)] * 3))
    (inbox / "my cube!.fits._READY").touch()
    # Half-copied: no marker and fresh.
    write(inbox / "half" / "g.fits", cutout(6))
    # All files bad: quarantined, no partition.
    write(inbox / "allbad" / "z.fits", np.zeros((S, S), np.float32))
    (inbox / "allbad" / "_READY").touch()
    # "b1" is already a partition from an earlier batch: the new one becomes "b1-2".
    instance.add_dynamic_partitions(datasets.name, ["b1"])

    result = inbox_sensor(build_sensor_context(instance=instance))

    keys = [r.partition_key for r in result.run_requests]
    assert keys == ["allbad", "b1-2", "my-cube"]
    for request in result.run_requests:
        assert request.asset_selection == [AssetKey(a) for a in CATALOG_ASSETS]
    (add,) = result.dynamic_partitions_requests
    assert add.partitions_def_name == "datasets"
    assert sorted(add.partition_keys) == sorted(["allbad", "b1-2", "my-cube", SIM_TEST])
    # The tick only claimed: nothing is stored or quarantined before the runs.
    assert sorted(p.name for p in (inbox / PROCESSING).iterdir()) == sorted(keys)
    assert not (storage_root / STORED_BATCHES).exists() and not quarantine_root.exists()
    ingested = ingest_requested(result, inbox, storage_root, quarantine_root)
    assert ingested["allbad"].stored_dir is None and ingested["b1-2"].n_files_quarantined == 2

    stored = storage_root / STORED_BATCHES / "b1-2"
    assert sorted(p.relative_to(stored).as_posix() for p in stored.rglob("*") if p.is_file()) == [
        MANIFEST,
        "deep/cube.fits",
        "g1.fits",
    ]
    manifest = json.loads((stored / MANIFEST).read_text())
    assert manifest["files_in"] == 4 and manifest["cutouts"] == 3
    assert len(manifest["files_accepted"]) + len(manifest["files_quarantined"]) == 4
    # The stored batch reloads cleanly: 3 cutouts, nothing rejected.
    reloaded = load_cutouts(stored, get_profile("tiny").imaging)
    assert reloaded.images.shape == (3, S, S) and reloaded.rejections == []
    assert (
        len(
            load_cutouts(
                storage_root / STORED_BATCHES / "my-cube", get_profile("tiny").imaging
            ).table
        )
        == 3
    )

    reason = (quarantine_root / "b1-2" / "nan.fits.reason.txt").read_text()
    assert "non-finite" in reason
    assert (quarantine_root / "b1-2" / "readme.txt").exists()
    assert "all pixels are zero" in (quarantine_root / "allbad" / "z.fits.reason.txt").read_text()
    assert not (storage_root / STORED_BATCHES / "allbad").exists()
    # Processed batches leave the inbox; the half-copied one stays untouched.
    assert sorted(p.name for p in inbox.iterdir()) == [PROCESSING, "half"]
    assert list((inbox / PROCESSING).iterdir()) == []

    # Second tick with the cursor: nothing new.
    again = inbox_sensor(build_sensor_context(instance=instance, cursor=result.cursor))
    assert again.run_requests == [] and again.skip_reason is not None

    # The half batch becomes complete once it has settled (no change for 600 s).
    old = time.time() - 3600
    for path in [inbox / "half", inbox / "half" / "g.fits"]:
        os.utime(path, (old, old))
    settled = inbox_sensor(build_sensor_context(instance=instance, cursor=again.cursor))
    assert [r.partition_key for r in settled.run_requests] == ["half"]


def test_sensor_reemits_a_stored_batch_that_was_never_requested(env):
    instance, _, _, storage_root = env
    orphan = storage_root / STORED_BATCHES / "orphan"
    orphan.mkdir(parents=True)
    write(orphan / "g.fits", cutout())
    result = inbox_sensor(build_sensor_context(instance=instance))
    assert [r.partition_key for r in result.run_requests] == ["orphan"]
    assert json.loads(result.cursor)["emitted"] == ["orphan"]


@pytest.mark.parametrize(
    "raw, key",
    [
        ("..", "batch"),
        ("../../etc", "etc"),
        ("a b?c.fits.gz", "a-b-c"),
        (".hidden", "hidden"),
        ("x" * 100, "x" * 64),
        ("ok_2024.05", "ok_2024.05"),
        ("a..b", "a.b"),
    ],
)
def test_batch_names_are_sanitised(raw, key):
    assert sanitize_batch_name(raw) == key
    assert "/" not in key and ".." not in key


def test_unique_key_suffixes():
    assert unique_key("b", set()) == "b"
    assert unique_key("b", {"b", "b-2"}) == "b-3"
