"""Labels for a survey's cutouts from a profile fitter: ``gampen label FOLDER --out labels.parquet``.

(Over 600 lines: the profile fit -- moments, PSF, pysersic model, optimizer, Laplace
posterior -- and the resumable folder job that runs it; the seam is :class:`LabelRun`.)

Transfer learning (``docs/transfer.md``) fine-tunes the network on real galaxies labelled
by a classical profile fit. This module is that labeller: it fits every cutout of a folder
with pysersic's Sérsic renderer (Pasha & Miller 2023, ``pip install
'gampen-platform[label]'``) and writes the labels table that
:mod:`gampen_ml.labelled` reads (:data:`LABEL_SCHEMA`).

Models (``model=``)
-------------------
``bulge-disk`` (default)
    Two Sérsic components with a shared centre and position angle (pysersic's
    ``doublesersic`` renderer): a bulge with ``n`` in the paper's bulge range
    (:data:`BULGE_N_RANGE`, 3.5-5.0) and a disk with ``n`` in its disk range
    (:data:`DISK_N_RANGE`, 0.8-1.2), each with its own half-light radius and axis ratio;
    B/T uniform in [0, 1]. Labels: ``bt`` (the bulge's flux fraction), ``re_arcsec`` the
    composite half-light radius of the two circularized components
    (:func:`gampen_ml.sim.parameters.composite_re_arcsec`, the training labels'
    definition) and ``flux_nJy`` the total model flux.
``sersic``
    One Sérsic profile, ``n`` in pysersic's range 0.65-8. Gives ``re_arcsec`` (circularized)
    and ``flux_nJy``; **``bt`` and ``bt_sigma`` are null**: a single Sérsic index is not a
    bulge-to-total ratio, and the labelled set refuses rows without ``bt``. Its ``sersic_n``
    column is kept for the record.

Priors (everything in pixels of the fit crop): centre ``N(moment centroid, 1 px)``;
``log flux`` uniform within a factor ``e^7`` either side of the moment flux; ``log r_eff``
uniform in [0.2 px, half the crop side]; ellipticity ``1 - q`` uniform in [0, 0.9]; position angle
free; Sérsic indices and B/T uniform in their ranges. pysersic's ``r_eff`` is the semi-major
half-light radius: the circularized radius is ``r_eff sqrt(1 - ellip)``.

Inference: a Laplace approximation of the posterior
------------------------------------------------------------------
Each bounded parameter is mapped to the real line (scaled logit), the negative log posterior
(Gaussian likelihood with the pixels' inverse variance, the priors, the transforms'
Jacobians) is minimised from moment-based guesses by Adam then Levenberg-Marquardt (a second,
slower pass when the first ends at a saddle), and the posterior is the Gaussian with the
inverse Hessian at the mode in that space (:data:`N_POSTERIOR_SAMPLES` draws, mapped back; a
direction the data leave flat spreads over its prior's range). Each label is the median of
its draws and ``*_sigma`` half the 15.87-84.13 % interval. This is what pysersic's own
``estimate_posterior(method="laplace")`` computes; pysersic 0.1.5 compiles its model anew for
every galaxy and runs up to 20,000 Adam steps per round (40-120 s per full stamp here,
``../shared/FACTS.md``), so the optimisation is written here with pysersic's renderer
inside one compiled function per (model, crop size, PSF size, pixel-space components):
later galaxies of a batch reuse it, and JAX's persistent compilation cache
(``~/.cache/gampen/jax`` unless ``JAX_COMPILATION_CACHE_DIR`` is set) keeps it across runs
(``docs/transfer.md`` gives the measured seconds per galaxy). pysersic draws the widest
Gaussians of its Sérsic mixture in pixel space: 6 of them for a resolved galaxy (3, its
default, left light beyond the crop wrapping around in Fourier space: -12 % flux and -20 %
Re for large bulges), 3 for a compact one, whose components need the exact PSF
(:func:`pixel_components`).

The widths are those of the fitted model given white, Gaussian pixel noise: correlated noise
or light the model cannot describe (knots, bars) make them too narrow; the labeller's
coverage is measured against truth by ``benchmarks/label_study.py``.

Per cutout
----------
* pixels in nJy from :func:`gampen_ml.fits_input.load_cutouts` (with a domain: its image HDU,
  flux unit, pixel scale, weight HDU and PSF source), at the stamp size of ``imaging``;
* PSF: the domain's PSF source or the file's ``PSF`` HDU
  (:func:`gampen_ml.fits_input.read_psf_image`), else a Moffat (beta
  :data:`MOFFAT_BETA`) of the file's ``PSF_FWHM``; none -> ``fit_status`` ``no_psf``;
* noise: ``1 / sqrt(weight)`` where the domain declares a weight map (weight 0 = masked),
  else the robust sigma of the stamp's border (:func:`border_sigma_nJy`); zero padding
  added by the reader is masked;
* fit crop: a square about the stamp centre of side ``2 (4 r50 + 2 FWHM)`` rounded up to
  one of :data:`CROP_SIZES_PX` (at most the stamp), ``r50`` the half-light radius of the
  detected source's pixels (:func:`measure_source`).

A cutout whose fit fails gets a row whose ``fit_status`` names the failure; nothing is
raised for the batch. The table is rewritten atomically after every file, so a killed run
loses at most one file, and ``resume=True`` skips the files already in it.
"""

from __future__ import annotations

import copy
import math
import multiprocessing
import os
import time
import warnings
import zlib
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
from scipy import ndimage

from gampen_ml.config import ImagingConfig, InputLimits
from gampen_ml.domains import Domain
from gampen_ml.fits_input import (
    CutoutError,
    is_fits_name,
    load_cutouts,
    read_psf_image,
    validate_cutouts,
)
from gampen_ml.io import atomic_file
from gampen_ml.sim.parameters import composite_re_arcsec

#: Fit models (``gampen label --model``).
MODELS: tuple[str, ...] = ("bulge-disk", "sersic")
#: Sérsic index ranges of the bulge+disk model: the paper's (Table 1).
BULGE_N_RANGE = (3.5, 5.0)
DISK_N_RANGE = (0.8, 1.2)
#: Sérsic index range of the single-Sérsic model (pysersic's amplitude table spans it).
SERSIC_N_RANGE = (0.65, 8.0)
#: Largest ellipticity 1 - q.
MAX_ELLIPTICITY = 0.9
#: Smallest half-light radius (px).
MIN_R_EFF_PX = 0.2
#: Half-width of the log-flux prior around the moment flux (natural log).
LOG_FLUX_HALF_RANGE = 7.0
#: Width of the Gaussian prior on the centre (px).
CENTRE_PRIOR_PX = 1.0
#: Fit crop sides (px); the smallest one that holds ``2 (4 r50 + 2 FWHM)`` is used. A few
#: sizes only: each (model, size, PSF size, pixel components) compiles once.
CROP_SIZES_PX: tuple[int, ...] = (48, 64, 96, 128, 160, 192, 256)
CROP_R50 = 4.0
CROP_FWHM = 2.0
#: Largest PSF image side (px) given to the fitter (larger ones are cropped).
MAX_PSF_PX = 43
#: Moffat beta of a PSF known only by its ``PSF_FWHM`` (the synthetic library's median).
MOFFAT_BETA = 3.5
#: Widest Gaussians of pysersic's Sérsic mixture drawn in pixel space (:func:`pixel_components`):
#: for galaxies with ``r50 > PIXEL_R50_FWHM`` PSF FWHM, and for the others (pysersic's default).
PIXEL_COMPONENTS_RESOLVED = 6
PIXEL_COMPONENTS_COMPACT = 3
PIXEL_R50_FWHM = 1.5
#: Largest |logit| of a bounded parameter (1e-6 of its range from the bound).
MAX_LOGIT = 14.0
#: Curvature (in logit units) of a uniform prior at its centre: the floor of the Hessian's
#: diagonal when it is scaled (a direction the data leave flat keeps about the prior's width).
PRIOR_CURVATURE = 0.25
#: Eigenvalues of the unit-diagonal (scaled) Hessian: below -SADDLE_CURVATURE the fit is at a
#: saddle; below SOFT_CURVATURE (float32 noise, ~1e-6) they are floored there, so a direction
#: the data leave flat gets a very wide, bound-to-bound spread instead of an infinite one.
SADDLE_CURVATURE = 1e-4
SOFT_CURVATURE = 1e-6
#: Draws from the Laplace posterior for the labels and their widths.
N_POSTERIOR_SAMPLES = 2000
#: Adam: the learning rate of the first pass and of the second (run when the first ends at a
#: saddle), steps per compiled chunk, most chunks per pass, and the least improvement (nats)
#: per chunk that continues it.
ADAM_LEARNING_RATES = (0.05, 0.01)
ADAM_CHUNK_STEPS = 100
ADAM_MAX_CHUNKS = 2
ADAM_TOLERANCE = 1.0
#: Levenberg-Marquardt: most iterations; stop when a step improves the loss by less than
#: LM_TOLERANCE nats (about float32's resolution of a stamp's chi^2) or needs more damping
#: than LM_MAX_DAMPING (relative to the Hessian's diagonal).
LM_MAX_ITERATIONS = 40
LM_TOLERANCE = 0.01
LM_MAX_DAMPING = 1e5
#: Detection threshold of :func:`measure_source` on the 1-px Gaussian-smoothed image,
#: in units of the pixel noise.
DETECTION_SIGMA = 1.5
#: Quantiles of one sigma either side of the median.
SIGMA_QUANTILES = (0.158655, 0.841345)

#: The labels table (:mod:`gampen_ml.labelled` reads ``file`` ... ``flux_sigma``).
LABEL_SCHEMA: dict[str, pl.DataType] = {
    "file": pl.String(),
    "hdu": pl.Int32(),
    "bt": pl.Float64(),
    "re_arcsec": pl.Float64(),
    "flux_nJy": pl.Float64(),
    "bt_sigma": pl.Float64(),
    "re_sigma": pl.Float64(),
    "flux_sigma": pl.Float64(),
    "fit_seconds": pl.Float64(),
    "fit_status": pl.String(),
    "model": pl.String(),
    "sersic_n": pl.Float64(),
    "crop_px": pl.Int32(),
    "psf_source": pl.String(),
    "noise_source": pl.String(),
}
#: ``fit_status`` of a good fit; every other value names the failure (module docstring).
STATUS_OK = "ok"


class LabellerUnavailable(RuntimeError):
    """pysersic (the optional ``label`` extra) is not installed."""


def _import_fitter():
    """pysersic's renderer and JAX, imported on first use (an optional dependency)."""
    try:
        with warnings.catch_warnings():
            # pysersic's package import pulls in arviz and photutils, which warn on import.
            warnings.simplefilter("ignore")
            import jax
            from pysersic.rendering import HybridRenderer
    except ImportError as exc:
        raise LabellerUnavailable(
            f"the labeller needs pysersic ({exc}); install it with "
            "pip install 'gampen-platform[label]'"
        ) from exc
    if not os.environ.get("JAX_COMPILATION_CACHE_DIR") and not jax.config.jax_compilation_cache_dir:
        # Compiling a fit shape costs seconds; the pixels are arguments, not constants, so
        # the compiled code is the same in every process and run and is kept on disk.
        cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gampen" / "jax"
        jax.config.update("jax_compilation_cache_dir", str(cache))
    return jax, HybridRenderer


# --- measuring the source -----------------------------------------------------------------


@dataclass(frozen=True)
class SourceMoments:
    """Moment-based guesses of a centred source, in pixels of the stamp.

    Attributes
    ----------
    x_px, y_px : float
        Flux-weighted centroid (column, row).
    flux : float
        Sum of the detected pixels (nJy), at least a few noise sigmas.
    r50_px : float
        Radius about the centroid enclosing half of ``flux``.
    q : float
        Axis ratio from the second moments, in (0, 1].
    angle_rad : float
        Major-axis angle from the x (column) axis.
    detected : bool
        Whether pixels above the threshold touch the stamp centre.
    """

    x_px: float
    y_px: float
    flux: float
    r50_px: float
    q: float
    angle_rad: float
    detected: bool


def border_sigma_nJy(image: np.ndarray, valid: np.ndarray | None = None) -> float:
    """Robust pixel noise (1.4826 MAD) of the outer frame of a stamp.

    Parameters
    ----------
    image : (S, S) float
        Sky-subtracted stamp.
    valid : (S, S) bool, optional
        Pixels holding data (padding excluded).

    Returns
    -------
    float
        The noise r.m.s.; from every valid pixel when the frame has fewer than 64.

    Raises
    ------
    ValueError
        When no valid pixel varies (no noise can be measured).
    """
    s = image.shape[0]
    width = max(4, s // 16)
    frame = np.ones(image.shape, dtype=bool)
    frame[width:-width, width:-width] = False
    valid = np.ones(image.shape, dtype=bool) if valid is None else valid
    pixels = image[frame & valid]
    if pixels.size < 64:
        pixels = image[valid]
    sigma = 1.4826 * float(np.median(np.abs(pixels - np.median(pixels)))) if pixels.size else 0.0
    if not sigma > 0:
        raise ValueError("no pixel noise measurable from the stamp's border (constant pixels)")
    return sigma


def measure_source(image: np.ndarray, sigma: np.ndarray | float) -> SourceMoments:
    """Centroid, flux, half-light radius and shape of the source at the stamp centre.

    The image (``(S, S)``) is smoothed by a 1-px Gaussian and thresholded at
    :data:`DETECTION_SIGMA` times the pixel noise ``sigma`` (scalar or ``(S, S)``); the
    connected pixels holding the centre (or the nearest detected pixel within ``S / 8``)
    are the source, dilated by 2 px. An undetected source gets the centre, a PSF-sized
    radius and a flux of a few noise sigmas.
    """
    s = image.shape[0]
    centre = (s - 1) / 2.0
    sigma_map = np.broadcast_to(np.asarray(sigma, dtype=np.float64), image.shape)
    smooth = ndimage.gaussian_filter(np.asarray(image, dtype=np.float64), 1.0)
    labels, n = ndimage.label(smooth > DETECTION_SIGMA * sigma_map)
    yy, xx = np.indices(image.shape)
    ic = int(round(centre))
    segment = None
    if n:
        label = labels[ic, ic]
        if label == 0:
            r2 = (yy - centre) ** 2 + (xx - centre) ** 2
            near = (labels > 0) & (r2 <= (s / 8.0) ** 2)
            if near.any():
                label = labels[near][np.argmin(r2[near])]
        if label:
            segment = ndimage.binary_dilation(labels == label, iterations=2)
    weight = np.clip(image, 0.0, None) * (segment if segment is not None else 0.0)
    total = float(weight.sum())
    if segment is None or not total > 0:
        # Three noise sigmas over a 10 x 10 px aperture, a 2-px radius: a faint, compact start.
        noise = float(np.median(sigma_map))
        return SourceMoments(centre, centre, 3.0 * noise * 10.0, 2.0, 1.0, 0.0, False)
    x0 = float((weight * xx).sum() / total)
    y0 = float((weight * yy).sum() / total)
    dx, dy = xx - x0, yy - y0
    mxx = float((weight * dx * dx).sum() / total)
    myy = float((weight * dy * dy).sum() / total)
    mxy = float((weight * dx * dy).sum() / total)
    half_trace = 0.5 * (mxx + myy)
    root = math.sqrt(max(0.25 * (mxx - myy) ** 2 + mxy**2, 0.0))
    lam_major, lam_minor = half_trace + root, max(half_trace - root, 1e-6)
    q = float(np.clip(math.sqrt(lam_minor / lam_major), 0.05, 1.0)) if lam_major > 0 else 1.0
    angle = 0.5 * math.atan2(2.0 * mxy, mxx - myy)
    radius = np.hypot(dx, dy)[segment]
    flux_in = np.clip(image[segment], 0.0, None)
    order = np.argsort(radius)
    cumulative = np.cumsum(flux_in[order])
    r50 = float(radius[order][np.searchsorted(cumulative, 0.5 * cumulative[-1])])
    flux = max(
        float(image[segment].sum()), 3.0 * float(np.median(sigma_map)) * math.sqrt(segment.sum())
    )
    return SourceMoments(x0, y0, flux, max(r50, 0.5), q, angle, True)


def crop_size_px(r50_px: float, fwhm_px: float, stamp_px: int) -> int:
    """Side of the fit crop: ``2 (4 r50 + 2 FWHM)`` rounded up to :data:`CROP_SIZES_PX`.

    Never more than ``stamp_px`` (the whole stamp when no listed size fits).
    """
    needed = 2.0 * (CROP_R50 * r50_px + CROP_FWHM * fwhm_px)
    for size in CROP_SIZES_PX:
        if size >= needed:
            return min(size, stamp_px)
    return stamp_px


def moffat_psf(
    fwhm_arcsec: float, pixel_scale_arcsec: float, size_px: int = MAX_PSF_PX
) -> np.ndarray:
    """Unit-sum Moffat PSF (beta :data:`MOFFAT_BETA`) drawn with GalSim, ``(size, size)`` float64."""
    import galsim

    moffat = galsim.Moffat(beta=MOFFAT_BETA, fwhm=float(fwhm_arcsec))
    image = moffat.drawImage(nx=size_px, ny=size_px, scale=pixel_scale_arcsec).array
    return image / image.sum()


def prepare_psf(psf: np.ndarray, crop_px: int) -> np.ndarray:
    """A PSF image for the fitter: centre-cropped to at most :data:`MAX_PSF_PX` and below
    the crop side, unit sum, float32.

    Raises
    ------
    ValueError
        When it is not 2-D, holds non-finite pixels or has no positive flux.
    """
    psf = np.asarray(psf, dtype=np.float64)
    if psf.ndim != 2:
        raise ValueError(f"PSF image must be 2-D, got shape {psf.shape}")
    if not np.all(np.isfinite(psf)) or not psf.sum() > 0:
        raise ValueError("PSF image has non-finite pixels or no positive flux")
    limit = min(MAX_PSF_PX, crop_px - 1)
    out = psf
    for axis in (0, 1):
        n = out.shape[axis]
        if n > limit:
            keep = limit if (limit % 2) == (n % 2) else limit - 1
            start = (n - keep) // 2
            out = np.take(out, np.arange(start, start + keep), axis=axis)
    return (out / out.sum()).astype(np.float32)


# --- the compiled fit -----------------------------------------------------------------------

#: Parameters of each model, in the order of the fit vector; "free" = on the real line.
_PARAMETERS: dict[str, tuple[tuple[str, str], ...]] = {
    "sersic": (
        ("xc", "free"), ("yc", "free"), ("log_flux", "bounded"), ("log_r_eff", "bounded"),
        ("n", "bounded"), ("ellip", "bounded"), ("theta", "free"),
    ),
    "bulge-disk": (
        ("xc", "free"), ("yc", "free"), ("log_flux", "bounded"), ("bt", "bounded"),
        ("log_r_bulge", "bounded"), ("n_bulge", "bounded"), ("ellip_bulge", "bounded"),
        ("log_r_disk", "bounded"), ("n_disk", "bounded"), ("ellip_disk", "bounded"),
        ("theta", "free"),
    ),
}  # fmt: skip


def _render_params(model: str, th) -> tuple[str, dict]:
    """pysersic's parameter dictionary of the physical parameter vector ``th``."""
    import jax.numpy as jnp

    if model == "sersic":
        xc, yc, log_flux, log_r, n, ellip, theta = (th[i] for i in range(7))
        return "sersic", {
            "xc": xc, "yc": yc, "flux": jnp.exp(log_flux), "r_eff": jnp.exp(log_r),
            "n": n, "ellip": ellip, "theta": theta,
        }  # fmt: skip
    xc, yc, log_flux, bt, log_rb, nb, eb, log_rd, nd, ed, theta = (th[i] for i in range(11))
    return "doublesersic", {
        "xc": xc, "yc": yc, "flux": jnp.exp(log_flux), "f_1": bt,
        "r_eff_1": jnp.exp(log_rb), "n_1": nb, "ellip_1": eb,
        "r_eff_2": jnp.exp(log_rd), "n_2": nd, "ellip_2": ed, "theta": theta,
    }  # fmt: skip


class _CompiledFit:
    """The negative log posterior of one (model, crop, PSF size, pixel components) and its
    compiled optimiser steps; reused by every galaxy of that shape in this process."""

    def __init__(self, model: str, crop_px: int, psf_shape: tuple[int, int], n_pixel: int) -> None:
        jax, renderer_cls = _import_fitter()
        import jax.numpy as jnp

        self.model = model
        bounded = np.array([kind == "bounded" for _, kind in _PARAMETERS[model]])
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # pysersic stores a JAX array as a static field
            base = renderer_cls(
                (crop_px, crop_px),
                jnp.ones(psf_shape) / np.prod(psf_shape),
                num_pixel_render=n_pixel,
            )
        is_bounded = jnp.asarray(bounded)

        def physical(u, lo, hi):
            width = jnp.where(is_bounded, hi - lo, 1.0)
            return jnp.where(is_bounded, lo + width * jax.nn.sigmoid(u), u), width

        def loss(u, args):
            psf_fft, sig_psf, data, weight, lo, hi, centre = args
            # pysersic 0.1.5 keeps the PSF's Gaussian width as a static field: a copy with
            # this galaxy's PSF swapped in keeps one compiled function for every PSF.
            renderer = copy.copy(base)
            object.__setattr__(renderer, "PSF_fft", psf_fft)
            object.__setattr__(renderer, "sig_psf_approx", sig_psf)
            th, width = physical(u, lo, hi)
            kind, params = _render_params(model, th)
            if kind == "sersic":
                parts = renderer.render_sersic(params)
            else:
                parts = renderer.render_doublesersic(params)
            image = renderer.combine_scene(*parts)
            chi2 = jnp.sum(weight * (data - image) ** 2)
            log_jacobian = jnp.sum(
                jnp.where(
                    is_bounded,
                    jnp.log(width) + jax.nn.log_sigmoid(u) + jax.nn.log_sigmoid(-u),
                    0.0,
                )
            )
            log_prior = -0.5 * jnp.sum(((th[:2] - centre) / CENTRE_PRIOR_PX) ** 2)
            return 0.5 * chi2 - log_prior - log_jacobian

        value_and_grad = jax.value_and_grad(loss)

        def adam_chunk(state, lr, args):
            def step(carry, _):
                u, m, v, t, best_u, best_f = carry
                f, g = value_and_grad(u, args)
                better = f < best_f
                best_u = jnp.where(better, u, best_u)
                best_f = jnp.where(better, f, best_f)
                t = t + 1.0
                m = 0.9 * m + 0.1 * g
                v = 0.999 * v + 0.001 * g * g
                m_hat = m / (1.0 - 0.9**t)
                v_hat = v / (1.0 - 0.999**t)
                u = u - lr * m_hat / (jnp.sqrt(v_hat) + 1e-8)
                u = jnp.where(is_bounded, jnp.clip(u, -MAX_LOGIT, MAX_LOGIT), u)
                return (u, m, v, t, best_u, best_f), None

            state, _ = jax.lax.scan(step, state, None, length=ADAM_CHUNK_STEPS)
            return state

        self.loss = jax.jit(loss)
        self.adam_chunk = jax.jit(adam_chunk)
        self.value_grad_hessian = jax.jit(
            lambda u, args: (*value_and_grad(u, args), jax.hessian(loss)(u, args))
        )
        self.bounded = bounded
        self.base = base
        self.renderer_cls = renderer_cls


_COMPILED: dict[tuple[str, int, tuple[int, int], int], _CompiledFit] = {}


def _compiled(model: str, crop_px: int, psf_shape: tuple[int, int], n_pixel: int) -> _CompiledFit:
    key = (model, crop_px, psf_shape, n_pixel)
    if key not in _COMPILED:
        _COMPILED[key] = _CompiledFit(model, crop_px, psf_shape, n_pixel)
    return _COMPILED[key]


@dataclass(frozen=True)
class ProfileFit:
    """The labels of one cutout from :func:`fit_profile`.

    Attributes
    ----------
    bt, re_arcsec, flux_nJy : float
        Posterior medians (``bt`` NaN for the single-Sérsic model).
    bt_sigma, re_sigma, flux_sigma : float
        Half the 15.87-84.13 % posterior intervals (NaN when the fit ends at a saddle,
        ``no_sigma``: the values are then the fit's end point).
    sersic_n : float
        Median Sérsic index of the single-Sérsic model (NaN for bulge+disk).
    status : str
        :data:`STATUS_OK` or what went wrong.
    crop_px : int
        Side of the fit crop.
    seconds : float
        Wall time of the fit (first fits of a shape include compiling it).
    parameters : dict[str, float]
        The fitted parameters at the mode (pysersic's names, crop pixels).
    """

    bt: float
    re_arcsec: float
    flux_nJy: float
    bt_sigma: float
    re_sigma: float
    flux_sigma: float
    sersic_n: float
    status: str
    crop_px: int
    seconds: float
    parameters: dict


def _derived(model: str, th: np.ndarray, pixel_scale_arcsec: float) -> dict[str, np.ndarray]:
    """Labels of physical parameter rows ``th`` ``(K, P)``: bt, re_arcsec, flux, n."""
    flux = np.exp(th[:, 2])
    if model == "sersic":
        re_px = np.exp(th[:, 3]) * np.sqrt(1.0 - th[:, 5])
        return {
            "bt": np.full(len(th), np.nan),
            "re_arcsec": re_px * pixel_scale_arcsec,
            "flux_nJy": flux,
            "sersic_n": th[:, 4],
        }
    bt = th[:, 3]
    bulge_re = np.exp(th[:, 4]) * np.sqrt(1.0 - th[:, 6]) * pixel_scale_arcsec
    disk_re = np.exp(th[:, 7]) * np.sqrt(1.0 - th[:, 9]) * pixel_scale_arcsec
    re = composite_re_arcsec(bt, th[:, 8], disk_re, th[:, 5], bulge_re)
    return {"bt": bt, "re_arcsec": re, "flux_nJy": flux, "sersic_n": np.full(len(th), np.nan)}


def _initial(model: str, source: SourceMoments, offset: float, crop_px: int):
    """``(theta0, lo, hi)`` physical start and bounds of the fit vector (crop pixels)."""
    log_flux = math.log(max(source.flux, 1e-30))
    log_r_lo, log_r_hi = math.log(MIN_R_EFF_PX), math.log(0.5 * crop_px)
    r_major = source.r50_px / math.sqrt(max(source.q, 0.05))
    ellip = float(np.clip(1.0 - source.q, 0.05, 0.8))
    theta = source.angle_rad - math.pi / 2.0  # pysersic measures it from the y axis
    xc, yc = source.x_px - offset, source.y_px - offset
    flux_bounds = (log_flux - LOG_FLUX_HALF_RANGE, log_flux + LOG_FLUX_HALF_RANGE)
    if model == "sersic":
        rows = [
            (xc, 0, 0), (yc, 0, 0), (log_flux, *flux_bounds),
            (math.log(r_major), log_r_lo, log_r_hi), (2.0, *SERSIC_N_RANGE),
            (ellip, 0.0, MAX_ELLIPTICITY), (theta, 0, 0),
        ]  # fmt: skip
    else:
        rows = [
            (xc, 0, 0), (yc, 0, 0), (log_flux, *flux_bounds), (0.4, 0.0, 1.0),
            (math.log(0.5 * r_major), log_r_lo, log_r_hi), (float(np.mean(BULGE_N_RANGE)), *BULGE_N_RANGE),
            (0.5 * ellip, 0.0, MAX_ELLIPTICITY),
            (math.log(1.3 * r_major), log_r_lo, log_r_hi), (float(np.mean(DISK_N_RANGE)), *DISK_N_RANGE),
            (ellip, 0.0, MAX_ELLIPTICITY), (theta, 0, 0),
        ]  # fmt: skip
    theta0, lo, hi = (np.array(col, dtype=np.float64) for col in zip(*rows, strict=True))
    return theta0, lo, hi


def _to_unconstrained(theta: np.ndarray, lo: np.ndarray, hi: np.ndarray, bounded: np.ndarray):
    width = np.where(bounded, hi - lo, 1.0)
    frac = np.clip((theta - lo) / width, 1e-3, 1.0 - 1e-3)
    return np.where(bounded, np.log(frac) - np.log1p(-frac), theta)


def _to_physical(u: np.ndarray, lo: np.ndarray, hi: np.ndarray, bounded: np.ndarray):
    width = np.where(bounded, hi - lo, 1.0)
    return np.where(bounded, lo + width / (1.0 + np.exp(-u)), u)


def _scaled_hessian(h: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Eigen-decomposition of ``D^-1/2 H D^-1/2`` (unit diagonal; ``D`` = |diag H| floored at
    :data:`PRIOR_CURVATURE`): ``(eigenvalues, vectors, D^-1/2)``. The scaling keeps float32
    noise in the stiff directions (flux, centre) out of the soft ones."""
    d = 1.0 / np.sqrt(np.maximum(np.abs(np.diag(h)), PRIOR_CURVATURE))
    scaled = 0.5 * (h + h.T) * np.outer(d, d)
    if not np.all(np.isfinite(scaled)):
        return np.full(len(d), -np.inf), np.eye(len(d)), d
    eigenvalues, vectors = np.linalg.eigh(scaled)
    return eigenvalues, vectors, d


def _is_minimum(h: np.ndarray) -> bool:
    """Whether the Hessian has no negative curvature beyond float32 noise (not a saddle)."""
    return bool(_scaled_hessian(h)[0].min() > -SADDLE_CURVATURE)


def _laplace_draws(u: np.ndarray, h: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """``(N_POSTERIOR_SAMPLES, P)`` draws of ``N(u, H^-1)``, the scaled Hessian's eigenvalues
    floored at :data:`SOFT_CURVATURE`."""
    eigenvalues, vectors, d = _scaled_hessian(h)
    z = rng.standard_normal((N_POSTERIOR_SAMPLES, len(u)))
    return u + ((z / np.sqrt(np.maximum(eigenvalues, SOFT_CURVATURE))) @ vectors.T) * d


def pixel_components(r50_px: float, fwhm_px: float) -> int:
    """How many of the widest Gaussians of pysersic's Sérsic mixture to draw in pixel space.

    pysersic draws the rest in Fourier space, convolved exactly with the PSF image, where
    light beyond the crop wraps around; the pixel-space ones are convolved with a Gaussian
    of the PSF's second moment instead. A resolved galaxy (``r50 > PIXEL_R50_FWHM`` FWHM)
    fills its crop and needs :data:`PIXEL_COMPONENTS_RESOLVED` of them; a compact one
    needs the exact PSF (pysersic's default, :data:`PIXEL_COMPONENTS_COMPACT`).
    """
    if r50_px > PIXEL_R50_FWHM * fwhm_px:
        return PIXEL_COMPONENTS_RESOLVED
    return PIXEL_COMPONENTS_COMPACT


def _adam(fit: _CompiledFit, u: np.ndarray, lr: float, args) -> np.ndarray:
    """At most :data:`ADAM_MAX_CHUNKS` compiled Adam chunks from ``u``; the best point."""
    import jax.numpy as jnp

    u = jnp.asarray(u, dtype=jnp.float32)
    best_f = float(fit.loss(u, args))
    zeros = jnp.zeros_like(u)
    state = (u, zeros, zeros, jnp.float32(0.0), u, jnp.float32(best_f))
    for _ in range(ADAM_MAX_CHUNKS):
        state = fit.adam_chunk(state, jnp.float32(lr), args)
        f = float(state[5])
        converged = not f < best_f - ADAM_TOLERANCE
        best_f = min(best_f, f)
        if converged:
            break
    return np.asarray(state[4], dtype=np.float64)


def _levenberg_marquardt(fit: _CompiledFit, u: np.ndarray, args):
    """Damped Newton steps from ``u`` to the mode: ``((f, u), gradient, Hessian)`` there."""
    import jax.numpy as jnp

    def evaluate(point):
        return (
            np.asarray(a, dtype=np.float64)
            for a in fit.value_grad_hessian(jnp.asarray(point, dtype=jnp.float32), args)
        )

    f, g, h = evaluate(u)
    damping = 1e-3
    for _ in range(LM_MAX_ITERATIONS):
        # Marquardt's scaling, floored at the prior's curvature: a direction the data do not
        # constrain (a component with no light) takes no giant step.
        scale = np.maximum(np.abs(np.diag(h)), PRIOR_CURVATURE)
        try:
            delta = -np.linalg.solve(h + damping * np.diag(scale), g)
        except np.linalg.LinAlgError:
            damping *= 10.0
            continue
        trial = np.where(fit.bounded, np.clip(u + delta, -MAX_LOGIT, MAX_LOGIT), u + delta)
        f_trial = float(fit.loss(jnp.asarray(trial, dtype=jnp.float32), args))
        if np.isfinite(f_trial) and f_trial < f:
            improvement = f - f_trial
            u = trial
            f, g, h = evaluate(u)
            damping = max(damping / 3.0, 1e-7)
            if improvement < LM_TOLERANCE:
                break
        else:
            damping *= 4.0
            if damping > LM_MAX_DAMPING:
                break
    return (float(f), u), g, h


def fit_profile(
    image: np.ndarray,
    psf: np.ndarray,
    pixel_scale_arcsec: float,
    *,
    model: str = "bulge-disk",
    inverse_variance: np.ndarray | None = None,
    sigma_nJy: float | None = None,
    valid: np.ndarray | None = None,
    fwhm_arcsec: float | None = None,
    seed: int = 0,
) -> ProfileFit:
    """Fit one centred galaxy stamp (module docstring) and return its labels.

    Parameters
    ----------
    image : (S, S) float
        Sky-subtracted pixels in nJy, the galaxy at the centre.
    psf : (p, p) float
        PSF image at the same pixel scale (any sum; normalised here).
    pixel_scale_arcsec : float
        Arcsec per pixel.
    model : str
        ``"bulge-disk"`` or ``"sersic"`` (:data:`MODELS`).
    inverse_variance : (S, S) float, optional
        Per-pixel 1 / sigma^2 in nJy^-2 (0 = masked); default: ``sigma_nJy`` everywhere.
    sigma_nJy : float, optional
        Pixel noise r.m.s. when there is no inverse variance; default
        :func:`border_sigma_nJy` of the stamp.
    valid : (S, S) bool, optional
        Pixels holding data; the others are masked (padding).
    fwhm_arcsec : float, optional
        PSF FWHM (sizes the crop); default measured from ``psf``.
    seed : int
        Seed of the posterior draws.

    Returns
    -------
    ProfileFit

    Raises
    ------
    ValueError
        Unknown model, or arrays of the wrong shape.
    LabellerUnavailable
        When pysersic is not installed.
    """
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    start = time.perf_counter()
    jax, _ = _import_fitter()
    import jax.numpy as jnp

    image = np.asarray(image, dtype=np.float64)
    if image.ndim != 2 or image.shape[0] != image.shape[1]:
        raise ValueError(f"image must be a square 2-D stamp, got shape {image.shape}")
    s = image.shape[0]
    valid = np.ones(image.shape, dtype=bool) if valid is None else np.asarray(valid, dtype=bool)
    if inverse_variance is not None:
        weight = np.where(valid, np.asarray(inverse_variance, dtype=np.float64), 0.0)
        weight = np.where(np.isfinite(weight) & (weight > 0), weight, 0.0)
        if not weight.any():
            raise ValueError("the inverse variance is zero everywhere")
        sigma_map = np.where(weight > 0, 1.0 / np.sqrt(np.where(weight > 0, weight, 1.0)), np.inf)
    else:
        sigma = border_sigma_nJy(image, valid) if sigma_nJy is None else float(sigma_nJy)
        weight = np.where(valid, 1.0 / sigma**2, 0.0)
        sigma_map = np.full(image.shape, sigma)
    if fwhm_arcsec is None:
        from gampen_ml.sim.psf import measure_fwhm_arcsec

        fwhm_arcsec = measure_fwhm_arcsec(np.asarray(psf, dtype=np.float64), pixel_scale_arcsec)
    fwhm_px = fwhm_arcsec / pixel_scale_arcsec

    source = measure_source(
        np.where(valid, image, 0.0), np.where(np.isfinite(sigma_map), sigma_map, 1e30)
    )
    crop = crop_size_px(source.r50_px, fwhm_px, s)
    first = (s - crop) // 2
    window = (slice(first, first + crop), slice(first, first + crop))
    data, w = image[window], weight[window]
    psf32 = prepare_psf(psf, crop)
    n_pixel = pixel_components(source.r50_px, fwhm_px)
    fit = _compiled(model, crop, psf32.shape, n_pixel)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        this_psf = fit.renderer_cls((crop, crop), jnp.asarray(psf32), num_pixel_render=n_pixel)
    theta0, lo, hi = _initial(model, source, float(first), crop)
    args = (
        this_psf.PSF_fft,
        jnp.float32(this_psf.sig_psf_approx),
        jnp.asarray(data, dtype=jnp.float32),
        jnp.asarray(w, dtype=jnp.float32),
        jnp.asarray(lo, dtype=jnp.float32),
        jnp.asarray(hi, dtype=jnp.float32),
        jnp.asarray(theta0[:2], dtype=jnp.float32),
    )
    u = _to_unconstrained(theta0, lo, hi, fit.bounded)
    # Adam gets into the basin from the moment guesses, Levenberg-Marquardt finds the mode;
    # a Hessian that is not positive definite there (a saddle, or not yet converged) gets a
    # second, slower Adam pass and Levenberg-Marquardt again.
    for lr in ADAM_LEARNING_RATES:
        u = _adam(fit, u, lr, args)
        (f, u), g, h = _levenberg_marquardt(fit, u, args)
        if _is_minimum(h):
            break

    status = STATUS_OK
    mode = _to_physical(u, lo, hi, fit.bounded)
    names = [name for name, _ in _PARAMETERS[model]]
    if not np.isfinite(f):
        return _failed_fit("failed: the posterior is not finite at the fit's end", crop, start)
    rng = np.random.default_rng(seed)
    if _is_minimum(h):
        draws = _laplace_draws(u, h, rng)
        samples = _derived(model, _to_physical(draws, lo, hi, fit.bounded), pixel_scale_arcsec)
        with np.errstate(invalid="ignore"):
            values = {k: float(np.median(v)) for k, v in samples.items()}
            sigmas = {
                k: float(0.5 * np.diff(np.quantile(v, SIGMA_QUANTILES))[0])
                for k, v in samples.items()
            }
    else:
        status = "no_sigma: the fit ended at a saddle (the Hessian has a negative eigenvalue)"
        values = {
            k: float(v[0]) for k, v in _derived(model, mode[None], pixel_scale_arcsec).items()
        }
        sigmas = {k: math.nan for k in values}
    return ProfileFit(
        bt=values["bt"],
        re_arcsec=values["re_arcsec"],
        flux_nJy=values["flux_nJy"],
        bt_sigma=sigmas["bt"],
        re_sigma=sigmas["re_arcsec"],
        flux_sigma=sigmas["flux_nJy"],
        sersic_n=values["sersic_n"],
        status=status,
        crop_px=crop,
        seconds=time.perf_counter() - start,
        parameters=dict(zip(names, (float(v) for v in mode), strict=True)),
    )


def _failed_fit(status: str, crop_px: int, start: float) -> ProfileFit:
    nan = math.nan
    return ProfileFit(
        nan, nan, nan, nan, nan, nan, nan, status, crop_px, time.perf_counter() - start, {}
    )


# --- a folder of cutouts ----------------------------------------------------------------------


@dataclass(frozen=True)
class LabelRun:
    """What :func:`label_folder` did.

    Attributes
    ----------
    out : Path
        The labels table.
    n_files : int
        Cutout files fitted (or rejected) by this run.
    n_skipped : int
        Files already in the table (``resume``).
    n_rows : int
        Rows this run added (one per cutout; one per rejected file).
    n_ok : int
        Of which with ``fit_status`` ``ok``.
    seconds : float
        Wall time of the run.
    """

    out: Path
    n_files: int
    n_skipped: int
    n_rows: int
    n_ok: int
    seconds: float


@dataclass(frozen=True)
class _FileTask:
    folder: Path
    relative: str
    imaging: ImagingConfig
    domain: Domain | None
    model: str
    limits: InputLimits | None


def _row(relative: str, hdu: int | None, model: str, status: str, **values: Any) -> dict:
    row = {name: None for name in LABEL_SCHEMA}
    row.update(file=relative, hdu=hdu, model=model, fit_status=status, **values)
    return row


def _status_text(prefix: str, exc: BaseException) -> str:
    text = f"{prefix}: {type(exc).__name__}: {exc}" if prefix == "failed" else f"{prefix}: {exc}"
    return text if len(text) <= 300 else text[:297] + "..."


def _label_file(task: _FileTask) -> list[dict]:
    """Rows of every cutout of one file; never raises for a bad file or a failed fit."""
    path = task.folder / task.relative
    try:
        batch = load_cutouts(path, task.imaging, task.limits, domain=task.domain)
    except CutoutError as exc:
        return [_row(task.relative, None, task.model, f"rejected: {exc.problem}")]
    if batch.rejections:
        return [_row(task.relative, None, task.model, f"rejected: {batch.rejections[0].reason}")]
    table = batch.table
    try:
        psf_images = read_psf_image(path, task.domain)
        psf_source = "domain" if task.domain is not None and task.domain.psf is not None else "hdu"
    except CutoutError as exc:
        return [
            _row(task.relative, int(h), task.model, f"no_psf: {exc.problem}")
            for h in table["hdu"].to_list()
        ]
    rows = []
    for k, (hdu, header_scale, fwhm) in enumerate(
        table.select("hdu", "pixel_scale_arcsec", "psf_fwhm_arcsec").iter_rows()
    ):
        scale = (
            task.domain.pixel_scale_arcsec
            if task.domain is not None
            else header_scale or task.imaging.pixel_scale_arcsec
        )
        if psf_images is not None:
            psf = psf_images[k] if psf_images.ndim == 3 else psf_images
            source = psf_source
        elif fwhm is not None:
            psf, source = moffat_psf(fwhm, scale), f"moffat(PSF_FWHM={fwhm:.3g})"
        else:
            rows.append(
                _row(task.relative, hdu, task.model,
                     "no_psf: no PSF HDU, no PSF_FWHM keyword and no domain PSF source")
            )  # fmt: skip
            continue
        image = batch.images[k]
        weight = None if batch.weights is None else batch.weights[k]
        # Exact zeros are no data: the reader's padding, or pixels the survey blanked.
        valid = image != 0.0
        seed = zlib.crc32(f"{task.relative}:{hdu}".encode())
        start = time.perf_counter()
        try:
            fit = fit_profile(
                image, psf, scale, model=task.model, inverse_variance=weight, valid=valid,
                fwhm_arcsec=fwhm, seed=seed,
            )  # fmt: skip
        except LabellerUnavailable:
            raise
        except Exception as exc:  # a failed fit is a row, never the batch's end
            rows.append(
                _row(task.relative, hdu, task.model, _status_text("failed", exc),
                     fit_seconds=time.perf_counter() - start, psf_source=source)
            )  # fmt: skip
            continue
        values = {
            name: (None if not np.isfinite(v) else float(v))
            for name, v in (
                ("bt", fit.bt), ("re_arcsec", fit.re_arcsec), ("flux_nJy", fit.flux_nJy),
                ("bt_sigma", fit.bt_sigma), ("re_sigma", fit.re_sigma),
                ("flux_sigma", fit.flux_sigma), ("sersic_n", fit.sersic_n),
            )
        }  # fmt: skip
        rows.append(
            _row(task.relative, hdu, task.model, fit.status, fit_seconds=fit.seconds,
                 crop_px=fit.crop_px, psf_source=source,
                 noise_source="weight" if weight is not None else "border", **values)
        )  # fmt: skip
    return rows


def _single_thread_worker() -> None:
    """Worker initializer: one core per process, so ``n_workers`` processes share the CPU."""
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "")
        + " --xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1"
    ).strip()


def read_labels(path: Path | str) -> pl.DataFrame:
    """A labels table written by :func:`label_folder` (Parquet or CSV), in :data:`LABEL_SCHEMA`."""
    path = Path(path)
    table = pl.read_csv(path) if path.suffix == ".csv" else pl.read_parquet(path)
    missing = [c for c in LABEL_SCHEMA if c not in table.columns]
    if missing:
        raise ValueError(f"{path}: not a labeller table (missing columns {missing})")
    return table.select(pl.col(c).cast(t) for c, t in LABEL_SCHEMA.items())


def _write(table: pl.DataFrame, out: Path) -> None:
    table = table.sort("file", "hdu", nulls_last=True)
    with atomic_file(out) as tmp:
        if out.suffix == ".csv":
            table.write_csv(tmp)
        else:
            table.write_parquet(tmp)


def label_folder(
    folder: Path | str,
    out: Path | str,
    imaging: ImagingConfig,
    *,
    domain: Domain | None = None,
    model: str = "bulge-disk",
    resume: bool = False,
    n_workers: int = 1,
    limits: InputLimits | None = None,
    progress: Callable[[int, int], None] | None = None,
) -> LabelRun:
    """Fit every cutout of ``folder`` and write the labels table ``out`` (module docstring).

    Parameters
    ----------
    folder : Path or str
        A folder of FITS cutouts (searched recursively, names starting with ``_`` or ``.``
        skipped; files without a FITS suffix, such as the labels table, are not cutouts).
    out : Path or str
        ``.parquet`` (default) or ``.csv``; rewritten atomically after every file.
    imaging : ImagingConfig
        Stamp size the cutouts are cropped / padded to (the network's) and the pixel scale
        when neither the domain nor the header gives one.
    domain : Domain, optional
        Read the files the domain's way (image and weight HDUs, flux unit, PSF source).
    model : str
        ``"bulge-disk"`` or ``"sersic"`` (:data:`MODELS`).
    resume : bool
        Keep the rows of an existing ``out`` and skip their files. Without it an existing
        ``out`` is an error (hours of fits are not overwritten by accident).
    n_workers : int
        Processes (``spawn``, one core each); scripts calling this with ``n_workers > 1``
        need an ``if __name__ == "__main__":`` guard.
    limits : InputLimits, optional
        Size limits checked on each file's headers.
    progress : callable(done, total), optional
        Called after every file.

    Returns
    -------
    LabelRun

    Raises
    ------
    ValueError
        ``out`` exists and ``resume`` is false; unknown model; ``n_workers < 1``; ``out``
        is not a labeller table; ``folder`` is not a folder (a ``CutoutError``).
    LabellerUnavailable
        pysersic is not installed.
    """
    start = time.perf_counter()
    if model not in MODELS:
        raise ValueError(f"unknown model {model!r}; choose one of {', '.join(MODELS)}")
    if n_workers < 1:
        raise ValueError(f"n_workers must be >= 1, got {n_workers}")
    _import_fitter()
    folder, out = Path(folder), Path(out)
    if not folder.is_dir():
        raise CutoutError(folder, "is not a folder")
    done = pl.DataFrame(schema=LABEL_SCHEMA)
    if out.exists():
        if not resume:
            raise ValueError(
                f"{out} exists: pass resume (gampen label --resume) to continue it, or remove it"
            )
        done = read_labels(out)
    finished = set(done["file"].to_list())
    scan = validate_cutouts(folder, imaging, limits, domain=domain)
    out_resolved = out.resolve()
    rows: list[dict] = []
    for rejection in scan.rejections:
        if is_fits_name(rejection.file) and (folder / rejection.file).resolve() != out_resolved:
            if rejection.file not in finished:
                rows.append(_row(rejection.file, None, model, f"rejected: {rejection.reason}"))
    todo = [f for f in scan.accepted_files if f not in finished]
    n_skipped = len(scan.accepted_files) - len(todo)
    tasks = [_FileTask(folder, f, imaging, domain, model, limits) for f in todo]
    tables = [done]
    if rows:
        tables.append(pl.DataFrame(rows, schema=LABEL_SCHEMA))
        _write(pl.concat(tables), out)
    n_rows, n_ok = len(rows), 0

    def record(file_rows: list[dict], n_done: int) -> None:
        nonlocal n_rows, n_ok
        tables.append(pl.DataFrame(file_rows, schema=LABEL_SCHEMA))
        _write(pl.concat(tables), out)
        n_rows += len(file_rows)
        n_ok += sum(r["fit_status"] == STATUS_OK for r in file_rows)
        if progress is not None:
            progress(n_done, len(tasks))

    if progress is not None:
        progress(0, len(tasks))
    if n_workers == 1 or len(tasks) <= 1:
        for k, task in enumerate(tasks):
            record(_label_file(task), k + 1)
    else:
        from concurrent.futures import as_completed

        with ProcessPoolExecutor(
            max_workers=min(n_workers, len(tasks)),
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_single_thread_worker,
        ) as pool:
            futures = [pool.submit(_label_file, task) for task in tasks]
            for k, future in enumerate(as_completed(futures)):
                record(future.result(), k + 1)
    if not out.exists():
        _write(pl.concat(tables), out)
    return LabelRun(
        out, len(tasks) + len(rows), n_skipped, n_rows, n_ok, time.perf_counter() - start
    )
