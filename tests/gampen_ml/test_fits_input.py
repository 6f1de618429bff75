"""Real-cutout loading: every bad-FITS case is rejected with a reason, good ones load."""

from __future__ import annotations

import os

import numpy as np
import pytest
from astropy.io import fits

from gampen_ml.config import ImagingConfig
from gampen_ml.fits_input import (
    CutoutError,
    Rejection,
    fit_to_stamp,
    load_cutout_file,
    load_cutouts,
    quarantine,
)

S = 32
SCALE = 0.168
IMAGING = ImagingConfig(pixel_scale_arcsec=SCALE, stamp_size_px=S)


def galaxy(n: int = S, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[:n, :n] - (n - 1) / 2
    return (100 * np.exp(-(x**2 + y**2) / 20) + rng.normal(0, 1, (n, n))).astype(np.float32)


def wcs_header(ra: float = 150.0, dec: float = 2.0, scale_arcsec: float = SCALE, n: int = S):
    header = fits.Header()
    header["CTYPE1"], header["CTYPE2"] = "RA---TAN", "DEC--TAN"
    header["CRVAL1"], header["CRVAL2"] = ra, dec
    header["CRPIX1"] = header["CRPIX2"] = (n + 1) / 2  # 1-based centre
    header["CD1_1"], header["CD2_2"] = -scale_arcsec / 3600, scale_arcsec / 3600
    header["CD1_2"] = header["CD2_1"] = 0.0
    return header


def write(path, data, header=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    fits.PrimaryHDU(data, header=header).writeto(path)
    return path


@pytest.fixture
def batch(tmp_path):
    """A batch folder with good and bad files of every kind, and the expected outcome."""
    root = tmp_path / "batch"
    good = {}
    write(root / "good_wcs.fits", galaxy(), wcs_header())
    good["good_wcs.fits"] = 1
    cube = np.stack([galaxy(seed=k) for k in range(3)])
    hdul = fits.HDUList(
        [
            fits.PrimaryHDU(cube),
            fits.BinTableHDU.from_columns(
                [
                    fits.Column("RA", "D", array=np.array([10.0, 11.0, 12.0])),
                    fits.Column("DEC", "D", array=np.array([-1.0, -2.0, -3.0])),
                ]
            ),
        ]
    )
    (root / "sub").mkdir(parents=True)
    hdul.writeto(root / "sub" / "cube.fits")
    good["sub/cube.fits"] = 3
    write(root / "int16.fits", (galaxy() * 10).astype(">i2"))
    good["int16.fits"] = 1
    write(root / "large.fits", galaxy(40))
    good["large.fits"] = 1
    write(root / "small_pad.fits", galaxy(20))
    good["small_pad.fits"] = 1
    few_nan = galaxy()
    few_nan[0, :3] = np.nan
    write(root / "few_nan.fits", few_nan)
    good["few_nan.fits"] = 1
    header = fits.Header()
    header["PIXSCALE"] = SCALE * 1.03
    write(root / "scale_ok.fits", galaxy(), header)
    good["scale_ok.fits"] = 1
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(galaxy(), name="IMAGE")]).writeto(
        root / "hsc_layout.fits"
    )
    good["hsc_layout.fits"] = 1

    bad = {}
    full = root / "good_wcs.fits"
    (root / "truncated.fits").write_bytes(full.read_bytes()[:3500])
    bad["truncated.fits"] = "not a readable FITS"
    (root / "text.fits").write_text("this is not FITS at all\n" * 20)
    bad["text.fits"] = "not a readable FITS"
    (root / "notes.txt").write_text("hello")
    bad["notes.txt"] = "not a FITS file name"
    fits.PrimaryHDU().writeto(root / "empty.fits")
    bad["empty.fits"] = "no HDU with image data"
    write(root / "one_d.fits", np.arange(S, dtype=np.float32))
    bad["one_d.fits"] = "1-D"
    write(root / "four_d.fits", np.ones((1, 2, S, S), np.float32))
    bad["four_d.fits"] = "4-D"
    write(root / "tiny.fits", galaxy(10))
    bad["tiny.fits"] = "smaller than half"
    many_nan = galaxy()
    many_nan[:5, :] = np.inf
    write(root / "many_nan.fits", many_nan)
    bad["many_nan.fits"] = "non-finite"
    centre_nan = galaxy()
    centre_nan[S // 2, S // 2] = np.nan
    write(root / "centre_nan.fits", centre_nan)
    bad["centre_nan.fits"] = "central box"
    write(root / "zeros.fits", np.zeros((S, S), np.float32))
    bad["zeros.fits"] = "all pixels are zero"
    header = fits.Header()
    header["PIXSCALE"] = 0.25
    write(root / "pixscale.fits", galaxy(), header)
    bad["pixscale.fits"] = "pixel scale 0.25"
    write(root / "cd_scale.fits", galaxy(), wcs_header(scale_arcsec=0.5))
    bad["cd_scale.fits"] = "pixel scale 0.5"
    bad_cube = np.stack([galaxy(), np.zeros((S, S), np.float32), galaxy()])
    write(root / "bad_plane_cube.fits", bad_cube)
    bad["bad_plane_cube.fits"] = "plane 1: all pixels are zero"
    os.symlink("/etc/hostname", root / "link.fits")
    bad["link.fits"] = "symbolic link"
    (root / "_READY").touch()  # marker: reserved name, not an input
    (root / ".partial.fits").write_bytes(b"")  # hidden upload: not an input
    return root, good, bad


def test_batch_accepts_good_rejects_bad_with_reasons(batch):
    root, good, bad = batch
    result = load_cutouts(root, IMAGING)
    assert sorted(result.accepted_files) == sorted(good)
    reasons = {r.file: r.reason for r in result.rejections}
    assert sorted(reasons) == sorted(bad)
    for name, expected in bad.items():
        assert expected in reasons[name], (name, reasons[name])
    # Counts reconcile: every input file is accepted or rejected; rows = cutouts.
    assert result.n_files_in == len(good) + len(bad) == 22
    assert result.images.shape == (sum(good.values()), S, S)
    assert result.images.dtype == np.float32 and result.images.dtype.isnative
    assert result.table.height == result.images.shape[0]
    assert result.table["galaxy_id"].to_list() == list(range(result.table.height))
    assert np.isfinite(result.images).all()


def test_provenance_wcs_cube_positions_and_repairs(batch):
    root, _, _ = batch
    result = load_cutouts(root, IMAGING)
    table = result.table
    row = table.filter(source_file="good_wcs.fits").row(0, named=True)
    assert row["ra_deg"] == pytest.approx(150.0, abs=1e-9)
    assert row["dec_deg"] == pytest.approx(2.0, abs=1e-9)
    assert row["pixel_scale_arcsec"] == pytest.approx(SCALE, rel=1e-9)
    cube = table.filter(source_file="sub/cube.fits")
    assert cube["hdu"].to_list() == [0, 1, 2]
    assert cube["ra_deg"].to_list() == [10.0, 11.0, 12.0]
    assert cube["dec_deg"].to_list() == [-1.0, -2.0, -3.0]
    hsc = table.filter(source_file="hsc_layout.fits").row(0, named=True)
    assert hsc["hdu"] == 1 and hsc["ra_deg"] is None
    assert ">i2->float32" in table.filter(source_file="int16.fits")["repairs"][0]
    assert "40x40->32x32" in table.filter(source_file="large.fits")["repairs"][0]
    assert "3 non-finite px" in table.filter(source_file="few_nan.fits")["repairs"][0]
    # Integer data keep their values; repaired NaNs become the sky level 0.
    index = table["source_file"].to_list()
    int_image = result.images[index.index("int16.fits")]
    np.testing.assert_array_equal(int_image, (galaxy() * 10).astype(np.int16).astype(np.float32))
    few = result.images[index.index("few_nan.fits")]
    assert (few[0, :3] == 0).all() and few[0, 3] == galaxy()[0, 3]


def test_fit_to_stamp_is_centred():
    big = np.zeros((41, 40), np.float32)
    big[20, 20] = 1.0  # centre of the odd axis, right-of-centre of the even axis
    out = fit_to_stamp(big, S)
    assert out.shape == (S, S) and np.argwhere(out == 1).tolist() == [[20 - 4, 20 - 4]]
    small = np.ones((17, 17), np.float32)
    out = fit_to_stamp(small, S)
    assert out.sum() == 17 * 17
    assert out[7:24, 7:24].all() and out[:7].sum() == 0 and out[24:].sum() == 0
    # The central pixel of a 17 px image lands on the central pixel of the 32 px stamp.
    marked = np.zeros((17, 17), np.float32)
    marked[8, 8] = 1
    assert np.argwhere(fit_to_stamp(marked, S) == 1).tolist() == [[15, 15]]


def test_single_file_api_raises_naming_file_and_problem(tmp_path):
    path = write(tmp_path / "zeros.fits", np.zeros((S, S), np.float32))
    with pytest.raises(CutoutError, match=r"zeros\.fits: HDU 0: all pixels are zero"):
        load_cutout_file(path, IMAGING)
    good = write(tmp_path / "g.fits", galaxy().astype(">f8"))
    images, table = load_cutout_file(good, IMAGING)
    assert images.shape == (1, S, S) and images.dtype == np.dtype("float32")
    np.testing.assert_allclose(images[0], galaxy(), rtol=1e-6)
    assert table["source_file"].to_list() == ["g.fits"]
    # A single file is a batch too.
    assert load_cutouts(good, IMAGING).table.height == 1


def test_quarantine_moves_bad_files_with_reasons(batch, tmp_path):
    root, good, bad = batch
    result = load_cutouts(root, IMAGING)
    qdir = tmp_path / "quarantine"
    moved = quarantine(result.rejections, root, qdir, batch_name="b1")
    assert len(moved) == len(bad)
    for name, expected in bad.items():
        target = qdir / "b1" / name
        assert target.exists() or target.is_symlink()
        assert not (root / name).exists() and not (root / name).is_symlink()
        assert expected in target.with_name(target.name + ".reason.txt").read_text()
    # What is left in the batch is exactly the good files: reloading rejects nothing.
    again = load_cutouts(root, IMAGING)
    assert again.rejections == [] and sorted(again.accepted_files) == sorted(good)
    # The symlink was moved as a link, its target untouched.
    assert os.path.exists("/etc/hostname")


@pytest.mark.parametrize("name", ["../escape.fits", "/etc/passwd", "sub/../../x.fits", ""])
def test_quarantine_refuses_path_traversal(tmp_path, name):
    root = tmp_path / "batch"
    root.mkdir()
    outside = tmp_path / "escape.fits"
    outside.write_text("keep me")
    with pytest.raises(CutoutError, match="outside|escapes|illegal"):
        quarantine([Rejection(name, "bad")], root, tmp_path / "q")
    assert outside.read_text() == "keep me"
    with pytest.raises(CutoutError):
        quarantine([], root, tmp_path / "q", batch_name="../../evil")


def moffat_psf(fwhm_arcsec: float, n: int = 25) -> np.ndarray:
    import galsim

    psf = galsim.Moffat(beta=3.5, fwhm=fwhm_arcsec).drawImage(nx=n, ny=n, scale=SCALE)
    return psf.array.astype(np.float32)


def test_psf_fwhm_from_header_table_or_psf_hdu(tmp_path):
    header = fits.Header()
    header["PSF_FWHM"] = 1.1
    _, table = load_cutout_file(write(tmp_path / "kw.fits", galaxy(), header), IMAGING)
    assert table["psf_fwhm_arcsec"].to_list() == [1.1]

    # A cube with a per-plane PSF_FWHM column beside RA/DEC.
    cube = np.stack([galaxy(seed=k) for k in range(2)])
    columns = [
        fits.Column(name=name, format="D", array=np.array(values))
        for name, values in (("RA", [1.0, 2.0]), ("DEC", [0.0, 0.0]), ("PSF_FWHM", [0.7, 0.9]))
    ]
    path = tmp_path / "cube.fits"
    fits.HDUList([fits.PrimaryHDU(cube), fits.BinTableHDU.from_columns(columns)]).writeto(path)
    _, table = load_cutout_file(path, IMAGING)
    assert table["psf_fwhm_arcsec"].to_list() == [0.7, 0.9]
    assert table["ra_deg"].to_list() == [1.0, 2.0]

    # A PSF image HDU: its FWHM is measured (GalSim Moffat of known FWHM, pixel included).
    path = tmp_path / "psf_hdu.fits"
    fits.HDUList([fits.PrimaryHDU(galaxy()), fits.ImageHDU(moffat_psf(1.5), name="PSF")]).writeto(
        path
    )
    _, table = load_cutout_file(path, IMAGING)
    assert table["psf_fwhm_arcsec"][0] == pytest.approx(1.5, rel=0.05)

    # No PSF information: null, not a guess.
    _, table = load_cutout_file(write(tmp_path / "none.fits", galaxy()), IMAGING)
    assert table["psf_fwhm_arcsec"].to_list() == [None]


@pytest.mark.parametrize("value", ["wide", -0.5, 0.0])
def test_bad_psf_fwhm_rejects_the_file_naming_it(tmp_path, value):
    header = fits.Header()
    header["PSF_FWHM"] = value
    path = write(tmp_path / "bad_psf.fits", galaxy(), header)
    with pytest.raises(CutoutError, match=r"bad_psf\.fits: header PSF_FWHM = .*positive"):
        load_cutout_file(path, IMAGING)
    # In a batch it is one rejection among the accepted files.
    write(tmp_path / "ok.fits", galaxy())
    result = load_cutouts(tmp_path, IMAGING)
    assert result.accepted_files == ["ok.fits"]
    assert [r.file for r in result.rejections] == ["bad_psf.fits"]
