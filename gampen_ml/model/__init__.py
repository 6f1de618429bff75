"""GaMPEN network (STN + VGG-16 with Monte-Carlo dropout) and its LDL^T Gaussian loss."""

from gampen_ml.model.loss import (
    covariance,
    gaussian_nll,
    mean_squared_error,
    split_outputs,
    unit_lower_triangular,
)
from gampen_ml.model.network import VGG16_LAYERS, GaMPEN, ZoomSTN

__all__ = [
    "GaMPEN",
    "VGG16_LAYERS",
    "ZoomSTN",
    "covariance",
    "gaussian_nll",
    "mean_squared_error",
    "split_outputs",
    "unit_lower_triangular",
]
