"""Every applicable figure of a catalog as PNG files plus an ``index.md``."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
from matplotlib.figure import Figure

from gampen_ml.config import PARAMETERS, FlagConfig
from gampen_ml.io import atomic_file
from gampen_ml.metrics import has_truths
from gampen_ml.plots import accuracy, labels, model, posteriors
from gampen_ml.plots.common import save_figure
from gampen_ml.store import PLOTS_INDEX_FILE

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
        figures["coverage_vs_dropout"] = model.coverage_vs_dropout(
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
        figures["posterior_corner"] = posteriors.posterior_corner(chosen[0], truth)
        figures["example_posteriors"] = posteriors.example_posteriors(chosen, rows)
    if sim:
        figures["predicted_vs_true"] = accuracy.predicted_vs_true(catalog)
        figures["residual_histograms"] = accuracy.residual_histograms(catalog)
        figures["residuals_vs_true"] = accuracy.residuals_vs_true(catalog)
        figures["residuals_vs_predicted"] = accuracy.residuals_vs_predicted(catalog)
        figures["bt_residuals_by_type"] = accuracy.bt_residuals_by_type(catalog, flag_config)
        figures["fractional_residuals"] = accuracy.fractional_residuals(catalog)
        figures["uncertainty_vs_residuals"] = accuracy.uncertainty_vs_residuals(catalog)
        figures["flag_regions"] = labels.flag_regions(catalog, flags, flag_config)
        figures["confusion_matrix"] = labels.confusion_matrix(catalog, flags, flag_config)
    figures["uncertainty_vs_parameters"] = accuracy.uncertainty_vs_parameters(catalog)
    figures["posterior_width_distributions"] = accuracy.posterior_width_distributions(catalog)
    figures["parameter_distributions"] = accuracy.parameter_distributions(catalog)
    if flags is not None:
        figures["flag_fractions"] = labels.flag_fractions(flags)

    paths = {name: save_figure(fig, out_dir / f"{name}.png") for name, fig in figures.items()}
    dataset = (
        catalog["dataset"][0] if "dataset" in catalog.columns and catalog.height else out_dir.name
    )
    kind = "simulated (with truths)" if sim else "real (no truths)"
    lines = [f"# Diagnostic plots: {dataset}", "", f"{catalog.height} galaxies, {kind}.", ""]
    for name, path in paths.items():
        lines += [f"## {CAPTIONS[name]}", "", f"![{name}]({path.name})", ""]
    index = out_dir / PLOTS_INDEX_FILE
    with atomic_file(index) as tmp:
        Path(tmp).write_text("\n".join(lines))
    paths["index"] = index
    return paths
