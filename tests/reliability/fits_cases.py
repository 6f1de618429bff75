"""Good and bad FITS cutouts for the reliability tests, with the outcome each must get.

Every case writes one file and says what the platform must do with it: ``accept`` (with
the number of cutouts and, for a documented repair, a text the ``repairs`` column must
contain) or ``reject`` (with a text the rejection reason must contain).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from astropy.io import fits

from gampen_ml.config import get_profile

IMAGING = get_profile("tiny").imaging
S = IMAGING.stamp_size_px
SCALE = IMAGING.pixel_scale_arcsec


def galaxy(seed: int = 0, shape: tuple[int, ...] = (S, S), flux_nJy: float = 5e4) -> np.ndarray:
    """A noisy round exponential-ish blob at the centre, float32 nJy/px."""
    rng = np.random.default_rng(seed)
    ny, nx = shape[-2:]
    y, x = np.mgrid[:ny, :nx]
    r = np.hypot(y - (ny - 1) / 2, x - (nx - 1) / 2)
    blob = flux_nJy * np.exp(-r / (4.0 + seed % 5)) / (2 * np.pi * (4.0 + seed % 5) ** 2)
    image = blob + rng.normal(0, 2.3, (ny, nx))
    return np.broadcast_to(image, shape).astype(np.float32).copy()


def write_fits(path: Path, data, header: dict | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    hdu = fits.PrimaryHDU(data)
    for key, value in (header or {}).items():
        hdu.header[key] = value
    hdu.writeto(path, overwrite=True)


@dataclass(frozen=True)
class Case:
    """One input file and the outcome the platform owes it."""

    name: str
    write: Callable[[Path], None]
    outcome: str  # "accept" or "reject"
    expect: str = ""  # reason (reject) or repair (accept) substring
    n_cutouts: int = 1


def _truncated(path: Path) -> None:
    write_fits(path, galaxy(1))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _nan_centre(path: Path) -> None:
    image = galaxy(2)
    image[S // 2, S // 2] = np.nan
    write_fits(path, image)


def _inf_edge(path: Path) -> None:
    image = galaxy(3)
    image[0, :5] = np.inf
    write_fits(path, image)


def _cube_bad_plane(path: Path) -> None:
    cube = np.stack([galaxy(4), np.zeros((S, S), np.float32)])
    write_fits(path, cube)


def _int16(path: Path) -> None:
    write_fits(path, np.round(galaxy(5)).astype(np.int16))


def _big_endian(path: Path) -> None:
    write_fits(path, galaxy(6).astype(">f8"))


def _hsc_layout(path: Path) -> None:
    hdul = fits.HDUList(
        [fits.PrimaryHDU(), fits.ImageHDU(galaxy(7), name="IMAGE"), fits.ImageHDU(
            np.zeros((S, S), np.int32), name="MASK")]
    )  # fmt: skip
    hdul.writeto(path)


def _empty_image_hdu(path: Path) -> None:
    fits.HDUList([fits.PrimaryHDU(), fits.ImageHDU(name="IMAGE")]).writeto(path)


def _wcs(scale_deg: float) -> dict:
    return {
        "CTYPE1": "RA---TAN",
        "CTYPE2": "DEC--TAN",
        "CRVAL1": 150.0,
        "CRVAL2": 2.0,
        "CRPIX1": (S + 1) / 2,
        "CRPIX2": (S + 1) / 2,
        "CDELT1": -scale_deg,
        "CDELT2": scale_deg,
        "CUNIT1": "deg",
        "CUNIT2": "deg",
    }


CASES: list[Case] = [
    Case("good.fits", lambda p: write_fits(p, galaxy(0), {"PIXSCALE": SCALE}), "accept"),
    Case("good_wcs.fits", lambda p: write_fits(p, galaxy(8), _wcs(SCALE / 3600)), "accept"),
    Case("hsc.fits", _hsc_layout, "accept"),
    Case(
        "cube3.fits",
        lambda p: write_fits(p, np.stack([galaxy(i) for i in (9, 10, 11)])),
        "accept",
        n_cutouts=3,
    ),  # fmt: skip
    Case(
        "large.fits",
        lambda p: write_fits(p, galaxy(12, (S + 20, S + 21))),
        "accept",
        "centred crop/pad",
    ),  # fmt: skip
    Case(
        "small.fits",
        lambda p: write_fits(p, galaxy(13, (S - 10, S - 10))),
        "accept",
        "centred crop/pad",
    ),  # fmt: skip
    Case("inf_edge.fits", _inf_edge, "accept", "non-finite px outside the centre set to 0"),
    Case("int16.fits", _int16, "accept", "i2->float32"),
    Case("bigendian_f8.fits", _big_endian, "accept", "f8->float32"),
    Case("truncated.fits", _truncated, "reject", "truncated"),
    Case(
        "notfits.fits",
        lambda p: p.write_bytes(b"SIMPLE? no, just text\n" * 50),
        "reject",
        "not a readable FITS",
    ),  # fmt: skip
    Case("zerobytes.fits", lambda p: p.write_bytes(b""), "reject", "not a readable FITS"),
    Case("empty.fits", lambda p: fits.PrimaryHDU().writeto(p), "reject", "empty HDU"),
    Case("empty_image.fits", _empty_image_hdu, "reject", "(IMAGE) is empty"),
    Case("oned.fits", lambda p: write_fits(p, galaxy(14)[0]), "reject", "1-D"),
    Case("fourd.fits", lambda p: write_fits(p, galaxy(15)[None, None]), "reject", "4-D"),
    Case(
        "tiny_image.fits",
        lambda p: write_fits(p, galaxy(16, (S // 3, S // 3))),
        "reject",
        "smaller than half",
    ),  # fmt: skip
    Case("nan_centre.fits", _nan_centre, "reject", "non-finite (NaN/inf) pixels in the central"),
    Case(
        "allzero.fits",
        lambda p: write_fits(p, np.zeros((S, S), np.float32)),
        "reject",
        "all pixels are zero",
    ),  # fmt: skip
    Case(
        "constant.fits",
        lambda p: write_fits(p, np.full((S, S), 3.0, np.float32)),
        "reject",
        "constant image",
    ),  # fmt: skip
    Case("cube_bad_plane.fits", _cube_bad_plane, "reject", "plane 1: all pixels are zero"),
    Case(
        "absurd_scale.fits",
        lambda p: write_fits(p, galaxy(17), {"PIXSCALE": 1e6}),
        "reject",
        "pixel scale 1e+06",
    ),  # fmt: skip
    Case(
        "scale_text.fits",
        lambda p: write_fits(p, galaxy(18), {"PIXSCALE": "big"}),
        "reject",
        "PIXSCALE = 'big' is not a number",
    ),  # fmt: skip
    Case(
        "wcs_1deg.fits",
        lambda p: write_fits(p, galaxy(19), _wcs(1.0)),
        "reject",
        "pixel scale 3600",
    ),  # fmt: skip
    Case("readme.txt", lambda p: p.write_text("not a cutout"), "reject", "not a FITS file name"),
]

GOOD = [c for c in CASES if c.outcome == "accept"]
BAD = [c for c in CASES if c.outcome == "reject"]


def write_cases(folder: Path, cases=CASES) -> dict[str, Case]:
    folder.mkdir(parents=True, exist_ok=True)
    for case in cases:
        case.write(folder / case.name)
    return {c.name: c for c in cases}


def add_symlink(folder: Path, target: Path, name: str = "link.fits") -> None:
    """A symbolic link to a (valid) FITS file outside the batch: must be rejected."""
    os.symlink(target, folder / name)
