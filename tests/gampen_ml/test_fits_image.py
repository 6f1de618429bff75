"""The FITS rules every reader shares: pixel scale, listing, image HDU, one error class.

Each pixel-scale case goes through all three readers (a survey cutout, a real PSF, a sky
object) so that they cannot drift apart again.
"""

from __future__ import annotations

import numpy as np
import pytest
from astropy.io import fits

from gampen_ml.config import ImagingConfig
from gampen_ml.fits_image import (
    SQUARE_PIXEL_RTOL,
    batch_files,
    is_fits_name,
    pixel_scale_arcsec,
)
from gampen_ml.fits_input import CutoutError, load_cutout_file, load_cutouts
from gampen_ml.sim.errors import InputFileError
from gampen_ml.sim.fits_input import list_fits_files, read_fits_image
from gampen_ml.sim.noise import load_sky_folder
from gampen_ml.sim.psf import load_psf_folder

S = 32
SCALE = 0.168
DEG = SCALE / 3600.0
IMAGING = ImagingConfig(pixel_scale_arcsec=SCALE, stamp_size_px=S)


def _rotation(theta_deg: float) -> dict:
    c, s = np.cos(np.radians(theta_deg)), np.sin(np.radians(theta_deg))
    return {"PC1_1": c, "PC1_2": -s, "PC2_1": s, "PC2_2": c}


#: name -> (header keywords, expected scale in arcsec/px or the error's text)
CASES = {
    "square_cd": ({"CD1_1": -DEG, "CD1_2": 0.0, "CD2_1": 0.0, "CD2_2": DEG}, SCALE),
    "square_cd_rotated_30deg": (
        {
            "CD1_1": -DEG * np.cos(np.radians(30)),
            "CD1_2": DEG * np.sin(np.radians(30)),
            "CD2_1": DEG * np.sin(np.radians(30)),
            "CD2_2": DEG * np.cos(np.radians(30)),
        },
        SCALE,
    ),
    "cdelt": ({"CDELT1": -DEG, "CDELT2": DEG}, SCALE),
    "cdelt_pc_rotated": ({"CDELT1": -DEG, "CDELT2": DEG, **_rotation(40.0)}, SCALE),
    "cdelt_in_arcsec": (
        {"CDELT1": -SCALE, "CDELT2": SCALE, "CUNIT1": "arcsec", "CUNIT2": "arcsec"},
        SCALE,
    ),
    "celestial_tan": (
        {
            "CTYPE1": "RA---TAN",
            "CTYPE2": "DEC--TAN",
            "CRVAL1": 150.0,
            "CRVAL2": 2.0,
            "CRPIX1": 16.5,
            "CRPIX2": 16.5,
            "CD1_1": -DEG,
            "CD2_2": DEG,
        },
        SCALE,
    ),
    "pixscale": ({"PIXSCALE": SCALE}, SCALE),
    # PIXSCALE is read first: a WCS beside it is not consulted.
    "pixscale_beats_wcs": ({"PIXSCALE": SCALE, "CD1_1": -DEG, "CD2_2": 2 * DEG}, SCALE),
    "none": ({"OBJECT": "galaxy"}, None),
    "non_square": (
        {"CD1_1": -DEG, "CD2_2": DEG * 1.01},
        "WCS pixel is not square: sides 0.168 x 0.16968 arcsec",
    ),
    "skewed": (
        {"CD1_1": -DEG, "CD1_2": 0.05 * DEG, "CD2_1": 0.0, "CD2_2": DEG},
        "WCS pixel is not square",
    ),
    # FITS reads a missing CD2_2 as 0: a singular matrix, not a square pixel.
    "cd1_1_only": ({"CD1_1": -DEG}, "CD1_1 without CD2_2"),
    # FITS reads a missing CDELT2 as 1 degree: a 0.168" x 3600" pixel.
    "cdelt1_only": ({"CDELT1": -DEG}, "CDELT1 without CDELT2"),
    "pixscale_negative": ({"PIXSCALE": -SCALE}, "PIXSCALE = -0.168 must be a positive"),
    "pixscale_text": ({"PIXSCALE": "big"}, "PIXSCALE = 'big' is not a number"),
    "not_an_angle": (
        {"CDELT1": SCALE, "CDELT2": SCALE, "CUNIT1": "m", "CUNIT2": "m"},
        "is not an angle",
    ),
}


def _galaxy() -> np.ndarray:
    y, x = np.mgrid[:S, :S] - (S - 1) / 2
    return (100 * np.exp(-(x**2 + y**2) / 8) + 1.0).astype(np.float32)


def _write(path, keywords: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.PrimaryHDU(_galaxy(), header=fits.Header(keywords)).writeto(path)


@pytest.mark.parametrize("name", sorted(CASES))
def test_every_reader_applies_the_one_pixel_scale_rule(tmp_path, name):
    keywords, expected = CASES[name]
    path = tmp_path / "in" / f"{name}.fits"
    _write(path, keywords)
    header = fits.getheader(path)
    if isinstance(expected, str):
        with pytest.raises(InputFileError, match=expected) as err:
            pixel_scale_arcsec(header, path)
        assert err.value.path == path and str(path) in str(err.value)
        # The cutout reader raises it naming the file; a batch scan rejects the file.
        with pytest.raises(CutoutError, match=expected):
            load_cutout_file(path, IMAGING)
        scan = load_cutouts(tmp_path / "in", IMAGING)
        assert scan.accepted_files == [] and scan.rejections[0].file == path.name
        assert expected in scan.rejections[0].reason
        # The PSF and sky-object readers: the same error, the same file.
        with pytest.raises(InputFileError, match=expected) as err:
            read_fits_image(path, require_positive_sum=True)
        assert err.value.path == path
        for loader in (load_psf_folder, load_sky_folder):
            with pytest.raises(InputFileError, match=expected) as err:
                loader(tmp_path / "in", IMAGING)
            assert err.value.path == path
        return
    got = pixel_scale_arcsec(header, path)
    if expected is None:
        assert got is None
    else:
        assert got == pytest.approx(expected, rel=1e-12)
    _, table = load_cutout_file(path, IMAGING)
    assert table["pixel_scale_arcsec"].to_list() == [got]
    assert read_fits_image(path, require_positive_sum=True)[1] == got


@pytest.mark.parametrize("name", ["square_cd", "square_cd_rotated_30deg", "celestial_tan"])
def test_square_wcs_scale_is_bit_identical_to_the_cutout_readers_former_value(name):
    # Catalogs store pixel_scale_arcsec: the shared rule keeps the cutout reader's value.
    from astropy.wcs import WCS
    from astropy.wcs.utils import proj_plane_pixel_scales

    header = fits.PrimaryHDU(_galaxy(), fits.Header(CASES[name][0])).header
    scales_deg = proj_plane_pixel_scales(WCS(header, naxis=2))
    former = float(np.sqrt(abs(scales_deg[0] * scales_deg[1]))) * 3600.0
    assert pixel_scale_arcsec(header, "x.fits") == former


def test_square_tolerance_is_a_relative_side_difference():
    inside = {"CD1_1": -DEG, "CD2_2": DEG * (1 + 0.5 * SQUARE_PIXEL_RTOL)}
    outside = {"CD1_1": -DEG, "CD2_2": DEG * (1 + 2 * SQUARE_PIXEL_RTOL)}
    header = fits.PrimaryHDU(_galaxy(), fits.Header(inside)).header
    assert pixel_scale_arcsec(header, "x.fits") == pytest.approx(SCALE, rel=SQUARE_PIXEL_RTOL)
    header = fits.PrimaryHDU(_galaxy(), fits.Header(outside)).header
    with pytest.raises(InputFileError, match="not square"):
        pixel_scale_arcsec(header, "x.fits")


def test_one_lister_and_suffix_list_for_every_input_folder(tmp_path):
    for name in ("b.fits", "a.FIT", "sub/c.fits.gz", ".partial.fits"):
        _write(tmp_path / name, {"PIXSCALE": SCALE})  # astropy gzips a .gz name
    (tmp_path / "notes.txt").write_text("x")
    (tmp_path / "_READY").touch()
    listed = [p.relative_to(tmp_path).as_posix() for p in batch_files(tmp_path)]
    assert listed == ["a.FIT", "b.fits", "notes.txt", "sub/c.fits.gz"]  # reserved skipped
    fits_files = [p.relative_to(tmp_path).as_posix() for p in list_fits_files(tmp_path)]
    assert fits_files == ["a.FIT", "b.fits", "sub/c.fits.gz"]
    assert is_fits_name("x.fits.fz") and not is_fits_name("x.fits.bak")
    # The PSF library reads exactly those files, named relative to the folder.
    _, table = load_psf_folder(tmp_path, IMAGING)
    assert table["source"].to_list() == fits_files
    # The cutout scan lists the same files and rejects the one that is not FITS by name.
    scan = load_cutouts(tmp_path, IMAGING)
    assert sorted(scan.accepted_files) == fits_files
    assert [(r.file, r.reason) for r in scan.rejections] == [
        ("notes.txt", "not a FITS file name (suffix of 'notes.txt')")
    ]
    (tmp_path / "empty").mkdir()
    with pytest.raises(InputFileError, match="empty: contains no FITS file"):
        list_fits_files(tmp_path / "empty")


def test_every_reader_takes_the_image_hdu_by_the_same_rule(tmp_path):
    # HSC layout: empty primary, then IMAGE, then a MASK with other pixels.
    path = tmp_path / "hsc.fits"
    mask = np.ones((S, S), np.float32)
    fits.HDUList(
        [
            fits.PrimaryHDU(),
            fits.ImageHDU(mask, name="MASK"),
            fits.ImageHDU(_galaxy(), header=fits.Header({"PIXSCALE": SCALE}), name="IMAGE"),
        ]
    ).writeto(path)
    image, scale = read_fits_image(path, require_positive_sum=True)
    stamps, table = load_cutout_file(path, IMAGING)
    np.testing.assert_array_equal(image, _galaxy())
    np.testing.assert_array_equal(stamps[0], _galaxy())
    assert scale == SCALE and table["hdu"].to_list() == [2]
