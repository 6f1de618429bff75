"""FITS image files: the rules every reader of them shares.

Three readers take FITS images from users: survey cutouts (:mod:`gampen_ml.fits_input`),
real PSFs and sky objects (:mod:`gampen_ml.sim.fits_input`). They share, from here:

* which names are FITS files (:data:`FITS_SUFFIXES`, :func:`is_fits_name`) and which are
  reserved (:func:`is_reserved_name`: markers, manifests, hidden uploads);
* how a folder is listed (:func:`batch_files`: recursive, sorted, reserved names skipped);
* which HDU holds the image (:func:`image_hdu`);
* the pixel scale of a header (:func:`pixel_scale_arcsec`);
* the error: :class:`gampen_ml.sim.errors.InputFileError` (``path``, ``problem``; a
  ``ValueError``), raised by every reader for every bad file.

Pixel-scale rule
----------------
1. ``PIXSCALE`` (arcsec/px) when the header has it: a positive finite number, else an error.
2. Else the WCS, when any of ``CDi_j``, ``CDELTi``, ``PCi_j`` (``i, j`` in 1, 2) is present:
   astropy reads the first two axes; each pixel side is a column norm of the pixel-scale
   matrix (``CD``, or ``CDELT`` x ``PC``) in the axes' ``CUNIT`` (degrees by default). The
   pixel must be square: its sides equal and its axes perpendicular to
   :data:`SQUARE_PIXEL_RTOL`; the scale is the geometric mean of the two sides.
   Missing matrix elements take the FITS defaults (Greisen & Calabretta 2002): a missing
   ``CDi_j`` is 0, so ``CD1_1`` without ``CD2_2`` is a singular matrix (axis 2 has no
   scale) and is rejected, not read as a square pixel; a missing ``CDELTi`` is 1 degree, so
   ``CDELT1`` alone is a non-square pixel and is rejected too.
3. Else None: the header states no scale (each reader says what it assumes then).
"""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import astropy.units as u
import numpy as np
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning
from astropy.wcs import WCS

from gampen_ml.sim.errors import InputFileError

#: File-name suffixes recognised as FITS (case-insensitive), plain, gzipped or tile-compressed.
FITS_SUFFIXES = (".fits", ".fit", ".fts", ".fits.gz", ".fit.gz", ".fts.gz", ".fits.fz", ".fz")
#: Names starting with these are reserved (markers, manifests, hidden uploads): skipped.
RESERVED_PREFIXES = ("_", ".")
#: Largest relative difference between a pixel's two sides, and largest departure of the
#: sine of the angle between its axes from 1, for the pixel to count as square. Header values
#: rounded to a few digits differ far less; a pixel distorted by more is not square by design,
#: and a single scale would hide the stretch from the network and the PSF model.
SQUARE_PIXEL_RTOL = 1e-3
#: Header keywords that give a WCS pixel scale (any one makes :func:`pixel_scale_arcsec` read it).
WCS_SCALE_KEYWORDS = tuple(
    [f"CD{i}_{j}" for i in (1, 2) for j in (1, 2)]
    + [f"CDELT{i}" for i in (1, 2)]
    + [f"PC{i}_{j}" for i in (1, 2) for j in (1, 2)]
)


def is_fits_name(name: str) -> bool:
    """Whether ``name`` has a FITS file-name suffix (:data:`FITS_SUFFIXES`, any case)."""
    return name.lower().endswith(FITS_SUFFIXES)


def is_reserved_name(name: str) -> bool:
    """Whether ``name`` starts with ``_`` or ``.`` (markers, manifests, hidden uploads)."""
    return name.startswith(RESERVED_PREFIXES)


def batch_files(root: Path | str, include_reserved: bool = False) -> list[Path]:
    """Every regular input file under ``root`` (recursive, sorted); ``[root]`` for a file.

    Symbolic links are returned too (the readers reject them or read through them) so
    that nothing is silently ignored. Entries whose name starts with ``_`` or ``.``
    (markers such as ``_READY``, hidden partial uploads), and folders with such names, are
    skipped unless ``include_reserved`` (the inbox lists them to reject them with a reason).
    """
    root = Path(root)
    if root.is_file() or root.is_symlink():
        return [root]
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if include_reserved or not is_reserved_name(d))
        for name in filenames:
            if include_reserved or not is_reserved_name(name):
                found.append(Path(dirpath) / name)
        # os.walk lists symlinks to folders among dirnames; report them as files.
        for name in list(dirnames):
            if (Path(dirpath) / name).is_symlink():
                found.append(Path(dirpath) / name)
                dirnames.remove(name)
    return sorted(found)


def unreadable(path: Path | str, exc: BaseException) -> InputFileError:
    """The error for a file astropy cannot open or read (it raises many exception types)."""
    return InputFileError(
        path, f"not a readable FITS file, truncated or corrupt ({type(exc).__name__}: {exc})"
    )


def image_hdu(hdul: fits.HDUList, path: Path | str) -> tuple[int, fits.hdu.base.ExtensionHDU]:
    """The HDU holding the image: the one named ``IMAGE`` (HSC cutout layout: empty primary,
    ``IMAGE``, ``MASK``, ``VARIANCE``), else the first image HDU with data.

    Returns
    -------
    index : int
        The HDU's index in ``hdul``.
    hdu : ExtensionHDU
        The HDU (primary, image or tile-compressed image).

    Raises
    ------
    InputFileError
        If the ``IMAGE`` HDU is empty or no image HDU has data.
    """
    names = [h.name.upper() for h in hdul]
    if "IMAGE" in names:
        index = names.index("IMAGE")
        if hdul[index].data is None:
            raise InputFileError(path, f"HDU {index} (IMAGE) is empty")
        return index, hdul[index]
    for index, hdu in enumerate(hdul):
        if isinstance(hdu, fits.PrimaryHDU | fits.ImageHDU | fits.CompImageHDU) and (
            hdu.data is not None
        ):
            return index, hdu
    raise InputFileError(path, f"no HDU with image data among {len(hdul)} HDU(s) (empty HDU)")


def pixel_scale_arcsec(header: fits.Header, path: Path | str) -> float | None:
    """Pixel scale in arcsec/px of an image header, by the module's rule; None when absent.

    Parameters
    ----------
    header : astropy.io.fits.Header
        The image HDU's header.
    path : path-like
        The file, named in errors.

    Returns
    -------
    float or None
        ``PIXSCALE``, else the side of the WCS's square pixel, else None.

    Raises
    ------
    InputFileError
        ``PIXSCALE`` not a positive number; a WCS that astropy cannot read, whose matrix is
        singular (``CD1_1`` without ``CD2_2``), whose unit is not an angle, or whose pixel
        is not square (:data:`SQUARE_PIXEL_RTOL`). The message names the keywords and values.
    """
    if "PIXSCALE" in header:
        value = header["PIXSCALE"]
        try:
            scale = float(value)
        except (TypeError, ValueError) as exc:
            raise InputFileError(path, f"header PIXSCALE = {value!r} is not a number") from exc
        if not (np.isfinite(scale) and scale > 0):
            raise InputFileError(path, f"header PIXSCALE = {value!r} must be a positive number")
        return scale
    present = [k for k in WCS_SCALE_KEYWORDS if k in header]
    if not present:
        return None
    hint = _missing_partner_hint(header)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyWarning)
            wcs = WCS(header, naxis=2)
        matrix = np.asarray(wcs.pixel_scale_matrix, dtype=np.float64)
        # No CUNIT reads as dimensionless: degrees, the FITS unit of celestial axes.
        units = [
            u.deg if unit == u.dimensionless_unscaled else u.Unit(unit)
            for unit in (wcs.wcs.cunit[0], wcs.wcs.cunit[1])
        ]
    except Exception as exc:  # astropy/wcslib raise several types for a malformed WCS
        # wcslib's message starts with "ERROR n in wcsset() at line ...": keep the reason.
        lines = [x.strip() for x in str(exc).splitlines() if x.strip()]
        reason = next((x for x in lines if not x.startswith("ERROR")), lines[0] if lines else "")
        reason = reason.rstrip(".")
        raise InputFileError(
            path,
            f"cannot read the pixel scale from the WCS ({', '.join(present)}): "
            f"{type(exc).__name__}: {reason}{hint}",
        ) from exc
    if units[0] != units[1]:
        raise InputFileError(
            path, f"WCS axes 1 and 2 have different units ({units[0]}, {units[1]})"
        )
    if not units[0].is_equivalent(u.arcsec):
        raise InputFileError(path, f"WCS unit {units[0]} (CUNIT1) is not an angle")
    to_arcsec = units[0].to(u.arcsec)
    sides = np.sqrt((matrix**2).sum(axis=0))  # astropy's proj_plane_pixel_scales
    area = abs(float(np.linalg.det(matrix)))
    if not (np.all(np.isfinite(sides)) and area > 0):
        raise InputFileError(
            path, f"WCS pixel has no area (sides {sides * to_arcsec} arcsec){hint}"
        )
    sin_angle = area / (sides[0] * sides[1])  # 1 when the axes are perpendicular
    if abs(sides[0] / sides[1] - 1.0) > SQUARE_PIXEL_RTOL or 1.0 - sin_angle > SQUARE_PIXEL_RTOL:
        angle_deg = float(np.degrees(np.arcsin(min(1.0, sin_angle))))
        raise InputFileError(
            path,
            f"WCS pixel is not square: sides {sides[0] * to_arcsec:.6g} x "
            f"{sides[1] * to_arcsec:.6g} arcsec, axes {angle_deg:.4g} deg apart "
            f"({', '.join(present)}; tolerance {SQUARE_PIXEL_RTOL:g}){hint}; "
            "give a square WCS or PIXSCALE",
        )
    return float(np.sqrt(sides[0] * sides[1])) * to_arcsec


def _missing_partner_hint(header: fits.Header) -> str:
    """A note for a header that gives one axis's scale and not the other's."""
    notes = []
    for a, b, default in (("CD1_1", "CD2_2", "0"), ("CDELT1", "CDELT2", "1 deg")):
        for have, lack in ((a, b), (b, a)):
            if have in header and lack not in header:
                notes.append(f"{have} without {lack} (FITS reads a missing {lack} as {default})")
    return f"; {', '.join(notes)}" if notes else ""
