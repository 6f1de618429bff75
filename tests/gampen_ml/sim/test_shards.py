"""Shard writer on the tiny profile: labels schema, splits, ids, determinism, noise level."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest

from gampen_ml.config import derive_seed
from gampen_ml.io import atomic_partition_dir, file_sha256
from gampen_ml.sim.noise import synthetic_noise_pool, write_noise_pool
from gampen_ml.sim.psf import synthetic_psf_library, write_psf_library
from gampen_ml.sim.shards import LABEL_SCHEMA, open_shard, shard_labels, simulate_shard

SCHEMA = {
    "galaxy_id": pl.Int64,
    "shard": pl.String,
    "split": pl.String,
    "seed": pl.Int64,
    "psf_id": pl.Int32,
    "noise_scale": pl.Float64,
    "component": pl.String,
    **{
        c: pl.Float64
        for c in (
            "bt re_arcsec flux_nJy magnitude disk_n disk_re_arcsec disk_q disk_pa_deg "
            "bulge_n bulge_re_arcsec bulge_q bulge_pa_deg"
        ).split()
    },
}


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    from gampen_ml.config import get_profile

    profile = get_profile("tiny")
    root = tmp_path_factory.mktemp("siminputs")
    psf_dir, noise_dir = root / "psf", root / "noise"
    for d in (psf_dir, noise_dir):
        d.mkdir()
    write_psf_library(
        psf_dir,
        *synthetic_psf_library(
            profile.psf, profile.imaging, derive_seed(profile.seed, "psf_library")
        ),
    )
    write_noise_pool(
        noise_dir,
        synthetic_noise_pool(
            profile.noise, profile.imaging, derive_seed(profile.seed, "noise_pool")
        ),
    )
    return profile, psf_dir, noise_dir


def test_labels_schema_splits_and_ids(inputs):
    profile, _, _ = inputs
    a = shard_labels(profile, "shard-000", 4)
    b = shard_labels(profile, "shard-001", 4)
    assert dict(a.schema) == SCHEMA
    # The schema the asset check compares shards with is the one the writer produces, in order.
    assert list(a.schema.items()) == list(LABEL_SCHEMA.items())
    assert a.height == b.height == 24
    ids = np.r_[a["galaxy_id"].to_numpy(), b["galaxy_id"].to_numpy()]
    np.testing.assert_array_equal(np.sort(ids), np.arange(48))
    counts = a["split"].value_counts().sort("split")
    assert dict(zip(counts["split"], counts["count"], strict=True)) == {
        "train": 17,
        "val": 4,
        "test": 3,
    }
    assert a.equals(shard_labels(profile, "shard-000", 4))
    assert not a["seed"].equals(b["seed"])
    with pytest.raises(ValueError, match="shard-009"):
        shard_labels(profile, "shard-009", 4)


def test_shard_bytes_identical_across_workers(inputs, tmp_path):
    profile, psf_dir, noise_dir = inputs
    final_1, final_2 = tmp_path / "one", tmp_path / "two"
    with atomic_partition_dir(final_1) as out:
        s1 = simulate_shard(profile, "shard-001", psf_dir, noise_dir, out, n_workers=1)
    with atomic_partition_dir(final_2) as out:
        s2 = simulate_shard(profile, "shard-001", psf_dir, noise_dir, out, n_workers=2)
    assert (s1.n_galaxies, s1.first_galaxy_id, s1.n_train, s1.n_val, s1.n_test) == (
        24,
        24,
        17,
        4,
        3,
    )
    assert s2.n_workers == 2
    for name in ("images.npy", "labels.parquet"):
        assert file_sha256(final_1 / name) == file_sha256(final_2 / name)
    images, labels = open_shard(final_1)
    assert images.shape == (24, 239, 239) and images.dtype == np.float32
    assert isinstance(images, np.memmap)
    assert np.isfinite(images).all()
    # Flux is recovered (galaxies are bright, noise has zero mean) and the corner sky
    # carries the pool's noise level.
    sums = images.sum(axis=(1, 2), dtype=np.float64)
    assert np.median(sums / labels["flux_nJy"].to_numpy()) == pytest.approx(1.0, abs=0.03)
    corner = images[:, :20, :20]
    assert corner.std() == pytest.approx(profile.noise.sky_sigma_nJy, rel=0.2)


def test_depth_scale_multiplies_each_galaxys_noise(inputs, tmp_path):
    import dataclasses

    from gampen_ml.flags import image_statistics

    profile, psf_dir, noise_dir = inputs
    deep_and_shallow = dataclasses.replace(
        profile, noise=dataclasses.replace(profile.noise, depth_scale_range=(0.5, 2.0))
    )
    with atomic_partition_dir(tmp_path / "s") as out:
        simulate_shard(deep_and_shallow, "shard-000", psf_dir, noise_dir, out, n_workers=1)
    images, labels = open_shard(tmp_path / "s")
    scale = labels["noise_scale"].to_numpy()
    assert scale.min() >= 0.5 and scale.max() <= 2.0 and scale.max() / scale.min() > 2
    sigma = image_statistics(images)["noise_sigma_nJy"].to_numpy()
    plain = shard_labels(profile, "shard-000", 4)
    assert (plain["noise_scale"] == 1.0).all()
    # The frame's noise follows the galaxy's factor (pool sigma ~2.3 nJy).
    np.testing.assert_allclose(sigma / scale, np.median(sigma / scale), rtol=0.12)
    # Everything else is drawn as without the factor.
    assert labels.drop("noise_scale").equals(plain.drop("noise_scale"))
