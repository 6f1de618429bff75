"""Asset checks pass on good partitions and fail, naming the problem, on corrupted ones."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from dagster import AssetSelection, DagsterInstance, materialize

from gampen_assets.assets.data_assets import noise_pool, psf_library, simulated_galaxies
from gampen_assets.assets.model_assets import calibrated_dropout_rate
from gampen_assets.checks import (
    champion_coverage_within_tolerance,
    check_catalog,
    check_flags,
    check_model,
    check_shard,
    noise_pool_valid,
    psf_library_valid,
)
from gampen_assets.resources import GampenSettings
from gampen_ml.config import CREDIBLE_LEVELS, PARAMETERS, get_profile
from gampen_ml.io import save_npy
from gampen_ml.metrics import coverage_bounds

TINY = get_profile("tiny")


@pytest.fixture
def env(dagster_home):
    storage = dagster_home / "storage"
    settings = GampenSettings(
        profile_name="tiny", storage_root=str(storage), dagster_home=str(dagster_home)
    )
    return storage, {"settings": settings}, DagsterInstance.ephemeral()


def run_check(check, asset, resources, instance):
    """Execute only (unpartitioned) ``check`` on the files already on disk, through Dagster."""
    result = materialize(
        [asset, check],
        selection=AssetSelection.checks(check),
        resources=resources,
        instance=instance,
        raise_on_error=False,
    )
    (evaluation,) = result.get_asset_check_evaluations()
    return evaluation


def test_input_and_shard_checks(env):
    root, resources, instance = env
    built = materialize([psf_library, noise_pool], resources=resources, instance=instance)
    assert built.success
    assert materialize(
        [psf_library, noise_pool, simulated_galaxies],
        selection=["simulated_galaxies"],
        partition_key="shard-000",
        resources=resources,
        instance=instance,
    ).success
    assert run_check(psf_library_valid, psf_library, resources, instance).passed
    assert run_check(noise_pool_valid, noise_pool, resources, instance).passed
    settings = resources["settings"]
    shard_check = check_shard(settings, "shard-000")
    assert shard_check.passed, shard_check.metadata["problems"].value

    # A PSF that no longer sums to one.
    from astropy.io import fits

    psf_file = root / "psf_library" / "all" / "psfs.fits"
    with fits.open(psf_file, mode="update") as hdul:
        hdul[0].data[0] *= 1.5
    bad = run_check(psf_library_valid, psf_library, resources, instance)
    assert not bad.passed and "sums deviate from 1" in bad.metadata["problems"].value

    # Noise twice as loud as configured.
    pixels_file = root / "noise_pool" / "all" / "noise_pixels.npy"
    save_npy(pixels_file, 2.0 * np.load(pixels_file))
    bad = run_check(noise_pool_valid, noise_pool, resources, instance)
    assert not bad.passed and "pixel std" in bad.metadata["problems"].value

    # A B/T outside [0, 1], a NaN pixel and the test split relabelled as train.
    shard = root / "simulated_galaxies" / "shard-000"
    labels = pl.read_parquet(shard / "labels.parquet")
    labels = labels.with_columns(
        pl.when(pl.int_range(pl.len()) == 0).then(1.5).otherwise(pl.col("bt")).alias("bt"),
        pl.when(pl.col("split") == "test")
        .then(pl.lit("train"))
        .otherwise(pl.col("split"))
        .alias("split"),
    )
    labels.write_parquet(shard / "labels.parquet")
    images = np.load(shard / "images.npy")
    images[1, 5, 5] = np.nan
    save_npy(shard / "images.npy", images)
    bad = check_shard(settings, "shard-000")
    problems = bad.metadata["problems"].value
    assert not bad.passed
    assert "bt in" in problems and "outside prior" in problems
    assert "1 NaN/inf image pixels" in problems
    assert "test fraction 0.000" in problems


def _write_model(folder, train_losses):
    folder.mkdir(parents=True)
    for name in ("state_dict.pt", "model.json", "label_scaler.json"):
        (folder / name).write_text("{}")
    history = [
        {"epoch": i + 1, "train_loss": loss, "val_loss": loss + 0.1}
        for i, loss in enumerate(train_losses)
    ]
    (folder / "history.json").write_text(json.dumps(history))


def test_trained_model_check(env):
    root, resources, instance = env
    _write_model(root / "trained_model" / "dropout-0", [3.0, 2.0, 1.5])
    _write_model(root / "trained_model" / "dropout-0.05", [1.0, 2.0, 5.0])
    good = check_model(resources["settings"], "dropout-0")
    assert good.passed and good.metadata["final_train_loss"].value == 1.5
    bad = check_model(resources["settings"], "dropout-0.05")
    assert not bad.passed and "did not fall: 1 -> 5" in bad.metadata["problems"].value


def _write_calibration(root, coverage_offset, n_val):
    folder = root / "calibrated_dropout_rate" / "all"
    folder.mkdir(parents=True, exist_ok=True)
    rows = [
        {
            "dropout_rate": 0.05,
            "split": "val",
            "parameter": p,
            "level": level,
            "coverage": max(0.0, level - coverage_offset),
            "recalibrated": False,
        }
        for p in PARAMETERS
        for level in CREDIBLE_LEVELS
    ]
    pl.DataFrame(rows).write_parquet(folder / "coverage.parquet")
    (folder / "calibration.json").write_text(
        json.dumps(
            {
                "chosen_dropout_rate": 0.05,
                "model_name": "gampen-tiny",
                "model_version": "1",
                "recalibrated": False,
                "n_val_galaxies": n_val,
            }
        )
    )


def test_champion_coverage_check(env):
    root, resources, instance = env
    _write_calibration(root, coverage_offset=0.01, n_val=5000)
    good = run_check(
        champion_coverage_within_tolerance, calibrated_dropout_rate, resources, instance
    )
    assert good.passed
    # 10 points under nominal on 5000 galaxies: far beyond 0.03 + 3 binomial sigma.
    _write_calibration(root, coverage_offset=0.10, n_val=5000)
    bad = run_check(
        champion_coverage_within_tolerance, calibrated_dropout_rate, resources, instance
    )
    assert not bad.passed and "bt @ 0.6827" in bad.metadata["problems"].value
    # The same shortfall on 8 galaxies is counting noise; on 5000 it is not.
    lo8, _ = coverage_bounds(0.6827, 8, 0.03)
    lo5000, hi5000 = coverage_bounds(0.6827, 5000, 0.03)
    assert lo8 < 0.5827 < lo5000
    assert 0.6827 - 0.06 < lo5000 < 0.6827 - 0.03 < 0.6827 + 0.03 < hi5000 < 0.6827 + 0.06
    # 7 of 8 covered at 99.73 % is consistent with a calibrated model, 4 of 8 is not.
    lo, hi = coverage_bounds(0.9973, 8, 0.03)
    assert 4 / 8 < lo <= 7 / 8 and hi == 1.0


def _write_catalog(root, key, n):
    from gampen_ml.catalog import build_catalog, write_catalog
    from gampen_ml.flags import compute_flags
    from gampen_ml.posterior import summarize
    from tests.catalog_helpers import provenance

    rng = np.random.default_rng(0)
    truth = np.column_stack(
        [rng.uniform(0.05, 0.95, n), rng.uniform(0.3, 3.0, n), rng.uniform(1e4, 1e6, n)]
    )
    samples = truth[:, None, :] * (1 + 0.05 * rng.standard_normal((n, 64, 3)))
    catalog = build_catalog(
        summarize(samples),
        pl.DataFrame({"galaxy_id": np.arange(n, dtype=np.int64)}),
        None,
        **provenance(n_passes=64, dataset=key),
    )
    folder = root / "posterior_catalog" / key
    folder.mkdir(parents=True)
    write_catalog(folder, catalog)
    batch = root / "inbox_batches" / key
    batch.mkdir(parents=True)
    (batch / "_manifest.json").write_text(json.dumps({"cutouts": n}))
    flags_dir = root / "qualitative_flags" / key
    flags_dir.mkdir(parents=True)
    compute_flags(catalog, TINY.flags).write_parquet(flags_dir / "flags.parquet")
    return catalog


def test_catalog_and_flag_checks(env):
    root, resources, instance = env
    settings = resources["settings"]
    catalog = _write_catalog(root, "batch-a", 40)
    good = check_catalog(settings, "batch-a")
    assert good.passed, good.metadata["problems"].value
    assert check_flags(settings, "batch-a").passed

    # Flip one flag: no longer what the catalog implies.
    flags_file = root / "qualitative_flags" / "batch-a" / "flags.parquet"
    flags = pl.read_parquet(flags_file)
    flags.with_columns(
        pl.when(pl.int_range(pl.len()) == 3)
        .then(~pl.col("small"))
        .otherwise(pl.col("small"))
        .alias("small")
    ).write_parquet(flags_file)
    bad = check_flags(settings, "batch-a")
    assert not bad.passed and "'small': 1" in bad.metadata["problems"].value

    # A galaxy lost and an infinite mode.
    broken = catalog.slice(0, 39).with_columns(
        pl.when(pl.int_range(pl.len()) == 0)
        .then(np.inf)
        .otherwise(pl.col("re_arcsec_mode"))
        .alias("re_arcsec_mode")
    )
    broken.write_parquet(root / "posterior_catalog" / "batch-a" / "catalog.parquet")
    bad = check_catalog(settings, "batch-a")
    problems = bad.metadata["problems"].value
    assert not bad.passed
    assert "39 catalog rows for 40 input galaxies" in problems
    assert "re_arcsec_mode" in problems
