"""Galaxy parameters drawn from the priors of Ghosh et al. 2022 (Table 1 and §2).

Population
----------
* 75% bulge+disk galaxies (``component == "bulge+disk"``): disk Sérsic n ~ U(0.8, 1.2),
  bulge n ~ U(3.5, 5.0), B/T ~ U(0, 1), total flux ~ U(1e3, 5e6) nJy with
  bulge flux = B/T x total; disk Re in the single/disk range, bulge Re in the bulge range;
  both axis ratios ~ U(0.25, 1); disk PA ~ U(-90, 90) deg and bulge PA = disk PA + U(-15, 15)
  deg (wrapped back into [-90, 90)).
* 12.5% single disk-like Sérsic galaxies (``component == "disk"``, B/T = 0, n ~ U(0.8, 1.2))
  and 12.5% single bulge-like ones (``component == "bulge"``, B/T = 1, n ~ U(3.5, 5.0)); both
  use the single-component Re range. The parameters of an absent component are null.

Half-light radius limits
------------------------
Table 1 gives Re in arcsec (single and disk 0.1-5.0", bulge 0.1-3.0") and §2 in kpc
(single and disk 0.25-11.5 kpc, bulge 0.25-7.0 kpc) at z = 0.125 with Planck18. We convert
the kpc limits to arcsec with the Planck18 angular-diameter distance and draw uniformly in
the intersection of the two ranges (:func:`re_limits_arcsec`): 0.108-4.966" and 0.108-3.0".

Composite half-light radius (the ``re_arcsec`` label)
-----------------------------------------------------
``re_arcsec`` is the radius of the circle that encloses half of the galaxy's total intrinsic
(pre-PSF) flux, where each component is taken as the circular Sérsic profile with its
*circularized* half-light radius. GalSim's ``Sersic(half_light_radius=r).shear(q=..)`` is an
area-preserving shear, so ``r`` is exactly that circularized radius (``sqrt(a b)``). The
enclosed flux of a Sérsic profile is the regularized lower incomplete gamma function,
``L(<R)/L = P(2n, b_n (R/Re)^(1/n))`` with ``P(2n, b_n) = 1/2``; the composite radius solves
``(1 - B/T) P_disk(R) + B/T P_bulge(R) = 1/2`` for all galaxies at once with a vectorized
bracketing root finder. For a single component it equals that component's Re.
"""

from __future__ import annotations

from typing import NamedTuple

import astropy.units as u
import numpy as np
import polars as pl
from astropy.cosmology import Planck18
from scipy.optimize import elementwise
from scipy.special import gammainc, gammaincinv

from gampen_ml.config import PriorConfig
from gampen_ml.metrics import ab_magnitude

#: Component labels, in the order of the population fractions.
COMPONENTS: tuple[str, str, str] = ("bulge+disk", "disk", "bulge")

#: Columns returned by :func:`sample_parameters`, in order (all float64 except ``component``).
PARAMETER_COLUMNS: tuple[str, ...] = (
    "component",
    "bt",
    "re_arcsec",
    "flux_nJy",
    "magnitude",
    "disk_n",
    "disk_re_arcsec",
    "disk_q",
    "disk_pa_deg",
    "bulge_n",
    "bulge_re_arcsec",
    "bulge_q",
    "bulge_pa_deg",
)


class ReLimits(NamedTuple):
    """Half-light radius limits in arcsec: ``(low, high)`` pairs."""

    #: Single-component galaxies and disks.
    re_arcsec: tuple[float, float]
    #: Bulges of bulge+disk galaxies.
    bulge_re_arcsec: tuple[float, float]


def kpc_to_arcsec(length_kpc: np.ndarray | float, redshift: float) -> np.ndarray:
    """Angular size in arcsec of a proper length at ``redshift`` (Planck18, angular-diameter distance)."""
    scale = Planck18.arcsec_per_kpc_proper(redshift).to_value(u.arcsec / u.kpc)
    return np.asarray(length_kpc, dtype=np.float64) * scale


def re_limits_arcsec(priors: PriorConfig) -> ReLimits:
    """Intersection of the arcsec and (converted) kpc half-light radius ranges.

    Returns
    -------
    ReLimits
        ``re_arcsec`` for single components and disks, ``bulge_re_arcsec`` for bulges.

    Raises
    ------
    ValueError
        If a pair of ranges does not overlap.
    """

    def intersect(arcsec: tuple[float, float], kpc: tuple[float, float], name: str):
        lo_kpc, hi_kpc = kpc_to_arcsec(np.array(kpc), priors.redshift)
        lo, hi = max(arcsec[0], float(lo_kpc)), min(arcsec[1], float(hi_kpc))
        if not lo < hi:
            raise ValueError(
                f"priors.{name}: arcsec range {arcsec} and kpc range {kpc} (= "
                f"{lo_kpc:.3f}-{hi_kpc:.3f} arcsec at z={priors.redshift}) do not overlap"
            )
        return (lo, hi)

    return ReLimits(
        re_arcsec=intersect(priors.re_arcsec, priors.re_kpc, "re_arcsec"),
        bulge_re_arcsec=intersect(priors.bulge_re_arcsec, priors.bulge_re_kpc, "bulge_re_arcsec"),
    )


def prior_ranges(priors: PriorConfig) -> dict[str, tuple[float, float]]:
    """Allowed ``(low, high)`` of every numeric label column that ``priors`` draws.

    Re columns use :func:`re_limits_arcsec`; bulges of two-component galaxies take the bulge
    range and single bulges the single-component one, so ``bulge_re_arcsec`` spans both.
    ``re_arcsec`` (the composite radius) and ``magnitude`` are derived, not drawn.
    """
    limits = re_limits_arcsec(priors)
    return {
        "bt": priors.bt,
        "flux_nJy": priors.flux_nJy,
        "disk_n": priors.disk_sersic_n,
        "bulge_n": priors.bulge_sersic_n,
        "disk_q": priors.axis_ratio,
        "bulge_q": priors.axis_ratio,
        "disk_pa_deg": priors.position_angle_deg,
        "bulge_pa_deg": priors.position_angle_deg,
        "disk_re_arcsec": limits.re_arcsec,
        "bulge_re_arcsec": (
            min(limits.re_arcsec[0], limits.bulge_re_arcsec[0]),
            max(limits.re_arcsec[1], limits.bulge_re_arcsec[1]),
        ),
    }


def prior_range_report(
    labels: pl.DataFrame, priors: PriorConfig, rtol: float = 1e-9
) -> tuple[list[str], list[dict]]:
    """Compare each drawn parameter of ``labels`` with its prior range (:func:`prior_ranges`).

    Parameters
    ----------
    labels : pl.DataFrame
        A labels table (``docs/architecture.md``); null values (absent components) are
        ignored, and so is a column with no values.
    rtol : float
        Relative slack on each bound (float rounding of values drawn at the bound).

    Returns
    -------
    problems : list of str
        One line per column outside its range, with the range found and the prior.
    rows : list of dict
        ``parameter``, ``min``, ``max``, ``prior`` per column checked.
    """
    rows, problems = [], []
    for column, (lo, hi) in prior_ranges(priors).items():
        values = labels[column].drop_nulls().to_numpy()
        if values.size == 0:
            continue
        vmin, vmax = float(values.min()), float(values.max())
        ok = vmin >= lo - rtol * max(1, abs(lo)) and vmax <= hi + rtol * max(1, abs(hi))
        rows.append({"parameter": column, "min": vmin, "max": vmax, "prior": f"[{lo:g}, {hi:g}]"})
        if not ok:
            problems.append(f"{column} in [{vmin:.4g}, {vmax:.4g}] outside prior [{lo:g}, {hi:g}]")
    return problems, rows


def flux_to_magnitude(flux_nJy: np.ndarray) -> np.ndarray:
    """AB magnitude of a flux in nJy (:func:`gampen_ml.metrics.ab_magnitude`)."""
    return ab_magnitude(flux_nJy)


def sersic_b(n: np.ndarray) -> np.ndarray:
    """Sérsic ``b_n`` such that half the light lies within Re: ``P(2n, b_n) = 1/2``."""
    return gammaincinv(2.0 * np.asarray(n, dtype=np.float64), 0.5)


def sersic_enclosed_fraction(
    radius_arcsec: np.ndarray, n: np.ndarray, re_arcsec: np.ndarray
) -> np.ndarray:
    """Fraction of a circular, untruncated Sérsic profile's flux within ``radius_arcsec``."""
    n = np.asarray(n, dtype=np.float64)
    x = np.asarray(radius_arcsec, dtype=np.float64) / np.asarray(re_arcsec, dtype=np.float64)
    return gammainc(2.0 * n, sersic_b(n) * x ** (1.0 / n))


def composite_re_arcsec(
    bt: np.ndarray,
    disk_n: np.ndarray,
    disk_re_arcsec: np.ndarray,
    bulge_n: np.ndarray,
    bulge_re_arcsec: np.ndarray,
    rtol: float = 1e-10,
) -> np.ndarray:
    """Composite half-light radius of bulge+disk galaxies (see the module docstring).

    Parameters
    ----------
    bt : (N,) float
        Bulge-to-total flux ratio. Where ``bt == 0`` the bulge arguments are ignored (may be
        NaN); where ``bt == 1`` the disk arguments are ignored.
    disk_n, disk_re_arcsec, bulge_n, bulge_re_arcsec : (N,) float
        Sérsic indices and circularized half-light radii (arcsec) of the components.
    rtol : float
        Relative tolerance of the root.

    Returns
    -------
    (N,) float64
        Radius (arcsec) of the circle enclosing half the total intrinsic flux.
    """
    bt = np.asarray(bt, dtype=np.float64)
    shape = bt.shape
    bt = bt.ravel()
    dn, dre, bn, bre = (
        np.broadcast_to(np.asarray(a, dtype=np.float64), shape).ravel()
        for a in (disk_n, disk_re_arcsec, bulge_n, bulge_re_arcsec)
    )
    out = np.where(bt <= 0.0, dre, bre).astype(np.float64)
    two = (bt > 0.0) & (bt < 1.0)
    if np.any(two):
        w, dn2, dre2, bn2, bre2 = (a[two] for a in (bt, dn, dre, bn, bre))

        def excess(r, w, dn2, dre2, bn2, bre2):
            return (
                (1.0 - w) * sersic_enclosed_fraction(r, dn2, dre2)
                + w * sersic_enclosed_fraction(r, bn2, bre2)
                - 0.5
            )

        # Each component encloses < 1/2 inside min(Re) and > 1/2 outside max(Re).
        lo = 0.5 * np.minimum(dre2, bre2)
        hi = 2.0 * np.maximum(dre2, bre2)
        res = elementwise.find_root(
            excess,
            (lo, hi),
            args=(w, dn2, dre2, bn2, bre2),
            tolerances={"xatol": 0.0, "xrtol": rtol, "fatol": 0.0, "frtol": 0.0},
        )
        if not np.all(res.success):
            raise ArithmeticError(
                f"composite_re_arcsec: root finding failed for {int((~res.success).sum())} galaxies"
            )
        out[two] = res.x
    return out.reshape(shape)


def _component_counts(n: int, fraction_two: float) -> tuple[int, int, int]:
    n_two = int(round(fraction_two * n))
    n_disk = (n - n_two + 1) // 2
    return n_two, n_disk, n - n_two - n_disk


def sample_parameters(priors: PriorConfig, n: int, rng: np.random.Generator) -> pl.DataFrame:
    """Draw ``n`` galaxies from the paper's Table-1 priors.

    The component mix is exact (``round(0.75 n)`` bulge+disk, the rest split equally between
    single disks and single bulges) and randomly ordered; every other parameter is uniform.

    Parameters
    ----------
    priors : PriorConfig
        Parameter ranges.
    n : int
        Number of galaxies.
    rng : numpy.random.Generator
        The only source of randomness.

    Returns
    -------
    polars.DataFrame
        ``n`` rows with :data:`PARAMETER_COLUMNS`: ``component`` (str), then float64 columns
        ``bt``, ``re_arcsec`` (composite), ``flux_nJy`` (total), ``magnitude`` (AB),
        ``disk_n``, ``disk_re_arcsec``, ``disk_q``, ``disk_pa_deg``, ``bulge_n``,
        ``bulge_re_arcsec``, ``bulge_q``, ``bulge_pa_deg``; null where a component is absent.
    """
    if n < 0:
        raise ValueError(f"sample_parameters: n must be >= 0, got {n}")
    limits = re_limits_arcsec(priors)
    counts = _component_counts(n, priors.bulge_disk_fraction)
    kind = rng.permutation(np.repeat(np.arange(3), counts))
    two, disk_only, bulge_only = kind == 0, kind == 1, kind == 2
    has_disk, has_bulge = two | disk_only, two | bulge_only

    def uniform(bounds: tuple[float, float]) -> np.ndarray:
        return rng.uniform(bounds[0], bounds[1], size=n)

    # Draw every column for every row (fixed stream layout), then mask absent components.
    disk_n = uniform(priors.disk_sersic_n)
    disk_re = uniform(limits.re_arcsec)
    disk_q = uniform(priors.axis_ratio)
    disk_pa = uniform(priors.position_angle_deg)
    bulge_n = uniform(priors.bulge_sersic_n)
    bulge_re_two = uniform(limits.bulge_re_arcsec)
    bulge_re_single = uniform(limits.re_arcsec)
    bulge_q = uniform(priors.axis_ratio)
    bulge_pa_single = uniform(priors.position_angle_deg)
    offset = priors.bulge_position_angle_offset_deg
    bulge_pa_offset = rng.uniform(-offset, offset, size=n)
    bt_two = uniform(priors.bt)
    flux = uniform(priors.flux_nJy)
    if priors.loguniform_fraction > 0:
        # Drawn only when asked (a fraction-0 profile keeps its uniform stream), the mask last
        # (a fraction-1 population is the uniform stream's galaxies with log-uniform radii and
        # fluxes).
        def log_uniform(bounds: tuple[float, float]) -> np.ndarray:
            lo, hi = bounds
            return np.clip(np.exp(rng.uniform(np.log(lo), np.log(hi), size=n)), lo, hi)

        log_draws = [
            log_uniform(bounds)
            for bounds in (
                limits.re_arcsec,
                limits.bulge_re_arcsec,
                limits.re_arcsec,
                priors.flux_nJy,
            )
        ]
        log = rng.uniform(size=n) < priors.loguniform_fraction
        disk_re, bulge_re_two, bulge_re_single, flux = (
            np.where(log, drawn, linear)
            for drawn, linear in zip(
                log_draws, (disk_re, bulge_re_two, bulge_re_single, flux), strict=True
            )
        )

    pa_lo, pa_hi = priors.position_angle_deg
    bulge_pa_two = (disk_pa + bulge_pa_offset - pa_lo) % (pa_hi - pa_lo) + pa_lo
    bt = np.where(two, bt_two, np.where(bulge_only, 1.0, 0.0))
    bulge_re = np.where(two, bulge_re_two, bulge_re_single)
    bulge_pa = np.where(two, bulge_pa_two, bulge_pa_single)

    nan = np.nan
    disk_cols = [np.where(has_disk, a, nan) for a in (disk_n, disk_re, disk_q, disk_pa)]
    bulge_cols = [np.where(has_bulge, a, nan) for a in (bulge_n, bulge_re, bulge_q, bulge_pa)]
    re = composite_re_arcsec(bt, disk_cols[0], disk_cols[1], bulge_cols[0], bulge_cols[1])

    values = [bt, re, flux, flux_to_magnitude(flux), *disk_cols, *bulge_cols]
    columns = {"component": pl.Series("component", np.array(COMPONENTS)[kind], dtype=pl.String)}
    for name, arr in zip(PARAMETER_COLUMNS[1:], values, strict=True):
        columns[name] = pl.Series(name, arr, dtype=pl.Float64, nan_to_null=True)
    return pl.DataFrame(columns)


def quantize_sersic_n(params: pl.DataFrame, step: float) -> pl.DataFrame:
    """Round ``disk_n`` and ``bulge_n`` to multiples of ``step`` and recompute ``re_arcsec``.

    Rendering on a fine grid of Sérsic indices lets GalSim reuse its per-index profile tables
    (see :mod:`gampen_ml.sim.render`); the labels then record exactly the indices rendered.
    """
    if step <= 0:
        return params
    out = params.with_columns(
        ((pl.col(c) / step).round() * step).round(10).alias(c) for c in ("disk_n", "bulge_n")
    )
    re = composite_re_arcsec(
        out["bt"].to_numpy(),
        out["disk_n"].to_numpy(),
        out["disk_re_arcsec"].to_numpy(),
        out["bulge_n"].to_numpy(),
        out["bulge_re_arcsec"].to_numpy(),
    )
    return out.with_columns(pl.Series("re_arcsec", re, dtype=pl.Float64))
