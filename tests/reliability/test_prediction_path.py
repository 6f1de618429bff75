"""One prediction path: the inbox and ``gampen predict`` give the same calibrated rows."""

from __future__ import annotations

import json

import numpy as np
import polars as pl
import pytest
from conftest import TINY
from fits_cases import galaxy, write_fits

from gampen_ml import stages
from gampen_ml.calibrate import Recalibration
from gampen_ml.io import partition_dir

RECAL = Recalibration(scale=(1.2, 0.6, 0.5), exponent=(1.0, 1.3, 1.0))


@pytest.fixture
def calibrated_world(world):
    """The tiny world with a recalibration beside its calibration, and a batch of cutouts."""
    calib = partition_dir(world, "calibrated_dropout_rate")
    (calib / "recalibration.json").write_text(json.dumps(RECAL.to_dict()))
    record = json.loads((calib / "calibration.json").read_text())
    (calib / "calibration.json").write_text(json.dumps({**record, "recalibrated": True}))
    batch = partition_dir(world, "inbox_batches", "night-7")
    for i in range(5):
        write_fits(batch / f"g{i}.fits", galaxy(i, flux_nJy=2e4 * (i + 1)), {"PIXSCALE": 0.168})
    return world


def test_inbox_and_predict_agree_row_for_row(calibrated_world, tmp_path):
    world = calibrated_world
    inbox = stages.catalog_and_publish(TINY, world, "night-7", device="cpu")
    champion = stages.resolve_prediction_model(TINY, world)
    assert champion.recalibration == stages.champion_model(TINY, world).recalibration
    result = stages.predict_cutouts(
        TINY, partition_dir(world, "inbox_batches", "night-7"), champion,
        tmp_path / "p.parquet", device="cpu",
    )  # fmt: skip
    assert result.catalog.equals(inbox)
    assert inbox["recalibrated"].all() and inbox.height == 5
    assert pl.read_parquet(tmp_path / "p.parquet").equals(inbox)


def test_a_model_that_is_not_the_champion_is_not_recalibrated(calibrated_world, tmp_path):
    import shutil

    world = calibrated_world
    champion_dir = stages.champion_model(TINY, world).model_dir
    # The champion's folder by path is the champion, recalibration included.
    assert stages.resolve_prediction_model(TINY, world, str(champion_dir)).calibrated
    copy = shutil.copytree(champion_dir, tmp_path / "other-model")
    warnings: list[str] = []
    other = stages.resolve_prediction_model(TINY, world, str(copy), log=warnings.append)
    assert not other.calibrated and warnings
    batch = partition_dir(world, "inbox_batches", "night-7")
    raw = stages.predict_cutouts(TINY, batch, other, tmp_path / "raw.parquet", device="cpu")
    calibrated = stages.predict_cutouts(
        TINY, batch, stages.champion_model(TINY, world), tmp_path / "cal.parquet", device="cpu"
    )
    assert not raw.catalog["recalibrated"].any()
    # Same network, same seed: the recalibration (Re spread x 0.6) is the only difference.
    width = {
        name: (c.catalog["re_arcsec_hpd68_hi"] - c.catalog["re_arcsec_hpd68_lo"]).to_numpy()
        for name, c in (("raw", raw), ("cal", calibrated))
    }
    assert np.median(width["cal"] / width["raw"]) < 0.8


def test_no_calibration_and_no_registry_says_what_to_do(world, tmp_path):
    shutil_root = tmp_path / "empty"
    with pytest.raises(FileNotFoundError, match="calibrate the dropout rate first"):
        stages.resolve_prediction_model(TINY, shutil_root)
