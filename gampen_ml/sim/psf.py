"""PSF library: synthetic HSC-like Moffat PSFs, or real PSF images from FITS files.

Every PSF is an *effective* PSF (it includes the pixel response) sampled at the survey pixel
scale, centred on the central pixel of an odd-sized stamp and normalised to unit sum.
Galaxies are convolved with it without a further pixel convolution (see
:mod:`gampen_ml.sim.render`).

Synthetic library: Moffat profiles (``PSFConfig.moffat_beta``) with a seeing FWHM drawn
log-normally around ``fwhm_median_arcsec`` (clipped to ``fwhm_range_arcsec``) and a small
shear ``g1, g2 ~ N(0, ellipticity_rms)``, drawn with GalSim's pixel convolution.

Stored as ``psfs.fits`` (primary HDU, ``(n_psf, s, s)`` float32 cube) and ``psfs.parquet``
(one row per PSF: ``psf_id`` int32, ``source`` str, ``fwhm_arcsec``, ``g1``, ``g2`` (requested;
null for real PSFs), ``measured_fwhm_arcsec``, ``sum``).
"""

from __future__ import annotations

from pathlib import Path

import galsim
import numpy as np
import polars as pl
from astropy.io import fits

from gampen_ml.config import ImagingConfig, PSFConfig
from gampen_ml.io import StorageError
from gampen_ml.sim.fits_input import list_fits_files, read_fits_image

PSF_CUBE_FILE = "psfs.fits"
PSF_TABLE_FILE = "psfs.parquet"

#: Relative pixel-scale difference above which an input PSF is resampled.
PIXEL_SCALE_RTOL = 1e-3


def measure_fwhm_arcsec(image: np.ndarray, pixel_scale_arcsec: float) -> float:
    """FWHM of a centred PSF image measured from its pixels (``galsim.Image.calculateFWHM``)."""
    img = galsim.Image(np.ascontiguousarray(image, dtype=np.float64), scale=pixel_scale_arcsec)
    return float(img.calculateFWHM())


def _table(
    source: list[str],
    fwhm: np.ndarray,
    g1: np.ndarray,
    g2: np.ndarray,
    cube: np.ndarray,
    pixel_scale_arcsec: float,
) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "psf_id": pl.Series(np.arange(len(cube)), dtype=pl.Int32),
            "source": pl.Series(source, dtype=pl.String),
            "fwhm_arcsec": pl.Series(fwhm, dtype=pl.Float64, nan_to_null=True),
            "g1": pl.Series(g1, dtype=pl.Float64, nan_to_null=True),
            "g2": pl.Series(g2, dtype=pl.Float64, nan_to_null=True),
            "measured_fwhm_arcsec": pl.Series(
                [measure_fwhm_arcsec(p, pixel_scale_arcsec) for p in cube], dtype=pl.Float64
            ),
            "sum": pl.Series(cube.astype(np.float64).sum(axis=(1, 2)), dtype=pl.Float64),
        }
    )


def synthetic_psf_library(
    psf_cfg: PSFConfig, imaging: ImagingConfig, seed: int
) -> tuple[np.ndarray, pl.DataFrame]:
    """Draw a deterministic library of HSC-like Moffat PSFs.

    Parameters
    ----------
    psf_cfg : PSFConfig
        Number of PSFs, FWHM distribution, Moffat beta (or its range), shear scatter,
        stamp size.
    imaging : ImagingConfig
        Pixel scale (arcsec/px).
    seed : int
        Seed of the only random stream used.

    Returns
    -------
    cube : (n_psfs, s, s) float32
        Unit-sum effective PSFs, ``s = psf_cfg.stamp_size_px``.
    table : polars.DataFrame
        One row per PSF (see the module docstring).
    """
    rng = np.random.default_rng(seed)
    n = psf_cfg.n_psfs
    lo, hi = psf_cfg.fwhm_range_arcsec
    fwhm = np.clip(
        psf_cfg.fwhm_median_arcsec * np.exp(rng.normal(0.0, psf_cfg.fwhm_log_sigma, n)), lo, hi
    )
    g1 = rng.normal(0.0, psf_cfg.ellipticity_rms, n)
    g2 = rng.normal(0.0, psf_cfg.ellipticity_rms, n)
    beta = (
        rng.uniform(*psf_cfg.moffat_beta_range, n)
        if psf_cfg.moffat_beta_range is not None
        else np.full(n, psf_cfg.moffat_beta)
    )
    s = psf_cfg.stamp_size_px
    cube = np.empty((n, s, s), dtype=np.float32)
    for i in range(n):  # n_psfs <= a few hundred: one GalSim draw each
        moffat = galsim.Moffat(beta=float(beta[i]), fwhm=fwhm[i]).shear(g1=g1[i], g2=g2[i])
        arr = moffat.drawImage(nx=s, ny=s, scale=imaging.pixel_scale_arcsec).array
        cube[i] = arr / arr.sum()
    cube /= cube.sum(axis=(1, 2), keepdims=True, dtype=np.float64).astype(np.float32)
    table = _table(["synthetic"] * n, fwhm, g1, g2, cube, imaging.pixel_scale_arcsec)
    return cube, table


def _resample(image: np.ndarray, scale_in: float, scale_out: float, size: int) -> np.ndarray:
    ii = galsim.InterpolatedImage(galsim.Image(image, scale=scale_in))
    return ii.drawImage(nx=size, ny=size, scale=scale_out, method="no_pixel").array


def load_psf_folder(folder: Path | str, imaging: ImagingConfig) -> tuple[np.ndarray, pl.DataFrame]:
    """Ingest real PSF images (one 2-D FITS image per file) from ``folder``.

    Files are listed and read by :mod:`gampen_ml.sim.fits_input` (every FITS file under
    ``folder``, names starting with ``_`` or ``.`` skipped), and every one is validated
    before anything is returned. A PSF whose header pixel scale
    (:func:`gampen_ml.fits_image.pixel_scale_arcsec`) differs from the survey's by more
    than :data:`PIXEL_SCALE_RTOL` is resampled with ``galsim.InterpolatedImage``; a file
    whose header states no scale is taken to be at the survey scale. All PSFs are redrawn
    centred on a common odd stamp size (the largest resampled extent) and normalised to
    unit sum.

    Returns
    -------
    cube : (n_files, s, s) float32
    table : polars.DataFrame
        ``source`` holds the file's path relative to ``folder`` (its name, for a flat
        folder); ``fwhm_arcsec``, ``g1``, ``g2`` are null.

    Raises
    ------
    InputFileError
        Naming the first bad file and its problem (see :func:`read_fits_image`).
    """
    dx = imaging.pixel_scale_arcsec
    folder = Path(folder)
    files = list_fits_files(folder)
    images = [read_fits_image(path, require_positive_sum=True) for path in files]
    sizes = []
    for data, scale in images:
        scale = scale or dx
        sizes.append(int(np.ceil(max(data.shape) * scale / dx)))
    s = max(sizes) | 1  # odd, so the centre is a pixel centre
    cube = np.empty((len(files), s, s), dtype=np.float32)
    for i, (data, scale) in enumerate(images):
        scale = scale or dx
        same = abs(scale / dx - 1.0) <= PIXEL_SCALE_RTOL
        if same and data.shape == (s, s):
            arr = data
        else:
            arr = _resample(data, scale if not same else dx, dx, s)
        cube[i] = arr / arr.sum()
    nan = np.full(len(files), np.nan)
    sources = [p.relative_to(folder).as_posix() for p in files]
    table = _table(sources, nan, nan, nan, cube, dx)
    return cube, table


def write_psf_library(folder: Path | str, cube: np.ndarray, table: pl.DataFrame) -> None:
    """Write ``psfs.fits`` and ``psfs.parquet`` into ``folder`` (which must exist)."""
    folder = Path(folder)
    if cube.ndim != 3 or len(cube) != table.height:
        raise ValueError(f"PSF cube shape {cube.shape} does not match {table.height} table rows")
    fits.PrimaryHDU(np.asarray(cube, dtype=np.float32)).writeto(folder / PSF_CUBE_FILE)
    table.write_parquet(folder / PSF_TABLE_FILE)


def fwhm_range(table: pl.DataFrame, source: str = "PSF table") -> tuple[float, float]:
    """Smallest and largest ``measured_fwhm_arcsec`` of a library table (arcsec)."""
    fwhm = table["measured_fwhm_arcsec"]
    if fwhm.len() == 0 or fwhm.null_count():
        raise StorageError(f"{source}: measured_fwhm_arcsec is empty or has nulls")
    return float(fwhm.min()), float(fwhm.max())


def library_fwhm_range(folder: Path | str) -> tuple[float, float]:
    """:func:`fwhm_range` of the library stored in ``folder`` (reads only its table)."""
    path = Path(folder) / PSF_TABLE_FILE
    if not path.is_file():
        raise StorageError(f"missing PSF library file {path}")
    return fwhm_range(pl.read_parquet(path, columns=["measured_fwhm_arcsec"]), str(path))


def read_psf_library(folder: Path | str) -> tuple[np.ndarray, pl.DataFrame]:
    """Read a library written by :func:`write_psf_library`: ``((n, s, s) float32, table)``."""
    folder = Path(folder)
    for name in (PSF_CUBE_FILE, PSF_TABLE_FILE):
        if not (folder / name).is_file():
            raise StorageError(f"missing PSF library file {folder / name}")
    with fits.open(folder / PSF_CUBE_FILE, memmap=False) as hdul:
        cube = np.array(hdul[0].data, dtype=np.float32)
    return cube, pl.read_parquet(folder / PSF_TABLE_FILE)
