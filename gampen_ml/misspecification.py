"""Beyond the training distribution: how GaMPEN's posteriors behave on non-Sérsic galaxies.

:func:`evaluate_misspecification` renders every variant of
:mod:`gampen_ml.sim.misspecified` from the *same* Table-1 draws, PSFs and noise
realisations, runs the real MC-dropout catalog (:func:`gampen_ml.catalog.catalog_from_images`
with the profile's passes and draws) and the qualitative flags
(:func:`gampen_ml.flags.compute_flags`) on each, and tabulates per variant and parameter:

* HPD coverage at 68.27 / 95.45 / 99.73 % over the galaxies the variant changes
  (``affected``), and the ``nominal`` control's coverage on the *same* galaxies;
* bias and sigma of the residuals ``mode - true`` (B/T) or ``(mode - true) / true``
  (``re_arcsec``, ``flux_nJy``);
* the fraction flagged by each reliability flag (``unreliable``, and ``asymmetric`` /
  ``psf_outside_library`` when the flags provide them) and the coverage among the galaxies
  not flagged. Each variant's catalog carries the PSF FWHM each galaxy was drawn with, and
  the flags know the library's FWHM range, as an inbox batch with PSF metadata would.

:func:`misspecification_report` writes the table as Markdown and JSON.
:func:`real_galaxy_stamps` / :func:`real_galaxy_report` draw the five AEGIS HST galaxies of
``shared/data/aegis_f814w`` through an HSC-like PSF for a qualitative look (five galaxies
give no statistics: no coverage is computed from them).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import polars as pl

from gampen_ml.calibrate import Recalibration
from gampen_ml.catalog import catalog_from_images
from gampen_ml.config import (
    CREDIBLE_LEVELS,
    PARAMETERS,
    ImagingConfig,
    Profile,
    derive_seed,
)
from gampen_ml.flags import compute_flags, pool_noise_sigma
from gampen_ml.io import atomic_file
from gampen_ml.metrics import LEVEL_TAGS, ab_flux_nJy, covered, residuals
from gampen_ml.sim.misspecified import VARIANTS, render_misspecified
from gampen_ml.sim.noise import NoisePool, draw_noise, read_noise_pool
from gampen_ml.sim.parameters import quantize_sersic_n, sample_parameters
from gampen_ml.sim.psf import fwhm_range, read_psf_library
from gampen_ml.sim.render import SERSIC_N_STEP
from gampen_ml.store import CATALOG_FILE, FLAGS_FILE, LABELS_FILE

#: Flags that mark a posterior as not to be trusted, when the flag table has them.
RELIABILITY_FLAGS: tuple[str, ...] = ("unreliable", "asymmetric", "psf_outside_library")
#: Level tags in the order of :data:`CREDIBLE_LEVELS` (``68``, ``95``, ``99``).
TAGS: tuple[str, ...] = tuple(LEVEL_TAGS.values())

#: Columns of :func:`evaluate_misspecification`'s table, in order.
TABLE_SCHEMA: dict[str, pl.DataType] = {
    "variant": pl.String(),
    "parameter": pl.String(),
    "n_galaxies": pl.Int64(),
    **{f"coverage_{t}": pl.Float64() for t in TAGS},
    **{f"control_coverage_{t}": pl.Float64() for t in TAGS},
    "bias": pl.Float64(),
    "sigma": pl.Float64(),
    "control_bias": pl.Float64(),
    "control_sigma": pl.Float64(),
    "residual_kind": pl.String(),
    "unreliable_fraction": pl.Float64(),
    "control_unreliable_fraction": pl.Float64(),
    "asymmetric_fraction": pl.Float64(),
    "control_asymmetric_fraction": pl.Float64(),
    "psf_outside_library_fraction": pl.Float64(),
    "control_psf_outside_library_fraction": pl.Float64(),
    "n_reliable": pl.Int64(),
    **{f"reliable_coverage_{t}": pl.Float64() for t in TAGS},
    "n_not_flagged": pl.Int64(),
    **{f"not_flagged_coverage_{t}": pl.Float64() for t in TAGS},
}

MD_FILE = "misspecification.md"
JSON_FILE = "misspecification.json"
TABLE_FILE = "misspecification.parquet"


def _frac(mask: np.ndarray) -> float:
    return float(mask.mean()) if mask.size else math.nan


def _stat(x: np.ndarray, fn) -> float:
    return float(fn(x)) if x.size else math.nan


def _flag(flags: pl.DataFrame, name: str) -> np.ndarray | None:
    return flags[name].fill_null(False).to_numpy() if name in flags.columns else None


def variant_table(
    variant: str,
    catalog: pl.DataFrame,
    flags: pl.DataFrame,
    affected: np.ndarray,
    control_catalog: pl.DataFrame,
    control_flags: pl.DataFrame,
) -> pl.DataFrame:
    """Metrics of one variant (rows = parameters; columns = :data:`TABLE_SCHEMA`).

    Parameters
    ----------
    variant : str
        Variant name.
    catalog, flags : pl.DataFrame
        The variant's catalog (with truths) and flags, row-aligned.
    affected : (N,) bool
        Galaxies the variant changed; every metric uses only these rows.
    control_catalog, control_flags : pl.DataFrame
        The ``nominal`` catalog and flags of the same galaxies, row-aligned.
    """
    if not (catalog.height == flags.height == control_catalog.height == len(affected)):
        raise ValueError(
            f"variant {variant}: catalog {catalog.height}, flags {flags.height}, control "
            f"{control_catalog.height} and affected {len(affected)} rows differ"
        )
    affected = np.asarray(affected, dtype=bool)
    cat, ctl = catalog.filter(affected), control_catalog.filter(affected)
    fl, cfl = flags.filter(affected), control_flags.filter(affected)
    per_flag = {name: _flag(fl, name) for name in RELIABILITY_FLAGS}
    per_flag_ctl = {name: _flag(cfl, name) for name in RELIABILITY_FLAGS}
    unreliable = per_flag["unreliable"]
    if unreliable is None:
        raise ValueError(f"variant {variant}: flags lack the 'unreliable' column")
    any_flag = np.zeros(cat.height, dtype=bool)
    for mask in per_flag.values():
        if mask is not None:
            any_flag |= mask
    rows = []
    for p in PARAMETERS:
        fractional = p != "bt"
        res, res_ctl = (residuals(c, p, fractional=fractional) for c in (cat, ctl))
        row: dict[str, object] = {"variant": variant, "parameter": p, "n_galaxies": cat.height}
        for tag, level in zip(TAGS, CREDIBLE_LEVELS, strict=True):
            row[f"coverage_{tag}"] = _frac(covered(cat, p, level))
        for tag, level in zip(TAGS, CREDIBLE_LEVELS, strict=True):
            row[f"control_coverage_{tag}"] = _frac(covered(ctl, p, level))
        row.update(
            bias=_stat(res, np.mean),
            sigma=_stat(res, np.std),
            control_bias=_stat(res_ctl, np.mean),
            control_sigma=_stat(res_ctl, np.std),
            residual_kind="mode - true" if p == "bt" else "(mode - true) / true",
        )
        for name in RELIABILITY_FLAGS:
            m, mc = per_flag[name], per_flag_ctl[name]
            row[f"{name}_fraction"] = math.nan if m is None else _frac(m)
            row[f"control_{name}_fraction"] = math.nan if mc is None else _frac(mc)
        row["n_reliable"] = int((~unreliable).sum())
        for tag, level in zip(TAGS, CREDIBLE_LEVELS, strict=True):
            row[f"reliable_coverage_{tag}"] = _frac(covered(cat, p, level)[~unreliable])
        row["n_not_flagged"] = int((~any_flag).sum())
        for tag, level in zip(TAGS, CREDIBLE_LEVELS, strict=True):
            row[f"not_flagged_coverage_{tag}"] = _frac(covered(cat, p, level)[~any_flag])
        rows.append(row)
    return pl.DataFrame(rows, schema=TABLE_SCHEMA)


def _as_recalibration(recalibration) -> Recalibration | None:
    if recalibration is None or isinstance(recalibration, Recalibration):
        return recalibration
    if isinstance(recalibration, Mapping):
        return Recalibration.from_dict(dict(recalibration))
    path = Path(recalibration)
    return Recalibration.from_dict(json.loads(path.read_text()))


def evaluate_misspecification(
    profile: Profile,
    model_dir: Path | str,
    psf_dir: Path | str,
    noise_dir: Path | str,
    out_dir: Path | str,
    *,
    n_per_variant: int,
    seed: int,
    device: str | None = None,
    recalibration: Recalibration | Mapping | Path | str | None = None,
    variants: tuple[str, ...] = VARIANTS,
    log=None,
) -> pl.DataFrame:
    """Coverage, residuals and flags of a trained model on every misspecified variant.

    Parameters
    ----------
    profile : Profile
        Priors, imaging, flags thresholds, MC passes (``inference.n_passes``,
        ``draws_per_pass``, ``galaxies_per_batch``).
    model_dir : path-like
        ``trained_model`` folder (``gampen_ml.train.load_trained_model``).
    psf_dir, noise_dir : path-like
        The PSF library and noise pool the model was trained with.
    out_dir : path-like
        Receives ``<variant>/catalog.parquet``, ``flags.parquet``, ``labels.parquet``,
        ``examples.png`` and :data:`TABLE_FILE`.
    n_per_variant : int
        Galaxies per variant (the same Table-1 draws for every variant).
    seed : int
        Seed of the parameters, PSFs, noise, variant parameters and MC dropout.
    device : str, optional
        Torch device.
    recalibration : Recalibration, dict, path of ``recalibration.json``, optional
        The calibrated spread recalibration of the model.
    variants : tuple of str
        Variants to run; ``nominal`` (the control) is always run.
    log : callable(str), optional
        Progress lines.

    Returns
    -------
    pl.DataFrame
        :data:`TABLE_SCHEMA`, one row per (variant, parameter).
    """
    from gampen_ml import plots
    from gampen_ml.train import load_trained_model

    log = log or (lambda line: None)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    recal = _as_recalibration(recalibration)
    model, scaler, meta = load_trained_model(model_dir, device)
    if int(meta["image_px"]) != profile.imaging.stamp_size_px:
        raise ValueError(
            f"{Path(model_dir) / 'model.json'}: image_px {meta['image_px']} differs from "
            f"profile {profile.name!r} stamp size {profile.imaging.stamp_size_px}"
        )
    cube, psf_table = read_psf_library(psf_dir)
    library_range = fwhm_range(psf_table)
    pool = read_noise_pool(noise_dir)
    sigma, (lo, hi) = pool_noise_sigma(pool), profile.noise.depth_scale_range
    noise_sigma = (sigma * lo, sigma * hi)
    rng = np.random.default_rng(derive_seed(seed, "misspecification", "parameters"))
    params = sample_parameters(profile.simulation.priors, n_per_variant, rng)
    params = quantize_sersic_n(params, SERSIC_N_STEP).with_columns(
        pl.Series("galaxy_id", np.arange(n_per_variant), dtype=pl.Int64)
    )
    render_seed = derive_seed(seed, "misspecification", "render")
    mc_seed = derive_seed(seed, "misspecification", "mc_dropout")
    inference = profile.inference
    run = ("nominal", *[v for v in variants if v != "nominal"])
    catalogs, flag_tables, labels_by, examples = {}, {}, {}, {}
    for variant in run:
        images, labels = render_misspecified(
            variant, params, cube, pool, profile.imaging, render_seed, psf_cfg=profile.psf
        )
        catalog = catalog_from_images(
            model,
            scaler,
            images,
            labels.select("galaxy_id", "psf_fwhm_arcsec"),
            n_passes=inference.n_passes,
            draws_per_pass=inference.draws_per_pass,
            seed=mc_seed,
            recalibration=recal,
            truths=labels.select(*PARAMETERS, "component"),
            dataset=f"misspecified-{variant}",
            galaxies_per_batch=inference.galaxies_per_batch,
            flags=profile.flags,
            device=device,
        )
        flags = compute_flags(
            catalog,
            profile.flags,
            psf_fwhm_range=library_range,
            noise_sigma_nJy=noise_sigma,
            priors=profile.simulation.priors,
        )
        folder = out_dir / variant
        folder.mkdir(exist_ok=True)
        catalog.write_parquet(folder / CATALOG_FILE)
        flags.write_parquet(folder / FLAGS_FILE)
        labels.write_parquet(folder / LABELS_FILE)
        catalogs[variant], flag_tables[variant], labels_by[variant] = catalog, flags, labels
        examples[variant] = np.array(images[: min(6, len(images))])
        log(f"{variant}: {catalog.height} galaxies catalogued")
    tables = [
        variant_table(
            v,
            catalogs[v],
            flag_tables[v],
            labels_by[v]["affected"].to_numpy(),
            catalogs["nominal"],
            flag_tables["nominal"],
        )
        for v in run
    ]
    table = pl.concat(tables)
    table.write_parquet(out_dir / TABLE_FILE)
    grid = np.concatenate([examples[v] for v in run])
    titles = [f"{v} #{i}" for v in run for i in range(len(examples[v]))]
    plots.save_figure(
        plots.thumbnail_grid(grid, titles, ncols=len(examples["nominal"])),
        out_dir / "examples.png",
    )
    return table


def _fmt(x: object, digits: int = 3) -> str:
    if isinstance(x, float):
        return "–" if not math.isfinite(x) else f"{x:.{digits}f}"
    return str(x)


def _pct(x: float) -> str:
    return "–" if not math.isfinite(x) else f"{100 * x:.1f}"


def misspecification_markdown(table: pl.DataFrame) -> str:
    """The table as Markdown: one block per variant (percentages for coverage and fractions)."""
    lines = [
        "| variant | parameter | N | coverage 68/95/99 % | control 68/95/99 % | bias | σ "
        "| control bias / σ | unreliable % (control) | asymmetric % (control) "
        "| PSF outside library % (control) "
        "| coverage 68/95/99 % not unreliable (N) | coverage 68/95/99 % not flagged (N) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in table.iter_rows(named=True):
        cov = "/".join(_pct(r[f"coverage_{t}"]) for t in TAGS)
        ctl = "/".join(_pct(r[f"control_coverage_{t}"]) for t in TAGS)
        rel = "/".join(_pct(r[f"reliable_coverage_{t}"]) for t in TAGS)
        nfl = "/".join(_pct(r[f"not_flagged_coverage_{t}"]) for t in TAGS)
        lines.append(
            f"| {r['variant']} | {r['parameter']} | {r['n_galaxies']} | {cov} | {ctl} "
            f"| {_fmt(r['bias'])} | {_fmt(r['sigma'])} "
            f"| {_fmt(r['control_bias'])} / {_fmt(r['control_sigma'])} "
            f"| {_pct(r['unreliable_fraction'])} ({_pct(r['control_unreliable_fraction'])}) "
            f"| {_pct(r['asymmetric_fraction'])} ({_pct(r['control_asymmetric_fraction'])}) "
            f"| {_pct(r['psf_outside_library_fraction'])} "
            f"({_pct(r['control_psf_outside_library_fraction'])}) "
            f"| {rel} ({r['n_reliable']}) | {nfl} ({r['n_not_flagged']}) |"
        )
    return "\n".join(lines) + "\n"


def misspecification_report(
    table: pl.DataFrame, out_dir: Path | str, *, title: str = "Beyond the training distribution"
) -> tuple[Path, Path]:
    """Write ``misspecification.md`` and ``misspecification.json`` into ``out_dir``.

    Parameters
    ----------
    table : pl.DataFrame
        :func:`evaluate_misspecification` output (:data:`TABLE_SCHEMA`).
    out_dir : path-like
        Folder (created if missing).

    Returns
    -------
    (Path, Path)
        The Markdown and JSON files.
    """
    missing = [c for c in TABLE_SCHEMA if c not in table.columns]
    if missing:
        raise ValueError(f"misspecification_report: table lacks column(s) {missing}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / MD_FILE
    js = out_dir / JSON_FILE
    text = (
        f"# {title}\n\n"
        "Coverage = fraction of true values inside the HPD interval, over the galaxies the "
        "variant changes; control = the nominal (training-distribution) catalog of the same "
        "galaxies. Residuals: B/T `mode - true`; Re and flux `(mode - true) / true`. "
        "`asymmetric`: image asymmetry above its limit; `psf_outside_library`: the cutout's "
        "PSF FWHM lies outside the training PSF library's range (when the flags provide "
        "them); `unreliable`: either of them or `out_of_domain` (not detected, flux or sky "
        "noise unlike training, prediction outside the prior).\n\n"
        + misspecification_markdown(table)
    )
    with atomic_file(md) as tmp:
        tmp.write_text(text)
    payload = {
        "created_utc": datetime.now(UTC).isoformat(timespec="seconds"),
        "rows": [
            {
                k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                for k, v in r.items()
            }
            for r in table.iter_rows(named=True)
        ],
    }
    with atomic_file(js) as tmp:
        tmp.write_text(json.dumps(payload, indent=2) + "\n")
    return md, js


# --- real HST galaxies (qualitative) ---------------------------------------------------


def real_galaxy_stamps(
    catalog_file: Path | str,
    imaging: ImagingConfig,
    psf_image: np.ndarray,
    noise_pool: NoisePool,
    *,
    seed: int,
    dilation: float = 3.0,
    brighten_mag: float = 4.5,
) -> tuple[np.ndarray, pl.DataFrame]:
    """HST real galaxies drawn as HSC-like stamps (``galsim.RealGalaxy``, nothing downloaded).

    Each galaxy of the GalSim real-galaxy catalog is deconvolved from its HST PSF
    (GalSim's ``RealGalaxy``), made ``dilation`` times larger and ``brighten_mag``
    magnitudes brighter than catalogued (roughly a z ~ 0.7 galaxy moved to the paper's
    z = 0.125; no k-correction), convolved with ``psf_image`` at the survey pixel scale,
    and given noise from ``noise_pool``. The catalog's correlated-noise file is replaced by
    GalSim's shipped ``acs_I_unrot_sci_20_cf.fits`` (same ACS F814W model). Brightening
    would scale the HST noise up too, so only pixels detected above 2 sigma (after a 1.5 px
    Gaussian smoothing) are kept before the deconvolution.

    Returns
    -------
    images : (N, S, S) float32
        nJy per pixel.
    table : pl.DataFrame
        ``galaxy_id``, ``ident``, ``catalog_mag``, ``magnitude_drawn`` and ``flux_nJy`` (as
        drawn), ``dilation``.
    """
    import galsim

    catalog_file = Path(catalog_file)
    rgc = galsim.RealGalaxyCatalog(catalog_file.name, dir=str(catalog_file.parent))
    shipped = os.path.join(galsim.meta_data.share_dir, "acs_I_unrot_sci_20_cf.fits")
    rgc.noise_file_name = [shipped] * rgc.nobjects
    dx, s = imaging.pixel_scale_arcsec, imaging.stamp_size_px
    psf = galsim.InterpolatedImage(galsim.Image(np.asarray(psf_image, dtype=np.float64), scale=dx))
    mags = np.asarray(rgc.mag, dtype=np.float64)
    flux = ab_flux_nJy(mags - brighten_mag)
    rng = np.random.default_rng(seed)
    images = np.empty((rgc.nobjects, s, s), dtype=np.float32)
    from scipy.ndimage import gaussian_filter

    for i in range(rgc.nobjects):  # five galaxies
        # Scaling the flux up scales the HST noise with it: keep only the pixels detected
        # above 2 sigma (smoothed, 1.5 HST px) so the stamp's own noise and edges vanish.
        hst = rgc.getGalImage(i)
        arr = hst.array.astype(np.float64)
        border = np.concatenate([arr[0], arr[-1], arr[1:-1, 0], arr[1:-1, -1]])
        arr = arr - np.median(border)  # the stamps keep a sky pedestal (NOISE_MEAN)
        sigma_hst = float(np.sqrt(rgc.variance[i]))
        smooth = gaussian_filter(arr, 1.5)
        keep = smooth > 2.0 * sigma_hst / (2.0 * np.sqrt(np.pi) * 1.5)
        clean = galsim.Image(np.where(keep, arr, 0.0), scale=hst.scale)
        noise_image, noise_scale, var = rgc.getNoiseProperties(i)
        gal = galsim.RealGalaxy(
            (clean, rgc.getPSFImage(i), noise_image, noise_scale, var), flux=float(flux[i])
        ).dilate(dilation)
        image = galsim.Convolve(gal, psf).drawImage(nx=s, ny=s, scale=dx, method="no_pixel")
        images[i] = image.array + draw_noise(noise_pool, (s, s), rng)
    table = pl.DataFrame(
        {
            "galaxy_id": pl.Series(np.arange(rgc.nobjects), dtype=pl.Int64),
            "ident": pl.Series(np.asarray(rgc.ident).astype(str), dtype=pl.String),
            "catalog_mag": mags,
            "magnitude_drawn": mags - brighten_mag,
            "flux_nJy": flux,
            "dilation": np.full(rgc.nobjects, dilation),
        }
    )
    return images, table


def real_galaxy_report(
    profile: Profile,
    model_dir: Path | str,
    psf_dir: Path | str,
    noise_dir: Path | str,
    catalog_file: Path | str,
    out_dir: Path | str,
    *,
    seed: int,
    device: str | None = None,
    recalibration: Recalibration | Mapping | Path | str | None = None,
) -> tuple[pl.DataFrame, Path]:
    """Posteriors of the real HST galaxies and a figure of their stamps with the results.

    The library PSF whose FWHM is closest to the library median is used. Writes
    ``real_galaxies.parquet`` (catalog + ``ident``) and ``real_galaxies.png`` into
    ``out_dir``. Returns ``(catalog, png path)``.
    """
    from gampen_ml import plots
    from gampen_ml.train import load_trained_model

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cube, psf_table = read_psf_library(psf_dir)
    fwhm = psf_table["measured_fwhm_arcsec"].to_numpy()
    psf_id = int(np.argmin(np.abs(fwhm - np.median(fwhm))))
    pool = read_noise_pool(noise_dir)
    images, table = real_galaxy_stamps(catalog_file, profile.imaging, cube[psf_id], pool, seed=seed)
    model, scaler, _ = load_trained_model(model_dir, device)
    inference = profile.inference
    catalog = catalog_from_images(
        model,
        scaler,
        images,
        table.select("galaxy_id"),
        n_passes=inference.n_passes,
        draws_per_pass=inference.draws_per_pass,
        seed=derive_seed(seed, "misspecification", "real"),
        recalibration=_as_recalibration(recalibration),
        dataset="aegis-f814w",
        galaxies_per_batch=inference.galaxies_per_batch,
        flags=profile.flags,
        device=device,
    )
    flags = compute_flags(catalog, profile.flags, psf_fwhm_range=fwhm_range(psf_table))
    out = pl.concat(
        [
            table.select("ident", "catalog_mag", "magnitude_drawn", "dilation"),
            catalog,
            flags.drop("galaxy_id", "dataset"),
        ],
        how="horizontal",
    )
    out.write_parquet(out_dir / "real_galaxies.parquet")
    titles = []
    for r in out.iter_rows(named=True):
        titles.append(
            f"{r['ident']}  B/T {r['bt_mode']:.2f} [{r['bt_hpd68_lo']:.2f},{r['bt_hpd68_hi']:.2f}]\n"
            f'Re {r["re_arcsec_mode"]:.2f}" [{r["re_arcsec_hpd68_lo"]:.2f},'
            f"{r['re_arcsec_hpd68_hi']:.2f}]\n"
            f"mag {r['magnitude_mode']:.2f} (drawn {r['magnitude_drawn']:.2f})"
        )
    png = plots.save_figure(
        plots.thumbnail_grid(images, titles, ncols=len(images)), out_dir / "real_galaxies.png"
    )
    return out, png
