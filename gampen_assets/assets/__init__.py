"""GaMPEN assets, one module per stage (inputs, model, prediction)."""

from gampen_assets.assets.data_assets import noise_pool, psf_library, simulated_galaxies
from gampen_assets.assets.model_assets import calibrated_dropout_rate, trained_model
from gampen_assets.assets.prediction_assets import (
    diagnostic_plots,
    posterior_catalog,
    qualitative_flags,
    robustness_report,
)
from gampen_assets.assets.sky_catalog_assets import sky_catalog

ALL_ASSETS = [
    psf_library,
    noise_pool,
    simulated_galaxies,
    trained_model,
    calibrated_dropout_rate,
    posterior_catalog,
    qualitative_flags,
    diagnostic_plots,
    robustness_report,
    sky_catalog,
]

__all__ = [
    "ALL_ASSETS",
    "calibrated_dropout_rate",
    "diagnostic_plots",
    "noise_pool",
    "posterior_catalog",
    "psf_library",
    "qualitative_flags",
    "robustness_report",
    "simulated_galaxies",
    "sky_catalog",
    "trained_model",
]
