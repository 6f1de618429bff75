"""Catalogs pick their model by domain: a batch's ``batch.toml`` -> ingestion read as that
survey -> the domain's fine-tuned model when it exists, else the champion, said so.

The survey here is made of the tiny world's own test galaxies written the way the Legacy
Surveys deliver cutouts (nanomaggies, image + inverse-variance HDUs per band, a sibling PSF
file): read through their domain they must give the rows the platform's own FITS give.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from astropy.io import fits
from dagster import DagsterInstance, materialize

from gampen_ml import stages
from gampen_ml.cli import main
from gampen_ml.config import PARAMETERS, dropout_key
from gampen_ml.domains import load_domain
from gampen_ml.fits_input import BATCH_FILE
from gampen_ml.inbox import (
    MANIFEST,
    PROCESSING,
    READY_MARKER,
    STORED_BATCHES,
    claim_batch,
    ingest_claimed,
    ready_batches,
    stored_batch_domain,
)
from gampen_ml.io import partition_dir
from gampen_ml.sim.psf import measure_fwhm_arcsec
from tests.reliability.conftest import RATE, TINY, copy_world, tiny_world  # noqa: F401

DOMAIN = "tiny-survey"
NMGY_NJY = 3631.0
N_GALAXIES = 3
DOMAIN_TOML = f"""\
name = "{DOMAIN}"
pixel_scale_arcsec = {TINY.imaging.pixel_scale_arcsec}
stamp_size_px = {TINY.imaging.stamp_size_px}
flux_unit = "nanomaggy"

[image]
keywords = {{ IMAGETYP = "image", BAND = "r" }}

[weight]
keywords = {{ IMAGETYP = "invvar", BAND = "r" }}

[psf]
file = "psf_{{suffix}}.fits"
keywords = {{ BAND = "r" }}
"""
SKY_SIGMA_NJY = TINY.noise.sky_sigma_nJy


def survey_header(band: str, kind: str) -> fits.Header:
    scale_deg = TINY.imaging.pixel_scale_arcsec / 3600.0
    return fits.Header(
        {
            "IMAGETYP": kind, "BAND": band, "CTYPE1": "RA---TAN", "CTYPE2": "DEC--TAN",
            "CRVAL1": 150.0, "CRVAL2": 2.0, "CRPIX1": 120.0, "CRPIX2": 120.0,
            "CD1_1": -scale_deg, "CD1_2": 0.0, "CD2_1": 0.0, "CD2_2": scale_deg,
        }
    )  # fmt: skip


def write_survey_cutout(folder: Path, tag: str, image_nJy: np.ndarray, psf: np.ndarray) -> None:
    """``cutout_<tag>.fits`` + ``psf_<tag>.fits`` laid out as the Legacy Surveys deliver them."""
    image_nmgy = (image_nJy / NMGY_NJY).astype(np.float32)
    invvar = np.full_like(image_nmgy, (NMGY_NJY / SKY_SIGMA_NJY) ** 2)
    hdus = [fits.PrimaryHDU(header=fits.Header({"IMAGETYP": "image"}))]
    for band, scale in (("g", 0.5), ("r", 1.0)):
        hdus.append(fits.ImageHDU(image_nmgy * scale, header=survey_header(band, "image")))
        hdus.append(fits.ImageHDU(invvar, header=survey_header(band, "invvar")))
    fits.HDUList(hdus).writeto(folder / f"cutout_{tag}.fits")
    psfs = fits.HDUList(
        [
            fits.PrimaryHDU(psf[::-1].astype(np.float32), header=fits.Header({"BAND": "g"})),
            fits.ImageHDU(psf.astype(np.float32), header=fits.Header({"BAND": "r"})),
        ]
    )
    psfs.writeto(folder / f"psf_{tag}.fits")


@pytest.fixture(scope="module")
def galaxies(tiny_world):  # noqa: F811
    """The first test galaxies of the tiny world (nJy) and one library PSF."""
    images, _, _ = stages.dataset_inputs(TINY, tiny_world, stages.SIM_TEST)
    with fits.open(partition_dir(tiny_world, "psf_library") / "psfs.fits") as hdul:
        psf = np.asarray(hdul[0].data[0], dtype=np.float64)
    return np.asarray(images[:N_GALAXIES]), psf


@pytest.fixture
def site(tiny_world, galaxies, tmp_path, monkeypatch):  # noqa: F811
    """A Dagster home with the domain declared and one survey batch waiting in its inbox."""
    home = tmp_path / "home"
    root = copy_world(tiny_world, tmp_path / "storage")
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.setenv("GAMPEN_STORAGE", str(root))
    monkeypatch.delenv("GAMPEN_INBOX", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    (home / "domains").mkdir(parents=True)
    (home / "domains" / f"{DOMAIN}.toml").write_text(DOMAIN_TOML)
    batch = home / "inbox" / "survey-night-1"
    batch.mkdir(parents=True)
    images, psf = galaxies
    for i, image in enumerate(images):
        write_survey_cutout(batch, f"{i}.0_2.0", image, psf)
    (batch / BATCH_FILE).write_text(f'domain = "{DOMAIN}"\n')
    (batch / READY_MARKER).touch()
    return home, root, batch


def claim(home: Path) -> tuple[str, Path]:
    inbox = home / "inbox"
    (ready,) = ready_batches(inbox, settle_s=0)
    key = ready.name
    return key, claim_batch(ready, key, inbox)


def publish_finetuned(root: Path, version: str = "7") -> Path:
    """A fine-tuned model folder as the fine-tuning stage publishes it: a tiny trained model
    and its calibration.json (storage contract of issue 19)."""
    folder = partition_dir(root, "finetuned_model", DOMAIN)
    shutil.copytree(partition_dir(root, "trained_model", dropout_key(RATE)), folder)
    (folder / "calibration.json").write_text(
        json.dumps(
            {
                "model_name": f"gampen-tiny-{DOMAIN}",
                "model_version": version,
                "dropout_rate": RATE,
                "recalibration": None,
                "base_model_name": "gampen-tiny",
                "base_model_version": "unregistered",
                "label_set_sha256": "0" * 64,
                "domain": DOMAIN,
                "coverage": [],
            }
        )
    )
    return folder


def test_a_domain_batch_is_read_as_its_survey_and_catalogued_by_the_champion(
    site, galaxies, tmp_path
):
    home, root, _ = site
    images, psf = galaxies
    key, claimed = claim(home)
    result = ingest_claimed(claimed, key, TINY, root, home / "quarantine", domains=home / "domains")
    assert (result.domain, result.n_files_in, result.n_files_accepted) == (DOMAIN, 6, 3)
    assert result.n_files_quarantined == 0 and result.problem is None
    stored = root / STORED_BATCHES / key
    manifest = json.loads((stored / MANIFEST).read_text())
    assert manifest["domain"] == DOMAIN and len(manifest["psf_files"]) == N_GALAXIES
    assert sorted(p.name for p in stored.iterdir()) == sorted(
        [MANIFEST]
        + [f"{kind}_{i}.0_2.0.fits" for i in range(N_GALAXIES) for kind in ("cutout", "psf")]
    )
    assert not (home / "inbox" / PROCESSING / key).exists()  # batch.toml released too

    domain = stored_batch_domain(root, key, home / "domains")
    said: list[str] = []
    model = stages.resolve_prediction_model(TINY, root, domain=domain.name, log=said.append)
    assert model.finetuned_for is None and model.model_name == "gampen-tiny"
    assert said == [
        f"domain {DOMAIN}: no fine-tuned model at "
        f"{partition_dir(root, 'finetuned_model', DOMAIN)}; the champion is used"
    ]
    catalog = stages.catalog_and_publish(TINY, root, key, device="cpu", model=model, domain=domain)
    assert catalog["domain"].to_list() == [DOMAIN] * N_GALAXIES
    assert set(catalog["model_name"]) == {"gampen-tiny"}
    assert catalog["hdu"].to_list() == [3] * N_GALAXIES  # the r image, not g
    # Nanomaggies came back as nJy: the cutouts' pixel sums are the simulated images'.
    np.testing.assert_allclose(
        catalog["image_flux_nJy"], images.sum(axis=(1, 2), dtype=np.float64), rtol=1e-5
    )
    fwhm = measure_fwhm_arcsec(psf, TINY.imaging.pixel_scale_arcsec)
    np.testing.assert_allclose(catalog["psf_fwhm_arcsec"], fwhm, rtol=1e-5)
    # The same galaxies as platform FITS (nJy, no domain) give the same posteriors.
    plain = tmp_path / "plain"
    plain.mkdir()
    for i, image in enumerate(images):
        header = fits.Header({"PIXSCALE": TINY.imaging.pixel_scale_arcsec, "PSF_FWHM": fwhm})
        fits.PrimaryHDU(image, header=header).writeto(plain / f"cutout_{i}.0_2.0.fits")
    reference = stages.predict_cutouts(TINY, plain, model, tmp_path / "plain.parquet").catalog
    assert reference["domain"].null_count() == N_GALAXIES
    for p in PARAMETERS:
        np.testing.assert_allclose(catalog[f"{p}_median"], reference[f"{p}_median"], rtol=1e-3)


def _asset_run(home: Path, root: Path, key: str, instance: DagsterInstance):
    from gampen_assets.assets import ALL_ASSETS
    from gampen_assets.partitions import datasets
    from gampen_assets.resources import GampenSettings

    instance.add_dynamic_partitions(datasets.name, [key])
    settings = GampenSettings(
        profile_name="tiny", storage_root=str(root), dagster_home=str(home), device="cpu"
    )
    return materialize(
        ALL_ASSETS,
        selection=["posterior_catalog", "qualitative_flags"],
        partition_key=key,
        resources={"settings": settings},
        instance=instance,
        raise_on_error=False,
    )


def test_the_catalog_asset_routes_a_domain_batch_to_its_finetuned_model(site):
    home, root, _ = site
    tuned_dir = publish_finetuned(root)
    key, _ = claim(home)
    instance = DagsterInstance.ephemeral()
    result = _asset_run(home, root, key, instance)
    assert result.success, [
        e.event_specific_data.error.message for e in result.all_events if e.is_step_failure
    ]
    catalog = pl.read_parquet(partition_dir(root, "posterior_catalog", key) / "catalog.parquet")
    assert set(catalog["model_name"]) == {f"gampen-tiny-{DOMAIN}"}
    assert set(catalog["model_version"]) == {"7"} and set(catalog["domain"]) == {DOMAIN}
    (materialization,) = [m for m in result.asset_materializations_for_node("posterior_catalog")]
    meta = {k: getattr(v, "value", v) for k, v in materialization.metadata.items()}
    assert meta["model_source"] == f"finetuned_model[{DOMAIN}]"
    assert (meta["model_name"], meta["model_version"], meta["domain"]) == (
        f"gampen-tiny-{DOMAIN}",
        "7",
        DOMAIN,
    )
    # Its flags compare against the fine-tuned model's training domain, which declares no
    # PSF range: no psf_outside_library column (the champion's would have one).
    flags = pl.read_parquet(partition_dir(root, "qualitative_flags", key) / "flags.parquet")
    assert flags.height == N_GALAXIES and "psf_outside_library" not in flags.columns
    assert stages.finetuned_model(TINY, root, DOMAIN).model_dir == tuned_dir


def test_an_undeclared_domain_quarantines_the_batch_naming_its_batch_toml(site):
    home, root, batch = site
    (batch / BATCH_FILE).write_text('domain = "decals-z"\n')
    key, claimed = claim(home)
    instance = DagsterInstance.ephemeral()
    result = _asset_run(home, root, key, instance)
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    message = failure.event_specific_data.error.message
    assert str(claimed / BATCH_FILE) in message
    assert f"declared in {home / 'domains'}: {DOMAIN}" in message and "decals-z" in message
    quarantined = home / "quarantine" / key
    files = sorted(p.name for p in quarantined.iterdir() if not p.name.endswith(".reason.txt"))
    assert files == sorted(
        [BATCH_FILE]
        + [f"{kind}_{i}.0_2.0.fits" for i in range(N_GALAXIES) for kind in ("cutout", "psf")]
    )
    reason = (quarantined / "cutout_0.0_2.0.fits.reason.txt").read_text()
    assert "batch not read" in reason and "decals-z" in reason
    assert not (root / STORED_BATCHES / key).exists() and not claimed.exists()


def test_gampen_predict_domain_reads_the_survey_and_uses_the_finetuned_model(
    site, tmp_path, capsys
):
    home, root, batch = site
    out = tmp_path / "x.parquet"
    argv = ["predict", str(batch), "--domain", DOMAIN, "--out", str(out), "--root", str(root)]
    assert main([*argv, "--profile", "tiny", "--device", "cpu"]) == 0
    printed = capsys.readouterr()
    assert "no fine-tuned model" in printed.err and "read as domain tiny-survey" in printed.out
    first = pl.read_parquet(out)
    assert set(first["model_name"]) == {"gampen-tiny"} and set(first["domain"]) == {DOMAIN}
    assert first.height == N_GALAXIES  # the PSF files and batch.toml are not cutouts
    publish_finetuned(root, version="9")
    assert main([*argv, "--profile", "tiny", "--device", "cpu"]) == 0
    second = pl.read_parquet(out)
    assert set(second["model_name"]) == {f"gampen-tiny-{DOMAIN}"}
    assert set(second["model_version"]) == {"9"}
    assert main(["predict", str(batch), "--domain", "nope", "--out", str(out), "--root",
                 str(root), "--profile", "tiny"]) == 2  # fmt: skip
    assert "no domain 'nope'" in capsys.readouterr().err


def test_decals_through_the_champion_is_flagged_outside_its_training(tiny_world, tmp_path):  # noqa: F811
    """The champion never saw 0.262"/px DECaLS cutouts: its catalog must not pass silently."""
    domain = load_domain(Path(__file__).resolve().parents[2] / "docs/domains/decals-r.toml")
    decals = Path(__file__).resolve().parents[2] / "tests/data/decals_dr9"
    model = stages.champion_model(TINY, tiny_world)
    result = stages.predict_cutouts(
        TINY, decals, model, tmp_path / "decals.parquet", domain=domain, n_passes=4
    )
    assert result.rejections == [] and result.catalog["domain"].to_list() == ["decals-r"]
    flags = stages.catalog_flags(result.catalog, TINY, tiny_world, model)
    row = flags.row(0, named=True)
    assert row["unreliable"] and row["out_of_domain"], row
    assert "sky noise unlike training" in row["ood_reason"]
    # Whatever its depth, the scale alone says the champion never saw such pixels.
    assert result.catalog["pixel_scale_arcsec"][0] == pytest.approx(0.262, rel=1e-3)
    assert "pixel scale unlike training" in row["ood_reason"]


def test_the_inbox_sensor_tags_a_domain_batchs_run(site, monkeypatch):
    from dagster import build_sensor_context, instance_for_test

    from gampen_assets.sensors import inbox_sensor

    home, _, _ = site
    with instance_for_test() as instance:
        monkeypatch.setenv("DAGSTER_HOME", str(home))  # instance_for_test moved it
        result = inbox_sensor(build_sensor_context(instance=instance))
    (request,) = result.run_requests
    assert request.partition_key == "survey-night-1"
    assert request.tags["gampen/domain"] == DOMAIN
    assert (home / "inbox" / PROCESSING / "survey-night-1" / BATCH_FILE).is_file()


def test_a_rerun_after_a_crash_reads_the_batch_as_it_was_stored(site):
    """Once stored, the manifest's domain decides, even if batch.toml is already gone."""
    home, root, _ = site
    key, claimed = claim(home)

    def crash(step: str) -> None:
        if step == "stored":
            raise KeyboardInterrupt(step)

    args = (claimed, key, TINY, root, home / "quarantine")
    with pytest.raises(KeyboardInterrupt):
        ingest_claimed(*args, checkpoint=crash, domains=home / "domains")
    (claimed / BATCH_FILE).unlink()
    again = ingest_claimed(*args, domains=home / "domains")
    assert (again.domain, again.n_files_accepted, again.n_files_quarantined) == (DOMAIN, 3, 0)
    assert not (home / "quarantine").exists() and not claimed.exists()
