"""Posterior statistics of Monte-Carlo samples, vectorized over galaxies.

Every function takes the samples of many galaxies at once, ``(N, T)`` for one
parameter or ``(N, T, P)`` for several, and never loops over galaxies or samples:

- :func:`kde_mode` — the mode of a Gaussian kernel density estimate with Scott's
  bandwidth (what the paper and the original code report as the predicted value),
  computed by linear binning onto a fine grid and an FFT convolution per galaxy;
  it agrees with the argmax of :class:`scipy.stats.gaussian_kde`.
- :func:`hpd_interval` / :func:`hpd_intervals` — true highest-posterior-density
  intervals from the sorted samples: the shortest interval holding
  ``ceil(level * T)`` samples. Point masses (B/T piled at exactly 0 or 1) are handled
  naturally: a pile larger than the level gives a zero-width interval at the pile.
- :func:`summarize` — the catalog columns of ``docs/catalog.md``.
- :func:`coverage`, :func:`expected_coverage_curve`, :func:`binned_coverage` and
  :func:`tarp_coverage` (joint 3-D coverage with the TARP test of Lemos et al. 2023).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import polars as pl

from gampen_ml.config import CREDIBLE_LEVELS, PARAMETERS
from gampen_ml.metrics import covered, in_interval, level_tag  # noqa: F401 (re-exported)

#: Default credible levels of the expected-coverage curve.
CURVE_LEVELS: np.ndarray = np.linspace(0.01, 0.99, 99)
#: Grid points of the binned KDE used for the mode.
DEFAULT_KDE_GRID = 1024


class PosteriorError(ValueError):
    """Samples or truths of the wrong shape or content; the message names the argument."""


def _as_2d(samples: np.ndarray, name: str = "samples") -> np.ndarray:
    samples = np.asarray(samples)
    if samples.ndim != 2 or samples.shape[1] < 2:
        raise PosteriorError(f"{name} must have shape (N, T) with T >= 2, got {samples.shape}")
    return samples


def n_in_interval(level: float, n_samples: int) -> int:
    """Number of sorted samples an HPD interval at ``level`` must contain: ``ceil(level*T)``."""
    if not 0.0 < level <= 1.0:
        raise PosteriorError(f"credible level must lie in (0, 1], got {level!r}")
    # The small tolerance keeps e.g. 0.7 * 1000 = 700.0000000000001 at 700.
    return int(min(n_samples, max(1, math.ceil(level * n_samples - 1e-9))))


def _shortest_window(
    sorted_samples: np.ndarray, k: int, start: np.ndarray | None = None, span: int = 0
) -> np.ndarray:
    """First index of each galaxy's shortest window of ``k`` sorted samples.

    With ``start``, the window must lie inside samples ``[start, start + span)`` of its row
    (the span is the same for every row, so the candidates form a regular array).
    """
    if start is None:
        n_samples = sorted_samples.shape[1]
        return np.argmin(sorted_samples[:, k - 1 :] - sorted_samples[:, : n_samples - k + 1], 1)
    rows = np.arange(len(start))[:, None]
    first = start[:, None] + np.arange(span - k + 1)
    widths = sorted_samples[rows, first + k - 1] - sorted_samples[rows, first]
    return first[rows[:, 0], np.argmin(widths, axis=1)]


def _hpd_from_sorted(sorted_samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    k = n_in_interval(level, sorted_samples.shape[1])
    first = _shortest_window(sorted_samples, k)
    rows = np.arange(sorted_samples.shape[0])
    return sorted_samples[rows, first], sorted_samples[rows, first + k - 1]


def hpd_interval(samples: np.ndarray, level: float) -> tuple[np.ndarray, np.ndarray]:
    """Highest-posterior-density interval of each galaxy's samples.

    The HPD interval at ``level`` is the shortest interval containing
    ``ceil(level * T)`` of the ``T`` samples (it converges to the shortest interval of
    probability ``level``, which for a unimodal density is the HPD region).

    Parameters
    ----------
    samples : (N, T) array_like
        Posterior samples of one parameter for ``N`` galaxies.
    level : float
        Credible level in (0, 1], e.g. 0.6827.

    Returns
    -------
    lo, hi : (N,) ndarray
        Interval bounds, in the units of ``samples``.
    """
    return _hpd_from_sorted(np.sort(_as_2d(samples), axis=1), level)


def hpd_intervals(
    samples: np.ndarray, levels: Sequence[float] = CREDIBLE_LEVELS
) -> tuple[np.ndarray, np.ndarray]:
    """Nested HPD intervals at several levels, sorting each galaxy's samples once.

    The widest level is the plain shortest interval (:func:`hpd_interval`); each narrower
    level is the shortest interval of its mass *inside* the next wider one. For a unimodal
    posterior that is the plain HPD interval again; for a two-humped one (a B/T posterior
    piled at both ends of [0, 1]) the plain shortest intervals of different levels can sit
    on different humps, and nesting keeps "68 % inside 95 % inside 99.73 %" true.

    Parameters
    ----------
    samples : (N, T) array_like
    levels : sequence of float, length L

    Returns
    -------
    lo, hi : (L, N) ndarray
    """
    return _nested_hpd_from_sorted(np.sort(_as_2d(samples), axis=1), levels)


def _nested_hpd_from_sorted(
    sorted_samples: np.ndarray, levels: Sequence[float]
) -> tuple[np.ndarray, np.ndarray]:
    n_gal, n_samples = sorted_samples.shape
    rows = np.arange(n_gal)
    lo = np.empty((len(levels), n_gal), dtype=sorted_samples.dtype)
    hi = np.empty_like(lo)
    # Widest level first; each narrower window is searched inside the previous one.
    start, span = None, n_samples
    for i in np.argsort(levels, kind="stable")[::-1]:
        k = min(n_in_interval(levels[i], n_samples), span)
        start = _shortest_window(sorted_samples, k, start, span)
        lo[i], hi[i] = sorted_samples[rows, start], sorted_samples[rows, start + k - 1]
        span = k
    return lo, hi


def scott_bandwidth(samples: np.ndarray) -> np.ndarray:
    """Scott's-rule kernel width per galaxy, as :class:`scipy.stats.gaussian_kde` uses in 1-D.

    ``sigma_kernel = std(samples, ddof=1) * T**(-1/5)``; shape ``(N,)``.
    """
    samples = _as_2d(samples)
    return np.std(samples, axis=1, ddof=1) * samples.shape[1] ** (-0.2)


def kde_mode(samples: np.ndarray, n_grid: int = DEFAULT_KDE_GRID) -> np.ndarray:
    """Mode of the Gaussian KDE (Scott's bandwidth) of each galaxy's samples.

    Each galaxy's samples are linearly binned onto ``n_grid`` points spanning
    ``[min - 4h, max + 4h]`` (``h`` the kernel width), convolved with the Gaussian kernel
    in Fourier space (the kernel's transform is analytic, so every galaxy gets its own
    kernel in one vectorized product), and the argmax is refined by a parabola through
    its neighbours. The result matches the argmax of ``scipy.stats.gaussian_kde`` to a
    small fraction of the grid step (see the tests and ``benchmarks/bench_posterior.py``).

    Parameters
    ----------
    samples : (N, T) array_like
        Posterior samples of one parameter.
    n_grid : int
        Grid points per galaxy.

    Returns
    -------
    (N,) float64 ndarray
        The mode; galaxies whose samples are all equal get that value.
    """
    x = _as_2d(samples).astype(np.float64, copy=False)
    n_gal, n_samples = x.shape
    bandwidth = scott_bandwidth(x)
    lo = x.min(axis=1) - 4.0 * bandwidth
    hi = x.max(axis=1) + 4.0 * bandwidth
    degenerate = ~(hi > lo)
    span = np.where(degenerate, 1.0, hi - lo)
    step = span / (n_grid - 1)

    # Linear binning: each sample splits its weight between its two grid neighbours.
    position = (x - lo[:, None]) / step[:, None]
    left = np.clip(np.floor(position).astype(np.int64), 0, n_grid - 2)
    frac = np.clip(position - left, 0.0, 1.0)
    offsets = (np.arange(n_gal, dtype=np.int64) * n_grid)[:, None]
    size = n_gal * n_grid
    counts = np.bincount((left + offsets).ravel(), weights=(1.0 - frac).ravel(), minlength=size)
    counts += np.bincount((left + 1 + offsets).ravel(), weights=frac.ravel(), minlength=size)
    counts = counts.reshape(n_gal, n_grid)

    # Zero-padded FFT convolution with a Gaussian of width h/step grid cells.
    n_fft = 2 * n_grid
    freq = np.fft.rfftfreq(n_fft)
    sigma_cells = np.where(degenerate, 1.0, bandwidth / step)
    transfer = np.exp(-2.0 * (np.pi * freq[None, :] * sigma_cells[:, None]) ** 2)
    density = np.fft.irfft(np.fft.rfft(counts, n=n_fft, axis=1) * transfer, n=n_fft, axis=1)
    density = density[:, :n_grid]

    peak = np.clip(np.argmax(density, axis=1), 1, n_grid - 2)
    rows = np.arange(n_gal)
    y_left, y_mid, y_right = density[rows, peak - 1], density[rows, peak], density[rows, peak + 1]
    curvature = y_left - 2.0 * y_mid + y_right
    with np.errstate(divide="ignore", invalid="ignore"):
        shift = np.where(curvature < 0, 0.5 * (y_left - y_right) / curvature, 0.0)
    shift = np.clip(shift, -0.5, 0.5)
    mode = lo + (peak + shift) * step
    return np.where(degenerate, x[:, 0], mode)


def summarize(
    samples: np.ndarray,
    parameters: Sequence[str] = PARAMETERS,
    levels: Sequence[float] = CREDIBLE_LEVELS,
    n_grid: int = DEFAULT_KDE_GRID,
) -> pl.DataFrame:
    """Per-galaxy posterior summary with the catalog column names.

    Parameters
    ----------
    samples : (N, T, P) array_like
        Posterior samples in physical units (B/T, Re in arcsec, flux in nJy), ``P``
        parameters in the order of ``parameters``.
    parameters : sequence of str
        Parameter names (default ``("bt", "re_arcsec", "flux_nJy")``).
    levels : sequence of float
        Credible levels; each must have a catalog tag (:func:`level_tag`).
    n_grid : int
        KDE grid points for the mode.

    Returns
    -------
    pl.DataFrame
        ``N`` rows; for each parameter ``p``: ``{p}_mode``, ``{p}_mean``, ``{p}_median``,
        ``{p}_std`` (ddof=1) and ``{p}_{tag}_lo`` / ``{p}_{tag}_hi`` (float64; the HPD
        intervals of :func:`hpd_intervals`, nested across levels).
    """
    samples = np.asarray(samples)
    if samples.ndim != 3 or samples.shape[2] != len(parameters):
        raise PosteriorError(
            f"samples must have shape (N, T, {len(parameters)}) for {tuple(parameters)}, "
            f"got {samples.shape}"
        )
    if not np.all(np.isfinite(samples)):
        raise PosteriorError("samples contain NaN or inf")
    columns: dict[str, np.ndarray] = {}
    for j, name in enumerate(parameters):
        x = samples[:, :, j].astype(np.float64)
        sorted_x = np.sort(x, axis=1)
        columns[f"{name}_mode"] = kde_mode(x, n_grid=n_grid)
        columns[f"{name}_mean"] = x.mean(axis=1)
        columns[f"{name}_median"] = np.median(sorted_x, axis=1)
        columns[f"{name}_std"] = x.std(axis=1, ddof=1)
        lo, hi = _nested_hpd_from_sorted(sorted_x, levels)
        for i, level in enumerate(levels):
            tag = level_tag(level)
            columns[f"{name}_{tag}_lo"] = lo[i]
            columns[f"{name}_{tag}_hi"] = hi[i]
    return pl.DataFrame(columns)


def coverage(lo: np.ndarray, hi: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """Fraction of galaxies whose true value lies in ``[lo, hi]`` (bounds inclusive).

    Parameters
    ----------
    lo, hi, truth : (N,) or (N, P) array_like

    Returns
    -------
    float ndarray, shape ``()`` or ``(P,)``
    """
    lo, hi, truth = np.asarray(lo), np.asarray(hi), np.asarray(truth)
    if not lo.shape == hi.shape == truth.shape:
        raise PosteriorError(
            f"lo, hi and truth must have equal shapes, got {lo.shape}, {hi.shape}, {truth.shape}"
        )
    return np.mean(in_interval(lo, truth, hi), axis=0)


def expected_coverage_curve(
    samples: np.ndarray,
    truth: np.ndarray,
    levels: Sequence[float] | np.ndarray = CURVE_LEVELS,
) -> np.ndarray:
    """HPD coverage at every credible level (the expected-coverage curve).

    Parameters
    ----------
    samples : (N, T) or (N, T, P) array_like
    truth : (N,) or (N, P) array_like
    levels : (L,) sequence of float

    Returns
    -------
    (L,) or (L, P) float ndarray
        Fraction of galaxies whose truth lies inside the HPD interval at each level.
        Calibrated posteriors give ``coverage ≈ levels``; over-dispersed ones lie above.
    """
    samples, truth = np.asarray(samples), np.asarray(truth)
    single = samples.ndim == 2
    if single:
        samples, truth = samples[:, :, None], truth[:, None]
    if samples.ndim != 3 or truth.shape != (samples.shape[0], samples.shape[2]):
        raise PosteriorError(
            f"samples (N, T, P) and truth (N, P) disagree: {samples.shape} vs {truth.shape}"
        )
    out = np.empty((len(levels), samples.shape[2]))
    for j in range(samples.shape[2]):
        sorted_x = np.sort(samples[:, :, j], axis=1)
        for i, level in enumerate(levels):
            lo, hi = _hpd_from_sorted(sorted_x, float(level))
            out[i, j] = coverage(lo, hi, truth[:, j])
    return out[:, 0] if single else out


def binned_coverage(
    catalog: pl.DataFrame,
    by: str,
    edges: Sequence[float] | np.ndarray,
    parameters: Sequence[str] = PARAMETERS,
    levels: Sequence[float] = CREDIBLE_LEVELS,
) -> pl.DataFrame:
    """HPD coverage in bins of a catalog column (e.g. ``magnitude_mode``, ``re_arcsec_true``).

    Parameters
    ----------
    catalog : pl.DataFrame
        Needs ``by``, ``{p}_true`` and ``{p}_{tag}_lo/hi`` for every parameter and level.
    by : str
        Column to bin on.
    edges : (B+1,) sequence of float
        Bin edges; rows outside ``[edges[0], edges[-1])`` are dropped.

    Returns
    -------
    pl.DataFrame
        Columns ``bin_lo``, ``bin_hi``, ``n``, ``parameter``, ``level``, ``coverage``; one
        row per non-empty bin, parameter and level.
    """
    edges = np.asarray(edges, dtype=np.float64)
    needed = [by] + [f"{p}_true" for p in parameters]
    missing = [c for c in needed if c not in catalog.columns]
    if missing:
        raise PosteriorError(f"catalog lacks column(s) {missing} needed for binned coverage")
    values = catalog[by].to_numpy().astype(np.float64)
    index = np.searchsorted(edges, values, side="right") - 1
    inside = (index >= 0) & (index < len(edges) - 1)
    frames = []
    for p in parameters:
        for level in levels:
            hit = covered(catalog, p, level)
            n = np.bincount(index[inside], minlength=len(edges) - 1)
            k = np.bincount(index[inside], weights=hit[inside], minlength=len(edges) - 1)
            keep = n > 0
            frames.append(
                pl.DataFrame(
                    {
                        "bin_lo": edges[:-1][keep],
                        "bin_hi": edges[1:][keep],
                        "n": n[keep].astype(np.int64),
                        "parameter": [p] * int(keep.sum()),
                        "level": np.full(int(keep.sum()), level),
                        "coverage": k[keep] / n[keep],
                    }
                )
            )
    return pl.concat(frames)


def tarp_coverage(
    samples: np.ndarray,
    truth: np.ndarray,
    *,
    seed: int,
    num_alpha_bins: int | None = None,
) -> tuple[np.ndarray, np.ndarray, float]:
    """Joint coverage of the multi-dimensional posterior with TARP (Lemos et al. 2023).

    Uses the ``tarp`` package. Samples and truths are normalised to the truths' range;
    reference points are drawn uniformly in the unit cube from ``seed`` (so the result
    is reproducible and the global NumPy RNG is not relied on).

    Parameters
    ----------
    samples : (N, T, P) array_like
    truth : (N, P) array_like
    seed : int
    num_alpha_bins : int, optional
        Credibility bins (default ``max(2, N // 10)``; tarp's own ``N // 10`` is 0 below 10).

    Returns
    -------
    ecp : (B+1,) ndarray
        Expected coverage probability at each credibility value.
    alpha : (B+1,) ndarray
        Credibility values.
    atc_error : float
        Mean ``|ecp - alpha|``: 0 for a calibrated posterior.
    """
    import tarp

    samples = np.asarray(samples, dtype=np.float64)
    truth = np.asarray(truth, dtype=np.float64)
    if samples.ndim != 3 or truth.shape != (samples.shape[0], samples.shape[2]):
        raise PosteriorError(
            f"samples (N, T, P) and truth (N, P) disagree: {samples.shape} vs {truth.shape}"
        )
    low = truth.min(axis=0)
    scale = truth.max(axis=0) - low + 1e-10
    theta = (truth - low) / scale
    draws = ((samples - low) / scale).transpose(1, 0, 2)  # tarp wants (T, N, P)
    rng = np.random.default_rng(seed)
    references = rng.uniform(size=theta.shape)
    state = np.random.get_state()  # noqa: NPY002  tarp reseeds the global RNG; leave it as it was
    try:
        ecp, alpha = tarp.get_tarp_coverage(
            draws,
            theta,
            references=references,
            # tarp's default (N // 10 bins) is zero below 10 galaxies.
            num_alpha_bins=num_alpha_bins or max(2, theta.shape[0] // 10),
            norm=False,
        )
    finally:
        np.random.set_state(state)  # noqa: NPY002
    return np.asarray(ecp), np.asarray(alpha), float(np.mean(np.abs(ecp - alpha)))


def tarp_null_errors(
    samples: np.ndarray, *, seed: int, n_replicates: int = 10, num_alpha_bins: int | None = None
) -> np.ndarray:
    """TARP errors of posteriors that are calibrated by construction, at the same N and shapes.

    Each replicate takes one of every galaxy's own samples as its truth (so the truths follow
    the posteriors exactly) and computes :func:`tarp_coverage`'s error. The spread of these
    errors is what a perfectly calibrated model would show at this N: compare the measured
    error with it, not with 0.

    Parameters
    ----------
    samples : (N, T, P) array_like
    seed : int
    n_replicates : int
    num_alpha_bins : int, optional
        As in :func:`tarp_coverage`.

    Returns
    -------
    (n_replicates,) float64
    """
    samples = np.asarray(samples, dtype=np.float64)
    rng = np.random.default_rng(seed)
    n, t = samples.shape[:2]
    errors = []
    for r in range(n_replicates):
        pick = rng.integers(0, t, size=n)
        truth = samples[np.arange(n), pick]
        errors.append(
            tarp_coverage(samples, truth, seed=seed + r + 1, num_alpha_bins=num_alpha_bins)[2]
        )
    return np.asarray(errors)
