"""Inputs and training data: the PSF library, the sky-noise pool and the simulated shards.

Each asset writes one partition folder of the store (``GampenSettings.store()``) through
``Store.publish`` and returns only metadata.
"""

import numpy as np
from dagster import (
    AssetExecutionContext,
    AssetKey,
    MaterializeResult,
    MetadataValue,
    StaticPartitionsDefinition,
)

from gampen_assets.assets._common import AssetRun, fail_fast_on_bad_input, gampen_asset
from gampen_assets.assets._metadata import folder_version
from gampen_assets.resources import GampenSettings, load_time_profile
from gampen_ml import plots, stages
from gampen_ml.config import shard_keys
from gampen_ml.store import NOISE_POOL, PSF_LIBRARY, SIMULATED_GALAXIES

#: One partition per simulation shard of the profile the definitions were loaded with.
shard_partitions = StaticPartitionsDefinition(shard_keys(load_time_profile()))

GROUP = "inputs"


@gampen_asset(
    GROUP,
    code_version="1",
    kinds={"python", "fits"},
    description=(
        'PSF images at the survey pixel scale (HSC g band, 0.168"/px): a synthetic '
        "Moffat library with the profile's seeing distribution, or the real PSF FITS files "
        "of profile.psf.source_dir. Files: psfs.fits (unit-sum cube) + psfs.parquet."
    ),
)
def psf_library(context: AssetExecutionContext, settings: GampenSettings) -> MaterializeResult:
    run = AssetRun.start(context, settings)
    profile = settings.profile()
    out = run.store.psf_library()
    with fail_fast_on_bad_input():
        cube, table = stages.build_psf_library(profile, out, log=context.log.info)
    version = folder_version(out)
    fwhm = table["fwhm_arcsec"].to_numpy() if "fwhm_arcsec" in table.columns else None
    metadata = {
        "dagster/row_count": len(table),
        "n_psfs": float(len(table)),
        "stamp_px": int(cube.shape[-1]),
        "source": profile.psf.source_dir or "synthetic",
        "max_abs_sum_minus_1": float(np.max(np.abs(cube.sum(axis=(1, 2)) - 1.0))),
        "path": MetadataValue.path(str(out)),
        "profile": profile.name,
        "psf_thumbnails": MetadataValue.md(
            plots.png_markdown(plots.thumbnail_grid(cube[:16]), title="PSFs")
        ),
    }
    if fwhm is not None:
        metadata |= {
            "fwhm_median_arcsec": float(np.median(fwhm)),
            "fwhm_min_arcsec": float(np.min(fwhm)),
            "fwhm_max_arcsec": float(np.max(fwhm)),
        }
    inputs = [profile.psf.source_dir] if profile.psf.source_dir else []
    return run.result(PSF_LIBRARY, version, metadata, input_paths=inputs, row_count=len(table))


@gampen_asset(
    GROUP,
    code_version="1",
    kinds={"python", "numpy"},
    description=(
        "Sky-noise pixel pool: synthetic sky at the profile's depth (optionally GalSim "
        "correlated noise), or the real 'sky object' FITS cutouts of profile.noise.source_dir. "
        "Noise arrays are drawn from the pooled pixels as in the paper."
    ),
)
def noise_pool(context: AssetExecutionContext, settings: GampenSettings) -> MaterializeResult:
    run = AssetRun.start(context, settings)
    profile = settings.profile()
    out = run.store.noise_pool()
    with fail_fast_on_bad_input():
        pool = stages.build_noise_pool(profile, out, log=context.log.info)
    version = folder_version(out)
    stats = pool.statistics()
    metadata = {
        "dagster/row_count": stats["n_pixels"],
        "n_pixels": float(stats["n_pixels"]),
        "n_sky_objects": float(stats["n_sky_objects"]),
        "pixel_mean_nJy": float(stats["mean_nJy"]),
        "pixel_std_nJy": float(stats["std_nJy"]),
        "pixel_mad_sigma_nJy": float(stats["mad_sigma_nJy"]),
        "configured_sigma_nJy": float(profile.noise.sky_sigma_nJy),
        "correlated": bool(pool.correlated),
        "source": profile.noise.source_dir or "synthetic",
        "path": MetadataValue.path(str(out)),
        "sky_objects": MetadataValue.md(
            plots.png_markdown(plots.thumbnail_grid(np.asarray(pool.sky_objects[:16])), title="sky")
        ),
    }
    inputs = [profile.noise.source_dir] if profile.noise.source_dir else []
    return run.result(
        NOISE_POOL, version, metadata, input_paths=inputs, row_count=stats["n_pixels"]
    )


@gampen_asset(
    GROUP,
    code_version="1",
    kinds={"galsim", "numpy", "parquet"},
    partitions_def=shard_partitions,
    deps=[AssetKey(PSF_LIBRARY), AssetKey(NOISE_POOL)],
    description=(
        "One shard of GalSim bulge+disk / single-Sersic galaxies with the paper's Table-1 "
        "priors, PSF-convolved and with pooled sky noise. images.npy (N, S, S) float32 nJy/px "
        "(memory-mappable) + labels.parquet (truths, split 70/15/15, seeds, PSF ids)."
    ),
)
def simulated_galaxies(
    context: AssetExecutionContext, settings: GampenSettings
) -> MaterializeResult:
    from gampen_ml.sim import shards

    run = AssetRun.start(context, settings)
    profile, store = settings.profile(), run.store
    key = context.partition_key
    with fail_fast_on_bad_input():
        settings.require_partition(key, shard_keys(profile), "simulation shard")
    out = store.shard(key)
    context.log.info(f"simulating {key} of profile {profile.name} into {out}")
    with fail_fast_on_bad_input():
        summary = stages.simulate_and_publish(profile, store, key)
    version = folder_version(out)
    images, labels = shards.open_shard(out)
    counts = labels.group_by("split").len()
    split_counts = {row["split"]: int(row["len"]) for row in counts.iter_rows(named=True)}
    components = labels.group_by("component").len()
    metadata = {
        "dagster/row_count": labels.height,
        "n_galaxies": float(labels.height),
        **{f"n_{split}": float(split_counts.get(split, 0)) for split in ("train", "val", "test")},
        **{
            f"n_{row['component'].replace('+', '_')}": float(row["len"])
            for row in components.iter_rows(named=True)
        },
        "bt_mean": float(labels["bt"].mean()),
        "re_arcsec_median": float(labels["re_arcsec"].median()),
        "magnitude_median": float(labels["magnitude"].median()),
        "image_shape": str(tuple(images.shape)),
        "wall_s": float(summary.wall_s),
        "n_workers": float(summary.n_workers),
        "path": MetadataValue.path(str(out)),
        "examples": MetadataValue.md(
            plots.png_markdown(plots.thumbnail_grid(np.asarray(images[:16])), title="galaxies")
        ),
    }
    return run.result(
        SIMULATED_GALAXIES,
        version,
        metadata,
        partition=key,
        upstream=[run.upstream(PSF_LIBRARY), run.upstream(NOISE_POOL)],
        input_paths=[store.psf_library(), store.noise_pool()],
        row_count=labels.height,
    )
