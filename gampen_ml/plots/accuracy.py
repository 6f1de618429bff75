"""Accuracy and uncertainty of a catalog against its truths (paper Figs 11-18), and the
distributions of modes and HPD widths (for real data too).

A residual is ``mode - true`` (:func:`gampen_ml.metrics.residuals`); the uncertainty of a
parameter is the width of its 68.27 % HPD interval, fractional (over the mode) for Re and
flux (paper §6.3).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import polars as pl
from matplotlib.figure import Figure
from scipy import stats

from gampen_ml.config import PARAMETERS, FlagConfig
from gampen_ml.metrics import float_column, has_truths, hpd_width, require_columns, residuals
from gampen_ml.plots.common import (
    LOG_PARAMS,
    OKABE_ITO,
    PARAM_LABELS,
    PARAM_SYMBOLS,
    PARAM_UNITS,
    axes_grid,
    bin_edges,
    hexbin,
    mode_true_columns,
    new_figure,
    running_median,
    shared_colourbar,
    sigma_step_hist,
    stats_box,
)


def predicted_vs_true(catalog: pl.DataFrame) -> Figure:
    """Posterior mode versus truth, log-count hexbins with the y = x line (paper Fig. 11)."""
    require_columns(catalog, mode_true_columns(*PARAMETERS), "predicted_vs_true", non_null=True)
    fig = new_figure(12.0, 3.6)
    axes = axes_grid(fig, 1, 3)[0]
    hexbins = []
    for ax, p in zip(axes, PARAMETERS, strict=True):
        true, mode = float_column(catalog, f"{p}_true"), float_column(catalog, f"{p}_mode")
        log = p in LOG_PARAMS
        hexbins.append(hexbin(ax, true, mode, xlog=log, ylog=log))
        finite = np.concatenate([true[np.isfinite(true)], mode[np.isfinite(mode)]])
        if log:
            finite = finite[finite > 0]
        if finite.size:
            lims = (finite.min(), finite.max())
            ax.plot(lims, lims, "k--", lw=1.0)
        ax.set_xlabel("true " + PARAM_LABELS[p])
        ax.set_ylabel("predicted (mode) " + PARAM_LABELS[p])
    shared_colourbar(fig, axes, hexbins)
    return fig


def residual_histograms(catalog: pl.DataFrame) -> Figure:
    """Histograms of ``mode - true`` with mean, median and sigma (paper Fig. 12)."""
    require_columns(catalog, mode_true_columns(*PARAMETERS), "residual_histograms", non_null=True)
    fig = new_figure(12.0, 3.3)
    axes = axes_grid(fig, 1, 3)[0]
    for ax, p in zip(axes, PARAMETERS, strict=True):
        r = residuals(catalog, p)
        r = r[np.isfinite(r)]
        lim = np.percentile(np.abs(r), 99.5) if r.size else 1.0
        ax.hist(r, bins=np.linspace(-lim, lim, 61), color=OKABE_ITO["blue"], alpha=0.8)
        ax.axvline(0.0, color="k", ls="--", lw=1.0)
        ax.set_xlabel(rf"$\Delta {PARAM_SYMBOLS[p]}$ (mode $-$ true){PARAM_UNITS[p]}")
        ax.set_ylabel("galaxies")
        stats_box(ax, r)
    return fig


def _versus_parameters(
    catalog: pl.DataFrame,
    x_kind: str,
    values: Callable[[str], np.ndarray],
    ylabel: Callable[[str], str],
    *,
    ylog: Callable[[str], bool] = lambda p: False,
    zero_line: bool = False,
) -> Figure:
    """3 x 3 hexbins with running medians: row ``p`` shows ``values(p)`` against column
    ``q``'s ``{q}_{x_kind}`` (``true`` or ``mode``); one shared colour scale."""
    fig = new_figure(12.5, 9.5)
    axes = axes_grid(fig, 3, 3)
    hexbins = []
    for i, p in enumerate(PARAMETERS):
        y = values(p)
        for j, q in enumerate(PARAMETERS):
            ax = axes[i, j]
            x = float_column(catalog, f"{q}_{x_kind}")
            log = q in LOG_PARAMS
            hexbins.append(hexbin(ax, x, y, xlog=log, ylog=ylog(p)))
            running_median(ax, x, y, xlog=log)
            if zero_line:
                ax.axhline(0.0, color="k", ls=":", lw=1.0)
            ax.set_xlabel(("true " if x_kind == "true" else "predicted ") + PARAM_LABELS[q])
            ax.set_ylabel(ylabel(p))
    if zero_line:
        axes[0, 0].legend(loc="lower left")
    shared_colourbar(fig, axes, hexbins)
    return fig


def _residual_grid(catalog: pl.DataFrame, x_kind: str, name: str) -> Figure:
    require_columns(catalog, mode_true_columns(*PARAMETERS), name, non_null=True)
    return _versus_parameters(
        catalog,
        x_kind,
        lambda p: residuals(catalog, p),
        lambda p: rf"$\Delta {PARAM_SYMBOLS[p]}${PARAM_UNITS[p]}",
        zero_line=True,
    )


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
    bt = float_column(catalog, "bt_true")
    return np.where((bt == 0.0) | (bt == 1.0), "single", "bulge+disk")


def bt_residuals_by_type(catalog: pl.DataFrame, flag_config: FlagConfig | None = None) -> Figure:
    """B/T residuals of single- and two-component galaxies (paper Fig. 15).

    Three histograms (log counts): single-component, all two-component, and two-component
    with disk-max < true B/T < bulge-min (0.1 and 0.85 by default); sigma in the legend.
    """
    require_columns(catalog, mode_true_columns("bt"), "bt_residuals_by_type", non_null=True)
    cfg = flag_config or FlagConfig()
    r, bt = residuals(catalog, "bt"), float_column(catalog, "bt_true")
    double = _component(catalog) == "bulge+disk"
    mid = double & (bt > cfg.disk_dominated_max_bt) & (bt < cfg.bulge_dominated_min_bt)
    groups = {
        "single component": ~double,
        "two components": double,
        f"two comp., {cfg.disk_dominated_max_bt:g} < $L_B/L_T$ < {cfg.bulge_dominated_min_bt:g}": mid,
    }
    fig = new_figure(6.5, 4.0)
    ax = axes_grid(fig, 1, 1)[0, 0]
    finite = r[np.isfinite(r)]
    lim = max(float(np.abs(finite).max()), 1e-3) if finite.size else 1.0
    bins = np.linspace(-lim, lim, 61)
    for (label, sel), colour in zip(groups.items(), ("green", "blue", "vermillion"), strict=True):
        sigma_step_hist(ax, r[sel & np.isfinite(r)], bins, label, colour)
    ax.axvline(0.0, color="k", ls="--", lw=1.0)
    ax.set_yscale("log")
    ax.set_xlabel(r"$\Delta L_B/L_T$ (mode $-$ true)")
    ax.set_ylabel("galaxies")
    ax.legend(loc="upper left")
    return fig


def fractional_residuals(catalog: pl.DataFrame) -> Figure:
    """``|mode - true| / true`` for Re and flux versus each true parameter (paper Fig. 16)."""
    require_columns(catalog, mode_true_columns(*PARAMETERS), "fractional_residuals", non_null=True)
    fig = new_figure(12.5, 6.5)
    axes = axes_grid(fig, 2, 3)
    hexbins = []
    for i, p in enumerate(("re_arcsec", "flux_nJy")):
        fr = np.abs(residuals(catalog, p, fractional=True))
        for j, q in enumerate(PARAMETERS):
            ax = axes[i, j]
            x = float_column(catalog, f"{q}_true")
            log = q in LOG_PARAMS
            hexbins.append(hexbin(ax, x, fr, xlog=log, ylog=True))
            running_median(ax, x, fr, xlog=log)
            ax.set_xlabel("true " + PARAM_LABELS[q])
            ax.set_ylabel(rf"$|\Delta {PARAM_SYMBOLS[p]}| / {PARAM_SYMBOLS[p]}^\mathrm{{true}}$")
    shared_colourbar(fig, axes, hexbins)
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
    require_columns(catalog, _hpd68_columns(), name)
    x_kind = "true" if has_truths(catalog) else "mode"
    return _versus_parameters(
        catalog,
        x_kind,
        lambda p: _uncertainty(catalog, p),
        _uncertainty_label,
        ylog=lambda p: p != "bt",
    )


def uncertainty_vs_residuals(catalog: pl.DataFrame) -> Figure:
    """68.27 % HPD width versus residual, fractional for Re and flux (paper Fig. 18).

    Each panel gives Spearman's rank correlation of the width with ``|residual|``.
    """
    name = "uncertainty_vs_residuals"
    require_columns(catalog, _hpd68_columns(), name)
    require_columns(catalog, [f"{p}_true" for p in PARAMETERS], name, non_null=True)
    fig = new_figure(12.0, 3.6)
    axes = axes_grid(fig, 1, 3)[0]
    hexbins = []
    for ax, p in zip(axes, PARAMETERS, strict=True):
        r = residuals(catalog, p, fractional=p != "bt")
        u = _uncertainty(catalog, p)
        hexbins.append(hexbin(ax, r, u, ylog=p != "bt"))
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
    shared_colourbar(fig, axes, hexbins)
    return fig


def posterior_width_distributions(catalog: pl.DataFrame) -> Figure:
    """Distributions of the 68.27 % HPD widths (fractional for Re and flux); for real data."""
    require_columns(catalog, _hpd68_columns(), "posterior_width_distributions")
    fig = new_figure(12.0, 3.3)
    axes = axes_grid(fig, 1, 3)[0]
    for ax, p in zip(axes, PARAMETERS, strict=True):
        u = _uncertainty(catalog, p)
        log = p != "bt"
        u = u[np.isfinite(u) & ((u > 0) if log else True)]
        if u.size:
            ax.hist(u, bins=bin_edges(u, 50, log), color=OKABE_ITO["blue"], alpha=0.8)
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
    require_columns(catalog, [f"{p}_mode" for p in PARAMETERS], "parameter_distributions")
    fig = new_figure(12.0, 3.3)
    axes = axes_grid(fig, 1, 3)[0]
    for ax, p in zip(axes, PARAMETERS, strict=True):
        log = p in LOG_PARAMS
        mode = float_column(catalog, f"{p}_mode")
        true = (
            float_column(catalog, f"{p}_true")
            if f"{p}_true" in catalog.columns
            else np.full(catalog.height, np.nan)
        )
        both = np.concatenate([mode, true])
        bins = bin_edges(both[np.isfinite(both)], 40, log)
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
