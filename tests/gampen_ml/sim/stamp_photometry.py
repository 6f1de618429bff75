"""Photometry of rendered stamps that the rendering tests compare with the labels."""

from __future__ import annotations

import numpy as np


def half_light_radius_arcsec(
    image: np.ndarray, q: float, pa_deg: float, scale_arcsec: float, total: float | None = None
) -> float:
    """Circularized radius of the ellipse (axis ratio ``q``, position angle ``pa_deg``)
    about the centre of the square ``image`` that encloses ``total / 2`` of the light,
    counting whole pixels by their centres; ``total`` defaults to the image's sum."""
    s = image.shape[0]
    y, x = (np.mgrid[0:s, 0:s] - (s - 1) / 2) * scale_arcsec
    t = np.radians(pa_deg)
    xp, yp = x * np.cos(t) + y * np.sin(t), -x * np.sin(t) + y * np.cos(t)
    r = np.sqrt(q * xp**2 + yp**2 / q).ravel()
    order = np.argsort(r)
    cum = np.cumsum(image.ravel()[order].astype(np.float64))
    return float(np.interp(0.5 * (cum[-1] if total is None else total), cum, r[order]))
