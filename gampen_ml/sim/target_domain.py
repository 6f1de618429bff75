"""A simulated *target domain* for the transfer study: unlike the training sims, truth known.

Transfer learning (``docs/transfer.md``) is measured on a survey the network never saw but
whose truths are known. This module renders one, from the paper's Table-1 galaxies
(:func:`gampen_ml.sim.independent.draw_population`, continuous Sérsic indices), changing
three things the training images (:mod:`gampen_ml.sim.shards`) never show:

* **star-forming knots**: a fraction ``U(knot_fraction)`` of each disk's flux is moved from
  the smooth Sérsic disk into ``galsim.RandomKnots`` (``U(n_knots)`` point sources whose
  positions follow the round disk profile, then sheared like the disk). The knots belong to
  the disk: ``bt`` and ``flux_nJy`` are unchanged (flux exactly conserved) and so is
  ``re_arcsec``, since the knots' *expected* light follows the disk (one realisation scatters
  about it) -- the convention of :mod:`gampen_ml.sim.misspecified`'s ``knots`` variant.
  Galaxies without a disk have none;
* **another PSF family**: Kolmogorov (atmospheric turbulence, wings ``r^-11/3``) instead of
  the library's Moffat, FWHM log-normal about ``fwhm_median_arcsec`` truncated to
  ``fwhm_range_arcsec`` (:func:`gampen_ml.sim.independent.truncated_lognormal_fwhm_arcsec`),
  sheared by ``g1, g2 ~ N(0, psf_g_rms)``;
* **correlated noise**: GalSim's ``UncorrelatedNoise`` convolved with a Gaussian kernel of
  ``noise_kernel_sigma_px`` pixels (what resampling does to a coadd), rescaled to a pixel
  r.m.s. of ``sky_sigma_nJy`` (``galsim.BaseCorrelatedNoise.withVariance``): the correlation
  of neighbouring pixels is about 0.48 at the default 0.5-px kernel.

Galaxies are drawn with GalSim's default accuracy and pixel-integrated method, centred on the
central pixel of an odd stamp, in nJy per pixel (:func:`render_target_domain`). Truths are
the training labels' definitions (``bt``, composite circularized ``re_arcsec``,
``flux_nJy``; :mod:`gampen_ml.sim.parameters`).

Files (:func:`write_target_domain`): one platform FITS cutout per galaxy,
``gal_<galaxy_id:06d>.fits`` (primary HDU: the image, float32 nJy/px, with ``PIXSCALE``,
``PSF_FWHM`` (the effective PSF's measured FWHM, arcsec), ``BUNIT``, ``GALID``, ``DOMAIN``;
an image HDU ``PSF``: the unit-sum effective PSF, pixel included), and the truth table
``_truth.parquet`` (:data:`TRUTH_COLUMNS`; its ``_`` prefix keeps it out of every scan of
the folder). :meth:`TargetDomainConfig.domain` declares the folder as a
:class:`~gampen_ml.domains.Domain` (its PSF from each file's ``PSF`` HDU).

Randomness: the parameters of ``n`` galaxies are drawn together from ``seed`` (the exact
75 / 12.5 / 12.5 % component mix of ``n``); each galaxy's PSF, knots and noise come from its
own streams seeded ``(seed, galaxy_id, stream)``, so images do not depend on ``n_workers``.
:data:`FROZEN_TEST_SEED` renders the study's test galaxies: never tune on it.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import galsim
import numpy as np
import polars as pl
from astropy.io import fits

from gampen_ml.config import PriorConfig, PSFConfig
from gampen_ml.domains import Domain
from gampen_ml.io import atomic_file
from gampen_ml.sim.independent import (
    draw_population,
    map_in_processes,
    truncated_lognormal_fwhm_arcsec,
)
from gampen_ml.sim.parameters import PARAMETER_COLUMNS
from gampen_ml.sim.psf import measure_fwhm_arcsec
from gampen_ml.sim.render import galaxy_profile

#: Seed of the transfer study's frozen test galaxies (issue 19, part 5).
FROZEN_TEST_SEED = 19_005
#: Truth table written beside the cutouts.
TRUTH_FILE = "_truth.parquet"
#: Stream tags of a galaxy's random streams (part of the seed: never renumber).
_PSF_STREAM, _KNOT_STREAM, _NOISE_STREAM = 0, 1, 2


@dataclass(frozen=True)
class TargetDomainConfig:
    """How the target domain differs from the training sims (module docstring).

    Attributes
    ----------
    name : str
        Domain name (partition key).
    pixel_scale_arcsec : float
        Survey pixel scale.
    stamp_size_px : int
        Cutout side (odd).
    psf_stamp_px : int
        Side of the stored PSF image (odd).
    fwhm_median_arcsec, fwhm_log_sigma : float
        Kolmogorov FWHM: median and natural-log scatter.
    fwhm_range_arcsec : tuple[float, float]
        FWHM truncation.
    psf_g_rms : float
        Per-component r.m.s. of the PSF shear.
    knot_fraction : tuple[float, float]
        Range of the fraction of the disk flux in knots.
    n_knots : tuple[int, int]
        Range (inclusive) of the number of knots.
    sky_sigma_nJy : float
        Pixel r.m.s. of the correlated noise.
    noise_kernel_sigma_px : float
        Gaussian kernel (pixels) correlating the noise.
    """

    name: str = "sim-knots-kolmogorov"
    pixel_scale_arcsec: float = 0.168
    stamp_size_px: int = 239
    psf_stamp_px: int = 43
    fwhm_median_arcsec: float = 0.85
    fwhm_log_sigma: float = 0.15
    fwhm_range_arcsec: tuple[float, float] = (0.55, 1.3)
    psf_g_rms: float = 0.03
    knot_fraction: tuple[float, float] = (0.1, 0.4)
    n_knots: tuple[int, int] = (20, 100)
    sky_sigma_nJy: float = 2.3
    noise_kernel_sigma_px: float = 0.5

    def __post_init__(self) -> None:
        if self.stamp_size_px % 2 == 0 or self.psf_stamp_px % 2 == 0:
            raise ValueError(
                f"stamp_size_px and psf_stamp_px must be odd (centred on a pixel), got "
                f"{self.stamp_size_px} and {self.psf_stamp_px}"
            )
        lo, hi = self.knot_fraction
        if not 0.0 <= lo <= hi < 1.0:
            raise ValueError(f"knot_fraction must lie in [0, 1), got {self.knot_fraction}")
        if not 1 <= self.n_knots[0] <= self.n_knots[1]:
            raise ValueError(f"n_knots must be a range of positive counts, got {self.n_knots}")
        if not (self.sky_sigma_nJy >= 0 and self.noise_kernel_sigma_px > 0):
            raise ValueError("sky_sigma_nJy must be >= 0 and noise_kernel_sigma_px > 0")

    def domain(self) -> Domain:
        """The :class:`~gampen_ml.domains.Domain` that reads this folder (nJy, ``PSF`` HDU)."""
        return Domain(
            name=self.name,
            pixel_scale_arcsec=self.pixel_scale_arcsec,
            stamp_size_px=self.stamp_size_px,
            flux_unit="nJy",
            description="simulated target domain: knots, Kolmogorov PSF, correlated noise",
        )

    def domain_toml(self) -> str:
        """The domain declaration, for ``<dagster_home>/domains/<name>.toml``."""
        return (
            f'name = "{self.name}"\n'
            f'description = "{self.domain().description}"\n'
            f"pixel_scale_arcsec = {self.pixel_scale_arcsec}\n"
            f"stamp_size_px = {self.stamp_size_px}\n"
            'flux_unit = "nJy"\n'
        )

    def psf_config(self) -> PSFConfig:
        """The FWHM distribution as a :class:`PSFConfig` (for the truncated log-normal)."""
        return PSFConfig(
            fwhm_median_arcsec=self.fwhm_median_arcsec,
            fwhm_log_sigma=self.fwhm_log_sigma,
            fwhm_range_arcsec=self.fwhm_range_arcsec,
            stamp_size_px=self.psf_stamp_px,
        )


#: Truth-table columns (besides the parameter columns of ``sample_parameters``).
TRUTH_COLUMNS: dict[str, pl.DataType] = {
    "file": pl.String(),
    "hdu": pl.Int32(),
    "galaxy_id": pl.Int64(),
    **{c: (pl.String() if c == "component" else pl.Float64()) for c in PARAMETER_COLUMNS},
    "knot_fraction": pl.Float64(),
    "n_knots": pl.Int32(),
    "psf_family": pl.String(),
    "psf_fwhm_arcsec": pl.Float64(),
    "psf_fwhm_intrinsic_arcsec": pl.Float64(),
    "psf_g1": pl.Float64(),
    "psf_g2": pl.Float64(),
    "sky_sigma_nJy": pl.Float64(),
    "noise_kernel_sigma_px": pl.Float64(),
}


def _streams(seed: int, galaxy_id: int) -> tuple[np.random.Generator, ...]:
    key = [int(seed), int(galaxy_id)]
    return tuple(
        np.random.default_rng([*key, s]) for s in (_PSF_STREAM, _KNOT_STREAM, _NOISE_STREAM)
    )


def correlated_noise(cfg: TargetDomainConfig, seed: int) -> galsim.BaseCorrelatedNoise:
    """The domain's noise model: white noise convolved with a Gaussian kernel, pixel
    variance ``sky_sigma_nJy**2``, drawing from ``galsim.BaseDeviate(seed)``."""
    dx = cfg.pixel_scale_arcsec
    white = galsim.UncorrelatedNoise(1.0, rng=galsim.BaseDeviate(int(seed)), scale=dx)
    kernel = galsim.Gaussian(sigma=cfg.noise_kernel_sigma_px * dx)
    return white.convolvedWith(kernel).withVariance(cfg.sky_sigma_nJy**2)


def _knotty_profile(row: Mapping, fraction: float, n_knots: int, knot_seed: int):
    """The galaxy with ``fraction`` of its disk flux in ``n_knots`` knots (module docstring)."""
    bt, flux = float(row["bt"]), float(row["flux_nJy"])
    knot_flux = fraction * (1.0 - bt) * flux
    kept = flux - knot_flux
    smooth = galaxy_profile({**row, "flux_nJy": kept, "bt": bt * flux / kept})
    disk_shape = galsim.Sersic(
        n=float(row["disk_n"]), half_light_radius=float(row["disk_re_arcsec"]), flux=knot_flux
    )
    knots = galsim.RandomKnots(
        int(n_knots), profile=disk_shape, rng=galsim.BaseDeviate(int(knot_seed))
    ).shear(q=float(row["disk_q"]), beta=float(row["disk_pa_deg"]) * galsim.degrees)
    return galsim.Add([smooth, knots])


def _render_one(
    row: Mapping, galaxy_id: int, cfg: TargetDomainConfig, seed: int, noise: bool, knots: bool
) -> tuple[np.ndarray, np.ndarray, dict]:
    psf_rng, knot_rng, noise_rng = _streams(seed, galaxy_id)
    fwhm = float(truncated_lognormal_fwhm_arcsec(cfg.psf_config(), psf_rng.uniform()))
    g1, g2 = psf_rng.normal(0.0, cfg.psf_g_rms, size=2)
    psf = galsim.Kolmogorov(fwhm=fwhm).shear(g1=float(g1), g2=float(g2))
    fraction = float(knot_rng.uniform(*cfg.knot_fraction))
    n_knots = int(knot_rng.integers(cfg.n_knots[0], cfg.n_knots[1] + 1))
    knot_seed = int(knot_rng.integers(1, 2**31 - 1))
    has_disk = float(row["bt"]) < 1.0
    if has_disk and knots and fraction > 0.0:
        galaxy = _knotty_profile(row, fraction, n_knots, knot_seed)
    else:
        galaxy = galaxy_profile(row)
    s, p, dx = cfg.stamp_size_px, cfg.psf_stamp_px, cfg.pixel_scale_arcsec
    image = galsim.Convolve(galaxy, psf).drawImage(nx=s, ny=s, scale=dx, dtype=np.float64)
    if noise and cfg.sky_sigma_nJy > 0:
        image.addNoise(correlated_noise(cfg, int(noise_rng.integers(1, 2**31 - 1))))
    effective = psf.drawImage(nx=p, ny=p, scale=dx).array
    effective = effective / effective.sum()
    info = {
        "knot_fraction": fraction if has_disk else np.nan,
        "n_knots": n_knots if has_disk else None,
        "psf_family": "kolmogorov",
        "psf_fwhm_arcsec": measure_fwhm_arcsec(effective, dx),
        "psf_fwhm_intrinsic_arcsec": fwhm,
        "psf_g1": float(g1),
        "psf_g2": float(g2),
        "sky_sigma_nJy": cfg.sky_sigma_nJy if noise else 0.0,
        "noise_kernel_sigma_px": cfg.noise_kernel_sigma_px,
    }
    return image.array.astype(np.float32), effective.astype(np.float32), info


def _render_chunk(task) -> tuple[np.ndarray, np.ndarray, list[dict]]:
    rows, galaxy_ids, cfg, seed, noise, knots = task
    s, p = cfg.stamp_size_px, cfg.psf_stamp_px
    images = np.empty((len(rows), s, s), dtype=np.float32)
    psfs = np.empty((len(rows), p, p), dtype=np.float32)
    infos = []
    # One GalSim draw per galaxy is inherent; the loop only dispatches to C++.
    for k, (row, galaxy_id) in enumerate(zip(rows, galaxy_ids, strict=True)):
        images[k], psfs[k], info = _render_one(row, galaxy_id, cfg, seed, noise, knots)
        infos.append(info)
    return images, psfs, infos


def target_domain_parameters(
    n: int, seed: int = FROZEN_TEST_SEED, priors: PriorConfig | None = None, first_id: int = 0
) -> pl.DataFrame:
    """Table-1 parameters of ``n`` target-domain galaxies, ``galaxy_id`` from ``first_id``.

    :func:`gampen_ml.sim.independent.draw_population` with ``np.random.default_rng(seed)``.
    """
    params = draw_population(priors or PriorConfig(), n, np.random.default_rng(seed))
    return params.with_columns(pl.col("galaxy_id") + first_id)


def render_target_domain(
    params: pl.DataFrame,
    cfg: TargetDomainConfig | None = None,
    seed: int = FROZEN_TEST_SEED,
    *,
    n_workers: int = 1,
    noise: bool = True,
    knots: bool = True,
) -> tuple[np.ndarray, np.ndarray, pl.DataFrame]:
    """Render ``params`` in the target domain (module docstring).

    Parameters
    ----------
    params : pl.DataFrame
        :func:`target_domain_parameters` output (``galaxy_id`` + the parameter columns).
    cfg : TargetDomainConfig, optional
        The domain (default ``TargetDomainConfig()``).
    seed : int
        Seed of every galaxy's PSF, knot and noise streams.
    n_workers : int
        Processes (``spawn``); the result does not depend on it. Scripts calling this with
        ``n_workers > 1`` need an ``if __name__ == "__main__":`` guard.
    noise, knots : bool
        Add the correlated noise / the knots (False: for tests and diagnostics).

    Returns
    -------
    images : (N, S, S) float32
        nJy per pixel.
    psfs : (N, p, p) float32
        Unit-sum effective PSFs (pixel included).
    truth : pl.DataFrame
        :data:`TRUTH_COLUMNS` (``file`` = ``gal_<galaxy_id:06d>.fits``, ``hdu`` 0).
    """
    cfg = cfg or TargetDomainConfig()
    missing = [c for c in ("galaxy_id", *PARAMETER_COLUMNS) if c not in params.columns]
    if missing:
        raise ValueError(f"params lacks the columns {missing}")
    if n_workers < 1 or seed < 0:
        raise ValueError(f"need n_workers >= 1 and seed >= 0, got {n_workers} and {seed}")
    rows = params.select(PARAMETER_COLUMNS).to_dicts()
    ids = params["galaxy_id"].to_list()
    n, s, p = params.height, cfg.stamp_size_px, cfg.psf_stamp_px
    bounds = np.linspace(0, n, min(n, 4 * n_workers) + 1).astype(int)
    tasks = [
        (rows[a:b], ids[a:b], cfg, int(seed), noise, knots)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]
    results = map_in_processes(_render_chunk, tasks, n_workers)
    images = np.concatenate([r[0] for r in results]) if results else np.empty((0, s, s), "f4")
    psfs = np.concatenate([r[1] for r in results]) if results else np.empty((0, p, p), "f4")
    infos = [info for r in results for info in r[2]]
    truth = params.select("galaxy_id", *PARAMETER_COLUMNS).with_columns(
        pl.format("gal_{}.fits", pl.col("galaxy_id").cast(pl.String).str.zfill(6)).alias("file"),
        pl.lit(0, dtype=pl.Int32).alias("hdu"),
    )
    extra = pl.DataFrame(
        {
            name: pl.Series(
                name, np.array([info[name] for info in infos], dtype=np.float64), nan_to_null=True
            )
            if dtype == pl.Float64()
            else pl.Series(name, [info[name] for info in infos], dtype=dtype)
            for name, dtype in TRUTH_COLUMNS.items()
            if name not in truth.columns
        }
    )
    truth = pl.concat([truth, extra], how="horizontal").select(list(TRUTH_COLUMNS))
    return images, psfs, truth.cast(TRUTH_COLUMNS)


def write_cutout(path: Path, image: np.ndarray, psf: np.ndarray, header: Mapping) -> None:
    """One platform FITS cutout: primary image + ``PSF`` HDU, written atomically."""
    primary = fits.PrimaryHDU(np.asarray(image, dtype=np.float32))
    for key, value in header.items():
        primary.header[key] = value
    psf_hdu = fits.ImageHDU(np.asarray(psf, dtype=np.float32), name="PSF")
    with atomic_file(path) as tmp:
        fits.HDUList([primary, psf_hdu]).writeto(tmp)


def write_target_domain(
    folder: Path | str,
    n: int,
    cfg: TargetDomainConfig | None = None,
    seed: int = FROZEN_TEST_SEED,
    *,
    priors: PriorConfig | None = None,
    first_id: int = 0,
    n_workers: int = 1,
) -> pl.DataFrame:
    """Render ``n`` galaxies into ``folder`` as FITS cutouts plus ``_truth.parquet``.

    Returns the truth table (also written, atomically, to ``folder / TRUTH_FILE``).
    """
    cfg = cfg or TargetDomainConfig()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    params = target_domain_parameters(n, seed, priors, first_id)
    images, psfs, truth = render_target_domain(params, cfg, seed, n_workers=n_workers)
    write_target_cutouts(folder, images, psfs, truth, cfg)
    with atomic_file(folder / TRUTH_FILE) as tmp:
        truth.write_parquet(tmp)
    return truth


def write_target_cutouts(
    folder: Path | str,
    images: np.ndarray,
    psfs: np.ndarray,
    truth: pl.DataFrame,
    cfg: TargetDomainConfig,
) -> None:
    """One platform FITS cutout per truth row (``truth["file"]``) of rendered ``images``."""
    for k, row in enumerate(truth.iter_rows(named=True)):
        header = {
            "BUNIT": ("nJy", "pixel unit"),
            "PIXSCALE": (cfg.pixel_scale_arcsec, "arcsec per pixel"),
            "PSF_FWHM": (row["psf_fwhm_arcsec"], "effective PSF FWHM, arcsec"),
            "GALID": (row["galaxy_id"], "galaxy_id of the truth table"),
            "DOMAIN": (cfg.name, "simulated target domain"),
        }
        write_cutout(Path(folder) / row["file"], images[k], psfs[k], header)
