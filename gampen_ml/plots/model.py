"""Figures of a trained model: loss curve, coverage versus dropout rate (paper Fig. 8), the
expected-coverage curve and the shift suite's coverage.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from gampen_ml.config import PARAMETERS
from gampen_ml.metrics import require_columns
from gampen_ml.plots.common import OKABE_ITO, PARAM_LABELS, axes_grid, new_figure


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
    fig = new_figure(5.5, 3.5)
    ax = axes_grid(fig, 1, 1)[0, 0]
    for k in keys:
        y = np.array([h.get(k, np.nan) for h in history], dtype=float)
        ax.plot(epochs, y, marker="o", ms=3, label=k)
    ax.set_xlabel("epoch")
    ax.set_ylabel("Gaussian NLL loss (scaled labels)")
    ax.legend()
    return fig


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
    require_columns(coverage_table, cols, name)
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
    fig = new_figure(6.5, 1.9 * len(rows))
    axes = axes_grid(fig, len(rows), 1, sharex=True)[:, 0]
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
    fig = new_figure(5.0, 4.6)
    ax = axes_grid(fig, 1, 1)[0, 0]
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
    require_columns(
        table, ("set", "parameter", "coverage_68", "coverage_95"), "robustness_coverage"
    )
    sets = table["set"].unique(maintain_order=True).to_list()
    fig = new_figure(2.2 + 0.7 * len(sets), 6.0)
    axes = axes_grid(fig, 2, 1, sharex=True)[:, 0]
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
