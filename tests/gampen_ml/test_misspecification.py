"""Misspecification evaluation: table schema and numbers, report files, asymmetry flag."""

from __future__ import annotations

import json
import math

import numpy as np
import polars as pl
import pytest
import torch

from gampen_ml.config import ImagingConfig, InferenceConfig, NetworkConfig, NoiseConfig, PSFConfig
from gampen_ml.data.transforms import LabelScaler
from gampen_ml.flags import FLAGS_SCHEMA, compute_flags, image_asymmetry
from gampen_ml.misspecification import (
    TABLE_SCHEMA,
    evaluate_misspecification,
    misspecification_report,
    variant_table,
)
from gampen_ml.model import GaMPEN
from gampen_ml.sim.noise import synthetic_noise_pool, write_noise_pool
from gampen_ml.sim.psf import synthetic_psf_library, write_psf_library
from gampen_ml.train import MODEL_FORMAT

PX = 64


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """A tiny-network model folder (random weights, fitted scaler), PSF library, noise pool."""
    from gampen_ml.config import get_profile

    root = tmp_path_factory.mktemp("misspec")
    profile = get_profile("tiny").replace(
        imaging=ImagingConfig(stamp_size_px=PX),
        network=NetworkConfig(
            width_multiplier=0.0625, fc_width=16, stn_output_px=32, stn_localization_pool=1
        ),
        psf=PSFConfig(n_psfs=2, stamp_size_px=15),
        noise=NoiseConfig(n_sky_objects=4),
        inference=InferenceConfig(n_passes=4, draws_per_pass=2, galaxies_per_batch=4),
    )
    torch.manual_seed(0)
    model = GaMPEN(profile.network, dropout_rate=0.1, image_px=PX)
    model_dir = root / "model"
    model_dir.mkdir()
    torch.save(model.state_dict(), model_dir / "state_dict.pt")
    labels = np.array([[0.2, 1.0, 1e5], [0.5, 2.0, 1e6], [0.0, 0.5, 3e4], [1.0, 3.0, 2e6]])
    LabelScaler.fit(labels).save(model_dir / "label_scaler.json")
    meta = {"format": MODEL_FORMAT, "profile": "tiny", "dropout_rate": 0.1, "image_px": PX,
            "network": profile.network.__dict__}  # fmt: skip
    (model_dir / "model.json").write_text(json.dumps(meta))
    psf_dir, noise_dir = root / "psf", root / "noise"
    psf_dir.mkdir()
    noise_dir.mkdir()
    write_psf_library(psf_dir, *synthetic_psf_library(profile.psf, profile.imaging, 1))
    write_noise_pool(noise_dir, synthetic_noise_pool(profile.noise, profile.imaging, 2))
    return profile, model_dir, psf_dir, noise_dir


def test_evaluation_returns_the_table_and_writes_the_report(setup, tmp_path):
    profile, model_dir, psf_dir, noise_dir = setup
    variants = ("nominal", "knots", "neighbour", "psf_outside")
    table = evaluate_misspecification(
        profile, model_dir, psf_dir, noise_dir, tmp_path, n_per_variant=6, seed=3,
        recalibration={"scale": [1.5, 1.0, 1.0]}, variants=variants,
    )  # fmt: skip
    assert table.schema == pl.Schema(TABLE_SCHEMA)
    assert table.height == 3 * len(variants)
    assert table["variant"].unique(maintain_order=True).to_list() == list(variants)
    nominal = table.filter(pl.col("variant") == "nominal")
    # The control of the nominal variant is itself.
    for t in ("68", "95", "99"):
        np.testing.assert_array_equal(nominal[f"coverage_{t}"], nominal[f"control_coverage_{t}"])
    cov = table.select("coverage_68", "coverage_95", "coverage_99").to_numpy()
    assert np.all((cov >= 0) & (cov <= 1)) and np.all(np.diff(cov, axis=1) >= 0)
    # Numbers recomputed from the written catalogs.
    cat = pl.read_parquet(tmp_path / "knots" / "catalog.parquet")
    labels = pl.read_parquet(tmp_path / "knots" / "labels.parquet")
    flags = pl.read_parquet(tmp_path / "knots" / "flags.parquet")
    aff = labels["affected"].to_numpy()
    assert (
        cat["recalibrated"].all() and "asymmetry" in cat.columns and "asymmetric" in flags.columns
    )
    t = cat.filter(aff)
    inside = (t["bt_hpd68_lo"] <= t["bt_true"]) & (t["bt_true"] <= t["bt_hpd68_hi"])
    row = table.filter((pl.col("variant") == "knots") & (pl.col("parameter") == "bt")).row(
        0, named=True
    )
    assert row["n_galaxies"] == int(aff.sum())
    assert math.isclose(row["coverage_68"], float(inside.mean()))
    fres = (t["flux_nJy_mode"] - t["flux_nJy_true"]) / t["flux_nJy_true"]
    frow = table.filter((pl.col("variant") == "knots") & (pl.col("parameter") == "flux_nJy"))
    assert math.isclose(frow["bias"][0], float(fres.mean()), rel_tol=1e-9)
    assert math.isclose(
        frow["unreliable_fraction"][0], float(flags.filter(aff)["unreliable"].mean())
    )
    # Same galaxies, same truths in every variant (paired comparison).
    nom = pl.read_parquet(tmp_path / "nominal" / "catalog.parquet")
    assert nom["flux_nJy_true"].equals(cat["flux_nJy_true"])
    # Knots and neighbours break the symmetry; the nominal images do not.
    assert nom["asymmetry"].abs().max() < cat.filter(aff)["asymmetry"].min()
    assert (tmp_path / "examples.png").stat().st_size > 0
    # Each catalog carries the PSF FWHM the galaxy was drawn with; the flag compares it with
    # the library's range: every out-of-library PSF (1.3-1.8") is caught, no nominal one.
    wide = pl.read_parquet(tmp_path / "psf_outside" / "catalog.parquet")["psf_fwhm_arcsec"]
    lib_hi = pl.read_parquet(psf_dir / "psfs.parquet")["measured_fwhm_arcsec"].max()
    assert wide.min() > lib_hi * 1.05 and nom["psf_fwhm_arcsec"].max() <= lib_hi
    fraction = table.filter(pl.col("variant") == "psf_outside")["psf_outside_library_fraction"]
    assert fraction.to_list() == [1.0] * 3
    assert table.filter(pl.col("variant") == "nominal")["psf_outside_library_fraction"].max() == 0

    md, js = misspecification_report(table, tmp_path / "report")
    text = md.read_text()
    assert "| knots | bt | " in text and "| neighbour | flux_nJy | " in text
    payload = json.loads(js.read_text())
    assert len(payload["rows"]) == table.height
    assert payload["rows"][0]["variant"] == "nominal"
    with pytest.raises(ValueError, match="sigma"):
        misspecification_report(table.drop("sigma"), tmp_path / "bad")


def test_variant_table_counts_flags_on_affected_galaxies_only():
    n = 4
    cat = pl.DataFrame(
        {
            **{f"{p}_true": [1.0] * n for p in ("bt", "re_arcsec", "flux_nJy")},
            **{f"{p}_mode": [1.0, 1.1, 1.2, 2.0] for p in ("bt", "re_arcsec", "flux_nJy")},
            **{f"{p}_hpd{t}_lo": [0.9, 1.05, 0.0, 1.5] for p in ("bt", "re_arcsec", "flux_nJy")
               for t in ("68", "95", "99")},
            **{f"{p}_hpd{t}_hi": [1.1, 1.2, 2.0, 2.5] for p in ("bt", "re_arcsec", "flux_nJy")
               for t in ("68", "95", "99")},
        }
    )  # fmt: skip
    flags = pl.DataFrame({"unreliable": [False, False, True, False]})
    affected = np.array([True, True, True, False])
    table = variant_table("x", cat, flags, affected, cat, flags)
    row = table.row(0, named=True)
    assert row["n_galaxies"] == 3
    assert math.isclose(row["coverage_68"], 2 / 3)  # galaxy 1 misses; galaxy 3 not affected
    assert math.isclose(row["unreliable_fraction"], 1 / 3)
    assert row["n_reliable"] == 2 and math.isclose(row["reliable_coverage_68"], 0.5)
    assert math.isnan(row["asymmetric_fraction"])  # no such flag in this table
    assert math.isclose(row["bias"], np.mean([0.0, 0.1, 0.2]))


def test_asymmetric_flag_is_optional_and_thresholded(tiny_profile):
    from gampen_ml.sim.misspecified import render_misspecified
    from gampen_ml.sim.noise import synthetic_noise_pool
    from gampen_ml.sim.parameters import sample_parameters

    base = {"galaxy_id": [1, 2], "dataset": ["d", "d"], "bt_mode": [0.5, 0.5],
            "re_arcsec_mode": [2.0, 2.0], "flux_nJy_mode": [1e5, 1e5]}  # fmt: skip
    for p, lo, hi in (("bt", 0.4, 0.6), ("re_arcsec", 1.9, 2.1), ("flux_nJy", 0.99e5, 1.01e5)):
        base[f"{p}_hpd68_lo"], base[f"{p}_hpd68_hi"] = [lo, lo], [hi, hi]
    cat = pl.DataFrame(base)
    assert compute_flags(cat, tiny_profile.flags).schema == pl.Schema(FLAGS_SCHEMA)
    with_a = compute_flags(cat.with_columns(asymmetry=pl.Series([0.001, 0.05])), tiny_profile.flags)
    assert with_a["asymmetric"].to_list() == [False, True]
    # A faint galaxy's asymmetry is noise-biased up by ~1 / peak S/N: the threshold allows for
    # it (0.01 + 3 / 50 = 0.07 at S/N 50, 0.0103 at S/N 1e4).
    snr = cat.with_columns(asymmetry=pl.Series([0.05, 0.05]), image_peak_snr=pl.Series([50.0, 1e4]))
    assert compute_flags(snr, tiny_profile.flags)["asymmetric"].to_list() == [False, True]
    # The statistic: ~0 for a centred symmetric galaxy, large for an added off-centre blob.
    imaging = ImagingConfig(stamp_size_px=PX)
    cube, _ = synthetic_psf_library(PSFConfig(n_psfs=1, stamp_size_px=15), imaging, 1)
    pool = synthetic_noise_pool(NoiseConfig(n_sky_objects=4), imaging, 2)
    params = sample_parameters(tiny_profile.simulation.priors, 3, np.random.default_rng(0))
    params = params.with_columns(flux_nJy=pl.lit(2e5), disk_re_arcsec=pl.lit(1.0),
                                 bulge_re_arcsec=pl.lit(0.5), re_arcsec=pl.lit(0.8))  # fmt: skip
    images, _ = render_misspecified("nominal", params, cube, pool, imaging, seed=1)
    sym = image_asymmetry(images)
    blob = images.copy()
    blob[:, 40:43, 40:43] += 2e3
    assert np.all(np.abs(sym) < 0.005) and np.all(image_asymmetry(blob) > 0.02)
