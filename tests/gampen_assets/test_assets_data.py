"""PSF library, noise pool and one simulation shard materialized by Dagster on the tiny profile."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from dagster import DagsterInstance, materialize

from gampen_assets.assets.data_assets import (
    noise_pool,
    psf_library,
    shard_partitions,
    simulated_galaxies,
)
from gampen_assets.checks import noise_pool_valid, psf_library_valid, simulated_galaxies_valid
from gampen_assets.resources import GampenSettings
from gampen_ml.config import shard_keys
from gampen_ml.database import query


@pytest.fixture
def tiny_env(dagster_home):
    """Storage root, DuckDB and MLflow store in tmp; resources for the tiny profile."""
    settings = GampenSettings(
        profile_name="tiny",
        storage_root=str(dagster_home / "storage"),
        dagster_home=str(dagster_home),
        device="cpu",
    )
    return dagster_home, {"settings": settings}


def test_inputs_and_one_shard(tiny_env, tiny_profile):
    tmp_path, resources = tiny_env
    instance = DagsterInstance.ephemeral()
    inputs = materialize(
        [psf_library, noise_pool, psf_library_valid, noise_pool_valid],
        resources=resources,
        instance=instance,
    )
    assert inputs.success
    psf_meta = inputs.asset_materializations_for_node("psf_library")[0].metadata
    assert psf_meta["n_psfs"].value == float(tiny_profile.psf.n_psfs)
    assert psf_meta["max_abs_sum_minus_1"].value < 1e-5
    lo, hi = tiny_profile.psf.fwhm_range_arcsec
    assert lo <= psf_meta["fwhm_median_arcsec"].value <= hi
    assert psf_meta["psf_thumbnails"].value.startswith("![PSFs](data:image/png;base64,")
    noise_meta = inputs.asset_materializations_for_node("noise_pool")[0].metadata
    sigma = tiny_profile.noise.sky_sigma_nJy
    assert noise_meta["pixel_std_nJy"].value == pytest.approx(sigma, rel=0.1)
    checks = inputs.get_asset_check_evaluations()
    assert len(checks) == 2 and all(c.passed for c in checks)

    shard = materialize(
        [psf_library, noise_pool, simulated_galaxies, simulated_galaxies_valid],
        selection=["simulated_galaxies"],
        partition_key="shard-001",
        resources=resources,
        instance=instance,
    )
    assert shard.success
    (check,) = shard.get_asset_check_evaluations()
    assert check.passed, check.metadata["problems"].value
    meta = shard.asset_materializations_for_node("simulated_galaxies")[0].metadata
    per_shard = tiny_profile.simulation.n_galaxies // tiny_profile.simulation.n_shards
    assert meta["n_galaxies"].value == float(per_shard)
    assert meta["n_train"].value + meta["n_val"].value + meta["n_test"].value == per_shard
    assert meta["dagster/row_count"].value == per_shard
    folder = tmp_path / "storage" / "simulated_galaxies" / "shard-001"
    images = np.load(folder / "images.npy", mmap_mode="r")
    labels = pl.read_parquet(folder / "labels.parquet")
    s = tiny_profile.imaging.stamp_size_px
    assert images.shape == (per_shard, s, s) and images.dtype == np.float32
    assert set(labels["shard"]) == {"shard-001"}
    # No half partitions left behind.
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]

    rows = query(
        tmp_path / "gampen.duckdb",
        "SELECT asset, partition, data_version, row_count FROM lineage ORDER BY asset",
    )
    assert {(r["asset"], r["partition"]) for r in rows} >= {
        ("noise_pool", "all"),
        ("psf_library", "all"),
        ("simulated_galaxies", "shard-001"),
    }
    shard_row = next(r for r in rows if r["asset"] == "simulated_galaxies")
    assert shard_row["row_count"] == per_shard
    upstream = query(
        tmp_path / "gampen.duckdb",
        "SELECT upstream_asset, upstream_data_version FROM lineage_upstream "
        "ORDER BY upstream_asset",
    )
    recorded = {r["upstream_asset"]: r["upstream_data_version"] for r in upstream}
    psf_version = inputs.asset_materializations_for_node("psf_library")[0].tags[
        "dagster/data_version"
    ]
    assert recorded["psf_library"] == psf_version


def test_partition_outside_profile_fails_without_retry(tiny_env, tiny_profile):
    _, resources = tiny_env
    # Partitions follow the load-time profile (quick: 4 shards); tiny has only 2.
    extra = [k for k in shard_partitions.get_partition_keys() if k not in shard_keys(tiny_profile)]
    if not extra:
        pytest.skip("definitions were loaded with a profile of no more shards than tiny")
    result = materialize(
        [simulated_galaxies],
        partition_key=extra[0],
        resources=resources,
        instance=DagsterInstance.ephemeral(),
        raise_on_error=False,
    )
    assert not result.success
    failure = result.failure_data_for_node("simulated_galaxies")
    assert "not a simulation shard of profile 'tiny'" in failure.error.message
    # A configuration error is not retried (one attempt, no retry events).
    assert not [e for e in result.all_events if e.event_type_value == "STEP_UP_FOR_RETRY"]
