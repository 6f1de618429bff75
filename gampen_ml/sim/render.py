"""Noise-free GalSim rendering of bulge+disk / single-Sérsic galaxies.

A galaxy is ``galsim.Sersic(n, half_light_radius=Re, flux=F)`` per component, sheared to
axis ratio ``q`` at position angle ``pa_deg`` (area-preserving, so ``Re`` is the circularized
half-light radius), summed, and convolved with the PSF. Library PSFs are effective PSFs
(pixel response included), so the convolved profile is sampled with ``method="no_pixel"``;
without a PSF the profile is integrated over pixels (``method="auto"``). Images are in nJy
per pixel, centred on the central pixel of an odd stamp.

Speed (:class:`FastRenderer`, used by the shard writer), measured in
``benchmarks/bench_simulation.py``:

* Sérsic indices are quantized to :data:`SERSIC_N_STEP` *before* the labels are written
  (:func:`gampen_ml.sim.parameters.quantize_sersic_n`), so the labels are exactly what was
  rendered, and GalSim's per-index Sérsic tables (an LRU cache of 100 in its C++ layer; a
  bulge table costs 0.05-0.2 s to build) are reused: a 0.02 grid has 21 disk and 76 bulge
  indices, which all fit in that cache; galaxies are rendered in order of
  bulge and disk index so the cache keeps hitting.
* The PSF ``InterpolatedImage`` is built once per ``psf_id``.
* ``GSParams(folding_threshold=FAST_FOLDING_THRESHOLD)`` shrinks the FFT of the most
  extended profiles; the pixel change against GalSim's defaults is tested to stay far below
  the sky noise.
"""

from __future__ import annotations

from collections.abc import Mapping

import galsim
import numpy as np
import polars as pl

from gampen_ml.config import ImagingConfig

#: Grid step of the rendered Sérsic indices.
SERSIC_N_STEP = 0.02
#: GalSim folding threshold of the fast renderer (GalSim's default is 5e-3).
FAST_FOLDING_THRESHOLD = 1e-2


def fast_gsparams() -> galsim.GSParams:
    """GSParams of the fast renderer."""
    return galsim.GSParams(folding_threshold=FAST_FOLDING_THRESHOLD)


def _present(value) -> bool:
    return value is not None and np.isfinite(value)


def galaxy_profile(row: Mapping, gsparams: galsim.GSParams | None = None) -> galsim.GSObject:
    """Intrinsic (pre-PSF) GalSim profile of one galaxy.

    Parameters
    ----------
    row : mapping
        ``bt``, ``flux_nJy`` and ``disk_*`` / ``bulge_*`` (``n``, ``re_arcsec``, ``q``,
        ``pa_deg``) as in the labels; an absent component has null (None/NaN) parameters.
    gsparams : galsim.GSParams, optional
        Accuracy settings (GalSim defaults when None).
    """
    bt, flux = float(row["bt"]), float(row["flux_nJy"])
    parts = []
    for prefix, frac in (("disk", 1.0 - bt), ("bulge", bt)):
        n = row[f"{prefix}_n"]
        if not _present(n) or frac <= 0.0:
            continue
        sersic = galsim.Sersic(
            n=float(n),
            half_light_radius=float(row[f"{prefix}_re_arcsec"]),
            flux=frac * flux,
            gsparams=gsparams,
        )
        parts.append(
            sersic.shear(
                q=float(row[f"{prefix}_q"]), beta=float(row[f"{prefix}_pa_deg"]) * galsim.degrees
            )
        )
    if not parts:
        raise ValueError(f"galaxy row has no component with positive flux: {dict(row)}")
    return parts[0] if len(parts) == 1 else galsim.Add(parts, gsparams=gsparams)


def psf_profile(
    psf_image: np.ndarray, imaging: ImagingConfig, gsparams: galsim.GSParams | None = None
) -> galsim.InterpolatedImage:
    """GalSim profile of a library PSF image ``(s, s)`` at the survey pixel scale."""
    image = galsim.Image(
        np.ascontiguousarray(psf_image, dtype=np.float64), scale=imaging.pixel_scale_arcsec
    )
    return galsim.InterpolatedImage(image, gsparams=gsparams)


def _draw(
    profile: galsim.GSObject, psf: galsim.GSObject | None, imaging: ImagingConfig
) -> np.ndarray:
    s, dx = imaging.stamp_size_px, imaging.pixel_scale_arcsec
    if psf is None:
        image = profile.drawImage(nx=s, ny=s, scale=dx, method="auto")
    else:
        image = galsim.Convolve(profile, psf).drawImage(nx=s, ny=s, scale=dx, method="no_pixel")
    return image.array.astype(np.float32)


def render_galaxy(
    row: Mapping,
    psf_image: np.ndarray | None,
    imaging: ImagingConfig,
    gsparams: galsim.GSParams | None = None,
) -> np.ndarray:
    """Noise-free image of one galaxy.

    Parameters
    ----------
    row : mapping
        One galaxy's parameters (see :func:`galaxy_profile`).
    psf_image : (s, s) array or None
        Unit-sum effective PSF at the survey scale; None renders without PSF (pixel
        response only).
    imaging : ImagingConfig
        Stamp size and pixel scale.
    gsparams : galsim.GSParams, optional
        GalSim defaults when None (the exact reference).

    Returns
    -------
    (S, S) float32
        nJy per pixel, ``S = imaging.stamp_size_px``.
    """
    psf = None if psf_image is None else psf_profile(psf_image, imaging, gsparams)
    return _draw(galaxy_profile(row, gsparams), psf, imaging)


class FastRenderer:
    """Renders many galaxies with one PSF library, reusing GalSim caches (module docstring).

    Parameters
    ----------
    psf_cube : (n_psf, s, s) float32
        Library PSFs.
    imaging : ImagingConfig
        Stamp size and pixel scale.
    gsparams : galsim.GSParams, optional
        Defaults to :func:`fast_gsparams`.
    """

    def __init__(
        self,
        psf_cube: np.ndarray,
        imaging: ImagingConfig,
        gsparams: galsim.GSParams | None = None,
    ) -> None:
        self.psf_cube = psf_cube
        self.imaging = imaging
        self.gsparams = gsparams if gsparams is not None else fast_gsparams()
        self._psfs: dict[int, galsim.InterpolatedImage] = {}

    def psf(self, psf_id: int) -> galsim.InterpolatedImage:
        """The (cached) PSF profile of ``psf_id``."""
        if psf_id not in self._psfs:
            self._psfs[psf_id] = psf_profile(self.psf_cube[psf_id], self.imaging, self.gsparams)
        return self._psfs[psf_id]

    def render(self, params: pl.DataFrame, psf_id: np.ndarray) -> np.ndarray:
        """Noise-free images of ``params`` rows convolved with their PSFs.

        Parameters
        ----------
        params : polars.DataFrame
            Galaxy parameters (Sérsic indices ideally on the :data:`SERSIC_N_STEP` grid).
        psf_id : (N,) int
            Library index of each galaxy's PSF.

        Returns
        -------
        (N, S, S) float32
            nJy per pixel, in the row order of ``params``.
        """
        s = self.imaging.stamp_size_px
        out = np.empty((params.height, s, s), dtype=np.float32)
        key = params.select(
            pl.col("bulge_n").fill_null(-1.0), pl.col("disk_n").fill_null(-1.0)
        ).with_columns(pl.Series("psf_id", np.asarray(psf_id)))
        order = np.lexsort(
            (key["psf_id"].to_numpy(), key["disk_n"].to_numpy(), key["bulge_n"].to_numpy())
        )
        rows = params.to_dicts()
        # One GalSim draw per galaxy is inherent; the loop only dispatches to C++.
        for i in order:
            profile = galaxy_profile(rows[i], self.gsparams)
            out[i] = _draw(profile, self.psf(int(psf_id[i])), self.imaging)
        return out
