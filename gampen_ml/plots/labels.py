"""Figures of the qualitative labels: flagged regions, the extreme-B/T confusion matrix
(paper Figs 19-20) and the fraction of galaxies per flag.
"""

from __future__ import annotations

import numpy as np
import polars as pl
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

from gampen_ml.config import FlagConfig
from gampen_ml.flags import FLAG_COLUMNS, bt_point_estimate
from gampen_ml.metrics import flag_arrays, float_column, require_columns, residuals
from gampen_ml.plots.common import (
    CMAP,
    OKABE_ITO,
    PARAM_LABELS,
    PARAM_SYMBOLS,
    PARAM_UNITS,
    axes_grid,
    hexbin,
    mode_true_columns,
    new_figure,
    shared_colourbar,
    sigma_step_hist,
)


def flag_regions(
    catalog: pl.DataFrame, flags: pl.DataFrame | None = None, flag_config: FlagConfig | None = None
) -> Figure:
    """Residuals versus prediction with the flagged regions hatched (paper Fig. 19).

    Top row: B/T (regions B/T <= 0.10 and >= 0.85); bottom row: Re (region Re < 1").
    Right: residual histograms of all galaxies and of those not flagged, with sigma.
    """
    require_columns(catalog, mode_true_columns("bt", "re_arcsec"), "flag_regions", non_null=True)
    cfg = flag_config or FlagConfig()
    f = flag_arrays(catalog, flags, cfg)
    fig = new_figure(11.0, 7.0)
    axes = axes_grid(fig, 2, 2, width_ratios=[1.4, 1.0])
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
        pred, r = float_column(catalog, f"{p}_{estimate}"), residuals(catalog, p, estimate=estimate)
        ax = axes[row, 0]
        hexbins.append(hexbin(ax, pred, r))
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
            sigma_step_hist(ax, r[sel], bins, label, colour)
        ax.set_yscale("log")
        ax.set_xlabel(rf"$\Delta {PARAM_SYMBOLS[p]}${PARAM_UNITS[p]}")
        ax.set_ylabel("galaxies")
        ax.legend(loc="upper left")
    shared_colourbar(fig, axes[:, 0], hexbins)
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
    require_columns(catalog, ("bt_true",), "bt_confusion_counts", non_null=True)
    cfg = flag_config or FlagConfig()
    f = flag_arrays(catalog, flags, cfg)
    bt = float_column(catalog, "bt_true")
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
    fig = new_figure(5.5, 4.6)
    ax = axes_grid(fig, 1, 1)[0, 0]
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


def flag_fractions(flags: pl.DataFrame) -> Figure:
    """Bar chart of the fraction of galaxies carrying each qualitative flag."""
    require_columns(flags, FLAG_COLUMNS, "flag_fractions")
    frac = flags.select([pl.col(c).cast(pl.Float64).mean() for c in FLAG_COLUMNS]).row(0)
    fig = new_figure(6.0, 3.5)
    ax = axes_grid(fig, 1, 1)[0, 0]
    pct = [100.0 * (v or 0.0) for v in frac]
    bars = ax.bar([c.replace("_", "\n") for c in FLAG_COLUMNS], pct, color=OKABE_ITO["blue"])
    ax.bar_label(bars, labels=[f"{v:.1f} %" for v in pct], fontsize=8)
    ax.set_ylabel(f"galaxies flagged [%] (n = {flags.height})")
    ax.set_ylim(0, max(max(pct) * 1.15, 1.0))
    return fig
