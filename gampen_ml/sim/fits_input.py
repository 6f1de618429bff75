"""Reading and validating user-supplied 2-D FITS images (real PSFs and sky objects)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits

from gampen_ml.sim.errors import InputFileError

#: File name patterns accepted as FITS images in an input folder.
FITS_PATTERNS: tuple[str, ...] = ("*.fits", "*.fit", "*.fts", "*.fits.gz", "*.fit.gz")


def list_fits_files(folder: Path | str) -> list[Path]:
    """Sorted FITS files in ``folder``.

    Raises
    ------
    InputFileError
        If ``folder`` is not a folder or holds no FITS file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputFileError(folder, "is not an existing folder")
    files = sorted({p for pattern in FITS_PATTERNS for p in folder.glob(pattern) if p.is_file()})
    if not files:
        raise InputFileError(folder, f"contains no FITS file ({', '.join(FITS_PATTERNS)})")
    return files


def header_pixel_scale_arcsec(header: fits.Header) -> float | None:
    """Pixel scale in arcsec from ``PIXSCALE`` (arcsec), ``CD1_1`` or ``CDELT1`` (deg); else None."""
    if "PIXSCALE" in header:
        return abs(float(header["PIXSCALE"]))
    if "CD1_1" in header:
        cd11 = float(header["CD1_1"])
        cd21 = float(header.get("CD2_1", 0.0))
        return float(np.hypot(cd11, cd21) * 3600.0)
    if "CDELT1" in header:
        return abs(float(header["CDELT1"])) * 3600.0
    return None


def read_fits_image(
    path: Path | str, require_positive_sum: bool
) -> tuple[np.ndarray, float | None]:
    """Read and validate the first image HDU of a FITS file.

    Parameters
    ----------
    path : path-like
        The FITS file.
    require_positive_sum : bool
        Also reject images whose pixel sum is not positive (PSFs).

    Returns
    -------
    image : (H, W) float64
        The pixel values.
    pixel_scale_arcsec : float or None
        From the header, when present.

    Raises
    ------
    InputFileError
        Not a readable FITS file, no image, not 2-D, NaN/inf pixels, all zero, or (with
        ``require_positive_sum``) a non-positive sum.
    """
    path = Path(path)
    try:
        with fits.open(path, memmap=False) as hdul:
            hdu = next((h for h in hdul if getattr(h, "data", None) is not None), None)
            if hdu is None:
                raise InputFileError(path, "holds no image data in any HDU")
            data = np.array(hdu.data, dtype=np.float64)
            header = hdu.header.copy()
    except InputFileError:
        raise
    except Exception as exc:  # astropy raises OSError/ValueError/TypeError on corrupt files
        raise InputFileError(
            path, f"is not a readable FITS file ({type(exc).__name__}: {exc})"
        ) from exc
    if data.ndim != 2:
        raise InputFileError(path, f"image must be 2-D, got shape {data.shape}")
    bad = ~np.isfinite(data)
    if bad.any():
        raise InputFileError(path, f"has {int(bad.sum())} NaN/inf pixels")
    if not np.any(data):
        raise InputFileError(path, "image is all zero")
    if require_positive_sum and not data.sum() > 0:
        raise InputFileError(path, f"pixel sum must be positive, got {data.sum():.6g}")
    try:
        scale = header_pixel_scale_arcsec(header)
    except (TypeError, ValueError) as exc:
        raise InputFileError(path, f"unreadable pixel-scale keyword ({exc})") from exc
    if scale is not None and not (np.isfinite(scale) and scale > 0):
        raise InputFileError(path, f"header pixel scale must be positive, got {scale}")
    return data, scale
