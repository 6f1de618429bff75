"""Sky-noise pool and noise arrays drawn from it (paper §2).

The paper reads the pixels of 1000 empty 2"x2" HSC "sky objects" into one large sample and
fills each noise array by randomly sampling that collection. :func:`draw_noise` does exactly
that: pixel values drawn uniformly *with replacement* from the pooled pixels.

Synthetic pool (default): ``n_sky_objects`` stamps of ``sky_object_size_arcsec`` with
Gaussian sky of r.m.s. ``sky_sigma_nJy`` per pixel.

Correlated option (``NoiseConfig.correlated``): the sky objects are cut from one field drawn
with GalSim's shipped HST ACS correlated-noise model (``galsim.getCOSMOSNoise`` reading
``acs_I_unrot_sci_20_cf.fits`` from GalSim's share folder; nothing is downloaded), with its
correlation pattern placed on the survey pixel grid (``cosmos_scale`` = survey pixel scale,
i.e. correlations between neighbouring survey pixels, like a resampled coadd) and its variance
rescaled to ``sky_sigma_nJy**2``. Because resampling single pixels would destroy the
correlations, :func:`draw_noise` then draws *whole correlated fields* of the requested shape
from the same GalSim model (seeded from ``rng``) instead of resampling pixels.

Stored as ``noise_pixels.npy`` ``(M,)`` float32, ``sky_objects.npy`` ``(K, s, s)`` float32,
``noise.json`` (pool statistics and settings) and ``noise.parquet`` (one row per sky object:
``sky_object`` int32, ``source`` str, ``mean``, ``std``, ``mad_sigma`` in nJy).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import galsim
import numpy as np
import polars as pl

from gampen_ml.config import ImagingConfig, NoiseConfig
from gampen_ml.io import StorageError, load_npy_mmap, save_npy
from gampen_ml.sim.errors import InputFileError
from gampen_ml.sim.fits_input import list_fits_files, read_fits_image

NOISE_PIXELS_FILE = "noise_pixels.npy"
SKY_OBJECTS_FILE = "sky_objects.npy"
NOISE_JSON_FILE = "noise.json"
NOISE_TABLE_FILE = "noise.parquet"

#: Relative pixel-scale difference tolerated for real sky objects (noise is never resampled).
PIXEL_SCALE_RTOL = 1e-2

#: MAD -> Gaussian sigma.
MAD_TO_SIGMA = 1.482602218505602


@dataclass(frozen=True)
class NoisePool:
    """Pooled sky pixels and the sky objects they came from.

    Attributes
    ----------
    pixels : (M,) float32
        Every pooled sky pixel value, nJy.
    sky_objects : (K, s, s) float32
        The sky-object stamps (cropped centrally to a common size for real ones).
    table : polars.DataFrame
        One row per sky object (see the module docstring).
    correlated : bool
        Draw whole GalSim correlated-noise fields instead of resampling pixels.
    sky_sigma_nJy : float
        Target r.m.s. of the correlated model (used only when ``correlated``).
    pixel_scale_arcsec : float
        Pixel scale of the sky objects.
    source : str
        ``"synthetic"``, ``"synthetic-correlated"`` or the ingested folder.
    """

    pixels: np.ndarray
    sky_objects: np.ndarray
    table: pl.DataFrame
    correlated: bool
    sky_sigma_nJy: float
    pixel_scale_arcsec: float
    source: str

    def statistics(self) -> dict:
        """Pool statistics (nJy): mean, std, MAD sigma, counts and settings."""
        px = np.asarray(self.pixels, dtype=np.float64)
        med = np.median(px)
        return {
            "mean_nJy": float(px.mean()),
            "std_nJy": float(px.std()),
            "mad_sigma_nJy": float(MAD_TO_SIGMA * np.median(np.abs(px - med))),
            "n_pixels": int(px.size),
            "n_sky_objects": int(len(self.sky_objects)),
            "sky_object_shape": list(self.sky_objects.shape[1:]),
            "correlated": bool(self.correlated),
            "sky_sigma_nJy": float(self.sky_sigma_nJy),
            "pixel_scale_arcsec": float(self.pixel_scale_arcsec),
            "source": self.source,
        }


def _object_table(stamps: np.ndarray, sources: list[str]) -> pl.DataFrame:
    flat = stamps.reshape(len(stamps), -1).astype(np.float64)
    med = np.median(flat, axis=1, keepdims=True)
    return pl.DataFrame(
        {
            "sky_object": pl.Series(np.arange(len(stamps)), dtype=pl.Int32),
            "source": pl.Series(sources, dtype=pl.String),
            "mean": flat.mean(axis=1),
            "std": flat.std(axis=1),
            "mad_sigma": MAD_TO_SIGMA * np.median(np.abs(flat - med), axis=1),
        }
    )


def correlated_noise_model(sky_sigma_nJy: float, pixel_scale_arcsec: float, seed: int):
    """GalSim's shipped ACS correlated noise on the survey grid, variance ``sky_sigma_nJy**2``."""
    return galsim.getCOSMOSNoise(
        rng=galsim.BaseDeviate(seed),
        cosmos_scale=pixel_scale_arcsec,
        variance=sky_sigma_nJy**2,
    )


def _correlated_field(
    sky_sigma_nJy: float, pixel_scale_arcsec: float, shape: tuple[int, int], seed: int
) -> np.ndarray:
    model = correlated_noise_model(sky_sigma_nJy, pixel_scale_arcsec, seed)
    image = galsim.ImageF(shape[1], shape[0], scale=pixel_scale_arcsec)
    image.addNoise(model)
    return image.array


def synthetic_noise_pool(noise_cfg: NoiseConfig, imaging: ImagingConfig, seed: int) -> NoisePool:
    """Synthetic sky objects: ``(n_sky_objects, s, s)`` with ``s = round(size / pixel scale)``.

    Gaussian white noise of ``sky_sigma_nJy``, or (``correlated``) cut from one GalSim
    correlated-noise field of that variance (see the module docstring). Deterministic in ``seed``.
    """
    dx = imaging.pixel_scale_arcsec
    s = max(1, int(round(noise_cfg.sky_object_size_arcsec / dx)))
    k = noise_cfg.n_sky_objects
    if noise_cfg.correlated:
        # One square field of ceil(sqrt(K)) x ceil(sqrt(K)) stamps, cut into sky objects.
        m = int(np.ceil(np.sqrt(k)))
        field = _correlated_field(noise_cfg.sky_sigma_nJy, dx, (m * s, m * s), seed)
        stamps = field.reshape(m, s, m, s).transpose(0, 2, 1, 3).reshape(m * m, s, s)[:k]
        source = "synthetic-correlated"
    else:
        rng = np.random.default_rng(seed)
        stamps = rng.normal(0.0, noise_cfg.sky_sigma_nJy, size=(k, s, s))
        source = "synthetic"
    stamps = np.ascontiguousarray(stamps, dtype=np.float32)
    return NoisePool(
        pixels=stamps.reshape(-1).copy(),
        sky_objects=stamps,
        table=_object_table(stamps, [source] * k),
        correlated=noise_cfg.correlated,
        sky_sigma_nJy=noise_cfg.sky_sigma_nJy,
        pixel_scale_arcsec=dx,
        source=source,
    )


def load_sky_folder(folder: Path | str, imaging: ImagingConfig) -> NoisePool:
    """Ingest real sky-object cutouts (one 2-D FITS image per file, in nJy) from ``folder``.

    All files are validated first. Every pixel of every file goes into the pool; the stored
    ``sky_objects`` are cropped centrally to the smallest shape. Noise is never resampled: a
    header pixel scale that differs from the survey's by more than 1% is an error.

    Raises
    ------
    InputFileError
        Naming the first bad file (unreadable, not 2-D, NaN/inf, all zero, wrong pixel scale).
    """
    dx = imaging.pixel_scale_arcsec
    files = list_fits_files(folder)
    images = []
    for path in files:
        data, scale = read_fits_image(path, require_positive_sum=False)
        if scale is not None and abs(scale / dx - 1.0) > PIXEL_SCALE_RTOL:
            raise InputFileError(
                path, f"pixel scale {scale:.5g} arcsec differs from the survey's {dx} arcsec"
            )
        images.append(data)
    h = min(d.shape[0] for d in images)
    w = min(d.shape[1] for d in images)
    stamps = np.empty((len(images), h, w), dtype=np.float32)
    for i, d in enumerate(images):
        y0, x0 = (d.shape[0] - h) // 2, (d.shape[1] - w) // 2
        stamps[i] = d[y0 : y0 + h, x0 : x0 + w]
    pixels = np.concatenate([d.ravel() for d in images]).astype(np.float32)
    sigma = float(MAD_TO_SIGMA * np.median(np.abs(pixels - np.median(pixels))))
    return NoisePool(
        pixels=pixels,
        sky_objects=stamps,
        table=_object_table(stamps, [p.name for p in files]),
        correlated=False,
        sky_sigma_nJy=sigma,
        pixel_scale_arcsec=dx,
        source=str(Path(folder).resolve()),
    )


def draw_noise(pool: NoisePool, shape: tuple[int, ...], rng: np.random.Generator) -> np.ndarray:
    """Noise array of ``shape`` (float32, nJy) drawn from the pool.

    Uncorrelated pools: every value is drawn uniformly with replacement from ``pool.pixels``
    (the paper's procedure). Correlated pools: one GalSim correlated-noise field per trailing
    2-D image, each seeded from ``rng``.
    """
    shape = tuple(int(v) for v in shape)
    if not pool.correlated:
        idx = rng.integers(0, pool.pixels.shape[0], size=shape)
        return np.asarray(pool.pixels, dtype=np.float32)[idx]
    if len(shape) < 2:
        raise ValueError(f"correlated noise needs a shape with >= 2 dimensions, got {shape}")
    n_fields = int(np.prod(shape[:-2], dtype=np.int64))
    seeds = rng.integers(1, 2**31 - 1, size=n_fields)
    fields = [
        _correlated_field(pool.sky_sigma_nJy, pool.pixel_scale_arcsec, shape[-2:], int(sd))
        for sd in seeds
    ]
    return np.asarray(fields, dtype=np.float32).reshape(shape)


def write_noise_pool(folder: Path | str, pool: NoisePool) -> None:
    """Write the pool files into ``folder`` (which must exist)."""
    folder = Path(folder)
    save_npy(folder / NOISE_PIXELS_FILE, np.asarray(pool.pixels, dtype=np.float32))
    save_npy(folder / SKY_OBJECTS_FILE, np.asarray(pool.sky_objects, dtype=np.float32))
    pool.table.write_parquet(folder / NOISE_TABLE_FILE)
    (folder / NOISE_JSON_FILE).write_text(json.dumps(pool.statistics(), indent=2) + "\n")


def read_noise_pool(folder: Path | str) -> NoisePool:
    """Read a pool written by :func:`write_noise_pool` (pixels and sky objects memory-mapped)."""
    folder = Path(folder)
    meta_path = folder / NOISE_JSON_FILE
    if not meta_path.is_file():
        raise StorageError(f"missing noise pool file {meta_path}")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise StorageError(f"cannot read {meta_path}: {exc}") from exc
    return NoisePool(
        pixels=load_npy_mmap(folder / NOISE_PIXELS_FILE),
        sky_objects=load_npy_mmap(folder / SKY_OBJECTS_FILE),
        table=pl.read_parquet(folder / NOISE_TABLE_FILE),
        correlated=bool(meta["correlated"]),
        sky_sigma_nJy=float(meta["sky_sigma_nJy"]),
        pixel_scale_arcsec=float(meta["pixel_scale_arcsec"]),
        source=str(meta["source"]),
    )
