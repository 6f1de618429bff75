"""Reports written as Markdown + JSON beside the figures of a catalog with truths.

:func:`coverage_diagnostics` is the calibration of the simulated test split beyond the
paper's three levels (``diagnostic_plots/sim-test/``). The validation report proper is
:func:`gampen_ml.validate.validation_report`; the shift suite's is
:func:`gampen_ml.robustness.robustness_report`.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl

from gampen_ml.config import PARAMETERS
from gampen_ml.data.transforms import LabelScaler
from gampen_ml.infer import predict_physical

#: Bins of true AB magnitude and of true Re (arcsec) of the binned coverage tables.
MAGNITUDE_EDGES = (14, 17, 19, 21, 22, 23, 24.5)
RE_EDGES_ARCSEC = (0, 0.5, 1, 2, 3, 5.1)


def coverage_diagnostics(
    catalog: pl.DataFrame,
    samples_scaled: np.ndarray,
    scaler: LabelScaler,
    out_dir: Path,
    *,
    seed: int,
    samples_physical: np.ndarray | None = None,
) -> dict[str, Path]:
    """Calibration beyond the paper's three levels, for a catalog with truths.

    Writes ``expected_coverage.png`` (HPD coverage at every credible level per parameter,
    plus TARP's joint 3-D coverage) and ``coverage_diagnostics.md`` / ``.json`` (TARP
    area-to-curve error, coverage in bins of true magnitude and true size).

    Parameters
    ----------
    catalog : pl.DataFrame
        Posterior catalog with ``{p}_true`` columns.
    samples_scaled : (N, T, 3) array_like
        The catalog's posterior samples in the network's scaled space (``samples.npy``).
    scaler : LabelScaler
        Maps scaled samples to physical units (and truths to the scaled space for TARP,
        whose distances need commensurate axes).
    samples_physical : (N, T, 3) array_like, optional
        ``scaler.inverse`` of ``samples_scaled`` when the caller has it already (it is not
        computed a second time).
    """
    from gampen_ml import plots
    from gampen_ml.metrics import ab_magnitude
    from gampen_ml.posterior import (
        CURVE_LEVELS,
        binned_coverage,
        expected_coverage_curve,
        tarp_coverage,
        tarp_null_errors,
    )

    truth = catalog.select([f"{p}_true" for p in PARAMETERS]).to_numpy().astype(np.float64)
    scaled = np.asarray(samples_scaled, dtype=np.float32)
    if samples_physical is None:
        samples_physical = predict_physical(scaled, scaler)
    curve = expected_coverage_curve(samples_physical, truth)
    ecp, alpha, atc = tarp_coverage(scaled, scaler.transform(truth), seed=seed)
    # What a calibrated model of the same posterior shapes shows at this N (not 0).
    null = tarp_null_errors(scaled, seed=seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {
        "expected_coverage": plots.save_figure(
            plots.expected_coverage(
                np.asarray(CURVE_LEVELS), curve, tarp_alpha=alpha, tarp_ecp=ecp
            ),
            out_dir / "expected_coverage.png",
        )
    }
    with_truth = catalog.with_columns(
        pl.Series("magnitude_true", ab_magnitude(catalog["flux_nJy_true"].to_numpy()))
    )
    binned = {
        "magnitude_true": binned_coverage(with_truth, "magnitude_true", list(MAGNITUDE_EDGES)),
        "re_arcsec_true": binned_coverage(with_truth, "re_arcsec_true", list(RE_EDGES_ARCSEC)),
    }
    lines = [
        "# Coverage diagnostics",
        "",
        f"TARP joint (3-D) coverage: mean |ECP - credibility| = {atc:.3f} (Lemos et al. "
        f"2023); posteriors calibrated by construction with the same shapes and N give "
        f"{np.median(null):.3f} (median of {len(null)}, largest {null.max():.3f}), so that is "
        "the scale of 'calibrated' here, not 0. Expected-coverage curve: "
        "`expected_coverage.png`.",
    ]
    for by, table in binned.items():
        wide = table.pivot(
            on="parameter", index=["bin_lo", "bin_hi", "n", "level"], values="coverage"
        )
        lines += ["", f"## HPD coverage in bins of `{by}`", "", "| bin | n | level | "
                  + " | ".join(PARAMETERS) + " |", "|---|---|---|" + "---|" * len(PARAMETERS)]  # fmt: skip
        for row in wide.sort("bin_lo", "level").iter_rows(named=True):
            cells = " | ".join(f"{row[p]:.3f}" for p in PARAMETERS)
            lines.append(
                f"| {row['bin_lo']:g}–{row['bin_hi']:g} | {row['n']} | {row['level']:.4f} | {cells} |"
            )
    paths["coverage_diagnostics"] = out_dir / "coverage_diagnostics.md"
    paths["coverage_diagnostics"].write_text("\n".join(lines) + "\n")
    paths["coverage_diagnostics_json"] = out_dir / "coverage_diagnostics.json"
    paths["coverage_diagnostics_json"].write_text(
        json.dumps(
            {
                "tarp_atc_error": float(atc),
                "tarp_atc_error_null": null.tolist(),
                "expected_coverage": {
                    "levels": [float(v) for v in CURVE_LEVELS],
                    **{p: curve[:, j].tolist() for j, p in enumerate(PARAMETERS)},
                },
                "binned": {by: t.to_dicts() for by, t in binned.items()},
            },
            indent=2,
        )
    )
    return paths
