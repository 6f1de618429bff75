"""Measures of a posterior catalog against its truths: residuals, HPD coverage, magnitudes.

One home for the small formulas every report shares (validation, the shift suite, the
misspecification study, the figures and the asset checks), each written once:

- :func:`level_tag` — the tag of a credible level (``0.6827 -> "hpd68"`` or ``"68"``);
- :func:`in_interval` / :func:`covered` — whether a truth lies in its HPD interval, bounds
  inclusive, ``(lo <= t) & (t <= hi)``;
- :func:`residuals` / :func:`hpd_width` — ``estimate - true`` and the interval width;
- :func:`ab_magnitude` / :func:`ab_flux_nJy` — AB magnitudes of fluxes in nJy and back,
  the zero point from ``astropy.units``;
- :func:`coverage_bounds` — the binomial acceptance range of an empirical coverage;
- :func:`non_nested_intervals` — HPD intervals that are inverted or not nested.

Catalog columns follow ``docs/catalog.md``: ``{p}_mode``, ``{p}_true``,
``{p}_hpd68_lo`` ... for ``p`` in :data:`gampen_ml.config.PARAMETERS`. Everything is
vectorized over galaxies; no figure, no Dagster.
"""

from __future__ import annotations

from collections.abc import Sequence

import astropy.units as u
import numpy as np
import polars as pl

from gampen_ml.config import CREDIBLE_LEVELS, PARAMETERS, FlagConfig

#: AB magnitude of a flux of 1 nJy, the one zero point of every magnitude (catalog column,
#: reports, bins). astropy defines ``u.ABmag`` by 48.60 mag at 1 erg s^-1 cm^-2 Hz^-1, so
#: this is exactly 31.4; a 3631 Jy zero point would give 31.40007 and shift every stored
#: magnitude by 7e-5 mag.
AB_MAG_1_NJY: float = float(u.nJy.to(u.ABmag))
#: Two-sided false-alarm probability of :func:`coverage_bounds` (3 sigma).
COVERAGE_FALSE_ALARM = 0.0027


class LevelError(ValueError):
    """A credible level with no catalog column; the message names the level."""


def level_tag(level: float, prefix: str = "hpd") -> str:
    """Tag of a credible level: ``0.6827 -> "hpd68"`` (catalog column), ``"68"`` with ``prefix=""``.

    Parameters
    ----------
    level : float
        One of :data:`gampen_ml.config.CREDIBLE_LEVELS` (to 1e-9).
    prefix : str
        Put before the whole percent (``"hpd"`` for catalog columns, ``""`` for report keys
        such as ``coverage_68``).

    Raises
    ------
    LevelError
        If the level is not one of the catalog's credible levels.
    """
    for known in CREDIBLE_LEVELS:
        if abs(level - known) < 1e-9:
            return f"{prefix}{int(100 * known)}"
    raise LevelError(f"level {level!r} has no catalog column; use one of {CREDIBLE_LEVELS}")


#: Short tag of each credible level (``0.6827 -> "68"``), in the order of ``CREDIBLE_LEVELS``.
LEVEL_TAGS: dict[float, str] = {level: level_tag(level, prefix="") for level in CREDIBLE_LEVELS}


def float_column(df: pl.DataFrame, name: str) -> np.ndarray:
    """Column ``name`` as a ``(N,)`` float64 array, nulls as NaN."""
    return df[name].cast(pl.Float64).fill_null(np.nan).to_numpy()


def has_truths(catalog: pl.DataFrame) -> bool:
    """True when every ``{p}_true`` column exists and holds at least one value."""
    return all(
        f"{p}_true" in catalog.columns and catalog[f"{p}_true"].null_count() < catalog.height
        for p in PARAMETERS
    )


def in_interval(lo: np.ndarray, truth: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Whether each truth lies in its interval, bounds inclusive: ``(lo <= truth) & (truth <= hi)``.

    Parameters
    ----------
    lo, truth, hi : array_like, broadcastable
        Interval bounds and true values (a NaN anywhere gives False).

    Returns
    -------
    bool ndarray
        The broadcast shape of the inputs.
    """
    lo, truth, hi = np.asarray(lo), np.asarray(truth), np.asarray(hi)
    return (lo <= truth) & (truth <= hi)


def covered(catalog: pl.DataFrame, parameter: str, level: float) -> np.ndarray:
    """``(N,)`` bool: whether each galaxy's ``{parameter}_true`` lies in its HPD interval.

    ``catalog`` needs ``{parameter}_true`` and the ``{parameter}_hpdNN_lo/hi`` bounds of
    ``level``; a null truth or bound counts as not covered.
    """
    tag = level_tag(level)
    return in_interval(
        float_column(catalog, f"{parameter}_{tag}_lo"),
        float_column(catalog, f"{parameter}_true"),
        float_column(catalog, f"{parameter}_{tag}_hi"),
    )


def residuals(
    catalog: pl.DataFrame, param: str, *, fractional: bool = False, estimate: str = "mode"
) -> np.ndarray:
    """Residual ``{estimate} - true`` of one parameter, optionally divided by the truth.

    Parameters
    ----------
    catalog : pl.DataFrame
        Needs ``{param}_{estimate}`` and ``{param}_true``.
    param : str
        One of :data:`gampen_ml.config.PARAMETERS`.
    fractional : bool
        Divide by the truth.
    estimate : str
        Point estimate: ``mode`` (the paper's, §6.2), ``mean`` or ``median``.

    Returns
    -------
    (N,) float64
        NaN where the truth is null (or zero, for fractional residuals).
    """
    true = float_column(catalog, f"{param}_true")
    res = float_column(catalog, f"{param}_{estimate}") - true
    if fractional:
        with np.errstate(divide="ignore", invalid="ignore"):
            res = np.where(true != 0, res / true, np.nan)
    return res


def hpd_width(
    catalog: pl.DataFrame, param: str, level: str = "68", *, fractional: bool = False
) -> np.ndarray:
    """``(N,)`` float64 width of the HPD interval ``{param}_hpd{level}``, optionally over the mode.

    Parameters
    ----------
    level : str
        Short level tag (``"68"``, ``"95"``, ``"99"``: :data:`LEVEL_TAGS`).
    fractional : bool
        Divide by the posterior mode (NaN where the mode is not positive).
    """
    width = float_column(catalog, f"{param}_hpd{level}_hi") - float_column(
        catalog, f"{param}_hpd{level}_lo"
    )
    if fractional:
        mode = float_column(catalog, f"{param}_mode")
        with np.errstate(divide="ignore", invalid="ignore"):
            width = np.where(mode > 0, width / mode, np.nan)
    return width


def ab_magnitude(flux_nJy: np.ndarray | float) -> np.ndarray:
    """AB magnitude of fluxes in nJy: ``m = 31.4 - 2.5 log10(F / nJy)``.

    The zero point is :data:`AB_MAG_1_NJY` (``u.nJy.to(u.ABmag)``); the logarithm is
    taken here rather than through ``Quantity.to(u.ABmag)``, whose unit scaling rounds
    the last bit differently, so magnitudes stored before stay bit-identical.

    Parameters
    ----------
    flux_nJy : array_like
        Fluxes in nJy.

    Returns
    -------
    float64 ndarray
        Same shape; ``inf`` for a zero flux, NaN for a negative or NaN one (no warning).
    """
    with np.errstate(divide="ignore", invalid="ignore"):
        return AB_MAG_1_NJY - 2.5 * np.log10(np.asarray(flux_nJy, dtype=np.float64))


def ab_flux_nJy(magnitude: np.ndarray | float) -> np.ndarray:
    """Flux in nJy of AB magnitudes, the inverse of :func:`ab_magnitude`.

    Returns
    -------
    float64 ndarray
        ``10 ** ((31.4 - m) / 2.5)``, same shape as ``magnitude``.
    """
    return 10.0 ** ((AB_MAG_1_NJY - np.asarray(magnitude, dtype=np.float64)) / 2.5)


def coverage_bounds(
    level: float, n: int, tolerance: float, false_alarm: float = COVERAGE_FALSE_ALARM
) -> tuple[float, float]:
    """Range of empirical coverage on ``n`` galaxies consistent with ``level +- tolerance``.

    A calibrated model covers each galaxy with probability ``c`` in
    ``[level - tolerance, level + tolerance]``; the number covered is then
    Binomial(n, c). The bounds are the central ``1 - false_alarm`` range of that count at
    the two extremes of ``c``, divided by ``n``. For thousands of galaxies they approach
    ``level +- tolerance``; for a tiny validation split they widen so that counting noise
    alone does not fail a check.

    Returns
    -------
    (float, float)
        Lowest and highest accepted coverage (fractions).
    """
    from scipy.stats import binom

    n = max(int(n), 1)
    tail = false_alarm / 2
    c_lo, c_hi = max(level - tolerance, 0.0), min(level + tolerance, 1.0)
    k_lo = binom.ppf(tail, n, c_lo)
    k_hi = binom.isf(tail, n, c_hi) if c_hi < 1.0 else n
    return float(k_lo) / n, float(k_hi) / n


def non_nested_intervals(
    catalog: pl.DataFrame,
    parameters: Sequence[str] = PARAMETERS,
    inner: float = CREDIBLE_LEVELS[0],
    outer: float = CREDIBLE_LEVELS[-1],
    rtol: float = 1e-9,
) -> int:
    """Number of (galaxy, parameter) HPD intervals that are inverted or not nested.

    An interval counts when the ``inner`` one is inverted (``lo > hi``) or reaches outside
    the ``outer`` one by more than ``rtol`` of the outer bound (float32 rounding of
    bounds that coincide).
    """
    ti, to = level_tag(inner), level_tag(outer)
    n = 0
    for p in parameters:
        lo_in, hi_in = catalog[f"{p}_{ti}_lo"], catalog[f"{p}_{ti}_hi"]
        lo_out, hi_out = catalog[f"{p}_{to}_lo"], catalog[f"{p}_{to}_hi"]
        n += int(
            (
                (lo_in > hi_in)
                | (lo_out > lo_in + rtol * lo_in.abs())
                | (hi_in > hi_out + rtol * hi_out.abs())
            ).sum()
        )
    return n


def flag_arrays(
    catalog: pl.DataFrame, flags: pl.DataFrame | None = None, flag_config: FlagConfig | None = None
) -> dict[str, np.ndarray]:
    """Boolean flag arrays aligned with ``catalog`` rows.

    With a flags table (``galaxy_id`` + flag columns, docs/catalog.md) its values are used,
    joined on ``galaxy_id`` (galaxies missing from it count as unflagged). Without one the
    flags are computed from the catalog by :func:`gampen_ml.flags.compute_flags` with
    ``flag_config`` (default ``FlagConfig()``: paper §6.4 thresholds).

    Returns
    -------
    dict of str -> (N,) bool
        One array per column of :data:`gampen_ml.flags.FLAG_COLUMNS`.

    Raises
    ------
    ValueError
        If ``catalog`` or ``flags`` lacks a needed column or has no rows (named).
    """
    from gampen_ml.flags import FLAG_COLUMNS, compute_flags

    if flags is None:
        flags = compute_flags(catalog, flag_config or FlagConfig())
    require_columns(flags, ("galaxy_id", *FLAG_COLUMNS), "flags")
    require_columns(catalog, ("galaxy_id",), "catalog")
    joined = catalog.select("galaxy_id").join(
        flags.select("galaxy_id", *FLAG_COLUMNS), on="galaxy_id", how="left", maintain_order="left"
    )
    return {c: joined[c].fill_null(False).to_numpy().astype(bool) for c in FLAG_COLUMNS}


def require_columns(
    df: pl.DataFrame, columns: Sequence[str], what: str, *, non_null: bool = False
) -> None:
    """Raise ValueError naming the first of ``columns`` missing from ``df`` (or all null).

    Parameters
    ----------
    what : str
        Names the consumer in the message (a figure, a report).
    non_null : bool
        Also reject a column whose every value is null (e.g. truths of real data).
    """
    for col in columns:
        if col not in df.columns:
            raise ValueError(f"{what}: input has no column {col!r} (columns: {df.columns})")
        if non_null and df[col].null_count() == df.height:
            raise ValueError(f"{what}: column {col!r} is all null (needs simulation truths)")
    if df.height == 0:
        raise ValueError(f"{what}: input table has no rows")


__all__ = [
    "AB_MAG_1_NJY",
    "COVERAGE_FALSE_ALARM",
    "LEVEL_TAGS",
    "LevelError",
    "ab_flux_nJy",
    "ab_magnitude",
    "covered",
    "coverage_bounds",
    "flag_arrays",
    "float_column",
    "has_truths",
    "hpd_width",
    "in_interval",
    "level_tag",
    "non_nested_intervals",
    "require_columns",
    "residuals",
]
