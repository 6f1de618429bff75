"""Catalog schema, assembly, Parquet round trip and the streaming image -> catalog path."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import torch

from gampen_ml.calibrate import Recalibration
from gampen_ml.catalog import (
    CATALOG_SCHEMA,
    SAMPLES_FILE,
    CatalogSchemaError,
    build_catalog,
    catalog_from_images,
    read_catalog,
    write_catalog,
)
from gampen_ml.data.transforms import LabelScaler
from gampen_ml.infer import mc_dropout_samples
from gampen_ml.model import GaMPEN
from gampen_ml.posterior import summarize
from tests.catalog_helpers import posterior_draws, provenance

DOC = Path(__file__).resolve().parents[2] / "docs" / "catalog.md"


def doc_columns() -> set[str]:
    """Column names of the catalog table in docs/catalog.md, with {p} expanded."""
    names = set()
    table = DOC.read_text().split("| column |")[1].split("\n\n")[0]
    for line in table.splitlines()[2:]:
        cell = line.split("|")[1]
        for name in re.findall(r"`([^`]+)`", cell):
            params = ("bt", "re_arcsec", "flux_nJy") if "{p}" in name else ("",)
            names.update(name.replace("{p}", p) for p in params)
    return names


def test_schema_matches_docs():
    assert doc_columns() == set(CATALOG_SCHEMA)


def fake_summary(n: int, seed: int = 0) -> pl.DataFrame:
    rng = np.random.default_rng(seed)
    return summarize(posterior_draws(rng, n, 50, re_sigma=0.2, flux_mu=11, flux_sigma=0.1))


def test_build_catalog_simulation_and_real():
    summary = fake_summary(4)
    meta = pl.DataFrame({"galaxy_id": [10, 11, 12, 13]})
    truths = pl.DataFrame(
        {
            "bt": [0.1, 0.2, 0.3, 0.0],
            "re_arcsec": [1.0, 2.0, 3.0, 0.5],
            "flux_nJy": [1e4, 1e5, 1e6, 3e3],
            "component": ["bulge+disk"] * 3 + ["disk"],
        }
    )
    kw = provenance(model_name="gampen", model_version="3", dropout_rate=0.01, dataset="sim-test")
    cat = build_catalog(summary, meta, truths, **kw)
    assert cat.columns == list(CATALOG_SCHEMA) and cat.schema == pl.Schema(CATALOG_SCHEMA)
    expected_mag = 31.4 - 2.5 * np.log10(summary["flux_nJy_mode"].to_numpy())
    np.testing.assert_allclose(cat["magnitude_mode"], expected_mag)
    assert cat["component_true"].to_list()[-1] == "disk"
    assert cat["n_passes"].dtype == pl.Int32 and cat["model_version"][0] == "3"
    assert cat["code_version"][0].startswith("0.1.0")
    real = build_catalog(
        summary,
        meta.with_columns(pl.lit("a.fits").alias("source_file"), pl.lit(1).alias("hdu")),
        None,
        **{**kw, "dataset": "batch-1"},
    )
    assert real["bt_true"].null_count() == 4 and real["hdu"].dtype == pl.Int32
    with pytest.raises(CatalogSchemaError, match="bt_hpd95_lo"):
        build_catalog(summary.drop("bt_hpd95_lo"), meta, truths, **kw)
    with pytest.raises(CatalogSchemaError, match="galaxy_id"):
        build_catalog(summary, meta.rename({"galaxy_id": "id"}), truths, **kw)


def test_write_read_round_trip_and_validation(tmp_path):
    summary = fake_summary(3)
    cat = build_catalog(
        summary,
        pl.DataFrame({"galaxy_id": [1, 2, 3]}),
        None,
        **provenance(model_name="m", dropout_rate=0.0, recalibrated=True, dataset="d"),
    )
    path = write_catalog(tmp_path, cat)
    assert path.name == "catalog.parquet"
    assert read_catalog(tmp_path).equals(cat)
    bad = cat.with_columns(pl.col("n_passes").cast(pl.Int64))
    with pytest.raises(CatalogSchemaError, match="n_passes.*Int64"):
        write_catalog(tmp_path, bad)
    with pytest.raises(CatalogSchemaError, match="bt_mode.*null"):
        write_catalog(tmp_path, cat.with_columns(pl.lit(None, pl.Float64).alias("bt_mode")))
    # A catalog stored before psf_fwhm_arcsec / asymmetry existed reads with them null;
    # any other missing column is still an error.
    old = tmp_path / "old"
    old.mkdir()
    cat.drop("psf_fwhm_arcsec", "asymmetry").write_parquet(old / "catalog.parquet")
    again = read_catalog(old)
    assert again.columns == cat.columns and again["psf_fwhm_arcsec"].null_count() == 3
    cat.drop("bt_mode").write_parquet(old / "catalog.parquet")
    with pytest.raises(CatalogSchemaError, match="missing column 'bt_mode'"):
        read_catalog(old)


def test_catalog_from_images_streams_and_matches_direct_summary(tiny_profile, tmp_path):
    torch.manual_seed(0)
    model = GaMPEN(tiny_profile.network, dropout_rate=0.1, image_px=164)
    labels = np.array([[0.2, 1.0, 1e5], [0.5, 2.0, 1e6], [0.0, 0.5, 3e4], [1.0, 3.0, 2e6]])
    scaler = LabelScaler.fit(labels)
    images = np.random.default_rng(1).normal(0, 3, (5, 164, 164)).astype(np.float32)
    meta = pl.DataFrame({"galaxy_id": np.arange(100, 105)})
    calls = []
    recal = Recalibration(scale=(1.2, 0.9, 1.0))
    cat = catalog_from_images(
        model,
        scaler,
        images,
        meta,
        n_passes=12,
        seed=4,
        recalibration=recal,
        store_samples=True,
        out_dir=tmp_path,
        progress=lambda d, t: calls.append((d, t)),
        dataset="sim-test",
        galaxies_per_batch=2,
    )
    assert calls == [(2, 5), (4, 5), (5, 5)]
    assert cat.height == 5 and cat["recalibrated"].all() and cat["dropout_rate"][0] == 0.1
    assert cat["galaxy_id"].to_list() == list(range(100, 105))
    stored = np.load(tmp_path / SAMPLES_FILE, mmap_mode="r")
    assert stored.shape == (5, 12, 3) and stored.dtype == np.float16
    # the same pipeline by hand gives the same summary
    scaled = np.concatenate(
        [c for _, c in mc_dropout_samples(model, images, 12, seed=4, galaxies_per_batch=2)]
    )
    scaled = recal.apply(scaled)
    np.testing.assert_allclose(stored, scaled.astype(np.float16))
    direct = summarize(scaler.inverse(scaled))
    np.testing.assert_allclose(cat["re_arcsec_median"], direct["re_arcsec_median"])
    np.testing.assert_allclose(cat["flux_nJy_hpd68_hi"], direct["flux_nJy_hpd68_hi"])
    bt = scaler.inverse(scaled)[:, :, 0]
    np.testing.assert_allclose(cat["bt_prob_bulge"], (bt >= 0.85).mean(axis=1))
    np.testing.assert_allclose(cat["bt_prob_disk"], (bt <= 0.10).mean(axis=1))
    with pytest.raises(CatalogSchemaError, match="meta has 4 rows"):
        catalog_from_images(model, scaler, images, meta.head(4), n_passes=4, seed=1)
