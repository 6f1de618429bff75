"""Label -> fine-tune -> catalog, chained as an astronomer runs them, on the tiny world.

Cutouts of a "survey" (the tiny world's galaxies, brighter, as platform FITS with a PSF
FWHM) are labelled by ``gampen label`` (pysersic, bulge + disk), the labels table becomes
the domain's labelled set, the champion is fine-tuned on it, and ``gampen predict
--domain`` catalogues the survey's files with the fine-tuned model. Each step reads only
what the step before wrote.
"""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
from astropy.io import fits

from gampen_ml import stages
from gampen_ml.cli import main
from gampen_ml.data.datasets import ShardImages
from gampen_ml.finetune import FinetuneConfig, finetune_and_publish
from gampen_ml.label import STATUS_OK, read_labels
from gampen_ml.labelled import publish_labelled_set
from gampen_ml.store import Store
from tests.gampen_ml.test_finetune import FLUX_FACTOR, write_domain
from tests.reliability.conftest import TINY, copy_world, tiny_world  # noqa: F401

pytest.importorskip("pysersic", reason="the labeller needs pysersic (the dev extra)")
pytestmark = pytest.mark.slow

DOMAIN = "tiny-chain"
N_GALAXIES = 10
PSF_FWHM_ARCSEC = 0.8


def test_label_then_finetune_then_catalog_by_domain(tiny_world, tmp_path, monkeypatch, capsys):  # noqa: F811
    home, root = tmp_path / "home", copy_world(tiny_world, tmp_path / "storage")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("GAMPEN_STORAGE", str(root))
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    domain = write_domain(home, DOMAIN, TINY.imaging.stamp_size_px)
    store = Store.of(root)

    # The survey's cutouts: the brightest tiny galaxies (a fit of a sky-limited blob says
    # little), one per file, with the header keys the labeller reads.
    data = ShardImages(stages.shard_dirs(TINY, root), None)
    order = np.argsort(-data.labels["flux_nJy"].to_numpy())[:N_GALAXIES]
    images = data.images(np.sort(order)) * np.float32(FLUX_FACTOR)
    truth = data.labels[np.sort(order).tolist()]
    survey = home / "labelled" / DOMAIN
    survey.mkdir(parents=True)
    header = fits.Header({"PIXSCALE": TINY.imaging.pixel_scale_arcsec, "PSF_FWHM": PSF_FWHM_ARCSEC})
    for i, image in enumerate(images):
        fits.PrimaryHDU(image, header=header).writeto(survey / f"g{i:03d}.fits")

    # 1. gampen label: the labels table of the labelled set, from the fitter alone.
    labels_path = survey / "labels.parquet"
    argv = ["label", str(survey), "--out", str(labels_path), "--domain", DOMAIN]
    assert main([*argv, "--profile", "tiny", "--workers", "2"]) == 0
    labels = read_labels(labels_path).sort("file")
    ok = labels.filter(pl.col("fit_status") == STATUS_OK)
    assert ok.height >= N_GALAXIES - 2, labels.select("file", "fit_status")
    fitted_flux = ok["flux_nJy"].to_numpy()
    true_flux = truth["flux_nJy"].to_numpy()[[int(f[1:4]) for f in ok["file"]]] * FLUX_FACTOR
    assert np.median(np.abs(fitted_flux / true_flux - 1)) < 0.2  # the labels are real fits

    # 2. The labelled set: the fitter's table as written (failed fits are left out by reason).
    result = publish_labelled_set(
        TINY, domain, survey, store.labelled_set(DOMAIN), home / "quarantine"
    )
    splits = result.manifest["splits"]
    assert splits["train"] > 0 and splits["val"] > 0

    # 3. Fine-tune the champion on it and recalibrate on its val split.
    tuned = finetune_and_publish(
        TINY, root, DOMAIN,
        config=FinetuneConfig(freeze="none", lr_factor=1.0, max_epochs=2, patience=2,
                              batch_size=4),
    )  # fmt: skip
    assert tuned.calibration["label_set_sha256"] == result.label_set_sha256
    assert (store.finetuned_model(DOMAIN) / "state_dict.pt").is_file()

    # 4. gampen predict --domain catalogues the survey with the fine-tuned model.
    out = tmp_path / "catalog.parquet"
    argv = ["predict", str(survey), "--domain", DOMAIN, "--out", str(out), "--root", str(root)]
    capsys.readouterr()
    assert main([*argv, "--profile", "tiny", "--device", "cpu"]) == 0
    catalog = pl.read_parquet(out)
    assert catalog.height == N_GALAXIES  # the labels table is not a cutout
    assert set(catalog["model_name"]) == {f"gampen-tiny-{DOMAIN}"}
    assert set(catalog["domain"]) == {DOMAIN}
    assert catalog["flux_nJy_mode"].is_finite().all()
