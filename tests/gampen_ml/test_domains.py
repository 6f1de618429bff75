"""Survey domains: their TOML files, and another survey's cutouts read without hand edits.

The DECaLS case (``tests/data/decals_dr9/``) is a real Legacy Surveys cutout: g/r/z images in
nanomaggies with inverse-variance HDUs and a sibling PSF file, read with the committed
``docs/domains/decals-r.toml``.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from astropy.io import fits

from gampen_ml.config import ConfigError, get_profile
from gampen_ml.domains import HduSelectionError, HduSelector, find_domain, load_domain
from gampen_ml.fits_input import (
    BATCH_FILE,
    CutoutError,
    load_cutout_file,
    load_cutouts,
    read_psf_image,
    validate_cutouts,
)
from gampen_ml.sim.psf import measure_fwhm_arcsec

REPO = Path(__file__).resolve().parents[2]
DECALS = REPO / "tests" / "data" / "decals_dr9"
CUTOUT = "cutout_59.1067_-30.4848.fits"
PSF = "psf_59.1067_-30.4848.fits"
EXAMPLE = REPO / "docs" / "domains" / "decals-r.toml"
IMAGING = get_profile("tiny").imaging
NMGY_NJY = 3631.0

GOOD = """\
name = "{name}"
pixel_scale_arcsec = 0.262
stamp_size_px = 64
flux_unit = "nanomaggy"
"""


def write_domain(folder: Path, name: str, text: str | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.toml"
    path.write_text(GOOD.format(name=name) if text is None else text)
    return path


def test_the_example_domain_declares_decals_r():
    domain = load_domain(EXAMPLE)
    assert (domain.name, domain.pixel_scale_arcsec, domain.flux_unit) == (
        "decals-r",
        0.262,
        "nanomaggy",
    )
    assert domain.flux_to_njy == pytest.approx(NMGY_NJY)
    assert dict(domain.image.keywords) == {"IMAGETYP": "image", "BAND": "r"}
    assert dict(domain.weight.keywords) == {"IMAGETYP": "invvar", "BAND": "r"}
    assert domain.psf.path_for(DECALS / CUTOUT) == DECALS / PSF
    assert domain.psf.path_for(DECALS / "cutout_1_2.fits.gz") == DECALS / "psf_1_2.fits"


@pytest.mark.parametrize(
    "text, problem",
    [
        (GOOD.format(name="DECaLS R"), "must match"),
        (GOOD.format(name="x") + "colour = 'r'\n", "unknown key(s) ['colour']"),
        (GOOD.format(name="x") + "[image]\nextname = 'SCI'\n", "[image]: unknown key(s)"),
        (GOOD.format(name="x") + "[psf]\nfile = '../{stem}.fits'\n", "beside the cutout"),
        (GOOD.format(name="x") + "[psf]\nfile = '{ra}.fits'\n", "only {stem} and {suffix}"),
        (GOOD.format(name="x").replace("0.262", "'0.262'"), "pixel_scale_arcsec must be"),
        (GOOD.format(name="x").replace('"nanomaggy"', '"maggy"'), "flux_unit 'maggy'"),
        ('name = "x"\nstamp_size_px = 64\n', "missing 'pixel_scale_arcsec'"),
        ("name = [", "not a readable domain file"),
    ],
)
def test_domain_file_errors_name_the_file_and_the_problem(tmp_path, text, problem):
    path = tmp_path / "x.toml"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_domain(path)
    assert str(err.value).startswith(str(path)), err.value
    assert problem in str(err.value)


def test_missing_or_misnamed_domain_files_say_where(tmp_path):
    with pytest.raises(ConfigError, match="not a readable domain file") as err:
        load_domain(tmp_path / "absent.toml")
    assert str(tmp_path / "absent.toml") in str(err.value)
    misnamed = write_domain(tmp_path, "other", GOOD.format(name="decals-g"))
    with pytest.raises(ConfigError, match="must be named decals-g.toml") as err:
        load_domain(misnamed)
    assert str(misnamed) in str(err.value)
    misnamed.unlink()
    write_domain(tmp_path, "decals-g")
    write_domain(tmp_path, "hsc-i")
    with pytest.raises(ConfigError) as err:
        find_domain(tmp_path, "decals-z")
    message = str(err.value)
    assert str(tmp_path / "decals-z.toml") in message and "decals-g, hsc-i" in message
    assert find_domain(tmp_path, "hsc-i").name == "hsc-i"


def test_hdu_selectors_pick_exactly_one_image():
    with fits.open(DECALS / CUTOUT) as hdul:
        # The empty primary HDU repeats IMAGETYP = image but holds no image.
        assert HduSelector(keywords={"IMAGETYP": "image", "BAND": "R "}).select(hdul) == 3
        assert HduSelector(index=4).select(hdul) == 4
        with pytest.raises(HduSelectionError, match=r"HDUs \[1, 3, 5\] all match"):
            HduSelector(keywords={"IMAGETYP": "image"}).select(hdul)
        with pytest.raises(HduSelectionError, match="no image HDU matches") as err:
            HduSelector(keywords={"BAND": "i"}).select(hdul)
        assert "HDU 1 BAND='g'" in str(err.value)


def test_decals_cutout_loads_with_the_example_domain():
    domain = load_domain(EXAMPLE)
    batch = load_cutouts(DECALS, domain.imaging(IMAGING), domain=domain)
    assert batch.accepted_files == [CUTOUT] and batch.psf_files == [PSF]
    assert batch.rejections == [] and batch.n_files_in == 2
    s = domain.stamp_size_px
    assert batch.images.shape == batch.weights.shape == (1, s, s)
    offset = (256 - s) // 2  # 256 px delivered, cropped about the centre
    with fits.open(DECALS / CUTOUT) as hdul:
        image_nmgy, invvar_nmgy = hdul[3].data, hdul[4].data
        assert (hdul[3].header["BAND"], hdul[4].header["IMAGETYP"]) == ("r", "invvar")
    crop = (slice(offset, offset + s),) * 2
    # Pixel values in nJy: nanomaggies x 3631; inverse variances in nJy^-2.
    assert batch.images[0, 0, 0] == pytest.approx(image_nmgy[offset, offset] * NMGY_NJY, rel=1e-6)
    np.testing.assert_allclose(batch.images[0], image_nmgy[crop] * NMGY_NJY, rtol=1e-6)
    np.testing.assert_allclose(batch.weights[0], invvar_nmgy[crop] / NMGY_NJY**2, rtol=1e-6)
    row = batch.table.row(0, named=True)
    assert row["hdu"] == 3 and row["pixel_scale_arcsec"] == pytest.approx(0.262, abs=1e-4)
    assert (row["ra_deg"], row["dec_deg"]) == pytest.approx((59.1067, -30.4848), abs=2e-4)
    # The r-band PSF of the sibling file, measured at the domain's pixel scale.
    with fits.open(DECALS / PSF) as hdul:
        psf_r = hdul[1].data.astype(np.float64)
    assert row["psf_fwhm_arcsec"] == pytest.approx(measure_fwhm_arcsec(psf_r, 0.262))
    assert 0.8 < row["psf_fwhm_arcsec"] < 1.6
    np.testing.assert_array_equal(read_psf_image(DECALS / CUTOUT, domain), psf_r)
    # The single-file API reads the same pixels.
    images, table = load_cutout_file(DECALS / CUTOUT, domain.imaging(IMAGING), domain=domain)
    np.testing.assert_array_equal(images, batch.images)
    assert table["psf_fwhm_arcsec"].to_list() == batch.table["psf_fwhm_arcsec"].to_list()


def test_decals_files_without_their_domain_are_rejected_with_reasons():
    batch = load_cutouts(DECALS, IMAGING)
    reasons = {r.file: r.reason for r in batch.rejections}
    assert "0.262 arcsec/px (header) differs from the survey's 0.168" in reasons[CUTOUT]
    assert batch.accepted_files == [] and len(reasons) == 2


def test_domain_reading_failures_reject_the_file_naming_the_problem(tmp_path):
    domain = load_domain(EXAMPLE)
    imaging = domain.imaging(IMAGING)
    batch_dir = tmp_path / "batch"
    batch_dir.mkdir()
    # Same cutout under two names: one keeps its PSF, one has none beside it.
    shutil.copy(DECALS / CUTOUT, batch_dir / CUTOUT)
    shutil.copy(DECALS / PSF, batch_dir / PSF)
    shutil.copy(DECALS / CUTOUT, batch_dir / "cutout_1.0_2.0.fits")
    # A weight map with negative inverse variances, and a PSF whose cutout is rejected.
    with fits.open(DECALS / CUTOUT) as hdul:
        hdul[4].data = -hdul[4].data
        hdul.writeto(batch_dir / "cutout_3.0_4.0.fits")
    shutil.copy(DECALS / PSF, batch_dir / "psf_3.0_4.0.fits")
    (batch_dir / BATCH_FILE).write_text('domain = "decals-r"\n')  # not input: skipped
    scan = validate_cutouts(batch_dir, imaging, reject_reserved=True, domain=domain)
    reasons = {r.file: r.reason for r in scan.rejections}
    assert scan.accepted_files == [CUTOUT] and scan.psf_files == [PSF]
    assert (
        "PSF file psf_1.0_2.0.fits (domain decals-r [psf] file) not found"
        in reasons["cutout_1.0_2.0.fits"]
    )
    assert "negative inverse variances" in reasons["cutout_3.0_4.0.fits"]
    assert reasons["psf_3.0_4.0.fits"] == "PSF file of rejected cutout(s) cutout_3.0_4.0.fits"
    assert scan.n_files_in == 5 and BATCH_FILE not in reasons
    with pytest.raises(CutoutError, match=r"domain decals-r \[image\]: no image HDU matches"):
        load_cutout_file(batch_dir / PSF, imaging, domain=domain)
