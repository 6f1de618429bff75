"""Dropout-rate calibration and post-hoc spread recalibration (paper §5).

- :func:`coverage_table` — HPD coverage per parameter and credible level for one model
  on one split (the calibration table of ``docs/catalog.md``).
- :func:`select_dropout_rate` — the rate whose coverage is closest to nominal, i.e. the
  smallest mean ``|coverage - level|`` over parameters and levels (paper §5, Fig. 8).
- :func:`fit_recalibration` — a per-parameter spread factor ``k_p`` that stretches each
  galaxy's samples about their mean in the network's scaled space, fit on the validation
  split only. Scaling about the mean maps each HPD interval ``[lo, hi]`` exactly to
  ``[m + k (lo - m), m + k (hi - m)]`` (the sorted order and the shortest window are
  unchanged), so the coverage of every level is known in closed form for every ``k`` and
  the fit is an exact 1-D search, not a noisy optimisation.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl

from gampen_ml.config import CREDIBLE_LEVELS, PARAMETERS
from gampen_ml.posterior import PosteriorError, hpd_intervals, level_tag

#: Levels the recalibration is fit over: the three catalog levels plus a fine grid.
RECALIBRATION_LEVELS: tuple[float, ...] = tuple(
    sorted({*CREDIBLE_LEVELS, *np.round(np.linspace(0.05, 0.95, 19), 4).tolist()})
)
#: Candidate spread factors (log-spaced) for the recalibration search.
SCALE_GRID = np.exp(np.linspace(np.log(0.05), np.log(20.0), 4001))

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
            rows.append((p, float(level), float(np.mean((lo <= truth) & (truth <= hi)))))
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
    """Per-parameter spread factors applied about each galaxy's mean in scaled space.

    Attributes
    ----------
    scale : tuple of 3 float
        ``k_p`` for ``bt``, ``re_arcsec``, ``flux_nJy`` (``> 1`` widens).
    error_before, error_after : tuple of 3 float
        Mean ``|coverage - level|`` over the fit levels on the fitting split.
    levels : tuple of float
        Levels the fit used.
    """

    scale: tuple[float, float, float]
    error_before: tuple[float, float, float] = (float("nan"),) * 3
    error_after: tuple[float, float, float] = (float("nan"),) * 3
    levels: tuple[float, ...] = RECALIBRATION_LEVELS

    def apply(self, samples_scaled: np.ndarray) -> np.ndarray:
        """Stretch ``(N, T, 3)`` scaled samples about each galaxy's mean; float32 out."""
        samples_scaled = np.asarray(samples_scaled, dtype=np.float32)
        if samples_scaled.ndim != 3 or samples_scaled.shape[2] != 3:
            raise CalibrationError(
                f"Recalibration.apply: samples must be (N, T, 3), got {samples_scaled.shape}"
            )
        mean = samples_scaled.mean(axis=1, keepdims=True)
        k = np.asarray(self.scale, dtype=np.float32)
        return mean + k * (samples_scaled - mean)

    def to_dict(self) -> dict:
        """JSON-serializable description."""
        return {
            "parameters": list(PARAMETERS),
            "scale": list(self.scale),
            "error_before": list(self.error_before),
            "error_after": list(self.error_after),
            "levels": list(self.levels),
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
        return cls(
            scale=scale,
            error_before=tuple(float(v) for v in data.get("error_before", [float("nan")] * 3)),
            error_after=tuple(float(v) for v in data.get("error_after", [float("nan")] * 3)),
            levels=tuple(float(v) for v in data.get("levels", RECALIBRATION_LEVELS)),
        )


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


def _coverage_vs_scale(samples: np.ndarray, truth: np.ndarray, levels, grid) -> np.ndarray:
    """Coverage ``(L, K)`` of one parameter at every level and spread factor in ``grid``."""
    lo, hi = hpd_intervals(samples, levels)
    mean = samples.mean(axis=1)
    out = np.empty((len(levels), len(grid)))
    for i in range(len(levels)):
        k_min, k_max = _admissible_scales(lo[i], hi[i], mean, truth)
        inside = np.searchsorted(np.sort(k_min), grid, side="right")
        beyond = np.searchsorted(np.sort(k_max), grid, side="left")
        out[i] = (inside - beyond) / len(truth)
    return out


def fit_recalibration(
    samples_scaled: np.ndarray,
    truths_scaled: np.ndarray,
    levels: Sequence[float] = RECALIBRATION_LEVELS,
) -> Recalibration:
    """Fit per-parameter spread factors on the validation split (never on test).

    For each parameter the factor ``k`` minimises the mean ``|coverage(k) - level|`` of the
    HPD intervals over ``levels``, searched exactly over a fine log grid of ``k`` in
    [0.05, 20] (see the module docstring).

    Parameters
    ----------
    samples_scaled : (N, T, 3) array_like
        MC-dropout samples in the network's scaled space.
    truths_scaled : (N, 3) array_like
        True labels mapped with the same :class:`LabelScaler`.
    levels : sequence of float
        Credible levels the coverage error is averaged over.

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
    levels_arr = np.asarray(levels, dtype=np.float64)
    grid = np.concatenate([SCALE_GRID, [1.0]])
    scale, before, after = [], [], []
    for j in range(samples_scaled.shape[2]):
        try:
            cov = _coverage_vs_scale(samples_scaled[:, :, j], truths_scaled[:, j], levels, grid)
        except PosteriorError as exc:
            raise CalibrationError(f"fit_recalibration: parameter {PARAMETERS[j]}: {exc}") from exc
        error = np.mean(np.abs(cov - levels_arr[:, None]), axis=0)
        best = int(np.argmin(error[:-1]))
        scale.append(float(grid[best]))
        before.append(float(error[-1]))
        after.append(float(error[best]))
    return Recalibration(
        scale=tuple(scale),
        error_before=tuple(before),
        error_after=tuple(after),
        levels=tuple(float(v) for v in levels),
    )
