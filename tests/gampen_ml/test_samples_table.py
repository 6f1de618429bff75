"""``samples.parquet`` (posterior samples in physical units) and the ``posterior_samples`` view."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from astropy.io import fits

from gampen_ml import config
from gampen_ml.catalog import (
    CATALOG_FILE,
    SAMPLE_TABLE_FILE,
    SAMPLE_TABLE_SCHEMA,
    SAMPLES_FILE,
    CatalogSchemaError,
    catalog_from_images,
)
from gampen_ml.cli import main
from gampen_ml.config import PARAMETERS, dropout_key
from gampen_ml.data.transforms import LabelScaler
from gampen_ml.database import ensure_schema, query
from gampen_ml.infer import mc_dropout_samples
from gampen_ml.io import partition_dir
from gampen_ml.model import GaMPEN
from gampen_ml.train import MODEL_FORMAT, MODEL_JSON_FILE, SCALER_FILE, STATE_DICT_FILE

LABELS = np.array([[0.2, 1.0, 1e5], [0.5, 2.0, 1e6], [0.0, 0.5, 3e4], [1.0, 3.0, 2e6]])
RATE = 0.1


def _stored_lists(path) -> dict[str, np.ndarray]:
    """Each list column of ``samples.parquet`` as an ``(N, T)`` float32 array."""
    df = pl.read_parquet(path)
    return {p: np.stack(df[p].to_list()).astype(np.float32) for p in PARAMETERS}


def test_catalog_from_images_writes_physical_samples_per_chunk(tiny_profile, tmp_path):
    torch.manual_seed(0)
    model = GaMPEN(tiny_profile.network, dropout_rate=RATE, image_px=164)
    scaler = LabelScaler.fit(LABELS)
    images = np.random.default_rng(1).normal(0, 3, (5, 164, 164)).astype(np.float32)
    meta = pl.DataFrame({"galaxy_id": np.array([17, 3, 99, 4, 50])})
    kwargs = dict(n_passes=6, seed=4, galaxies_per_batch=2, draws_per_pass=2)
    cat = catalog_from_images(
        model, scaler, images, meta, store_samples=True, sample_table=True, out_dir=tmp_path,
        dataset="night-1", **kwargs,
    )  # fmt: skip
    path = tmp_path / SAMPLE_TABLE_FILE
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([SAMPLE_TABLE_FILE, SAMPLES_FILE])
    table = pq.read_table(path)
    assert table.schema.equals(SAMPLE_TABLE_SCHEMA)
    assert table.schema.field("re_arcsec").type == pa.list_(pa.float32())
    assert pq.ParquetFile(path).num_row_groups == 3  # one per chunk of 2 galaxies
    df = pl.read_parquet(path)
    assert df["galaxy_id"].to_list() == cat["galaxy_id"].to_list() == [17, 3, 99, 4, 50]
    assert df["dataset"].to_list() == ["night-1"] * 5
    lists = _stored_lists(path)
    assert all(v.shape == (5, 12) for v in lists.values())  # T = 6 passes x 2 draws
    # The stored samples are the catalog's posterior, in physical units.
    for p in PARAMETERS:
        np.testing.assert_allclose(np.median(lists[p], axis=1), cat[f"{p}_median"], rtol=1e-6)
        np.testing.assert_allclose(lists[p].mean(axis=1), cat[f"{p}_mean"], rtol=1e-5)
    # ... exactly the float32 of the same pipeline run by hand.
    scaled = np.concatenate(
        [c for _, c in mc_dropout_samples(model, images, 6, seed=4, galaxies_per_batch=2,
                                          draws_per_pass=2)]
    )  # fmt: skip
    physical = scaler.inverse(scaled).astype(np.float32)
    for i, p in enumerate(PARAMETERS):
        np.testing.assert_array_equal(lists[p], physical[:, :, i])
    assert lists["flux_nJy"].min() > 1e3  # nJy, not the scaled space of samples.npy


def test_interrupted_run_leaves_no_sample_table(tiny_profile, tmp_path):
    model = GaMPEN(tiny_profile.network, dropout_rate=RATE, image_px=164)
    images = np.zeros((4, 164, 164), np.float32)
    meta = pl.DataFrame({"galaxy_id": [0, 1, 2, 3]})

    def stop_after_first_chunk(done: int, total: int) -> None:
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        catalog_from_images(
            model, LabelScaler.fit(LABELS), images, meta, n_passes=2, seed=0, sample_table=True,
            out_dir=tmp_path, galaxies_per_batch=2, progress=stop_after_first_chunk,
        )  # fmt: skip
    assert list(tmp_path.iterdir()) == []  # neither samples.parquet nor its temporary


def test_sample_table_needs_an_output_folder(tiny_profile):
    model = GaMPEN(tiny_profile.network, dropout_rate=RATE, image_px=164)
    images = np.zeros((2, 164, 164), np.float32)
    meta = pl.DataFrame({"galaxy_id": [0, 1]})
    with pytest.raises(CatalogSchemaError, match="sample_table need out_dir"):
        catalog_from_images(
            model, LabelScaler.fit(LABELS), images, meta, n_passes=2, seed=0, sample_table=True
        )


def test_posterior_samples_view_is_typed_before_any_file(tmp_path):
    db = tmp_path / "gampen.duckdb"
    ensure_schema(db, tmp_path / "storage")
    columns = {r["column_name"]: r["column_type"] for r in query(db, "DESCRIBE posterior_samples")}
    assert columns == {
        "galaxy_id": "BIGINT",
        "dataset": "VARCHAR",
        "bt": "FLOAT[]",
        "re_arcsec": "FLOAT[]",
        "flux_nJy": "FLOAT[]",
    }
    sql = "select list_aggregate(re_arcsec, 'quantile', 0.9) as q90 from posterior_samples"
    assert query(db, sql) == []


@pytest.fixture
def batch_world(tmp_path, tiny_profile):
    """Storage root with an (untrained) champion of the tiny network and a 10-cutout batch."""
    root = tmp_path / "storage"
    model_dir = partition_dir(root, "trained_model", dropout_key(RATE))
    model_dir.mkdir(parents=True)
    stamp = tiny_profile.imaging.stamp_size_px
    torch.manual_seed(0)
    torch.save(GaMPEN(tiny_profile.network, RATE, stamp).state_dict(), model_dir / STATE_DICT_FILE)
    LabelScaler.fit(LABELS).save(model_dir / SCALER_FILE)
    meta = {
        "format": MODEL_FORMAT,
        "profile": "tiny",
        "dropout_rate": RATE,
        "image_px": stamp,
        "network": dataclasses.asdict(tiny_profile.network),
    }
    (model_dir / MODEL_JSON_FILE).write_text(json.dumps(meta))
    calibration = partition_dir(root, "calibrated_dropout_rate")
    calibration.mkdir(parents=True)
    (calibration / "calibration.json").write_text(
        json.dumps({"chosen_dropout_rate": RATE, "model_name": "gampen-tiny",
                    "model_version": "unregistered", "recalibrated": False})
    )  # fmt: skip
    batch = partition_dir(root, "inbox_batches", "night-1")
    batch.mkdir(parents=True)
    rng = np.random.default_rng(2)
    y, x = np.mgrid[:stamp, :stamp] - (stamp - 1) / 2
    cube = np.stack(
        [f * np.exp(-np.hypot(y, x) / 5) + rng.normal(0, 2.3, (stamp, stamp))
         for f in np.geomspace(50, 800, 10)]
    ).astype(np.float32)  # fmt: skip
    hdu = fits.PrimaryHDU(cube)
    hdu.header["PIXSCALE"] = tiny_profile.imaging.pixel_scale_arcsec
    hdu.writeto(batch / "cube.fits")
    return root


def test_gampen_catalog_and_sql_answer_from_posterior_samples(
    batch_world, tiny_profile, tmp_path, monkeypatch, capsys
):
    # The profile option is what turns the table on, for the CLI and Dagster alike.
    with_table = tiny_profile.replace(
        inference=dataclasses.replace(tiny_profile.inference, sample_table=True)
    )
    monkeypatch.setitem(config.PROFILES, "tiny", with_table)
    root = batch_world
    args = ["--profile", "tiny", "--root", str(root)]
    assert main(["catalog", *args, "--dataset", "night-1", "--device", "cpu"]) == 0
    partition = partition_dir(root, "posterior_catalog", "night-1")
    assert {CATALOG_FILE, SAMPLE_TABLE_FILE} <= {p.name for p in partition.iterdir()}
    assert not [p for p in partition.parent.iterdir() if p.name.startswith(".")]
    path = partition / SAMPLE_TABLE_FILE
    assert pq.ParquetFile(path).num_row_groups == 2  # 10 galaxies, chunks of 8
    lists = _stored_lists(path)
    # DuckDB's discrete 'quantile' is numpy's inverted-CDF quantile of the stored float32.
    expected = np.quantile(lists["re_arcsec"], 0.9, axis=1, method="inverted_cdf")

    db = tmp_path / "gampen.duckdb"
    ensure_schema(db, root)
    capsys.readouterr()
    sql = (
        "select galaxy_id, round(list_aggregate(re_arcsec, 'quantile', 0.9), 6) as q90 "
        "from posterior_samples where dataset = 'night-1' order by galaxy_id"
    )
    assert main(["sql", *args, "--db", str(db), sql]) == 0
    out = capsys.readouterr().out
    # The rows of the printed table: "│ 0         ┆ 5.329378 │".
    rows = [
        [cell.strip() for cell in line.strip("│").split("┆")]
        for line in out.splitlines()
        if line.startswith("│") and line.strip("│ ").split("┆")[0].strip().isdigit()
    ]
    assert [int(r[0]) for r in rows] == list(range(10))
    np.testing.assert_allclose([float(r[1]) for r in rows], expected, rtol=0, atol=1.5e-6)

    # Joined to the catalog: every galaxy's list median is its catalog median.
    join = (
        "select count(*) as n from posterior_samples s join posterior_catalog c "
        "using (dataset, galaxy_id) "
        "where abs(list_aggregate(s.re_arcsec, 'median') - c.re_arcsec_median) "
        "<= 1e-6 * c.re_arcsec_median"
    )
    assert query(db, join) == [{"n": 10}]
