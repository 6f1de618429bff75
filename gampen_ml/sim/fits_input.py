"""Reading and validating user-supplied 2-D FITS images (real PSFs and sky objects).

Files are listed, their image HDU chosen and their pixel scale read by the rules every
FITS reader shares (:mod:`gampen_ml.fits_image`); bad files raise
:class:`~gampen_ml.sim.errors.InputFileError` naming the file and the problem.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from astropy.io import fits

from gampen_ml.fits_image import (
    FITS_SUFFIXES,
    batch_files,
    image_hdu,
    is_fits_name,
    pixel_scale_arcsec,
    unreadable,
)
from gampen_ml.sim.errors import InputFileError


def list_fits_files(folder: Path | str) -> list[Path]:
    """The FITS files of an input folder (:func:`gampen_ml.fits_image.batch_files`, by suffix).

    Raises
    ------
    InputFileError
        If ``folder`` is not a folder or holds no FITS file.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise InputFileError(folder, "is not an existing folder")
    files = [p for p in batch_files(folder) if is_fits_name(p.name)]
    if not files:
        raise InputFileError(folder, f"contains no FITS file ({', '.join(FITS_SUFFIXES)})")
    return files


def read_fits_image(
    path: Path | str, require_positive_sum: bool
) -> tuple[np.ndarray, float | None]:
    """Read and validate the image HDU of a FITS file (:func:`gampen_ml.fits_image.image_hdu`).

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
        From the header (:func:`gampen_ml.fits_image.pixel_scale_arcsec`), when present.

    Raises
    ------
    InputFileError
        Not a readable FITS file, no image, not 2-D, NaN/inf pixels, all zero, a bad or
        non-square pixel scale, or (with ``require_positive_sum``) a non-positive sum.
    """
    path = Path(path)
    try:
        with fits.open(path, memmap=False) as hdul:
            _, hdu = image_hdu(hdul, path)
            data = np.array(hdu.data, dtype=np.float64)
            header = hdu.header.copy()
    except InputFileError:
        raise
    except Exception as exc:  # astropy raises OSError/ValueError/TypeError on corrupt files
        raise unreadable(path, exc) from exc
    if data.ndim != 2:
        raise InputFileError(path, f"image must be 2-D, got shape {data.shape}")
    bad = ~np.isfinite(data)
    if bad.any():
        raise InputFileError(path, f"has {int(bad.sum())} NaN/inf pixels")
    if not np.any(data):
        raise InputFileError(path, "image is all zero")
    if require_positive_sum and not data.sum() > 0:
        raise InputFileError(path, f"pixel sum must be positive, got {data.sum():.6g}")
    return data, pixel_scale_arcsec(header, path)
