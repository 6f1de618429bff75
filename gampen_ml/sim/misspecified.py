"""Galaxies *outside* the training distribution: a misspecification test set.

The training set (:mod:`gampen_ml.sim.shards`) holds centred, smooth, point-symmetric
Sérsic bulge+disk galaxies seen through a library PSF. Real survey galaxies are not. Each
variant below takes the same Table-1 parameter draws and breaks exactly one assumption,
so a variant's catalog can be compared galaxy by galaxy with the ``nominal`` control
(same parameters, PSFs and noise realisation; see :func:`render_misspecified`).

Variants (the truths are always the MAIN galaxy's ``bt``, ``re_arcsec``, ``flux_nJy``,
defined exactly as for the training labels):

``nominal``
    The training distribution (control); rendered by :class:`~gampen_ml.sim.render.FastRenderer`.
``knots``
    Star-forming knots: :data:`KNOT_FRACTION` (30 %) of the disk flux is moved from the
    smooth Sérsic disk into ``galsim.RandomKnots`` (20-80 point sources) whose positions are
    drawn from the same circular disk profile and then sheared like the disk. The knots
    *belong to the disk*: B/T and total flux are unchanged (flux exactly conserved), and
    ``re_arcsec`` is unchanged because the knots' *expected* light distribution is the disk's
    (a single realisation scatters around it). Galaxies without a disk are unaffected.
``offcentre_bulge``
    The bulge is shifted by :data:`BULGE_OFFSET_PX` = U(0.5, 2.0) survey pixels
    (0.08-0.34" at 0.168"/px) in a random direction; the disk stays centred. The labels
    are unchanged (each component's Re is measured about its own centre, as in training).
    Only bulge+disk galaxies are affected.
``bar``
    An extra elongated component: a Sérsic n = 0.5 bar with q = U(0.15, 0.3), circularized
    half-light radius U(0.3, 0.6) x disk Re, any position angle, carrying a fraction
    U(0.1, 0.3) of the disk flux (taken from the disk). The bar *belongs to the disk*: B/T
    and flux are unchanged; ``re_arcsec`` is recomputed as the composite half-light radius
    of the three circularized components (same definition as
    :func:`gampen_ml.sim.parameters.composite_re_arcsec`). Galaxies without a disk are
    unaffected.
``neighbour``
    A second galaxy in the stamp: single Sérsic n = U(0.8, 4), Re = U(0.3, 1.5)", any q
    and position angle, at a separation U(5, 15)" in a random direction, with a flux
    U(0.05, 0.30) x the main galaxy's. Truths are the main galaxy's alone.
``psf_outside``
    Every galaxy is seen through a Moffat PSF (the library's beta and shear scatter) with
    FWHM U(1.3, 1.8)", beyond the synthetic library's upper limit of 1.3". Labels unchanged.
"""

from __future__ import annotations

from collections.abc import Mapping

import galsim
import numpy as np
import polars as pl
from scipy.optimize import elementwise

from gampen_ml.config import ImagingConfig, PSFConfig
from gampen_ml.sim.noise import NoisePool, draw_noise
from gampen_ml.sim.parameters import sersic_enclosed_fraction
from gampen_ml.sim.psf import measure_fwhm_arcsec
from gampen_ml.sim.render import FastRenderer, _draw, fast_gsparams, galaxy_profile

#: Variant names, in the order of their random streams.
VARIANTS: tuple[str, ...] = (
    "nominal",
    "knots",
    "offcentre_bulge",
    "bar",
    "neighbour",
    "psf_outside",
)
#: Fraction of the disk flux carried by the knots.
KNOT_FRACTION = 0.3
#: Number of knots per galaxy (inclusive range).
N_KNOTS = (20, 80)
#: Bulge offset (survey pixels).
BULGE_OFFSET_PX = (0.5, 2.0)
#: Bar: flux fraction of the disk, axis ratio, Re relative to the disk Re, Sérsic n.
BAR_FLUX_FRACTION = (0.1, 0.3)
BAR_Q = (0.15, 0.3)
BAR_RE_RATIO = (0.3, 0.6)
BAR_SERSIC_N = 0.5
#: Neighbour: separation (arcsec), flux ratio to the main galaxy, Re (arcsec), Sérsic n.
NEIGHBOUR_SEPARATION_ARCSEC = (5.0, 15.0)
NEIGHBOUR_FLUX_RATIO = (0.05, 0.30)
NEIGHBOUR_RE_ARCSEC = (0.3, 1.5)
NEIGHBOUR_SERSIC_N = (0.8, 4.0)
#: PSF FWHM (arcsec) outside the training library.
PSF_OUTSIDE_FWHM_ARCSEC = (1.3, 1.8)
#: Smallest PSF stamp (px) for the broad PSFs (the wings of a 1.8" Moffat).
PSF_OUTSIDE_STAMP_PX = 65

#: Variant-specific label columns (null where they do not apply).
EXTRA_COLUMNS: dict[str, pl.DataType] = {
    "variant": pl.String(),
    "affected": pl.Boolean(),
    "n_knots": pl.Int32(),
    "knot_fraction": pl.Float64(),
    "bulge_offset_px": pl.Float64(),
    "bulge_offset_angle_deg": pl.Float64(),
    "bar_flux_fraction": pl.Float64(),
    "bar_q": pl.Float64(),
    "bar_re_arcsec": pl.Float64(),
    "bar_pa_deg": pl.Float64(),
    "neighbour_separation_arcsec": pl.Float64(),
    "neighbour_angle_deg": pl.Float64(),
    "neighbour_flux_ratio": pl.Float64(),
    "neighbour_re_arcsec": pl.Float64(),
    "neighbour_n": pl.Float64(),
    "neighbour_q": pl.Float64(),
    "neighbour_pa_deg": pl.Float64(),
    "psf_fwhm_arcsec": pl.Float64(),
}


class MisspecificationError(ValueError):
    """Unknown variant or unusable input; the message names it."""


def _with_disk_fraction_removed(row: Mapping, fraction: float) -> tuple[dict, float]:
    """Row whose disk carries ``1 - fraction`` of its flux (bulge flux unchanged).

    Returns the modified row (``flux_nJy`` and ``bt`` rescaled so that
    :func:`galaxy_profile` draws bulge ``bt F`` and disk ``(1 - fraction)(1 - bt) F``) and
    the removed flux ``fraction (1 - bt) F`` in nJy.
    """
    bt, flux = float(row["bt"]), float(row["flux_nJy"])
    removed = fraction * (1.0 - bt) * flux
    kept = flux - removed
    return {**row, "flux_nJy": kept, "bt": bt * flux / kept}, removed


def _disk_shear(row: Mapping) -> dict:
    return {"q": float(row["disk_q"]), "beta": float(row["disk_pa_deg"]) * galsim.degrees}


def _component(row: Mapping, prefix: str, flux: float, gsparams) -> galsim.GSObject:
    """One Sérsic component of ``row`` (``disk``/``bulge``) with the given flux."""
    only = {**row, "bt": 1.0 if prefix == "bulge" else 0.0, "flux_nJy": flux}
    return galaxy_profile(only, gsparams)


def composite_re_with_bar(
    bt: np.ndarray,
    bar_fraction: np.ndarray,
    disk_n: np.ndarray,
    disk_re_arcsec: np.ndarray,
    bulge_n: np.ndarray,
    bulge_re_arcsec: np.ndarray,
    bar_re_arcsec: np.ndarray,
    bar_n: float = BAR_SERSIC_N,
    rtol: float = 1e-10,
) -> np.ndarray:
    """Composite half-light radius (arcsec) of disk + bulge + bar (circularized components).

    Parameters
    ----------
    bt : (N,) float
        Bulge-to-total ratio; the disk carries ``(1 - bar_fraction)(1 - bt)`` and the bar
        ``bar_fraction (1 - bt)`` of the flux. Bulge arguments may be NaN where ``bt == 0``.
    bar_fraction : (N,) float
        Fraction of the disk flux moved into the bar.
    disk_n, disk_re_arcsec, bulge_n, bulge_re_arcsec, bar_re_arcsec : (N,) float
        Sérsic indices and circularized half-light radii.
    bar_n : float
        Sérsic index of the bar.

    Returns
    -------
    (N,) float64
        Radius enclosing half the total intrinsic flux (the ``re_arcsec`` label convention).
    """
    bt = np.asarray(bt, dtype=np.float64)
    w_bar = np.asarray(bar_fraction, dtype=np.float64) * (1.0 - bt)
    w_disk = (1.0 - bt) - w_bar
    bulge_n = np.where(bt > 0, bulge_n, 1.0)
    bulge_re = np.where(bt > 0, bulge_re_arcsec, 1.0)

    def excess(r, w_disk, w_bar, bt, dn, dre, bn, bre, brre):
        return (
            w_disk * sersic_enclosed_fraction(r, dn, dre)
            + w_bar * sersic_enclosed_fraction(r, bar_n, brre)
            + bt * sersic_enclosed_fraction(r, bn, bre)
            - 0.5
        )

    radii = np.stack([disk_re_arcsec, bulge_re, bar_re_arcsec])
    radii = np.where(np.isfinite(radii), radii, np.nanmax(radii, axis=0))
    args = (w_disk, w_bar, bt, disk_n, disk_re_arcsec, bulge_n, bulge_re, bar_re_arcsec)
    res = elementwise.find_root(
        excess,
        (0.5 * radii.min(axis=0), 2.0 * radii.max(axis=0)),
        args=args,
        tolerances={"xatol": 0.0, "xrtol": rtol, "fatol": 0.0, "frtol": 0.0},
    )
    if not np.all(res.success):
        raise ArithmeticError(
            f"composite_re_with_bar: root finding failed for {int((~res.success).sum())} galaxies"
        )
    return np.asarray(res.x, dtype=np.float64)


def outside_psf_images(
    fwhm_arcsec: np.ndarray,
    g1: np.ndarray,
    g2: np.ndarray,
    psf_cfg: PSFConfig,
    imaging: ImagingConfig,
    stamp_px: int,
) -> np.ndarray:
    """Unit-sum effective Moffat PSFs ``(N, s, s)`` float32, drawn like the synthetic library."""
    out = np.empty((len(fwhm_arcsec), stamp_px, stamp_px), dtype=np.float32)
    for i, (fwhm, e1, e2) in enumerate(zip(fwhm_arcsec, g1, g2, strict=True)):
        moffat = galsim.Moffat(beta=psf_cfg.moffat_beta, fwhm=float(fwhm)).shear(g1=e1, g2=e2)
        arr = moffat.drawImage(nx=stamp_px, ny=stamp_px, scale=imaging.pixel_scale_arcsec).array
        out[i] = arr / arr.sum()
    return out


def _uniform(rng: np.random.Generator, bounds: tuple[float, float], n: int) -> np.ndarray:
    return rng.uniform(bounds[0], bounds[1], size=n)


def render_misspecified(
    variant: str,
    params: pl.DataFrame,
    psf_cube: np.ndarray,
    noise_pool: NoisePool,
    imaging: ImagingConfig,
    seed: int,
    psf_cfg: PSFConfig | None = None,
) -> tuple[np.ndarray, pl.DataFrame]:
    """Render one variant of the test set (see the module docstring).

    Randomness: a base stream seeded with ``seed`` draws the PSF choice (when ``params``
    lacks ``psf_id``) and one noise seed per galaxy; a second stream seeded with
    ``(seed, variant index)`` draws the variant's own parameters. Hence every variant of
    the same ``params`` and ``seed`` shares PSFs and noise realisations with ``nominal``,
    and the output is deterministic in ``seed``.

    Parameters
    ----------
    variant : str
        One of :data:`VARIANTS`.
    params : pl.DataFrame
        Table-1 draws (:func:`gampen_ml.sim.parameters.sample_parameters`, ideally
        quantized with ``quantize_sersic_n``); optional ``galaxy_id`` and ``psf_id``.
    psf_cube : (n_psf, s, s) float32
        The training PSF library.
    noise_pool : NoisePool
        Sky noise pool (the noise is added with :func:`gampen_ml.sim.noise.draw_noise`).
    imaging : ImagingConfig
        Stamp size and pixel scale.
    seed : int
        Seed of everything random.
    psf_cfg : PSFConfig, optional
        Moffat beta and shear scatter of ``psf_outside`` (default ``PSFConfig()``).

    Returns
    -------
    images : (N, S, S) float32
        nJy per pixel, noise included.
    labels : pl.DataFrame
        ``galaxy_id``, ``seed`` (noise seed), ``psf_id`` (null for ``psf_outside``), the
        columns of ``params`` (``re_arcsec`` recomputed for ``bar``) and
        :data:`EXTRA_COLUMNS`.
    """
    if variant not in VARIANTS:
        raise MisspecificationError(f"unknown variant {variant!r}; choose one of {VARIANTS}")
    psf_cfg = psf_cfg or PSFConfig()
    n, s, dx = params.height, imaging.stamp_size_px, imaging.pixel_scale_arcsec
    base = np.random.default_rng(seed)
    if "psf_id" in params.columns:
        psf_id = params["psf_id"].to_numpy().astype(np.int32)
    else:
        psf_id = base.integers(0, len(psf_cube), size=n).astype(np.int32)
    noise_seeds = base.integers(0, np.iinfo(np.int64).max, size=n, dtype=np.int64)
    rng = np.random.default_rng([int(seed) % 2**63, VARIANTS.index(variant)])
    bt = params["bt"].to_numpy()
    has_disk, has_bulge = bt < 1.0, bt > 0.0
    extra: dict[str, np.ndarray] = {}
    rows = params.drop("galaxy_id", "psf_id", strict=False).to_dicts()
    gsparams = fast_gsparams()
    renderer = FastRenderer(psf_cube, imaging, gsparams)
    images = np.empty((n, s, s), dtype=np.float32)
    labels = params.drop("galaxy_id", "psf_id", strict=False)
    used_psf_id = psf_id.copy()

    if variant == "nominal":
        affected = np.ones(n, dtype=bool)
        images[:] = renderer.render(params, psf_id)
    elif variant == "knots":
        affected = has_disk
        n_knots = rng.integers(N_KNOTS[0], N_KNOTS[1] + 1, size=n)
        knot_seeds = rng.integers(1, 2**31 - 1, size=n)
        extra["n_knots"] = np.where(affected, n_knots, -1)
        extra["knot_fraction"] = np.where(affected, KNOT_FRACTION, np.nan)
        for i, row in enumerate(rows):  # one GalSim draw per galaxy
            if not affected[i]:
                profile = galaxy_profile(row, gsparams)
            else:
                smooth, knot_flux = _with_disk_fraction_removed(row, KNOT_FRACTION)
                disk_shape = galsim.Sersic(
                    n=float(row["disk_n"]),
                    half_light_radius=float(row["disk_re_arcsec"]),
                    flux=knot_flux,
                    gsparams=gsparams,
                )
                knots = galsim.RandomKnots(
                    int(n_knots[i]),
                    profile=disk_shape,
                    rng=galsim.BaseDeviate(int(knot_seeds[i])),
                    gsparams=gsparams,
                ).shear(**_disk_shear(row))
                profile = galsim.Add([galaxy_profile(smooth, gsparams), knots])
            images[i] = _draw(profile, renderer.psf(int(psf_id[i])), imaging)
    elif variant == "offcentre_bulge":
        affected = has_disk & has_bulge
        offset = _uniform(rng, BULGE_OFFSET_PX, n)
        angle = _uniform(rng, (0.0, 360.0), n)
        extra["bulge_offset_px"] = np.where(affected, offset, np.nan)
        extra["bulge_offset_angle_deg"] = np.where(affected, angle, np.nan)
        shift = offset * dx
        sx, sy = shift * np.cos(np.radians(angle)), shift * np.sin(np.radians(angle))
        for i, row in enumerate(rows):
            if not affected[i]:
                profile = galaxy_profile(row, gsparams)
            else:
                flux = float(row["flux_nJy"])
                disk = _component(row, "disk", (1.0 - bt[i]) * flux, gsparams)
                bulge = _component(row, "bulge", bt[i] * flux, gsparams).shift(sx[i], sy[i])
                profile = galsim.Add([disk, bulge])
            images[i] = _draw(profile, renderer.psf(int(psf_id[i])), imaging)
    elif variant == "bar":
        affected = has_disk
        frac = _uniform(rng, BAR_FLUX_FRACTION, n)
        q = _uniform(rng, BAR_Q, n)
        ratio = _uniform(rng, BAR_RE_RATIO, n)
        pa = _uniform(rng, (-90.0, 90.0), n)
        disk_re = params["disk_re_arcsec"].fill_null(np.nan).to_numpy()
        bar_re = ratio * disk_re
        extra.update(
            bar_flux_fraction=np.where(affected, frac, np.nan),
            bar_q=np.where(affected, q, np.nan),
            bar_re_arcsec=np.where(affected, bar_re, np.nan),
            bar_pa_deg=np.where(affected, pa, np.nan),
        )
        re = params["re_arcsec"].to_numpy().copy()
        if affected.any():
            re[affected] = composite_re_with_bar(
                bt[affected],
                frac[affected],
                params["disk_n"].fill_null(np.nan).to_numpy()[affected],
                disk_re[affected],
                params["bulge_n"].fill_null(np.nan).to_numpy()[affected],
                params["bulge_re_arcsec"].fill_null(np.nan).to_numpy()[affected],
                bar_re[affected],
            )
        labels = labels.with_columns(pl.Series("re_arcsec", re, dtype=pl.Float64))
        for i, row in enumerate(rows):
            if not affected[i]:
                profile = galaxy_profile(row, gsparams)
            else:
                rest, bar_flux = _with_disk_fraction_removed(row, float(frac[i]))
                bar = galsim.Sersic(
                    n=BAR_SERSIC_N, half_light_radius=float(bar_re[i]), flux=bar_flux,
                    gsparams=gsparams,
                ).shear(q=float(q[i]), beta=float(pa[i]) * galsim.degrees)  # fmt: skip
                profile = galsim.Add([galaxy_profile(rest, gsparams), bar])
            images[i] = _draw(profile, renderer.psf(int(psf_id[i])), imaging)
    elif variant == "neighbour":
        affected = np.ones(n, dtype=bool)
        sep = _uniform(rng, NEIGHBOUR_SEPARATION_ARCSEC, n)
        angle = _uniform(rng, (0.0, 360.0), n)
        ratio = _uniform(rng, NEIGHBOUR_FLUX_RATIO, n)
        nb_re = _uniform(rng, NEIGHBOUR_RE_ARCSEC, n)
        nb_n = np.round(_uniform(rng, NEIGHBOUR_SERSIC_N, n) / 0.05) * 0.05  # few GalSim tables
        nb_q = _uniform(rng, (0.25, 1.0), n)
        nb_pa = _uniform(rng, (-90.0, 90.0), n)
        extra.update(
            neighbour_separation_arcsec=sep,
            neighbour_angle_deg=angle,
            neighbour_flux_ratio=ratio,
            neighbour_re_arcsec=nb_re,
            neighbour_n=nb_n,
            neighbour_q=nb_q,
            neighbour_pa_deg=nb_pa,
        )
        sx, sy = sep * np.cos(np.radians(angle)), sep * np.sin(np.radians(angle))
        flux = params["flux_nJy"].to_numpy()
        for i, row in enumerate(rows):
            neighbour = (
                galsim.Sersic(n=float(nb_n[i]), half_light_radius=float(nb_re[i]),
                              flux=float(ratio[i] * flux[i]), gsparams=gsparams)
                .shear(q=float(nb_q[i]), beta=float(nb_pa[i]) * galsim.degrees)
                .shift(float(sx[i]), float(sy[i]))
            )  # fmt: skip
            profile = galsim.Add([galaxy_profile(row, gsparams), neighbour])
            images[i] = _draw(profile, renderer.psf(int(psf_id[i])), imaging)
    else:  # psf_outside
        affected = np.ones(n, dtype=bool)
        fwhm = _uniform(rng, PSF_OUTSIDE_FWHM_ARCSEC, n)
        g1 = rng.normal(0.0, psf_cfg.ellipticity_rms, n)
        g2 = rng.normal(0.0, psf_cfg.ellipticity_rms, n)
        stamp = max(int(psf_cube.shape[-1]), PSF_OUTSIDE_STAMP_PX) | 1
        psfs = outside_psf_images(fwhm, g1, g2, psf_cfg, imaging, stamp)
        used_psf_id = np.full(n, -1, dtype=np.int32)
        extra["psf_fwhm_arcsec"] = np.array([measure_fwhm_arcsec(p, dx) for p in psfs])
        for i, row in enumerate(rows):
            profile = galaxy_profile(row, gsparams)
            psf = galsim.InterpolatedImage(
                galsim.Image(psfs[i].astype(np.float64), scale=dx), gsparams=gsparams
            )
            images[i] = _draw(profile, psf, imaging)

    if "psf_fwhm_arcsec" not in extra:
        fwhm_lib = np.array([measure_fwhm_arcsec(p, dx) for p in psf_cube])
        extra["psf_fwhm_arcsec"] = fwhm_lib[psf_id]
    for k, noise_seed in enumerate(noise_seeds):
        images[k] += draw_noise(noise_pool, (s, s), np.random.default_rng(int(noise_seed)))

    galaxy_id = (
        params["galaxy_id"].to_numpy()
        if "galaxy_id" in params.columns
        else np.arange(n, dtype=np.int64)
    )
    head = pl.DataFrame(
        {
            "galaxy_id": pl.Series(galaxy_id, dtype=pl.Int64),
            "seed": pl.Series(noise_seeds, dtype=pl.Int64),
            "psf_id": pl.Series([None if v < 0 else int(v) for v in used_psf_id], dtype=pl.Int32),
        }
    )
    tail = {"variant": pl.Series([variant] * n, dtype=pl.String)}
    tail["affected"] = pl.Series(affected, dtype=pl.Boolean)
    for name, dtype in list(EXTRA_COLUMNS.items())[2:]:
        if name in extra:
            values = extra[name]
            if dtype == pl.Int32():
                values = np.where(values < 0, None, values)
                tail[name] = pl.Series(name, list(values), dtype=dtype)
            else:
                tail[name] = pl.Series(name, values, dtype=dtype, nan_to_null=True)
        else:
            tail[name] = pl.Series(name, [None] * n, dtype=dtype)
    return images, pl.concat([head, labels, pl.DataFrame(tail)], how="horizontal")
