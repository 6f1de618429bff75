"""One function per pipeline stage: what one asset, or one ``gampen`` command, does.

Both ``gampen_assets`` (Dagster) and ``gampen_ml.cli`` call these, so the two ways of
running the platform cannot drift apart. Each stage reads its inputs through the
:class:`~gampen_ml.store.Store` (``root`` is a store or a storage root folder), calls the
science, and publishes its partition atomically (:meth:`Store.publish`).

The science lives with its concept: prediction models and the one prediction path in
:mod:`gampen_ml.prediction`, the dropout choice and recalibration in
:mod:`gampen_ml.calibrate`, flags in :mod:`gampen_ml.flags`, data views in
:mod:`gampen_ml.data.datasets`, reports in :mod:`gampen_ml.reports`. The names callers
have always imported from here are re-exported (``__all__``).
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from gampen_ml.calibrate import CalibrationResult, choose_dropout_rate, recalibrate_on_validation
from gampen_ml.config import ConfigError, Profile, derive_seed, dropout_key, shard_keys
from gampen_ml.data.datasets import TRUTH_COLUMNS, SplitImages, split_inputs
from gampen_ml.flags import catalog_flags
from gampen_ml.infer import predict_physical, stn_crops
from gampen_ml.prediction import (
    PredictionModel,
    TrainingDomain,
    champion_model,
    cutout_imaging,
    cutout_seed,
    finetuned_model,
    model_domain,
    predict_catalog,
    resolve_prediction_model,
    training_domain,
)
from gampen_ml.reports import coverage_diagnostics
from gampen_ml.sim import noise, psf
from gampen_ml.store import (
    COVERAGE_FILE,
    DIAGNOSTIC_PLOTS,
    MODEL_JSON_FILE,
    NOISE_POOL,
    POSTERIOR_CATALOG,
    PSF_LIBRARY,
    REGISTRY_FILE,
    SIM_TEST,
    UNREGISTERED,
    Calibration,
    ModelInfo,
    Store,
    write_recalibration,
)

if TYPE_CHECKING:
    from gampen_ml.config import ImagingConfig
    from gampen_ml.domains import Domain
    from gampen_ml.sim.shards import ShardSummary

__all__ = [
    "REGISTRY_FILE",
    "SIM_TEST",
    "TRUTH_COLUMNS",
    "CalibrationResult",
    "PredictResult",
    "PredictionModel",
    "SplitImages",
    "TrainingDomain",
    "build_noise_pool",
    "build_psf_library",
    "calibrate_and_publish",
    "calibrate_dropout_rates",
    "catalog_and_publish",
    "catalog_flags",
    "champion_model",
    "coverage_diagnostics",
    "cutout_imaging",
    "cutout_seed",
    "dataset_inputs",
    "diagnostics_and_publish",
    "finetuned_model",
    "model_domain",
    "predict_catalog",
    "predict_cutouts",
    "recalibrate_on_validation",
    "resolve_prediction_model",
    "shard_dirs",
    "shift_suite",
    "simulate_and_publish",
    "simulate_inputs",
    "split_inputs",
    "stn_crops",
    "train_and_publish",
    "training_domain",
]


def _quiet(line: str) -> None:
    """Default ``log`` callable: drop the line."""


# --- inputs ----------------------------------------------------------------------------


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
        seed = derive_seed(profile.seed, PSF_LIBRARY)
        log(f"drawing {profile.psf.n_psfs} synthetic PSFs (seed {seed})")
        cube, table = psf.synthetic_psf_library(profile.psf, profile.imaging, seed)
    with Store.publish(out_dir) as tmp:
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
        seed = derive_seed(profile.seed, NOISE_POOL)
        log(f"drawing {profile.noise.n_sky_objects} synthetic sky objects (seed {seed})")
        pool = noise.synthetic_noise_pool(profile.noise, profile.imaging, seed)
    with Store.publish(out_dir) as tmp:
        noise.write_noise_pool(tmp, pool)
    return pool


def shard_dirs(profile: Profile, root: Store | Path) -> list[Path]:
    """Folders of every ``simulated_galaxies`` shard of ``profile`` under ``root``."""
    return Store.of(root).shards(profile)


def simulate_inputs(
    profile: Profile,
    root: Store | Path,
    keys: Sequence[str] | None = None,
    *,
    n_workers: int = 1,
    log: Callable[[str], None] = _quiet,
) -> Iterator[tuple[str, ShardSummary]]:
    """PSF library, noise pool, then each simulated shard of ``keys`` (default: all) under ``root``.

    A generator: yields ``(shard key, summary)`` as each shard is published, so callers can
    show progress; exhaust it (``list(...)``) to simply build everything.
    """
    store = Store.of(root)
    keys = list(shard_keys(profile) if keys is None else keys)
    unknown = sorted(set(keys) - set(shard_keys(profile)))
    if unknown:
        raise ConfigError(f"shards {unknown} are not shards of profile {profile.name!r}")
    build_psf_library(profile, store.psf_library(), log=log)
    build_noise_pool(profile, store.noise_pool(), log=log)
    for key in keys:
        yield key, simulate_and_publish(profile, store, key, n_workers=n_workers)


def simulate_and_publish(
    profile: Profile, root: Store | Path, key: str, *, n_workers: int | None = None
) -> ShardSummary:
    """Render one shard from the stored PSF library and noise pool, publish it at
    ``simulated_galaxies/<key>`` (byte-identical for any ``n_workers``; None: every core)."""
    from gampen_ml.sim.shards import simulate_shard

    store = Store.of(root)
    with store.publish(store.shard(key)) as tmp:
        return simulate_shard(
            profile, key, store.psf_library(), store.noise_pool(), tmp, n_workers=n_workers
        )


# --- models ----------------------------------------------------------------------------


def train_and_publish(
    profile: Profile,
    dropout_rate: float,
    root: Store | Path,
    *,
    device: str | None = None,
    progress: bool = False,
    log: Callable[[str], None] = _quiet,
    mlflow_tracking_uri: str | None = None,
    mlflow_artifact_location: str | None = None,
):
    """Train one model on every shard and publish it at ``trained_model/dropout-R``.

    Training runs in a fixed hidden work folder beside the partition
    (:meth:`Store.training_work`), so a killed run resumes from its last checkpoint; the
    finished model is then renamed into place atomically with its ``registry.json``
    (:class:`~gampen_ml.store.ModelInfo`). Returns the :class:`gampen_ml.train.TrainResult`.
    """
    from gampen_ml.registry import registered_model_name
    from gampen_ml.train import train_model

    store = Store.of(root)
    work = store.training_work(dropout_rate)
    result = train_model(
        profile,
        dropout_rate,
        store.shards(profile),
        work,
        device=device,
        resume=True,
        progress=progress,
        log=log,
        mlflow_tracking_uri=mlflow_tracking_uri,
        mlflow_artifact_location=mlflow_artifact_location,
    )
    info = ModelInfo(
        model_name=registered_model_name(profile.name),
        model_version=str(result.model_version) if result.model_version else None,
        mlflow_run_id=result.mlflow_run_id,
    )
    with store.publish(store.trained_model(dropout_rate)) as tmp:
        shutil.copytree(work, tmp, dirs_exist_ok=True)
        info.write(tmp)
    shutil.rmtree(work, ignore_errors=True)
    return result


def calibrate_dropout_rates(
    profile: Profile,
    model_dirs: Mapping[float, Path],
    shard_dirs: Sequence[Path | str],
    out_dir: Path,
    *,
    device: str | None = None,
    log: Callable[[str], None] = _quiet,
) -> CalibrationResult:
    """Validation coverage of every dropout model; choose; recalibrate (paper §5).

    :func:`gampen_ml.calibrate.choose_dropout_rate` on the validation split of
    ``shard_dirs``; writes ``coverage.parquet`` and, when recalibrating,
    ``recalibration.json`` into ``out_dir``.
    """
    images, meta, truths = split_inputs(shard_dirs, "val")
    result = choose_dropout_rate(profile, model_dirs, images, meta, truths, device=device, log=log)
    if result.recalibration is not None:
        write_recalibration(out_dir, result.recalibration)
    result.coverage.write_parquet(Path(out_dir) / COVERAGE_FILE)
    return result


def calibrate_and_publish(
    profile: Profile,
    root: Store | Path,
    *,
    device: str | None = None,
    log: Callable[[str], None] = _quiet,
    mlflow_tracking_uri: str | None = None,
) -> CalibrationResult:
    """Choose the dropout rate, publish ``calibrated_dropout_rate/all``, move the alias.

    Writes ``coverage.parquet``, ``calibration.json`` (:class:`~gampen_ml.store.Calibration`:
    chosen rate, model name and version) and ``recalibration.json``; with a tracking URI
    the registered version of the chosen model becomes the MLflow alias ``champion`` once
    the files are in place.
    """
    from gampen_ml.registry import set_champion

    store = Store.of(root)
    model_dirs = {rate: store.trained_model(rate) for rate in profile.calibration.dropout_rates}
    missing = [str(d) for d in model_dirs.values() if not (d / MODEL_JSON_FILE).is_file()]
    if missing:
        raise FileNotFoundError(f"trained models missing (train them first): {missing}")
    with store.publish(store.calibration()) as tmp:
        result = calibrate_dropout_rates(
            profile, model_dirs, store.shards(profile), tmp, device=device, log=log
        )
        info = ModelInfo.read(model_dirs[result.chosen_rate])
        calibration = Calibration(
            chosen_dropout_rate=result.chosen_rate,
            model_name=info.name_or(profile.name),
            model_version=info.model_version or UNREGISTERED,
            mlflow_run_id=info.mlflow_run_id,
            recalibrated=result.recalibration is not None,
            n_val_galaxies=result.n_galaxies,
            recalibration=result.recalibration,
        )
        calibration.write(tmp)
    if mlflow_tracking_uri and info.model_version:
        set_champion(
            mlflow_tracking_uri,
            calibration.model_name,
            calibration.model_version,
            recalibration=(
                result.recalibration.to_dict() if result.recalibration is not None else None
            ),
        )
        log(f"champion: {calibration.model_name} v{calibration.model_version}")
    return result


# --- catalogs --------------------------------------------------------------------------


def dataset_inputs(
    profile: Profile,
    root: Store | Path,
    dataset: str,
    *,
    domain: Domain | None = None,
    imaging: ImagingConfig | None = None,
) -> tuple[object, pl.DataFrame, pl.DataFrame | None]:
    """Images, per-galaxy meta and truths (None for real data) of one dataset partition.

    ``sim-test`` is the test split of every shard, its meta with the library PSF's FWHM
    and the profile's pixel scale (what a real cutout's header gives); any other key is an
    inbox batch stored at ``inbox_batches/<dataset>/`` by the inbox sensor, read with
    ``imaging`` (default the profile's) and as survey ``domain`` when given.
    """
    store = Store.of(root)
    if dataset == SIM_TEST:
        images, meta, truths = split_inputs(store.shards(profile), "test")
        fwhm = pl.read_parquet(store.psf_table(), columns=["psf_id", "measured_fwhm_arcsec"])
        meta = (
            meta.join(fwhm, on="psf_id", how="left")
            .select("galaxy_id", pl.col("measured_fwhm_arcsec").alias("psf_fwhm_arcsec"))
            .with_columns(
                pixel_scale_arcsec=pl.lit(profile.imaging.pixel_scale_arcsec, dtype=pl.Float64)
            )
        )
        return images, meta, truths
    from gampen_ml.fits_input import load_cutouts

    batch = load_cutouts(
        store.inbox_batch(dataset), imaging or profile.imaging, profile.limits, domain=domain
    )
    return batch.images, batch.table, None


def catalog_and_publish(
    profile: Profile,
    root: Store | Path,
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
    batch (:func:`dataset_inputs`). Made by :func:`~gampen_ml.prediction.predict_catalog`
    with ``model`` (default the calibrated champion; a batch with a survey ``domain`` gets
    its model from :func:`~gampen_ml.prediction.resolve_prediction_model`) and the batch
    read as ``domain``. With ``profile.inference.sample_table`` the partition also holds
    ``samples.parquet`` (the posterior samples in physical units).
    """
    from gampen_ml.catalog import write_catalog

    store = Store.of(root)
    model = model or champion_model(profile, store)
    imaging = cutout_imaging(profile, model, domain)
    images, meta, truths = dataset_inputs(profile, store, dataset, domain=domain, imaging=imaging)
    inference = profile.inference
    log(
        f"{dataset}: {len(images)} galaxies x {inference.n_passes} MC passes "
        f"x {inference.draws_per_pass} draws, dropout {model.dropout_rate:g} "
        f"({model.model_name} v{model.model_version})"
    )
    simulated = dataset == SIM_TEST
    seed = (
        derive_seed(profile.seed, POSTERIOR_CATALOG, dataset) if simulated else cutout_seed(profile)
    )
    with store.publish(store.catalog(dataset)) as tmp:
        catalog = predict_catalog(
            profile, model, images, meta, dataset=dataset, seed=seed, truths=truths,
            store_samples=inference.store_samples or simulated,
            sample_table=inference.sample_table, out_dir=tmp, device=device,
            progress=progress, domain=None if domain is None else domain.name,
        )  # fmt: skip
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

    The same path as an inbox batch (:func:`~gampen_ml.prediction.predict_catalog`,
    :func:`~gampen_ml.prediction.cutout_seed`): the same files give the same rows. Bad
    files are skipped with a reason (``PredictResult.rejections``); the rest go on. With a
    survey ``domain`` the files are read as that survey delivers them
    (:mod:`gampen_ml.fits_input`).
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


# --- validation and figures ------------------------------------------------------------


def shift_suite(
    profile: Profile,
    root: Store | Path,
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
    (:func:`~gampen_ml.prediction.model_domain`) and, by default, the frozen test seed;
    ``with_sim_test`` puts the stored ``sim-test`` catalog's rows first when it exists.
    Writes the report files into ``out_dir``; returns ``(table, binned, missed targets)``.
    """
    from gampen_ml import robustness
    from gampen_ml.catalog import read_catalog

    store = Store.of(root)
    domain = model_domain(profile, store, model)
    frozen = seed is None
    seed = robustness.frozen_seed(profile) if frozen else seed
    table, binned = robustness.evaluate_robustness(
        profile, model, out_dir, n_per_variation=n_per_variation, seed=seed,
        psf_fwhm_range=domain.psf_fwhm_range_arcsec, noise_sigma_nJy=domain.noise_sigma_range_nJy,
        variations=variations, device=device, n_workers=n_workers, log=log,
    )  # fmt: skip
    if with_sim_test and store.catalog_file(SIM_TEST).is_file():
        test = read_catalog(store.catalog(SIM_TEST))
        test = test.join(
            catalog_flags(test, profile, store).drop("dataset"), on="galaxy_id", how="left"
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


def diagnostics_and_publish(
    profile: Profile, root: Store | Path, dataset: str, *, device: str | None = None
) -> dict[str, Path]:
    """Every diagnostic figure of a dataset (+ validation report for simulations).

    Writes ``diagnostic_plots/<dataset>/``: the catalog figures of
    :func:`gampen_ml.plots.make_catalog_figures`, each model's loss curve and, for
    ``sim-test``, the champion's STN crops, :func:`~gampen_ml.reports.coverage_diagnostics`
    and ``validation.md`` / ``validation.json``. Returns the written files by name.
    """
    from gampen_ml import plots
    from gampen_ml.catalog import read_catalog
    from gampen_ml.io import load_npy_mmap
    from gampen_ml.train import load_trained_model
    from gampen_ml.validate import validation_report

    store = Store.of(root)
    catalog = read_catalog(store.catalog(dataset))
    flags_file = store.flags_file(dataset)
    flags = pl.read_parquet(flags_file) if flags_file.is_file() else None
    coverage = pl.read_parquet(store.coverage_file())
    rate = store.read_calibration().chosen_dropout_rate
    has_samples = store.samples_file(dataset).is_file()
    model = scaler = samples_scaled = samples = None
    if has_samples or dataset == SIM_TEST:
        model, scaler, _ = load_trained_model(store.trained_model(rate), device)
    if has_samples:
        samples_scaled = load_npy_mmap(store.samples_file(dataset))
        samples = predict_physical(samples_scaled, scaler)
    out = store.plots(dataset)
    with store.publish(out) as tmp:
        paths = plots.make_catalog_figures(
            catalog, tmp, flags=flags, coverage_table=coverage.filter(~pl.col("recalibrated")),
            samples=samples, chosen_dropout=rate, flag_config=profile.flags,
        )  # fmt: skip
        for r in profile.calibration.dropout_rates:
            if store.history(r).is_file():
                name = f"loss_curve_{dropout_key(r)}"
                figure = plots.loss_curve(json.loads(store.history(r).read_text()))
                paths[name] = plots.save_figure(figure, tmp / f"{name}.png")
        if dataset == SIM_TEST:
            images, _, _ = split_inputs(store.shards(profile), "test")
            x, crops, scales = stn_crops(model, images[0 : min(64, len(images))])
            paths["stn_examples"] = plots.save_figure(
                plots.stn_examples(x, crops, scales), tmp / "stn_examples.png"
            )
            if samples is not None:
                seed = derive_seed(profile.seed, DIAGNOSTIC_PLOTS, dataset)
                paths |= coverage_diagnostics(
                    catalog, samples_scaled, scaler, tmp, seed=seed, samples_physical=samples
                )
            paths["validation"], paths["validation_json"] = validation_report(
                catalog, flags, tmp, profile_name=profile.name, coverage_table=coverage,
                flag_config=profile.flags,
            )  # fmt: skip
    return {name: out / p.name for name, p in paths.items()}
