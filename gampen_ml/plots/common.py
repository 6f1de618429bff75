"""House style and the drawing helpers every figure family shares; saving and embedding PNGs.

Figures are built without pyplot (no global figure registry, no GUI backend: rendering
goes through Agg), under :data:`STYLE`.
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl
from cycler import cycler
from matplotlib import rc_context
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure

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
#: Colours for the 68 / 95 / 99 % HPD shading (paper Fig. 10 uses three shades).
LEVEL_COLOURS = {"68": OKABE_ITO["purple"], "95": OKABE_ITO["yellow"], "99": OKABE_ITO["green"]}


def new_figure(width_in: float, height_in: float, layout: str = "constrained") -> Figure:
    """A figure of ``width_in x height_in`` inches in the house style, outside pyplot."""
    # Figure() needs no pyplot and renders through Agg.
    with rc_context(STYLE):
        return Figure(figsize=(width_in, height_in), layout=layout)


def axes_grid(fig: Figure, nrows: int, ncols: int, **kw) -> np.ndarray:
    """``(nrows, ncols)`` array of axes of ``fig`` in the house style (``kw``: ``fig.subplots``)."""
    with rc_context(STYLE):
        return np.atleast_2d(fig.subplots(nrows, ncols, squeeze=False, **kw))


def hexbin(ax, x: np.ndarray, y: np.ndarray, *, xlog: bool = False, ylog: bool = False):
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


def bin_edges(x: np.ndarray, n_bins: int, log: bool) -> np.ndarray:
    """``(n_bins + 1,)`` edges spanning the finite (positive, when ``log``) values of ``x``."""
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


def running_median(ax, x: np.ndarray, y: np.ndarray, *, xlog: bool = False, n_bins: int = 20):
    """Overlay the binned median and 16-84 % band of ``y`` versus ``x``."""
    centres, q, _ = binned_percentiles(x, y, bin_edges(x, n_bins, xlog))
    if len(centres) == 0:
        return
    ax.fill_between(centres, q[:, 0], q[:, 2], color=OKABE_ITO["orange"], alpha=0.25, lw=0)
    ax.plot(centres, q[:, 1], color=OKABE_ITO["vermillion"], lw=1.5, label="median")
    ax.plot(centres, q[:, 0], color=OKABE_ITO["vermillion"], lw=0.8, ls="--", label="16-84 %")
    ax.plot(centres, q[:, 2], color=OKABE_ITO["vermillion"], lw=0.8, ls="--")


def shared_colourbar(fig: Figure, axes, hexbins: list, label: str = "galaxies per bin") -> None:
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


def stats_box(ax, values: np.ndarray, *, loc=(0.03, 0.96)) -> None:
    """Mean, median and standard deviation of the finite ``values`` in a corner of ``ax``."""
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


def sigma_step_hist(ax, values: np.ndarray, bins: np.ndarray, label: str, colour: str) -> None:
    """Step histogram of ``values`` labelled with their standard deviation and count (no-op
    when empty); ``colour`` is a key of :data:`OKABE_ITO`."""
    if values.size:
        ax.hist(
            values,
            bins=bins,
            histtype="step",
            lw=1.5,
            color=OKABE_ITO[colour],
            label=rf"{label}: $\sigma$ = {values.std():.3f} (n = {values.size})",
        )


def mode_true_columns(*params: str) -> list[str]:
    """``{p}_mode`` and ``{p}_true`` of each parameter, the columns a residual figure needs."""
    return [c for p in params for c in (f"{p}_mode", f"{p}_true")]


def arsinh_stretch(images: np.ndarray) -> np.ndarray:
    """Per-image arsinh stretch scaled by a robust noise estimate: (N,S,S) -> (N,S,S)."""
    x = np.asarray(images, dtype=np.float64)
    med = np.median(x, axis=(1, 2), keepdims=True)
    mad = 1.4826 * np.median(np.abs(x - med), axis=(1, 2), keepdims=True)
    scale = np.where(
        mad > 0, mad, np.maximum(np.abs(x).max(axis=(1, 2), keepdims=True), 1e-30) * 1e-3
    )
    return np.arcsinh((x - med) / scale)


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


PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


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
        if not data.startswith(PNG_MAGIC):
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
