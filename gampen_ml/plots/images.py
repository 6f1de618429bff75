"""Image figures: arsinh-stretched thumbnails and STN crops (paper Figs 4-5)."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from gampen_ml.plots.common import arsinh_stretch, axes_grid, new_figure


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
    fig = new_figure(1.6 * ncols, 1.7 * nrows)
    axes = axes_grid(fig, nrows, ncols).ravel()
    stretched = arsinh_stretch(images)
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
    fig = new_figure(1.5 * k, 6.4)
    axes = axes_grid(fig, 4, k)
    stretched_in, stretched_out = arsinh_stretch(images), arsinh_stretch(stn_outputs)
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
