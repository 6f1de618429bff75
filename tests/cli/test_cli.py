"""The ``gampen`` command, run as a user runs it, on the tiny profile."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from astropy.io import fits

from gampen_ml.io import load_npy_mmap


def gampen(*args: str, env: dict, check: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "gampen_ml.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if check and result.returncode != 0:
        raise AssertionError(f"gampen {args} failed:\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    import os

    home = tmp_path_factory.mktemp("home")
    return {
        **os.environ,
        "DAGSTER_HOME": str(home),
        "GAMPEN_PROFILE": "tiny",
        "GAMPEN_STORAGE": str(home / "data"),
        "OMP_NUM_THREADS": "1",
    }


@pytest.mark.slow
def test_every_stage_from_the_command_line(env, tmp_path):
    root = env["GAMPEN_STORAGE"]
    gampen("simulate", "--workers", "1", env=env)
    labels = pl.read_parquet(f"{root}/simulated_galaxies/shard-000/labels.parquet")
    assert labels.height == 24

    for rate in ("0", "0.05"):
        out = gampen("train", "--dropout", rate, env=env)
        assert "val loss" in out.stdout
    registry = json.loads(open(f"{root}/trained_model/dropout-0.05/registry.json").read())
    assert registry["model_version"] is not None  # registered in the embedded MLflow store
    assert (Path(env["DAGSTER_HOME"]) / "mlartifacts").is_dir()

    out = gampen("calibrate", env=env)
    assert "chosen dropout rate" in out.stdout
    calibration = json.loads(open(f"{root}/calibrated_dropout_rate/all/calibration.json").read())
    assert calibration["chosen_dropout_rate"] in (0.0, 0.05)

    gampen("catalog", env=env)
    catalog = pl.read_parquet(f"{root}/posterior_catalog/sim-test/catalog.parquet")
    n_test = sum(
        pl.read_parquet(f"{root}/simulated_galaxies/{s}/labels.parquet")
        .filter(pl.col("split") == "test")
        .height
        for s in ("shard-000", "shard-001")
    )
    assert catalog.height == n_test
    assert (catalog["bt_hpd68_lo"] <= catalog["bt_hpd68_hi"]).all()
    assert catalog["bt_true"].null_count() == 0

    out = gampen("validate", "--out", str(tmp_path / "val"), env=env)
    assert "Table 2" in out.stdout or "coverage" in out.stdout.lower()
    assert (tmp_path / "val" / "validation.json").is_file()

    out = gampen(
        "plots",
        f"{root}/posterior_catalog/sim-test/catalog.parquet",
        "--out",
        str(tmp_path / "figs"),
        env=env,
    )
    assert (tmp_path / "figs" / "index.md").is_file()
    assert len(list((tmp_path / "figs").glob("*.png"))) >= 5

    # Real-data path: two good cutouts in a folder, plus a file that is not FITS at all.
    images = load_npy_mmap(f"{root}/simulated_galaxies/shard-000/images.npy")
    cutouts = tmp_path / "cutouts"
    cutouts.mkdir()
    for i in range(2):
        hdu = fits.PrimaryHDU(np.asarray(images[i]))
        hdu.header["PIXSCALE"] = 0.168
        hdu.writeto(cutouts / f"gal{i}.fits")
    (cutouts / "broken.fits").write_bytes(b"not a fits file")
    model_dir = f"{root}/trained_model/dropout-0.05"
    out = gampen(
        "predict",
        str(cutouts),
        "--model",
        model_dir,
        "--out",
        str(tmp_path / "real.parquet"),
        env=env,
    )
    assert "skipped broken.fits" in out.stderr
    real = pl.read_parquet(tmp_path / "real.parquet")
    assert real.height == 2 and real["bt_true"].null_count() == 2
    assert sorted(real["source_file"].to_list()) == ["gal0.fits", "gal1.fits"]


def test_bad_profile_is_reported_before_any_work(env, tmp_path):
    result = gampen("simulate", "--profile", "huge", "--root", str(tmp_path), env=env, check=False)
    assert result.returncode == 2
    assert "unknown profile 'huge'" in result.stderr
    assert list(tmp_path.iterdir()) == []


def test_export_writes_a_catalog_partition_as_votable(env, tmp_path):
    """``gampen export`` on a catalog partition the test writes: default path, units, errors."""
    from astropy.io.votable import parse

    from gampen_ml.catalog import build_catalog, write_catalog
    from gampen_ml.posterior import summarize
    from tests.catalog_helpers import posterior_draws, provenance

    catalog = build_catalog(
        summarize(posterior_draws(np.random.default_rng(0), 3, 30)),
        pl.DataFrame({"galaxy_id": [5, 6, 7], "source_file": ["a.fits", None, "c.fits"]}),
        None,
        **provenance(model_version="2", dropout_rate=0.01, n_passes=30),
    )
    folder = tmp_path / "posterior_catalog" / "batch-1"
    write_catalog(folder, catalog)

    out = gampen("export", "batch-1", "--format", "votable", "--root", str(tmp_path), env=env)
    assert f"3 rows of posterior_catalog[batch-1] written to {folder / 'catalog.vot'}" in out.stdout
    votable = parse(folder / "catalog.vot", verify="exception")
    fields = {f.name: f for f in votable.get_first_table().fields}
    assert (
        str(fields["re_arcsec_mode"].unit) == "arcsec" and str(fields["flux_nJy_std"].unit) == "nJy"
    )
    assert fields["flux_nJy_mode"].ucd == "phot.flux.density;meta.main"
    infos = {i.name: i.value for i in votable.resources[0].infos}
    assert (
        infos["MODELVER"] == "2" and infos["DATASET"] == "batch-1" and infos["RECALIB"] == "false"
    )
    table = votable.get_first_table().to_table()
    np.testing.assert_allclose(table["bt_median"], catalog["bt_median"].to_numpy())
    assert sorted(p.name for p in folder.iterdir()) == ["catalog.parquet", "catalog.vot"]

    missing = gampen(
        "export", "batch-9", "--format", "fits", "--root", str(tmp_path), env=env, check=False
    )
    assert missing.returncode == 2
    assert str(tmp_path / "posterior_catalog" / "batch-9" / "catalog.parquet") in missing.stderr
    assert "datasets with a catalog: batch-1" in missing.stderr


def test_every_command_has_help(env):
    for command in (
        "simulate",
        "train",
        "calibrate",
        "catalog",
        "predict",
        "plots",
        "export",
        "validate",
        "sql",
        "lineage",
        "model",
        "label",
    ):
        assert "usage: gampen" in gampen(command, "--help", env=env).stdout
    for action in ("export", "import"):
        assert f"usage: gampen model {action}" in gampen("model", action, "--help", env=env).stdout


def test_a_damaged_model_archive_is_named_not_loaded(env, tmp_path):
    """``gampen predict --model X.gampen`` on a file that is not an archive: exit 2 and a
    message naming the file and the problem (export, import and the other damages:
    ``tests/gampen_ml/test_model_archive.py``)."""
    broken = tmp_path / "broken.gampen"
    broken.write_bytes(b"PK\x03\x04 half a zip")
    out = tmp_path / "c.parquet"
    result = gampen("predict", str(tmp_path), "--model", str(broken), "--out", str(out),
                    env=env, check=False)  # fmt: skip
    assert result.returncode == 2 and not out.exists()
    assert f"gampen predict: error: model archive {broken}: not a readable zip" in result.stderr
