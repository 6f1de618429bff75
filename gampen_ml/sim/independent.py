"""Galaxies from the training priors rendered by an *independent* code path: a shift suite.

The training images (:mod:`gampen_ml.sim.shards`) come from
:class:`~gampen_ml.sim.render.FastRenderer`: Sérsic indices quantized to a 0.02 grid, a
relaxed folding threshold, a library of Moffat PSFs used as ``InterpolatedImage`` effective
PSFs drawn with ``method="no_pixel"``, and noise resampled from a sky-pixel pool. A network
that learned any artefact of that path would be miscalibrated on real data. This module
draws galaxies from the same Table-1 priors (:func:`draw_population`) and renders them
without any of those shortcuts (:func:`render_variations`):

* continuous Sérsic indices (no quantization) and GalSim's *default* ``GSParams``;
* components ``galsim.Sersic(n, half_light_radius=Re, flux=...)`` sheared to ``(q, PA)``
  (area-preserving, as :func:`gampen_ml.sim.render.galaxy_profile`), convolved with an
  *analytic* PSF (``galsim.Moffat`` / ``galsim.Kolmogorov``, not an image), and drawn with
  GalSim's default pixel-integrated method (``"auto"``), centred on the central pixel of an
  odd stamp, in nJy per pixel;
* white Gaussian sky noise of r.m.s. ``sky_sigma_nJy`` per pixel.

The truths are the training labels' (:func:`gampen_ml.sim.parameters.sample_parameters`):
``bt``, the composite circularized half-light radius ``re_arcsec`` and the total flux
``flux_nJy``.

PSF of each galaxy
------------------
FWHM log-normal with median ``PSFConfig.fwhm_median_arcsec`` and natural-log scatter
``fwhm_log_sigma``, *truncated* to ``fwhm_range_arcsec`` (drawn by inverse CDF, so no mass
piles up at the limits as with clipping); shear ``g1, g2 ~ N(0, ellipticity_rms)``.

Variations (:data:`VARIATIONS`)
-------------------------------
``nominal``
    Moffat PSF with ``beta = PSFConfig.moffat_beta``; bulge q and PA as drawn (bulge PA
    within +-15 deg of the disk's).
``bulge_tied``
    As ``nominal``, but the bulge of a bulge+disk galaxy takes the disk's q and PA (the
    labels' ``bulge_q`` / ``bulge_pa_deg`` say so; the truths do not change).
``psf_family``
    Per galaxy, Moffat with ``beta ~ U(2.5, 4.5)`` or Kolmogorov with probability 1/2 each
    (:data:`PSF_FAMILY_MOFFAT_BETA`), shear of magnitude ``|g| ~ U(0, 0.05)`` at a random
    angle (:data:`PSF_FAMILY_MAX_G`); FWHM as above (same value as ``nominal``).
``sky_low`` / ``sky_high``
    ``nominal`` with the sky r.m.s. times 0.75 / 1.25 (:data:`SKY_SIGMA_FACTOR`).
``offset``
    ``nominal`` with the galaxy (not the stamp) shifted by ``U(-0.5, 0.5)`` px in x and y
    (:data:`OFFSET_PX`); labels ``offset_x_px`` / ``offset_y_px``.
``loguniform``
    Rendered exactly like ``nominal``; the variation lives in the parameters, which the
    caller draws with ``draw_population(..., loguniform=True)``.

Randomness
----------
Every random number comes from per-galaxy numpy streams seeded with
``(seed, galaxy_id, stream)`` (:func:`galaxy_streams`): one for the PSF, one for the noise,
and one per variation (``(seed, galaxy_id, stream, variation index)``) for what the
variation itself draws. Results therefore do not depend on ``n_workers`` or on how the
galaxies are chunked, and a galaxy keeps its PSF FWHM and shear and its noise field across
the variations that do not change them: the noise of every variation is the same
standard-normal field times that variation's sky r.m.s., so a variation's catalog can be
compared galaxy by galaxy with ``nominal``.

Cost
----
GalSim builds a Sérsic table per distinct index (0.05-0.2 s for a bulge); with continuous
indices no table is reused, so this path is several times slower per galaxy than the
training renderer. ``n_workers > 1`` spreads galaxies over processes.
"""

from __future__ import annotations

import dataclasses
import multiprocessing
from collections.abc import Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from typing import NamedTuple

import galsim
import numpy as np
import polars as pl
from scipy.special import ndtr, ndtri

from gampen_ml.config import ImagingConfig, PriorConfig, PSFConfig
from gampen_ml.sim.parameters import (
    PARAMETER_COLUMNS,
    sample_parameters,
)
from gampen_ml.sim.psf import measure_fwhm_arcsec
from gampen_ml.sim.render import galaxy_profile

#: Variation names; the index of a name is its random-stream index.
VARIATIONS: tuple[str, ...] = (
    "nominal",
    "bulge_tied",
    "psf_family",
    "sky_low",
    "sky_high",
    "offset",
    "loguniform",
)
#: Moffat beta range of ``psf_family`` (its Moffat half).
PSF_FAMILY_MOFFAT_BETA = (2.5, 4.5)
#: Largest PSF shear magnitude of ``psf_family``; ``|g| ~ U(0, PSF_FAMILY_MAX_G)``.
PSF_FAMILY_MAX_G = 0.05
#: Sky r.m.s. multipliers of the sky variations (1 for the others).
SKY_SIGMA_FACTOR: dict[str, float] = {"sky_low": 0.75, "sky_high": 1.25}
#: Galaxy shift range of ``offset``, survey pixels, per axis.
OFFSET_PX = (-0.5, 0.5)
#: PSF family names.
PSF_FAMILIES: tuple[str, str] = ("moffat", "kolmogorov")

#: Label columns added after ``galaxy_id`` and the parameter columns.
LABEL_EXTRA_COLUMNS: dict[str, pl.DataType] = {
    "psf_family": pl.String(),
    "psf_fwhm_arcsec": pl.Float64(),
    "psf_fwhm_intrinsic_arcsec": pl.Float64(),
    "psf_beta": pl.Float64(),
    "psf_g1": pl.Float64(),
    "psf_g2": pl.Float64(),
    "psf_g": pl.Float64(),
    "sky_sigma_nJy": pl.Float64(),
    "offset_x_px": pl.Float64(),
    "offset_y_px": pl.Float64(),
    "variation": pl.String(),
}

# Stream tags of galaxy_streams (part of the seed: never renumber).
_PSF_STREAM, _NOISE_STREAM, _VARIATION_STREAM = 0, 1, 2


class IndependentRenderError(ValueError):
    """Unknown variation or unusable input; the message names it."""


def _check_variation(variation: str) -> int:
    if variation not in VARIATIONS:
        raise IndependentRenderError(
            f"unknown variation {variation!r}; choose one of {', '.join(VARIATIONS)}"
        )
    return VARIATIONS.index(variation)


def draw_population(
    priors: PriorConfig, n: int, rng: np.random.Generator, *, loguniform: bool = False
) -> pl.DataFrame:
    """Draw ``n`` galaxies from the Table-1 priors with continuous Sérsic indices.

    The suite's population does not follow a profile's training mixture: its
    ``loguniform_fraction`` is replaced by 0 (the paper's uniform draws) or, with
    ``loguniform``, by 1.

    Parameters
    ----------
    priors, n, rng
        As in :func:`~gampen_ml.sim.parameters.sample_parameters`.
    loguniform : bool
        Draw the disk / single-component Re, the bulge Re (each within its
        :func:`~gampen_ml.sim.parameters.re_limits_arcsec` range) and the total flux
        log-uniformly over the same ranges. Everything else is as without it.

    Returns
    -------
    polars.DataFrame
        ``galaxy_id`` (Int64, ``0 .. n-1``) then the columns of
        :func:`~gampen_ml.sim.parameters.sample_parameters`.
    """
    population = dataclasses.replace(priors, loguniform_fraction=1.0 if loguniform else 0.0)
    params = sample_parameters(population, n, rng)
    return params.insert_column(0, pl.Series("galaxy_id", np.arange(n), dtype=pl.Int64))


class GalaxyStreams(NamedTuple):
    """The independent random streams of one galaxy in one variation."""

    #: PSF FWHM and shear (shared by all variations).
    psf: np.random.Generator
    #: Standard-normal noise field (shared by all variations).
    noise: np.random.Generator
    #: What the variation itself draws (its own per variation).
    variation: np.random.Generator


def galaxy_streams(seed: int, galaxy_id: int, variation: str) -> GalaxyStreams:
    """Streams seeded with ``(seed, galaxy_id, stream[, variation index])`` (module docstring)."""
    index = _check_variation(variation)
    key = [int(seed), int(galaxy_id)]
    return GalaxyStreams(
        psf=np.random.default_rng([*key, _PSF_STREAM]),
        noise=np.random.default_rng([*key, _NOISE_STREAM]),
        variation=np.random.default_rng([*key, _VARIATION_STREAM, index]),
    )


@dataclass(frozen=True)
class PSFDraw:
    """One galaxy's analytic PSF.

    Attributes
    ----------
    family : str
        ``"moffat"`` or ``"kolmogorov"``.
    fwhm_arcsec : float
        FWHM of the round profile before the (area-preserving) shear, no pixel.
    beta : float
        Moffat beta; NaN for Kolmogorov.
    g1, g2 : float
        Reduced shear.
    """

    family: str
    fwhm_arcsec: float
    beta: float
    g1: float
    g2: float

    def profile(self) -> galsim.GSObject:
        """The GalSim profile (GalSim default GSParams)."""
        if self.family == "moffat":
            round_psf = galsim.Moffat(beta=self.beta, fwhm=self.fwhm_arcsec)
        else:
            round_psf = galsim.Kolmogorov(fwhm=self.fwhm_arcsec)
        return round_psf.shear(g1=self.g1, g2=self.g2)


def truncated_lognormal_fwhm_arcsec(psf_cfg: PSFConfig, u: np.ndarray | float) -> np.ndarray:
    """Map uniforms ``u`` in [0, 1) to the truncated log-normal FWHM distribution (arcsec).

    Median ``fwhm_median_arcsec``, natural-log sigma ``fwhm_log_sigma``, restricted to
    ``fwhm_range_arcsec`` by inverse-CDF sampling of the truncated normal in log FWHM.
    """
    lo, hi = psf_cfg.fwhm_range_arcsec
    median, sigma = psf_cfg.fwhm_median_arcsec, psf_cfg.fwhm_log_sigma
    u = np.asarray(u, dtype=np.float64)
    if sigma <= 0.0:
        return np.full_like(u, np.clip(median, lo, hi))
    a, b = ndtr(np.log(np.array([lo, hi]) / median) / sigma)
    z = ndtri(a + u * (b - a))
    return np.clip(median * np.exp(sigma * z), lo, hi)


def draw_psf(variation: str, psf_cfg: PSFConfig, streams: GalaxyStreams) -> PSFDraw:
    """The PSF of one galaxy in ``variation`` (module docstring, "PSF of each galaxy").

    The FWHM and, except for ``psf_family``, the shear come from ``streams.psf``, identical
    in every variation; ``psf_family`` draws its family, beta and shear from
    ``streams.variation``.
    """
    _check_variation(variation)
    fwhm = float(truncated_lognormal_fwhm_arcsec(psf_cfg, streams.psf.uniform()))
    g1, g2 = streams.psf.normal(0.0, psf_cfg.ellipticity_rms, size=2)
    if variation != "psf_family":
        return PSFDraw("moffat", fwhm, float(psf_cfg.moffat_beta), float(g1), float(g2))
    rng = streams.variation
    family = PSF_FAMILIES[int(rng.uniform() >= 0.5)]
    beta = rng.uniform(*PSF_FAMILY_MOFFAT_BETA)
    g = rng.uniform(0.0, PSF_FAMILY_MAX_G)
    angle = rng.uniform(0.0, np.pi)  # shear angle 2*angle spans the full circle
    return PSFDraw(
        family,
        fwhm,
        float(beta) if family == "moffat" else np.nan,
        float(g * np.cos(2.0 * angle)),
        float(g * np.sin(2.0 * angle)),
    )


def draw_offset_px(variation: str, streams: GalaxyStreams) -> tuple[float, float]:
    """Galaxy shift ``(x, y)`` in survey pixels: ``U(OFFSET_PX)`` for ``offset``, else 0."""
    if _check_variation(variation) != VARIATIONS.index("offset"):
        return 0.0, 0.0
    x, y = streams.variation.uniform(*OFFSET_PX, size=2)
    return float(x), float(y)


def _two_components(row: Mapping) -> bool:
    return 0.0 < float(row["bt"]) < 1.0


def rendered_parameters(variation: str, row: Mapping) -> dict:
    """The parameters actually rendered: ``bulge_tied`` copies the disk q/PA to the bulge."""
    _check_variation(variation)
    if variation == "bulge_tied" and _two_components(row):
        return {**row, "bulge_q": row["disk_q"], "bulge_pa_deg": row["disk_pa_deg"]}
    return dict(row)


def intrinsic_profile(variation: str, row: Mapping) -> galsim.GSObject:
    """Pre-PSF, centred GalSim profile of one galaxy in ``variation`` (default GSParams).

    ``row`` holds the parameter columns (see :func:`gampen_ml.sim.render.galaxy_profile`).
    The ``offset`` shift is applied at draw time, not here.
    """
    return galaxy_profile(rendered_parameters(variation, row), gsparams=None)


def _render_one(
    variation: str,
    row: Mapping,
    galaxy_id: int,
    imaging: ImagingConfig,
    psf_cfg: PSFConfig,
    sky_sigma_nJy: float,
    seed: int,
    noise: bool,
) -> tuple[np.ndarray, dict]:
    streams = galaxy_streams(seed, galaxy_id, variation)
    psf = draw_psf(variation, psf_cfg, streams)
    offset_x, offset_y = draw_offset_px(variation, streams)
    s, dx = imaging.stamp_size_px, imaging.pixel_scale_arcsec
    galaxy = intrinsic_profile(variation, row).shift(offset_x * dx, offset_y * dx)
    psf_profile = psf.profile()
    image = galsim.Convolve(galaxy, psf_profile).drawImage(nx=s, ny=s, scale=dx, dtype=np.float64)
    pixels = image.array
    sigma = sky_sigma_nJy * SKY_SIGMA_FACTOR.get(variation, 1.0)
    if noise:
        pixels = pixels + sigma * streams.noise.standard_normal((s, s))
    # Measured like the library's ``measured_fwhm_arcsec``: effective PSF at the survey scale.
    p = psf_cfg.stamp_size_px | 1
    effective = psf_profile.drawImage(nx=p, ny=p, scale=dx).array
    info = {
        "psf_family": psf.family,
        "psf_fwhm_arcsec": measure_fwhm_arcsec(effective, dx),
        "psf_fwhm_intrinsic_arcsec": psf.fwhm_arcsec,
        "psf_beta": psf.beta,
        "psf_g1": psf.g1,
        "psf_g2": psf.g2,
        "psf_g": float(np.hypot(psf.g1, psf.g2)),
        "sky_sigma_nJy": sigma,
        "offset_x_px": offset_x,
        "offset_y_px": offset_y,
    }
    return pixels.astype(np.float32), info


def _render_chunk(
    task: tuple[tuple[str, ...], list[dict], list[int], ImagingConfig, PSFConfig, float, int, bool],
) -> dict[str, tuple[np.ndarray, list[dict]]]:
    variations, rows, galaxy_ids, imaging, psf_cfg, sky_sigma_nJy, seed, noise = task
    s = imaging.stamp_size_px
    out = {v: (np.empty((len(rows), s, s), dtype=np.float32), []) for v in variations}
    # Galaxy by galaxy, every variation in turn: GalSim's Sérsic table of the galaxy's
    # indices is built once and reused by the other variations. One GalSim draw per galaxy
    # and variation is inherent; the loop only dispatches to C++.
    for k, (row, galaxy_id) in enumerate(zip(rows, galaxy_ids, strict=True)):
        for v in variations:
            out[v][0][k], info = _render_one(
                v, row, galaxy_id, imaging, psf_cfg, sky_sigma_nJy, seed, noise
            )
            out[v][1].append(info)
    return out


def _galaxy_ids(params: pl.DataFrame) -> np.ndarray:
    if "galaxy_id" not in params.columns:
        return np.arange(params.height, dtype=np.int64)
    ids = params["galaxy_id"]
    if ids.null_count() or (params.height and int(ids.min()) < 0):
        raise IndependentRenderError("params.galaxy_id must be non-negative integers, no nulls")
    if ids.n_unique() != params.height:
        raise IndependentRenderError(
            "params.galaxy_id has duplicates: they would share PSF and noise draws"
        )
    return ids.to_numpy().astype(np.int64)


def render_variations(
    variations: Sequence[str],
    params: pl.DataFrame,
    imaging: ImagingConfig,
    psf_cfg: PSFConfig,
    sky_sigma_nJy: float,
    seed: int,
    *,
    n_workers: int = 1,
    noise: bool = True,
) -> dict[str, tuple[np.ndarray, pl.DataFrame]]:
    """Render ``params`` in each of ``variations`` of the shift suite (module docstring).

    Each galaxy is rendered in every variation before the next, so GalSim builds its
    Sérsic tables once per galaxy instead of once per variation (about a third of the
    cost for continuous indices); every variation's images and labels are what rendering
    it alone gives.

    Parameters
    ----------
    variations : sequence of str
        Each one of :data:`VARIATIONS`.
    params : polars.DataFrame
        :func:`draw_population` output (any parameter table with the columns of
        :data:`~gampen_ml.sim.parameters.PARAMETER_COLUMNS`; ``galaxy_id`` defaults to the
        row number and must be unique and non-negative).
    imaging : ImagingConfig
        Stamp size (odd) and pixel scale.
    psf_cfg : PSFConfig
        FWHM distribution and range, Moffat beta, shear r.m.s.; ``stamp_size_px`` is the
        stamp on which ``psf_fwhm_arcsec`` is measured.
    sky_sigma_nJy : float
        Nominal sky r.m.s. per pixel (scaled by :data:`SKY_SIGMA_FACTOR` for the sky
        variations).
    seed : int
        Non-negative seed of every random stream (:func:`galaxy_streams`).
    n_workers : int
        Processes (``spawn``); the result does not depend on it. Scripts calling this with
        ``n_workers > 1`` need an ``if __name__ == "__main__":`` guard.
    noise : bool
        Add the sky noise (False: the noise-free images, for tests and diagnostics).

    Returns
    -------
    dict
        ``{variation: (images, labels)}``:
    images : (N, S, S) float32
        nJy per pixel, ``S = imaging.stamp_size_px``, in the row order of ``params``.
    labels : polars.DataFrame
        ``galaxy_id`` (Int64), the parameter columns as rendered (truths ``bt``,
        ``re_arcsec``, ``flux_nJy`` unchanged; ``bulge_q`` / ``bulge_pa_deg`` are the
        disk's for ``bulge_tied``), then :data:`LABEL_EXTRA_COLUMNS`: ``psf_family``,
        ``psf_fwhm_arcsec`` (measured with ``galsim.Image.calculateFWHM`` on the
        pixel-convolved PSF at the survey scale, like the library's
        ``measured_fwhm_arcsec``), ``psf_fwhm_intrinsic_arcsec`` (the drawn FWHM of the
        profile), ``psf_beta`` (null for Kolmogorov), ``psf_g1``, ``psf_g2``, ``psf_g``,
        ``sky_sigma_nJy`` (as used), ``offset_x_px``, ``offset_y_px``, ``variation``.

    Raises
    ------
    IndependentRenderError
        Unknown variation, missing parameter columns, bad ``galaxy_id``, even stamp,
        negative seed or sky r.m.s., ``n_workers < 1``.
    """
    variations = tuple(variations)
    for variation in variations:
        _check_variation(variation)
    missing = [c for c in PARAMETER_COLUMNS if c not in params.columns]
    if missing:
        raise IndependentRenderError(f"params lacks the parameter columns {missing}")
    if imaging.stamp_size_px % 2 == 0:
        raise IndependentRenderError(
            f"imaging.stamp_size_px must be odd (centred on a pixel), got {imaging.stamp_size_px}"
        )
    if seed < 0 or not sky_sigma_nJy >= 0.0 or n_workers < 1:
        raise IndependentRenderError(
            f"need seed >= 0, sky_sigma_nJy >= 0 and n_workers >= 1; got seed={seed}, "
            f"sky_sigma_nJy={sky_sigma_nJy}, n_workers={n_workers}"
        )
    galaxy_ids = _galaxy_ids(params)
    table = params.select(PARAMETER_COLUMNS)
    rows = table.to_dicts()
    n, s = params.height, imaging.stamp_size_px
    bounds = np.linspace(0, n, min(n, 4 * n_workers) + 1).astype(int)
    tasks = [
        (variations, rows[a:b], galaxy_ids[a:b].tolist(), imaging, psf_cfg,
         float(sky_sigma_nJy), int(seed), noise)
        for a, b in zip(bounds[:-1], bounds[1:], strict=True)
    ]  # fmt: skip
    results = map_in_processes(_render_chunk, tasks, n_workers)
    head = pl.DataFrame({"galaxy_id": pl.Series(galaxy_ids, dtype=pl.Int64)})
    out = {}
    for variation in variations:
        images = (
            np.concatenate([r[variation][0] for r in results])
            if results
            else np.empty((0, s, s), np.float32)
        )
        infos = [info for r in results for info in r[variation][1]]
        rendered = [rendered_parameters(variation, row) for row in rows]
        labels = pl.DataFrame(rendered, schema=table.schema) if n else table.clear()
        tail = {"variation": pl.Series("variation", [variation] * n, dtype=pl.String)}
        for name, dtype in LABEL_EXTRA_COLUMNS.items():
            if name == "variation":
                continue
            values = [info[name] for info in infos]
            if dtype == pl.Float64():
                tail[name] = pl.Series(name, np.array(values, dtype=np.float64), nan_to_null=True)
            else:
                tail[name] = pl.Series(name, values, dtype=dtype)
        tail = {name: tail[name] for name in LABEL_EXTRA_COLUMNS}
        out[variation] = (
            images,
            pl.concat([head, labels, pl.DataFrame(tail)], how="horizontal"),
        )
    return out


def map_in_processes(fn, tasks: list, n_workers: int) -> list:
    """``[fn(t) for t in tasks]``, in up to ``n_workers`` spawned processes when there are
    several tasks (``fn`` must be a module-level function)."""
    if n_workers == 1 or len(tasks) <= 1:
        return [fn(task) for task in tasks]
    # An executor, not multiprocessing.Pool: Pool's exit terminates its workers, which can
    # leave one blocked forever on the task queue's lock (seen under pytest).
    with ProcessPoolExecutor(
        max_workers=min(n_workers, len(tasks)), mp_context=multiprocessing.get_context("spawn")
    ) as pool:
        return list(pool.map(fn, tasks))
