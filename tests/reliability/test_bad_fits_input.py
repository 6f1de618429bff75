"""Bad FITS input never stops a batch: each file is accepted (maybe repaired) or rejected
with a reason, quarantined by the sensor, skipped by ``gampen predict``; counts reconcile."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from astropy.io import fits
from conftest import REPO, TINY, child_env
from dagster import build_sensor_context, instance_for_test
from fits_cases import BAD, CASES, GOOD, IMAGING, S, add_symlink, galaxy, write_cases, write_fits

from gampen_assets.sensors import MANIFEST, STORED_BATCHES, inbox_sensor
from gampen_ml import stages
from gampen_ml.fits_input import CutoutError, load_cutout_file, load_cutouts
from tests.inbox_helpers import ingest_requested, watch_inbox


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_each_bad_or_odd_file_gets_its_documented_outcome(case, tmp_path):
    folder = tmp_path / "batch"
    write_cases(folder, [case])
    write_fits(folder / "neighbour.fits", galaxy(99))
    batch = load_cutouts(folder, IMAGING)
    # The batch always goes on: the good neighbour is accepted whatever the case does.
    assert "neighbour.fits" in batch.accepted_files
    assert batch.n_files_in == 2 == len(batch.accepted_files) + len(batch.rejections)
    if case.outcome == "reject":
        (rejection,) = batch.rejections
        assert rejection.file == case.name
        assert case.expect in rejection.reason
        if case.name.endswith(".fits"):
            with pytest.raises(CutoutError, match=case.name):
                load_cutout_file(folder / case.name, IMAGING)
        return
    assert batch.rejections == []
    assert batch.table.height == case.n_cutouts + 1
    rows = batch.table.filter(pl.col("source_file") == case.name)
    assert rows.height == case.n_cutouts
    assert all(case.expect in r for r in rows["repairs"])
    images = batch.images[rows["galaxy_id"].to_numpy()]
    assert images.shape == (case.n_cutouts, S, S)
    assert images.dtype == np.float32 and images.dtype.isnative
    assert np.isfinite(images).all()


def test_repairs_keep_the_pixel_values(tmp_path):
    """Repairs convert and place pixels; they never rescale or resample them."""
    by_name = write_cases(tmp_path, [c for c in GOOD if c.name != "good.fits"])
    batch = load_cutouts(tmp_path, IMAGING)

    def image(name):
        (gid,) = batch.table.filter(pl.col("source_file") == name)["galaxy_id"].to_list()
        return batch.images[gid]

    assert set(by_name) <= set(batch.accepted_files)
    np.testing.assert_array_equal(image("int16.fits"), np.round(galaxy(5)))
    np.testing.assert_array_equal(image("bigendian_f8.fits"), galaxy(6))
    edge = image("inf_edge.fits")
    assert (edge[0, :5] == 0).all()
    np.testing.assert_array_equal(edge[1:], galaxy(3)[1:])
    # 259x260 cropped about the centre: output (i, j) = input (i + 10, j + 10).
    np.testing.assert_array_equal(image("large.fits"), galaxy(12, (S + 20, S + 21))[10:-10, 10:-11])
    padded = image("small.fits")
    np.testing.assert_array_equal(padded[5:-5, 5:-5], galaxy(13, (S - 10, S - 10)))
    assert (padded[:5] == 0).all() and (padded[:, -5:] == 0).all()


def _sensor_env(tmp_path, monkeypatch, storage_root):
    home, inbox = tmp_path / "home", tmp_path / "inbox"
    inbox.mkdir(parents=True)
    watch_inbox(monkeypatch, inbox)
    monkeypatch.setenv("GAMPEN_STORAGE", str(storage_root))
    return home, inbox


def _tick(instance, home, monkeypatch, cursor=None):
    """One sensor tick, then the ingestion each requested run starts with."""
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    result = inbox_sensor(build_sensor_context(instance=instance, cursor=cursor))
    storage_root = Path(os.environ["GAMPEN_STORAGE"])
    ingest_requested(result, Path(os.environ["GAMPEN_INBOX"]), storage_root, home / "quarantine")
    return result


def test_sensor_quarantines_bad_files_and_catalogs_the_rest(world, tmp_path, monkeypatch):
    home, inbox = _sensor_env(tmp_path, monkeypatch, world)
    batch = inbox / "mixed"
    write_cases(batch, CASES)
    write_fits(tmp_path / "outside.fits", galaxy(30))
    add_symlink(batch, tmp_path / "outside.fits")
    (batch / "_READY").touch()
    with instance_for_test() as instance:
        result = _tick(instance, home, monkeypatch)
    assert [r.partition_key for r in result.run_requests] == ["mixed"]
    bad_names = {c.name: c.expect for c in BAD} | {"link.fits": "symbolic links"}

    # Quarantine: every rejected file, with a reason file naming the problem.
    quarantine = home / "quarantine" / "mixed"
    for name, expect in bad_names.items():
        assert (quarantine / name).exists() or (quarantine / name).is_symlink(), name
        reason = (quarantine / f"{name}.reason.txt").read_text()
        assert f"file: {name}" in reason and expect in reason, reason
    assert (tmp_path / "outside.fits").is_file()  # the link's target is never touched
    # Storage: exactly the accepted files, as regular files; the inbox entry is gone.
    stored = world / STORED_BATCHES / "mixed"
    manifest = json.loads((stored / MANIFEST).read_text())
    assert sorted(manifest["files_accepted"]) == sorted(c.name for c in GOOD)
    assert set(manifest["files_quarantined"]) == set(bad_names)
    assert manifest["files_in"] == len(GOOD) + len(bad_names)
    assert not any(p.is_symlink() for p in stored.rglob("*"))
    assert not batch.exists()

    # Catalog the stored batch with the real tiny model: in = catalogued + quarantined.
    catalog = stages.catalog_and_publish(TINY, world, "mixed", device="cpu")
    assert catalog.height == sum(c.n_cutouts for c in GOOD) == manifest["cutouts"]
    per_file = catalog.group_by("source_file").len()
    assert dict(per_file.iter_rows()) == {c.name: c.n_cutouts for c in GOOD}
    assert catalog.select("source_file", "hdu").is_unique().all()
    catalogued_files = set(catalog["source_file"])
    quarantined_files = {p.name for p in quarantine.iterdir() if not p.name.endswith(".reason.txt")}
    assert len(catalogued_files) + len(quarantined_files) == manifest["files_in"]
    assert catalogued_files.isdisjoint(quarantined_files)


def _digest(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_duplicate_file_and_batch_names_never_overwrite(tmp_path, monkeypatch, storage_root):
    home, inbox = _sensor_env(tmp_path, monkeypatch, storage_root)
    write_fits(inbox / "night" / "a.fits", galaxy(1))
    write_fits(inbox / "other" / "a.fits", np.zeros((S, S), np.float32))  # bad, same name
    for name in ("night", "other"):
        (inbox / name / "_READY").touch()
    with instance_for_test() as instance:
        first = _tick(instance, home, monkeypatch)
        # The same batch name again, with a different a.fits, and a bad a.fits again.
        write_fits(inbox / "night" / "a.fits", galaxy(2))
        write_fits(inbox / "other" / "a.fits", np.full((S, S), 1.0, np.float32))
        for name in ("night", "other"):
            (inbox / name / "_READY").touch()
        second = _tick(instance, home, monkeypatch, cursor=first.cursor)
    assert [r.partition_key for r in first.run_requests] == ["night", "other"]
    assert [r.partition_key for r in second.run_requests] == ["night-2", "other-2"]
    stored = storage_root / STORED_BATCHES
    assert np.array_equal(fits.getdata(stored / "night" / "a.fits"), galaxy(1))
    assert np.array_equal(fits.getdata(stored / "night-2" / "a.fits"), galaxy(2))
    quarantine = home / "quarantine"
    reasons = {p.parent.name: p.read_text() for p in quarantine.glob("*/a.fits.reason.txt")}
    assert set(reasons) == {"other", "other-2"}
    assert "all pixels are zero" in reasons["other"] and "constant image" in reasons["other-2"]
    assert _digest(quarantine / "other" / "a.fits") != _digest(quarantine / "other-2" / "a.fits")


def gampen(*args, env, timeout=300):
    return subprocess.run(
        [sys.executable, "-m", "gampen_ml.cli", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.mark.slow
def test_predict_cli_skips_bad_files_and_catalogs_the_rest(tiny_world, tmp_path):
    folder = tmp_path / "cutouts"
    write_cases(folder, CASES)
    model = tiny_world / "trained_model" / "dropout-0.05"
    env = child_env(GAMPEN_PROFILE="tiny", DAGSTER_HOME=str(tmp_path / "home"))
    out = tmp_path / "catalog.parquet"
    result = gampen("predict", str(folder), "--model", str(model), "--out", str(out),
                    "--passes", "4", "--device", "cpu", env=env)  # fmt: skip
    assert result.returncode == 0, result.stderr
    for case in BAD:
        assert f"skipped {case.name}: " in result.stderr and case.expect in result.stderr
    n_good = sum(c.n_cutouts for c in GOOD)
    assert f"{n_good} galaxies written" in result.stdout
    assert f"{len(BAD)} file(s) skipped" in result.stdout
    catalog = pl.read_parquet(out)
    assert catalog.height == n_good
    assert set(catalog["source_file"]) == {c.name for c in GOOD}
    assert catalog["bt_true"].null_count() == n_good
    for column in ("bt_mode", "re_arcsec_mode", "flux_nJy_mode"):
        assert catalog[column].is_finite().all(), column

    # A single unusable file: nothing catalogued, the reason on stderr, no partial output.
    single = tmp_path / "single.parquet"
    result = gampen("predict", str(folder / "truncated.fits"), "--model", str(model),
                    "--out", str(single), "--passes", "4", env=env)  # fmt: skip
    assert "skipped truncated.fits: not a readable FITS file" in result.stderr
    assert "0 galaxies written" in result.stdout
    assert not list(tmp_path.glob(".tmp-*"))


def test_quarantine_never_overwrites_an_earlier_file(tmp_path):
    from gampen_ml.fits_input import Rejection, quarantine

    for text in (b"first", b"second"):
        (tmp_path / "batch").mkdir(exist_ok=True)
        (tmp_path / "batch" / "a.fits").write_bytes(text)
        rejections = [Rejection("a.fits", f"bad {text.decode()}")]
        if text == b"first":
            quarantine(rejections, tmp_path / "batch", tmp_path / "q", batch_name="k")
        else:
            with pytest.raises(CutoutError, match="already in quarantine"):
                quarantine(rejections, tmp_path / "batch", tmp_path / "q", batch_name="k")
    assert (tmp_path / "q" / "k" / "a.fits").read_bytes() == b"first"
    assert "bad first" in (tmp_path / "q" / "k" / "a.fits.reason.txt").read_text()
    assert (tmp_path / "batch" / "a.fits").read_bytes() == b"second"  # not moved, not lost
