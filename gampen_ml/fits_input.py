"""Real survey cutouts from FITS files: validation, light repairs, quarantine.

(Over 600 lines: one input contract -- read, validate, repair, quarantine cutouts and their
PSFs -- whose rules must agree; the FITS header rules live in :mod:`gampen_ml.fits_image`.)

A *batch* is a FITS file or a folder of FITS files (searched recursively). Each file
holds one cutout (a 2-D image) or a cube of cutouts (3-D, one cutout per plane). The
**file is the unit of acceptance**: a file is accepted only when every one of its
cutouts passes validation; otherwise the whole file is rejected with one reason per bad
plane and can be quarantined, fixed and resubmitted. Bad files never raise out of the
batch loader :func:`load_cutouts`; the single-file API :func:`load_cutout_file` raises
:class:`CutoutError` naming the file and the problem.

Validation and repairs (each repair is written to the ``repairs`` column)
---------------------------------------------------------------------------
* Sizes from the headers first, before any pixel is read (:func:`check_input_limits`):
  a file whose image plane, cube depth or decompressed data exceed the profile's
  :class:`~gampen_ml.config.InputLimits` is rejected naming the limit (a small ``.gz``
  claiming a huge image costs nothing).
* Not FITS, truncated, unreadable, or no HDU with image data -> rejected.
* The image is taken from the HDU named ``IMAGE`` if there is one (HSC cutout layout:
  empty primary, ``IMAGE``, ``MASK``, ``VARIANCE``), else from the first HDU with data.
* 2-D -> one cutout; 3-D -> one per plane; 1-D or >= 4-D -> rejected.
* Size: the simulations are ``imaging.stamp_size_px`` square (239 px) with the galaxy
  at the centre, so a larger image is **cropped** about its centre and a smaller one is
  **zero-padded** about its centre (cutouts are sky-subtracted, so 0 is the sky level);
  integer shifts only, never resampled (at most half a pixel of offset for even sizes).
  An axis shorter than half the stamp is rejected: padding would be mostly invented sky.
* Integer or non-native/float64 data -> converted to native ``float32`` (BSCALE/BZERO
  applied by astropy first).
* Non-finite pixels (NaN/inf): repaired to 0 (sky level) when they are at most
  :data:`MAX_NONFINITE_FRACTION` of the stamp and none lies in the central box of half
  the stamp side (where the galaxy is); otherwise rejected.
* All-zero or constant image -> rejected.
* Pixel scale by the rule every FITS reader shares
  (:func:`gampen_ml.fits_image.pixel_scale_arcsec`: ``PIXSCALE`` in arcsec/px, else a
  square WCS pixel; a non-square or singular WCS rejects the file): rejected when it
  differs from ``imaging.pixel_scale_arcsec`` by more than :data:`PIXEL_SCALE_TOLERANCE`.
  Resampling is deliberately not done: it would change the noise correlations and the
  PSF the network was trained on.
* RA/Dec of the stamp centre from the celestial WCS when a 2-D image has one (an
  invalid WCS is ignored and noted); cube planes take RA/Dec from a binary-table HDU
  with ``RA``/``DEC`` columns (degrees, one row per plane) when present, else null.
* PSF FWHM (arcsec), for the ``psf_outside_library`` flag, from the first of: a
  ``PSF_FWHM`` header keyword (image HDU, else primary); a ``PSF_FWHM`` column of the
  binary table of a cube (one row per plane); an image HDU named ``PSF`` (2-D, shared by
  every plane, or 3-D, one PSF per plane), measured with
  :func:`gampen_ml.sim.psf.measure_fwhm_arcsec`. Null when the file carries none; a
  value that is not a positive number rejects the file.

Another survey's files (``domain=``, a :class:`~gampen_ml.domains.Domain`)
---------------------------------------------------------------------------
With a domain the rules above hold, read the domain's way:

* the image is the HDU its ``[image]`` selector picks (else the rule above), its pixels
  multiplied by :attr:`Domain.flux_to_njy` (nanomaggies -> nJy: x 3631);
* the pixel scale is checked against the domain's ``pixel_scale_arcsec``, not the
  profile's;
* the ``[weight]`` HDU (inverse variance, same shape as the image), when declared, must
  exist: converted to nJy^-2, cropped/padded like the image (padding and non-finite
  pixels weigh 0) and returned as :attr:`CutoutBatch.weights` for a profile fitter (the
  network does not use it); a negative weight rejects the file;
* the PSF comes from the ``[psf]`` source (the cutout's own HDU, or a sibling file such
  as ``psf_{suffix}.fits``), its FWHM measured at the domain's pixel scale into
  ``psf_fwhm_arcsec``; a declared PSF that is missing rejects the cutout. Sibling PSF
  files are not cutouts: a folder scan lists them in :attr:`CutoutBatch.psf_files` when
  an accepted cutout uses them, and rejects them with their cutout otherwise;
* the stamp size is still ``imaging.stamp_size_px``: the caller passes the size of the
  network that will see the cutouts (``domain.imaging(profile.imaging)`` for the domain's
  own ``stamp_size_px``).

A folder's top-level :data:`BATCH_FILE` (``batch.toml``, the inbox's declaration of a
batch's domain, :mod:`gampen_ml.inbox`) is not input: the scan skips it.
"""

from __future__ import annotations

import os
import shutil
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
from astropy.io import fits
from astropy.utils.exceptions import AstropyWarning
from astropy.wcs import WCS

from gampen_ml.config import ImagingConfig, InputLimits
from gampen_ml.domains import Domain, HduSelectionError, HduSelector
from gampen_ml.fits_image import FITS_SUFFIXES as FITS_SUFFIXES  # inbox and domains import it here
from gampen_ml.fits_image import (
    batch_files,
    image_hdu,
    is_fits_name,
    is_reserved_name,
    pixel_scale_arcsec,
    unreadable,
)
from gampen_ml.sim.errors import InputFileError

#: Largest fraction of non-finite pixels that is repaired (set to 0) instead of rejected.
MAX_NONFINITE_FRACTION = 0.01
#: Largest tolerated relative difference between a header pixel scale and the survey's.
PIXEL_SCALE_TOLERANCE = 0.05
#: A batch folder's declaration of its domain (``domain = "<name>"``, :mod:`gampen_ml.inbox`):
#: at the top of a folder it is not input, and the scan skips it.
BATCH_FILE = "batch.toml"

TABLE_SCHEMA = {
    "galaxy_id": pl.Int64,
    "source_file": pl.String,
    "hdu": pl.Int32,
    "ra_deg": pl.Float64,
    "dec_deg": pl.Float64,
    "pixel_scale_arcsec": pl.Float64,
    "psf_fwhm_arcsec": pl.Float64,
    "repairs": pl.String,
}


#: The cutout API's name for :class:`gampen_ml.sim.errors.InputFileError`, the one error of
#: every FITS reader (cutouts, PSFs, sky objects): ``path``, ``problem``; a ``ValueError``,
#: bad input that no retry can fix, which the Dagster assets fail without retrying.
CutoutError = InputFileError


@dataclass(frozen=True)
class Rejection:
    """A rejected input file, ``file`` relative to the batch root."""

    file: str
    reason: str


@dataclass
class CutoutBatch:
    """The accepted cutouts of a batch, their provenance and the rejected files.

    Attributes
    ----------
    images : np.ndarray or None
        ``(N, S, S)`` float32, native byte order, sky-subtracted counts as delivered;
        None from :func:`validate_cutouts`, which does not keep pixels.
    table : pl.DataFrame
        One row per cutout (schema :data:`TABLE_SCHEMA`): ``galaxy_id`` (running index
        0..N-1), ``source_file`` (relative to ``root``), ``hdu`` (HDU index of a 2-D
        image, plane index of a cube, as in ``docs/catalog.md``), ``ra_deg``,
        ``dec_deg``, ``pixel_scale_arcsec`` (null when the header has none),
        ``psf_fwhm_arcsec`` (null when the file carries no PSF information),
        ``repairs`` (semicolon-separated, empty when none).
    rejections : list[Rejection]
        One per rejected file.
    accepted_files : list[str]
        Accepted files relative to ``root``.
    root : Path
        Batch root (the folder, or the parent of a single file).
    weights : np.ndarray or None
        ``(N, S, S)`` float32 inverse variance in nJy^-2 (0 = no information: padding,
        repaired pixels), aligned with ``images``; only when read with a domain that
        declares a ``[weight]`` HDU (and, like ``images``, not by :func:`validate_cutouts`).
    psf_files : list[str]
        Sibling PSF files (relative to ``root``) of the accepted cutouts, read with a domain
        whose PSF is a separate file: they belong with the batch but are not cutouts.
    """

    images: np.ndarray | None
    table: pl.DataFrame
    rejections: list[Rejection] = field(default_factory=list)
    accepted_files: list[str] = field(default_factory=list)
    root: Path = Path(".")
    weights: np.ndarray | None = None
    psf_files: list[str] = field(default_factory=list)

    @property
    def n_files_in(self) -> int:
        """Files examined: ``len(accepted_files) + len(rejections) + len(psf_files)``."""
        return len(self.accepted_files) + len(self.rejections) + len(self.psf_files)


def display_name(name: str) -> str:
    """``name`` printable and UTF-8 safe: undecodable bytes shown as ``\\xNN``."""
    return os.fsencode(name).decode("utf-8", "backslashreplace")


def _centre_radec(header: fits.Header, shape_yx: tuple[int, int]) -> tuple[float, float] | None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", AstropyWarning)
        wcs = WCS(header, naxis=2)
    if not wcs.has_celestial:
        return None
    celestial = wcs.celestial
    ny, nx = shape_yx
    sky = celestial.pixel_to_world((nx - 1) / 2.0, (ny - 1) / 2.0)
    icrs = sky.icrs
    return float(icrs.ra.deg), float(icrs.dec.deg)


def _plane_columns(hdul: fits.HDUList, n_planes: int, names: tuple[str, ...]):
    """Columns ``names`` (float64) of the first binary table with them and one row per plane."""
    for hdu in hdul:
        if isinstance(hdu, fits.BinTableHDU):
            columns = {c.upper(): c for c in hdu.columns.names}
            if all(n in columns for n in names) and len(hdu.data) == n_planes:
                return tuple(np.asarray(hdu.data[columns[n]], dtype=np.float64) for n in names)
    return None


def _psf_fwhm_arcsec(
    hdul: fits.HDUList, header: fits.Header, n_planes: int, cube: bool, scale: float, path: Path
) -> np.ndarray:
    """``(n_planes,)`` PSF FWHM in arcsec from the file (see the module docstring), NaN if none."""
    from gampen_ml.sim.psf import measure_fwhm_arcsec

    fwhm = np.full(n_planes, np.nan)
    for source in (header, hdul[0].header):
        if "PSF_FWHM" in source:
            value = source["PSF_FWHM"]
            try:
                fwhm[:] = float(value)
            except (TypeError, ValueError):
                fwhm[:] = np.nan
            where = f"header PSF_FWHM = {value!r}"
            break
    else:
        column = _plane_columns(hdul, n_planes, ("PSF_FWHM",)) if cube else None
        names = [h.name.upper() for h in hdul]
        if column is not None:
            fwhm, where = column[0], "table column PSF_FWHM"
        elif "PSF" in names:
            psf = hdul[names.index("PSF")].data
            psf = None if psf is None else np.asarray(psf, dtype=np.float64)
            if psf is None or psf.ndim not in (2, 3) or (psf.ndim == 3 and len(psf) != n_planes):
                shape = None if psf is None else psf.shape
                raise CutoutError(
                    path, f"PSF HDU has shape {shape}; expected 2-D or ({n_planes}, ny, nx)"
                )
            planes = psf if psf.ndim == 3 else psf[None]
            measured = np.array([measure_fwhm_arcsec(p, scale) for p in planes])
            fwhm[:] = measured if psf.ndim == 3 else measured[0]
            where = "PSF HDU (measured FWHM)"
        else:
            return fwhm
    if not (np.all(np.isfinite(fwhm)) and np.all(fwhm > 0)):
        raise CutoutError(path, f"{where}: PSF FWHM must be positive arcsec, got {fwhm[:5]}")
    return fwhm


def _select_hdu(hdul: fits.HDUList, selector: HduSelector, what: str, path: Path) -> int:
    try:
        return selector.select(hdul)
    except HduSelectionError as exc:
        raise CutoutError(path, f"{what}: {exc}") from exc


def _open_psf_file(cutout: Path, domain: Domain, limits: InputLimits | None) -> Path:
    """The sibling PSF file of ``cutout`` under ``domain``, checked like a cutout file."""
    psf_path = domain.psf.path_for(cutout)
    where = f"PSF file {psf_path.name} (domain {domain.name} [psf] file)"
    if psf_path.is_symlink():
        raise CutoutError(cutout, f"{where} is a symbolic link: not accepted")
    if not psf_path.is_file():
        raise CutoutError(cutout, f"{where} not found beside the cutout")
    if limits is not None:
        check_input_limits(psf_path, limits)
    return psf_path


def _domain_psf(
    hdul: fits.HDUList, path: Path, domain: Domain, limits: InputLimits | None = None
) -> np.ndarray:
    """The PSF image(s) of the cutout ``path`` (open as ``hdul``) from the domain's source."""
    if domain.psf.file is None:
        index = _select_hdu(hdul, domain.psf.hdu, f"domain {domain.name} [psf]", path)
        return np.asarray(hdul[index].data, dtype=np.float64)
    psf_path = _open_psf_file(path, domain, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyWarning)
            with fits.open(psf_path, memmap=False, lazy_load_hdus=False) as psf_hdul:
                what = f"PSF file {psf_path.name}, domain {domain.name} [psf]"
                index = _select_hdu(psf_hdul, domain.psf.hdu, what, path)
                return np.asarray(psf_hdul[index].data, dtype=np.float64)
    except CutoutError:
        raise
    except Exception as exc:  # astropy signals bad/truncated files with many types
        raise CutoutError(
            path, f"PSF file {psf_path.name} is not a readable FITS file ({type(exc).__name__})"
        ) from exc


def _domain_psf_fwhm(psf: np.ndarray, n_planes: int, domain: Domain, path: Path) -> np.ndarray:
    """``(n_planes,)`` FWHM (arcsec) of a domain PSF: 2-D shared, or 3-D one per plane."""
    from gampen_ml.sim.psf import measure_fwhm_arcsec

    if psf.ndim not in (2, 3) or (psf.ndim == 3 and len(psf) != n_planes):
        raise CutoutError(
            path, f"domain {domain.name} PSF has shape {psf.shape}; expected 2-D or "
            f"({n_planes}, ny, nx)",
        )  # fmt: skip
    planes = psf if psf.ndim == 3 else psf[None]
    if not (np.all(np.isfinite(planes)) and np.all(planes.sum(axis=(1, 2)) > 0)):
        raise CutoutError(path, f"domain {domain.name} PSF has non-finite or no positive flux")
    measured = np.array([measure_fwhm_arcsec(p, domain.pixel_scale_arcsec) for p in planes])
    if not (np.all(np.isfinite(measured)) and np.all(measured > 0)):
        raise CutoutError(path, f"domain {domain.name} PSF: FWHM not measurable ({measured})")
    return measured if psf.ndim == 3 else np.full(n_planes, measured[0])


def read_psf_image(path: Path | str, domain: Domain | None = None) -> np.ndarray | None:
    """The PSF image of a cutout file, for a profile fitter.

    Parameters
    ----------
    path : Path or str
        The cutout FITS file.
    domain : Domain, optional
        Read the PSF from the domain's ``[psf]`` source; without one (or a domain without
        ``[psf]``), from an HDU named ``PSF`` in the file.

    Returns
    -------
    np.ndarray or None
        ``(ny, nx)`` (or ``(n_planes, ny, nx)``) float64 as stored (the survey's PSFs are
        unit-sum); None when the file has no ``PSF`` HDU and no domain PSF is declared.

    Raises
    ------
    CutoutError
        When a declared PSF is missing or unreadable.
    """
    path = Path(path)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyWarning)
            with fits.open(path, memmap=False, lazy_load_hdus=False) as hdul:
                if domain is not None and domain.psf is not None:
                    return _domain_psf(hdul, path, domain)
                names = [h.name.upper() for h in hdul]
                if "PSF" not in names or hdul[names.index("PSF")].data is None:
                    return None
                return np.asarray(hdul[names.index("PSF")].data, dtype=np.float64)
    except CutoutError:
        raise
    except Exception as exc:  # astropy signals bad/truncated files with many types
        raise CutoutError(path, f"not a readable FITS file ({type(exc).__name__}: {exc})") from exc


def fit_to_stamp(image: np.ndarray, stamp_px: int) -> np.ndarray:
    """Crop or zero-pad the last two axes of ``image`` about their centre to ``stamp_px``.

    Parameters
    ----------
    image : np.ndarray
        ``(..., ny, nx)``.
    stamp_px : int
        Output side S.

    Returns
    -------
    np.ndarray
        ``(..., S, S)`` float32. For an axis of length n, output pixel i is input pixel
        ``i + (n - S) // 2`` (crop) or output ``i + (S - n) // 2`` holds input i (pad),
        so the central pixel of an odd axis lands on the central pixel of the stamp.
    """
    out_shape = image.shape[:-2] + (stamp_px, stamp_px)
    out = np.zeros(out_shape, dtype=np.float32)
    src, dst = [], []
    for n in image.shape[-2:]:
        if n >= stamp_px:
            start = (n - stamp_px) // 2
            src.append(slice(start, start + stamp_px))
            dst.append(slice(0, stamp_px))
        else:
            start = (stamp_px - n) // 2
            src.append(slice(0, n))
            dst.append(slice(start, start + n))
    out[(..., dst[0], dst[1])] = image[(..., src[0], src[1])]
    return out


def _check_planes(
    planes: np.ndarray, stamp_px: int
) -> tuple[np.ndarray, list[str], list[str | None]]:
    """Validate and repair ``(n, S, S)`` planes; returns (planes, problems per plane, repair)."""
    n = planes.shape[0]
    finite = np.isfinite(planes)
    n_bad = (~finite).sum(axis=(1, 2))
    centre = slice(stamp_px // 4, stamp_px - stamp_px // 4)
    bad_in_centre = (~finite[:, centre, centre]).any(axis=(1, 2))
    repairable = (n_bad <= MAX_NONFINITE_FRACTION * stamp_px * stamp_px) & ~bad_in_centre
    problems: list[str] = [""] * n
    repairs: list[str | None] = [None] * n
    for k in np.flatnonzero(n_bad > 0):
        if repairable[k]:
            repairs[k] = f"{int(n_bad[k])} non-finite px outside the centre set to 0"
        else:
            where = "in the central box" if bad_in_centre[k] else "in the stamp"
            problems[k] = (
                f"{int(n_bad[k])} non-finite (NaN/inf) pixels {where} "
                f"(repair limit {MAX_NONFINITE_FRACTION:.0%} outside the centre)"
            )
    planes = np.where(finite, planes, np.float32(0.0))
    peak = np.abs(planes).max(axis=(1, 2))
    spread = planes.max(axis=(1, 2)) - planes.min(axis=(1, 2))
    for k in np.flatnonzero(peak == 0):
        problems[k] = problems[k] or "all pixels are zero"
    for k in np.flatnonzero((spread == 0) & (peak > 0)):
        problems[k] = problems[k] or f"constant image (every pixel = {planes[k, 0, 0]:g})"
    return planes, problems, repairs


def _data_size(header: fits.Header) -> tuple[int, tuple[int, ...] | None]:
    """Decompressed data bytes of one HDU from its header, and its image axes (None for
    a table). Axes are ``(NAXIS1, NAXIS2, ...)``; tile-compressed images use ``ZNAXISn``."""
    if header.get("ZIMAGE"):
        axes = tuple(int(header.get(f"ZNAXIS{i}", 0)) for i in range(1, int(header["ZNAXIS"]) + 1))
        return abs(int(header["ZBITPIX"])) // 8 * int(np.prod(axes, dtype=np.int64)), axes
    axes = tuple(int(header.get(f"NAXIS{i}", 0)) for i in range(1, int(header["NAXIS"]) + 1))
    count = int(np.prod(axes, dtype=np.int64)) if axes else 0
    size = abs(int(header["BITPIX"])) // 8 * int(header.get("GCOUNT", 1))
    size *= int(header.get("PCOUNT", 0)) + count
    is_image = header.get("XTENSION", "IMAGE").strip().upper() == "IMAGE"
    return size, (axes if is_image else None)


def check_input_limits(path: Path | str, limits: InputLimits) -> int:
    """Check ``path`` against ``limits`` from its headers alone; return its data bytes.

    Headers are read one HDU at a time (never the data), so a file claiming a huge image,
    sparse or compressed, is refused before anything is allocated.

    Raises
    ------
    CutoutError
        Naming the HDU and the limit exceeded, or when the headers cannot be read.
    """
    path = Path(path)
    total = 0
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyWarning)
            with fits.open(
                path, memmap=False, lazy_load_hdus=True, disable_image_compression=True
            ) as hdul:
                for index, hdu in enumerate(hdul):
                    size, axes = _data_size(hdu.header)
                    if axes is not None and len(axes) >= 2:
                        pixels = axes[0] * axes[1]
                        if pixels > limits.max_image_pixels:
                            raise CutoutError(
                                path,
                                f"HDU {index} image is {axes[1]}x{axes[0]} px: over the limit "
                                f"of {limits.max_image_pixels:,} pixels per image (max_image_pixels)",
                            )
                        if len(axes) >= 3 and axes[2] > limits.max_planes:
                            raise CutoutError(
                                path,
                                f"HDU {index} cube has {axes[2]:,} planes: over the limit of "
                                f"{limits.max_planes:,} (max_planes)",
                            )
                    total += size
                    if total > limits.max_file_bytes:
                        raise CutoutError(
                            path,
                            f"data of {total:,} bytes (decompressed, to HDU {index}): over the "
                            f"limit of {limits.max_file_bytes:,} bytes per file (max_file_bytes)",
                        )
    except CutoutError:
        raise
    except Exception as exc:  # astropy signals bad headers with many types
        raise unreadable(path, exc) from exc
    return total


def load_cutout_file(
    path: Path | str,
    imaging: ImagingConfig,
    root: Path | str | None = None,
    limits: InputLimits | None = None,
    *,
    domain: Domain | None = None,
) -> tuple[np.ndarray, pl.DataFrame]:
    """Read and validate every cutout of one FITS file.

    Parameters
    ----------
    path : Path or str
        A FITS file (2-D image or 3-D cube).
    imaging : ImagingConfig
        Stamp size and pixel scale the network expects (with a domain, only the stamp
        size: the pixel scale is the domain's).
    root : Path or str, optional
        Folder that ``source_file`` is made relative to (default: the file's folder).
    limits : InputLimits, optional
        Checked from the headers before the pixels are read (:func:`check_input_limits`).
    domain : Domain, optional
        Read the file as the survey ``domain`` delivers it (module docstring): its image
        HDU, flux unit, pixel scale and PSF source. Its weights: :func:`load_cutouts`.

    Returns
    -------
    images : np.ndarray
        ``(n, S, S)`` float32 in nJy with ``S = imaging.stamp_size_px``.
    table : pl.DataFrame
        ``n`` rows, :data:`TABLE_SCHEMA` with ``galaxy_id`` 0..n-1.

    Raises
    ------
    CutoutError
        If the file or any of its cutouts is unusable; the message names the file, the
        HDU/plane and the problem.
    """
    images, table, _ = _read_cutout_file(path, imaging, root, limits, domain)
    return images, table


def _read_cutout_file(
    path: Path | str,
    imaging: ImagingConfig,
    root: Path | str | None,
    limits: InputLimits | None,
    domain: Domain | None,
    psf_limits: InputLimits | None = None,
) -> tuple[np.ndarray, pl.DataFrame, np.ndarray | None]:
    """:func:`load_cutout_file` plus the ``(n, S, S)`` weights (None unless declared).

    ``psf_limits`` (default ``limits``) are checked on a sibling PSF file.
    """
    psf_limits = psf_limits or limits
    path = Path(path)
    root = Path(root) if root is not None else path.parent
    relative = path.relative_to(root).as_posix() if path != root else path.name
    stamp_px = imaging.stamp_size_px
    if path.is_symlink():
        raise CutoutError(path, "symbolic links are not accepted")
    if not path.is_file():
        raise CutoutError(path, "not a regular file")
    if limits is not None:
        check_input_limits(path, limits)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", AstropyWarning)
            with fits.open(path, memmap=False, lazy_load_hdus=False) as hdul:
                if domain is not None and domain.image is not None:
                    index = _select_hdu(hdul, domain.image, f"domain {domain.name} [image]", path)
                    hdu = hdul[index]
                else:
                    index, hdu = image_hdu(hdul, path)
                data = np.asarray(hdu.data)
                header = hdu.header.copy()
                n_planes = data.shape[0] if data.ndim == 3 else 1
                cube_radec = (
                    _plane_columns(hdul, n_planes, ("RA", "DEC")) if data.ndim == 3 else None
                )
                scale = pixel_scale_arcsec(header, path)
                weight = None
                if domain is not None and domain.weight is not None:
                    w_index = _select_hdu(
                        hdul, domain.weight, f"domain {domain.name} [weight]", path
                    )
                    weight = np.asarray(hdul[w_index].data)
                if domain is not None and domain.psf is not None:
                    psf = _domain_psf(hdul, path, domain, psf_limits)
                    psf_fwhm = _domain_psf_fwhm(psf, n_planes, domain, path)
                else:
                    psf_fwhm = _psf_fwhm_arcsec(
                        hdul,
                        header,
                        n_planes,
                        data.ndim == 3,
                        scale or (domain or imaging).pixel_scale_arcsec,
                        path,
                    )
    except CutoutError:
        raise
    except Exception as exc:  # astropy signals bad/truncated files with many types
        raise unreadable(path, exc) from exc

    if data.ndim not in (2, 3):
        raise CutoutError(
            path, f"HDU {index} has {data.ndim}-D data {data.shape}; expected 2-D or 3-D"
        )
    if data.size == 0:
        raise CutoutError(path, f"HDU {index} has empty data {data.shape}")
    repairs: list[str] = []
    if data.dtype.kind not in "iuf":
        raise CutoutError(path, f"HDU {index} has non-numeric dtype {data.dtype}")
    if data.dtype.kind in "iu" or data.dtype.itemsize != 4:
        repairs.append(f"{data.dtype.str}->float32")
    planes = data.astype(np.float32) if data.ndim == 3 else data.astype(np.float32)[None]
    if domain is not None and domain.flux_to_njy != 1.0:
        planes *= np.float32(domain.flux_to_njy)
    ny, nx = planes.shape[1:]
    if min(ny, nx) < stamp_px / 2:
        raise CutoutError(
            path,
            f"HDU {index} image is {ny}x{nx} px, smaller than half the {stamp_px} px stamp",
        )
    if (ny, nx) != (stamp_px, stamp_px):
        repairs.append(f"{ny}x{nx}->{stamp_px}x{stamp_px} centred crop/pad")

    if scale is not None:
        expected = (domain or imaging).pixel_scale_arcsec
        whose = "the survey's" if domain is None else f"domain {domain.name}'s"
        if not np.isfinite(scale) or abs(scale / expected - 1.0) > PIXEL_SCALE_TOLERANCE:
            raise CutoutError(
                path,
                f"pixel scale {scale:.4g} arcsec/px (header) differs from {whose} "
                f"{expected} arcsec/px by more than {PIXEL_SCALE_TOLERANCE:.0%}",
            )
    weights = None if weight is None else _weights(weight, data, planes, domain, path)

    n = planes.shape[0]
    ra = np.full(n, np.nan)
    dec = np.full(n, np.nan)
    if data.ndim == 2:
        try:
            radec = _centre_radec(header, (ny, nx))
        except Exception as exc:  # a broken WCS must not cost the cutout
            radec = None
            repairs.append(f"invalid WCS ignored ({type(exc).__name__})")
        if radec is not None:
            ra[:], dec[:] = radec
    elif cube_radec is not None:
        ra, dec = cube_radec

    stamps, problems, plane_repairs = _check_planes(fit_to_stamp(planes, stamp_px), stamp_px)
    bad = [k for k, p in enumerate(problems) if p]
    if bad:
        where = (lambda k: f"HDU {index}") if data.ndim == 2 else (lambda k: f"plane {k}")
        shown = "; ".join(f"{where(k)}: {problems[k]}" for k in bad[:5])
        more = f" (and {len(bad) - 5} more planes)" if len(bad) > 5 else ""
        raise CutoutError(path, shown + more)

    if weights is not None:
        weights = fit_to_stamp(weights, stamp_px)
    repair_text = ["; ".join(repairs + ([r] if r else [])) for r in plane_repairs]
    table = pl.DataFrame(
        {
            "galaxy_id": np.arange(n, dtype=np.int64),
            "source_file": [relative] * n,
            "hdu": np.full(n, index, dtype=np.int32)
            if data.ndim == 2
            else np.arange(n, dtype=np.int32),
            "ra_deg": ra,
            "dec_deg": dec,
            # A domain declares its scale: a header without one is read at the domain's.
            "pixel_scale_arcsec": [
                scale if scale is not None or domain is None else domain.pixel_scale_arcsec
            ]
            * n,
            "psf_fwhm_arcsec": psf_fwhm,
            "repairs": repair_text,
        },
        schema=TABLE_SCHEMA,
    ).with_columns(
        pl.col("ra_deg").fill_nan(None),
        pl.col("dec_deg").fill_nan(None),
        pl.col("psf_fwhm_arcsec").fill_nan(None),
    )
    return stamps, table, weights


def _weights(
    weight: np.ndarray, data: np.ndarray, planes: np.ndarray, domain: Domain, path: Path
) -> np.ndarray:
    """``(n, ny, nx)`` float32 inverse variance in nJy^-2 of the image ``planes``.

    Non-finite weights and the weights of non-finite image pixels become 0 (no
    information); a negative weight, or a map of another shape than the image, rejects the
    file.
    """
    if weight.shape != data.shape:
        raise CutoutError(
            path,
            f"domain {domain.name} [weight] HDU has shape {weight.shape}, the image {data.shape}",
        )
    if weight.dtype.kind not in "iuf":
        raise CutoutError(path, f"domain {domain.name} [weight] HDU has dtype {weight.dtype}")
    weight = weight.astype(np.float64).reshape(planes.shape)
    finite = np.isfinite(weight)
    if np.any(weight[finite] < 0):
        raise CutoutError(
            path, f"domain {domain.name} [weight] HDU has {int((weight[finite] < 0).sum())} "
            "negative inverse variances",
        )  # fmt: skip
    weight = np.where(finite & np.isfinite(planes), weight, 0.0) / domain.flux_to_njy**2
    return weight.astype(np.float32)


def load_cutouts(
    path: Path | str,
    imaging: ImagingConfig,
    limits: InputLimits | None = None,
    *,
    domain: Domain | None = None,
) -> CutoutBatch:
    """Load every valid cutout of a FITS file or of a folder of FITS files.

    Parameters
    ----------
    path : Path or str
        A FITS file, or a folder searched recursively (names starting with ``_`` or
        ``.`` are skipped; every other file counts as input and is rejected unless it is
        a valid FITS cutout with a FITS suffix).
    imaging : ImagingConfig
        Stamp size and pixel scale the network expects.
    limits : InputLimits, optional
        Size limits checked from each file's headers before its pixels are read; files
        beyond ``max_batch_bytes`` of the batch (in sorted order) are rejected.
    domain : Domain, optional
        Read the files as that survey delivers them (module docstring); with a declared
        ``[weight]`` HDU the batch carries ``weights``.

    Returns
    -------
    CutoutBatch
        Images ``(N, S, S)`` float32, the provenance table, rejections; files are read in
        sorted order and ``galaxy_id`` runs 0..N-1 over the batch. Never raises for a bad
        input file: ``n_files_in == len(accepted_files) + len(rejections) +
        len(psf_files)``.

    Raises
    ------
    CutoutError
        Only if ``path`` itself does not exist.
    """
    return _scan(path, imaging, keep_images=True, limits=limits, domain=domain)


def validate_cutouts(
    path: Path | str,
    imaging: ImagingConfig,
    limits: InputLimits | None = None,
    reject_reserved: bool = False,
    *,
    domain: Domain | None = None,
) -> CutoutBatch:
    """Like :func:`load_cutouts` but keeps no pixels (``images`` is None): memory stays
    at one file's worth however large the batch, for the inbox.

    With ``reject_reserved`` the files named ``_*``/``.*`` are listed and rejected with a
    reason instead of skipped.
    """
    return _scan(path, imaging, False, limits, reject_reserved, domain=domain)


def _name_problem(relative: str, name: str, reject_reserved: bool) -> str | None:
    """Why a file is rejected by its name alone, or None."""
    try:
        relative.encode("utf-8")
    except UnicodeEncodeError:
        raw = os.fsencode(relative).hex()
        return f"file name is not valid UTF-8 (bytes hex {raw}); rename it to catalogue it"
    if reject_reserved and any(is_reserved_name(part) for part in Path(relative).parts):
        return (
            "reserved name (a path part starts with '_' or '.': markers and hidden "
            "partial uploads); not read"
        )
    if not is_fits_name(name):
        return f"not a FITS file name (suffix of {name!r})"
    return None


def _psf_siblings(files: list[Path], domain: Domain | None) -> dict[Path, Path]:
    """Cutout -> its sibling PSF file, for the files of a scan whose PSF file is among them.

    A file that is another file's PSF is not a cutout (``psf_<ra>_<dec>.fits`` beside
    ``cutout_<ra>_<dec>.fits``); a file whose pattern names itself is not anyone's PSF.
    """
    if domain is None or domain.psf is None or domain.psf.file is None:
        return {}
    present = set(files)
    siblings = {}
    for file in files:
        if is_fits_name(file.name) and not is_reserved_name(file.name):
            psf_path = domain.psf.path_for(file)
            if psf_path != file and psf_path in present:
                siblings[file] = psf_path
    return siblings


def _scan(
    path: Path | str,
    imaging: ImagingConfig,
    keep_images: bool,
    limits: InputLimits | None = None,
    reject_reserved: bool = False,
    *,
    domain: Domain | None = None,
) -> CutoutBatch:
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        raise CutoutError(path, "no such file or folder")
    root = path if path.is_dir() and not path.is_symlink() else path.parent
    stamp_px = imaging.stamp_size_px
    images: list[np.ndarray] = []
    weights: list[np.ndarray] = []
    tables: list[pl.DataFrame] = []
    accepted: list[str] = []
    rejections: list[Rejection] = []
    batch_bytes = 0
    files = [
        f
        for f in batch_files(path, include_reserved=reject_reserved)
        if not (path.is_dir() and f == path / BATCH_FILE)
    ]
    siblings = _psf_siblings(files, domain)
    sibling_psfs = set(siblings.values())
    psf_of_accepted: set[Path] = set()
    for file in files:
        if file in sibling_psfs:
            continue  # a PSF file: stored or rejected with its cutouts below
        relative = file.relative_to(root).as_posix()
        problem = _name_problem(relative, file.name, reject_reserved)
        if problem is not None:
            rejections.append(Rejection(relative, problem))
            continue
        size = 0
        try:
            if limits is not None and not file.is_symlink() and file.is_file():
                size = check_input_limits(file, limits)
                if batch_bytes + size > limits.max_batch_bytes:
                    raise CutoutError(
                        file,
                        f"the batch's data would exceed the limit of "
                        f"{limits.max_batch_bytes:,} bytes per batch (max_batch_bytes) with "
                        f"this file's {size:,}; resubmit it in another batch",
                    )
            stamps, table, weight = _read_cutout_file(
                file, imaging, root, None, domain, psf_limits=limits
            )
        except CutoutError as exc:
            rejections.append(Rejection(relative, exc.problem))
            continue
        batch_bytes += size
        if keep_images:
            images.append(stamps)
            if weight is not None:
                weights.append(weight)
        tables.append(table)
        accepted.append(relative)
        if file in siblings:
            psf_of_accepted.add(siblings[file])
    psf_files = []
    for psf_path in sorted(sibling_psfs):
        relative = psf_path.relative_to(root).as_posix()
        if psf_path in psf_of_accepted:
            psf_files.append(relative)
        else:
            users = sorted(
                f.relative_to(root).as_posix() for f, p in siblings.items() if p == psf_path
            )
            rejections.append(
                Rejection(relative, f"PSF file of rejected cutout(s) {', '.join(users)}")
            )
    if tables:
        table = pl.concat(tables).with_columns(galaxy_id=pl.int_range(pl.len(), dtype=pl.Int64))
        stack = np.concatenate(images, axis=0) if keep_images else None
    else:
        table = pl.DataFrame(schema=TABLE_SCHEMA)
        stack = np.zeros((0, stamp_px, stamp_px), dtype=np.float32) if keep_images else None
    declared = domain is not None and domain.weight is not None and keep_images
    weight_stack = None
    if declared:
        weight_stack = (
            np.concatenate(weights, axis=0) if weights else np.zeros_like(stack, dtype=np.float32)
        )
    return CutoutBatch(stack, table, rejections, accepted, root, weight_stack, psf_files)


def _contained(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def safe_join(folder: Path | str, relative: str) -> Path:
    """``folder / relative`` resolved, refusing any result outside ``folder``.

    Raises
    ------
    CutoutError
        If ``relative`` is absolute, contains ``..`` or a NUL, or resolves outside.
    """
    folder = Path(folder).resolve()
    if not relative or "\x00" in relative or Path(relative).is_absolute():
        raise CutoutError(relative, f"illegal file name (outside {folder})")
    if ".." in Path(relative).parts:
        raise CutoutError(relative, f"path traversal outside {folder}")
    # Resolve the parent only: the file itself may be a symlink we must not follow.
    candidate = folder / relative
    resolved = candidate.parent.resolve() / candidate.name
    if not _contained(resolved, folder) or resolved == folder:
        raise CutoutError(relative, f"path escapes {folder}")
    return resolved


def quarantine(
    rejections: list[Rejection],
    batch_dir: Path | str,
    quarantine_dir: Path | str,
    batch_name: str | None = None,
    checkpoint: Callable[[str], None] | None = None,
) -> list[Path]:
    """Move rejected files to ``<quarantine_dir>/<batch>/`` with a ``<name>.reason.txt``.

    Crash-safe and idempotent: each reason file is written before its file moves, and the
    move is a rename (or, across filesystems, a copy to a hidden name renamed into place,
    then the source removed), so the quarantined file appears whole or not at all. Called
    again after a crash it finishes the job: a source identical to its quarantined copy
    (crash between copy and removal) is only removed.

    Parameters
    ----------
    rejections : list[Rejection]
        From :func:`load_cutouts` on ``batch_dir`` (``file`` relative to it).
    batch_dir : Path or str
        The batch root the rejections are relative to.
    quarantine_dir : Path or str
        Quarantine root; the batch's files go under ``<quarantine_dir>/<batch_name>/``
        keeping their relative paths.
    batch_name : str, optional
        Sub-folder name (default ``batch_dir.name``); must be a single path component.
    checkpoint : callable(step), optional
        Called after each file is quarantined (``"quarantined:<file>"``); for fault tests.

    Returns
    -------
    list[Path]
        The quarantined file paths.

    Raises
    ------
    CutoutError
        If a rejected file name or the batch name would escape the batch folder or the
        quarantine folder (path traversal), or a different file of that name is already in
        quarantine, before anything is moved.
    """
    batch_dir = Path(batch_dir).resolve()
    target_root = safe_join(quarantine_dir, batch_name or batch_dir.name)
    moves = []
    for rejection in rejections:
        source = safe_join(batch_dir, rejection.file)
        target = safe_join(target_root, rejection.file)
        if _exists(target) and _exists(source) and not _same_file_content(source, target):
            # Never overwrite an earlier quarantined file (it would be lost).
            raise CutoutError(target, "already in quarantine; refusing to overwrite it")
        moves.append((source, target, rejection))
    moved = []
    for source, target, rejection in moves:
        target.parent.mkdir(parents=True, exist_ok=True)
        # surrogateescape writes an undecodable file name back as its original bytes.
        target.with_name(target.name + ".reason.txt").write_text(
            f"file: {rejection.file}\nbatch: {target_root.name}\nreason: {rejection.reason}\n",
            encoding="utf-8",
            errors="surrogateescape",
        )
        if _exists(source) and not _exists(target):
            _move_whole(source, target)
        elif _exists(source):
            source.unlink()  # quarantined whole by an interrupted earlier call
        moved.append(target)
        if checkpoint is not None:
            checkpoint(f"quarantined:{rejection.file}")
    return moved


def _exists(path: Path) -> bool:
    return path.exists() or path.is_symlink()


def _same_file_content(a: Path, b: Path) -> bool:
    if a.is_symlink() or b.is_symlink():
        return a.is_symlink() and b.is_symlink() and os.readlink(a) == os.readlink(b)
    if not (a.is_file() and b.is_file()) or a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            chunk = fa.read(1 << 22)
            if chunk != fb.read(1 << 22):
                return False
            if not chunk:
                return True


def _move_whole(source: Path, target: Path) -> None:
    """Move ``source`` to ``target`` so that ``target`` appears complete or not at all."""
    try:
        os.rename(source, target)  # same filesystem: atomic
        return
    except OSError:
        pass
    partial = target.with_name(f".partial-{target.name}")
    if source.is_symlink():
        partial.unlink(missing_ok=True)
        partial.symlink_to(os.readlink(source))
    else:
        shutil.copy2(source, partial)
    os.replace(partial, target)
    source.unlink()
