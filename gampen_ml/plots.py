"""Diagnostic figures of GaMPEN catalogs (Ghosh et al. 2022, Figures 4-5 and 8-20).

Every figure function takes polars DataFrames (the posterior catalog of
``docs/catalog.md``, the flags table, the calibration coverage table) or NumPy arrays
and returns a :class:`matplotlib.figure.Figure`. Figures are built without pyplot (no
global figure registry, no GUI backend: rendering goes through Agg), in one vectorized
pass: hexbins, ``np.histogram`` and binned percentiles through a polars ``group_by``,
never a Python loop over galaxies, so 1e5 galaxies take seconds.

A figure that needs a column the input lacks (or whose truth column is all null, as in
a real-data catalog) raises :class:`ValueError` naming the column.

The point prediction is the posterior mode and a residual is ``mode - true``
(paper §6.2); the "uncertainty" of a parameter is the width of its 68.27 % HPD
interval, fractional (divided by the mode) for Re and flux (paper §6.3).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
from cycler import cycler
from matplotlib import rc_context
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from scipy import stats

from gampen_ml.config import CREDIBLE_LEVELS, PARAMETERS, FlagConfig
from gampen_ml.flags import FLAG_COLUMNS, bt_point_estimate, compute_flags
from gampen_ml.io import atomic_file

#: Resolution of every saved PNG; a figure of ``w x h`` inches is ``w*DPI x h*DPI`` px.
DPI = 120
#: Okabe & Ito (2008) colour-blind-safe palette.
OKABE_ITO = {
    "black": "#000000",
    "orange": "#E69F00",
    "sky_blue": "#56B4E9",
    "green": "#009E73",
    "yellow": "#F0E442",
    "blue": "#0072B2",
    "vermillion": "#D55E00",
    "purple": "#CC79A7",
}
#: Perceptually uniform, colour-blind-safe map for counts.
CMAP = "viridis"
#: House style, applied while a figure is built.
STYLE = {
    "font.size": 10,
    "axes.labelsize": 10,
    "axes.titlesize": 10,
    "xtick.labelsize": 8.5,
    "ytick.labelsize": 8.5,
    "legend.fontsize": 8,
    "legend.frameon": False,
    "axes.prop_cycle": cycler(
        color=[
            OKABE_ITO[k] for k in ("blue", "vermillion", "green", "orange", "purple", "sky_blue")
        ]
    ),
    "axes.grid": False,
    "image.cmap": CMAP,
    "figure.constrained_layout.use": True,
}

#: Axis labels with units.
PARAM_LABELS = {"bt": r"$L_B/L_T$", "re_arcsec": r"$R_e$ [arcsec]", "flux_nJy": r"$F$ [nJy]"}
#: Short symbols for residual / uncertainty labels.
PARAM_SYMBOLS = {"bt": r"L_B/L_T", "re_arcsec": r"R_e", "flux_nJy": r"F"}
#: Units appended to residual labels (fractional quantities are dimensionless).
PARAM_UNITS = {"bt": "", "re_arcsec": " [arcsec]", "flux_nJy": " [nJy]"}
#: Parameters drawn on logarithmic axes (flux spans 1e3 ... 5e6 nJy).
LOG_PARAMS = frozenset({"flux_nJy"})
#: Catalog column tag of each credible level (``{p}_hpd68_lo`` ...).
LEVEL_TAGS = dict(zip(CREDIBLE_LEVELS, ("68", "95", "99"), strict=True))
#: Colours for the 68 / 95 / 99 % HPD shading (paper Fig. 10 uses three shades).
LEVEL_COLOURS = {"68": OKABE_ITO["purple"], "95": OKABE_ITO["yellow"], "99": OKABE_ITO["green"]}


# --------------------------------------------------------------------------- helpers


def _require(df: pl.DataFrame, columns: Sequence[str], figure: str, *, non_null: bool = False):
    """Raise ValueError naming the first column of ``columns`` missing from ``df``."""
    for col in columns:
        if col not in df.columns:
            raise ValueError(f"{figure}: input has no column {col!r} (columns: {df.columns})")
        if non_null and df[col].null_count() == df.height:
            raise ValueError(f"{figure}: column {col!r} is all null (needs simulation truths)")
    if df.height == 0:
        raise ValueError(f"{figure}: input table has no rows")


def _col(df: pl.DataFrame, col: str) -> np.ndarray:
    """Column as float64 NumPy array with nulls as NaN."""
    return df[col].cast(pl.Float64).fill_null(np.nan).to_numpy()


def has_truths(catalog: pl.DataFrame) -> bool:
    """True when every ``{p}_true`` column exists and holds at least one value."""
    return all(
        f"{p}_true" in catalog.columns and catalog[f"{p}_true"].null_count() < catalog.height
        for p in PARAMETERS
    )


def _new_figure(width_in: float, height_in: float, layout: str = "constrained") -> Figure:
    # Built under the house style; Figure() needs no pyplot and renders through Agg.
    with rc_context(STYLE):
        return Figure(figsize=(width_in, height_in), layout=layout)


def _subplots(fig: Figure, nrows: int, ncols: int, **kw) -> np.ndarray:
    with rc_context(STYLE):
        return np.atleast_2d(fig.subplots(nrows, ncols, squeeze=False, **kw))


def _hexbin(ax, x: np.ndarray, y: np.ndarray, *, xlog: bool = False, ylog: bool = False):
    """Log-count hexbin of finite (and, on log axes, positive) points."""
    ok = np.isfinite(x) & np.isfinite(y)
    if xlog:
        ok &= x > 0
    if ylog:
        ok &= y > 0
    if not ok.any():
        ax.text(0.5, 0.5, "no finite data", ha="center", va="center", transform=ax.transAxes)
        return None
    return ax.hexbin(
        x[ok],
        y[ok],
        gridsize=40,
        norm=LogNorm(),
        mincnt=1,
        cmap=CMAP,
        xscale="log" if xlog else "linear",
        yscale="log" if ylog else "linear",
        linewidths=0.0,
    )


def _edges(x: np.ndarray, n_bins: int, log: bool) -> np.ndarray:
    finite = x[np.isfinite(x) & ((x > 0) if log else True)]
    if finite.size == 0:
        return np.array([0.0, 1.0])
    lo, hi = float(finite.min()), float(finite.max())
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0) * 1e-6
    return np.geomspace(lo, hi, n_bins + 1) if log else np.linspace(lo, hi, n_bins + 1)


def binned_percentiles(
    x: np.ndarray,
    y: np.ndarray,
    edges: np.ndarray,
    quantiles: Sequence[float] = (0.16, 0.5, 0.84),
    min_count: int = 5,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Running percentiles of ``y`` in bins of ``x`` (one polars ``group_by``, no loop).

    Parameters
    ----------
    x, y : (N,) float
        Abscissa and values; non-finite pairs are ignored.
    edges : (B+1,) float
        Increasing bin edges of ``x``.
    quantiles : sequence of float
        Quantiles of ``y`` per bin.
    min_count : int
        Bins with fewer points are dropped.

    Returns
    -------
    centres : (K,) float
        Bin centres (geometric when all edges are positive and log-spaced).
    q : (K, len(quantiles)) float
        The quantiles of ``y`` in each kept bin.
    count : (K,) int
        Points per kept bin.
    """
    idx = np.digitize(x, edges) - 1
    idx[x == edges[-1]] = len(edges) - 2  # right edge belongs to the last bin
    ok = (idx >= 0) & (idx < len(edges) - 1) & np.isfinite(y) & np.isfinite(x)
    table = (
        pl.DataFrame({"b": idx[ok].astype(np.int64), "y": y[ok].astype(np.float64)})
        .group_by("b")
        .agg(
            [pl.col("y").quantile(q, "linear").alias(f"q{i}") for i, q in enumerate(quantiles)]
            + [pl.len().alias("n")]
        )
        .filter(pl.col("n") >= min_count)
        .sort("b")
    )
    b = table["b"].to_numpy()
    lo, hi = edges[b], edges[b + 1]
    log_spaced = (
        edges[0] > 0 and len(edges) > 2 and not np.allclose(np.diff(edges), edges[1] - edges[0])
    )
    centres = np.sqrt(lo * hi) if log_spaced else 0.5 * (lo + hi)
    q = (
        np.column_stack([table[f"q{i}"].to_numpy() for i in range(len(quantiles))])
        if len(b)
        else np.empty((0, len(quantiles)))
    )
    return centres, q, table["n"].to_numpy()


def _running_median(ax, x: np.ndarray, y: np.ndarray, *, xlog: bool = False, n_bins: int = 20):
    """Overlay the binned median and 16-84 % band of ``y`` versus ``x``."""
    centres, q, _ = binned_percentiles(x, y, _edges(x, n_bins, xlog))
    if len(centres) == 0:
        return
    ax.fill_between(centres, q[:, 0], q[:, 2], color=OKABE_ITO["orange"], alpha=0.25, lw=0)
    ax.plot(centres, q[:, 1], color=OKABE_ITO["vermillion"], lw=1.5, label="median")
    ax.plot(centres, q[:, 0], color=OKABE_ITO["vermillion"], lw=0.8, ls="--", label="16-84 %")
    ax.plot(centres, q[:, 2], color=OKABE_ITO["vermillion"], lw=0.8, ls="--")


def _shared_colourbar(fig: Figure, axes, hexbins: list, label: str = "galaxies per bin") -> None:
    """One log colour scale and colourbar for all hexbin panels of a figure.

    The panels show the same galaxies, so a common scale is comparable across them and
    one colourbar halves the axes the layout engine has to place.
    """
    hexbins = [h for h in hexbins if h is not None]
    if not hexbins:
        return
    vmax = max(float(np.max(h.get_array())) for h in hexbins)
    norm = LogNorm(vmin=1.0, vmax=max(vmax, 2.0))
    for h in hexbins:
        h.set_norm(norm)
    fig.colorbar(hexbins[0], ax=list(np.ravel(axes)), label=label, shrink=0.9)


def _stats_box(ax, values: np.ndarray, *, loc=(0.03, 0.96)) -> None:
    v = values[np.isfinite(values)]
    text = (
        rf"$\mu$ = {v.mean():.3g}"
        "\n"
        rf"$\tilde\mu$ = {np.median(v):.3g}"
        "\n"
        rf"$\sigma$ = {v.std():.3g}"
        if v.size
        else "no data"
    )
    ax.text(*loc, text, transform=ax.transAxes, va="top", ha="left", fontsize=8)


def _hist_bins(values: np.ndarray, n: int = 60, log: bool = False) -> np.ndarray:
    return _edges(values, n, log)


def residuals(
    catalog: pl.DataFrame, param: str, *, fractional: bool = False, estimate: str = "mode"
) -> np.ndarray:
    """Residual ``{estimate} - true`` of one parameter (the posterior mode by default, or
    ``mean`` / ``median``), optionally divided by the truth.

    Returns
    -------
    (N,) float64
        NaN where the truth is null (or zero, for fractional residuals).
    """
    true = _col(catalog, f"{param}_true")
    res = _col(catalog, f"{param}_{estimate}") - true
    if fractional:
        with np.errstate(divide="ignore", invalid="ignore"):
            res = np.where(true != 0, res / true, np.nan)
    return res


def hpd_width(
    catalog: pl.DataFrame, param: str, level: str = "68", *, fractional: bool = False
) -> np.ndarray:
    """Width of the HPD interval ``{param}_hpd{level}``, optionally divided by the mode."""
    width = _col(catalog, f"{param}_hpd{level}_hi") - _col(catalog, f"{param}_hpd{level}_lo")
    if fractional:
        mode = _col(catalog, f"{param}_mode")
        with np.errstate(divide="ignore", invalid="ignore"):
            width = np.where(mode > 0, width / mode, np.nan)
    return width


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
        Keys ``bulge_dominated``, ``disk_dominated``, ``small``, ``unreliable``.
    """
    if flags is None:
        flags = compute_flags(catalog, flag_config or FlagConfig())
    _require(flags, ("galaxy_id", *FLAG_COLUMNS), "flags")
    _require(catalog, ("galaxy_id",), "catalog")
    joined = catalog.select("galaxy_id").join(
        flags.select("galaxy_id", *FLAG_COLUMNS), on="galaxy_id", how="left", maintain_order="left"
    )
    return {c: joined[c].fill_null(False).to_numpy().astype(bool) for c in FLAG_COLUMNS}


def _mode_true_columns(*params: str) -> list[str]:
    return [c for p in params for c in (f"{p}_mode", f"{p}_true")]


# --------------------------------------------------------------------------- figures


def coverage_vs_dropout(
    coverage_table: pl.DataFrame,
    *,
    chosen_dropout: float | None = None,
    split: str | None = None,
) -> Figure:
    """Coverage probability versus dropout rate (paper Fig. 8).

    Parameters
    ----------
    coverage_table : pl.DataFrame
        Columns ``dropout_rate``, ``split``, ``parameter``, ``level``, ``coverage``,
        ``recalibrated``; ``level`` and ``coverage`` as fractions (0-1) or percent.
    chosen_dropout : float, optional
        Rate to mark with a vertical line (the champion).
    split : str, optional
        Split to plot; default ``val`` when present (the rate is chosen on validation),
        else the first split in the table.

    Returns
    -------
    Figure
        One row per parameter plus a bottom row averaged over parameters; solid lines for
        raw MC-dropout coverage, dashed for recalibrated; dotted horizontal lines at the
        nominal levels.
    """
    name = "coverage_vs_dropout"
    cols = ("dropout_rate", "split", "parameter", "level", "coverage", "recalibrated")
    _require(coverage_table, cols, name)
    splits = coverage_table["split"].unique().sort().to_list()
    split = split or ("val" if "val" in splits else splits[0])
    if split not in splits:
        raise ValueError(f"{name}: split {split!r} not in coverage table splits {splits}")
    table = coverage_table.filter(pl.col("split") == split).with_columns(
        pl.col("level").cast(pl.Float64), pl.col("coverage").cast(pl.Float64)
    )
    to_pct = 100.0 if table["level"].max() <= 1.0 else 1.0
    params = [p for p in table["parameter"].unique().sort().to_list() if p != "mean"]
    params = [p for p in PARAMETERS if p in params] + [p for p in params if p not in PARAMETERS]
    mean = (
        table.filter(pl.col("parameter").is_in(params))
        .group_by("dropout_rate", "level", "recalibrated")
        .agg(pl.col("coverage").mean())
        .with_columns(pl.lit("mean").alias("parameter"))
    )
    table = pl.concat([table.select(mean.columns), mean], how="vertical_relaxed")
    rows = [*params, "mean"]
    rates = np.sort(table["dropout_rate"].unique().to_numpy())
    positive = rates[rates > 0]
    fig = _new_figure(6.5, 1.9 * len(rows))
    axes = _subplots(fig, len(rows), 1, sharex=True)[:, 0]
    levels = np.sort(table["level"].unique().to_numpy())
    colours = [OKABE_ITO[c] for c in ("blue", "vermillion", "green", "orange", "purple")]
    for ax, param in zip(axes, rows, strict=True):
        sub = table.filter(pl.col("parameter") == param).sort("dropout_rate")
        for colour, level in zip(colours, levels, strict=False):
            ax.axhline(level * to_pct, color=colour, ls=":", lw=0.8)
            for recal, style in ((False, "-"), (True, "--")):
                s = sub.filter((pl.col("level") == level) & (pl.col("recalibrated") == recal))
                if s.height:
                    ax.plot(
                        s["dropout_rate"].to_numpy(),
                        s["coverage"].to_numpy() * to_pct,
                        style,
                        marker="o",
                        ms=3,
                        color=colour,
                        mfc=colour if not recal else "none",
                        label=f"{level * to_pct:.2f} %" + (" recal." if recal else ""),
                    )
        if chosen_dropout is not None:
            ax.axvline(chosen_dropout, color=OKABE_ITO["black"], lw=1.0, ls="-.", label="chosen")
        title = "mean of parameters" if param == "mean" else PARAM_LABELS.get(param, param)
        ax.set_ylabel("coverage [%]")
        ax.set_title(title, loc="left")
    if positive.size:
        # symlog keeps a dropout rate of exactly 0 on the axis.
        axes[-1].set_xscale("symlog", linthresh=float(positive.min()))
    axes[-1].set_xlabel(f"dropout rate ({split} split)")
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, ncol=4, loc="outside upper center")
    return fig


def stn_examples(
    images: np.ndarray, stn_outputs: np.ndarray, scales: np.ndarray, *, n_show: int = 5
) -> Figure:
    """STN inputs and crops for the lowest and highest zoom scales ``s`` (paper Figs 4-5).

    Parameters
    ----------
    images : (N, S, S) float
        Input cutouts (any units; arsinh-stretched for display).
    stn_outputs : (N, P, P) float
        STN outputs for the same galaxies.
    scales : (N,) float
        The STN zoom scale ``s`` (small = aggressive crop).
    n_show : int
        Galaxies shown at each end of the ``s`` distribution.

    Returns
    -------
    Figure
        Four rows: inputs and outputs of the ``n_show`` lowest ``s``, then of the highest.
    """
    images, stn_outputs, scales = np.asarray(images), np.asarray(stn_outputs), np.asarray(scales)
    if images.ndim != 3 or stn_outputs.ndim != 3 or scales.ndim != 1:
        raise ValueError(
            f"stn_examples: expected images (N,S,S), stn_outputs (N,P,P), scales (N,); got "
            f"{images.shape}, {stn_outputs.shape}, {scales.shape}"
        )
    if not len(images) == len(stn_outputs) == len(scales) or len(scales) == 0:
        raise ValueError(
            f"stn_examples: images, stn_outputs and scales must have the same non-zero length, got "
            f"{len(images)}, {len(stn_outputs)}, {len(scales)}"
        )
    k = min(n_show, len(scales))
    order = np.argsort(scales, kind="stable")
    groups = {"lowest s": order[:k], "highest s": order[::-1][:k]}
    fig = _new_figure(1.5 * k, 6.4)
    axes = _subplots(fig, 4, k)
    stretched_in, stretched_out = _arsinh(images), _arsinh(stn_outputs)
    for g, (label, idx) in enumerate(groups.items()):
        for j, i in enumerate(idx):
            a_in, a_out = axes[2 * g, j], axes[2 * g + 1, j]
            a_in.imshow(stretched_in[i], origin="lower", cmap="gray")
            a_out.imshow(stretched_out[i], origin="lower", cmap="gray")
            a_in.set_title(f"s = {scales[i]:.3f}", fontsize=8)
        axes[2 * g, 0].set_ylabel(f"{label}\ninput")
        axes[2 * g + 1, 0].set_ylabel(f"{label}\nSTN output")
    for ax in axes.ravel():
        ax.set_xticks([])
        ax.set_yticks([])
    return fig


def posterior_corner(samples: np.ndarray, truth: Sequence[float] | None = None) -> Figure:
    """Joint and marginal posterior of one galaxy (paper Fig. 9), drawn with ``corner``.

    Parameters
    ----------
    samples : (T, 3) float
        Posterior samples of (B/T, Re [arcsec], flux [nJy]).
    truth : sequence of 3 float, optional
        True values, drawn as dotted vermillion lines.
    """
    import corner  # a plotting-only dependency; imported where used

    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim != 2 or samples.shape[1] != 3:
        raise ValueError(f"posterior_corner: samples must be (T, 3), got {samples.shape}")
    finite = np.isfinite(samples).all(axis=1)
    samples = samples[finite]
    if len(samples) < 2:
        raise ValueError(f"posterior_corner: fewer than 2 finite samples ({len(samples)})")
    # Explicit ranges: a single-component galaxy's B/T posterior may sit exactly at 0 or 1,
    # which corner rejects as "no dynamic range".
    lo, hi = samples.min(axis=0), samples.max(axis=0)
    pad = np.where(hi > lo, 0.0, np.maximum(1e-3, 1e-3 * np.abs(lo)))
    ranges = [(float(a), float(b)) for a, b in zip(lo - pad, hi + pad, strict=True)]
    fig = _new_figure(6.0, 6.0, layout="none")  # corner arranges its own grid
    _subplots(fig, 3, 3)
    truths = None if truth is None else [float(t) if t is not None else None for t in truth]
    with rc_context(STYLE):
        corner.corner(
            samples,
            fig=fig,
            labels=[PARAM_LABELS[p] for p in PARAMETERS],
            truths=truths,
            range=ranges,
            truth_color=OKABE_ITO["vermillion"],
            color=OKABE_ITO["blue"],
            quantiles=[0.16, 0.5, 0.84],
            show_titles=True,
            title_fmt=".3g",
            bins=30,
            smooth=1.0,
            max_n_ticks=4,
        )
    for ax in fig.axes:
        for line in ax.lines:
            if line.get_color() == OKABE_ITO["vermillion"]:
                line.set_linestyle(":")
    return fig


def example_posteriors(
    samples: np.ndarray, rows: pl.DataFrame, images: np.ndarray | None = None
) -> Figure:
    """Marginal posteriors of a few galaxies (paper Fig. 10).

    Parameters
    ----------
    samples : (k, T, 3) float
        Posterior samples of (B/T, Re [arcsec], flux [nJy]) for ``k`` galaxies.
    rows : pl.DataFrame
        The ``k`` matching catalog rows (``{p}_mode`` and HPD bounds; ``{p}_true`` drawn when
        present and non-null).
    images : (k, S, S) float, optional
        Cutouts shown in a first column.

    Returns
    -------
    Figure
        Per galaxy and parameter: histogram, Gaussian KDE, HPD 68/95/99 % shading, mode
        (vermillion) and truth (black dashed).
    """
    name = "example_posteriors"
    samples = np.asarray(samples, dtype=np.float64)
    if samples.ndim != 3 or samples.shape[2] != 3 or samples.shape[0] != rows.height:
        raise ValueError(
            f"{name}: samples must be (k, T, 3) with k = rows.height = {rows.height}, got {samples.shape}"
        )
    hpd_cols = [
        f"{p}_hpd{t}_{s}" for p in PARAMETERS for t in LEVEL_TAGS.values() for s in ("lo", "hi")
    ]
    _require(rows, [f"{p}_mode" for p in PARAMETERS] + hpd_cols, name)
    k = rows.height
    with_img = images is not None
    ncols = 3 + int(with_img)
    fig = _new_figure(2.6 * ncols, 1.9 * k + 0.3)
    axes = _subplots(fig, k, ncols)
    for i in range(k):  # one panel row per shown galaxy (k is a handful)
        if with_img:
            axes[i, 0].imshow(_arsinh(np.asarray(images[i])[None])[0], origin="lower", cmap="gray")
            axes[i, 0].set_xticks([])
            axes[i, 0].set_yticks([])
        for j, p in enumerate(PARAMETERS):
            ax = axes[i, j + int(with_img)]
            s = samples[i, :, j]
            s = s[np.isfinite(s)]
            log = p in LOG_PARAMS and (s > 0).all()
            x = np.log10(s) if log else s
            ax.hist(x, bins=40, density=True, color=OKABE_ITO["sky_blue"], alpha=0.6)
            if np.ptp(x) > 0:
                grid = np.linspace(x.min(), x.max(), 200)
                ax.plot(grid, stats.gaussian_kde(x)(grid), color=OKABE_ITO["blue"], lw=1.2)
            tf = np.log10 if log else (lambda v: v)
            for tag in ("99", "95", "68"):
                lo, hi = rows[i, f"{p}_hpd{tag}_lo"], rows[i, f"{p}_hpd{tag}_hi"]
                if lo is not None and hi is not None:
                    ax.axvspan(
                        tf(lo),
                        tf(hi),
                        color=LEVEL_COLOURS[tag],
                        alpha=0.25,
                        lw=0,
                        label=f"{tag} % HPD",
                    )
            ax.axvline(
                tf(rows[i, f"{p}_mode"]), color=OKABE_ITO["vermillion"], lw=1.3, label="mode"
            )
            true_col = f"{p}_true"
            if true_col in rows.columns and rows[i, true_col] is not None:
                ax.axvline(
                    tf(rows[i, true_col]), color=OKABE_ITO["black"], ls="--", lw=1.2, label="true"
                )
            ax.set_yticks([])
            if i == k - 1:
                ax.set_xlabel(r"$\log_{10}$ " + PARAM_LABELS[p] if log else PARAM_LABELS[p])
    axes[0, -1].legend(loc="upper right", fontsize=7)
    return fig


def predicted_vs_true(catalog: pl.DataFrame) -> Figure:
    """Posterior mode versus truth, log-count hexbins with the y = x line (paper Fig. 11)."""
    _require(catalog, _mode_true_columns(*PARAMETERS), "predicted_vs_true", non_null=True)
    fig = _new_figure(12.0, 3.6)
    axes = _subplots(fig, 1, 3)[0]
    hexbins = []
    for ax, p in zip(axes, PARAMETERS, strict=True):
        true, mode = _col(catalog, f"{p}_true"), _col(catalog, f"{p}_mode")
        log = p in LOG_PARAMS
        hexbins.append(_hexbin(ax, true, mode, xlog=log, ylog=log))
        finite = np.concatenate([true[np.isfinite(true)], mode[np.isfinite(mode)]])
        if log:
            finite = finite[finite > 0]
        if finite.size:
            lims = (finite.min(), finite.max())
            ax.plot(lims, lims, "k--", lw=1.0)
        ax.set_xlabel("true " + PARAM_LABELS[p])
        ax.set_ylabel("predicted (mode) " + PARAM_LABELS[p])
    _shared_colourbar(fig, axes, hexbins)
    return fig


def residual_histograms(catalog: pl.DataFrame) -> Figure:
    """Histograms of ``mode - true`` with mean, median and sigma (paper Fig. 12)."""
    _require(catalog, _mode_true_columns(*PARAMETERS), "residual_histograms", non_null=True)
    fig = _new_figure(12.0, 3.3)
    axes = _subplots(fig, 1, 3)[0]
    for ax, p in zip(axes, PARAMETERS, strict=True):
        r = residuals(catalog, p)
        r = r[np.isfinite(r)]
        lim = np.percentile(np.abs(r), 99.5) if r.size else 1.0
        ax.hist(r, bins=np.linspace(-lim, lim, 61), color=OKABE_ITO["blue"], alpha=0.8)
        ax.axvline(0.0, color="k", ls="--", lw=1.0)
        ax.set_xlabel(rf"$\Delta {PARAM_SYMBOLS[p]}$ (mode $-$ true){PARAM_UNITS[p]}")
        ax.set_ylabel("galaxies")
        _stats_box(ax, r)
    return fig


def _residual_grid(catalog: pl.DataFrame, x_kind: str, name: str) -> Figure:
    _require(catalog, _mode_true_columns(*PARAMETERS), name, non_null=True)
    fig = _new_figure(12.5, 9.5)
    axes = _subplots(fig, 3, 3)
    hexbins = []
    for i, p in enumerate(PARAMETERS):
        r = residuals(catalog, p)
        for j, q in enumerate(PARAMETERS):
            ax = axes[i, j]
            x = _col(catalog, f"{q}_{x_kind}")
            log = q in LOG_PARAMS
            hexbins.append(_hexbin(ax, x, r, xlog=log))
            _running_median(ax, x, r, xlog=log)
            ax.axhline(0.0, color="k", ls=":", lw=1.0)
            ax.set_xlabel(("true " if x_kind == "true" else "predicted ") + PARAM_LABELS[q])
            ax.set_ylabel(rf"$\Delta {PARAM_SYMBOLS[p]}${PARAM_UNITS[p]}")
    axes[0, 0].legend(loc="lower left")
    _shared_colourbar(fig, axes, hexbins)
    return fig


def residuals_vs_true(catalog: pl.DataFrame) -> Figure:
    """Residual of each parameter versus each true parameter, with binned median and
    16-84 % band (paper Fig. 13). Rows: residual of B/T, Re, flux; columns: truth."""
    return _residual_grid(catalog, "true", "residuals_vs_true")


def residuals_vs_predicted(catalog: pl.DataFrame) -> Figure:
    """As :func:`residuals_vs_true` against the predicted modes (paper Fig. 14)."""
    return _residual_grid(catalog, "mode", "residuals_vs_predicted")


def _component(catalog: pl.DataFrame) -> np.ndarray:
    """``component_true`` when present, else single-component where true B/T is 0 or 1."""
    if (
        "component_true" in catalog.columns
        and catalog["component_true"].null_count() < catalog.height
    ):
        return catalog["component_true"].fill_null("").to_numpy().astype(str)
    bt = _col(catalog, "bt_true")
    return np.where((bt == 0.0) | (bt == 1.0), "single", "bulge+disk")


def bt_residuals_by_type(catalog: pl.DataFrame, flag_config: FlagConfig | None = None) -> Figure:
    """B/T residuals of single- and two-component galaxies (paper Fig. 15).

    Three histograms (log counts): single-component, all two-component, and two-component
    with disk-max < true B/T < bulge-min (0.1 and 0.85 by default); sigma in the legend.
    """
    _require(catalog, _mode_true_columns("bt"), "bt_residuals_by_type", non_null=True)
    cfg = flag_config or FlagConfig()
    r, bt = residuals(catalog, "bt"), _col(catalog, "bt_true")
    double = _component(catalog) == "bulge+disk"
    mid = double & (bt > cfg.disk_dominated_max_bt) & (bt < cfg.bulge_dominated_min_bt)
    groups = {
        "single component": ~double,
        "two components": double,
        f"two comp., {cfg.disk_dominated_max_bt:g} < $L_B/L_T$ < {cfg.bulge_dominated_min_bt:g}": mid,
    }
    fig = _new_figure(6.5, 4.0)
    ax = _subplots(fig, 1, 1)[0, 0]
    finite = r[np.isfinite(r)]
    lim = max(float(np.abs(finite).max()), 1e-3) if finite.size else 1.0
    bins = np.linspace(-lim, lim, 61)
    for (label, sel), colour in zip(groups.items(), ("green", "blue", "vermillion"), strict=True):
        v = r[sel & np.isfinite(r)]
        if v.size:
            ax.hist(
                v,
                bins=bins,
                histtype="step",
                lw=1.5,
                color=OKABE_ITO[colour],
                label=rf"{label}: $\sigma$ = {v.std():.3f} (n = {v.size})",
            )
    ax.axvline(0.0, color="k", ls="--", lw=1.0)
    ax.set_yscale("log")
    ax.set_xlabel(r"$\Delta L_B/L_T$ (mode $-$ true)")
    ax.set_ylabel("galaxies")
    ax.legend(loc="upper left")
    return fig


def fractional_residuals(catalog: pl.DataFrame) -> Figure:
    """``|mode - true| / true`` for Re and flux versus each true parameter (paper Fig. 16)."""
    _require(catalog, _mode_true_columns(*PARAMETERS), "fractional_residuals", non_null=True)
    fig = _new_figure(12.5, 6.5)
    axes = _subplots(fig, 2, 3)
    hexbins = []
    for i, p in enumerate(("re_arcsec", "flux_nJy")):
        fr = np.abs(residuals(catalog, p, fractional=True))
        for j, q in enumerate(PARAMETERS):
            ax = axes[i, j]
            x = _col(catalog, f"{q}_true")
            log = q in LOG_PARAMS
            hexbins.append(_hexbin(ax, x, fr, xlog=log, ylog=True))
            _running_median(ax, x, fr, xlog=log)
            ax.set_xlabel("true " + PARAM_LABELS[q])
            ax.set_ylabel(rf"$|\Delta {PARAM_SYMBOLS[p]}| / {PARAM_SYMBOLS[p]}^\mathrm{{true}}$")
    _shared_colourbar(fig, axes, hexbins)
    return fig


def _uncertainty(catalog: pl.DataFrame, p: str) -> np.ndarray:
    return hpd_width(catalog, p, fractional=p != "bt")


def _uncertainty_label(p: str) -> str:
    if p == "bt":
        return r"$\sigma_{68}(L_B/L_T)$"
    return rf"$\sigma_{{68}}({PARAM_SYMBOLS[p]}) / {PARAM_SYMBOLS[p]}$"


def _hpd68_columns() -> list[str]:
    return [f"{p}_hpd68_{s}" for p in PARAMETERS for s in ("lo", "hi")] + [
        f"{p}_mode" for p in PARAMETERS
    ]


def uncertainty_vs_parameters(catalog: pl.DataFrame) -> Figure:
    """68.27 % HPD width (fractional for Re, flux) versus each true parameter (paper Fig. 17).

    For a catalog without truths the x axes are the predicted modes.
    """
    name = "uncertainty_vs_parameters"
    _require(catalog, _hpd68_columns(), name)
    x_kind = "true" if has_truths(catalog) else "mode"
    fig = _new_figure(12.5, 9.5)
    axes = _subplots(fig, 3, 3)
    hexbins = []
    for i, p in enumerate(PARAMETERS):
        u = _uncertainty(catalog, p)
        for j, q in enumerate(PARAMETERS):
            ax = axes[i, j]
            x = _col(catalog, f"{q}_{x_kind}")
            log = q in LOG_PARAMS
            hexbins.append(_hexbin(ax, x, u, xlog=log, ylog=p != "bt"))
            _running_median(ax, x, u, xlog=log)
            ax.set_xlabel(("true " if x_kind == "true" else "predicted ") + PARAM_LABELS[q])
            ax.set_ylabel(_uncertainty_label(p))
    _shared_colourbar(fig, axes, hexbins)
    return fig


def uncertainty_vs_residuals(catalog: pl.DataFrame) -> Figure:
    """68.27 % HPD width versus residual, fractional for Re and flux (paper Fig. 18).

    Each panel gives Spearman's rank correlation of the width with ``|residual|``.
    """
    name = "uncertainty_vs_residuals"
    _require(catalog, _hpd68_columns(), name)
    _require(catalog, [f"{p}_true" for p in PARAMETERS], name, non_null=True)
    fig = _new_figure(12.0, 3.6)
    axes = _subplots(fig, 1, 3)[0]
    hexbins = []
    for ax, p in zip(axes, PARAMETERS, strict=True):
        r = residuals(catalog, p, fractional=p != "bt")
        u = _uncertainty(catalog, p)
        hexbins.append(_hexbin(ax, r, u, ylog=p != "bt"))
        ok = np.isfinite(r) & np.isfinite(u)
        if ok.sum() > 2:
            rho = stats.spearmanr(np.abs(r[ok]), u[ok]).statistic
            ax.text(
                0.03,
                0.96,
                rf"Spearman $\rho$(|res|, width) = {rho:.2f}",
                transform=ax.transAxes,
                va="top",
                fontsize=8,
            )
        ax.axvline(0.0, color="k", ls=":", lw=1.0)
        frac = "" if p == "bt" else rf" / {PARAM_SYMBOLS[p]}^\mathrm{{true}}"
        ax.set_xlabel(rf"$\Delta {PARAM_SYMBOLS[p]}{frac}$ (mode $-$ true)")
        ax.set_ylabel(_uncertainty_label(p))
    _shared_colourbar(fig, axes, hexbins)
    return fig


def flag_regions(
    catalog: pl.DataFrame, flags: pl.DataFrame | None = None, flag_config: FlagConfig | None = None
) -> Figure:
    """Residuals versus prediction with the flagged regions hatched (paper Fig. 19).

    Top row: B/T (regions B/T <= 0.10 and >= 0.85); bottom row: Re (region Re < 1").
    Right: residual histograms of all galaxies and of those not flagged, with sigma.
    """
    _require(catalog, _mode_true_columns("bt", "re_arcsec"), "flag_regions", non_null=True)
    cfg = flag_config or FlagConfig()
    f = flag_arrays(catalog, flags, cfg)
    fig = _new_figure(11.0, 7.0)
    axes = _subplots(fig, 2, 2, width_ratios=[1.4, 1.0])
    spec = {
        "bt": (
            [(0.0, cfg.disk_dominated_max_bt), (cfg.bulge_dominated_min_bt, 1.0)],
            f["bulge_dominated"] | f["disk_dominated"],
        ),
        "re_arcsec": ([(0.0, cfg.small_max_re_arcsec)], f["small"]),
    }
    hexbins = []
    for row, (p, (regions, flagged)) in enumerate(spec.items()):
        # The B/T labels read FlagConfig.bt_estimate (the paper's mode by default).
        estimate = bt_point_estimate(cfg) if p == "bt" else "mode"
        pred, r = _col(catalog, f"{p}_{estimate}"), residuals(catalog, p, estimate=estimate)
        ax = axes[row, 0]
        hexbins.append(_hexbin(ax, pred, r))
        for lo, hi in regions:
            ax.axvspan(lo, hi, facecolor="none", edgecolor="k", hatch="//", lw=0.8, ls="--")
        ax.axhline(0.0, color="k", ls=":", lw=1.0)
        ax.set_xlabel(f"predicted {PARAM_LABELS[p]} (posterior {estimate})")
        ax.set_ylabel(rf"$\Delta {PARAM_SYMBOLS[p]}${PARAM_UNITS[p]}")
        ax = axes[row, 1]
        ok = np.isfinite(r)
        lim = float(np.percentile(np.abs(r[ok]), 99.9)) if ok.any() else 1.0
        bins = np.linspace(-lim, lim, 61)
        for sel, label, colour in (
            (ok, "all", "blue"),
            (ok & ~flagged, "not flagged", "vermillion"),
        ):
            v = r[sel]
            if v.size:
                ax.hist(
                    v,
                    bins=bins,
                    histtype="step",
                    lw=1.5,
                    color=OKABE_ITO[colour],
                    label=rf"{label}: $\sigma$ = {v.std():.3f} (n = {v.size})",
                )
        ax.set_yscale("log")
        ax.set_xlabel(rf"$\Delta {PARAM_SYMBOLS[p]}${PARAM_UNITS[p]}")
        ax.set_ylabel("galaxies")
        ax.legend(loc="upper left")
    _shared_colourbar(fig, axes[:, 0], hexbins)
    return fig


def bt_confusion_counts(
    catalog: pl.DataFrame, flags: pl.DataFrame | None = None, flag_config: FlagConfig | None = None
) -> np.ndarray:
    """3 x 3 counts: true B/T class (rows) x assigned label (columns).

    Classes, in order: disk-dominated (B/T <= 0.10), intermediate, bulge-dominated
    (B/T >= 0.85), thresholds from ``flag_config``. Labels come from the flags table (or
    the modes); a galaxy flagged both ways (impossible with the default thresholds)
    counts as bulge-dominated.

    Returns
    -------
    (3, 3) int64
    """
    _require(catalog, ("bt_true",), "bt_confusion_counts", non_null=True)
    cfg = flag_config or FlagConfig()
    f = flag_arrays(catalog, flags, cfg)
    bt = _col(catalog, "bt_true")
    ok = np.isfinite(bt)
    true_cls = np.where(
        bt <= cfg.disk_dominated_max_bt, 0, np.where(bt >= cfg.bulge_dominated_min_bt, 2, 1)
    )
    pred_cls = np.where(f["bulge_dominated"], 2, np.where(f["disk_dominated"], 0, 1))
    return np.bincount(3 * true_cls[ok] + pred_cls[ok], minlength=9).reshape(3, 3).astype(np.int64)


def confusion_matrix(
    catalog: pl.DataFrame, flags: pl.DataFrame | None = None, flag_config: FlagConfig | None = None
) -> Figure:
    """Confusion matrix of the extreme-B/T labels against the true B/T class (paper Fig. 20)."""
    counts = bt_confusion_counts(catalog, flags, flag_config)
    names = ["disk-dominated", "intermediate", "bulge-dominated"]
    fig = _new_figure(5.5, 4.6)
    ax = _subplots(fig, 1, 1)[0, 0]
    im = ax.imshow(
        np.maximum(counts, 1), cmap=CMAP, norm=LogNorm(vmin=1, vmax=max(counts.max(), 2))
    )
    row_tot = counts.sum(axis=1, keepdims=True)
    frac = np.divide(counts, row_tot, out=np.zeros(counts.shape), where=row_tot > 0)
    for (i, j), n in np.ndenumerate(counts):
        colour = "k" if n >= 0.3 * max(counts.max(), 1) else "w"
        ax.text(
            j,
            i,
            f"{n}\n({100 * frac[i, j]:.1f} %)",
            ha="center",
            va="center",
            color=colour,
            fontsize=8,
        )
    ax.set_xticks(range(3), names, rotation=15)
    ax.set_yticks(range(3), names)
    ax.set_xlabel("assigned label (from predicted $L_B/L_T$)")
    ax.set_ylabel("true $L_B/L_T$ class")
    labelled = counts[:, [0, 2]].sum()
    correct = counts[0, 0] + counts[2, 2]
    acc = f"{100 * correct / labelled:.1f} %" if labelled else "n/a"
    ax.set_title(f"extreme-label precision: {acc} of {labelled}")
    fig.colorbar(im, ax=ax, label="galaxies")
    return fig


def posterior_width_distributions(catalog: pl.DataFrame) -> Figure:
    """Distributions of the 68.27 % HPD widths (fractional for Re and flux); for real data."""
    _require(catalog, _hpd68_columns(), "posterior_width_distributions")
    fig = _new_figure(12.0, 3.3)
    axes = _subplots(fig, 1, 3)[0]
    for ax, p in zip(axes, PARAMETERS, strict=True):
        u = _uncertainty(catalog, p)
        log = p != "bt"
        u = u[np.isfinite(u) & ((u > 0) if log else True)]
        if u.size:
            ax.hist(u, bins=_hist_bins(u, 50, log), color=OKABE_ITO["blue"], alpha=0.8)
            ax.axvline(
                np.median(u),
                color=OKABE_ITO["vermillion"],
                lw=1.2,
                label=f"median {np.median(u):.3g}",
            )
            ax.legend(loc="upper right")
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(_uncertainty_label(p))
        ax.set_ylabel("galaxies")
    return fig


def parameter_distributions(catalog: pl.DataFrame) -> Figure:
    """Histograms of the posterior modes (and of the truths when present)."""
    _require(catalog, [f"{p}_mode" for p in PARAMETERS], "parameter_distributions")
    fig = _new_figure(12.0, 3.3)
    axes = _subplots(fig, 1, 3)[0]
    for ax, p in zip(axes, PARAMETERS, strict=True):
        log = p in LOG_PARAMS
        mode = _col(catalog, f"{p}_mode")
        true = (
            _col(catalog, f"{p}_true")
            if f"{p}_true" in catalog.columns
            else np.full(catalog.height, np.nan)
        )
        both = np.concatenate([mode, true])
        bins = _hist_bins(both[np.isfinite(both)], 40, log)
        ax.hist(
            mode[np.isfinite(mode)], bins=bins, color=OKABE_ITO["blue"], alpha=0.7, label="mode"
        )
        if np.isfinite(true).any():
            ax.hist(
                true[np.isfinite(true)], bins=bins, histtype="step", color="k", lw=1.2, label="true"
            )
        if log:
            ax.set_xscale("log")
        ax.set_xlabel(PARAM_LABELS[p])
        ax.set_ylabel("galaxies")
        ax.legend(loc="upper right")
    return fig


def flag_fractions(flags: pl.DataFrame) -> Figure:
    """Bar chart of the fraction of galaxies carrying each qualitative flag."""
    _require(flags, FLAG_COLUMNS, "flag_fractions")
    frac = flags.select([pl.col(c).cast(pl.Float64).mean() for c in FLAG_COLUMNS]).row(0)
    fig = _new_figure(6.0, 3.5)
    ax = _subplots(fig, 1, 1)[0, 0]
    pct = [100.0 * (v or 0.0) for v in frac]
    bars = ax.bar([c.replace("_", "\n") for c in FLAG_COLUMNS], pct, color=OKABE_ITO["blue"])
    ax.bar_label(bars, labels=[f"{v:.1f} %" for v in pct], fontsize=8)
    ax.set_ylabel(f"galaxies flagged [%] (n = {flags.height})")
    ax.set_ylim(0, max(max(pct) * 1.15, 1.0))
    return fig


def _arsinh(images: np.ndarray) -> np.ndarray:
    """Per-image arsinh stretch scaled by a robust noise estimate: (N,S,S) -> (N,S,S)."""
    x = np.asarray(images, dtype=np.float64)
    med = np.median(x, axis=(1, 2), keepdims=True)
    mad = 1.4826 * np.median(np.abs(x - med), axis=(1, 2), keepdims=True)
    scale = np.where(
        mad > 0, mad, np.maximum(np.abs(x).max(axis=(1, 2), keepdims=True), 1e-30) * 1e-3
    )
    return np.arcsinh((x - med) / scale)


def thumbnail_grid(
    images: np.ndarray, titles: Sequence[str] | None = None, *, ncols: int | None = None
) -> Figure:
    """Arsinh-stretched thumbnails (simulated galaxies, PSFs, STN crops).

    Parameters
    ----------
    images : (N, S, S) float
        Images in any linear unit (e.g. nJy/px); each is stretched on its own noise level.
    titles : sequence of N str, optional
        Title above each thumbnail.
    ncols : int, optional
        Columns of the grid (default ceil(sqrt(N)), at most 8).
    """
    images = np.asarray(images)
    if images.ndim != 3 or len(images) == 0:
        raise ValueError(
            f"thumbnail_grid: images must be (N, S, S) with N >= 1, got {images.shape}"
        )
    if titles is not None and len(titles) != len(images):
        raise ValueError(f"thumbnail_grid: {len(titles)} titles for {len(images)} images")
    n = len(images)
    ncols = ncols or min(8, math.ceil(math.sqrt(n)))
    nrows = math.ceil(n / ncols)
    fig = _new_figure(1.6 * ncols, 1.7 * nrows)
    axes = _subplots(fig, nrows, ncols).ravel()
    stretched = _arsinh(images)
    lo = np.percentile(stretched, 1, axis=(1, 2))
    hi = np.percentile(stretched, 99.8, axis=(1, 2))
    for i, ax in enumerate(axes):
        ax.set_xticks([])
        ax.set_yticks([])
        if i >= n:
            ax.set_axis_off()
            continue
        ax.imshow(
            stretched[i], origin="lower", cmap="gray", vmin=lo[i], vmax=max(hi[i], lo[i] + 1e-9)
        )
        if titles is not None:
            ax.set_title(str(titles[i]), fontsize=7)
    return fig


def loss_curve(history: Sequence[dict]) -> Figure:
    """Loss per epoch from a training history (``history.json``).

    Parameters
    ----------
    history : sequence of dict
        One dict per epoch; every numeric key containing ``"loss"`` is drawn (e.g.
        ``train_loss``, ``val_loss``); ``epoch`` is the x axis when present.
    """
    if not history:
        raise ValueError("loss_curve: history is empty")
    keys = sorted(
        {k for h in history for k, v in h.items() if "loss" in k and isinstance(v, int | float)}
    )
    if not keys:
        raise ValueError(f"loss_curve: no '*loss*' column in history (keys: {sorted(history[0])})")
    epochs = np.array([h.get("epoch", i) for i, h in enumerate(history)], dtype=float)
    fig = _new_figure(5.5, 3.5)
    ax = _subplots(fig, 1, 1)[0, 0]
    for k in keys:
        y = np.array([h.get(k, np.nan) for h in history], dtype=float)
        ax.plot(epochs, y, marker="o", ms=3, label=k)
    ax.set_xlabel("epoch")
    ax.set_ylabel("Gaussian NLL loss (scaled labels)")
    ax.legend()
    return fig


def expected_coverage(
    levels: np.ndarray,
    coverage_by_parameter: np.ndarray,
    *,
    tarp_alpha: np.ndarray | None = None,
    tarp_ecp: np.ndarray | None = None,
) -> Figure:
    """Expected-coverage curve: HPD coverage at every credible level, per parameter.

    Parameters
    ----------
    levels : (L,) float
        Credible levels.
    coverage_by_parameter : (L, 3) float
        Coverage of each parameter (``gampen_ml.posterior.expected_coverage_curve``).
    tarp_alpha, tarp_ecp : (B,) float, optional
        TARP joint (3-D) expected coverage (``gampen_ml.posterior.tarp_coverage``).
    """
    fig = _new_figure(5.0, 4.6)
    ax = _subplots(fig, 1, 1)[0, 0]
    ax.plot([0, 1], [0, 1], color="0.5", ls=":", lw=1, label="calibrated")
    colours = (OKABE_ITO["blue"], OKABE_ITO["vermillion"], OKABE_ITO["green"])
    for j, (p, colour) in enumerate(zip(PARAMETERS, colours, strict=True)):
        ax.plot(levels, coverage_by_parameter[:, j], color=colour, lw=1.5, label=PARAM_LABELS[p])
    if tarp_alpha is not None and tarp_ecp is not None:
        ax.plot(tarp_alpha, tarp_ecp, color="black", lw=1.2, ls="--", label="TARP (joint 3-D)")
    ax.set_xlabel("credible level")
    ax.set_ylabel("fraction of galaxies covered")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(loc="upper left")
    return fig


def robustness_coverage(table: pl.DataFrame) -> Figure:
    """Coverage at 68.27 and 95.45 % per set (variation) and parameter, with the target bands.

    ``table`` is :func:`gampen_ml.robustness.calibration_summary` rows (``set``,
    ``parameter``, ``coverage_68``, ``coverage_95``); the shaded bands are the targets
    (+-3 points at 68.27 %, +-2 at 95.45 %).
    """
    _require(table, ("set", "parameter", "coverage_68", "coverage_95"), "robustness_coverage")
    sets = table["set"].unique(maintain_order=True).to_list()
    fig = _new_figure(2.2 + 0.7 * len(sets), 6.0)
    axes = _subplots(fig, 2, 1, sharex=True)[:, 0]
    x = np.arange(len(sets))
    markers = {"bt": "o", "re_arcsec": "s", "flux_nJy": "^"}
    for ax, tag, level, band in ((axes[0], "68", 0.6827, 0.03), (axes[1], "95", 0.9545, 0.02)):
        ax.axhspan(100 * (level - band), 100 * (level + band), color="0.9", zorder=0)
        ax.axhline(100 * level, color="0.5", ls=":", lw=1)
        for j, p in enumerate(PARAMETERS):
            rows = table.filter(pl.col("parameter") == p)
            by_set = dict(zip(rows["set"], rows[f"coverage_{tag}"], strict=True))
            y = [100 * by_set.get(name, np.nan) for name in sets]
            ax.plot(x + (j - 1) * 0.15, y, markers[p], label=PARAM_LABELS[p], ls="none")
        ax.set_ylabel(f"coverage of the {100 * level:.2f} % HPD (%)")
    axes[0].legend(loc="lower left", ncols=3)
    axes[1].set_xticks(x, sets, rotation=30, ha="right")
    return fig


def save_figure(fig: Figure, path: Path | str, dpi: int = DPI) -> Path:
    """Write ``fig`` as a PNG of ``figsize * dpi`` pixels (atomically) and release it.

    The figure is cleared afterwards (figures here are never registered with pyplot, so
    nothing else holds them).
    """
    path = Path(path)
    if path.suffix.lower() != ".png":
        raise ValueError(f"save_figure: {path} must end in .png")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        fig.savefig(tmp, format="png", dpi=dpi)
    fig.clear()
    return path


_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def png_markdown(
    source: Path | str | bytes | Figure, max_px: int | None = None, title: str = "figure"
) -> str:
    """Markdown image with an inline base64 PNG, for Dagster's ``MetadataValue.md``.

    Parameters
    ----------
    source : Path, str, bytes or Figure
        A PNG file, PNG bytes, or a figure (rendered here).
    max_px : int, optional
        Longest side of the embedded image; larger images are downscaled (a figure is
        re-rendered at a lower dpi), keeping Dagster's event log small. Default: a figure
        is rendered at 600 px, PNG input is embedded as is.
    title : str
        Alt text.

    Returns
    -------
    str
        ``![title](data:image/png;base64,...)``.
    """
    if isinstance(source, Figure):
        w, h = source.get_size_inches()
        dpi = (max_px or 600) / max(w, h)
        buf = io.BytesIO()
        source.savefig(buf, format="png", dpi=dpi)
        data = buf.getvalue()
    else:
        data = source if isinstance(source, bytes) else Path(source).read_bytes()
        where = "bytes" if isinstance(source, bytes) else str(source)
        if not data.startswith(_PNG_MAGIC):
            raise ValueError(f"png_markdown: {where} is not a PNG")
        if max_px is not None:
            from PIL import Image  # Pillow ships with matplotlib

            img = Image.open(io.BytesIO(data))
            if max(img.size) > max_px:
                img.thumbnail((max_px, max_px))
                buf = io.BytesIO()
                img.save(buf, format="PNG", optimize=True)
                data = buf.getvalue()
    return f"![{title}](data:image/png;base64,{base64.b64encode(data).decode('ascii')})"


# --------------------------------------------------------------------------- all figures

#: Captions of the files :func:`make_catalog_figures` writes (also used in ``index.md``).
CAPTIONS = {
    "coverage_vs_dropout": "Coverage vs dropout rate, per parameter and averaged (paper Fig. 8)",
    "posterior_corner": "Joint posterior of one galaxy (paper Fig. 9)",
    "example_posteriors": "Example marginal posteriors with HPD intervals (paper Fig. 10)",
    "predicted_vs_true": "Predicted mode vs truth (paper Fig. 11)",
    "residual_histograms": "Residual histograms (paper Fig. 12)",
    "residuals_vs_true": "Residuals vs true values (paper Fig. 13)",
    "residuals_vs_predicted": "Residuals vs predicted values (paper Fig. 14)",
    "bt_residuals_by_type": "B/T residuals by number of components (paper Fig. 15)",
    "fractional_residuals": "Fractional Re and flux residuals (paper Fig. 16)",
    "uncertainty_vs_parameters": "68 % HPD width vs parameters (paper Fig. 17)",
    "uncertainty_vs_residuals": "68 % HPD width vs residuals (paper Fig. 18)",
    "flag_regions": "Flagged regions and residuals with/without them (paper Fig. 19)",
    "confusion_matrix": "Extreme-B/T label confusion matrix (paper Fig. 20)",
    "posterior_width_distributions": "Distribution of 68 % HPD widths",
    "parameter_distributions": "Distribution of posterior modes",
    "flag_fractions": "Fraction of galaxies per qualitative flag",
}


def make_catalog_figures(
    catalog: pl.DataFrame,
    out_dir: Path | str,
    *,
    flags: pl.DataFrame | None = None,
    coverage_table: pl.DataFrame | None = None,
    samples: np.ndarray | None = None,
    chosen_dropout: float | None = None,
    flag_config: FlagConfig | None = None,
    n_examples: int = 4,
) -> dict[str, Path]:
    """Write every applicable diagnostic figure of a catalog as PNG plus ``index.md``.

    Simulated catalogs (non-null ``{p}_true``) get Figs 10-20; real-data catalogs get the
    width, parameter and flag-fraction distributions. Coverage vs dropout is drawn when a
    coverage table is given; corner and example posteriors when ``samples`` is.

    Parameters
    ----------
    catalog : pl.DataFrame
        Posterior catalog (docs/catalog.md).
    out_dir : Path or str
        Output folder (created).
    flags : pl.DataFrame, optional
        Flags table; without it the flags are derived from the modes (:func:`flag_arrays`).
    coverage_table : pl.DataFrame, optional
        Calibration coverage table.
    samples : (N, T, 3) float, optional
        Posterior samples aligned with ``catalog`` rows (float16 memmap is fine).
    chosen_dropout : float, optional
        Champion dropout rate marked in the coverage figure.
    flag_config : FlagConfig, optional
        Flag thresholds (default ``FlagConfig()``).
    n_examples : int
        Galaxies shown in the example posteriors.

    Returns
    -------
    dict of str -> Path
        Figure name -> PNG path, plus ``"index"`` -> ``index.md``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    figures: dict[str, Figure] = {}
    if coverage_table is not None:
        figures["coverage_vs_dropout"] = coverage_vs_dropout(
            coverage_table, chosen_dropout=chosen_dropout
        )
    sim = has_truths(catalog)
    if samples is not None:
        if samples.ndim != 3 or samples.shape[0] != catalog.height or samples.shape[2] != 3:
            raise ValueError(
                f"make_catalog_figures: samples must be (N, T, 3) with N = {catalog.height}, got {samples.shape}"
            )
        idx = np.unique(
            np.linspace(0, catalog.height - 1, min(n_examples, catalog.height)).astype(int)
        )
        chosen = np.asarray(samples[idx], dtype=np.float64)
        rows = catalog[idx.tolist()]
        truth = [rows[0, f"{p}_true"] for p in PARAMETERS] if sim else None
        figures["posterior_corner"] = posterior_corner(chosen[0], truth)
        figures["example_posteriors"] = example_posteriors(chosen, rows)
    if sim:
        figures["predicted_vs_true"] = predicted_vs_true(catalog)
        figures["residual_histograms"] = residual_histograms(catalog)
        figures["residuals_vs_true"] = residuals_vs_true(catalog)
        figures["residuals_vs_predicted"] = residuals_vs_predicted(catalog)
        figures["bt_residuals_by_type"] = bt_residuals_by_type(catalog, flag_config)
        figures["fractional_residuals"] = fractional_residuals(catalog)
        figures["uncertainty_vs_residuals"] = uncertainty_vs_residuals(catalog)
        figures["flag_regions"] = flag_regions(catalog, flags, flag_config)
        figures["confusion_matrix"] = confusion_matrix(catalog, flags, flag_config)
    figures["uncertainty_vs_parameters"] = uncertainty_vs_parameters(catalog)
    figures["posterior_width_distributions"] = posterior_width_distributions(catalog)
    figures["parameter_distributions"] = parameter_distributions(catalog)
    if flags is not None:
        figures["flag_fractions"] = flag_fractions(flags)

    paths = {name: save_figure(fig, out_dir / f"{name}.png") for name, fig in figures.items()}
    dataset = (
        catalog["dataset"][0] if "dataset" in catalog.columns and catalog.height else out_dir.name
    )
    kind = "simulated (with truths)" if sim else "real (no truths)"
    lines = [f"# Diagnostic plots: {dataset}", "", f"{catalog.height} galaxies, {kind}.", ""]
    for name, path in paths.items():
        lines += [f"## {CAPTIONS[name]}", "", f"![{name}]({path.name})", ""]
    index = out_dir / "index.md"
    with atomic_file(index) as tmp:
        Path(tmp).write_text("\n".join(lines))
    paths["index"] = index
    return paths


__all__ = [
    "CAPTIONS",
    "DPI",
    "OKABE_ITO",
    "binned_percentiles",
    "bt_confusion_counts",
    "bt_residuals_by_type",
    "confusion_matrix",
    "coverage_vs_dropout",
    "example_posteriors",
    "flag_arrays",
    "flag_fractions",
    "flag_regions",
    "fractional_residuals",
    "has_truths",
    "hpd_width",
    "loss_curve",
    "make_catalog_figures",
    "parameter_distributions",
    "png_markdown",
    "posterior_corner",
    "posterior_width_distributions",
    "predicted_vs_true",
    "residual_histograms",
    "residuals",
    "residuals_vs_predicted",
    "residuals_vs_true",
    "save_figure",
    "stn_examples",
    "thumbnail_grid",
    "uncertainty_vs_parameters",
    "uncertainty_vs_residuals",
]
