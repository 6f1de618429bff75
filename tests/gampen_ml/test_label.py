"""The profile-fitter labeller (gampen_ml.label, ``gampen label``) on tiny real fits.

Every test fits 48-px stamps with a 31-px PSF: one compiled shape per model, shared by the
tests of this module.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import galsim
import numpy as np
import polars as pl
import pytest
from astropy.io import fits

from gampen_ml.cli import main
from gampen_ml.config import ImagingConfig, get_profile
from gampen_ml.label import LABEL_SCHEMA, STATUS_OK, fit_profile, label_folder, read_labels
from gampen_ml.sim.parameters import composite_re_arcsec

pytest.importorskip("pysersic", reason="the labeller's tests need pysersic (the dev extra)")

SCALE = 0.168
STAMP = 48
PSF_PX = 31
SIGMA = 0.5
IMAGING = replace(ImagingConfig(), stamp_size_px=STAMP)
PSF = galsim.Moffat(beta=3.5, fwhm=0.8)


def psf_image() -> np.ndarray:
    image = PSF.drawImage(nx=PSF_PX, ny=PSF_PX, scale=SCALE).array
    return image / image.sum()


def stamp(profile: galsim.GSObject, seed: int) -> np.ndarray:
    image = galsim.Convolve(profile, PSF).drawImage(nx=STAMP, ny=STAMP, scale=SCALE).array
    return (image + SIGMA * np.random.default_rng(seed).standard_normal(image.shape)).astype(
        np.float32
    )


def disk(re_arcsec: float = 0.6, flux: float = 2.0e4, q: float = 0.7) -> galsim.GSObject:
    return galsim.Sersic(n=1.0, half_light_radius=re_arcsec, flux=flux).shear(
        q=q, beta=30 * galsim.degrees
    )


def write_cutout(path: Path, image: np.ndarray, psf: np.ndarray | None, **header) -> None:
    primary = fits.PrimaryHDU(image)
    primary.header["PIXSCALE"] = SCALE
    for key, value in header.items():
        primary.header[key] = value
    hdus = [primary] + ([] if psf is None else [fits.ImageHDU(psf, name="PSF")])
    fits.HDUList(hdus).writeto(path)


def test_single_sersic_recovers_re_and_flux_and_writes_the_schema(tmp_path: Path) -> None:
    folder = tmp_path / "cutouts"
    folder.mkdir()
    write_cutout(folder / "g0.fits", stamp(disk(), seed=1), psf_image())
    out = tmp_path / "labels.parquet"
    run = label_folder(folder, out, IMAGING, model="sersic")
    assert (run.n_files, run.n_rows, run.n_ok) == (1, 1, 1)

    raw = pl.read_parquet(out)
    assert raw.schema == pl.Schema(LABEL_SCHEMA)
    row = raw.row(0, named=True)
    assert row["file"] == "g0.fits" and row["hdu"] == 0
    assert row["fit_status"] == STATUS_OK, row["fit_status"]
    assert row["re_arcsec"] == pytest.approx(0.6, rel=0.03)
    assert row["flux_nJy"] == pytest.approx(2.0e4, rel=0.03)
    # A single Sérsic index is not a B/T: null, and said so by the model column.
    assert row["bt"] is None and row["bt_sigma"] is None and row["model"] == "sersic"
    assert 0 < row["re_sigma"] < 0.05 and 0 < row["flux_sigma"] < 0.03 * 2.0e4
    assert row["sersic_n"] == pytest.approx(1.0, abs=0.25)
    assert row["psf_source"] == "hdu" and row["noise_source"] == "border"
    assert row["crop_px"] == STAMP and row["fit_seconds"] > 0

    # Resume keeps the row and fits nothing; without it the table is not overwritten.
    again = label_folder(folder, out, IMAGING, model="sersic", resume=True)
    assert (again.n_files, again.n_skipped, again.n_rows) == (0, 1, 0)
    assert read_labels(out).height == 1
    with pytest.raises(ValueError, match="--resume"):
        label_folder(folder, out, IMAGING, model="sersic")


def test_bulge_disk_gives_bt_and_the_composite_radius() -> None:
    bt, flux = 0.4, 3.0e4
    bulge = galsim.Sersic(n=4.0, half_light_radius=0.3, flux=bt * flux).shear(
        q=0.9, beta=30 * galsim.degrees
    )
    galaxy = disk(re_arcsec=0.9, flux=(1 - bt) * flux, q=0.6) + bulge
    true_re = composite_re_arcsec(np.array([bt]), 1.0, 0.9, 4.0, 0.3)[0]
    fit = fit_profile(stamp(galaxy, seed=2), psf_image(), SCALE, model="bulge-disk", seed=3)
    assert fit.status == STATUS_OK
    assert fit.bt == pytest.approx(bt, abs=0.1)
    assert fit.re_arcsec == pytest.approx(true_re, rel=0.06)
    assert fit.flux_nJy == pytest.approx(flux, rel=0.03)
    assert 0 < fit.bt_sigma < 0.2 and fit.re_sigma > 0 and fit.flux_sigma > 0
    assert np.isnan(fit.sersic_n) and set(fit.parameters) >= {"bt", "n_bulge", "n_disk"}


def test_every_failure_is_a_row_never_an_exception(tmp_path: Path) -> None:
    folder = tmp_path / "cutouts"
    folder.mkdir()
    image = stamp(disk(), seed=4)
    write_cutout(folder / "good.fits", image, None, PSF_FWHM=0.8)  # Moffat from PSF_FWHM
    write_cutout(folder / "no_psf.fits", image, None)
    # A PSF HDU of NaNs passes the reader (it takes the FWHM keyword) but not the fitter.
    write_cutout(folder / "nan_psf.fits", image, np.full((PSF_PX, PSF_PX), np.nan), PSF_FWHM=0.8)
    (folder / "broken.fits").write_bytes(b"SIMPLE  =                    T" + b" " * 50)
    (folder / "notes.txt").write_text("not a cutout: ignored")
    out = tmp_path / "labels.csv"
    run = label_folder(folder, out, IMAGING, model="sersic")
    table = read_labels(out)
    assert run.n_rows == table.height == 4
    status = dict(zip(table["file"], table["fit_status"], strict=True))
    assert status["good.fits"] == STATUS_OK
    assert table.filter(pl.col("file") == "good.fits")["psf_source"][0].startswith("moffat")
    assert status["no_psf.fits"].startswith("no_psf:")
    assert status["nan_psf.fits"].startswith("failed: ValueError: PSF image has non-finite")
    assert status["broken.fits"].startswith("rejected:")
    failed = table.filter(pl.col("fit_status") != STATUS_OK)
    assert failed["re_arcsec"].null_count() == failed.height


def test_cli_labels_a_two_file_folder_of_a_domain(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    home = tmp_path / "home"
    (home / "domains").mkdir(parents=True)
    (home / "domains" / "tiny-survey.toml").write_text(
        'name = "tiny-survey"\npixel_scale_arcsec = 0.168\nstamp_size_px = 48\n'
    )
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    folder = tmp_path / "batch"
    folder.mkdir()
    for k, re_arcsec in enumerate((0.5, 0.8)):
        write_cutout(folder / f"g{k}.fits", stamp(disk(re_arcsec=re_arcsec), k + 10), psf_image())
    out = tmp_path / "labels.parquet"
    args = ["label", str(folder), "--out", str(out), "--domain", "tiny-survey", "--model", "sersic"]
    assert main([*args, "--profile", get_profile("tiny").name]) == 0
    assert "2 row(s) written" in capsys.readouterr().out
    table = read_labels(out).sort("file")
    assert table["fit_status"].to_list() == [STATUS_OK, STATUS_OK]
    assert table["re_arcsec"].to_numpy() == pytest.approx([0.5, 0.8], rel=0.05)
    # An existing table without --resume is an error with a message, not a traceback.
    assert main([*args, "--profile", "tiny"]) == 2
    assert "--resume" in capsys.readouterr().err
