"""One function per pipeline stage: the unit of work of one asset, or of one CLI command.

Both ``gampen_assets`` (Dagster) and ``gampen_ml.cli`` call these, so the two ways of
running the platform cannot drift apart. Each takes a profile and folders under the
storage root (``gampen_ml.io.partition_dir``) and publishes its output atomically.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from gampen_ml.calibrate import (
    FLOOR_GRID,
    RECALIBRATION_LEVELS,
    Recalibration,
    calibration_groups,
    coverage_table,
    fit_mean_shift,
    fit_recalibration,
    fit_spread_profile,
    search_physical_recalibration,
    select_dropout_rate,
    shift_means,
    stretch_by_mean,
)
from gampen_ml.catalog import SAMPLES_FILE, catalog_from_images
from gampen_ml.config import (
    PARAMETERS,
    ConfigError,
    PriorConfig,
    Profile,
    derive_seed,
    dropout_key,
    shard_keys,
)
from gampen_ml.data.datasets import ShardImages
from gampen_ml.data.transforms import LabelScaler
from gampen_ml.infer import predict_physical
from gampen_ml.io import atomic_partition_dir, load_npy_mmap, partition_dir
from gampen_ml.posterior import summarize
from gampen_ml.registry import registered_model_name
from gampen_ml.sim import noise, psf

if TYPE_CHECKING:
    from gampen_ml.config import ImagingConfig
    from gampen_ml.domains import Domain
    from gampen_ml.sim.shards import ShardSummary

#: Dataset key of the simulated test split.
SIM_TEST = "sim-test"
#: Written beside each published model: its MLflow run id, registered name and version.
REGISTRY_FILE = "registry.json"


def _quiet(line: str) -> None:
    """Default ``log`` callable: drop the line."""


def build_psf_library(
    profile: Profile, out_dir: Path, log: Callable[[str], None] = _quiet
) -> tuple[np.ndarray, pl.DataFrame]:
    """Write the PSF library (real PSFs of ``profile.psf.source_dir``, else synthetic).

    Returns the ``(n_psf, s, s)`` float32 unit-sum cube and its property table.
    """
    if profile.psf.source_dir:
        log(f"loading real PSFs from {profile.psf.source_dir}")
        cube, table = psf.load_psf_folder(profile.psf.source_dir, profile.imaging)
    else:
        seed = derive_seed(profile.seed, "psf_library")
        log(f"drawing {profile.psf.n_psfs} synthetic PSFs (seed {seed})")
        cube, table = psf.synthetic_psf_library(profile.psf, profile.imaging, seed)
    with atomic_partition_dir(out_dir) as tmp:
        psf.write_psf_library(tmp, cube, table)
    return cube, table


def build_noise_pool(
    profile: Profile, out_dir: Path, log: Callable[[str], None] = _quiet
) -> noise.NoisePool:
    """Write the sky-noise pool (real sky objects of ``profile.noise.source_dir``, else synthetic)."""
    if profile.noise.source_dir:
        log(f"loading sky objects from {profile.noise.source_dir}")
        pool = noise.load_sky_folder(profile.noise.source_dir, profile.imaging)
    else:
        seed = derive_seed(profile.seed, "noise_pool")
        log(f"drawing {profile.noise.n_sky_objects} synthetic sky objects (seed {seed})")
        pool = noise.synthetic_noise_pool(profile.noise, profile.imaging, seed)
    with atomic_partition_dir(out_dir) as tmp:
        noise.write_noise_pool(tmp, pool)
    return pool


def shard_dirs(profile: Profile, root: Path) -> list[Path]:
    """Folders of every ``simulated_galaxies`` shard of ``profile`` under ``root``."""
    return [partition_dir(root, "simulated_galaxies", key) for key in shard_keys(profile)]


def simulate_inputs(
    profile: Profile,
    root: Path,
    keys: Sequence[str] | None = None,
    *,
    n_workers: int = 1,
    log: Callable[[str], None] = _quiet,
) -> Iterator[tuple[str, ShardSummary]]:
    """PSF library, noise pool, then each simulated shard of ``keys`` (default: all) under ``root``.

    A generator: yields ``(shard key, summary)`` as each shard is published, so callers can
    show progress; exhaust it (``list(...)``) to simply build everything.
    """
    from gampen_ml.sim.shards import simulate_shard

    keys = list(shard_keys(profile) if keys is None else keys)
    unknown = sorted(set(keys) - set(shard_keys(profile)))
    if unknown:
        raise ConfigError(f"shards {unknown} are not shards of profile {profile.name!r}")
    psf_dir, noise_dir = partition_dir(root, "psf_library"), partition_dir(root, "noise_pool")
    build_psf_library(profile, psf_dir, log=log)
    build_noise_pool(profile, noise_dir, log=log)
    for key in keys:
        with atomic_partition_dir(partition_dir(root, "simulated_galaxies", key)) as tmp:
            summary = simulate_shard(profile, key, psf_dir, noise_dir, tmp, n_workers=n_workers)
        yield key, summary


def train_and_publish(
    profile: Profile,
    dropout_rate: float,
    root: Path,
    *,
    device: str | None = None,
    progress: bool = False,
    log: Callable[[str], None] = _quiet,
    mlflow_tracking_uri: str | None = None,
    mlflow_artifact_location: str | None = None,
):
    """Train one model on every shard and publish it at ``trained_model/dropout-R``.

    Training runs in a fixed hidden work folder beside the partition, so a killed run
    resumes from its last checkpoint; the finished model is then renamed into place
    atomically. Returns the :class:`gampen_ml.train.TrainResult`.
    """
    from gampen_ml.train import train_model

    key = dropout_key(dropout_rate)
    out = partition_dir(root, "trained_model", key)
    work = out.parent / f".work-{key}"
    result = train_model(
        profile,
        dropout_rate,
        shard_dirs(profile, root),
        work,
        device=device,
        resume=True,
        progress=progress,
        log=log,
        mlflow_tracking_uri=mlflow_tracking_uri,
        mlflow_artifact_location=mlflow_artifact_location,
    )
    registry = {
        "mlflow_run_id": result.mlflow_run_id,
        "model_name": registered_model_name(profile.name),
        "model_version": str(result.model_version) if result.model_version else None,
    }
    with atomic_partition_dir(out) as tmp:
        shutil.copytree(work, tmp, dirs_exist_ok=True)
        (tmp / REGISTRY_FILE).write_text(json.dumps(registry, indent=2) + "\n")
    shutil.rmtree(work, ignore_errors=True)
    return result


#: Columns of the simulation labels that a catalog keeps as truths.
TRUTH_COLUMNS = (*PARAMETERS, "component")


class SplitImages:
    """Lazy ``(N, S, S)`` float32 view of one split over several shards.

    Slicing (``view[a:b]``) gathers only those galaxies from the memory-mapped shards, so
    MC-dropout inference streams a split of any size in chunks.
    """

    def __init__(self, data: ShardImages) -> None:
        self._data = data
        self.shape = (len(data), data.image_px, data.image_px)
        self.ndim = 3
        self.dtype = np.dtype(np.float32)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, item: slice) -> np.ndarray:
        if not isinstance(item, slice):
            raise TypeError(f"SplitImages supports slices only, got {type(item).__name__}")
        return self._data.images(np.arange(self.shape[0])[item])


def split_inputs(
    shard_dirs: Sequence[Path | str], split: str
) -> tuple[SplitImages, pl.DataFrame, pl.DataFrame]:
    """Images, meta (``galaxy_id``, ``psf_id``) and truths of one split of the simulated shards."""
    data = ShardImages(shard_dirs, split)
    meta = data.labels.select("galaxy_id", "psf_id")
    return SplitImages(data), meta, data.labels.select(TRUTH_COLUMNS)


@dataclass
class CalibrationResult:
    """Outcome of :func:`calibrate_dropout_rates`.

    Attributes
    ----------
    chosen_rate : float
        Dropout rate whose raw validation coverage is closest to nominal.
    coverage : pl.DataFrame
        Coverage table (``docs/catalog.md``): every rate raw, plus the chosen rate
        recalibrated when a recalibration was fit.
    recalibration : Recalibration or None
        Spread factors fit on validation (``profile.calibration.recalibrate``).
    n_galaxies : int
        Validation galaxies.
    """

    chosen_rate: float
    coverage: pl.DataFrame
    recalibration: Recalibration | None
    n_galaxies: int


def calibrate_dropout_rates(
    profile: Profile,
    model_dirs: Mapping[float, Path],
    shard_dirs: Sequence[Path | str],
    out_dir: Path,
    *,
    device: str | None = None,
    log: Callable[[str], None] = _quiet,
) -> CalibrationResult:
    """Coverage of every dropout model on the validation split; choose; recalibrate (paper §5).

    Writes ``coverage.parquet`` and, when recalibrating, ``recalibration.json`` into
    ``out_dir``. Validation samples are written to ``out_dir/<dropout-key>/`` while working
    and removed at the end.
    """
    from gampen_ml.train import load_trained_model

    images, meta, truths = split_inputs(shard_dirs, "val")
    inference = profile.inference
    levels = profile.calibration.levels
    tables = []
    scalers = {}
    for rate, model_dir in model_dirs.items():
        model, scaler, _ = load_trained_model(model_dir, device)
        scalers[rate] = scaler
        catalog = catalog_from_images(
            model,
            scaler,
            images,
            meta,
            n_passes=inference.n_passes_calibration,
            draws_per_pass=inference.draws_per_pass,
            seed=derive_seed(profile.seed, "calibrated_dropout_rate", dropout_key(rate)),
            store_samples=True,
            out_dir=out_dir / dropout_key(rate),
            truths=truths,
            dataset="sim-val",
            dropout_rate=rate,
            galaxies_per_batch=inference.galaxies_per_batch,
            flags=profile.flags,
            device=device,
        )
        table = coverage_table(catalog, None, levels, dropout_rate=rate, split="val")
        tables.append(table)
        log(
            f"dropout {rate:g}: val coverage "
            + ", ".join(
                f"{r['parameter']}@{r['level']:.4f}={r['coverage']:.3f}"
                for r in table.iter_rows(named=True)
            )
        )
    # Recalibrate every candidate, then take the sharpest of those within the coverage
    # tolerance: coverage alone would prefer a model that never converged but whose wide
    # posteriors cover the truth (benchmarks/results/gpu.md, paper-short run).
    recalibrations: dict[float, Recalibration | None] = {}
    sharpness: dict[float, float] = {}
    for rate in model_dirs:
        samples = np.asarray(
            load_npy_mmap(out_dir / dropout_key(rate) / SAMPLES_FILE), dtype=np.float32
        )
        recalibrations[rate] = None
        if profile.calibration.recalibrate:
            raw = next(t for t in tables if t["dropout_rate"][0] == rate)
            recalibration, recalibrated = recalibrate_on_validation(
                samples,
                scalers[rate],
                truths,
                raw,
                levels,
                rate,
                log,
                spread_drivers=profile.calibration.spread_drivers,
            )
            recalibrations[rate] = recalibration
            tables.append(recalibrated)
            samples = recalibration.apply(samples)
        # Sharpness: mean posterior standard deviation in the standardized label space.
        sharpness[rate] = float(samples.std(axis=1).mean())
    chosen = select_dropout_rate(
        tables,
        recalibrated=profile.calibration.recalibrate,
        sharpness=sharpness,
        tolerance=profile.calibration.coverage_tolerance,
    )
    log(
        "mean posterior std (scaled units): "
        + ", ".join(f"dropout {r:g}: {v:.3f}" for r, v in sharpness.items())
        + f"; chosen dropout {chosen:g}"
    )
    recalibration = recalibrations[chosen]
    if recalibration is not None:
        (out_dir / "recalibration.json").write_text(
            json.dumps(recalibration.to_dict(), indent=2) + "\n"
        )
        log(f"recalibration scales {recalibration.scale}, exponents {recalibration.exponent}")
    for rate in model_dirs:
        sample_dir = out_dir / dropout_key(rate)
        (sample_dir / SAMPLES_FILE).unlink(missing_ok=True)
        sample_dir.rmdir()
    coverage = pl.concat(tables)
    coverage.write_parquet(out_dir / "coverage.parquet")
    return CalibrationResult(chosen, coverage, recalibration, len(images))


def recalibrate_on_validation(
    samples: np.ndarray,
    scaler: LabelScaler,
    truths: pl.DataFrame,
    raw: pl.DataFrame,
    levels: Sequence[float],
    rate: float,
    log: Callable[[str], None],
    spread_drivers: Sequence[str] | None = None,
) -> tuple[Recalibration, pl.DataFrame]:
    """Fit one model's recalibration on validation; return it and the coverage it gives.

    First the mean shift (:func:`gampen_ml.calibrate.fit_mean_shift`: the validation bias
    as a function of the predicted mean), with ``spread_drivers`` (parameter names, one per
    parameter) a relative width profile over the predicted mean of the named parameter
    (:func:`gampen_ml.calibrate.fit_spread_profile`), then, per parameter, the exact scaled-space fit of
    tail exponent, spread factor and error floor (:func:`gampen_ml.calibrate.fit_recalibration`,
    judged also on the 68.27 % coverage in bins of true size and magnitude,
    :func:`gampen_ml.calibrate.calibration_groups`) is the starting candidate of a search on
    the *physical* coverage at ``levels``
    (:func:`gampen_ml.calibrate.search_physical_recalibration`): the catalog reports
    physical HPD intervals, which are not the image of the scaled ones (B/T: point masses
    at exactly 0 and 1; Re, flux: the Jacobian of the log). ``error_before`` /
    ``error_after`` are the mean ``|coverage - level|`` over ``levels`` of the physical
    validation coverage, raw and recalibrated.
    """
    truths_scaled = scaler.transform(truths.select(PARAMETERS).to_numpy().astype(np.float64))
    shifts = [fit_mean_shift(samples[:, :, j], truths_scaled[:, j]) for j in range(len(PARAMETERS))]
    knots, values = tuple(k for k, _ in shifts), tuple(v for _, v in shifts)
    shifted = shift_means(samples, knots, values)
    spread_knots, spread_values = ((), (), ()), ((), (), ())
    drivers = tuple(PARAMETERS.index(p) for p in spread_drivers or PARAMETERS)
    if spread_drivers:
        means = shifted.mean(axis=1)
        profiles = [
            fit_spread_profile(shifted[:, :, j], truths_scaled[:, j], driver=means[:, drivers[j]])
            for j in range(len(PARAMETERS))
        ]
        spread_knots = tuple(k for k, _ in profiles)
        spread_values = tuple(v for _, v in profiles)
        shifted = stretch_by_mean(shifted, spread_knots, spread_values, drivers)
    groups = calibration_groups(truths)
    scaled_fit = fit_recalibration(
        shifted, truths_scaled, RECALIBRATION_LEVELS, floors=FLOOR_GRID, groups=groups
    )
    scale, exponent = [], []
    for j, p in enumerate(PARAMETERS):
        g, k, _ = search_physical_recalibration(
            shifted[:, :, j],
            truths[p].to_numpy(),
            functools.partial(scaler.inverse_parameter, index=j),
            levels,
            candidates=[(scaled_fit.exponent[j], scaled_fit.scale[j])],
            floor=scaled_fit.floor[j],
            groups=groups,
        )
        exponent.append(g)
        scale.append(k)
        log(
            f"dropout {rate:g}: {p} mean shift up to {max(map(abs, values[j])):.3f}, "
            f"scaled-space fit (exponent {scaled_fit.exponent[j]:g}, scale "
            f"{scaled_fit.scale[j]:.3f}, floor {scaled_fit.floor[j]:g}) -> physical search: "
            f"exponent {g:g}, scale {k:.3f}"
        )
    recalibration = Recalibration(
        scale=tuple(scale),
        exponent=tuple(exponent),
        floor=scaled_fit.floor,
        shift_knots=knots,
        shift_values=values,
        spread_knots=spread_knots,
        spread_values=spread_values,
        spread_drivers=drivers,
        error_before=tuple(_coverage_error(raw, p) for p in PARAMETERS),
        levels=tuple(float(v) for v in levels),
    )
    summary = summarize(predict_physical(recalibration.apply(samples), scaler))
    recalibrated = coverage_table(
        summary, truths, levels, dropout_rate=rate, split="val", recalibrated=True
    )
    recalibration = dataclasses.replace(
        recalibration,
        error_after=tuple(_coverage_error(recalibrated, p) for p in PARAMETERS),
    )
    return recalibration, recalibrated


def _coverage_error(table: pl.DataFrame, parameter: str) -> float:
    """Mean ``|coverage - level|`` of one parameter in a coverage table."""
    rows = table.filter(pl.col("parameter") == parameter)
    return float((rows["coverage"] - rows["level"]).abs().mean())


def dataset_inputs(
    profile: Profile,
    root: Path,
    shard_dirs: Sequence[Path | str],
    dataset: str,
    sim_key: str,
    *,
    domain: Domain | None = None,
    imaging: ImagingConfig | None = None,
) -> tuple[object, pl.DataFrame, pl.DataFrame | None]:
    """Images, per-galaxy meta and truths (None for real data) of one dataset partition.

    ``sim_key`` (``sim-test``) is the test split of every shard; any other key is an inbox
    batch stored at ``<root>/inbox_batches/<dataset>/`` by the inbox sensor, read with
    ``imaging`` (default the profile's) and as survey ``domain`` when given.
    """
    if dataset == sim_key:
        images, meta, truths = split_inputs(shard_dirs, "test")
        meta = _library_psf_fwhm(root, meta).with_columns(
            pixel_scale_arcsec=pl.lit(profile.imaging.pixel_scale_arcsec, dtype=pl.Float64)
        )
        return images, meta, truths
    from gampen_ml.fits_input import load_cutouts

    batch = load_cutouts(
        partition_dir(root, "inbox_batches", dataset),
        imaging or profile.imaging,
        profile.limits,
        domain=domain,
    )
    return batch.images, batch.table, None


def cutout_imaging(
    profile: Profile, model: PredictionModel, domain: Domain | None = None
) -> ImagingConfig:
    """How to read real cutouts for ``model``: the profile's imaging, or with a survey
    domain its pixel scale and the model's own image size (cutouts are cropped / zero-padded
    about their centre to the network's input, never resampled)."""
    if domain is None:
        return profile.imaging
    return dataclasses.replace(domain.imaging(profile.imaging), stamp_size_px=model.image_px)


def _library_psf_fwhm(root: Path, meta: pl.DataFrame) -> pl.DataFrame:
    """``galaxy_id`` and ``psf_fwhm_arcsec`` (the library PSF each simulated galaxy was drawn with).

    Simulated galaxies then carry what a real cutout's header gives, so their flags are
    judged as a survey's are (``psf_outside_library``, the point-source criterion).
    """
    table = pl.read_parquet(
        partition_dir(root, "psf_library") / psf.PSF_TABLE_FILE,
        columns=["psf_id", "measured_fwhm_arcsec"],
    )
    return meta.join(table, on="psf_id", how="left").select(
        "galaxy_id", pl.col("measured_fwhm_arcsec").alias("psf_fwhm_arcsec")
    )


def model_registry_info(model_dir: Path) -> dict:
    """``registry.json`` of a published model (MLflow run id, name, version; may be null)."""
    path = Path(model_dir) / REGISTRY_FILE
    return json.loads(path.read_text()) if path.is_file() else {}


def calibrate_and_publish(
    profile: Profile,
    root: Path,
    *,
    device: str | None = None,
    log: Callable[[str], None] = _quiet,
    mlflow_tracking_uri: str | None = None,
) -> CalibrationResult:
    """Choose the dropout rate, publish ``calibrated_dropout_rate/all``, move the alias.

    Writes ``coverage.parquet``, ``calibration.json`` (chosen rate, model name and
    version) and ``recalibration.json``; with a tracking URI the registered version of
    the chosen model becomes the MLflow alias ``champion`` once the files are in place.
    """
    from gampen_ml.registry import set_champion

    model_dirs = {
        rate: partition_dir(root, "trained_model", dropout_key(rate))
        for rate in profile.calibration.dropout_rates
    }
    missing = [str(d) for d in model_dirs.values() if not (d / "model.json").is_file()]
    if missing:
        raise FileNotFoundError(f"trained models missing (train them first): {missing}")
    out = partition_dir(root, "calibrated_dropout_rate")
    with atomic_partition_dir(out) as tmp:
        result = calibrate_dropout_rates(
            profile, model_dirs, shard_dirs(profile, root), tmp, device=device, log=log
        )
        info = model_registry_info(model_dirs[result.chosen_rate])
        calibration = {
            "chosen_dropout_rate": result.chosen_rate,
            "model_name": info.get("model_name") or registered_model_name(profile.name),
            "model_version": info.get("model_version") or "unregistered",
            "mlflow_run_id": info.get("mlflow_run_id"),
            "recalibrated": result.recalibration is not None,
            "n_val_galaxies": result.n_galaxies,
        }
        (tmp / "calibration.json").write_text(json.dumps(calibration, indent=2) + "\n")
    if mlflow_tracking_uri and info.get("model_version"):
        set_champion(
            mlflow_tracking_uri,
            calibration["model_name"],
            calibration["model_version"],
            recalibration=(
                result.recalibration.to_dict() if result.recalibration is not None else None
            ),
        )
        log(f"champion: {calibration['model_name']} v{calibration['model_version']}")
    return result


def training_domain(
    profile: Profile, root: Path
) -> tuple[tuple[float, float] | None, tuple[float, float] | None]:
    """What the training images were made of, for the flags: PSF FWHM and sky-noise ranges.

    The FWHM range of the stored PSF library (:func:`gampen_ml.sim.psf.library_fwhm_range`)
    and the noise pool's sky noise measured as the catalog measures a cutout's
    (:func:`gampen_ml.flags.pool_noise_sigma`) times the profile's
    ``noise.depth_scale_range``; None for what is not stored.
    """
    from gampen_ml.flags import pool_noise_sigma

    psf_dir = partition_dir(root, "psf_library")
    fwhm_range = (
        psf.library_fwhm_range(psf_dir) if (psf_dir / psf.PSF_TABLE_FILE).is_file() else None
    )
    noise_dir = partition_dir(root, "noise_pool")
    sigma_range = None
    if (noise_dir / noise.NOISE_JSON_FILE).is_file():
        sigma = pool_noise_sigma(noise.read_noise_pool(noise_dir))
        lo, hi = profile.noise.depth_scale_range
        sigma_range = (sigma * lo, sigma * hi)
    return fwhm_range, sigma_range


@dataclass(frozen=True)
class TrainingDomain:
    """What a model's training images spanned: the ranges the out-of-domain flags compare against.

    Attributes
    ----------
    psf_fwhm_range_arcsec : (float, float) or None
        FWHM range of the training PSF library (``psf_outside_library``); None: unknown.
    noise_sigma_range_nJy : (float, float) or None
        Sky noise of the training images (``out_of_domain``'s noise criterion); None: unknown.
    priors : PriorConfig
        The simulation priors (``out_of_domain``'s flux and Re criteria).
    pixel_scale_arcsec : float or None
        Pixel scale of the training images (``out_of_domain``'s pixel-scale criterion);
        None: the profile's.
    """

    psf_fwhm_range_arcsec: tuple[float, float] | None
    noise_sigma_range_nJy: tuple[float, float] | None
    priors: PriorConfig
    pixel_scale_arcsec: float | None = None

    def to_dict(self) -> dict:
        """Plain JSON-able dict (ranges as lists or null)."""
        return {
            "psf_fwhm_range_arcsec": _pair(self.psf_fwhm_range_arcsec),
            "noise_sigma_range_nJy": _pair(self.noise_sigma_range_nJy),
            "priors": dataclasses.asdict(self.priors),
            "pixel_scale_arcsec": self.pixel_scale_arcsec,
        }

    @classmethod
    def from_dict(cls, data: Mapping) -> TrainingDomain:
        """Inverse of :meth:`to_dict`; unknown prior fields are an error naming them."""
        fields = {f.name for f in dataclasses.fields(PriorConfig)}
        unknown = sorted(set(data["priors"]) - fields)
        if unknown:
            raise ValueError(f"TrainingDomain.from_dict: unknown prior fields {unknown}")
        priors = {k: tuple(v) if isinstance(v, list) else v for k, v in data["priors"].items()}
        # An archive's domain.json written before the field carries the training imaging.
        scale = data.get("pixel_scale_arcsec", data.get("imaging", {}).get("pixel_scale_arcsec"))
        return cls(
            psf_fwhm_range_arcsec=_pair(data.get("psf_fwhm_range_arcsec")),
            noise_sigma_range_nJy=_pair(data.get("noise_sigma_range_nJy")),
            priors=PriorConfig(**priors),
            pixel_scale_arcsec=None if scale is None else float(scale),
        )


def _pair(value) -> tuple[float, float] | None:
    return None if value is None else (float(value[0]), float(value[1]))


def model_domain(
    profile: Profile, root: Path, model: PredictionModel | None = None
) -> TrainingDomain:
    """The training domain the flags of ``model``'s catalogs compare against.

    A model that carries its own (one read from a ``.gampen`` archive) brings it; otherwise
    :func:`training_domain` of the storage root and the profile's priors.
    """
    if model is not None and model.domain is not None:
        return model.domain
    fwhm_range, sigma = training_domain(profile, root)
    return TrainingDomain(
        fwhm_range, sigma, profile.simulation.priors, profile.imaging.pixel_scale_arcsec
    )


def catalog_flags(
    catalog: pl.DataFrame, profile: Profile, root: Path, model: PredictionModel | None = None
) -> pl.DataFrame:
    """:func:`gampen_ml.flags.compute_flags` against the training domain of the catalog's model.

    :func:`model_domain` (the stored PSF library and noise pool, or the domain an archived
    ``model`` carries) enables ``psf_outside_library`` and the noise criterion of
    ``out_of_domain``, each left out when unknown.
    """
    from gampen_ml.flags import compute_flags

    domain = model_domain(profile, root, model)
    return compute_flags(
        catalog,
        profile.flags,
        psf_fwhm_range=domain.psf_fwhm_range_arcsec,
        noise_sigma_nJy=domain.noise_sigma_range_nJy,
        priors=domain.priors,
        pixel_scale_arcsec=domain.pixel_scale_arcsec or profile.imaging.pixel_scale_arcsec,
    )


def read_calibration(root: Path) -> dict:
    """``calibration.json`` of ``calibrated_dropout_rate`` plus its ``recalibration``."""
    folder = partition_dir(root, "calibrated_dropout_rate")
    path = folder / "calibration.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: calibrate the dropout rate first")
    calibration = json.loads(path.read_text())
    recal = folder / "recalibration.json"
    calibration["recalibration"] = json.loads(recal.read_text()) if recal.is_file() else None
    return calibration


@dataclass(frozen=True)
class PredictionModel:
    """A model ready to predict, with the calibration that belongs to it.

    Attributes
    ----------
    model_dir : Path
        ``trained_model`` folder (``gampen_ml.train.load_trained_model``).
    model_name, model_version : str
        Registered MLflow name and version (``"unregistered"`` without a registry).
    dropout_rate : float
        The model's dropout rate.
    recalibration : Recalibration or None
        The validation-fit recalibration of *this* model: set only when the model is the
        one ``calibrated_dropout_rate`` chose (a recalibration fit for another model's
        posteriors would be wrong for it).
    domain : TrainingDomain or None
        The model's own training domain (a ``.gampen`` archive carries it); None: the
        storage root's (:func:`model_domain`).
    finetuned_for : str or None
        The survey domain this model was fine-tuned for (``finetuned_model/<domain>/``,
        :func:`finetuned_model`); None for the champion and other base models.
    """

    model_dir: Path
    model_name: str
    model_version: str
    dropout_rate: float
    recalibration: Recalibration | None
    domain: TrainingDomain | None = None
    finetuned_for: str | None = None

    @property
    def calibrated(self) -> bool:
        """Whether the posteriors will be recalibrated."""
        return self.recalibration is not None

    @property
    def image_px(self) -> int:
        """Side of the images the network takes (``model.json``)."""
        return int(json.loads((Path(self.model_dir) / "model.json").read_text())["image_px"])


#: File of a ``finetuned_model/<domain>/`` partition naming the model and its calibration.
FINETUNED_CALIBRATION = "calibration.json"


def finetuned_model(profile: Profile, root: Path, domain: str) -> PredictionModel | None:
    """The fine-tuned model of survey ``domain`` (``<root>/finetuned_model/<domain>/``), if any.

    The partition holds a ``trained_model``'s files plus ``calibration.json``
    (``model_name``, ``model_version``, ``dropout_rate``, ``recalibration``, optional
    ``training_domain`` = :meth:`TrainingDomain.to_dict`). Without ``training_domain`` its
    flags compare against no PSF or noise range (the model saw the domain's galaxies, not
    the simulations' range) and against the profile's priors.

    Returns
    -------
    PredictionModel or None
        None when the domain has no published fine-tuned model.
    """
    folder = partition_dir(root, "finetuned_model", domain)
    path = folder / FINETUNED_CALIBRATION
    if not (path.is_file() and (folder / "model.json").is_file()):
        return None
    calibration = json.loads(path.read_text())
    recal = calibration.get("recalibration")
    trained_on = calibration.get("training_domain")
    return PredictionModel(
        model_dir=folder,
        model_name=str(calibration["model_name"]),
        model_version=str(calibration["model_version"]),
        dropout_rate=float(calibration["dropout_rate"]),
        recalibration=Recalibration.from_dict(recal) if recal else None,
        domain=(
            TrainingDomain.from_dict(trained_on)
            if trained_on
            else TrainingDomain(None, None, profile.simulation.priors)
        ),
        finetuned_for=domain,
    )


def champion_model(profile: Profile, root: Path) -> PredictionModel:
    """The calibrated champion: the model ``calibrated_dropout_rate`` chose, with its recalibration."""
    calibration = read_calibration(root)
    rate = float(calibration["chosen_dropout_rate"])
    recal = calibration["recalibration"]
    return PredictionModel(
        model_dir=partition_dir(root, "trained_model", dropout_key(rate)),
        model_name=calibration["model_name"] or registered_model_name(profile.name),
        model_version=str(calibration["model_version"]),
        dropout_rate=rate,
        recalibration=Recalibration.from_dict(recal) if recal else None,
    )


def resolve_prediction_model(
    profile: Profile,
    root: Path,
    model: str | None = None,
    *,
    tracking_uri: str | None = None,
    log: Callable[[str], None] = _quiet,
    domain: str | None = None,
) -> PredictionModel:
    """The model a catalog is made with, and *its* calibration, from one reference.

    Parameters
    ----------
    profile, root
        Profile and storage root (the champion is read from ``calibrated_dropout_rate``).
    model : str, optional
        ``None`` or ``"champion"``: the calibrated champion of ``root`` (without a local
        calibration: the registry's ``champion`` alias). A ``.gampen`` archive
        (:mod:`gampen_ml.model_archive`): its model, name, version, recalibration and
        training domain, with neither ``root`` nor MLflow. A ``trained_model`` folder, an
        MLflow version number or alias (needs ``tracking_uri``): that model, recalibrated
        when it is the champion (same folder or registered version) or when its registered
        version carries a recalibration tag (``gampen_ml.registry.RECALIBRATION_TAG``).
    tracking_uri : str, optional
        MLflow tracking URI for versions and aliases.
    log : callable(str)
        Receives a warning when the model is used without recalibration, and which model
        a ``domain`` gets.
    domain : str, optional
        Survey domain of the cutouts: with ``model`` None or ``"champion"``, the domain's
        fine-tuned model (:func:`finetuned_model`) when it exists, else the champion (and
        ``log`` says so). An explicit ``model`` is used as given.
    """
    from gampen_ml.train import load_trained_model

    if domain is not None and model in (None, "champion"):
        tuned = finetuned_model(profile, root, domain)
        if tuned is not None:
            log(f"domain {domain}: its fine-tuned model {tuned.model_name} v{tuned.model_version}")
            return tuned
        log(
            f"domain {domain}: no fine-tuned model at "
            f"{partition_dir(root, 'finetuned_model', domain)}; the champion is used"
        )
    if model is not None and (str(model).endswith(".gampen") or Path(model).is_file()):
        from gampen_ml.model_archive import open_model_archive

        return open_model_archive(model).prediction_model(profile, log=log)
    try:
        champion = champion_model(profile, root)
    except FileNotFoundError:
        if not tracking_uri:
            raise
        champion = None  # no local calibration: the registry's champion alias decides
    if model in (None, "champion") and champion is not None:
        return champion
    model = model or "champion"
    recal = None
    if Path(model).is_dir():
        model_dir = Path(model)
        info = model_registry_info(model_dir)
        name = info.get("model_name") or registered_model_name(profile.name)
        version = str(info.get("model_version") or "unregistered")
        same = champion is not None and (
            model_dir.resolve() == champion.model_dir.resolve()
            or (version != "unregistered" and version == champion.model_version)
        )
    else:
        if not tracking_uri:
            raise FileNotFoundError(
                f"model {model!r} is neither a trained_model folder nor resolvable without an "
                "MLflow tracking URI"
            )
        from gampen_ml.registry import RECALIBRATION_TAG, model_version_info, resolve_model

        name = registered_model_name(profile.name)
        info = model_version_info(tracking_uri, name, model)
        version = info["version"]
        same = champion is not None and version == champion.model_version
        model_dir = champion.model_dir if same else resolve_model(tracking_uri, name, version)
        if RECALIBRATION_TAG in info["tags"]:
            recal = Recalibration.from_dict(json.loads(info["tags"][RECALIBRATION_TAG]))
    if same:
        return champion
    _, _, meta = load_trained_model(model_dir, "cpu")
    if recal is None:
        log(
            f"model {model} ({name} v{version}) has no calibration of its own (not the "
            "calibrated champion): its posteriors are not recalibrated"
        )
    return PredictionModel(
        model_dir=model_dir,
        model_name=name,
        model_version=version,
        dropout_rate=float(meta.get("dropout_rate", 0.0)),
        recalibration=recal,
    )


def cutout_seed(profile: Profile) -> int:
    """MC seed of every catalog of real cutouts (inbox batches and ``gampen predict``).

    One seed for all, so the same files give the same rows whichever way they came in.
    """
    return derive_seed(profile.seed, "posterior_catalog", "cutouts")


def predict_catalog(
    profile: Profile,
    model: PredictionModel,
    images,
    meta: pl.DataFrame,
    *,
    dataset: str,
    seed: int,
    truths: pl.DataFrame | None = None,
    n_passes: int | None = None,
    store_samples: bool = False,
    sample_table: bool = False,
    out_dir: Path | None = None,
    device: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    domain: str | None = None,
) -> pl.DataFrame:
    """The one prediction path: posterior catalog of ``images`` with ``model`` and its calibration.

    Every catalog of the platform (``sim-test``, inbox batches, ``gampen predict``) is made
    here, so they differ only in their inputs. ``images`` is ``(N, S, S)`` float32 (any
    sliceable, e.g. :class:`SplitImages`); ``meta`` has ``N`` rows with ``galaxy_id``;
    ``domain`` is the survey domain the images were read as (the ``domain`` column).
    """
    from gampen_ml.train import load_trained_model

    net, scaler, _ = load_trained_model(model.model_dir, device)
    inference = profile.inference
    return catalog_from_images(
        net,
        scaler,
        images,
        meta,
        n_passes=n_passes or inference.n_passes,
        draws_per_pass=inference.draws_per_pass,
        seed=seed,
        recalibration=model.recalibration,
        store_samples=store_samples,
        sample_table=sample_table,
        out_dir=out_dir,
        progress=progress,
        truths=truths,
        dataset=dataset,
        model_name=model.model_name,
        model_version=model.model_version,
        dropout_rate=model.dropout_rate,
        galaxies_per_batch=inference.galaxies_per_batch,
        flags=profile.flags,
        device=device,
        domain=domain,
    )


def catalog_and_publish(
    profile: Profile,
    root: Path,
    dataset: str,
    *,
    device: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] = _quiet,
    model: PredictionModel | None = None,
    domain: Domain | None = None,
) -> pl.DataFrame:
    """Posterior catalog of one dataset with the champion model, at ``posterior_catalog/<dataset>``.

    ``sim-test`` is the simulated test split (with truths); any other key is an inbox
    batch stored at ``<root>/inbox_batches/<dataset>/``. Made by :func:`predict_catalog`
    with ``model`` (default the calibrated champion; a batch with a survey ``domain`` gets
    its model from :func:`resolve_prediction_model`) and the batch read as ``domain``.
    With ``profile.inference.sample_table`` the partition also holds ``samples.parquet``
    (the posterior samples in physical units).
    """
    from gampen_ml.catalog import write_catalog

    model = model or champion_model(profile, root)
    images, meta, truths = dataset_inputs(
        profile, root, shard_dirs(profile, root), dataset, SIM_TEST,
        domain=domain, imaging=cutout_imaging(profile, model, domain),
    )  # fmt: skip
    inference = profile.inference
    log(
        f"{dataset}: {len(images)} galaxies x {inference.n_passes} MC passes "
        f"x {inference.draws_per_pass} draws, dropout {model.dropout_rate:g} "
        f"({model.model_name} v{model.model_version})"
    )
    seed = (
        derive_seed(profile.seed, "posterior_catalog", dataset)
        if dataset == SIM_TEST
        else cutout_seed(profile)
    )
    with atomic_partition_dir(partition_dir(root, "posterior_catalog", dataset)) as tmp:
        catalog = predict_catalog(
            profile,
            model,
            images,
            meta,
            dataset=dataset,
            seed=seed,
            truths=truths,
            store_samples=profile.inference.store_samples or dataset == SIM_TEST,
            sample_table=profile.inference.sample_table,
            out_dir=tmp,
            device=device,
            progress=progress,
            domain=None if domain is None else domain.name,
        )
        write_catalog(tmp, catalog)
    return catalog


@dataclass
class PredictResult:
    """Catalog of the accepted cutouts and the files that were skipped, with reasons."""

    catalog: pl.DataFrame
    rejections: list


def predict_cutouts(
    profile: Profile,
    path: Path,
    model: PredictionModel,
    out_file: Path,
    *,
    n_passes: int | None = None,
    device: str | None = None,
    progress: Callable[[int, int], None] | None = None,
    domain: Domain | None = None,
) -> PredictResult:
    """Posterior catalog of real FITS cutouts (a file, a cube or a folder) -> ``out_file``.

    The same path as an inbox batch (:func:`predict_catalog`, :func:`cutout_seed`): the
    same files give the same rows. Bad files are skipped with a reason
    (``PredictResult.rejections``); the rest go on. With a survey ``domain`` the files are
    read as that survey delivers them (:mod:`gampen_ml.fits_input`).
    """
    from gampen_ml.catalog import validate_catalog
    from gampen_ml.fits_input import load_cutouts
    from gampen_ml.io import atomic_file

    batch = load_cutouts(
        path, cutout_imaging(profile, model, domain), profile.limits, domain=domain
    )
    catalog = predict_catalog(
        profile,
        model,
        batch.images,
        batch.table,
        dataset=Path(path).name if Path(path).is_dir() else Path(path).stem,
        seed=cutout_seed(profile),
        n_passes=n_passes,
        device=device,
        progress=progress,
        domain=None if domain is None else domain.name,
    )
    validate_catalog(catalog, str(out_file))
    with atomic_file(out_file) as tmp:
        catalog.write_parquet(tmp)
    return PredictResult(catalog, batch.rejections)


def shift_suite(
    profile: Profile,
    root: Path,
    model: PredictionModel,
    out_dir: Path,
    *,
    n_per_variation: int,
    seed: int | None = None,
    variations: Sequence[str] | None = None,
    device: str | None = None,
    n_workers: int = 1,
    with_sim_test: bool = False,
    log: Callable[[str], None] = _quiet,
) -> tuple[pl.DataFrame, pl.DataFrame, list[str]]:
    """The shift-robustness suite of ``model`` against its training domain, reported.

    :func:`gampen_ml.robustness.evaluate_robustness` with the flags' training domain
    (:func:`model_domain`) and, by default, the frozen test seed; ``with_sim_test`` puts
    the stored ``sim-test`` catalog's rows first when it exists. Writes the report files
    into ``out_dir``; returns ``(table, binned, missed targets)``.
    """
    from gampen_ml import robustness

    domain = model_domain(profile, root, model)
    fwhm_range, sigma = domain.psf_fwhm_range_arcsec, domain.noise_sigma_range_nJy
    frozen = seed is None
    seed = robustness.frozen_seed(profile) if frozen else seed
    table, binned = robustness.evaluate_robustness(
        profile, model, out_dir, n_per_variation=n_per_variation, seed=seed,
        psf_fwhm_range=fwhm_range, noise_sigma_nJy=sigma, variations=variations,
        device=device, n_workers=n_workers, log=log,
    )  # fmt: skip
    test_dir = partition_dir(root, "posterior_catalog", SIM_TEST)
    if with_sim_test and (test_dir / "catalog.parquet").is_file():
        from gampen_ml.catalog import read_catalog

        test = read_catalog(test_dir)
        test = test.join(
            catalog_flags(test, profile, root).drop("dataset"), on="galaxy_id", how="left"
        )
        table = pl.concat([robustness.calibration_summary(test, SIM_TEST), table])
        binned = pl.concat([robustness.conditional_coverage(test, SIM_TEST), binned])
    header = (
        f"Model {model.model_name} v{model.model_version} (dropout {model.dropout_rate:g}, "
        f"{'recalibrated' if model.calibrated else 'not recalibrated'}), profile "
        f"{profile.name}; {n_per_variation} galaxies per variation, seed {seed}"
        f"{' (the frozen test seed)' if frozen else ''}."
    )
    robustness.robustness_report(table, binned, out_dir, header=header)
    return table, binned, robustness.target_misses(table, binned)


def stn_crops(model, images: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """STN inputs, crops and zoom scales of a few galaxies (for paper Figs 4-5).

    ``model`` is a loaded GaMPEN (:func:`gampen_ml.train.load_trained_model`). Returns
    ``(images (n,S,S), crops (n,P,P), scales (n,))`` as float32 arrays.
    """
    import torch

    from gampen_ml.data.transforms import arsinh_image

    x = np.asarray(images, dtype=np.float32)
    with torch.inference_mode():
        tensor = torch.from_numpy(arsinh_image(x[:, None])).to(next(model.parameters()).device)
        crops, scales = model.stn(tensor)
    return x, crops[:, 0].float().cpu().numpy(), scales.float().cpu().numpy()


def coverage_diagnostics(
    catalog: pl.DataFrame,
    samples_scaled: np.ndarray,
    scaler,
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
        "magnitude_true": binned_coverage(
            with_truth, "magnitude_true", [14, 17, 19, 21, 22, 23, 24.5]
        ),
        "re_arcsec_true": binned_coverage(with_truth, "re_arcsec_true", [0, 0.5, 1, 2, 3, 5.1]),
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


def diagnostics_and_publish(
    profile: Profile, root: Path, dataset: str, *, device: str | None = None
) -> dict[str, Path]:
    """Every diagnostic figure of a dataset (+ validation report for simulations).

    Writes ``diagnostic_plots/<dataset>/``: the catalog figures of
    :func:`gampen_ml.plots.make_catalog_figures`, each model's loss curve, the STN crops
    of the champion and, for ``sim-test``, ``validation.md`` / ``validation.json``.
    Returns the written files by name.
    """
    from gampen_ml import plots
    from gampen_ml.catalog import read_catalog
    from gampen_ml.train import load_trained_model
    from gampen_ml.validate import validation_report

    catalog_dir = partition_dir(root, "posterior_catalog", dataset)
    catalog = read_catalog(catalog_dir)
    flags_file = partition_dir(root, "qualitative_flags", dataset) / "flags.parquet"
    flags = pl.read_parquet(flags_file) if flags_file.is_file() else None
    calib_dir = partition_dir(root, "calibrated_dropout_rate")
    coverage = pl.read_parquet(calib_dir / "coverage.parquet")
    calibration = read_calibration(root)
    rate = float(calibration["chosen_dropout_rate"])
    model_dir = partition_dir(root, "trained_model", dropout_key(rate))
    has_samples = (catalog_dir / SAMPLES_FILE).is_file()
    model = scaler = samples_scaled = samples = None
    if has_samples or dataset == SIM_TEST:
        model, scaler, _ = load_trained_model(model_dir, device)  # once, for both uses below
    if has_samples:
        samples_scaled = load_npy_mmap(catalog_dir / SAMPLES_FILE)
        samples = predict_physical(samples_scaled, scaler)
    with atomic_partition_dir(partition_dir(root, "diagnostic_plots", dataset)) as tmp:
        paths = plots.make_catalog_figures(
            catalog,
            tmp,
            flags=flags,
            coverage_table=coverage.filter(~pl.col("recalibrated")),
            samples=samples,
            chosen_dropout=rate,
            flag_config=profile.flags,
        )
        for r in profile.calibration.dropout_rates:
            history = partition_dir(root, "trained_model", dropout_key(r)) / "history.json"
            if history.is_file():
                name = f"loss_curve_{dropout_key(r)}"
                fig = plots.loss_curve(json.loads(history.read_text()))
                paths[name] = plots.save_figure(fig, tmp / f"{name}.png")
        if dataset == SIM_TEST:
            images, _, _ = split_inputs(shard_dirs(profile, root), "test")
            x, crops, scales = stn_crops(model, images[0 : min(64, len(images))])
            paths["stn_examples"] = plots.save_figure(
                plots.stn_examples(x, crops, scales), tmp / "stn_examples.png"
            )
            if samples is not None:
                paths.update(
                    coverage_diagnostics(
                        catalog,
                        samples_scaled,
                        scaler,
                        tmp,
                        seed=derive_seed(profile.seed, "diagnostic_plots", dataset),
                        samples_physical=samples,
                    )
                )
            md, js = validation_report(
                catalog,
                flags,
                tmp,
                profile_name=profile.name,
                coverage_table=coverage,
                flag_config=profile.flags,
            )
            paths["validation"], paths["validation_json"] = md, js
    final = partition_dir(root, "diagnostic_plots", dataset)
    return {name: final / p.name for name, p in paths.items()}
