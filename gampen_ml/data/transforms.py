"""Image and label transforms (paper §5): arsinh images; logit / log / standard-scaled labels.

Labels are ``(N, 3)`` arrays ``[bt, re_arcsec, flux_nJy]`` (the order of
:data:`gampen_ml.config.PARAMETERS`). :class:`LabelScaler` maps them to the network's space::

    bt        -> custom logit  (exact 0 / 1 first moved to the limits ``bt_low`` / ``bt_high``)
    re_arcsec -> natural log
    flux_nJy  -> natural log
    then subtract the training mean and divide by the training standard deviation.

The inverse maps back and snaps B/T at or beyond the limits to exactly 0 or 1, like the
original ``ggt`` code. The scaler is fitted once on the training split and saved with the
model (never refitted at inference).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from gampen_ml.config import PARAMETERS
from gampen_ml.io import atomic_file

SCALER_FORMAT = "gampen-label-scaler/1"


def arsinh_image(images, softening_nJy: float = 1.0):
    """Compress the dynamic range of images: ``arcsinh(images / softening_nJy)``.

    Linear near zero (the sky noise) and logarithmic for bright pixels (paper §5).

    Parameters
    ----------
    images : numpy.ndarray or torch.Tensor
        Pixel values in nJy per pixel, any shape.
    softening_nJy : float
        Flux per pixel where the transform turns from linear to logarithmic.

    Returns
    -------
    Same type as ``images``; float32 for numpy input.
    """
    if isinstance(images, torch.Tensor):
        return torch.asinh(images / softening_nJy)
    return np.arcsinh(np.asarray(images, dtype=np.float32) / np.float32(softening_nJy))


class LabelScalerError(ValueError):
    """Labels cannot be fitted / transformed, or a saved scaler file is invalid."""


@dataclass(frozen=True)
class LabelScaler:
    """Invertible map between physical labels ``[bt, re_arcsec, flux_nJy]`` and scaled space.

    Attributes
    ----------
    bt_low, bt_high : float
        B/T values that stand in for exact 0 and 1 before the logit; also the snapping limits
        of :meth:`inverse`.
    mean, std : tuple of 3 float
        Standard-scaler statistics of ``(logit bt, log re, log flux)`` on the training split.
    """

    bt_low: float
    bt_high: float
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def fit(cls, labels: np.ndarray) -> LabelScaler:
        """Fit on training labels ``(N, 3)`` float ``[bt, re_arcsec, flux_nJy]``.

        Raises
        ------
        LabelScalerError
            If the labels are out of range or B/T has no value strictly inside (0, 1).
        """
        labels = _check_labels(labels, "LabelScaler.fit")
        bt = labels[:, 0]
        inside = bt[(bt > 0.0) & (bt < 1.0)]
        if inside.size == 0:
            raise LabelScalerError("LabelScaler.fit: column bt has no value strictly in (0, 1)")
        # Half the smallest non-zero B/T, and 1 - half the gap below 1 of the largest non-one.
        bt_low = 0.5 * float(bt[bt > 0.0].min())
        bt_high = 1.0 - 0.5 * (1.0 - float(bt[bt < 1.0].max()))
        z = _forward(labels, bt_low, bt_high)
        std = z.std(axis=0)
        if np.any(std == 0):
            name = PARAMETERS[int(np.argmax(std == 0))]
            raise LabelScalerError(f"LabelScaler.fit: column {name} is constant")
        return cls(bt_low, bt_high, tuple(map(float, z.mean(axis=0))), tuple(map(float, std)))

    def transform(self, labels: np.ndarray) -> np.ndarray:
        """Physical ``(..., 3)`` -> scaled ``(..., 3)`` float32."""
        labels = _check_labels(labels, "LabelScaler.transform")
        z = _forward(labels, self.bt_low, self.bt_high)
        return ((z - np.asarray(self.mean)) / np.asarray(self.std)).astype(np.float32)

    def inverse(self, scaled: np.ndarray) -> np.ndarray:
        """Scaled ``(..., 3)`` -> physical ``(..., 3)`` float64, B/T snapped to 0/1 at the limits."""
        scaled = np.asarray(scaled)
        out = np.empty(scaled.shape, dtype=np.float64)
        for j in range(len(PARAMETERS)):
            out[..., j] = self.inverse_parameter(scaled[..., j], j)
        return out

    def inverse_parameter(self, scaled: np.ndarray, index: int) -> np.ndarray:
        """One parameter's scaled values (any shape) -> physical float64 (``index`` into
        :data:`~gampen_ml.config.PARAMETERS`; B/T snapped to 0/1 at the limits)."""
        z = np.asarray(scaled, dtype=np.float64) * self.std[index] + self.mean[index]
        if index != 0:
            return np.exp(z)
        bt = 1.0 / (1.0 + np.exp(-z))
        return np.where(bt <= self.bt_low, 0.0, np.where(bt >= self.bt_high, 1.0, bt))

    def to_dict(self) -> dict:
        """JSON-serializable description."""
        return {
            "format": SCALER_FORMAT,
            "parameters": list(PARAMETERS),
            "bt_low": self.bt_low,
            "bt_high": self.bt_high,
            "mean": list(self.mean),
            "std": list(self.std),
        }

    @classmethod
    def from_dict(cls, data: dict, source: str = "<dict>") -> LabelScaler:
        """Inverse of :meth:`to_dict`; ``source`` names the origin in error messages."""
        if data.get("format") != SCALER_FORMAT:
            raise LabelScalerError(
                f"{source}: field 'format' is {data.get('format')!r}, expected {SCALER_FORMAT!r}"
            )
        try:
            mean = tuple(float(v) for v in data["mean"])
            std = tuple(float(v) for v in data["std"])
            scaler = cls(float(data["bt_low"]), float(data["bt_high"]), mean, std)
        except (KeyError, TypeError, ValueError) as exc:
            raise LabelScalerError(f"{source}: invalid label scaler: {exc!r}") from exc
        if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
            raise LabelScalerError(f"{source}: fields mean/std must be 3 numbers, std > 0")
        return scaler

    def save(self, path: Path | str) -> None:
        """Write JSON atomically."""
        with atomic_file(path) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), indent=2))

    @classmethod
    def load(cls, path: Path | str) -> LabelScaler:
        """Read a scaler written by :meth:`save`."""
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError) as exc:
            raise LabelScalerError(f"{path}: cannot read label scaler: {exc}") from exc
        return cls.from_dict(data, source=str(path))


def _check_labels(labels: np.ndarray, where: str) -> np.ndarray:
    labels = np.asarray(labels, dtype=np.float64)
    if labels.shape[-1:] != (3,):
        raise LabelScalerError(f"{where}: labels must have shape (..., 3), got {labels.shape}")
    checks = (
        (PARAMETERS[0], (labels[..., 0] < 0) | (labels[..., 0] > 1) | ~np.isfinite(labels[..., 0])),
        (PARAMETERS[1], ~(labels[..., 1] > 0) | ~np.isfinite(labels[..., 1])),
        (PARAMETERS[2], ~(labels[..., 2] > 0) | ~np.isfinite(labels[..., 2])),
    )
    for name, bad in checks:
        if bad.any():
            col = PARAMETERS.index(name)
            value = labels[..., col][bad].flat[0]
            raise LabelScalerError(f"{where}: column {name} has an out-of-range value {value!r}")
    return labels


def _forward(labels: np.ndarray, bt_low: float, bt_high: float) -> np.ndarray:
    bt = np.clip(labels[..., 0], bt_low, bt_high)
    z = np.empty_like(labels)
    z[..., 0] = np.log(bt) - np.log1p(-bt)
    z[..., 1:] = np.log(labels[..., 1:])
    return z
