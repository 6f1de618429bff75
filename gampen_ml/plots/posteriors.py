"""Posteriors of single galaxies: the joint corner plot and marginals with HPD shading
(paper Figs 9-10).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import polars as pl
from matplotlib import rc_context
from matplotlib.figure import Figure
from scipy import stats

from gampen_ml.config import PARAMETERS
from gampen_ml.metrics import LEVEL_TAGS, require_columns
from gampen_ml.plots.common import (
    LEVEL_COLOURS,
    LOG_PARAMS,
    OKABE_ITO,
    PARAM_LABELS,
    STYLE,
    arsinh_stretch,
    axes_grid,
    new_figure,
)


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
    fig = new_figure(6.0, 6.0, layout="none")  # corner arranges its own grid
    axes_grid(fig, 3, 3)
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
    require_columns(rows, [f"{p}_mode" for p in PARAMETERS] + hpd_cols, name)
    k = rows.height
    with_img = images is not None
    ncols = 3 + int(with_img)
    fig = new_figure(2.6 * ncols, 1.9 * k + 0.3)
    axes = axes_grid(fig, k, ncols)
    for i in range(k):  # one panel row per shown galaxy (k is a handful)
        if with_img:
            axes[i, 0].imshow(
                arsinh_stretch(np.asarray(images[i])[None])[0], origin="lower", cmap="gray"
            )
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
