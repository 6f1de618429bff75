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
(paper §6.2, :func:`gampen_ml.metrics.residuals`); the "uncertainty" of a parameter is the
width of its 68.27 % HPD interval, fractional (divided by the mode) for Re and flux
(paper §6.3).

One module per figure family, all re-exported here (``from gampen_ml import plots``):

- :mod:`~gampen_ml.plots.common` — house style, shared drawing helpers, ``save_figure``,
  ``png_markdown``;
- :mod:`~gampen_ml.plots.model` — loss curve, coverage vs dropout (Fig. 8), expected
  coverage, shift-suite coverage;
- :mod:`~gampen_ml.plots.images` — thumbnails, STN crops (Figs 4-5);
- :mod:`~gampen_ml.plots.posteriors` — corner plot and example marginals (Figs 9-10);
- :mod:`~gampen_ml.plots.accuracy` — residuals and uncertainties (Figs 11-18),
  distributions of modes and widths;
- :mod:`~gampen_ml.plots.labels` — flagged regions, confusion matrix (Figs 19-20), flag
  fractions;
- :mod:`~gampen_ml.plots.report` — ``make_catalog_figures``: every applicable figure plus
  ``index.md``.
"""

from gampen_ml.plots.accuracy import (
    bt_residuals_by_type,
    fractional_residuals,
    parameter_distributions,
    posterior_width_distributions,
    predicted_vs_true,
    residual_histograms,
    residuals_vs_predicted,
    residuals_vs_true,
    uncertainty_vs_parameters,
    uncertainty_vs_residuals,
)
from gampen_ml.plots.common import (
    CMAP,
    DPI,
    LEVEL_COLOURS,
    LOG_PARAMS,
    OKABE_ITO,
    PARAM_LABELS,
    STYLE,
    binned_percentiles,
    png_markdown,
    save_figure,
)
from gampen_ml.plots.images import stn_examples, thumbnail_grid
from gampen_ml.plots.labels import (
    bt_confusion_counts,
    confusion_matrix,
    flag_fractions,
    flag_regions,
)
from gampen_ml.plots.model import (
    coverage_vs_dropout,
    expected_coverage,
    loss_curve,
    robustness_coverage,
)
from gampen_ml.plots.posteriors import example_posteriors, posterior_corner
from gampen_ml.plots.report import CAPTIONS, make_catalog_figures

__all__ = [
    "CAPTIONS",
    "CMAP",
    "DPI",
    "LEVEL_COLOURS",
    "LOG_PARAMS",
    "OKABE_ITO",
    "PARAM_LABELS",
    "STYLE",
    "binned_percentiles",
    "bt_confusion_counts",
    "bt_residuals_by_type",
    "confusion_matrix",
    "coverage_vs_dropout",
    "example_posteriors",
    "expected_coverage",
    "flag_fractions",
    "flag_regions",
    "fractional_residuals",
    "loss_curve",
    "make_catalog_figures",
    "parameter_distributions",
    "png_markdown",
    "posterior_corner",
    "posterior_width_distributions",
    "predicted_vs_true",
    "residual_histograms",
    "residuals_vs_predicted",
    "residuals_vs_true",
    "robustness_coverage",
    "save_figure",
    "stn_examples",
    "thumbnail_grid",
    "uncertainty_vs_parameters",
    "uncertainty_vs_residuals",
]
