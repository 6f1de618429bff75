"""Posterior catalogs for tests: made-up MC-dropout draws and ``build_catalog``'s provenance."""

from __future__ import annotations

import numpy as np


def posterior_draws(
    rng: np.random.Generator,
    n: int,
    draws: int,
    *,
    re_sigma: float = 0.3,
    flux_mu: float = 10.0,
    flux_sigma: float = 0.2,
) -> np.ndarray:
    """``(n, draws, 3)`` float64 draws of ``(bt, re_arcsec, flux_nJy)`` from ``rng``: ``bt``
    uniform on [0, 1], ``re_arcsec`` log-normal about 1 arcsec (log-scale width
    ``re_sigma``), ``flux_nJy`` log-normal about ``exp(flux_mu)`` (width ``flux_sigma``)."""
    return np.stack(
        [
            rng.uniform(0, 1, (n, draws)),
            rng.lognormal(0, re_sigma, (n, draws)),
            rng.lognormal(flux_mu, flux_sigma, (n, draws)),
        ],
        axis=-1,
    )


def provenance(**overrides) -> dict:
    """``build_catalog``'s provenance arguments for a tiny model's catalog of ``batch-1``
    (version 1, dropout rate 0.05, 50 passes, not recalibrated), with ``overrides``."""
    return {
        "model_name": "gampen-tiny",
        "model_version": "1",
        "dropout_rate": 0.05,
        "n_passes": 50,
        "recalibrated": False,
        "dataset": "batch-1",
        **overrides,
    }
