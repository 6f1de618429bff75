"""Dropout-rate calibration and post-hoc spread recalibration (paper §5).

(Over 600 lines: one chain read top to bottom -- coverage, the recalibration model, each
of its fits, and the loop that applies them to every dropout rate on validation.)

- :func:`choose_dropout_rate` — the platform's calibration: MC-dropout samples of every
  dropout model on the validation split (in memory), raw coverage, the recalibration of
  each (:func:`recalibrate_on_validation`: mean shift -> width profile -> exact
  scaled-space fit -> physical search), and the choice.
- :func:`coverage_table` — HPD coverage per parameter and credible level for one model
  on one split (the calibration table of ``docs/catalog.md``).
- :func:`select_dropout_rate` — the rate whose coverage is closest to nominal, i.e. the
  smallest mean ``|coverage - level|`` over parameters and levels (paper §5, Fig. 8).
- :func:`fit_recalibration` — per parameter, a tail exponent ``g_p`` and a spread factor
  ``k_p`` fit on the validation split only. Each galaxy's deviations from its mean, in units
  of its posterior std, are raised to the power ``g`` (sign kept: ``g > 1`` thins the core
  and fattens the tails, for residuals heavier-tailed than the predicted Gaussian), then
  stretched by ``k`` about the mean. Scaling about the mean maps each HPD interval
  ``[lo, hi]`` exactly to ``[m + k (lo - m), m + k (hi - m)]`` (the sorted order and the
  shortest window are unchanged), so for each ``g`` of a small grid the coverage of every
  level is known in closed form for every ``k``: the fit is an exact search, not a noisy
  optimisation. ``g = 1`` is the plain spread factor.
- :func:`search_physical_recalibration` — the same two numbers per parameter, chosen on the
  coverage of the *physical* HPD intervals the catalog reports (a grid search, started
  from the scaled-space fit). The pipeline keeps this result
  (:func:`recalibrate_on_validation`).
- :func:`fit_mean_shift` — a network trained on few galaxies is *biased* where the data
  constrain it least (small galaxies predicted too large, faint ones too bright): no spread
  factor fixes a bias. The median offset ``mean - truth`` of the validation galaxies in
  quantile bins of their predicted mean, interpolated, is subtracted from each posterior
  first (a calibration conditional on the prediction, not on the unknown truth).
- :func:`fit_spread_profile` — the same idea for the *width*: one global factor cannot
  serve posteriors whose misfit depends on the kind of galaxy (B/T of two-component
  galaxies under-covered while pure disks and bulges are over-covered; small galaxies
  under-covered while large ones are over-covered). The 68.27 % quantile of the
  standardized residual ``|truth - mean| / std`` in quantile bins of the predicted mean,
  relative to its value over all galaxies, is a relative width factor, interpolated and
  applied about each galaxy's mean before the global fit.
- An **error floor** ``f_p`` (scaled units, added in quadrature after the spread factor:
  ``sigma' = sqrt(k^2 sigma^2 + f^2)``): a model error that does not shrink with the
  predicted aleatoric width, which otherwise leaves the sharpest posteriors (bright galaxies)
  under-covered while the average is right. With a floor each galaxy's stretch factor is
  ``c_i = sqrt(k^2 + f^2 / sigma_i^2)``, monotone in ``k``, so the exact search over ``k``
  still holds per floor value.
- ``groups``: optional masks of validation galaxies (e.g. bins of true size and magnitude)
  whose 68.27 % coverage errors are added to the fit objective, so that the fit does not
  buy the average with some kinds of galaxies.
- :class:`LabelNoise` — errors in variables: when the validation "truths" are a labeller's
  labels with a measured error distribution, every step above compares the labels to the
  posterior *convolved with the label errors* (each draw gets a drawn error row), so the fit
  describes the truth; the result is applied to the plain posterior. The error floor then
  comes from the physical search (:func:`search_physical_with_floors`).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from gampen_ml.config import CREDIBLE_LEVELS, PARAMETERS, Profile, derive_seed, dropout_key
from gampen_ml.metrics import in_interval, level_tag
from gampen_ml.posterior import PosteriorError, hpd_intervals, summarize
from gampen_ml.store import CALIBRATED_DROPOUT_RATE

if TYPE_CHECKING:
    from gampen_ml.data.transforms import LabelScaler

#: Levels the recalibration is fit over: the three catalog levels plus a fine grid.
RECALIBRATION_LEVELS: tuple[float, ...] = tuple(
    sorted({*CREDIBLE_LEVELS, *np.round(np.linspace(0.05, 0.95, 19), 4).tolist()})
)
#: Candidate spread factors (log-spaced) for the recalibration search.
SCALE_GRID = np.exp(np.linspace(np.log(0.05), np.log(20.0), 4001))
#: Candidate tail exponents of the scaled-space fit (1 = keep the posterior's shape).
EXPONENT_GRID = np.round(np.linspace(0.6, 2.0, 15), 2)
#: Candidate error floors (scaled units; the label scaler's std is 1).
FLOOR_GRID = np.array([0.0, 0.005, 0.01, 0.02, 0.03, 0.05, 0.08, 0.12])
#: Quantile bins of the predicted mean in which :func:`fit_mean_shift` takes the median offset.
MEAN_SHIFT_BINS = 10
#: Quantile bins of the predicted mean in which :func:`fit_spread_profile` measures the width.
SPREAD_BINS = 8
#: Relative width factors of :func:`fit_spread_profile` are clipped to this range.
SPREAD_LIMITS = (0.25, 4.0)
#: Weight of the mean 68.27 % coverage error over ``groups`` in the fit objectives.
GROUP_WEIGHT = 1.0

#: Bins of true Re (arcsec) and true AB magnitude whose 68.27 % coverage the fit watches
#: (:func:`calibration_groups`) and the validation reports (``gampen_ml.robustness``).
RE_BINS_ARCSEC: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, np.inf)
MAGNITUDE_BINS: tuple[float, ...] = (-np.inf, 16.0, 17.0, 19.0, np.inf)
#: Smallest group :func:`calibration_groups` keeps (its coverage is noise below that).
MIN_GROUP_SIZE = 30

COVERAGE_TABLE_SCHEMA: dict[str, pl.DataType] = {
    "dropout_rate": pl.Float64(),
    "split": pl.String(),
    "parameter": pl.String(),
    "level": pl.Float64(),
    "coverage": pl.Float64(),
    "recalibrated": pl.Boolean(),
}


class CalibrationError(ValueError):
    """Inputs to calibration are inconsistent; the message names the argument and value."""


def coverage_table(
    summary_or_catalog: pl.DataFrame,
    truths: pl.DataFrame | None,
    levels: Sequence[float] = CREDIBLE_LEVELS,
    dropout_rate: float = 0.0,
    split: str = "val",
    recalibrated: bool = False,
) -> pl.DataFrame:
    """HPD coverage of each parameter at each credible level.

    Parameters
    ----------
    summary_or_catalog : pl.DataFrame
        Output of :func:`gampen_ml.posterior.summarize` or a posterior catalog: needs
        ``{p}_{tag}_lo`` / ``{p}_{tag}_hi`` for every parameter ``p`` and level.
    truths : pl.DataFrame or None
        True values, one row per galaxy in the same order, with columns ``bt``,
        ``re_arcsec``, ``flux_nJy``. ``None``: use the catalog's ``{p}_true`` columns.
    levels : sequence of float
        Credible levels (each must have a catalog tag).
    dropout_rate, split, recalibrated
        Copied into every row.

    Returns
    -------
    pl.DataFrame
        Columns of :data:`COVERAGE_TABLE_SCHEMA`, one row per parameter and level.
    """
    df = summary_or_catalog
    rows = []
    for p in PARAMETERS:
        if truths is None:
            column, source = f"{p}_true", df
        else:
            column, source = p, truths
        if column not in source.columns:
            where = "catalog" if truths is None else "truths"
            raise CalibrationError(f"coverage_table: {where} lacks column {column!r}")
        if len(source) != len(df):
            raise CalibrationError(
                f"coverage_table: truths have {len(source)} rows, the summary {len(df)}"
            )
        truth = source[column].to_numpy()
        if np.isnan(truth.astype(np.float64)).any():
            raise CalibrationError(f"coverage_table: column {column!r} has null/NaN truths")
        for level in levels:
            tag = level_tag(level)
            for side in ("lo", "hi"):
                if f"{p}_{tag}_{side}" not in df.columns:
                    raise CalibrationError(f"coverage_table: summary lacks {p}_{tag}_{side}")
            lo = df[f"{p}_{tag}_lo"].to_numpy()
            hi = df[f"{p}_{tag}_hi"].to_numpy()
            rows.append((p, float(level), float(np.mean(in_interval(lo, truth, hi)))))
    return pl.DataFrame(
        {
            "dropout_rate": [float(dropout_rate)] * len(rows),
            "split": [split] * len(rows),
            "parameter": [r[0] for r in rows],
            "level": [r[1] for r in rows],
            "coverage": [r[2] for r in rows],
            "recalibrated": [recalibrated] * len(rows),
        },
        schema=COVERAGE_TABLE_SCHEMA,
    )


def coverage_error(table: pl.DataFrame) -> pl.DataFrame:
    """Mean ``|coverage - level|`` per (dropout_rate, recalibrated), sorted best first."""
    return (
        table.with_columns((pl.col("coverage") - pl.col("level")).abs().alias("abs_error"))
        .group_by("dropout_rate", "recalibrated")
        .agg(pl.col("abs_error").mean().alias("coverage_error"))
        .sort("coverage_error", "dropout_rate")
    )


def select_dropout_rate(
    tables: pl.DataFrame | Iterable[pl.DataFrame],
    recalibrated: bool = False,
    *,
    sharpness: Mapping[float, float] | None = None,
    tolerance: float | None = None,
) -> float:
    """The dropout rate whose posteriors are calibrated — and, among those, the sharpest.

    Parameters
    ----------
    tables : pl.DataFrame or iterable of them
        Coverage tables (:func:`coverage_table`), typically one per dropout rate on the
        validation split.
    recalibrated : bool
        Judge the rows with this ``recalibrated`` value (default: the raw posteriors).
    sharpness : mapping rate -> float, optional
        A posterior width per rate (smaller = sharper), e.g. the mean posterior standard
        deviation in the scaled label space.
    tolerance : float, optional
        Largest mean ``|coverage - level|`` that counts as calibrated.

    Returns
    -------
    float
        Without ``sharpness``/``tolerance``: the rate with the smallest mean
        ``|coverage - level|`` over parameters and levels (paper §5), ties to the smaller rate.
        With them: the sharpest rate among those within ``tolerance`` ("maximise sharpness
        subject to calibration", Gneiting et al. 2007), falling back to the closest to nominal
        when none is within it. Coverage alone would reward a model that never converged
        but whose wide posteriors cover the truth.
    """
    table = tables if isinstance(tables, pl.DataFrame) else pl.concat(list(tables))
    table = table.filter(pl.col("recalibrated") == recalibrated)
    if table.is_empty():
        raise CalibrationError(
            f"select_dropout_rate: no coverage rows with recalibrated={recalibrated}"
        )
    errors = coverage_error(table)
    if sharpness is not None and tolerance is not None:
        calibrated = errors.filter(pl.col("coverage_error") <= tolerance)["dropout_rate"]
        missing = [r for r in calibrated if r not in sharpness]
        if missing:
            raise CalibrationError(f"select_dropout_rate: no sharpness for rates {missing}")
        if len(calibrated):
            return float(min(calibrated, key=lambda r: (sharpness[r], r)))
    return float(errors["dropout_rate"][0])


@dataclass(frozen=True)
class Recalibration:
    """Per-parameter tail exponents and spread factors, applied about each galaxy's mean.

    Attributes
    ----------
    scale : tuple of 3 float
        ``k_p`` for ``bt``, ``re_arcsec``, ``flux_nJy`` (``> 1`` widens).
    exponent : tuple of 3 float
        ``g_p``: standardized deviations ``d`` become ``sign(d) |d|^g`` first (1 = unchanged).
    error_before, error_after : tuple of 3 float
        Mean ``|coverage - level|`` over the fit levels on the fitting split.
    levels : tuple of float
        Levels the fit used.
    """

    scale: tuple[float, float, float]
    error_before: tuple[float, float, float] = (float("nan"),) * 3
    error_after: tuple[float, float, float] = (float("nan"),) * 3
    levels: tuple[float, ...] = RECALIBRATION_LEVELS
    exponent: tuple[float, float, float] = (1.0, 1.0, 1.0)
    floor: tuple[float, float, float] = (0.0, 0.0, 0.0)
    shift_knots: tuple[tuple[float, ...], ...] = ((), (), ())
    shift_values: tuple[tuple[float, ...], ...] = ((), (), ())
    spread_knots: tuple[tuple[float, ...], ...] = ((), (), ())
    spread_values: tuple[tuple[float, ...], ...] = ((), (), ())
    spread_drivers: tuple[int, int, int] = (0, 1, 2)
    #: A second mean shift, over the predicted mean of ``second_shift_drivers[p]`` for
    #: parameter ``p``, fit after the first on what it leaves.
    second_shift_knots: tuple[tuple[float, ...], ...] = ((), (), ())
    second_shift_values: tuple[tuple[float, ...], ...] = ((), (), ())
    second_shift_drivers: tuple[int, int, int] = (2, 2, 2)
    #: A second width profile, fit after the first on what it leaves (e.g. by the predicted
    #: flux after the predicted size: a separable profile over the size-brightness plane).
    second_spread_knots: tuple[tuple[float, ...], ...] = ((), (), ())
    second_spread_values: tuple[tuple[float, ...], ...] = ((), (), ())
    second_spread_drivers: tuple[int, int, int] = (2, 2, 2)

    def apply(self, samples_scaled: np.ndarray) -> np.ndarray:
        """Shift, reshape, stretch and floor ``(N, T, 3)`` scaled samples; float32.

        Each galaxy's samples move by ``-shift(mean)`` (:func:`fit_mean_shift`; none when
        no knots), are stretched by the relative width of their predicted mean
        (:func:`fit_spread_profile`; none when no knots), then are reshaped and stretched
        about the galaxy's mean with the error floor added in quadrature
        (:func:`recalibrate_samples`).
        """
        samples_scaled = np.asarray(samples_scaled, dtype=np.float32)
        if samples_scaled.ndim != 3 or samples_scaled.shape[2] != 3:
            raise CalibrationError(
                f"Recalibration.apply: samples must be (N, T, 3), got {samples_scaled.shape}"
            )
        x = shift_means(samples_scaled, self.shift_knots, self.shift_values)
        x = shift_means(
            x, self.second_shift_knots, self.second_shift_values, self.second_shift_drivers
        )
        x = stretch_by_mean(x, self.spread_knots, self.spread_values, self.spread_drivers)
        x = stretch_by_mean(
            x, self.second_spread_knots, self.second_spread_values, self.second_spread_drivers
        )
        return recalibrate_samples(x, self.exponent, self.scale, self.floor)

    def to_dict(self) -> dict:
        """JSON-serializable description."""
        return {
            "parameters": list(PARAMETERS),
            "scale": list(self.scale),
            "exponent": list(self.exponent),
            "error_before": list(self.error_before),
            "error_after": list(self.error_after),
            "levels": list(self.levels),
            "floor": list(self.floor),
            "shift_knots": [list(k) for k in self.shift_knots],
            "shift_values": [list(v) for v in self.shift_values],
            "spread_knots": [list(k) for k in self.spread_knots],
            "spread_values": [list(v) for v in self.spread_values],
            "spread_drivers": list(self.spread_drivers),
            "second_shift_knots": [list(k) for k in self.second_shift_knots],
            "second_shift_values": [list(v) for v in self.second_shift_values],
            "second_shift_drivers": list(self.second_shift_drivers),
            "second_spread_knots": [list(k) for k in self.second_spread_knots],
            "second_spread_values": [list(v) for v in self.second_spread_values],
            "second_spread_drivers": list(self.second_spread_drivers),
        }

    @classmethod
    def from_dict(cls, data: dict) -> Recalibration:
        """Inverse of :meth:`to_dict`."""
        try:
            scale = tuple(float(v) for v in data["scale"])
        except (KeyError, TypeError, ValueError) as exc:
            raise CalibrationError(f"Recalibration.from_dict: bad field 'scale': {exc!r}") from exc
        if len(scale) != 3 or min(scale) <= 0:
            raise CalibrationError(
                f"Recalibration.from_dict: field 'scale' must be 3 positive numbers, got {scale}"
            )
        try:
            exponent = tuple(float(v) for v in data.get("exponent", [1.0] * 3))
        except (TypeError, ValueError) as exc:
            raise CalibrationError(
                f"Recalibration.from_dict: bad field 'exponent': {exc!r}"
            ) from exc
        if len(exponent) != 3 or min(exponent) <= 0:
            raise CalibrationError(
                f"Recalibration.from_dict: field 'exponent' must be 3 positive numbers, "
                f"got {exponent}"
            )
        try:
            floor = tuple(float(v) for v in data.get("floor", [0.0] * 3))
            knots = tuple(tuple(float(v) for v in k) for k in data.get("shift_knots", [[]] * 3))
            values = tuple(tuple(float(v) for v in k) for k in data.get("shift_values", [[]] * 3))
        except (TypeError, ValueError) as exc:
            raise CalibrationError(
                f"Recalibration.from_dict: bad field 'floor' or 'shift_*': {exc!r}"
            ) from exc
        if len(floor) != 3 or min(floor) < 0:
            raise CalibrationError(
                f"Recalibration.from_dict: field 'floor' must be 3 numbers >= 0, got {floor}"
            )
        if len(knots) != 3 or [len(k) for k in knots] != [len(v) for v in values]:
            raise CalibrationError(
                "Recalibration.from_dict: fields 'shift_knots' and 'shift_values' must be 3 "
                "lists of equal lengths"
            )
        profile = {
            prefix: _profile_from_dict(data, prefix, default_drivers, positive)
            for prefix, default_drivers, positive in (
                ("second_shift", [2, 2, 2], False),
                ("spread", [0, 1, 2], True),
                ("second_spread", [2, 2, 2], True),
            )
        }
        return cls(
            scale=scale,
            exponent=exponent,
            floor=floor,
            shift_knots=knots,
            shift_values=values,
            **_profile_fields(profile),
            error_before=tuple(float(v) for v in data.get("error_before", [float("nan")] * 3)),
            error_after=tuple(float(v) for v in data.get("error_after", [float("nan")] * 3)),
            levels=tuple(float(v) for v in data.get("levels", RECALIBRATION_LEVELS)),
        )


def _profile_fields(profiles: dict[str, tuple]) -> dict[str, tuple]:
    """``{prefix: (knots, values, drivers)}`` as :class:`Recalibration` keyword arguments."""
    return {
        f"{prefix}_{field}": value
        for prefix, profile in profiles.items()
        for field, value in zip(("knots", "values", "drivers"), profile, strict=True)
    }


def _profile_from_dict(
    data: dict, prefix: str, default_drivers: list[int], positive: bool
) -> tuple:
    """``(knots, values, drivers)`` of one shift or width profile for
    :meth:`Recalibration.from_dict` (``positive``: width factors, which must be > 0)."""
    try:
        knots = tuple(tuple(float(v) for v in k) for k in data.get(f"{prefix}_knots", [[]] * 3))
        values = tuple(tuple(float(v) for v in k) for k in data.get(f"{prefix}_values", [[]] * 3))
    except (TypeError, ValueError) as exc:
        raise CalibrationError(
            f"Recalibration.from_dict: bad field '{prefix}_knots' or '{prefix}_values': {exc!r}"
        ) from exc
    if len(knots) != 3 or [len(k) for k in knots] != [len(v) for v in values]:
        raise CalibrationError(
            f"Recalibration.from_dict: fields '{prefix}_knots' and '{prefix}_values' must be 3 "
            "lists of equal lengths"
        )
    if positive and any(v <= 0 for values_p in values for v in values_p):
        raise CalibrationError(f"Recalibration.from_dict: '{prefix}_values' must be > 0")
    drivers = data.get(f"{prefix}_drivers", default_drivers)
    if not (
        isinstance(drivers, list) and len(drivers) == 3 and all(d in (0, 1, 2) for d in drivers)
    ):
        raise CalibrationError(
            f"Recalibration.from_dict: '{prefix}_drivers' must be 3 of 0, 1, 2; got {drivers!r}"
        )
    return knots, values, tuple(int(d) for d in drivers)


def reshape_tails(samples: np.ndarray, exponent: np.ndarray | float) -> np.ndarray:
    """``m + s sign(d) |d|^g`` with ``d = (x - m) / s`` per galaxy (axis 1), float32.

    ``m`` and ``s`` are each galaxy's sample mean and std; ``exponent`` broadcasts over the
    trailing axes (one per parameter). Galaxies with zero spread are returned unchanged, and
    so are the samples themselves when every exponent is 1.
    """
    g = np.asarray(exponent, dtype=np.float32)
    if np.all(g == 1.0):
        return samples
    x = np.asarray(samples, dtype=np.float32)
    mean = x.mean(axis=1, keepdims=True)
    std = x.std(axis=1, keepdims=True)
    std = np.where(std > 0, std, 1.0).astype(np.float32)
    d = (x - mean) / std
    return (mean + std * np.sign(d) * np.abs(d) ** g).astype(np.float32)


def recalibrate_samples(samples: np.ndarray, exponent, scale, floor=0.0) -> np.ndarray:
    """:func:`reshape_tails` by ``exponent``, then stretch about each galaxy's mean.

    Each galaxy's stretch is ``sqrt(scale^2 + floor^2 / std^2)`` (``std``: its reshaped
    samples' standard deviation), so its width becomes ``sqrt((scale std)^2 + floor^2)``.
    ``exponent``, ``scale`` and ``floor`` broadcast over the trailing (parameter) axis;
    float32.
    """
    x = reshape_tails(samples, exponent)
    mean = x.mean(axis=1, keepdims=True)
    scale = np.asarray(scale, dtype=np.float32)
    floor = np.asarray(floor, dtype=np.float32)
    if np.all(floor == 0):
        return mean + scale * (x - mean)
    std = x.std(axis=1, keepdims=True)
    with np.errstate(divide="ignore"):
        factor = np.sqrt(scale**2 + np.where(std > 0, (floor / std) ** 2, 0.0))
    # A galaxy without spread gets no floor (nothing to stretch).
    return (mean + factor * (x - mean)).astype(np.float32)


def shift_means(samples: np.ndarray, knots, values, drivers=None) -> np.ndarray:
    """Move each galaxy's ``(N, T, P)`` samples by ``-interp(mean_d, knots_p, values_p)``.

    ``knots`` / ``values``: per parameter, increasing predicted means and the offsets to
    remove there (:func:`fit_mean_shift`); an empty pair leaves that parameter alone.
    ``mean_d`` is the galaxy's predicted mean (before this shift) of parameter
    ``d = drivers[p]`` (default: ``p`` itself). Linear interpolation, constant beyond the end
    knots. float32.
    """
    if not any(len(k) for k in knots):  # nothing to shift: no copy on the catalog's hot path
        return np.asarray(samples, dtype=np.float32)
    x = np.array(samples, dtype=np.float32, copy=True)
    means = x.mean(axis=1)
    drivers = range(x.shape[2]) if drivers is None else drivers
    for j, (k, v, d) in enumerate(zip(knots, values, drivers, strict=True)):
        if len(k):
            x[:, :, j] -= np.interp(means[:, d], k, v).astype(np.float32)[:, None]
    return x


def stretch_by_mean(samples: np.ndarray, knots, values, drivers=None) -> np.ndarray:
    """Stretch each galaxy's ``(N, T, P)`` samples about its mean by a factor of a predicted mean.

    Parameter ``p`` is stretched by ``interp(mean_d, knots_p, values_p)`` where ``mean_d`` is
    the galaxy's predicted mean of parameter ``d = drivers[p]`` (default: ``p`` itself).
    ``knots`` / ``values`` as in :func:`shift_means`, with relative width factors as the
    values (:func:`fit_spread_profile`). float32.
    """
    if not any(len(k) for k in knots):  # nothing to stretch: no copy on the catalog's hot path
        return np.asarray(samples, dtype=np.float32)
    x = np.array(samples, dtype=np.float32, copy=True)
    means = x.mean(axis=1)  # before any stretch: stretching keeps the means anyway
    drivers = range(x.shape[2]) if drivers is None else drivers
    for j, (k, v, d) in enumerate(zip(knots, values, drivers, strict=True)):
        if len(k):
            factor = np.interp(means[:, d], k, v).astype(np.float32)[:, None]
            x[:, :, j] = means[:, j, None] + factor * (x[:, :, j] - means[:, j, None])
    return x


def fit_spread_profile(
    samples_scaled: np.ndarray,
    truth_scaled: np.ndarray,
    n_bins: int = SPREAD_BINS,
    level: float = CREDIBLE_LEVELS[0],
    driver: np.ndarray | None = None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Relative width factor in quantile bins of the predicted mean (validation only).

    In each bin, the ``level`` quantile of the standardized residual
    ``|truth - mean| / std`` divided by the same quantile over all galaxies: > 1 where the
    posteriors are too narrow for their kind of galaxy, < 1 where too wide. The global
    width stays with :func:`fit_recalibration`; this only redistributes it.

    Parameters
    ----------
    samples_scaled : (N, T) array_like
        One parameter's posterior samples in the scaled space (after :func:`shift_means`).
    truth_scaled : (N,) array_like
        The true values in the same space.
    n_bins : int
        Quantile bins of the predicted mean (each knot is the median mean of its bin).
    level : float
        Quantile of the standardized residual compared.
    driver : (N,) array_like, optional
        The predicted quantity whose quantile bins are used (another parameter's predicted
        mean, see :func:`stretch_by_mean`'s ``drivers``); default this parameter's mean.

    Returns
    -------
    (knots, values)
        For :func:`stretch_by_mean`: increasing knots and factors in :data:`SPREAD_LIMITS`;
        empty when the posteriors have no spread.
    """
    x = np.asarray(samples_scaled, dtype=np.float64)
    truth = np.asarray(truth_scaled, dtype=np.float64)
    mean = x.mean(axis=1)
    std = x.std(axis=1)
    usable = std > 0
    if usable.sum() < n_bins:
        return (), ()
    z = np.abs(truth - mean)[usable] / std[usable]
    mean = (mean if driver is None else np.asarray(driver, dtype=np.float64))[usable]
    overall = float(np.quantile(z, level))
    if not overall > 0:
        return (), ()
    return _binned_profile(
        mean, lambda b: np.clip(np.quantile(z[b], level) / overall, *SPREAD_LIMITS), n_bins
    )


def calibration_groups(truths: pl.DataFrame) -> list[np.ndarray]:
    """Masks of validation galaxies per bin of true Re and true magnitude (``groups``).

    ``truths`` has ``re_arcsec`` and ``flux_nJy``; bins of :data:`RE_BINS_ARCSEC` and
    :data:`MAGNITUDE_BINS` with at least :data:`MIN_GROUP_SIZE` galaxies; with a
    ``component`` column also the two-component (bulge+disk) galaxies.
    """
    from gampen_ml.metrics import ab_magnitude

    values = {
        RE_BINS_ARCSEC: truths["re_arcsec"].to_numpy(),
        MAGNITUDE_BINS: ab_magnitude(truths["flux_nJy"].to_numpy()),
    }
    masks = []
    for edges, v in values.items():
        index = np.searchsorted(edges, v, side="right") - 1
        masks += [index == b for b in range(len(edges) - 1)]
    if "component" in truths.columns:
        # Two-component galaxies: their B/T lies inside (0, 1), where a single-component
        # galaxy's point mass at 0 or 1 is covered almost always; watched on their own.
        masks.append(truths["component"].to_numpy() == "bulge+disk")
    return [m for m in masks if m.sum() >= MIN_GROUP_SIZE]


def fit_mean_shift(
    samples_scaled: np.ndarray,
    truth_scaled: np.ndarray,
    n_bins: int = MEAN_SHIFT_BINS,
    driver: np.ndarray | None = None,
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Median offset ``mean - truth`` in quantile bins of the predicted mean (validation only).

    Parameters
    ----------
    samples_scaled : (N, T) array_like
        One parameter's posterior samples in the scaled space.
    truth_scaled : (N,) array_like
        The true values in the same space.
    n_bins : int
        Quantile bins of the predicted mean (each knot is the median mean of its bin).
    driver : (N,) array_like, optional
        The predicted means whose quantile bins are used (default: the means of
        ``samples_scaled``); given when ``samples_scaled`` are the posterior convolved with
        the label errors (:class:`LabelNoise`) while the shift applies to the plain one.

    Returns
    -------
    (knots, values)
        For :func:`shift_means`: increasing knots and the median offsets there.
    """
    x = np.asarray(samples_scaled, dtype=np.float64)
    truth = np.asarray(truth_scaled, dtype=np.float64)
    mean = x.mean(axis=1)
    knots = mean if driver is None else np.asarray(driver, dtype=np.float64)
    return _binned_profile(knots, lambda b: np.median(mean[b] - truth[b]), n_bins)


def _binned_profile(
    driver: np.ndarray, statistic: Callable[[np.ndarray], float], n_bins: int
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """``statistic(indices)`` in quantile bins of ``driver``; knots = each bin's median driver."""
    order = np.argsort(driver, kind="stable")
    knots, values = [], []
    for chunk in np.array_split(order, min(n_bins, len(order))):
        if len(chunk):
            knots.append(float(np.median(driver[chunk])))
            values.append(float(statistic(chunk)))
    return tuple(knots), tuple(values)


def _admissible_scales(lo, hi, mean, truth) -> tuple[np.ndarray, np.ndarray]:
    """Interval ``[k_min, k_max]`` of spread factors for which truth lies in the stretched HPD.

    Stretched bounds are ``m + k (lo - m)`` and ``m + k (hi - m)``; each condition is linear
    in ``k``. Empty sets come back as ``(inf, inf)``.
    """
    k_min = np.zeros_like(truth)
    k_max = np.full_like(truth, np.inf)
    offset = truth - mean
    # m + k (lo - m) <= y   <=>   k (lo - m) <= y - m
    # y <= m + k (hi - m)   <=>   k (m - hi) <= m - y
    for a, b in ((lo - mean, offset), (mean - hi, -offset)):
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = b / a
        k_max = np.where(a > 0, np.minimum(k_max, ratio), k_max)
        k_min = np.where(a < 0, np.maximum(k_min, ratio), k_min)
        impossible = (a == 0) & (b < 0)
        k_min = np.where(impossible, np.inf, k_min)
    empty = k_min > k_max
    return np.where(empty, np.inf, k_min), np.where(empty, np.inf, k_max)


def _coverage_vs_scale(
    samples: np.ndarray,
    truth: np.ndarray,
    levels,
    grid,
    floors: Sequence[float] = (0.0,),
    groups: Sequence[np.ndarray] = (),
) -> tuple[np.ndarray, np.ndarray]:
    """Coverage of one parameter at every floor, level and spread factor in ``grid``.

    Returns ``(coverage (F, L, K), group_coverage (F, G, K))``, the second for each mask of
    ``groups`` at the level :func:`_group_level` picks. With a floor ``f``, galaxy ``i``'s
    stretch is ``c = sqrt(k^2 + f^2 / std_i^2)``: its admissible ``c`` interval maps to one of
    ``k``. The HPD intervals are computed once for all floors.
    """
    lo, hi = hpd_intervals(samples, levels)
    mean = samples.mean(axis=1)
    std = samples.std(axis=1)
    out = np.empty((len(floors), len(levels), len(grid)))
    group_out = np.empty((len(floors), len(groups), len(grid)))
    for i in range(len(levels)):
        c_min, c_max = _admissible_scales(lo[i], hi[i], mean, truth)
        for f, floor in enumerate(floors):
            extra = (floor / np.where(std > 0, std, np.inf)) ** 2
            reachable = c_max**2 >= extra
            k_min = np.where(reachable, np.sqrt(np.maximum(c_min**2 - extra, 0.0)), np.inf)
            k_max = np.where(reachable, np.sqrt(np.maximum(c_max**2 - extra, 0.0)), np.inf)
            out[f, i] = _fraction_inside(k_min, k_max, grid)
            if i == _group_level(levels):
                for j, mask in enumerate(groups):
                    group_out[f, j] = _fraction_inside(k_min[mask], k_max[mask], grid)
    return out, group_out


def _fraction_inside(k_min: np.ndarray, k_max: np.ndarray, grid) -> np.ndarray:
    """Fraction of galaxies whose admissible ``[k_min, k_max]`` holds each ``grid`` value."""
    inside = np.searchsorted(np.sort(k_min), grid, side="right")
    beyond = np.searchsorted(np.sort(k_max), grid, side="left")
    return (inside - beyond) / max(len(k_min), 1)


def _group_level(levels: Sequence[float]) -> int:
    """Index of the level the ``groups`` are judged at: 68.27 % when among ``levels``, else 0."""
    levels = [float(v) for v in levels]
    return levels.index(CREDIBLE_LEVELS[0]) if CREDIBLE_LEVELS[0] in levels else 0


def _objective(coverage: np.ndarray, levels: Sequence[float], group_coverage=None):
    """Fit objective and mean error of coverage ``(L, K)`` at ``levels`` ``(L,)``, per column.

    Mean ``|coverage - level|`` plus the largest one at the catalog levels
    (:data:`CREDIBLE_LEVELS` among ``levels``), plus :data:`GROUP_WEIGHT` x the mean
    ``|coverage - level|`` of ``group_coverage`` ``(G, K)`` (at :func:`_group_level`).
    """
    catalog = [i for i, level in enumerate(levels) if level in CREDIBLE_LEVELS]
    abs_error = np.abs(coverage - np.asarray(levels, dtype=np.float64)[:, None])
    error = abs_error.mean(axis=0)
    objective = error + (abs_error[catalog].max(axis=0) if catalog else 0.0)
    if group_coverage is not None and len(group_coverage):
        level = levels[_group_level(levels)]
        objective = objective + GROUP_WEIGHT * np.abs(group_coverage - level).mean(axis=0)
    return objective, error


#: Tail exponents and spread factors of the physical-coverage search
#: (:func:`search_physical_recalibration`): 0.4-2.0 in steps of 0.1, and 0.2-5 in log
#: steps of 3.4 %.
PHYSICAL_EXPONENT_GRID = np.round(np.arange(0.4, 2.0001, 0.1), 2)
PHYSICAL_SCALE_GRID = np.exp(np.linspace(np.log(0.2), np.log(5.0), 97))
#: The coarse pass of the search takes every n-th exponent and scale of the grids.
_COARSE_EXPONENT_STEP, _COARSE_SCALE_STEP = 2, 4


def search_physical_recalibration(
    samples_scaled: np.ndarray,
    truth: np.ndarray,
    to_physical: Callable[[np.ndarray], np.ndarray],
    levels: Sequence[float] = CREDIBLE_LEVELS,
    candidates: Iterable[tuple[float, float]] = (),
    *,
    floor: float = 0.0,
    groups: Sequence[np.ndarray] = (),
) -> tuple[float, float, float]:
    """One parameter's ``(exponent, scale, objective)`` judged on its *physical* coverage.

    ``floor`` (the error floor, kept fixed) and ``groups`` (masks whose 68.27 % coverage
    joins the objective) are as in :func:`fit_recalibration`.

    The catalog's intervals are HPD intervals of the *physical* samples, which are not the
    image of the scaled-space ones (the inverse label transform has a Jacobian; B/T's
    physical posterior also has point masses at exactly 0 and 1, the snapped
    single-component galaxies). So each candidate (``g``, ``k``) is applied in the scaled
    space, the samples are mapped with ``to_physical`` (``(N, T)`` scaled -> physical) and
    scored on the physical HPD coverage of ``truth`` at ``levels`` with
    :func:`fit_recalibration`'s objective (mean ``|coverage - level|`` plus the largest at
    the catalog levels). Coarse-to-fine: every other exponent of
    :data:`PHYSICAL_EXPONENT_GRID` x every 4th factor of :data:`PHYSICAL_SCALE_GRID`, then
    the full grids next to the best, with ``(1, 1)`` (no change) and ``candidates`` (e.g.
    the scaled-space fit) always scored, so the result is never worse on the fitting split
    than any of them.
    """
    x = np.asarray(samples_scaled, dtype=np.float32)
    truth = np.asarray(truth, dtype=np.float64)
    scored: dict[tuple[float, float], float] = {}

    def score(g: float, k: float) -> float:
        key = (round(float(g), 6), round(float(k), 6))
        if key not in scored:
            lo, hi = hpd_intervals(
                to_physical(recalibrate_samples(x, key[0], key[1], floor)), levels
            )
            inside = in_interval(lo, truth, hi)
            g_level = _group_level(levels)
            by_group = np.array([[inside[g_level][mask].mean()] for mask in groups]).reshape(-1, 1)
            objective = _objective(inside.mean(axis=1)[:, None], levels, by_group)[0][0]
            scored[key] = float(objective)
        return scored[key]

    grid_g, grid_k = PHYSICAL_EXPONENT_GRID, PHYSICAL_SCALE_GRID
    for g, k in [(1.0, 1.0), *candidates]:
        score(g, k)
    for g in grid_g[::_COARSE_EXPONENT_STEP]:
        for k in grid_k[::_COARSE_SCALE_STEP]:
            score(g, k)
    (g0, k0), _ = min(scored.items(), key=lambda item: (item[1], item[0]))
    i = int(np.argmin(np.abs(np.log(grid_k / k0))))
    for g in grid_g[np.abs(grid_g - g0) <= 0.1 * _COARSE_EXPONENT_STEP / 2 + 1e-9]:
        for k in grid_k[max(i - _COARSE_SCALE_STEP, 0) : i + _COARSE_SCALE_STEP + 1]:
            score(g, k)
    (g, k), value = min(scored.items(), key=lambda item: (item[1], item[0]))
    return g, k, value


def fit_recalibration(
    samples_scaled: np.ndarray,
    truths_scaled: np.ndarray,
    levels: Sequence[float] = RECALIBRATION_LEVELS,
    *,
    floors: Sequence[float] = (0.0,),
    groups: Sequence[np.ndarray] = (),
) -> Recalibration:
    """Fit per-parameter spread factors on the validation split (never on test).

    For each parameter the triple (tail exponent ``g`` in :data:`EXPONENT_GRID`, error floor
    ``f`` in ``floors``, factor ``k``) minimises the mean ``|coverage - level|`` of the HPD
    intervals over ``levels`` plus the largest ``|coverage - level|`` at the catalog's levels
    (68.27 / 95.45 / 99.73 %, when among ``levels``), so the three reported intervals are not
    traded for the fine grid, plus the mean 68.27 % error over ``groups``; for each ``g`` and
    ``f`` the search over a fine log grid of ``k`` in [0.05, 20] is exact (see the module
    docstring). ``error_before`` / ``error_after`` are the mean errors over ``levels``.

    Parameters
    ----------
    samples_scaled : (N, T, 3) array_like
        MC-dropout samples in the network's scaled space.
    truths_scaled : (N, 3) array_like
        True labels mapped with the same :class:`LabelScaler`.
    levels : sequence of float
        Credible levels the coverage error is averaged over (``groups`` are judged at
        68.27 % when it is among them).
    floors : sequence of float
        Candidate error floors (:data:`FLOOR_GRID`; default: none).
    groups : sequence of (N,) bool
        Galaxy masks whose 68.27 % coverage joins the objective.

    Returns
    -------
    Recalibration
    """
    samples_scaled = np.asarray(samples_scaled, dtype=np.float64)
    truths_scaled = np.asarray(truths_scaled, dtype=np.float64)
    if samples_scaled.ndim != 3 or truths_scaled.shape != (
        samples_scaled.shape[0],
        samples_scaled.shape[2],
    ):
        raise CalibrationError(
            "fit_recalibration: samples (N, T, 3) and truths (N, 3) disagree: "
            f"{samples_scaled.shape} vs {truths_scaled.shape}"
        )
    grid = np.concatenate([SCALE_GRID, [1.0]])
    scale, exponent, floor, before, after = [], [], [], [], []
    for j in range(samples_scaled.shape[2]):
        x, truth = samples_scaled[:, :, j], truths_scaled[:, j]
        best = (np.inf, 1.0, 1.0, 0.0, np.inf)  # (objective, exponent, scale, floor, error)
        for g in EXPONENT_GRID:
            try:
                cov, group_cov = _coverage_vs_scale(
                    reshape_tails(x, g), truth, levels, grid, floors, groups
                )
            except PosteriorError as exc:
                raise CalibrationError(
                    f"fit_recalibration: parameter {PARAMETERS[j]}: {exc}"
                ) from exc
            for f, floor_value in enumerate(floors):
                objective, error = _objective(cov[f], levels, group_cov[f])
                if g == 1.0 and floor_value == 0.0:
                    before.append(float(error[-1]))
                i = int(np.argmin(objective[:-1]))
                if objective[i] < best[0] - 1e-12:
                    best = (
                        float(objective[i]),
                        float(g),
                        float(grid[i]),
                        float(floor_value),
                        float(error[i]),
                    )
        if len(before) < j + 1:  # no (g=1, f=0) candidate scored: measure it
            cov, _ = _coverage_vs_scale(x, truth, levels, grid)
            before.append(float(_objective(cov[0], levels)[1][-1]))
        after.append(best[4])
        exponent.append(best[1])
        scale.append(best[2])
        floor.append(best[3])
    return Recalibration(
        scale=tuple(scale),
        exponent=tuple(exponent),
        floor=tuple(floor),
        error_before=tuple(before),
        error_after=tuple(after),
        levels=tuple(float(v) for v in levels),
    )


def search_physical_with_floors(
    samples_scaled: np.ndarray,
    truth: np.ndarray,
    to_physical: Callable[[np.ndarray], np.ndarray],
    levels: Sequence[float] = CREDIBLE_LEVELS,
    candidates: Iterable[tuple[float, float]] = (),
    *,
    floors: Sequence[float] = tuple(FLOOR_GRID),
    groups: Sequence[np.ndarray] = (),
) -> tuple[float, float, float, float]:
    """:func:`search_physical_recalibration` at each error floor of ``floors``; the best one.

    Used when the error floor cannot come from :func:`fit_recalibration`'s exact
    scaled-space search: when ``to_physical`` convolves the posterior with the label errors
    (:class:`LabelNoise`), the stretched intervals are no longer a closed-form function of
    the spread factor. Returns ``(exponent, scale, floor, objective)``; ties go to the
    smaller floor.
    """
    best: tuple[float, float, float, float] | None = None
    for floor in sorted(float(f) for f in floors):
        g, k, value = search_physical_recalibration(
            samples_scaled, truth, to_physical, levels, candidates, floor=floor, groups=groups
        )
        if best is None or value < best[3] - 1e-12:
            best = (g, k, floor, value)
    if best is None:
        raise CalibrationError("search_physical_with_floors: no floor to search")
    return best


#: Columns of a label-error table, per parameter: B/T absolute (label - truth), Re and flux
#: relative (label / truth - 1) (``gampen_ml.labelled.LABEL_ERRORS_FILE``).
LABEL_ERROR_COLUMNS: dict[str, str] = {
    "bt": "bt_error",
    "re_arcsec": "re_rel_error",
    "flux_nJy": "flux_rel_error",
}


#: Injected galaxies whose errors a posterior draw may get: one of the
#: :data:`LABEL_NOISE_NEIGHBOURS` nearest truths to the draw (:class:`LabelNoise`).
LABEL_NOISE_NEIGHBOURS = 15
#: Cells per axis of the lookup grid of :class:`LabelNoise`'s nearest-truth search (B/T,
#: log Re and log flux standardised by the table's truths): a cell is ~1/40 of the truths'
#: range, much finer than a neighbourhood of 15 among a few hundred truths.
LABEL_NOISE_GRID = 40
#: Weight of the pure-disk and pure-bulge flags (true B/T exactly 0, exactly 1) in the
#: neighbour distance: larger than any distance of the standardised coordinates, so a draw
#: at exactly 0 or 1 gets the errors of pure disks or bulges, and a draw inside (0, 1) those
#: of two-component galaxies, as long as the table has that many of them.
_SINGLE_WEIGHT = 1e3


@dataclass(frozen=True)
class LabelNoise:
    """A labeller's measured errors, to convolve posterior samples with before comparing to labels.

    A network fine-tuned on a fitter's labels is recalibrated against those labels, which
    carry the fitter's error; a posterior whose intervals cover the *labels* at nominal
    covers the *truth* too often. When the labeller's errors are known (measured by
    injection-recovery: :func:`gampen_ml.labelled.label_errors_table`), each posterior draw
    gets one error row before being compared to a label: the labels are then treated as
    what they are, truth plus the labeller's error, and the recalibration fit to them
    describes the truth (errors in variables).

    The error depends on the galaxy (a fitter puts a small bulge in a knotty pure disk,
    misses the size of galaxies smaller than the PSF): a label is ``truth + e(truth)``. So
    each draw ``theta`` (physical B/T, Re, flux) gets the error row of an injected galaxy
    whose truth is near ``theta``: one of the :data:`LABEL_NOISE_NEIGHBOURS` nearest truths
    in (B/T, log Re, log flux), each standardised by the truths' standard deviation, picked
    at random. Single-component galaxies are their own kind: a draw at B/T exactly 0 or 1
    gets the errors of injected pure disks or bulges, a draw inside (0, 1) those of
    two-component galaxies (:data:`_SINGLE_WEIGHT`), while the table has at least that many
    of the kind. The nearest truths are looked up in a grid of :data:`LABEL_NOISE_GRID`
    cells per axis (each cell's neighbours found once, at construction, with a k-d tree),
    so a draw costs an index computation: the recalibration search convolves its 100,000
    draws a few thousand times. Rows are used whole, so the errors keep their correlation
    and heavy tails; the random pick among the neighbours is a fixed function of ``seed``
    and the samples' shape, so every candidate of a fit sees the same noise.

    Attributes
    ----------
    errors : (R, 3) ndarray
        float64 rows ``[bt_error, re_rel_error, flux_rel_error]``: B/T absolute, Re and flux
        relative (:data:`LABEL_ERROR_COLUMNS`).
    truths : (R, 3) ndarray
        float64 truths ``[bt, re_arcsec, flux_nJy]`` of the injected galaxy of each row.
    seed : int
        Seeds the random pick among the neighbours.
    neighbours : int
        How many nearest truths a draw's row is picked from (at most ``R``).
    """

    errors: np.ndarray
    truths: np.ndarray
    seed: int = 0
    neighbours: int = LABEL_NOISE_NEIGHBOURS

    def __post_init__(self) -> None:
        errors = np.asarray(self.errors, dtype=np.float64)
        truths = np.asarray(self.truths, dtype=np.float64)
        if errors.ndim != 2 or errors.shape[1] != len(PARAMETERS) or len(errors) == 0:
            raise CalibrationError(f"LabelNoise: errors must be (R >= 1, 3), got {errors.shape}")
        if truths.shape != errors.shape:
            raise CalibrationError(
                f"LabelNoise: truths must be (R, 3) like the errors {errors.shape}, "
                f"got {truths.shape}"
            )
        if not (np.isfinite(errors).all() and np.isfinite(truths).all()):
            raise CalibrationError("LabelNoise: errors and truths must be finite")
        if (errors[:, 1:] <= -1).any():
            raise CalibrationError("LabelNoise: relative errors of Re and flux must be > -1")
        if ((truths[:, 0] < 0) | (truths[:, 0] > 1)).any() or (truths[:, 1:] <= 0).any():
            raise CalibrationError("LabelNoise: true B/T must be in [0, 1], Re and flux > 0")
        if self.neighbours < 1:
            raise CalibrationError(f"LabelNoise: neighbours must be >= 1, got {self.neighbours}")
        object.__setattr__(self, "errors", errors)
        object.__setattr__(self, "truths", truths)
        object.__setattr__(self, "neighbours", min(int(self.neighbours), len(errors)))
        self._build_grid()

    @classmethod
    def from_table(cls, table: pl.DataFrame, seed: int = 0, **kwargs) -> LabelNoise:
        """From a label-error table (:data:`LABEL_ERROR_COLUMNS` and ``<parameter>_true``)."""
        errors = table.select(LABEL_ERROR_COLUMNS[p] for p in PARAMETERS).to_numpy()
        truths = table.select(f"{p}_true" for p in PARAMETERS).to_numpy()
        return cls(errors, truths, seed, **kwargs)

    def _coordinates(self, physical: np.ndarray) -> np.ndarray:
        """``(..., 3)`` physical values -> standardised (B/T, log Re, log flux)."""
        x = np.asarray(physical, dtype=np.float64)
        with np.errstate(divide="ignore", invalid="ignore"):
            z = np.stack([x[..., 0], np.log(x[..., 1]), np.log(x[..., 2])], axis=-1)
        return (z - self._centre) / self._spread

    def _build_grid(self) -> None:
        """Each grid cell's nearest truths: ``(3 G^3 + ... , k)`` row indices, once."""
        from scipy.spatial import cKDTree

        t = self.truths
        z = np.stack([t[:, 0], np.log(t[:, 1]), np.log(t[:, 2])], axis=1)
        spread = z.std(axis=0)
        object.__setattr__(self, "_centre", z.mean(axis=0))
        object.__setattr__(self, "_spread", np.where(spread > 0, spread, 1.0))
        zs = self._coordinates(t)
        kind = _SINGLE_WEIGHT * np.column_stack([t[:, 0] == 0.0, t[:, 0] == 1.0])
        tree = cKDTree(np.column_stack([zs, kind]))
        g = LABEL_NOISE_GRID
        # Re and flux: cells over the truths' range (draws beyond it use the edge cells);
        # B/T: cells over (0, 1) for two-component draws, plus 0 and 1 exactly.
        low, high = zs[:, 1:].min(axis=0), zs[:, 1:].max(axis=0)
        width = np.where(high > low, (high - low) / g, 1.0)
        object.__setattr__(self, "_low", low)
        object.__setattr__(self, "_width", width)
        centres = [low[i] + (np.arange(g) + 0.5) * width[i] for i in range(2)]
        bt_two = (np.arange(g) + 0.5) / g
        # Cell layout: B/T index 0..g-1 two-component, g = exactly 0, g + 1 = exactly 1.
        bt_values = np.concatenate([bt_two, [0.0, 1.0]])
        disk = np.concatenate([np.zeros(g), [1.0, 0.0]])
        bulge = np.concatenate([np.zeros(g), [0.0, 1.0]])
        b, r, f = np.meshgrid(np.arange(g + 2), np.arange(g), np.arange(g), indexing="ij")
        queries = np.column_stack(
            [
                (bt_values[b.ravel()] - self._centre[0]) / self._spread[0],
                centres[0][r.ravel()],
                centres[1][f.ravel()],
                _SINGLE_WEIGHT * disk[b.ravel()],
                _SINGLE_WEIGHT * bulge[b.ravel()],
            ]
        )
        _, index = tree.query(queries, k=self.neighbours)
        object.__setattr__(
            self, "_cells", np.asarray(index, dtype=np.int32).reshape(-1, self.neighbours)
        )

    def rows(self, physical: np.ndarray) -> np.ndarray:
        """``(N, T)`` int indices of the error row each draw of ``(N, T, 3)`` physical samples gets.

        Row of one of the :attr:`neighbours` injected galaxies whose truths are nearest the
        draw (the class docstring), the pick seeded by :attr:`seed` and the samples' shape.
        """
        x = np.asarray(physical, dtype=np.float64)
        if x.ndim != 3 or x.shape[2] != len(PARAMETERS):
            raise CalibrationError(f"LabelNoise.rows: samples must be (N, T, 3), got {x.shape}")
        g = LABEL_NOISE_GRID
        z = self._coordinates(x)
        bt = x[..., 0]
        bt_cell = np.clip((bt * g).astype(np.int64), 0, g - 1)
        bt_cell = np.where(bt <= 0.0, g, np.where(bt >= 1.0, g + 1, bt_cell))
        other = []
        for i in (1, 2):
            with np.errstate(invalid="ignore"):
                cell = np.floor((z[..., i] - self._low[i - 1]) / self._width[i - 1])
            other.append(np.clip(np.nan_to_num(cell, nan=0.0), 0, g - 1).astype(np.int64))
        cell = (bt_cell * g + other[0]) * g + other[1]
        pick = np.random.default_rng(self.seed).integers(self.neighbours, size=x.shape[:2])
        return self._cells[cell, pick].astype(np.int64)

    def add(self, physical: np.ndarray, index: int, rows: np.ndarray) -> np.ndarray:
        """One parameter's ``(N, T)`` physical samples, each with its row's label error; float64.

        ``index`` into :data:`~gampen_ml.config.PARAMETERS`: B/T gets its absolute error
        added and is clipped to [0, 1]; Re and flux are multiplied by ``1 + error``.
        ``rows`` (:meth:`rows` of the joint draws) keeps the errors of the three joint.
        """
        x = np.asarray(physical, dtype=np.float64)
        if x.ndim != 2 or np.shape(rows) != x.shape:
            raise CalibrationError(
                f"LabelNoise.add: samples must be (N, T) like rows {np.shape(rows)}, got {x.shape}"
            )
        error = self.errors[rows, index]
        if index == 0:
            return np.clip(x + error, 0.0, 1.0)
        return x * (1.0 + error)

    def add_all(self, physical: np.ndarray) -> np.ndarray:
        """``(N, T, 3)`` physical samples with their draws' label-error rows; float64."""
        x = np.asarray(physical, dtype=np.float64)
        if x.ndim != 3 or x.shape[2] != len(PARAMETERS):
            raise CalibrationError(f"LabelNoise.add_all: samples must be (N, T, 3), got {x.shape}")
        rows = self.rows(x)
        return np.stack([self.add(x[:, :, j], j, rows) for j in range(x.shape[2])], axis=2)

    def noised_scaled(self, samples_scaled: np.ndarray, scaler) -> np.ndarray:
        """``(N, T, 3)`` scaled samples convolved with the label errors, back in the scaled space.

        ``scaler`` is the model's :class:`~gampen_ml.data.transforms.LabelScaler`: the errors
        are physical, so the samples go out (``inverse``), get their errors (:meth:`add_all`)
        and come back (``transform``); float32.
        """
        with np.errstate(over="ignore"):  # exp of far-out B/T logits: 0 or 1, as meant
            return scaler.transform(self.add_all(scaler.inverse(samples_scaled)))

    def physical(
        self, scaler, index: int, context_scaled: np.ndarray
    ) -> Callable[[np.ndarray], np.ndarray]:
        """``to_physical`` of :func:`search_physical_recalibration`: inverse-scale, add errors.

        The search varies one parameter (``index``); the error rows are those of the joint
        draws, that parameter's candidate values with the other two from
        ``context_scaled`` (``(N, T, 3)`` scaled samples, e.g. after the mean shift).
        """
        with np.errstate(over="ignore"):
            context = scaler.inverse(np.asarray(context_scaled, dtype=np.float32))

        def to_physical(x: np.ndarray) -> np.ndarray:
            with np.errstate(over="ignore"):  # exp of far-out B/T logits: 0 or 1, as meant
                value = scaler.inverse_parameter(x, index)
            joint = context.copy()
            joint[:, :, index] = value
            return self.add(value, index, self.rows(joint))

        return to_physical


# --- the platform's calibration: every dropout rate on the validation split (paper §5) ---


@dataclass
class CalibrationResult:
    """Outcome of :func:`choose_dropout_rate`.

    Attributes
    ----------
    chosen_rate : float
        The dropout rate chosen (closest to nominal, or the sharpest within tolerance).
    coverage : pl.DataFrame
        Coverage table (``docs/catalog.md``): every rate raw, then every rate recalibrated
        when recalibrations were fit.
    recalibration : Recalibration or None
        The chosen rate's recalibration fit on validation (``profile.calibration.recalibrate``).
    n_galaxies : int
        Validation galaxies.
    """

    chosen_rate: float
    coverage: pl.DataFrame
    recalibration: Recalibration | None
    n_galaxies: int


def validation_samples(
    profile: Profile,
    model,
    scaler: LabelScaler,
    images,
    meta: pl.DataFrame,
    truths: pl.DataFrame,
    *,
    dropout_rate: float,
    seed: int,
    dataset: str,
    device: str | None = None,
) -> tuple[pl.DataFrame, np.ndarray]:
    """One model's MC-dropout catalog of validation galaxies and its samples, in memory.

    ``profile.inference.n_passes_calibration`` passes of ``draws_per_pass`` draws each
    (:func:`gampen_ml.catalog.catalog_from_images`, seeded by ``seed``); the samples are
    kept as the float16 values ``samples.npy`` would hold. Both calibrations call it: every
    dropout rate of :func:`choose_dropout_rate` and a fine-tuned model on its labelled
    ``val`` split (:func:`gampen_ml.finetune.calibrate_on_split`).

    Parameters
    ----------
    model, scaler
        The network (:func:`gampen_ml.train.load_trained_model`) and its label scaler.
    images : (N, S, S) sliceable
        Validation images.
    meta, truths : pl.DataFrame
        ``N`` rows: ``galaxy_id`` (+ catalog meta columns) and the true labels.

    Returns
    -------
    (catalog, samples)
        The catalog with truths, and ``(N, T, 3)`` float32 samples in the scaled label space.
    """
    from gampen_ml.catalog import catalog_from_images

    inference = profile.inference
    n_samples = inference.n_passes_calibration * inference.draws_per_pass
    buffer = np.empty((len(images), n_samples, len(PARAMETERS)), dtype=np.float16)
    catalog = catalog_from_images(
        model,
        scaler,
        images,
        meta,
        n_passes=inference.n_passes_calibration,
        draws_per_pass=inference.draws_per_pass,
        seed=seed,
        samples_out=buffer,
        truths=truths,
        dataset=dataset,
        dropout_rate=dropout_rate,
        galaxies_per_batch=inference.galaxies_per_batch,
        flags=profile.flags,
        device=device,
    )
    return catalog, np.asarray(buffer, dtype=np.float32)


def choose_dropout_rate(
    profile: Profile,
    model_dirs: Mapping[float, Path],
    images,
    meta: pl.DataFrame,
    truths: pl.DataFrame,
    *,
    device: str | None = None,
    log: Callable[[str], None] = lambda line: None,
) -> CalibrationResult:
    """Coverage of every dropout model on validation galaxies; recalibrate; choose (paper §5).

    Per rate: MC-dropout samples of the validation ``images`` (seeded per rate,
    :func:`validation_samples`), their raw coverage (:func:`coverage_table`), then with ``profile.calibration.recalibrate`` its
    recalibration (:func:`recalibrate_on_validation`) on the same samples, kept in memory
    as the float16 values ``samples.npy`` would hold. The choice
    (:func:`select_dropout_rate`) is the sharpest rate within the coverage tolerance:
    coverage alone would prefer a model that never converged but whose wide posteriors
    cover the truth.

    Parameters
    ----------
    model_dirs : mapping rate -> Path
        ``trained_model`` folder of each candidate rate.
    images : (N, S, S) sliceable
        Validation images (e.g. :class:`gampen_ml.data.datasets.SplitImages`).
    meta, truths : pl.DataFrame
        ``N`` rows: ``galaxy_id`` (+ ``psf_id``) and the true labels.
    """
    from gampen_ml.train import load_trained_model

    levels = profile.calibration.levels
    raw_tables, recalibrated_tables = [], []
    recalibrations: dict[float, Recalibration | None] = {}
    sharpness: dict[float, float] = {}
    for rate, model_dir in model_dirs.items():
        model, scaler, _ = load_trained_model(model_dir, device)
        catalog, samples = validation_samples(
            profile,
            model,
            scaler,
            images,
            meta,
            truths,
            dropout_rate=rate,
            seed=derive_seed(profile.seed, CALIBRATED_DROPOUT_RATE, dropout_key(rate)),
            dataset="sim-val",
            device=device,
        )
        table = coverage_table(catalog, None, levels, dropout_rate=rate, split="val")
        raw_tables.append(table)
        log(
            f"dropout {rate:g}: val coverage "
            + ", ".join(
                f"{r['parameter']}@{r['level']:.4f}={r['coverage']:.3f}"
                for r in table.iter_rows(named=True)
            )
        )
        recalibrations[rate] = None
        if profile.calibration.recalibrate:
            recalibration, recalibrated = recalibrate_on_validation(
                samples, scaler, truths, table, levels, rate, log,
                spread_drivers=profile.calibration.spread_drivers,
                second_spread_drivers=profile.calibration.second_spread_drivers,
                second_shift_drivers=profile.calibration.second_shift_drivers,
            )  # fmt: skip
            recalibrations[rate] = recalibration
            recalibrated_tables.append(recalibrated)
            samples = recalibration.apply(samples)
        # Sharpness: mean posterior standard deviation in the standardized label space.
        sharpness[rate] = float(samples.std(axis=1).mean())
    tables = raw_tables + recalibrated_tables
    chosen = select_dropout_rate(
        tables,
        recalibrated=profile.calibration.recalibrate,
        sharpness=sharpness,
        tolerance=profile.calibration.coverage_tolerance,
    )
    log(
        "mean posterior std (scaled units): "
        + ", ".join(f"dropout {r:g}: {v:.3f}" for r, v in sharpness.items())
        + f"; chosen dropout {chosen:g}"
    )
    recalibration = recalibrations[chosen]
    if recalibration is not None:
        log(f"recalibration scales {recalibration.scale}, exponents {recalibration.exponent}")
    return CalibrationResult(chosen, pl.concat(tables), recalibration, len(images))


def recalibrate_on_validation(
    samples: np.ndarray,
    scaler: LabelScaler,
    truths: pl.DataFrame,
    raw: pl.DataFrame,
    levels: Sequence[float],
    rate: float,
    log: Callable[[str], None],
    spread_drivers: Sequence[str] | None = None,
    label_noise: LabelNoise | None = None,
    second_spread_drivers: Sequence[str] | None = None,
    second_shift_drivers: Sequence[str] | None = None,
) -> tuple[Recalibration, pl.DataFrame]:
    """Fit one model's recalibration on validation; return it and the coverage it gives.

    First the mean shift (:func:`gampen_ml.calibrate.fit_mean_shift`: the validation bias
    as a function of the predicted mean), with ``second_shift_drivers`` a second one over the
    predicted mean of the named parameter, fit on what the first leaves; with
    ``spread_drivers`` (parameter names, one per parameter) a relative width profile over the
    predicted mean of the named parameter (:func:`gampen_ml.calibrate.fit_spread_profile`),
    with ``second_spread_drivers`` a second one fit on what the first leaves; then, per
    parameter, the exact scaled-space fit of tail exponent, spread factor and error floor
    (:func:`gampen_ml.calibrate.fit_recalibration`, judged also on the 68.27 % coverage in
    bins of true size and magnitude, :func:`gampen_ml.calibrate.calibration_groups`) is the
    starting candidate of a search on
    the *physical* coverage at ``levels``
    (:func:`gampen_ml.calibrate.search_physical_recalibration`): the catalog reports
    physical HPD intervals, which are not the image of the scaled ones (B/T: point masses
    at exactly 0 and 1; Re, flux: the Jacobian of the log). ``error_before`` /
    ``error_after`` are the mean ``|coverage - level|`` over ``levels`` of the physical
    validation coverage, raw and recalibrated.

    With ``label_noise`` (``truths`` are a labeller's labels whose errors were measured,
    :class:`gampen_ml.calibrate.LabelNoise`), every step compares the labels to the
    posterior convolved with the label errors (the mean shift with each galaxy's median
    convolved sample as its centre), and the error floor is searched with the
    physical fit (:func:`gampen_ml.calibrate.search_physical_with_floors`); the
    recalibration returned applies to the plain posterior, and the coverage returned is that
    of the labels by the convolved recalibrated posterior (an estimate of the truth's
    coverage). ``raw`` should then be measured the same way.
    """
    truths_scaled = scaler.transform(truths.select(PARAMETERS).to_numpy().astype(np.float64))

    def compared(x: np.ndarray) -> np.ndarray:
        """What is compared to the labels: the samples, convolved with any label noise."""
        return x if label_noise is None else label_noise.noised_scaled(x, scaler)

    if label_noise is None:
        shifts = [
            fit_mean_shift(samples[:, :, j], truths_scaled[:, j]) for j in range(len(PARAMETERS))
        ]
    else:
        # Each galaxy's centre is the median of its convolved samples, as a (N, 1) "sample":
        # B/T errors clipped at 0 and 1 become far-out logits that would drag a mean.
        noised = compared(samples)
        shifts = [
            fit_mean_shift(
                np.median(noised[:, :, j], axis=1, keepdims=True),
                truths_scaled[:, j],
                driver=samples[:, :, j].mean(axis=1),
            )
            for j in range(len(PARAMETERS))
        ]
    knots, values = tuple(k for k, _ in shifts), tuple(v for _, v in shifts)
    shifted = shift_means(samples, knots, values)
    second_shift = (((), (), ()), ((), (), ()), (2, 2, 2))
    if second_shift_drivers:
        drivers = tuple(PARAMETERS.index(p) for p in second_shift_drivers)
        means = shifted.mean(axis=1)
        centres = compared(shifted)
        if label_noise is not None:
            centres = np.median(centres, axis=1, keepdims=True)
        fits = [
            fit_mean_shift(centres[:, :, j], truths_scaled[:, j], driver=means[:, drivers[j]])
            for j in range(len(PARAMETERS))
        ]
        second_shift = (tuple(k for k, _ in fits), tuple(v for _, v in fits), drivers)
        shifted = shift_means(shifted, *second_shift)
    profiles = {}
    for stage, names in (("first", spread_drivers), ("second", second_spread_drivers)):
        drivers = tuple(PARAMETERS.index(p) for p in names or PARAMETERS)
        if not names:
            profiles[stage] = (((), (), ()), ((), (), ()), drivers)
            continue
        means = shifted.mean(axis=1)
        noised = compared(shifted)
        fits = [
            fit_spread_profile(noised[:, :, j], truths_scaled[:, j], driver=means[:, drivers[j]])
            for j in range(len(PARAMETERS))
        ]
        profiles[stage] = (tuple(k for k, _ in fits), tuple(v for _, v in fits), drivers)
        shifted = stretch_by_mean(shifted, *profiles[stage])
    groups = calibration_groups(truths)
    scaled_fit = fit_recalibration(
        shifted, truths_scaled, RECALIBRATION_LEVELS, floors=FLOOR_GRID, groups=groups
    )
    scale, exponent, floor = [], [], []
    for j, p in enumerate(PARAMETERS):
        if label_noise is None:
            g, k, _ = search_physical_recalibration(
                shifted[:, :, j],
                truths[p].to_numpy(),
                functools.partial(scaler.inverse_parameter, index=j),
                levels,
                candidates=[(scaled_fit.exponent[j], scaled_fit.scale[j])],
                floor=scaled_fit.floor[j],
                groups=groups,
            )
            f = scaled_fit.floor[j]
        else:
            g, k, f, _ = search_physical_with_floors(
                shifted[:, :, j],
                truths[p].to_numpy(),
                label_noise.physical(scaler, j, shifted),
                levels,
                candidates=[(scaled_fit.exponent[j], scaled_fit.scale[j])],
                floors=FLOOR_GRID,
                groups=groups,
            )
        exponent.append(g)
        scale.append(k)
        floor.append(f)
        log(
            f"dropout {rate:g}: {p} mean shift up to {max(map(abs, values[j])):.3f}, "
            f"scaled-space fit (exponent {scaled_fit.exponent[j]:g}, scale "
            f"{scaled_fit.scale[j]:.3f}, floor {scaled_fit.floor[j]:g}) -> physical search"
            f"{' with label noise' if label_noise is not None else ''}: "
            f"exponent {g:g}, scale {k:.3f}, floor {f:g}"
        )
    recalibration = Recalibration(
        scale=tuple(scale),
        exponent=tuple(exponent),
        floor=tuple(floor),
        shift_knots=knots,
        shift_values=values,
        **_profile_fields(
            {
                "second_shift": second_shift,
                "spread": profiles["first"],
                "second_spread": profiles["second"],
            }
        ),  # fmt: skip
        error_before=tuple(_coverage_error(raw, p) for p in PARAMETERS),
        levels=tuple(float(v) for v in levels),
    )
    physical = scaler.inverse(recalibration.apply(samples))
    if label_noise is not None:
        physical = label_noise.add_all(physical)
    recalibrated = coverage_table(
        summarize(physical), truths, levels, dropout_rate=rate, split="val", recalibrated=True
    )
    recalibration = dataclasses.replace(
        recalibration,
        error_after=tuple(_coverage_error(recalibrated, p) for p in PARAMETERS),
    )
    return recalibration, recalibrated


def _coverage_error(table: pl.DataFrame, parameter: str) -> float:
    """Mean ``|coverage - level|`` of one parameter in a coverage table."""
    rows = table.filter(pl.col("parameter") == parameter)
    return float((rows["coverage"] - rows["level"]).abs().mean())
