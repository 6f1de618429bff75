"""The calibration is fit on the validation split alone: the test split cannot leak into it."""

from __future__ import annotations

import numpy as np
import polars as pl
from conftest import RATE, TINY

from gampen_ml import stages
from gampen_ml.config import dropout_key
from gampen_ml.io import partition_dir


def _calibrate(world, out):
    out.mkdir()
    models = {RATE: partition_dir(world, "trained_model", dropout_key(RATE))}
    result = stages.calibrate_dropout_rates(
        TINY, models, stages.shard_dirs(TINY, world), out, device="cpu"
    )
    return result, (out / "recalibration.json").read_bytes()


def test_changing_the_test_split_leaves_the_calibration_identical(world, tmp_path):
    before, recal_before = _calibrate(world, tmp_path / "before")
    assert before.recalibration is not None and before.n_galaxies > 0
    rng = np.random.default_rng(3)
    changed = 0
    for shard in stages.shard_dirs(TINY, world):
        labels = pl.read_parquet(shard / "labels.parquet")
        test = np.flatnonzero(labels["split"].to_numpy() == "test")
        images = np.load(shard / "images.npy", mmap_mode="r+")
        images[test] = rng.normal(0.0, 50.0, images[test].shape).astype(images.dtype)
        images.flush()
        del images
        is_test = pl.col("split") == "test"
        labels.with_columns(
            re_arcsec=pl.when(is_test).then(pl.col("re_arcsec") * 3).otherwise("re_arcsec"),
            flux_nJy=pl.when(is_test).then(pl.col("flux_nJy") / 2).otherwise("flux_nJy"),
        ).write_parquet(shard / "labels.parquet")
        changed += len(test)
    assert changed > 0
    after, recal_after = _calibrate(world, tmp_path / "after")
    assert recal_after == recal_before
    assert after.coverage.equals(before.coverage)
    assert after.chosen_rate == before.chosen_rate
