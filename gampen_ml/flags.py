"""Qualitative flags from the posterior catalog (paper §6.4 and §7).

(Over 600 lines: the flags, their out-of-domain criteria and the image statistics those
criteria read are one contract, documented column by column.)

Where GaMPEN's residuals are largest, the paper replaces numbers by labels assigned from
the *predicted* values (truths are unknown for real galaxies): highly bulge-dominated
(B/T >= 0.85), highly disk-dominated (B/T <= 0.10) and small (Re mode < 1"). The B/T
value is the posterior summary ``FlagConfig.bt_estimate`` (the paper's mode by default).
We add an ``unreliable`` flag for posteriors wider than configurable limits. Precision of
the labels against the truths (simulations only): paper >= 99 % for B/T, ~97 % for Re.

Optional ``asymmetric`` flag (when the catalog has an ``asymmetry`` column, from
:func:`image_asymmetry`): every training galaxy is a sum of sheared Sérsic profiles
convolved with a sheared Moffat PSF, all centred on the stamp, hence exactly symmetric
under a 180-degree rotation about the central pixel. Knots, off-centre bulges and
neighbours break that symmetry, and on them coverage fails while the posterior widths
(``unreliable``) do not react (``docs/validation.md``, "Beyond the training distribution").

Optional ``psf_outside_library`` flag (when the catalog has a ``psf_fwhm_arcsec`` column and
the caller passes the training PSF library's FWHM range): a PSF wider or sharper than any
the network saw biases Re while the image stays point-symmetric, so no image flag can
catch it; the cutout's PSF FWHM (from its FITS file) can.

``out_of_domain`` with a reason (``ood_reason``), from the image statistics of
:func:`image_statistics` (catalog columns ``image_flux_nJy``, ``image_peak_snr``,
``noise_sigma_nJy``, ``image_sigma_px``) and the prediction: nothing detected at the centre,
total flux beyond the training prior by a margin, sky noise unlike the training noise pool's
by more than a factor, an object no larger than its PSF (a star: the network would still
report a galaxy of Re ~ 0.2-1"), or a predicted Re / flux outside the prior by a margin. ``unreliable`` is the union
of every detector of "outside what the network was trained on": ``out_of_domain``,
``asymmetric`` and ``psf_outside_library``. A wide posterior is not a reason: calibrated
posteriors are as wide as the data allow.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import galsim
import numpy as np
import polars as pl
from scipy.ndimage import gaussian_filter

from gampen_ml.columns import ColumnInfo
from gampen_ml.config import FlagConfig, PriorConfig
from gampen_ml.store import FLAGS_FILE  # noqa: F401 (the partition's file, re-exported)

if TYPE_CHECKING:
    from gampen_ml.config import Profile
    from gampen_ml.prediction import PredictionModel
    from gampen_ml.store import Store

FLAG_COLUMNS = ("bulge_dominated", "disk_dominated", "small", "out_of_domain", "unreliable")
#: Flags added only when their inputs exist (``asymmetry``; ``psf_fwhm_arcsec`` and the
#: library's FWHM range).
OPTIONAL_FLAG_COLUMNS = ("asymmetric", "psf_outside_library")

FLAGS_SCHEMA: dict[str, pl.DataType] = {
    "galaxy_id": pl.Int64(),
    "dataset": pl.String(),
    **{name: pl.Boolean() for name in FLAG_COLUMNS},
    "ood_reason": pl.String(),
}
#: Catalog columns of :func:`image_statistics`.
IMAGE_STATISTICS = ("image_flux_nJy", "image_peak_snr", "noise_sigma_nJy", "image_sigma_px")
#: Largest relative difference between a cutout's pixel scale and the training images'.
PIXEL_SCALE_TOLERANCE = 0.05
#: Side (px) of the central box whose light :func:`moment_sigma_px` measures: larger than
#: any PSF-sized object, small enough to stay fast (the criterion only concerns small sizes).
MOMENT_BOX_PX = 64
#: Adaptive-moment sigma / FWHM of a Moffat beta = 3.5 PSF (the middle of the training
#: library's beta range; 0.499 at beta 2.5, 0.464 at 4.5, 0.452 Kolmogorov): turns a cutout's
#: PSF FWHM into the size a point source would have.
PSF_SIGMA_PER_FWHM = 0.4755
#: Unit, UCD and description of each :data:`IMAGE_STATISTICS` column (``docs/catalog.md``).
IMAGE_STATISTICS_INFO: dict[str, ColumnInfo] = {
    "image_flux_nJy": ColumnInfo(
        "sum of the cutout's pixels", "nJy", "phot.flux.density;arith.sum"
    ),
    "image_peak_snr": ColumnInfo(
        "detection significance: peak of the Gaussian-smoothed (sigma = 2 px) cutout in the "
        "central 7 x 7 px, in units of the smoothed sky noise",
        None,
        "stat.snr",
    ),
    "noise_sigma_nJy": ColumnInfo(
        "sky noise per pixel of the cutout, from neighbouring-pixel differences in its 8-px frame",
        "nJy",
        "stat.stdev;instr.background",
    ),
    "image_sigma_px": ColumnInfo(
        "adaptive-moment (HSM) Gaussian sigma of the light in the central "
        f"{MOMENT_BOX_PX} x {MOMENT_BOX_PX} px, in pixels (null when the moments fail)",
        "pix",
        "phys.angSize;src",
    ),
}
_DEFAULT_FLAGS = FlagConfig()
#: Unit, UCD and description of every flags column: :data:`FLAGS_SCHEMA` and
#: :data:`OPTIONAL_FLAG_COLUMNS` (``docs/catalog.md``; thresholds are the defaults of
#: :class:`~gampen_ml.config.FlagConfig`, a profile may change them).
FLAGS_COLUMN_INFO: dict[str, ColumnInfo] = {
    "galaxy_id": ColumnInfo("galaxy_id of the catalog row", None, "meta.id;meta.main"),
    "dataset": ColumnInfo("partition key: sim-test or the inbox batch name", None, "meta.dataset"),
    "bulge_dominated": ColumnInfo(
        f"B/T >= {_DEFAULT_FLAGS.bulge_dominated_min_bt} (the B/T of "
        "FlagConfig.bt_estimate; with 'probability': bt_prob_bulge >= "
        f"{_DEFAULT_FLAGS.bt_min_probability})",
        None,
        "meta.code.class;src.morph.type",
    ),
    "disk_dominated": ColumnInfo(
        f"B/T <= {_DEFAULT_FLAGS.disk_dominated_max_bt} (the B/T of "
        "FlagConfig.bt_estimate; with 'probability': bt_prob_disk >= "
        f"{_DEFAULT_FLAGS.bt_min_probability})",
        None,
        "meta.code.class;src.morph.type",
    ),
    "small": ColumnInfo(
        f"Re mode < {_DEFAULT_FLAGS.small_max_re_arcsec} arcsec",
        None,
        "meta.code.class;phys.angSize",
    ),
    "out_of_domain": ColumnInfo(
        "the image or the prediction is outside what the network was trained on "
        "(reasons in ood_reason)",
        None,
        "meta.code.qual",
    ),
    "unreliable": ColumnInfo(
        "any detector of a galaxy unlike the training set fired: out_of_domain, "
        "asymmetric or psf_outside_library",
        None,
        "meta.code.qual",
    ),
    "ood_reason": ColumnInfo(
        "why out_of_domain ('; '-joined): not detected, image flux beyond the training "
        "range, sky noise unlike training, predicted Re / flux outside the prior",
        None,
        "meta.note",
    ),
    "asymmetric": ColumnInfo(
        f"asymmetry > {_DEFAULT_FLAGS.max_asymmetry} + "
        f"{_DEFAULT_FLAGS.asymmetry_snr_allowance:g} / image_peak_snr: the cutout is not "
        "point-symmetric like every training galaxy",
        None,
        "meta.code.qual;stat.asymmetry",
    ),
    "psf_outside_library": ColumnInfo(
        "psf_fwhm_arcsec known and more than "
        f"{_DEFAULT_FLAGS.psf_fwhm_tolerance:.0%} outside the FWHM range of the training "
        "PSF library",
        None,
        "meta.code.qual;instr.det.psf",
    ),
}
#: Width (px) of the stamp frame whose pixels measure the sky noise.
BORDER_PX = 8
#: Side (px) of the central box searched for the detection peak.
CENTRE_BOX_PX = 7


class FlagError(ValueError):
    """The catalog lacks a column the flags need; the message names it."""


def _require(catalog: pl.DataFrame, columns: list[str], where: str) -> None:
    missing = [c for c in columns if c not in catalog.columns]
    if missing:
        raise FlagError(f"{where}: catalog lacks column(s) {missing}")


def compute_flags(
    catalog: pl.DataFrame,
    cfg: FlagConfig,
    psf_fwhm_range: tuple[float, float] | None = None,
    *,
    noise_sigma_nJy: float | tuple[float, float] | None = None,
    priors: PriorConfig | None = None,
    pixel_scale_arcsec: float | None = None,
) -> pl.DataFrame:
    """Qualitative flags per galaxy.

    Parameters
    ----------
    catalog : pl.DataFrame
        Posterior catalog (``docs/catalog.md``): needs ``galaxy_id``, ``dataset``,
        ``bt_<cfg.bt_estimate>`` (``bt_prob_bulge`` and ``bt_prob_disk`` for
        ``probability``), ``re_arcsec_mode`` and ``flux_nJy_mode``.
    cfg : FlagConfig
        Thresholds.
    psf_fwhm_range : (float, float), optional
        FWHM range (arcsec) of the training PSF library
        (:func:`gampen_ml.sim.psf.library_fwhm_range`); with it and a ``psf_fwhm_arcsec``
        column, ``psf_outside_library`` is added: the cutout's PSF FWHM is known and lies
        outside the range widened by ``cfg.psf_fwhm_tolerance`` (unknown: False).
    noise_sigma_nJy : float or (float, float), optional
        Sky noise of the training images (:func:`pool_noise_sigma`), or its range when the
        depth varies (``gampen_ml.prediction.training_domain``); enables the noise criterion of
        ``out_of_domain``.
    priors : PriorConfig, optional
        Simulation priors (default ``PriorConfig()``): the flux and Re ranges the
        ``out_of_domain`` criteria compare with.
    pixel_scale_arcsec : float, optional
        Pixel scale of the training images: a catalog ``pixel_scale_arcsec`` unlike it is
        out of domain, and it converts ``image_sigma_px`` of cutouts without a scale for the
        point-source criterion (with ``psf_fwhm_arcsec``).

    Returns
    -------
    pl.DataFrame
        :data:`FLAGS_SCHEMA`: ``bulge_dominated`` (B/T ``>= bulge_dominated_min_bt``; with
        ``probability``: ``bt_prob_bulge >= bt_min_probability``), ``disk_dominated`` (B/T
        ``<= disk_dominated_max_bt``; ``bt_prob_disk``), ``small``
        (``re_arcsec_mode < small_max_re_arcsec``), ``out_of_domain`` and ``ood_reason``
        (:func:`out_of_domain_reasons`), ``unreliable`` (``out_of_domain``, ``asymmetric``
        or ``psf_outside_library``); plus the optional ``asymmetric`` and
        ``psf_outside_library`` when their inputs exist.
    """
    if cfg.bt_estimate == "probability":
        bt_columns = ["bt_prob_bulge", "bt_prob_disk"]
        bulge = pl.col("bt_prob_bulge") >= cfg.bt_min_probability
        disk = pl.col("bt_prob_disk") >= cfg.bt_min_probability
    else:
        bt_columns = [f"bt_{cfg.bt_estimate}"]
        bulge = pl.col(bt_columns[0]) >= cfg.bulge_dominated_min_bt
        disk = pl.col(bt_columns[0]) <= cfg.disk_dominated_max_bt
    needed = ["galaxy_id", "dataset", *bt_columns, "re_arcsec_mode", "flux_nJy_mode"]
    _require(catalog, needed, "compute_flags")
    if catalog.select(pl.col(bt_columns).null_count()).sum_horizontal().item():
        raise FlagError(
            f"compute_flags: {bt_columns} hold nulls (a catalog written before they existed); "
            "recompute the catalog or choose another FlagConfig.bt_estimate"
        )

    optional = []
    if "asymmetry" in catalog.columns:
        threshold = pl.lit(cfg.max_asymmetry)
        if "image_peak_snr" in catalog.columns:
            allowance = cfg.asymmetry_snr_allowance / pl.col("image_peak_snr")
            threshold = threshold + allowance.clip(lower_bound=0.0).fill_nan(None).fill_null(0.0)
        optional.append((pl.col("asymmetry") > threshold).fill_null(False).alias("asymmetric"))
    if psf_fwhm_range is not None and "psf_fwhm_arcsec" in catalog.columns:
        lo, hi = psf_fwhm_range
        fwhm = pl.col("psf_fwhm_arcsec")
        outside = (fwhm < lo * (1.0 - cfg.psf_fwhm_tolerance)) | (
            fwhm > hi * (1.0 + cfg.psf_fwhm_tolerance)
        )
        optional.append(outside.fill_null(False).alias("psf_outside_library"))
    reasons = out_of_domain_reasons(
        catalog,
        cfg,
        noise_sigma_nJy=noise_sigma_nJy,
        priors=priors,
        pixel_scale_arcsec=pixel_scale_arcsec,
    )
    flags = catalog.select(
        pl.col("galaxy_id").cast(pl.Int64),
        pl.col("dataset").cast(pl.String),
        bulge.alias("bulge_dominated"),
        disk.alias("disk_dominated"),
        (pl.col("re_arcsec_mode") < cfg.small_max_re_arcsec).alias("small"),
        reasons.is_not_null().alias("out_of_domain"),
        reasons.alias("ood_reason"),
        *optional,
    )
    detectors = ["out_of_domain", *(c for c in OPTIONAL_FLAG_COLUMNS if c in flags.columns)]
    return flags.with_columns(pl.any_horizontal(detectors).alias("unreliable")).select(
        *FLAGS_SCHEMA, *(c for c in OPTIONAL_FLAG_COLUMNS if c in flags.columns)
    )


def out_of_domain_reasons(
    catalog: pl.DataFrame,
    cfg: FlagConfig,
    *,
    noise_sigma_nJy: float | tuple[float, float] | None = None,
    priors: PriorConfig | None = None,
    pixel_scale_arcsec: float | None = None,
) -> pl.Expr:
    """Polars expression: why each galaxy lies outside the training domain (null: it does not).

    Criteria (each only where its inputs exist; reasons joined by ``"; "``):

    * ``not detected``: ``image_peak_snr < cfg.min_peak_snr`` (blank sky, negative images);
    * ``image flux beyond the training range``: ``image_flux_nJy`` above
      ``cfg.flux_range_factor`` x the prior's largest flux;
    * ``sky noise unlike training``: the catalog's ``noise_sigma_nJy`` lies more than
      ``cfg.noise_sigma_factor`` beyond the training noise (``noise_sigma_nJy``: one value,
      or the ``(lo, hi)`` range of a profile that varies the depth) either way;
    * ``pixel scale unlike training``: the cutout's ``pixel_scale_arcsec`` differs from the
      training images' (``pixel_scale_arcsec``) by more than :data:`PIXEL_SCALE_TOLERANCE`
      (a survey domain predicted by a model never trained at its scale);
    * ``consistent with a point source``: the cutout's ``image_sigma_px`` (in arcsec with
      the catalog's ``pixel_scale_arcsec``, else ``pixel_scale_arcsec``) is below
      ``(1 + cfg.point_source_tolerance)`` x the size of its PSF
      (:data:`PSF_SIGMA_PER_FWHM` x ``psf_fwhm_arcsec``), for a detected object; only where
      the PSF FWHM is known;
    * ``predicted Re outside the prior`` / ``predicted flux outside the prior``: the mode
      below ``(1 - cfg.prior_margin)`` x the prior's lower limit or above
      ``(1 + cfg.prior_margin)`` x its upper limit.
    """
    from gampen_ml.sim.parameters import re_limits_arcsec

    priors = priors or PriorConfig()
    re_lo, re_hi = re_limits_arcsec(priors).re_arcsec
    flux_lo, flux_hi = priors.flux_nJy
    m = cfg.prior_margin
    checks: list[tuple[pl.Expr, str]] = [
        (
            (pl.col("re_arcsec_mode") < (1 - m) * re_lo)
            | (pl.col("re_arcsec_mode") > (1 + m) * re_hi),
            "predicted Re outside the prior",
        ),
        (
            (pl.col("flux_nJy_mode") < (1 - m) * flux_lo)
            | (pl.col("flux_nJy_mode") > (1 + m) * flux_hi),
            "predicted flux outside the prior",
        ),
    ]
    if "image_peak_snr" in catalog.columns:
        checks.append((pl.col("image_peak_snr") < cfg.min_peak_snr, "not detected"))
    if "image_flux_nJy" in catalog.columns:
        checks.append(
            (
                pl.col("image_flux_nJy") > cfg.flux_range_factor * flux_hi,
                "image flux beyond the training range",
            )
        )
    if noise_sigma_nJy is not None and "noise_sigma_nJy" in catalog.columns:
        lo, hi = (
            (noise_sigma_nJy, noise_sigma_nJy)
            if np.isscalar(noise_sigma_nJy)
            else tuple(noise_sigma_nJy)
        )
        sigma = pl.col("noise_sigma_nJy")
        checks.append(
            (
                (sigma > hi * cfg.noise_sigma_factor) | (sigma < lo / cfg.noise_sigma_factor),
                "sky noise unlike training",
            )
        )
    if pixel_scale_arcsec is not None and "pixel_scale_arcsec" in catalog.columns:
        ratio = pl.col("pixel_scale_arcsec") / pixel_scale_arcsec
        checks.append(
            (
                (ratio - 1).abs() > PIXEL_SCALE_TOLERANCE,
                "pixel scale unlike training",
            )
        )
    point_source = _point_source(catalog, cfg, pixel_scale_arcsec)
    if point_source is not None:
        checks.append((point_source, "consistent with a point source"))
    parts = [pl.when(cond.fill_null(False)).then(pl.lit(reason)) for cond, reason in checks]
    joined = pl.concat_str(parts, separator="; ", ignore_nulls=True)
    return pl.when(joined != "").then(joined)


def _point_source(
    catalog: pl.DataFrame, cfg: FlagConfig, pixel_scale_arcsec: float | None
) -> pl.Expr | None:
    """Polars condition "no larger than its PSF", or None when the inputs are missing."""
    if not {"image_sigma_px", "psf_fwhm_arcsec", "image_peak_snr"} <= set(catalog.columns):
        return None
    scale = pl.lit(pixel_scale_arcsec, dtype=pl.Float64)
    if "pixel_scale_arcsec" in catalog.columns:
        scale = pl.coalesce(pl.col("pixel_scale_arcsec"), scale)
    psf_sigma = PSF_SIGMA_PER_FWHM * pl.col("psf_fwhm_arcsec")
    return (pl.col("image_sigma_px") * scale < (1 + cfg.point_source_tolerance) * psf_sigma) & (
        pl.col("image_peak_snr") >= cfg.min_peak_snr
    )


def image_statistics(
    images: np.ndarray, *, smooth_px: float = 2.0, chunk: int = 64
) -> pl.DataFrame:
    """Model-free statistics of centred stamps that tell whether an image is like the training set.

    Parameters
    ----------
    images : (N, S, S) array_like
        Stamps in nJy/pixel, galaxy on the central pixel.
    smooth_px : float
        Gaussian sigma (px) of the detection filter.
    chunk : int
        Galaxies processed at once.

    Returns
    -------
    pl.DataFrame
        ``image_flux_nJy``: sum of the stamp; ``noise_sigma_nJy``: sky noise from the
        :data:`BORDER_PX`-wide frame (:func:`noise_sigma_from_differences`, insensitive
        to smooth galaxy light there); ``image_peak_snr``: the largest value of the
        Gaussian-smoothed stamp in the central :data:`CENTRE_BOX_PX` box in units of the
        smoothed noise (detection significance; inf for a noiseless stamp). float64.
    """
    if not hasattr(images, "shape"):
        images = np.asarray(images)
    if len(images.shape) != 3:
        raise ValueError(f"image_statistics: images must be (N, S, S), got {images.shape}")
    n, s = images.shape[0], images.shape[1]
    flux, sigma, snr, size = (np.empty(n) for _ in range(4))
    b, c, h = BORDER_PX, s // 2, CENTRE_BOX_PX // 2
    kernel_noise = 1.0 / (2.0 * np.sqrt(np.pi) * smooth_px)  # smoothed white-noise sigma
    for start in range(0, n, chunk):
        x = np.asarray(images[start : start + chunk], dtype=np.float64)
        k = slice(start, start + len(x))
        flux[k] = x.sum(axis=(1, 2))
        frame = np.concatenate(
            [
                x[:, :b, :],
                x[:, -b:, :],
                x[:, :, :b].transpose(0, 2, 1),
                x[:, :, -b:].transpose(0, 2, 1),
            ],
            axis=1,
        )
        sigma[k] = noise_sigma_from_differences(frame)
        size[k] = moment_sigma_px(x)
        r = h + 3 * int(np.ceil(smooth_px))  # the filter's reach around the box
        centre = x[:, c - r : c + r + 1, c - r : c + r + 1]
        smooth = gaussian_filter(centre, sigma=(0, smooth_px, smooth_px))
        peak = smooth[:, r - h : r + h + 1, r - h : r + h + 1].max(axis=(1, 2))
        with np.errstate(divide="ignore", invalid="ignore"):
            snr[k] = np.where(
                sigma[k] > 0, peak / (sigma[k] * kernel_noise), np.inf * np.sign(peak)
            )
    return pl.DataFrame(
        {
            "image_flux_nJy": flux,
            "image_peak_snr": snr,
            "noise_sigma_nJy": sigma,
            "image_sigma_px": size,
        },
        schema={name: pl.Float64 for name in IMAGE_STATISTICS},
    ).with_columns(pl.col("image_sigma_px").fill_nan(None))


def moment_sigma_px(images: np.ndarray, box_px: int = MOMENT_BOX_PX) -> np.ndarray:
    """Adaptive-moment Gaussian sigma (px) of the light in each stamp's central box.

    GalSim's HSM ``FindAdaptiveMom`` (elliptical Gaussian weight iterated to the object's
    own moments; ``moments_sigma`` = ``det(M)^(1/4)``), which a PSF-convolved point source
    shares with its PSF. ``(N, S, S)`` -> ``(N,)`` float64, NaN where the moments fail
    (blank or negative stamps).
    """
    x = np.asarray(images, dtype=np.float64)
    s = x.shape[1]
    lo = max(s // 2 - box_px // 2, 0)
    box = x[:, lo : lo + box_px, lo : lo + box_px]
    out = np.full(len(x), np.nan)
    for i, stamp in enumerate(box):
        try:
            moments = galsim.hsm.FindAdaptiveMom(galsim.Image(np.ascontiguousarray(stamp)))
        except galsim.GalSimError:
            continue
        out[i] = moments.moments_sigma
    return out


def noise_sigma_from_differences(x: np.ndarray) -> np.ndarray:
    """Robust white-noise sigma of ``(N, H, W)`` stamps from neighbouring-pixel differences.

    ``1.4826 MAD(x[i, j+1] - x[i, j]) / sqrt(2)`` per stamp: differences cancel smooth
    light (a large galaxy's wings in the frame) that would inflate a plain MAD. Returns
    ``(N,)`` float64.
    """
    x = np.asarray(x, dtype=np.float64)
    d = np.diff(x, axis=2).reshape(len(x), -1)
    med = np.median(d, axis=1, keepdims=True)
    return 1.482602218505602 * np.median(np.abs(d - med), axis=1) / np.sqrt(2.0)


def pool_noise_sigma(pool, seed: int = 0) -> float:
    """Sky noise of the training images as :func:`image_statistics` measures it.

    ``pool`` is a :class:`gampen_ml.sim.noise.NoisePool`; 64 noise stamps are drawn the way
    the simulations draw them and measured with :func:`noise_sigma_from_differences`.
    """
    from gampen_ml.sim.noise import draw_noise

    stamps = draw_noise(pool, (64, 2 * BORDER_PX, 64), np.random.default_rng(seed))
    return float(np.median(noise_sigma_from_differences(stamps)))


def bt_point_estimate(cfg: FlagConfig) -> str:
    """The B/T summary (``mode``/``mean``/``median``) that stands for the labels' B/T value.

    ``cfg.bt_estimate`` itself, or ``mean`` for probability labels (their residuals and the
    flag-region figure need one number per galaxy).
    """
    return "mean" if cfg.bt_estimate == "probability" else cfg.bt_estimate


def describe_bt_labels(cfg: FlagConfig) -> str:
    """How the B/T labels are assigned, in words (reports)."""
    if cfg.bt_estimate == "probability":
        return (
            f"are given where the posterior probability of the class (B/T >= "
            f"{cfg.bulge_dominated_min_bt:g} or <= {cfg.disk_dominated_max_bt:g}) is at least "
            f"{cfg.bt_min_probability:g}"
        )
    return f"read the posterior {cfg.bt_estimate}"


def bt_class_probabilities(bt_samples: np.ndarray, cfg: FlagConfig | None = None) -> pl.DataFrame:
    """Posterior probability of each B/T class from physical samples.

    Parameters
    ----------
    bt_samples : (N, T) array_like
        B/T posterior samples per galaxy (physical, recalibrated as in the catalog).
    cfg : FlagConfig, optional
        Class thresholds (default ``FlagConfig()``: 0.85 and 0.10).

    Returns
    -------
    pl.DataFrame
        ``bt_prob_bulge`` = P(B/T >= ``bulge_dominated_min_bt``) and ``bt_prob_disk`` =
        P(B/T <= ``disk_dominated_max_bt``), the fractions of samples (float64).
    """
    cfg = cfg or FlagConfig()
    bt = np.asarray(bt_samples)
    return pl.DataFrame(
        {
            "bt_prob_bulge": (bt >= cfg.bulge_dominated_min_bt).mean(axis=1),
            "bt_prob_disk": (bt <= cfg.disk_dominated_max_bt).mean(axis=1),
        },
        schema={"bt_prob_bulge": pl.Float64, "bt_prob_disk": pl.Float64},
    )


def image_asymmetry(
    images: np.ndarray, *, smooth_px: float = 2.0, detect_sigma: float = 3.0, chunk: int = 64
) -> np.ndarray:
    """Noise-corrected 180-degree rotational asymmetry of centred stamps.

    ``A = (sum_ap |I - R| - N_ap E|noise|) / (2 sum_ap I)`` where ``R`` is the image rotated
    by 180 degrees about the central pixel (odd stamps), the aperture is every pixel
    detected above ``detect_sigma`` in the Gaussian-smoothed (``smooth_px``) image or in its
    rotation, and the noise term ``E|n1 - n2| = sigma_d sqrt(2/pi)`` uses ``sigma_d``, the MAD
    scatter of ``I - R`` over the whole stamp (mostly sky). A symmetric galaxy gives
    ``A ~ 0`` (|A| < 0.003 on the training distribution); knots, an off-centre bulge or a
    neighbour give 0.02-0.2.

    Parameters
    ----------
    images : (N, S, S) array_like
        Stamps in nJy/pixel (any linear unit), galaxy on the central pixel.
    smooth_px, detect_sigma : float
        Detection smoothing (Gaussian sigma, pixels) and threshold (noise sigmas).
    chunk : int
        Galaxies processed at once (memory stays ``O(chunk S^2)``).

    Returns
    -------
    (N,) float64
        Asymmetry per galaxy (NaN when nothing is detected).
    """
    if not hasattr(images, "shape"):
        images = np.asarray(images)
    if len(images.shape) != 3:
        raise ValueError(f"image_asymmetry: images must be (N, S, S), got {images.shape}")
    out = np.empty(images.shape[0], dtype=np.float64)
    kernel_noise = 1.0 / (2.0 * np.sqrt(np.pi) * smooth_px)  # smoothed white-noise sigma
    for start in range(0, images.shape[0], chunk):
        x = np.asarray(images[start : start + chunk], dtype=np.float64)
        d = x - x[:, ::-1, ::-1]
        med = np.median(d, axis=(1, 2), keepdims=True)
        sigma_d = 1.482602218505602 * np.median(np.abs(d - med), axis=(1, 2))
        smooth = gaussian_filter(x, sigma=(0, smooth_px, smooth_px))
        detected = smooth > detect_sigma * (sigma_d / np.sqrt(2.0) * kernel_noise)[:, None, None]
        aperture = detected | detected[:, ::-1, ::-1]
        n_ap = aperture.sum(axis=(1, 2))
        excess = (np.abs(d) * aperture).sum(axis=(1, 2)) - n_ap * sigma_d * np.sqrt(2.0 / np.pi)
        total = 2.0 * (x * aperture).sum(axis=(1, 2))
        with np.errstate(divide="ignore", invalid="ignore"):
            out[start : start + len(x)] = np.where(total > 0, excess / total, np.nan)
    return out


def flag_precision(
    catalog: pl.DataFrame, flags: pl.DataFrame, cfg: FlagConfig | None = None
) -> dict[str, float | int]:
    """Fraction of flagged galaxies whose TRUE value satisfies the flag's criterion.

    Parameters
    ----------
    catalog : pl.DataFrame
        Catalog with ``galaxy_id``, ``bt_true`` and ``re_arcsec_true`` (simulations).
    flags : pl.DataFrame
        :func:`compute_flags` output for the same catalog.
    cfg : FlagConfig, optional
        The thresholds used for the flags (default: ``FlagConfig()``).

    Returns
    -------
    dict
        ``{flag: precision}`` for ``bulge_dominated``, ``disk_dominated`` and ``small``
        (NaN when nothing is flagged) and ``n_{flag}`` counts of flagged galaxies.
    """
    cfg = cfg or FlagConfig()
    _require(catalog, ["galaxy_id", "bt_true", "re_arcsec_true"], "flag_precision")
    joined = flags.join(
        catalog.select("galaxy_id", "bt_true", "re_arcsec_true"), on="galaxy_id", how="left"
    )
    if len(joined) != len(flags) or joined["bt_true"].null_count():
        raise FlagError("flag_precision: flags and catalog galaxy_ids disagree or truths are null")
    criteria = {
        "bulge_dominated": pl.col("bt_true") >= cfg.bulge_dominated_min_bt,
        "disk_dominated": pl.col("bt_true") <= cfg.disk_dominated_max_bt,
        "small": pl.col("re_arcsec_true") < cfg.small_max_re_arcsec,
    }
    result: dict[str, float | int] = {}
    for name, truth_ok in criteria.items():
        flagged = joined.filter(pl.col(name))
        n = len(flagged)
        result[name] = float(flagged.select(truth_ok.mean()).item()) if n else float("nan")
        result[f"n_{name}"] = n
    return result


def catalog_flags(
    catalog: pl.DataFrame,
    profile: Profile,
    root: Store | Path,
    model: PredictionModel | None = None,
) -> pl.DataFrame:
    """:func:`compute_flags` against the training domain of the catalog's model.

    :func:`gampen_ml.prediction.model_domain` of ``model`` (a
    :class:`~gampen_ml.prediction.PredictionModel`; None: the champion) and the storage
    ``root`` (a path or :class:`~gampen_ml.store.Store`): the stored PSF library and noise
    pool, or the domain an archived model carries. It enables ``psf_outside_library`` and
    the noise criterion of ``out_of_domain``, each left out when unknown.
    """
    from gampen_ml.prediction import model_domain

    domain = model_domain(profile, root, model)
    return compute_flags(
        catalog,
        profile.flags,
        psf_fwhm_range=domain.psf_fwhm_range_arcsec,
        noise_sigma_nJy=domain.noise_sigma_range_nJy,
        priors=domain.priors,
        pixel_scale_arcsec=domain.pixel_scale_arcsec or profile.imaging.pixel_scale_arcsec,
    )
